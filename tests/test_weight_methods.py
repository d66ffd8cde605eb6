"""Weight methods: chosen per layer by checkpoint prefix, loaded generically, processed once.

A test-only int4 method (8 values per int32, packed along the output dim, a scale per
output) proves that a packed format loads through the loader's generic path: QKV and
gate/up shards land at their packed offsets with no loader change.
"""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ferry.layers.embedding_method import UnquantizedEmbeddingMethod
from ferry.layers.linear import Linear, MergedLinear
from ferry.layers.linear_method import LinearMethod, UnquantizedLinearMethod
from ferry.layers.parameter import new_parameter, shard_view
from ferry.layers.weight_methods import UnquantizedWeightMethods, process_weights_after_loading
from ferry.checkpoint import load_hf_config
from ferry.models.loader import get_model

CPU = torch.device("cpu")
PACK = 8                                        # int4 values per int32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- a recording selector: which prefixes were processed, how often ----------------------

class RecordingWeightMethods(UnquantizedWeightMethods):
    """Unquantized methods that note each post-load call by the layer's prefix."""

    def __init__(self):
        self.calls: list[str] = []
        self.asked: list[str] = []

    def linear_method(self, prefix, layer):
        self.asked.append(prefix)
        return _recording(UnquantizedLinearMethod, self.calls, prefix)

    def embedding_method(self, prefix, layer):
        self.asked.append(prefix)
        return _recording(UnquantizedEmbeddingMethod, self.calls, prefix)


def _recording(base: type, calls: list[str], prefix: str):
    class Recording(base):
        def process_weights_after_loading(self, layer):
            calls.append(prefix)
            super().process_weights_after_loading(layer)
    return Recording()


def _layer_prefixes(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{name}" for i in range(num_layers)
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])   # tied and untied head
def test_each_layer_is_processed_once_after_loading(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    methods = RecordingWeightMethods()
    model = get_model(path, load_hf_config(path), torch.float32, CPU, weight_methods=methods)
    tied = arch == "qwen2"
    expected = ["model.embed_tokens", *_layer_prefixes(2)] + ([] if tied else ["lm_head"])
    assert sorted(methods.asked) == sorted(expected)        # a tied head asks for no method
    assert Counter(methods.calls) == Counter(expected)       # each exactly once, tied weights once
    if tied:   # the head computes with the embedding's weights, so with its method
        assert model.lm_head.weight_method is model.model.embed_tokens.weight_method
    # the recording methods are the unquantized ones: the CPU layout is still column-major
    assert model.model.layers[1].mlp.down_proj.weight.t().is_contiguous()
    assert model.model.embed_tokens.weight.is_contiguous()


def test_post_load_layout_follows_the_weights_device():
    """Off the CPU (here the meta device) the unquantized method leaves the row-major weight."""
    with torch.device("meta"):
        layer = Linear(16, 8)
    process_weights_after_loading(layer)
    assert layer.weight.is_contiguous()
    cpu_layer = Linear(16, 8)
    process_weights_after_loading(cpu_layer)
    assert cpu_layer.weight.t().is_contiguous() and not cpu_layer.weight.is_contiguous()


def test_every_weight_and_bias_states_its_dims():
    layer = MergedLinear(16, {0: 8, 1: 8}, bias=True)
    assert (layer.weight.output_dim, layer.weight.input_dim) == (0, 1)
    assert (layer.bias.output_dim, layer.bias.input_dim) == (0, None)
    assert layer.weight.weight_loader == layer.load_shard == layer.bias.weight_loader


# ---- a test-only packed method ------------------------------------------------------------

class Int4PackedLinearMethod(LinearMethod):
    """int4 weights, 8 per int32 along the output dim (unsigned, zero point 8), a scale per output."""

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        out = sum(output_sizes)
        layer.weight = new_parameter((out // PACK, input_size), torch.int32, output_dim=0,
                                     input_dim=1, packed_dim=0, pack_factor=PACK)
        layer.weight_scale = new_parameter((out,), params_dtype, output_dim=0, input_dim=None)

    def apply(self, layer, x, bias):
        return F.linear(x, dequantize(layer.weight, layer.weight_scale), bias)   # (T, in) -> (T, out)


class Int4Linears(UnquantizedWeightMethods):
    def linear_method(self, prefix, layer):
        return Int4PackedLinearMethod()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed (out / 8, in) int32 and (out,) scales."""
    scale = weight.abs().amax(dim=1) / 7
    q = (torch.round(weight / scale[:, None]).clamp(-8, 7) + 8).to(torch.int64)   # (out, in) in [0, 16)
    q = q.view(-1, PACK, weight.shape[1])                                         # (out/8, 8, in)
    shifts = (4 * torch.arange(PACK)).view(1, PACK, 1)
    packed = (q << shifts).sum(dim=1)                                             # (out/8, in) < 2**32
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)             # as signed int32
    return packed.to(torch.int32), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed (out / 8, in) int32 and (out,) scales -> (out, in) float."""
    shifts = (4 * torch.arange(PACK, device=packed.device)).view(1, PACK, 1)
    q = (packed.unsqueeze(1) >> shifts) & 0xF                                     # (out/8, 8, in)
    return (q.reshape(-1, packed.shape[1]).to(scale.dtype) - 8) * scale[:, None]  # (out, in)


@pytest.fixture
def int4_checkpoint(tmp_path, tiny_model_dir):
    """The tiny llama with every projection stored packed int4 (``.weight`` + ``.weight_scale``)."""
    path = shutil.copytree(tiny_model_dir("llama"), tmp_path / "int4")
    tensors = load_file(str(path / "model.safetensors"))
    suffixes = tuple(f"{p}.weight" for p in PROJECTIONS)
    for name in [n for n in tensors if n.endswith(suffixes)]:
        packed, scale = quantize(tensors[name])
        tensors[name] = packed
        tensors[name + "_scale"] = scale
    save_file(tensors, str(path / "model.safetensors"))
    return path, tensors


def test_packed_method_loads_through_the_generic_path(int4_checkpoint):
    path, tensors = int4_checkpoint
    model = get_model(path, load_hf_config(path), torch.float32, CPU, weight_methods=Int4Linears())
    pre = "model.layers.1."
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for layer, names in ((attn.qkv_proj, [f"self_attn.{p}_proj" for p in "qkv"]),
                         (mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
                         (mlp.down_proj, ["mlp.down_proj"])):
        assert layer.weight.dtype == torch.int32 and layer.weight.shape[0] * PACK == layer.output_size
        assert torch.equal(layer.weight, torch.cat([tensors[pre + n + ".weight"] for n in names]))
        assert torch.equal(layer.weight_scale, torch.cat([tensors[pre + n + ".weight_scale"] for n in names]))
    x = torch.randn(3, attn.qkv_proj.input_size)
    want = torch.cat([F.linear(x, dequantize(tensors[pre + f"self_attn.{p}_proj.weight"],
                                             tensors[pre + f"self_attn.{p}_proj.weight_scale"]))
                      for p in "qkv"], dim=-1)
    torch.testing.assert_close(attn.qkv_proj(x), want)                  # (3, hidden) -> (3, q + k + v)


def test_shard_view_divides_offsets_along_the_packed_output_dim():
    param = new_parameter((16 // PACK, 4), torch.int32, output_dim=0, input_dim=1,
                          packed_dim=0, pack_factor=PACK)
    view = shard_view(param, 8, 8)
    assert view.data_ptr() == param.data[1:2].data_ptr() and view.shape == (1, 4)
    with pytest.raises(ValueError, match="pack factor"):
        shard_view(param, 4, 4)
    with pytest.raises(ValueError, match="no output dim"):
        shard_view(nn.Parameter(torch.empty(3)), 0, 1)
