"""``ferry generate`` / ``chat`` on the bundled demo model (512-token context): answers fit
the context left after the prompt, a failed chat turn is not kept, piped prompts lose their
trailing newline; ``ferry --version``; a missing extra or model directory says what to do."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import ferry
import ferry.cli as cli
from ferry.checkpoint import resolve_model_path

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_REVERSE = "<|user|>Reverse: hello<|end|><|assistant|>"   # the demo's chat format, written out
TOO_LONG = "x" * 600                                            # 600 tokens: over the context


def _invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.app, list(args), input=input)


@pytest.fixture
def seen_chats(monkeypatch) -> list[list[dict]]:
    """Every message list the CLI sends through the chat template, in order."""
    seen: list[list[dict]] = []
    real_load = cli._load_engine

    def load(config, executor=None):
        engine = real_load(config, executor)
        encode = engine.encode_chat

        def recording(messages, **kwargs):
            seen.append([dict(m) for m in messages])
            return encode(messages, **kwargs)
        engine.encode_chat = recording
        return engine

    monkeypatch.setattr(cli, "_load_engine", load)
    return seen


def test_generate_fits_max_tokens_to_the_context():
    # --max-tokens 512 is the whole context: without the cap the request would be refused.
    result = _invoke("generate", "--max-tokens", "512", RAW_REVERSE)
    assert result.exit_code == 0, result.output
    assert result.stdout == "olleh\n"


def test_generate_chat_with_the_default_max_tokens():
    result = _invoke("generate", "--chat", "Uppercase: kitchen")
    assert result.exit_code == 0, result.output
    assert result.stdout == "KITCHEN\n"


def test_piped_prompt_loses_its_trailing_newline():
    # The raw prompt ends right after <|assistant|>; a newline there derails the answer.
    result = _invoke("generate", input=RAW_REVERSE + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "olleh\n"
    assert cli.read_piped_prompt(io.StringIO("a\nb\n\n")) == "a\nb"


def test_chat_turns_fit_the_context_and_a_failed_turn_is_dropped(seen_chats):
    turns = ["What is 12+34?", TOO_LONG, "Reverse: hello", "Uppercase: kitchen"]
    result = _invoke("chat", input="\n".join(turns) + "\n/exit\n")
    assert result.exit_code == 0, result.output
    # Only the too-long turn fails; had it been kept, every later turn would fail too.
    assert result.stderr.count("error:") == 1, result.stderr
    assert "asks for" in result.stderr and "dropped" in result.stderr
    replies = [r.split("\n", 1)[0] for r in result.stdout.split("assistant> ")[1:]]
    assert len(replies) == 4 and replies[0] == "46" and replies[1] == ""
    last = [m["content"] for m in seen_chats[-1]]
    assert TOO_LONG not in last
    assert last[:3] == ["What is 12+34?", "46", "Reverse: hello"] and last[-1] == turns[-1]


def test_version_flag():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"ferry {ferry.__version__}\n"
    run = subprocess.run([sys.executable, "-m", "ferry", "--version"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"ferry {ferry.__version__}"


def test_bench_without_its_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ferry.bench.cli", None)   # as if it failed to import
    app = typer.Typer(add_completion=False, rich_markup_mode=None)   # as ferry's own app
    app.callback()(lambda: None)
    cli.mount_bench(app)
    listed = CliRunner().invoke(app, ["--help"])
    assert "bench" in listed.stdout and "ferry[bench]" in listed.stdout
    for args in (["bench", "serve", "--input-len", "5"], ["bench", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "pip install 'ferry[bench]'" in result.stderr


@pytest.mark.parametrize("module, extra", [("httpx", "bench"), ("fastapi", "server"),
                                           ("matplotlib.pyplot", "bench")])
def test_missing_extra_message_names_the_extra(module, extra):
    exc = ModuleNotFoundError(f"No module named '{module}'", name=module)
    message = cli.missing_extra_message("bench", exc, "bench")
    assert f"pip install 'ferry[{extra}]'" in message and module in message


@pytest.mark.parametrize("path", ["/no/such/model-dir", "./no-such-dir", "~/no-such-dir-x",
                                  "models/llama/8b"])
def test_a_missing_local_path_says_no_such_directory(path):
    with pytest.raises(ValueError, match="no such directory: ") as info:
        resolve_model_path(path)
    assert "HFValidationError" not in str(info.value)


def test_generate_with_a_missing_model_dir_exits_with_the_message():
    result = _invoke("generate", "--model", "/no/such/model-dir", "hi")
    assert result.exit_code == 1
    assert "no such directory: /no/such/model-dir" in result.stderr
