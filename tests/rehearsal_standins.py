"""Stand-ins for the paper-scale rehearsal (``tests/test_paper_rehearsal.py``), and the page's commands.

* ``save_llama31_base``: a tiny model shaped like LLaMA-3.1-8B-Instruct where shape matters: grouped-query
  attention (2 KV heads for 4 query heads), ``rope_scaling`` of type ``llama3``, 131072 positions, an
  untied LM head, saved in bf16 as safetensors shards with ``model.safetensors.index.json``, with a
  LLaMA-3-style tokenizer (``standins.llama3_tokenizer``: ``<|eot_id|>`` ends a turn).
* ``upstream_sources``: the three published specialists in their upstream layouts, derived from that
  base with ``tests/standins.py`` and ``tests/mol_llama_standins.py``: Mol-LLaMA's hub directory (its
  trained encoder in upstream's key layout) with its frozen graph encoders in a fake Hugging Face hub cache,
  Prot2Text-V2's merged checkpoint, and a full fine-tune for ``esmerge convert lora-extract`` (the cell one).
* ``page_commands``: the ``esmerge`` command lines of each ``bash`` block of ``book/paper_scale.md``,
  expanded by bash itself (loops, ``$(...)``, exported variables), as a reader's shell would run them.
* ``STANDIN_IDS`` / ``BUDGET``: the explicit mapping from the page's real ids to the stand-ins and its
  GPU-sized budgets to CI-sized ones (``rehearse``).
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import mol_llama_standins
import standins
import torch

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # LLaMA-3.1-8B-Instruct's config.json
SHARD_SIZE = "40KB"  # ~71 KB of bf16 weights: two shards and an index, as the 8B checkpoint's four


def llama31_config(vocab_size: int):
    """LLaMA-3.1-8B-Instruct's config at hidden 32, 2 layers: GQA 4/2 heads (head dim 8), llama3 RoPE."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling=dict(ROPE_LLAMA3), tie_word_embeddings=False,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=4, torch_dtype="bfloat16")


def save_llama31_base(out: Path, seed: int = 0) -> torch.nn.Module:
    """The base stand-in at ``out`` (bf16 shards + index + tokenizer); returns it in bf16, eval mode.

    The specialists are derived from this bf16 model, so their base tensors equal the saved ones bit
    for bit (the converters refuse any other difference), as upstream's were derived from the bf16 release.
    """
    from transformers import LlamaForCausalLM

    tok = standins.llama3_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama31_config(len(tok))).to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
    tok.save_pretrained(out)
    return model


def upstream_sources(root: Path, base_folder: Path, base_model, hub_cache: Path) -> dict[str, Path]:
    """The published checkpoints' stand-ins under ``root``: ``mol`` (Mol-LLaMA hub layout, sharded, whose
    ``config.json`` names ``base_folder`` as its ``llm_model``; its encoder tensors in upstream's key layout,
    the frozen MoleculeSTM and Uni-Mol in a fake Hugging Face hub cache at ``hub_cache``, where Mol-LLaMA's
    own encoder resolves them), ``p2t`` (Prot2Text-V2, LoRA merged) and ``cell`` (a full fine-tune)."""
    mol_llama_standins.mol_llama_hub_checkpoint(root / "mol", hub_cache, base_model, str(base_folder))
    standins.prot2text_checkpoint(root / "p2t", base_model)
    standins.full_finetune_checkpoint(root / "cell", base_model)
    return {"mol": root / "mol", "p2t": root / "p2t", "cell": root / "cell"}


# --------------------------------------------------------------------------- the page's commands
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^## (.+)$", re.M)
# Everything on the page that is not `esmerge` is setup of the real machine (install, login, download of the
# 8B weights): stubbed, and listed, so that a new kind of command on the page fails the consistency test.
SETUP_COMMANDS = ("make", ".venv/bin/pip", "huggingface-cli")
_SEP, _END = "\x1f", "\x1e"


def page_blocks(page: Path) -> list[tuple[str, str]]:
    """``(section heading, block)`` of each ``bash`` fenced block of a Markdown page, in order; the
    heading is the nearest ``## `` one above the block."""
    text = page.read_text()
    found = []
    for block in FENCE.finditer(text):
        above = [h[1] for h in HEADING.finditer(text) if h.start() < block.start()]
        found.append((above[-1] if above else "", block[1]))
    return found


def page_commands(block: str) -> tuple[list[list[str]], dict[str, str], list[str]]:
    """``(esmerge argvs, exported variables, setup commands skipped)`` of one block, expanded by bash.

    ``esmerge`` is a shell function that prints its arguments, so loops, ``$(for ...)`` and
    ``$VARIABLES`` expand exactly as in a reader's shell, and nothing runs. A command bash cannot find
    fails the block (``set -e``: ``CalledProcessError``); bash runs in an empty temporary folder, so a plain
    shell command added to the page touches nothing here.
    """
    record = f"printf '%s{_SEP}' \"$@\"; printf '{_END}'"
    stubs = "".join(f"function {name} {{ _record setup {name}; }}\n" for name in SETUP_COMMANDS)
    dump = "for v in $(compgen -e | grep '^ESMERGE_' || true); do _record export \"$v\" \"${!v}\"; done"
    script = (f"set -euo pipefail\nfunction _record {{ {record}; }}\n{stubs}"
              f"function esmerge {{ _record esmerge \"$@\"; }}\n{block}\n" + dump + "\n")
    with tempfile.TemporaryDirectory() as empty:
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, cwd=empty,
                              env={"PATH": "/usr/bin:/bin"})  # no ESMERGE_* of the caller leaks in
    records = [r.split(_SEP)[:-1] for r in done.stdout.split(_END) if r]
    argvs = [r for r in records if r[0] == "esmerge"]
    exported = {r[1]: r[2] for r in records if r[0] == "export"}
    skipped = [r[1] for r in records if r[0] == "setup"]
    return argvs, exported, skipped


def substitute(argv: list[str], ids: dict[str, str], budget: dict[str, dict]) -> list[str]:
    """The rehearsal's argv for a page argv: each word that is a real id or path in ``ids`` (or starts with
    one followed by ``/``) replaced by its stand-in; then, unless it is a ``--dry-run`` (whose plan is of the
    page's real budgets), the CI budget: ``budget[subcommand]`` and ``budget["merge:METHOD"]``, each
    ``{"replace": {flag: value}, "add": [words]}``.

    >>> substitute(["esmerge", "evaluate", "--model", "base", "--n-eval", "1000"], {},
    ...            {"evaluate": {"replace": {"--n-eval": "2"}, "add": ["--max-new-tokens", "4"]}})
    ['esmerge', 'evaluate', '--model', 'base', '--n-eval', '2', '--max-new-tokens', '4']
    >>> substitute(["esmerge", "convert", "x", "/models/L/a"], {"/models/L": "/tmp/base"}, {})
    ['esmerge', 'convert', 'x', '/tmp/base/a']
    >>> substitute(["esmerge", "merge", "--method", "ls-merge"], {}, {"merge:ls-merge": {"add": ["--set", "epochs=3"]}})
    ['esmerge', 'merge', '--method', 'ls-merge', '--set', 'epochs=3']
    """
    out = []
    for word in argv:
        for real, standin in ids.items():
            if word == real or word.startswith(real + "/"):
                word = standin + word[len(real):]
                break
        out.append(word)
    if len(out) < 2 or "--dry-run" in out:  # a variable's value, or a plan of the page's real budgets
        return out
    method = flags(out).get("--method", [""])[0]
    for rule in (budget.get(out[1], {}), budget.get(f"{out[1]}:{method}", {})):
        for flag, value in rule.get("replace", {}).items():
            if flag in out:
                out[out.index(flag) + 1] = value
        out += list(rule.get("add", ()))
    return out


def flags(argv: list[str]) -> dict[str, list[str]]:
    """``--flag -> [values]`` of an argv (a flag without a value maps to ``[]``; repeats accumulate).

    >>> flags(["esmerge", "evaluate", "--model", "a", "--model", "b", "--dry-run"])
    {'--model': ['a', 'b'], '--dry-run': []}
    """
    found: dict[str, list[str]] = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            values = found.setdefault(word, [])
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
    return found


def card(folder: Path) -> dict:
    return json.loads((Path(folder) / "card.json").read_text())
