"""The ``ferry`` CLI: every config key is a flag, config.yaml merging, errors naming the key,
and one-shot ``generate`` / interactive ``chat`` against HF greedy decoding."""
from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import typer.main
import yaml
from ferry_server_process import REPO_ROOT
from hf_reference import hf_greedy
from typer.testing import CliRunner

import ferry.cli as cli
from ferry.config import ENGINE_PARTS, EngineConfig, FerryConfig, config_fields


@pytest.fixture
def captured(monkeypatch) -> dict:
    """Run ``serve`` without loading a model or binding a port: capture its config."""
    import ferry.server.api_server as api_server

    seen: dict = {}
    monkeypatch.setattr(cli, "_load_engine", lambda config, executor=None: "engine")
    monkeypatch.setattr(api_server, "run_server",
                        lambda config, engine, executor=None, config_source=None:
                        seen.update(config=config, engine=engine, source=config_source))
    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    return seen


def _invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli.app, list(args), env=env)


def _yaml(tmp_path, values: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_every_config_field_is_a_serve_flag():
    serve = typer.main.get_command(cli.app).commands["serve"]
    flags = {opt for param in serve.params for opt in param.opts + param.secondary_opts}
    for name in config_fields():
        assert "--" + name.replace("_", "-") in flags, f"config key {name} has no flag"
    assert {"--model", "--config"} <= flags


def test_yaml_then_flags_override(tmp_path, captured):
    path = _yaml(tmp_path, {"model": "/models/x", "max_num_seqs": 8, "port": 9000,
                            "enable_prefix_caching": False, "kv_cache_memory": "1GiB",
                            "scheduling_policy": "fcfs"})
    result = _invoke("serve", "--config", path, "--port", "9100", "--max-num-seqs", "4")
    assert result.exit_code == 0, result.output
    config = captured["config"]
    engine = config.engine
    assert (engine.model.model_path, config.server.port, engine.scheduler.max_num_seqs) == (
        "/models/x", 9100, 4)
    assert engine.cache.enable_prefix_caching is False and engine.cache.kv_cache_memory == 2**30
    assert engine.scheduler.scheduling_policy == "fcfs"


def test_boolean_flag_overrides_the_file(tmp_path, captured):
    path = _yaml(tmp_path, {"enable_prefix_caching": False})
    assert _invoke("serve", "-c", path, "--enable-prefix-caching").exit_code == 0
    assert captured["config"].engine.cache.enable_prefix_caching is True


def test_no_model_means_the_demo_model_and_positional_model_works(captured):
    assert _invoke("serve").exit_code == 0
    assert captured["config"].engine.model.model_path is None
    assert _invoke("serve", "some/model").exit_code == 0
    assert captured["config"].engine.model.model_path == "some/model"


@pytest.mark.parametrize("values,key", [({"max_num_seqs": 0}, "max_num_seqs"),
                                        ({"dtype": "float8"}, "dtype"),
                                        ({"no_such_key": 1}, "no_such_key"),
                                        ({"port": "http"}, "port")])
def test_bad_config_file_exits_2_naming_the_key(tmp_path, captured, values, key):
    result = _invoke("serve", "--config", _yaml(tmp_path, values))
    assert result.exit_code == 2
    assert key in result.output and "config" not in captured


def test_bad_flag_value_exits_2_naming_the_key(captured):
    result = _invoke("serve", "--max-num-batched-tokens", "lots")
    assert result.exit_code == 2 and "max_num_batched_tokens" in result.output


def test_api_key_from_environment_and_flag_wins(captured):
    assert _invoke("serve", env={"FERRY_API_KEY": "from-env"}).exit_code == 0
    assert captured["config"].server.api_key == "from-env"
    assert _invoke("serve", "--api-key", "flag", env={"FERRY_API_KEY": "env"}).exit_code == 0
    assert captured["config"].server.api_key == "flag"


def test_python_dash_m_ferry_rejects_an_unknown_key(tmp_path):
    path = _yaml(tmp_path, {"max_batch": 3})
    result = subprocess.run([sys.executable, "-m", "ferry", "serve", "--config", path],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown key 'max_batch'" in result.stderr


def _reference_text(model_dir, prompt_ids: list[int], max_tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|end|>")}
    tokens = []
    for token, _ in hf_greedy(str(model_dir), prompt_ids, max_tokens):
        if token in eos:
            break
        tokens.append(token)
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def test_generate_streams_the_greedy_answer(server_model_dir):
    from transformers import AutoTokenizer

    prompt = "The weather is"
    result = _invoke("generate", "--model", str(server_model_dir), "--max-tokens", "10",
                     "--kv-cache-memory", "16MiB", prompt)
    assert result.exit_code == 0, result.output
    ids = AutoTokenizer.from_pretrained(server_model_dir).encode(prompt)
    assert result.stdout.rstrip("\n").rstrip("\ufffd") == _reference_text(server_model_dir,
                                                                          ids, 10)


def test_chat_uses_the_template(server_model_dir):
    from transformers import AutoTokenizer

    result = CliRunner().invoke(cli.app, ["chat", "--model", str(server_model_dir),
                                          "--max-tokens", "8", "--kv-cache-memory", "16MiB"],
                                input="Hello there\n/exit\n")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(server_model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    reply = result.stdout.split("assistant> ", 1)[1].split("\n", 1)[0]
    assert reply.rstrip("\ufffd") == _reference_text(server_model_dir, ids, 8)


def test_configuration_doc_lists_every_key():
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    for name in config_fields():
        assert f"| `{name}`" in text, f"docs/configuration.md does not describe {name}"


# ------------------------------------------------------------------ the parts behind the flags
def _other_value(name: str, field):
    """A valid value of ``field`` other than its default, derived from its type."""
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        return next(c for c in reversed(choices) if c != field.default)
    if field.annotation is bool:
        return not field.default
    if any(typing.get_origin(c) is dict for c in choices):   # name=path pairs (lora_modules)
        return {"a": f"/some-{name}"}
    kind = next((t for t in (int, float, str) if field.annotation is t or t in choices), None)
    if kind is str:
        return f"some-{name}"
    if kind is float:
        return (field.default or 2.0) / 2   # None (e.g. power_limit_w): 1.0
    return (field.default or 1) + 1


def _flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            out += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            out += [flag, str(value)]
    return out


def test_every_key_round_trips_through_yaml_and_flags(tmp_path, captured):
    values = {name: _other_value(name, field) for name, field in config_fields().items()}
    values["node_rank"] = 0   # below nnodes, and node 0 serves (another node runs ranks only)
    from_yaml = FerryConfig.from_sources(_yaml(tmp_path, values))
    assert from_yaml.to_flat() == values                        # every key read, none lost
    result = _invoke("serve", *_flags(values))
    assert result.exit_code == 0, result.output
    assert captured["config"] == from_yaml                      # flags give the same config
    engine_values = {k: v for k, v in values.items() if k in config_fields(ENGINE_PARTS)}
    assert EngineConfig.from_flat(**engine_values) == from_yaml.engine


def test_flag_help_is_the_field_description():
    fields = config_fields()
    for command in ("serve", "generate", "chat"):
        params = typer.main.get_command(cli.app).commands[command].params
        helped = {p.name: p.help for p in params if p.name in fields}
        assert helped, command
        for name, help_text in helped.items():
            assert help_text and help_text == fields[name].description, name


def test_generate_and_chat_take_engine_keys_only():
    for command in ("generate", "chat"):
        params = typer.main.get_command(cli.app).commands[command].params
        names = {p.name for p in params} & set(config_fields())
        assert names == set(config_fields(ENGINE_PARTS)), command


def test_server_key_in_a_generate_flag_exits_2():
    result = _invoke("generate", "--api-key", "k", "hello")
    assert result.exit_code == 2
