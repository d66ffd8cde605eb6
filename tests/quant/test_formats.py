"""Every quantized format against HF transformers holding the dequantized weights.

The tiny checkpoints are made here (``checkpoints.py``). Weight-only formats (GPTQ, AWQ,
compressed-tensors pack-quantized, FP8 weight-only) must match the float reference to
float32 rounding (relative 1e-4 of the largest logit); formats that also quantize the
activations (W8A8 int8, FP8) are compared with the reference whose linears fake-quantize
their inputs the same way, within 2e-3 (a rounding flip of one activation code moves a
logit by about that). Greedy tokens must agree in both cases.
"""
from __future__ import annotations

import logging

import pytest
import torch

from checkpoints import write_quantized, write_w8
from ferry.checkpoint import checkpoint_has_fp8_kv_cache, load_hf_config
from ferry.models.loader import get_model
from ferry.quant import resolve_quantization
from ferry.quant.fp8 import dynamic_scale, fp8_quantize
from test_models import PagedRunner, hf_logits

CPU = torch.device("cpu")
WEIGHT_ONLY_REL = 1e-4
ACT_QUANT_REL = 2e-3


def load_ferry(path):
    hf_config = load_hf_config(path)
    quant = resolve_quantization(hf_config, "auto")
    return get_model(path, hf_config, torch.float32, CPU, weight_methods=quant.weight_methods), quant


def hf_reference(ref_dir, act: str | None = None, kind: str = "fp8", block_k: int = 0,
                 static_scale: float = 0.05, skip: tuple[str, ...] = ()):
    """HF's float model of ``ref_dir``; with ``act``, each projection fake-quantizes its input."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    if act is None:
        return model
    for name, module in model.named_modules():
        if name.split(".")[-1].endswith("_proj") and not any(s in name for s in skip):
            module.register_forward_pre_hook(lambda m, args: (fake_quant(args[0], act, kind, block_k,
                                                                         static_scale),))
    return model


def fake_quant(x, act, kind, block_k, static_scale):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if kind == "int8":
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        return (torch.round(x / scale).clamp(-128, 127) * scale).reshape(shape)
    if act == "group":
        g = x.reshape(x.shape[0], -1, block_k)
        s = dynamic_scale(g, -1)
        return (fp8_quantize(g, s).float() * s).reshape(shape)
    scale = {"token": lambda: dynamic_scale(x, -1), "tensor": lambda: dynamic_scale(x, None),
             "static": lambda: torch.tensor(static_scale)}[act]()
    return (fp8_quantize(x, scale).float() * scale).reshape(shape)


def tokens(seed: int, length: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, vocab, (length,), generator=gen).tolist()


def check_logits(model, hf, rel: float, context: str, chunked: bool = True) -> None:
    """A prefill, then a chunk and a decode on top of the cache, against HF's logits.

    ``chunked=False``: one prefill of the whole sequence (activation scales computed over
    the whole batch, dynamic per-tensor, differ by construction between batches).
    """
    seq = tokens(3, 21, model.vocab_size)
    runner = PagedRunner(model)
    if chunked:
        (first,) = runner.step([(0, seq, 0, 14)])
        (chunk,) = runner.step([(0, seq, 14, 5)])
        (dec,) = runner.step([(0, seq, 19, 1)])
        got = torch.cat([first, chunk, dec])                           # (20, V)
    else:
        (got,) = runner.step([(0, seq, 0, 20)])                        # (20, V)
    want = hf_logits(hf, seq[:20])
    err = float((got - want).abs().max())
    tol = rel * max(1.0, float(want.abs().max()))
    assert err <= tol, f"{context}: max |ferry - HF| = {err:.2e} > {tol:.2e}"
    # greedy agreement wherever HF's top-2 is not a near-tie
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 10 * tol
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), context


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llama128(tiny_model_dir):
    """Wide enough for group size 128 (hidden 128, intermediate 256)."""
    return tiny_model_dir("llama", hidden_size=128, intermediate_size=256, head_dim=32)


GPTQ_CASES = {
    "int4-g32-sym": dict(bits=4, group_size=32, sym=True),
    "int4-g64-asym": dict(bits=4, group_size=64, sym=False),
    "int4-channel-sym": dict(bits=4, group_size=-1, sym=True),
    "int8-g32-asym": dict(bits=8, group_size=32, sym=False),
    "int8-channel-sym": dict(bits=8, group_size=-1, sym=True),
    "int4-g32-actorder": dict(bits=4, group_size=32, sym=True, act_order=True),
    "int4-g32-actorder-asym-per-shard": dict(bits=4, group_size=32, sym=False, act_order=True,
                                             shared_perm=False),
    "int4-g32-v2-asym": dict(bits=4, group_size=32, sym=False, version="v2"),
    "int4-g32-skip-down": dict(bits=4, group_size=32, sym=True, skip=("down_proj",)),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_matches_dequantized_reference(case, llama, tmp_path):
    kw = dict(GPTQ_CASES[case])
    skip = kw.get("skip", ())
    qc = None
    if skip:   # GPTQModel's "-:" negative dynamic rule leaves a module unquantized
        from ferry.quant.quantize.formats import gptq_config
        qc = gptq_config(4, 32, True, False) | {"dynamic": {"-:.*down_proj": {}}}
    path, ref = write_quantized(llama, tmp_path / "q", tmp_path / "ref", "gptq",
                                quantization_config=qc, **kw)
    model, quant = load_ferry(path)
    assert quant.quant_type == f"gptq_int{kw['bits']}"
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.qweight0.dtype == torch.uint8
    if skip:
        assert layer.mlp.down_proj.weight.dtype == torch.float32
    if kw.get("act_order"):
        parts = layer.self_attn.qkv_proj.wna16_parts
        assert parts == (1 if kw.get("shared_perm", True) else 3)
    check_logits(model, hf_reference(ref), WEIGHT_ONLY_REL, case)


def test_gptq_group_128(llama128, tmp_path):
    path, ref = write_quantized(llama128, tmp_path / "q", tmp_path / "ref", "gptq",
                                bits=4, group_size=128, sym=True)
    check_logits(load_ferry(path)[0], hf_reference(ref), WEIGHT_ONLY_REL, "gptq g128")


def test_gptq_declared_v1_storing_v2_zeros_is_detected(llama, tmp_path, caplog):
    """Symmetric v2 zeros (8) under a config that declares v1: read as v2, and logged."""
    from ferry.quant.quantize.formats import gptq_config
    path, ref = write_quantized(llama, tmp_path / "q", tmp_path / "ref", "gptq", bits=4,
                                group_size=32, sym=True, version="v2",
                                quantization_config=gptq_config(4, 32, True, False, "v1"))
    with caplog.at_level(logging.INFO, logger="ferry.quant.gptq"):
        model, _ = load_ferry(path)
    assert "declares v1 (gptq) but stores 8" in caplog.text
    check_logits(model, hf_reference(ref), WEIGHT_ONLY_REL, "v1 declared, v2 stored")


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_gemm_matches_dequantized_reference(group_size, llama, tmp_path):
    path, ref = write_quantized(llama, tmp_path / "q", tmp_path / "ref", "awq",
                                group_size=group_size, sym=False, skip=("o_proj",))
    model, quant = load_ferry(path)
    assert quant.quant_type == "awq_int4"
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32   # not converted
    check_logits(model, hf_reference(ref), WEIGHT_ONLY_REL, f"awq g{group_size}")


CT_PACKED = {
    "w4a16-g32-sym": dict(bits=4, group_size=32, sym=True),
    "w4a16-g32-asym": dict(bits=4, group_size=32, sym=False),
    "w4a16-channel-asym": dict(bits=4, group_size=-1, sym=False),
    "w8a16-g64-sym": dict(bits=8, group_size=64, sym=True),
    "w8a16-channel-asym": dict(bits=8, group_size=-1, sym=False),
    "w4a16-ignore-gate-up": dict(bits=4, group_size=32, sym=True, skip=("gate_proj", "up_proj")),
}


@pytest.mark.parametrize("case", list(CT_PACKED))
def test_compressed_tensors_pack_quantized(case, llama, tmp_path):
    kw = CT_PACKED[case]
    path, ref = write_quantized(llama, tmp_path / "q", tmp_path / "ref", "compressed-tensors", **kw)
    model, quant = load_ferry(path)
    assert quant.quant_type == f"int{kw['bits']}"
    if kw.get("skip"):
        assert model.model.layers[1].mlp.gate_up_proj.weight.dtype == torch.float32
    check_logits(model, hf_reference(ref), WEIGHT_ONLY_REL, case)


W8_CASES = {
    "ct-int8-channel-token": dict(kind="int8", weight_strategy="channel", activation="token"),
    "ct-int8-tensor-token": dict(kind="int8", weight_strategy="tensor", activation="token"),
    "ct-fp8-channel-token": dict(kind="fp8", weight_strategy="channel", activation="token"),
    "ct-fp8-tensor-static": dict(kind="fp8", weight_strategy="tensor", activation="static"),
    "ct-fp8-tensor-dynamic": dict(kind="fp8", weight_strategy="tensor", activation="tensor"),
    "ct-fp8-channel-weight-only": dict(kind="fp8", weight_strategy="channel", activation=None),
    "ct-fp8-ignore-o": dict(kind="fp8", weight_strategy="channel", activation="token", ignore=("o_proj",)),
    "vllm-fp8-dynamic": dict(kind="fp8", weight_strategy="tensor", activation="tensor", vllm_style=True),
    "vllm-fp8-static": dict(kind="fp8", weight_strategy="tensor", activation="static", vllm_style=True),
    "vllm-fp8-block": dict(kind="fp8", weight_strategy="block", activation="group", block=(32, 32),
                           vllm_style=True, ignore=("down_proj",)),
}


@pytest.mark.parametrize("case", list(W8_CASES))
def test_w8_formats_match_fake_quantized_reference(case, llama, tmp_path):
    kw = dict(W8_CASES[case])
    path, ref = write_w8(llama, tmp_path / "q", tmp_path / "ref", **kw)
    model, quant = load_ferry(path)
    assert quant.quant_type == ("fp8" if kw["kind"] == "fp8" else "int8")
    dtype = torch.float8_e4m3fn if kw["kind"] == "fp8" else torch.int8
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == dtype
    hf = hf_reference(ref, kw["activation"], kw["kind"], (kw.get("block") or (0, 0))[1],
                      skip=kw.get("ignore", ()))
    rel = WEIGHT_ONLY_REL if kw["activation"] is None else ACT_QUANT_REL
    check_logits(model, hf, rel, case, chunked=kw["activation"] != "tensor")


@pytest.mark.parametrize("names,vllm_style", [
    (("self_attn.k_scale", "self_attn.v_scale"), False),
    (("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"), False),  # llm-compressor < 0.2
    (("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"), False),            # ModelOpt
    (("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"), True),   # AutoFP8
], ids=["current", "output_scale", "proj_k_scale", "autofp8"])
def test_kv_cache_scales_reach_the_attention_layers(llama, tmp_path, names, vllm_style, caplog):
    vllm = dict(vllm_style=True, weight_strategy="tensor", activation="tensor") if vllm_style else {}
    path, _ = write_w8(llama, tmp_path / "q", tmp_path / "ref", kind="fp8", kv_scales=True,
                       kv_scale_names=names, **vllm)
    assert checkpoint_has_fp8_kv_cache(load_hf_config(path))   # kv_cache_dtype auto -> fp8
    with caplog.at_level(logging.WARNING, logger="ferry.models.loader"):
        model, quant = load_ferry(path)
    assert "does not use" not in caplog.text   # every scale tensor was taken
    assert quant.kv_cache_fp8
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.attn.k_scale == pytest.approx(0.02 + i / 100)
        assert layer.self_attn.attn.v_scale == pytest.approx(0.03 + i / 100)


def test_on_load_fp8_matches_its_own_dequantized_weights(llama):
    """quant_type fp8 on a float checkpoint: per-channel FP8 weights, per-token activations."""
    hf_config = load_hf_config(llama)
    quant = resolve_quantization(hf_config, "fp8")
    model = get_model(llama, hf_config, torch.float32, CPU, weight_methods=quant.weight_methods)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.float8_e4m3fn and quant.quant_type == "fp8"
    hf = hf_reference(llama, "token", "fp8")
    with torch.no_grad():   # the reference holds the same FP8-rounded weights
        for name, module in hf.named_modules():
            if name.endswith("_proj"):
                w = module.weight
                scale = (w.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
                w.copy_(fp8_quantize(w, scale).float() * scale)
    check_logits(model, hf, ACT_QUANT_REL, "on-load fp8")


def test_fp8_blocks_need_whole_activation_groups_in_one_process():
    from types import SimpleNamespace

    from ferry.quant.fp8 import check_whole_blocks
    layer = SimpleNamespace(prefix="model.layers.0.mlp.down_proj", input_size=96)
    check_whole_blocks(SimpleNamespace(prefix="ok", input_size=128), 128, [64], (32, 64))
    with pytest.raises(ValueError, match=r"down_proj: input size 96 is not a multiple of "
                                         r"weight_block_size 64"):
        check_whole_blocks(layer, 96, [64], (32, 64))
