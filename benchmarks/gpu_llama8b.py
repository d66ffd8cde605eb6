"""Llama-3-8B-shape benchmark on one GPU: ferry vs HF transformers, same model, same run.

Workloads (issue 5, "What must be shown"), on random bf16 weights built on the device:
  decode          1 request, 32 prompt tokens, 256 output tokens, greedy, ignore_eos: decode
                  tokens/s after the first token, against the bandwidth roofline
                  (bytes one decode step reads / measured device-to-device copy bandwidth)
  throughput256   --num-requests (1,000) random-token prompts of 256 tokens, 256 out
  throughput1024  the same at 1,024 in / 128 out
HF transformers (``generate``, static batches of --hf-batch-size, default settings) runs the
same prompts; on the throughput workloads only the first --hf-num-requests of them (a
static batch's rate does not depend on how many batches follow). Each engine runs in a child
process, so neither holds GPU memory the other needs. Results go to --json; each child also
writes ``<json>.<engine>.json`` after every workload, so a run cut short keeps its figures.

    PYTHONPATH=. python benchmarks/gpu_llama8b.py --json /tmp/gpu_llama8b.json
    PYTHONPATH=. python benchmarks/gpu_llama8b.py --only decode --skip-hf
    python benchmarks/gpu_llama8b.py --smoke --device cpu --json /tmp/smoke.json  # CPU, tiny
"""
from __future__ import annotations

import argparse
import json
import platform as py_platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this file

from gpu_llama8b_engines import (REPO_ROOT, WORKLOAD_NAMES, run_ferry, run_hf,  # noqa: E402
                                 workloads)
from gpu_llama8b_model import (LLAMA3_8B, SHARD_BYTES, SMOKE, ModelShape,  # noqa: E402
                               build_model_dir)

ENGINES = {"ferry": run_ferry, "hf": run_hf}
# Issue 5's targets on an H200.
TARGET_DECODE_ROOFLINE_RATIO = 0.85
TARGET_DECODE_TOK_S = 240.0
TARGET_THROUGHPUT256_TOTAL_TOK_S = 25_000.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model (hidden 64, 2 layers, vocab 512), float32, a few requests")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 (float32 with --smoke)")
    p.add_argument("--model-dir", type=Path, help="where the random checkpoint is built and "
                   "reused (default: <tmp>/ferry-bench-llama8b)")
    p.add_argument("--only", nargs="+", choices=WORKLOAD_NAMES, default=list(WORKLOAD_NAMES))
    p.add_argument("--num-requests", type=int, help="throughput requests (default 1000)")
    p.add_argument("--skip-ferry", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-num-requests", type=int,
                   help="HF runs the first N throughput requests (default 128)")
    p.add_argument("--hf-batch-size", type=int, help="HF static batch size (default 64)")
    p.add_argument("--max-num-seqs", type=int, help="ferry max_num_seqs (default: ferry's)")
    p.add_argument("--max-num-batched-tokens", type=int, help="ferry (default: ferry's)")
    p.add_argument("--gpu-memory-utilization", type=float, help="ferry (default: ferry's)")
    p.add_argument("--enforce-eager", action="store_true", help="ferry without device graphs")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"],
                   help="ferry: overlap scheduling with the device (default: ferry's, auto)")
    p.add_argument("--copy-gib", type=float, help="bandwidth probe size (default 4; CPU 0.0625)")
    p.add_argument("--deadline-s", type=float, help="stop the engines (keeping what they "
                   "measured) so that the whole run ends within this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_requests", "hf_num_requests", "hf_batch_size", "max_num_seqs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    if args.model_dir is None:
        name = "ferry-bench-llama-smoke" if args.smoke else "ferry-bench-llama8b"
        args.model_dir = Path(tempfile.gettempdir()) / name
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to PyTorch")
    return torch.device(name)


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device ``copy_`` (each byte read once and written once), best
    of ``repeats``."""
    src = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * num_bytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    import transformers

    sys.path.insert(0, str(REPO_ROOT))
    import ferry

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"CPU ({py_platform.processor() or py_platform.machine()})"
    return {"device": device.type, "gpu_name": gpu,
            "python": py_platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "triton": triton_version, "transformers": transformers.__version__,
            "ferry": ferry.__version__}


def roofline(shape: ModelShape, dtype: torch.dtype, bandwidth: float, args) -> dict:
    """Batch-1 decode bound: a step reads every weight but the input embedding table (only
    one row is gathered) plus the KV cache at the average context; tok/s = bandwidth / bytes."""
    elem = torch.empty((), dtype=dtype).element_size()
    decode = next((w for w in workloads(args, every=True) if w.name == "decode"))
    context = decode.input_len + decode.output_len / 2
    step_bytes = (shape.num_params(skip_embedding=True) * elem
                  + context * shape.kv_bytes_per_token(elem))
    return {"weight_bytes": shape.num_params() * elem, "decode_step_bytes": step_bytes,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "roofline_tok_s": bandwidth / step_bytes,
            "roofline_all_weights_tok_s": bandwidth / (shape.num_params() * elem)}


def run_child(engine: str, args, argv: list[str]) -> dict:
    """Run one engine in a fresh Python process; its (possibly partial) results."""
    if args.json:
        out = args.json.with_name(f"{args.json.name}.{engine}.json")
    else:
        out = Path(tempfile.mkdtemp(prefix="gpu_llama8b_")) / f"{engine}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", engine,
           "--worker-out", str(out), "--model-dir", str(args.model_dir),
           "--device", args.resolved_device]
    timeout = None
    if args.deadline_s is not None:  # keep ~10 s for the report
        timeout = args.deadline_s - (time.perf_counter() - args.start_time) - 10
        if timeout <= 0:
            return {"error": f"{engine} not run: --deadline-s {args.deadline_s} reached"}
    print(f"\n== {engine} ==", flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, check=False, timeout=timeout).returncode
        error = f"{engine} worker exited with code {rc} (its log is above)" if rc else None
    except subprocess.TimeoutExpired:
        error = f"{engine} worker stopped at --deadline-s {args.deadline_s}; figures are partial"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["wall_s"] = time.perf_counter() - start
    if error:
        results["error"] = error
    return results


def compare(results: dict) -> None:
    """Add ferry/HF ratios and the issue's targets (met or not) to ``results``."""
    ferry, hf, roof = results.get("ferry", {}), results.get("hf", {}), results["roofline"]
    metric = {"decode": "decode_tok_s", "throughput256": "total_tok_s",
              "throughput1024": "total_tok_s"}
    results["ratios_ferry_over_hf"] = {
        f"{name}_{m}": ferry[name][m] / hf[name][m] for name, m in metric.items()
        if m in ferry.get(name, {}) and m in hf.get(name, {})}
    if "decode_tok_s" in ferry.get("decode", {}):
        ferry["decode"]["roofline_ratio"] = ferry["decode"]["decode_tok_s"] / roof["roofline_tok_s"]
    if "decode_tok_s" in hf.get("decode", {}):
        hf["decode"]["roofline_ratio"] = hf["decode"]["decode_tok_s"] / roof["roofline_tok_s"]
    checks = [("decode_roofline_ratio", ("decode", "roofline_ratio"),
               TARGET_DECODE_ROOFLINE_RATIO),
              ("decode_tok_s", ("decode", "decode_tok_s"), TARGET_DECODE_TOK_S),
              ("throughput256_total_tok_s", ("throughput256", "total_tok_s"),
               TARGET_THROUGHPUT256_TOTAL_TOK_S)]
    results["targets_h200"] = {
        name: {"target": target, "ferry": ferry[w][m], "met": ferry[w][m] >= target}
        for name, (w, m), target in checks if m in ferry.get(w, {})}


def print_table(results: dict) -> None:
    env, roof = results["environment"], results["roofline"]
    print(f"\nGPU {env['gpu_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | dtype {results['dtype']}")
    print(f"weights {roof['weight_bytes'] / 1e9:.4g} GB, decode step reads "
          f"{roof['decode_step_bytes'] / 1e9:.4g} GB, copy bandwidth "
          f"{roof['copy_bandwidth_gb_s']:.0f} GB/s -> batch-1 roofline "
          f"{roof['roofline_tok_s']:.1f} tok/s")
    rows = [("decode", "decode tok/s (batch 1)", "decode_tok_s"),
            ("decode", "share of roofline", "roofline_ratio"),
            ("throughput256", "total tok/s", "total_tok_s"),
            ("throughput256", "output tok/s", "output_tok_s"),
            ("throughput1024", "total tok/s", "total_tok_s"),
            ("throughput1024", "output tok/s", "output_tok_s")]
    print(f"\n{'workload':<16}{'metric':<24}{'ferry':>12}{'HF':>12}{'ferry/HF':>10}")
    for workload, label, key in rows:
        f = results.get("ferry", {}).get(workload, {}).get(key)
        h = results.get("hf", {}).get(workload, {}).get(key)
        if f is None and h is None:
            continue
        ratio = f"{f / h:.2f}x" if f and h and key != "roofline_ratio" else ""
        print(f"{workload:<16}{label:<24}{_fmt(f):>12}{_fmt(h):>12}{ratio:>10}")
    if results.get("targets_h200"):
        print("\nissue 5 targets (for an H200):")
    for name, t in results.get("targets_h200", {}).items():
        print(f"target {name}: {_fmt(t['ferry'])} vs {_fmt(t['target'])} "
              f"-> {'met' if t['met'] else 'MISSED'}")
    for engine in ENGINES:
        if "error" in results.get(engine, {}):
            print(f"{engine}: {results[engine]['error']}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    shape = SMOKE if args.smoke else LLAMA3_8B
    if args.worker:
        ENGINES[args.worker](args, shape, device, args.worker_out)
        return 0
    args.resolved_device, args.start_time = device.type, time.perf_counter()
    dtype = getattr(torch, args.dtype)
    # Smoke: small shards, so the sharded-checkpoint path of the 8B model is exercised too.
    build_model_dir(args.model_dir, shape, dtype, device, seed=args.seed,
                    shard_bytes=100_000 if args.smoke else SHARD_BYTES)
    copy_gib = args.copy_gib or (4.0 if device.type == "cuda" else 1 / 16)
    bandwidth = copy_bandwidth(device, int(copy_gib * 2**30))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the children the whole GPU
    results = {"benchmark": "gpu_llama8b", "smoke": args.smoke, "dtype": args.dtype,
               "environment": environment(device), "model_dir": str(args.model_dir),
               "model_shape": asdict(shape), "workloads": [asdict(w) for w in workloads(args)],
               "roofline": roofline(shape, dtype, bandwidth, args),
               "settings": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()
                            if k not in ("start_time", "worker", "worker_out")}}
    for engine in ENGINES:
        if not getattr(args, f"skip_{engine}"):
            results[engine] = run_child(engine, args, argv)
    compare(results)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nresults: {args.json}")
    return 1 if any("error" in results.get(e, {}) for e in ENGINES) else 0


if __name__ == "__main__":
    sys.exit(main())
