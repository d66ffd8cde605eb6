"""The 8-bit quantized checkpoints the tensor-parallel tests load (``write_case``), written
by the checkpoint writers of ``tests/quant/checkpoints.py`` from the tiny Llama; the
128x128-block FP8 one from a Llama wide enough that each rank's q, k, v, gate and up
rows and its o and down inputs are whole blocks (head_dim 128)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from checkpoints import write_quantized, write_w8  # noqa: E402

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=128,
            num_key_value_heads=2)
W8_CASES = {
    "vllm-fp8-tensor-dynamic": dict(kind="fp8", weight_strategy="tensor", activation="tensor",
                                    vllm_style=True),
    "vllm-fp8-tensor-static": dict(kind="fp8", weight_strategy="tensor", activation="static",
                                   vllm_style=True),
    "vllm-fp8-block128": dict(kind="fp8", weight_strategy="block", activation="group",
                              block=(128, 128), vllm_style=True),
    "ct-fp8-tensor-static": dict(kind="fp8", weight_strategy="tensor", activation="static"),
    "ct-fp8-tensor-dynamic": dict(kind="fp8", weight_strategy="tensor", activation="tensor"),
    "ct-fp8-channel-token": dict(kind="fp8", weight_strategy="channel", activation="token"),
    "ct-fp8-channel-static": dict(kind="fp8", weight_strategy="channel", activation="static"),
    "ct-fp8-channel-weight-only": dict(kind="fp8", weight_strategy="channel", activation=None),
    "ct-int8-channel-token": dict(kind="int8", weight_strategy="channel", activation="token"),
    "ct-int8-tensor-static": dict(kind="int8", weight_strategy="tensor", activation="static"),
    "gptq-int8-g32": dict(fmt="gptq", bits=8, group_size=32, sym=False),
}


def write_case(tiny_model_dir, dst: Path, case: str) -> Path:
    """Checkpoint ``case`` of W8_CASES written under ``dst`` (its float reference beside it)."""
    options = dict(W8_CASES[case])
    src = tiny_model_dir("llama", **WIDE) if options.get("block") else tiny_model_dir("llama")
    if "fmt" in options:
        return write_quantized(src, dst / "q", dst / "ref", **options)[0]
    return write_w8(src, dst / "q", dst / "ref", options.pop("kind"), **options)[0]


def write_fp8_blocks_split_by_ranks(tiny_model_dir, dst: Path) -> Path:
    """vLLM ``fp8`` 128x128 blocks on a Llama of head_dim 64: with TP=2 each rank's k and v
    rows (64) would be half a block (one process loads it)."""
    src = tiny_model_dir("llama", **{**WIDE, "head_dim": 64})
    return write_w8(src, dst / "q", dst / "ref", "fp8", weight_strategy="block",
                    activation="group", block=(128, 128), vllm_style=True)[0]
