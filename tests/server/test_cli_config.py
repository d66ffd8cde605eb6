"""The ``ferry`` CLI: every config key is a flag, config.yaml merging, errors naming the key,
and one-shot ``generate`` / interactive ``chat`` against HF greedy decoding."""
from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main
import yaml
from ferry_server_process import REPO_ROOT
from hf_reference import hf_greedy
from typer.testing import CliRunner

import ferry.cli as cli
from ferry.config import EngineConfig


@pytest.fixture
def captured(monkeypatch) -> dict:
    """Run ``serve`` without loading a model or binding a port: capture its config."""
    import ferry.server.api_server as api_server

    seen: dict = {}
    monkeypatch.setattr(cli, "_load_engine", lambda config, executor=None: "engine")
    monkeypatch.setattr(api_server, "run_server", lambda config, engine, executor=None:
                        seen.update(config=config, engine=engine))
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
    for name in EngineConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags, f"config key {name} has no flag"
    assert {"--model", "--config"} <= flags


def test_yaml_then_flags_override(tmp_path, captured):
    path = _yaml(tmp_path, {"model": "/models/x", "max_num_seqs": 8, "port": 9000,
                            "enable_prefix_caching": False, "kv_cache_memory": "1GiB",
                            "scheduling_policy": "fcfs"})
    result = _invoke("serve", "--config", path, "--port", "9100", "--max-num-seqs", "4")
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert (config.model_path, config.port, config.max_num_seqs) == ("/models/x", 9100, 4)
    assert config.enable_prefix_caching is False and config.kv_cache_memory == 2**30
    assert config.scheduling_policy == "fcfs"


def test_boolean_flag_overrides_the_file(tmp_path, captured):
    path = _yaml(tmp_path, {"enable_prefix_caching": False})
    assert _invoke("serve", "-c", path, "--enable-prefix-caching").exit_code == 0
    assert captured["config"].enable_prefix_caching is True


def test_no_model_means_the_demo_model_and_positional_model_works(captured):
    assert _invoke("serve").exit_code == 0
    assert captured["config"].model_path is None
    assert _invoke("serve", "some/model").exit_code == 0
    assert captured["config"].model_path == "some/model"


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
    assert captured["config"].api_key == "from-env"
    assert _invoke("serve", "--api-key", "flag", env={"FERRY_API_KEY": "env"}).exit_code == 0
    assert captured["config"].api_key == "flag"


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
    for name in EngineConfig.model_fields:
        assert f"| `{name}`" in text, f"docs/configuration.md does not describe {name}"
