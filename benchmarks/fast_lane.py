"""Fast lane vs plain FCFS on a mixed stream: short-request p99 TTFT and total throughput.

One run of this script serves the same random ~58M Llama twice, with the fast lane
(defaults: ``short_prompt_threshold`` 256, priority policy) and with
``scheduling_policy: fcfs`` and the fast lane off (``short_prompt_threshold`` 0), and loads
each with ``ferry bench serve --dataset mixed``: the same seeded Poisson arrivals of
``--long-input-len``-token and ``--input-len``-token prompts. The rounds alternate (A B A B
...) so that load from other processes on shared cores hits both alike.

    PYTHONPATH=. python benchmarks/fast_lane.py --json benchmarks/results/fast_lane.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_harness import machine, served  # noqa: E402

CONFIGS = {"fast_lane": [],
           "fcfs": ["--scheduling-policy", "fcfs", "--short-prompt-threshold", "0"]}


def build_model(path: Path, vocab: int = 32000) -> int:
    from offline_throughput import save_random_llama

    return save_random_llama(path, vocab, hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=4096)


def bench(url: str, args: argparse.Namespace, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "ferry", "bench", "serve", "--base-url", url,
                        "--dataset", "mixed", "--num-prompts", str(args.num_prompts),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                        "--long-input-len", str(args.long_input_len),
                        "--long-fraction", str(args.long_fraction),
                        "--request-rate", str(args.request_rate), "--seed", str(seed),
                        "--warmup", "1", "--no-progress", "--result-json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--long-input-len", type=int, default=2048)
    parser.add_argument("--long-fraction", type=float, default=0.2)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama58m"
        params = build_model(model)
        common = [str(model), "--kv-cache-memory", "2GiB", "--max-model-len", "4096"]
        before = machine()
        for round_index in range(args.rounds):
            for name, flags in CONFIGS.items():
                with served(common + flags) as (_, url):
                    summary = bench(url, args, seed=round_index)
                short = summary["by_tag"]["short"]["ttft_ms"]
                results[name].append({
                    "round": round_index, "short_ttft_p99_ms": short["p99"],
                    "short_ttft_p50_ms": short["median"],
                    "long_ttft_p50_ms": summary["by_tag"]["long"]["ttft_ms"]["median"],
                    "total_token_throughput": summary["total_token_throughput"],
                    "output_throughput": summary["output_throughput"],
                    "completed": summary["completed"], "failed": summary["failed"]})
                print(name, results[name][-1], flush=True)
    report = {"machine_before": before, "machine_after": machine(), "parameters": params,
              "args": vars(args), "results": results}
    for name, rows in results.items():
        report[f"{name}_short_ttft_p99_ms_mean"] = sum(r["short_ttft_p99_ms"] for r in rows) / len(rows)
        report[f"{name}_throughput_mean"] = sum(r["total_token_throughput"] for r in rows) / len(rows)
    report["p99_ratio_fcfs_over_fast_lane"] = (report["fcfs_short_ttft_p99_ms_mean"]
                                               / report["fast_lane_short_ttft_p99_ms_mean"])
    report["throughput_ratio_fast_lane_over_fcfs"] = (report["fast_lane_throughput_mean"]
                                                      / report["fcfs_throughput_mean"])
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
