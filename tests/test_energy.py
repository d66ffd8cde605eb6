"""Energy per request: each step's joules split across its requests by token share.

A fake counter stands behind the platform's energy interface (``Platform.energy_probe``
reads RAPL on the CPU: the test replaces that reader). Per-request joules must add up to
the step totals; with no counter the fields are absent, never 0.
"""
from __future__ import annotations

import pytest

from ferry import LLM, SamplingParams
from ferry.platform import rapl
from ferry.server.serving_common import usage
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("energy") / "llama"))


class FakeCounter:
    """A cumulative joule counter that grows by ``step`` on every read."""

    def __init__(self, step: float = 1.5) -> None:
        self.value, self.step, self.reads = 100.0, step, 0

    def __call__(self) -> float:
        self.reads += 1
        self.value += self.step
        return self.value


def _generate(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 9, 30)]
    return llm.generate(prompts, params, use_tqdm=False)


def test_request_energy_sums_to_the_step_totals(model_dir, monkeypatch):
    counter = FakeCounter()
    monkeypatch.setattr("ferry.platform.detect.rapl_reader", lambda: counter)
    llm = LLM(model_dir, dtype="float32", max_num_batched_tokens=16)
    steps = []
    execute = llm.engine.executor.execute
    llm.engine.executor.execute = lambda out: (steps.append(out), execute(out))[1]
    outs = _generate(llm)
    charged = [s for s in steps if not s.is_empty]
    total = sum(o.energy_joules for o in outs)
    assert all(o.energy_joules > 0 for o in outs)
    # Each step is charged what the counter moved across it: one read before, one after.
    assert total == pytest.approx(counter.step * len(charged))
    assert llm.engine.get_stats().energy_joules == pytest.approx(total)
    # The long prompt took more tokens, so more joules, than the short one.
    assert outs[3].energy_joules > outs[0].energy_joules
    assert usage(1, 1, outs[:1])["energy_joules"] == pytest.approx(outs[0].energy_joules)


def test_no_energy_reading_leaves_the_fields_absent(model_dir, monkeypatch):
    monkeypatch.setattr("ferry.platform.detect.rapl_reader", lambda: None)
    llm = LLM(model_dir, dtype="float32")
    outs = _generate(llm)
    assert all(o.energy_joules is None for o in outs)
    assert llm.engine.get_stats().energy_joules is None
    assert "energy_joules" not in usage(5, 6, outs)


def test_rapl_reader_sums_packages_and_unwraps(tmp_path):
    for name, value in [("intel-rapl:0", 1_000_000), ("intel-rapl:1", 5_000_000),
                        ("intel-rapl:0:0", 7)]:    # a sub-domain: not counted twice
        zone = tmp_path / name
        zone.mkdir()
        (zone / "energy_uj").write_text(str(value))
        (zone / "max_energy_range_uj").write_text("10000000")
    read = rapl.rapl_reader(tmp_path)
    assert read() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000000")          # +2 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("1000000")          # wrapped: +6 J
    assert read() == pytest.approx(8.0)
    assert rapl.rapl_reader(tmp_path / "missing") is None
