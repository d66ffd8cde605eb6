"""`ferry bench sweep` over concurrencies and `ferry bench compare` of result files."""
from __future__ import annotations

import json

import pytest
from bench_fake_servers import run_fake_server
from typer.testing import CliRunner

from ferry.bench.cli import bench_app
from ferry.bench.compare import ratio
from ferry.bench.sweep import parse_loads

PNG = b"\x89PNG\r\n\x1a\n"


def _serve_args(url: str, **extra: str) -> list[str]:
    args = ["--base-url", url, "--num-prompts", "4", "--input-len", "6", "--output-len", "3",
            "--no-progress"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def test_sweep_runs_every_load_and_plots_the_curve(tmp_path):
    out, png, points_dir = tmp_path / "sweep.json", tmp_path / "curve.png", tmp_path / "points"
    with run_fake_server() as (url, fake):
        res = CliRunner().invoke(bench_app, ["sweep", "--concurrencies", "1,2", *_serve_args(
            url, result_json=str(out), result_dir=str(points_dir), plot=str(png), warmup="1")])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["kind"] == "sweep" and data["mode"] == "concurrency"
    assert [p["load"] for p in data["points"]] == [1, 2]
    assert all(p["summary"]["completed"] == 4 for p in data["points"])
    assert data["points"][0]["summary"]["max_concurrent_requests"] == 1
    assert len(fake.requests) == 1 + 4 + 4   # warmup only before the first point
    first, second = ({b["prompt"] for b in fake.requests[1:5]},
                     {b["prompt"] for b in fake.requests[5:]})
    assert not first & second                 # each point gets fresh prompts
    for point in data["points"]:
        full = json.loads(open(point["result_file"]).read())
        assert full["config"]["max_concurrency"] == point["load"]
        assert len(full["requests"]) == 4
    assert png.read_bytes()[:8] == PNG
    assert "Sweep over concurrency" in res.output


def test_compare_prints_side_by_side_with_ratios(tmp_path):
    files = []
    with run_fake_server(token_delay=0.001) as (url, _):
        for name in ("a", "b"):
            path = tmp_path / f"{name}.json"
            res = CliRunner().invoke(bench_app, ["serve", *_serve_args(
                url, result_json=str(path), label=f"engine-{name}")])
            assert res.exit_code == 0, res.output
            files.append(str(path))
    png = tmp_path / "cmp.png"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(bench_app, ["compare", *files, "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "engine-a" in res.output and "engine-b / engine-a" in res.output
    a, b = (json.loads(open(f).read())["summary"] for f in files)
    expected = ratio(b["output_throughput"], a["output_throughput"])
    row = next(line for line in res.output.splitlines() if "Output throughput" in line)
    assert expected in row
    assert png.read_bytes()[:8] == PNG


def test_compare_rejects_bad_files(tmp_path):
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}')
    res = CliRunner().invoke(bench_app, ["compare", str(bogus), str(bogus)])
    assert res.exit_code == 2 and "not a ferry bench result" in res.output
    res = CliRunner().invoke(bench_app, ["compare", str(tmp_path / "missing.json"), str(bogus)])
    assert res.exit_code == 2 and "not found" in res.output


def test_parse_loads():
    assert parse_loads("1,2, 8", "concurrency") == [1, 2, 8]
    assert parse_loads("0.5,inf", "rate") == [0.5, float("inf")]
    for text, mode in (("0", "concurrency"), ("1.5", "concurrency"), ("-1", "rate"),
                       ("x", "rate"), ("", "rate")):
        with pytest.raises(ValueError):
            parse_loads(text, mode)
    assert ratio(3.0, 2.0) == "1.50x" and ratio(1.0, 0) == "-" and ratio(None, 1.0) == "-"


def test_sweep_needs_exactly_one_list_of_loads():
    res = CliRunner().invoke(bench_app, ["sweep", "--base-url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "exactly one of" in res.output
