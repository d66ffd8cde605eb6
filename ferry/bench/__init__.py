"""`ferry bench`: load generator, reports and plots for OpenAI-compatible servers, plus
ferry's offline throughput and latency benchmarks. The CLI lives in ``ferry.bench.cli``.
"""
