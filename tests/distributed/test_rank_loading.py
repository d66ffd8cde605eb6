"""One rank's model loads in this process (loading needs no collectives): it holds its
slices of the checkpoint's tensors, read with ``get_slice``, never a whole split tensor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ferry.checkpoint import load_hf_config
from ferry.distributed.state import ParallelContext, RankLayout
from ferry.models import sharded_loader
from ferry.models.parallel_model import build_rank_model


class _Spy:
    """safe_open that records which tensors were read whole."""

    whole: list[str] = []

    def __init__(self, *args, **kwargs):
        self._inner = safe_open(*args, **kwargs)

    def __enter__(self):
        self._handle = self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name):
        return self._handle.get_slice(name)

    def get_tensor(self, name):
        _Spy.whole.append(name)
        return self._handle.get_tensor(name)


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_rank_one_of_two_holds_its_slices(tiny_model_dir, monkeypatch, arch):
    path = tiny_model_dir(arch, num_key_value_heads=1) if arch == "mistral" else tiny_model_dir(arch)
    monkeypatch.setattr(sharded_loader, "safe_open", _Spy)
    _Spy.whole = []
    ctx = ParallelContext(RankLayout(rank=1, tp_size=2))
    hf_config = load_hf_config(path)
    model = build_rank_model(path, hf_config, torch.float32, torch.device("cpu"), ctx)
    assert _Spy.whole == []    # every tensor read through get_slice
    ckpt = _checkpoint(path)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    q_rows = hf_config.num_attention_heads // 2 * head_dim
    attn = model.model.layers[0].self_attn
    kv_local = head_dim * attn.num_kv_heads
    q, k, v = attn.qkv_proj.weight.split([q_rows, kv_local, kv_local], dim=0)
    prefix = "model.layers.0.self_attn."
    torch.testing.assert_close(q, ckpt[prefix + "q_proj.weight"][q_rows:])
    kv_rows = ckpt[prefix + "k_proj.weight"].shape[0]
    if kv_rows == head_dim:   # one KV head: replicated on both ranks
        torch.testing.assert_close(k, ckpt[prefix + "k_proj.weight"])
    else:
        torch.testing.assert_close(k, ckpt[prefix + "k_proj.weight"][kv_rows // 2:])
    if arch == "qwen2":       # q/k/v bias sliced like the weights
        bias = attn.qkv_proj.bias[:q_rows]
        torch.testing.assert_close(bias, ckpt[prefix + "q_proj.bias"][q_rows:])
    down = model.model.layers[0].mlp.down_proj.weight                 # row parallel: inputs
    inter = hf_config.intermediate_size // 2
    torch.testing.assert_close(down, ckpt["model.layers.0.mlp.down_proj.weight"][:, inter:])
    table = model.model.embed_tokens.weight                           # vocab parallel: rows
    rows = table.shape[0]
    full = ckpt["model.embed_tokens.weight"]
    torch.testing.assert_close(table[:full.shape[0] - rows], full[rows:])
