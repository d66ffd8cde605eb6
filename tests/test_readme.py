"""The README's examples work as written on the bundled demo model: its config.yaml (with
the ``model:`` line dropped, as its comment says) starts an engine, and the prompts it shows
are ones the demo model answers."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import ferry.cli as cli
from ferry import SamplingParams
from ferry.llm import build_engine
from ferry.server.cli_flags import build_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_config_yaml() -> str:
    """The README's ``config.yaml`` block, verbatim but for its ``model:`` line."""
    text = README.read_text()
    section = text[text.index("### config.yaml"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert re.search(r"^model:", block, re.M), "the README's config.yaml lost its model line"
    return "".join(line for line in block.splitlines(keepends=True)
                   if not line.startswith("model:"))


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(readme_config_yaml())
    return path


def test_readme_config_yaml_starts_the_demo_model(config_path, caplog):
    values = yaml.safe_load(config_path.read_text())
    assert values["max_model_len"] > 512   # longer than the demo model's context
    config = build_config(config_path, {})
    with caplog.at_level(logging.WARNING, logger="ferry.checkpoint"):
        engine = build_engine(config.engine)
    assert engine.max_model_len == 512   # clamped to the model's context, with a warning
    assert any("max_model_len=4096" in r.getMessage() and "using 512" in r.getMessage()
               for r in caplog.records)
    assert config.server.port == values["port"]
    outputs = []
    params = SamplingParams(max_tokens=8)
    engine.add_request("r", engine.encode_chat([{"role": "user", "content": "What is 12+34?"}]),
                       params)
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].text == "46"


def test_readme_config_yaml_with_a_bad_value_exits_2(config_path):
    config_path.write_text(config_path.read_text().replace("max_num_seqs: 64",
                                                           "max_num_seqs: 0"))
    result = CliRunner().invoke(cli.app, ["serve", "--config", str(config_path)])
    assert result.exit_code == 2 and "max_num_seqs" in result.output


@pytest.mark.parametrize("prompt, answer", [("What is 12+34?", "46"),
                                            ("Reverse: hello", "olleh"),
                                            ("Uppercase: kitchen", "KITCHEN"),
                                            ("What is 1+1?", "2")])
def test_readme_prompts_are_ones_the_demo_model_answers(demo_llm, prompt, answer):
    assert prompt in README.read_text()
    chat = demo_llm.chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=16),
                         use_tqdm=False)[0].outputs[0]
    raw = demo_llm.generate([f"<|user|>{prompt}<|end|><|assistant|>"],
                            SamplingParams(max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert chat.text == raw.text == answer


@pytest.fixture(scope="module")
def demo_llm():
    from ferry import LLM

    return LLM()
