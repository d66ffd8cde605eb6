"""The OpenAI-compatible server.

``api_server`` (routes, lifespan, SIGTERM drain, ``run_server``), ``async_engine`` (drives the
synchronous Engine from asyncio), ``serving_completions`` / ``serving_chat`` (the two
generation routes), ``protocol`` (request schemas), ``errors`` (OpenAI error bodies),
``metrics`` (Prometheus; the GPU memory and energy probes come from ``ferry.platform``),
``cli_flags`` (config keys as command-line flags, help from the fields' descriptions).
"""
