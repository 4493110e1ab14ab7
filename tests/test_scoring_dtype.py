"""The evaluation cache key knows the dtype a base runs in: fp32 ids are unchanged, bf16 ids differ."""
from __future__ import annotations

import copy
import hashlib

import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.specialists.base_llm import load_base


def test_model_id_separates_fp32_from_bf16_and_keeps_fp32_ids():
    fp32 = load_base(scales.get("smoke"))
    bf16 = copy.copy(fp32)
    bf16.model = copy.deepcopy(fp32.model).to(torch.bfloat16)
    assert bf16.weights_sha256 == fp32.weights_sha256  # the weights hash names the stored weights
    ids = {name: ev.ModelUnderTest.base_only(b).model_id("BindingDB") for name, b in (("fp32", fp32), ("bf16", bf16))}
    # fp32: the formula used before dtypes were recorded, so existing cached results stay valid
    assert ids["fp32"] == hashlib.sha256(f"{fp32.weights_sha256}|no-adapter".encode()).hexdigest()[:16]
    assert ids["bf16"] == hashlib.sha256(f"{fp32.weights_sha256}|no-adapter|dtype:bfloat16".encode()).hexdigest()[:16]
