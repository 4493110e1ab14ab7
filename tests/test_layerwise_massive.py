"""diagnostics.massive_tokens: counts of massive-activation tokens on hand-made states."""
import pytest
import torch

from esmerge.signals import diagnostics, sliced


def test_counts_only_tokens_far_above_the_layer_median():
    tokens = torch.ones(3, 4, 5, 6)          # [L, K, T, d]: every norm sqrt(6)
    tokens[1, 2, 3] *= 50                    # one massive token at layer 1
    tokens[2, 0, :2] *= 19                   # below 20x the median: not massive
    tokens[2, 1, 4] *= 21                    # above: massive
    assert diagnostics.massive_tokens(tokens).tolist() == [0, 1, 1]
    assert diagnostics.massive_tokens(tokens, factor=10).tolist() == [0, 1, 3]


def test_masked_slots_are_skipped():
    tokens = torch.ones(1, 2, 3, 4)
    tokens[0, 1, 2] = 0                      # a padding slot ...
    tokens[0, 0, 0] *= 30                    # ... and one massive real token
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert diagnostics.massive_tokens(tokens, mask=mask).tolist() == [1]


def test_one_massive_token_dominates_the_pooled_swd():
    # Two models whose blocks agree except that one scales a massive token down by a third: the
    # mean-pooled SWD between them is far larger than for a small change on ordinary tokens.
    torch.manual_seed(0)
    base = torch.randn(1, 16, 8, 6)
    small = base.clone()
    small[0, :, 1] *= 1.1
    spiky_base = base.clone()
    spiky_base[0, 0, 3] *= 200
    spiky_other = spiky_base.clone()
    spiky_other[0, 0, 3] *= 2 / 3
    assert diagnostics.massive_tokens(spiky_base).tolist() == [1]

    def swd(a, b):
        return float(sliced.swd_table({"m": a.mean(2)}, [{"m": b.mean(2)}], 256, seed=0)[0, 0, 0])

    assert swd(spiky_base, spiky_other) > 10 * swd(base, small)


def test_refuses_states_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\[L, K, T, d\]"):
        diagnostics.massive_tokens(torch.ones(3, 4, 5))
