"""Checkpoint resolution and loading: hub cache offline, safetensors only, clear errors."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ferry.checkpoint import load_hf_config, resolve_model_path
from ferry.models.loader import get_model
from ferry.models.registry import supported_architectures
from tiny_models import make_sharded

CPU = torch.device("cpu")


def _load(path: Path):
    return get_model(path, load_hf_config(path), torch.float32, CPU)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache in tmp, with the hub switched off."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_directory_is_used_as_is(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_hub_id_resolves_from_cache_offline(offline_hub, tiny_model_dir):
    repo = offline_hub / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_model_dir("llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    path = resolve_model_path("tiny-org/tiny-llama")
    assert path.resolve() == snapshot.resolve()
    assert load_hf_config(path).architectures == ["LlamaForCausalLM"]


def test_unknown_hub_id_raises_value_error(offline_hub):
    with pytest.raises(ValueError, match="not found locally or on the Hugging Face hub"):
        resolve_model_path("no-such-org/no-such-model")


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_model_dir):
    single = _load(tiny_model_dir("llama"))
    sharded_dir = make_sharded(tmp_path / "sharded", "llama")
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded = _load(sharded_dir)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_packed_projections_hold_hf_weights(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    tensors = load_file(str(path / "model.safetensors"))
    model = _load(path)
    attn = model.model.layers[1].self_attn
    pre = "model.layers.1."
    torch.testing.assert_close(attn.qkv_proj.weight, torch.cat(
        [tensors[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"]), atol=0, rtol=0)
    torch.testing.assert_close(attn.qkv_proj.bias, torch.cat(
        [tensors[pre + f"self_attn.{p}_proj.bias"] for p in "qkv"]), atol=0, rtol=0)
    torch.testing.assert_close(model.model.layers[1].mlp.gate_up_proj.weight, torch.cat(
        [tensors[pre + "mlp.gate_proj.weight"], tensors[pre + "mlp.up_proj.weight"]]), atol=0, rtol=0)
    # tied: no lm_head.weight in the checkpoint, the head is the embedding
    assert "lm_head.weight" not in tensors
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["qwen2", "llama"])   # tied and untied head
def test_cpu_matmul_weights_are_column_major_and_the_embedding_row_major(tiny_model_dir, arch):
    """On the CPU the loader stores matmul weights transposed-contiguous (MKL then skips a
    repack per call); the values are the checkpoint's (test above), and the embedding,
    also the head when tied, keeps its rows contiguous for the token lookup."""
    model = _load(tiny_model_dir(arch))
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj):
        assert linear.weight.t().is_contiguous() and not linear.weight.is_contiguous()
    assert model.model.embed_tokens.weight.is_contiguous()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (arch == "qwen2")
    assert model.lm_head.weight.is_contiguous() if tied else model.lm_head.weight.t().is_contiguous()


def test_bfloat16_load(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = get_model(path, load_hf_config(path), torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_tensor_is_named(tmp_path, tiny_model_dir):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight") as info:
        _load(path)
    assert str(path) in str(info.value)


def test_wrong_shape_names_tensor_and_shapes(tmp_path, tiny_model_dir):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        _load(path)


def test_unexpected_tensor_warns(tmp_path, tiny_model_dir, caplog):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # known-ignorable
    tensors["model.extra_head.weight"] = torch.ones(2, 2)
    save_file(tensors, str(path / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="ferry.models.loader"):
        _load(path)
    assert "model.extra_head.weight" in caplog.text
    assert "inv_freq" not in caplog.text


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dir):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    hf_config = load_hf_config(path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        get_model(path, hf_config, torch.float32, CPU)
    for name in supported_architectures():
        assert name in str(info.value)


def test_only_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        _load(path)


def test_index_listing_absent_shard_raises(tmp_path):
    path = make_sharded(tmp_path / "m", "llama")
    next(iter(sorted(path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ValueError, match="not in"):
        _load(path)
