"""On-load RTN int8/int4 (ferry/quant/on_load_rtn.py) against an HF float model holding
the dequantized RTN weights, on the same tiny random Llama: the logits of a prefill, a
chunk on a cached prefix and decodes must match, so only the kernels' float rounding
differs, not the quantization."""
from __future__ import annotations

import pytest
import torch

from ferry.checkpoint import load_hf_config
from ferry.kernels.quant_reference import dequantize_wna16, quantize_rtn
from ferry.models.loader import get_model
from ferry.quant.on_load_rtn import RtnWeightMethods
from test_models import PagedRunner, assert_logits_close, hf_logits

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_hf(path, bits, group_size, symmetric):
    """HF's float model with every projection replaced by its RTN round trip."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                k = module.weight.shape[1]
                gs = group_size if k % group_size == 0 else k
                q, s, z = quantize_rtn(module.weight.data, bits, gs, symmetric)
                module.weight.data = dequantize_wna16(q, s, z, bits, gs)
    return model


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 32, True), (4, 32, True),
                                                       (4, 64, False), (8, 128, False)])
def test_rtn_logits_match_hf_with_dequantized_weights(tiny_model_dir, bits, group_size, symmetric):
    path = tiny_model_dir("llama")       # hidden 64, intermediate 128: group 128 -> per channel
    methods = RtnWeightMethods(bits, group_size, symmetric)
    model = get_model(path, load_hf_config(path), torch.float32, torch.device("cpu"),
                      weight_methods=methods)
    down = model.model.layers[0].mlp.down_proj
    assert down.qweight.dtype == torch.uint8 and not hasattr(down, "weight")
    assert down.qweight.shape == (64, 128 if bits == 8 else 64)
    assert model.model.embed_tokens.weight.dtype == torch.float32     # not quantized
    hf = _dequantized_hf(str(path), bits, group_size, symmetric)
    float_hf = _dequantized_hf(str(path), 8, 1, True)  # ~exact: 1-wide groups
    gen = torch.Generator().manual_seed(bits + group_size)
    prompt = torch.randint(3, 300, (12,), generator=gen).tolist()
    runner = PagedRunner(model)
    got = runner.step([(0, prompt, 0, 7)])[0]                          # first chunk
    assert_logits_close(got, hf_logits(hf, prompt[:7]), "chunk 1")
    got = runner.step([(0, prompt, 7, 5)])[0]                          # chunk on the cached prefix
    assert_logits_close(got, hf_logits(hf, prompt)[7:], "chunk 2")
    tokens = list(prompt)
    for step in range(3):                                              # greedy decodes
        tokens.append(int(hf_logits(hf, tokens)[-1].argmax()))
        got = runner.step([(0, tokens, len(tokens) - 1, 1)])[0]
        assert_logits_close(got, hf_logits(hf, tokens)[-1:], f"decode {step}")
    # and the quantization is real: the logits differ from the float model's
    assert float((hf_logits(hf, prompt) - hf_logits(float_hf, prompt)).abs().max()) > 1e-3


def test_group_size_falls_back_to_per_channel_and_bits_are_checked():
    methods = RtnWeightMethods(4, 32)
    assert methods.linear_method("x", None).group_size_for(96) == 32
    assert methods.linear_method("x", None).group_size_for(80) == 80    # per channel
    with pytest.raises(ValueError, match="bits 4 or 8"):
        RtnWeightMethods(3)
