"""The config parts: every key in exactly one part, the engine without server settings,
errors naming the key, sizes and aliases as before."""
from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from ferry.config import (ALL_PARTS, ENGINE_PARTS, PART_OF_KEY, SERVER_KEYS, CacheConfig,
                          EngineConfig, FerryConfig, RuntimeConfig, ServerConfig,
                          config_fields)


def test_every_key_is_in_exactly_one_part():
    assert sum(len(cls.model_fields) for cls in ALL_PARTS.values()) == len(PART_OF_KEY)
    assert set(ENGINE_PARTS) == {"model", "cache", "scheduler", "parallel", "lora",
                                 "observability"}
    assert set(EngineConfig.model_fields) == set(ENGINE_PARTS)


def test_every_field_has_a_description():
    for name, field in config_fields().items():
        assert field.description, name


def test_the_engine_config_has_no_server_setting_anywhere():
    config = EngineConfig()
    for key in SERVER_KEYS:
        assert not hasattr(config, key)
        for part in ENGINE_PARTS:
            assert not hasattr(getattr(config, part), key), (part, key)
    assert not SERVER_KEYS & set(config.to_flat())


@pytest.mark.parametrize("key", sorted(SERVER_KEYS))
def test_engine_config_refuses_server_keys_as_server_settings(key):
    value = {"port": 1, "max_waiting_requests": 1, "shutdown_grace_seconds": 1}.get(key, "x")
    with pytest.raises(ValueError, match=f"'{key}' is a server setting"):
        EngineConfig.from_flat(**{key: value})


def test_llm_refuses_the_api_key_before_loading_anything():
    from ferry.llm import LLM

    with pytest.raises(ValueError, match="'api_key' is a server setting"):
        LLM(api_key="secret")


@pytest.mark.parametrize("flat,key", [({"max_num_seqs": 0}, "max_num_seqs"),
                                      ({"dtype": "float8"}, "dtype"),
                                      ({"block_size": 4096}, "block_size"),
                                      ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
                                      ({"no_such_key": 1}, "no_such_key")])
def test_bad_values_raise_naming_the_key(flat, key):
    with pytest.raises(ValueError, match=key):
        EngineConfig.from_flat(**flat)
    with pytest.raises(ValueError, match=key):
        FerryConfig.from_flat(**flat)


def test_all_problems_are_named_at_once():
    with pytest.raises(ValueError) as info:
        FerryConfig.from_flat(max_num_seqs=0, port="http", max_batch=3)
    assert all(k in str(info.value) for k in ("max_num_seqs", "'port'", "unknown key 'max_batch'"))


def test_sizes_aliases_and_flags_win_over_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: /from/file\nkv-cache-memory: 512MiB\nport: 9000\n")
    config = FerryConfig.from_sources(path, model_path="/from/flag", port=None)
    assert config.engine.model.model_path == "/from/flag"
    assert config.engine.cache.kv_cache_memory == 512 * 2**20
    assert config.server.port == 9000                  # None: the flag was not given
    assert EngineConfig.from_flat(model="m").model.model_path == "m"


def test_parts_are_frozen():
    config = EngineConfig()
    with pytest.raises(ValidationError):
        config.cache.block_size = 32
    with pytest.raises(ValidationError):
        config.cache = CacheConfig()


def test_the_api_key_stays_out_of_the_repr():
    assert "secret" not in repr(ServerConfig(api_key="secret"))


def test_runtime_config_is_a_plain_frozen_dataclass():
    runtime = RuntimeConfig("bfloat16", "bfloat16", 4096, 100, 16, "cpu", "cpu", "cpu", 32000)
    assert not runtime.is_gpu
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.num_blocks = 1


def test_start_up_resolves_one_runtime_view_that_the_components_read():
    from ferry import LLM

    llm = LLM(dtype="float32", max_model_len=256, kv_cache_memory="4MiB", block_size=8)
    engine = llm.engine
    runtime = engine.runtime
    assert (runtime.dtype, runtime.kv_cache_dtype, runtime.device) == ("float32", "float32", "cpu")
    assert runtime.max_model_len == 256 == engine.scheduler.max_model_len
    assert runtime.block_size == 8 == engine.scheduler.kv_cache_manager.block_size
    assert runtime.num_blocks == engine.scheduler.kv_cache_manager.num_blocks
    runner = engine.executor.runner
    assert runner.kv_caches[0].shape[1] == runtime.num_blocks
    assert runtime.vocab_size == runner.model.vocab_size
