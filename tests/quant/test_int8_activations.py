"""The ``cpu_int8_activations`` switch on a tiny random Llama: the int linears (and an int8
LM head) quantize their inputs to int8 per group (``kernels.wna16_linear_a8``).

- on the C++ backend the logits equal those of the PyTorch reference backend (which
  fake-quantizes x per group exactly as the kernel does): rel 1e-4;
- they are close to, and not equal to, the float-activation path's: relative L2 error
  below 5e-2 (measured ~3%: int8 rounding of each input, ~0.5% per linear on 64-wide
  groups, compounded over 2 layers and the head of a random model) and the same greedy
  tokens;
- the key reaches the weight methods from the config / registry, the int8 head is RTN.
"""
from __future__ import annotations

import pytest
import torch

import ferry.kernels
from ferry.checkpoint import load_hf_config
from ferry.config import EngineConfig
from ferry.kernels import reference
from ferry.kernels.cpu import quant_linear as cpu_quant
from ferry.models.loader import get_model
from ferry.quant.on_load_rtn import RtnWeightMethods
from ferry.quant.registry import resolve_quantization
from test_models import PagedRunner, assert_logits_close

needs_vnni = pytest.mark.skipif(
    ferry.kernels.prepare(torch.device("cpu")) != "cpu" or not cpu_quant.int8_activations_fit(64),
    reason="needs the C++ kernels on a CPU with AVX512-VNNI")


def _model(path, **methods):
    return get_model(path, load_hf_config(path), torch.float32, torch.device("cpu"),
                     weight_methods=RtnWeightMethods(group_size=64, **methods))


def _logits(model, prompt: list[int], decodes: int = 3) -> list[torch.Tensor]:
    """A prefill then greedy decodes (the first model's tokens are fed to every model)."""
    runner = PagedRunner(model)
    out = [runner.step([(0, prompt, 0, len(prompt))])[0]]
    tokens = list(prompt)
    for _ in range(decodes):
        tokens.append(int(out[-1][-1].argmax()))
        out.append(runner.step([(0, tokens, len(tokens) - 1, 1)])[0])
    return out


def _assert_near(got: torch.Tensor, want: torch.Tensor, context: str) -> None:
    err = float((got - want).norm() / want.norm())
    assert err < 5e-2, f"{context}: relative L2 error {err:.3f}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), f"{context}: greedy tokens differ"


@needs_vnni
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_kernel_equals_the_reference_and_is_close_to_float_activations(
        tiny_model_dir, monkeypatch, bits):
    path = tiny_model_dir("llama")
    prompt = list(range(5, 17))
    a8 = _logits(_model(path, bits=bits, int8_activations=True), prompt)
    a16 = _logits(_model(path, bits=bits), prompt)
    with monkeypatch.context() as patch:
        patch.setitem(ferry.kernels._ops_by_device_type, "cpu", reference)
        want = _logits(_model(path, bits=bits, int8_activations=True), prompt)
    for step, (got, ref_logits, float_logits) in enumerate(zip(a8, want, a16)):
        assert_logits_close(got, ref_logits, f"step {step} vs reference")
        _assert_near(got, float_logits, f"step {step} vs float activations")
    assert max(float((g - f).abs().max()) for g, f in zip(a8, a16)) > 1e-4   # really int8


@needs_vnni
def test_int8_head_is_rtn_and_follows_the_switch(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama")                    # untied head
    model = _model(path, bits=8, head_dtype=torch.int8, int8_activations=True)
    head = model.lm_head
    assert head.qweight.dtype == torch.uint8 and not hasattr(head, "weight")
    assert head.qweight.shape == (model.vocab_size, 64) and head.scales.shape == (model.vocab_size, 1)
    prompt = list(range(5, 17))
    got = _logits(model, prompt)
    float_head = _logits(_model(path, bits=8, int8_activations=True), prompt)
    with monkeypatch.context() as patch:
        patch.setitem(ferry.kernels._ops_by_device_type, "cpu", reference)
        want = _logits(_model(path, bits=8, head_dtype=torch.int8, int8_activations=True), prompt)
    for step, (g, w, f) in enumerate(zip(got, want, float_head)):
        assert_logits_close(g, w, f"step {step} vs reference")
        _assert_near(g, f, f"step {step} vs float head")


def test_the_key_reaches_the_weight_methods(tmp_path):
    assert EngineConfig.from_flat(model="m").model.cpu_int8_activations is False
    assert EngineConfig.from_flat(model="m", cpu_int8_activations=True).model.cpu_int8_activations

    class Unquantized:
        quantization_config = None

    methods = resolve_quantization(Unquantized(), "int4", True).weight_methods
    assert methods.linear_method("x", None).int8_activations
    assert not resolve_quantization(Unquantized(), "int4").weight_methods.linear_method(
        "x", None).int8_activations

    class Gptq:
        quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                               "sym": True, "desc_act": False}

    assert resolve_quantization(Gptq(), "auto", True).weight_methods.linear_method(
        "model.layers.0.mlp.down_proj", None).int8_activations


def test_head_dtype_is_checked():
    with pytest.raises(ValueError, match="head_dtype"):
        RtnWeightMethods(8, head_dtype=torch.float16)
