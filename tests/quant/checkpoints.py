"""Tiny quantized checkpoints made from a tiny float one, with their float references.

``write_quantized(src, dst, ref, fmt=...)`` quantizes every projection of the tiny
checkpoint in ``src`` into ``dst`` (the format's tensors and quantization_config) and
writes into ``ref`` the same model holding the dequantized weights as plain floats, for
HF transformers to load as the reference. Weight-only integer formats go through
``ferry.quant.quantize`` (RTN + the format writers); FP8 and W8A8 tensors are made here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ferry.quant.fp8 import FP8_MAX, fp8_quantize
from ferry.quant.quantize import formats
from ferry.quant.quantize.rtn import QuantizedWeight, rtn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_modules(tensors: dict) -> list[str]:
    return sorted(n[: -len(".weight")] for n in tensors
                  if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS)


def act_order_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor,
                  min_zero: int) -> QuantizedWeight:
    """RTN in the order ``perm`` of the inputs: input perm[j] joins group j // group_size."""
    sorted_qw = rtn(w[:, perm], bits, group_size, sym, min_zero)
    codes = torch.empty_like(sorted_qw.codes)
    codes[:, perm] = sorted_qw.codes
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    g_idx[perm] = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
    return QuantizedWeight(codes, sorted_qw.scales, sorted_qw.zeros, bits, group_size, sym, g_idx)


def _copy_model_files(src: Path, dst: Path) -> dict:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return json.loads((dst / "config.json").read_text())


def _save(dst: Path, config: dict, tensors: dict) -> None:
    (dst / "model.safetensors").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def write_quantized(src: Path, dst: Path, ref: Path, fmt: str, *, bits: int = 4,
                    group_size: int = 32, sym: bool = True, act_order: bool = False,
                    shared_perm: bool = True, version: str = "v1", skip: tuple[str, ...] = (),
                    quantization_config: dict | None = None, seed: int = 0) -> tuple[Path, Path]:
    """A ``fmt`` ("gptq", "awq", "compressed-tensors") checkpoint and its float reference."""
    config = _copy_model_files(src, dst)
    ref_config = _copy_model_files(src, ref)
    tensors = load_file(str(src / "model.safetensors"))
    out, ref_tensors = dict(tensors), dict(tensors)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    for module in projection_modules(tensors):
        if any(s in module for s in skip):
            continue
        w = out.pop(module + ".weight")
        min_zero = 1 if (fmt == "gptq" and version == "v1" and not sym) else 0
        if act_order:
            # q/k/v (and gate/up) see the same input, so real GPTQ gives them one order
            key = module.rsplit(".", 1)[0] + ("" if shared_perm else module)
            key += ".mlp_in" if module.endswith(("gate_proj", "up_proj")) else ""
            perm = perms.setdefault(key, torch.randperm(w.shape[1], generator=gen))
            qw = act_order_rtn(w, bits, group_size, sym, perm, min_zero)
        else:
            qw = rtn(w, bits, group_size, sym, min_zero)
        qw.scales = qw.scales.to(formats.SCALE_DTYPE).float()   # as stored
        if fmt == "gptq":
            out.update(formats.gptq_tensors(module, qw, version))
        elif fmt == "awq":
            out.update(formats.awq_tensors(module, qw))
        else:
            out.update(formats.ct_tensors(module, qw))
        ref_tensors[module + ".weight"] = qw.dequantize()
    if quantization_config is None:
        quantization_config = {
            "gptq": lambda: formats.gptq_config(bits, group_size, sym, act_order, version),
            "awq": lambda: formats.awq_config(group_size, list(skip)),
            "compressed-tensors": lambda: formats.ct_config(bits, group_size, sym,
                                                            ["lm_head", *_ct_ignore(skip)]),
        }[fmt]()
    config["quantization_config"] = quantization_config
    _save(dst, config, out)
    _save(ref, ref_config, ref_tensors)
    return dst, ref


def _ct_ignore(skip):
    return [f"re:.*{s}$" for s in skip]


# ---- FP8 and int8 W8A8 --------------------------------------------------------------------

def _fp8_weight(w: torch.Tensor, strategy: str, block=None):
    """(fp8 weight, stored scale, dequantized float weight)."""
    if strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)
        q = fp8_quantize(w, scale)
        return q, scale, q.float() * scale
    if strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX              # (N, 1)
        q = fp8_quantize(w, scale)
        return q, scale, q.float() * scale
    bn, bk = block
    n, k = w.shape
    blocks = w.reshape(n // bn, bn, k // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX                      # (N/bn, K/bk)
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    q = fp8_quantize(w, full)
    return q, scale, q.float() * full


def _int8_weight(w: torch.Tensor, strategy: str):
    scale = (w.abs().amax(dim=1, keepdim=True) if strategy == "channel"
             else w.abs().amax().reshape(1)) / 127
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    return q, scale, q.float() * scale


def write_w8(src: Path, dst: Path, ref: Path, kind: str, *, weight_strategy: str = "channel",
             activation: str | None = "token", block=None, static_scale: float = 0.05,
             kv_scales: bool = False, vllm_style: bool = False, ignore: tuple[str, ...] = (),
             kv_scale_names: tuple[str, str] = ("self_attn.k_scale", "self_attn.v_scale")
             ) -> tuple[Path, Path]:
    """FP8 (``kind`` "fp8") or int8 (``kind`` "int8") weights with ``activation`` "token",
    "tensor", "static", "group" or None; compressed-tensors unless ``vllm_style``.
    ``kv_scales``: per-layer K/V scales 0.02 + i/100 and 0.03 + i/100 under
    ``kv_scale_names`` (after ``model.layers.{i}.``)."""
    config = _copy_model_files(src, dst)
    ref_config = _copy_model_files(src, ref)
    tensors = load_file(str(src / "model.safetensors"))
    out, ref_tensors = dict(tensors), dict(tensors)
    for module in projection_modules(tensors):
        if any(s in module for s in ignore):
            continue
        w = out.pop(module + ".weight")
        if kind == "fp8":
            q, scale, deq = _fp8_weight(w, weight_strategy, block)
        else:
            q, scale, deq = _int8_weight(w, weight_strategy)
        out[module + ".weight"] = q
        scale_name = "weight_scale_inv" if (vllm_style and block) else "weight_scale"
        out[f"{module}.{scale_name}"] = scale.reshape(()) if (vllm_style and weight_strategy == "tensor") else scale
        if activation == "static":
            out[module + ".input_scale"] = torch.tensor([static_scale])
        ref_tensors[module + ".weight"] = deq
    if kv_scales:
        for i in range(config["num_hidden_layers"]):
            out[f"model.layers.{i}.{kv_scale_names[0]}"] = torch.tensor(0.02 + i / 100)
            out[f"model.layers.{i}.{kv_scale_names[1]}"] = torch.tensor(0.03 + i / 100)
    if vllm_style:
        qc = {"quant_method": "fp8", "activation_scheme": "static" if activation == "static" else "dynamic",
              "ignored_layers": [m for m in projection_modules(tensors) if any(s in m for s in ignore)]}
        if block:
            qc["weight_block_size"] = list(block)
        if kv_scales:
            qc["kv_cache_scheme"] = "static"   # as AutoFP8 writes it
    else:
        qc = _ct_w8_config(kind, weight_strategy, activation, block, ignore, kv_scales)
    config["quantization_config"] = qc
    _save(dst, config, out)
    _save(ref, ref_config, ref_tensors)
    return dst, ref


def _ct_w8_config(kind, weight_strategy, activation, block, ignore, kv_scales) -> dict:
    typ = "float" if kind == "fp8" else "int"
    weights = {"num_bits": 8, "type": typ, "symmetric": True, "dynamic": False,
               "strategy": weight_strategy}
    if block:
        weights["block_structure"] = list(block)
    inputs = None
    if activation is not None:
        strategy = {"token": "token", "tensor": "tensor", "static": "tensor", "group": "group"}[activation]
        inputs = {"num_bits": 8, "type": typ, "symmetric": True, "strategy": strategy,
                  "dynamic": activation != "static"}
        if activation == "group":
            inputs["group_size"] = block[1]
    qc = {"quant_method": "compressed-tensors",
          "format": "float-quantized" if kind == "fp8" else "int-quantized",
          "quantization_status": "compressed", "ignore": ["lm_head", *(f"re:.*{s}$" for s in ignore)],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                        "input_activations": inputs}}}
    if kv_scales:
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                 "dynamic": False, "symmetric": True}
    return qc
