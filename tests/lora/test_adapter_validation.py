"""Adapter checks: every refused PEFT feature and mismatch is named in the error, before use."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")

from ferry.lora.adapter_config import LoRAError, LoRANotFoundError, read_adapter_config  # noqa: E402
from ferry.lora.weights import load_adapter  # noqa: E402
from peft_adapters import make_adapter  # noqa: E402

# The tiny Llama: hidden 64, 4 heads x 16, 2 KV heads, MLP 128, 2 layers.
TARGETS = {}
for layer in range(2):
    attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
    TARGETS.update({f"{attn}.q_proj": (64, 64), f"{attn}.k_proj": (64, 32),
                    f"{attn}.v_proj": (64, 32), f"{attn}.o_proj": (64, 64),
                    f"{mlp}.gate_proj": (64, 128), f"{mlp}.up_proj": (64, 128),
                    f"{mlp}.down_proj": (128, 64)})


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir("llama"), tmp_path_factory.mktemp("good") / "a", seed=5,
                        r=8, alpha=32, use_rslora=True)


def test_good_adapter_loads_with_its_scaling(good):
    weights = load_adapter(good, TARGETS, max_lora_rank=64)
    assert weights.rank == 8 and weights.scaling == pytest.approx(32 / 8 ** 0.5)
    assert set(weights.modules) == set(TARGETS)
    a, b = weights.modules["model.layers.1.mlp.down_proj"]
    assert a.shape == (8, 128) and b.shape == (64, 8) and b.abs().sum() > 0


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(target_modules=["q_proj", "c_attn"]), "c_attn"),
    (dict(r=0), "r must be"),
])
def test_refused_options_name_the_reason(good, tmp_path, changes, reason):
    bad = _edit_config(good, tmp_path / "bad", **changes)
    with pytest.raises(LoRAError, match=reason):
        load_adapter(bad, TARGETS, max_lora_rank=64)


def test_rank_above_the_limit(good):
    with pytest.raises(LoRAError, match="max_lora_rank=4"):
        read_adapter_config(good, max_lora_rank=4)


def test_rank_mismatch_between_config_and_tensors(good, tmp_path):
    bad = _edit_config(good, tmp_path / "bad", r=4)
    with pytest.raises(LoRAError, match="another base model"):
        load_adapter(bad, TARGETS, max_lora_rank=64)


def test_shape_mismatch_is_another_base_model(good):
    wider = {name: (in_f * 2, out_f) for name, (in_f, out_f) in TARGETS.items()}
    with pytest.raises(LoRAError, match="trained for another base model"):
        load_adapter(good, wider, max_lora_rank=64)


def test_module_the_model_lacks(good):
    fewer = {k: v for k, v in TARGETS.items() if ".layers.1." not in k}
    with pytest.raises(LoRAError, match="does not have"):
        load_adapter(good, fewer, max_lora_rank=64)


def _rewrite_tensors(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    save_file(edit(tensors), str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,reason", [
    (lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)},
     "does not adapt"),
    (lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 9)},
     "embedding"),
    (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                torch.zeros(64)}, "DoRA"),
    (lambda t: {k: v for k, v in t.items() if "layers.0.mlp.up_proj.lora_B" not in k},
     "no lora_B"),
])
def test_bad_tensors(good, tmp_path, edit, reason):
    bad = _rewrite_tensors(good, tmp_path / "bad", edit)
    with pytest.raises(LoRAError, match=reason):
        load_adapter(bad, TARGETS, max_lora_rank=64)


def test_missing_files_and_pickles(good, tmp_path):
    with pytest.raises(LoRANotFoundError):
        load_adapter(tmp_path / "nowhere", TARGETS, 64)
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(LoRAError, match="pickle"):
        load_adapter(pickled, TARGETS, 64)
    no_config = tmp_path / "no_config"
    shutil.copytree(good, no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(LoRAError, match="adapter_config.json is missing"):
        load_adapter(no_config, TARGETS, 64)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="cannot read"):
        load_adapter(broken, TARGETS, 64)
