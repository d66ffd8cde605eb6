"""Developer tools (ahead-of-time kernel compilation, ...): run by hand, by ``scripts/`` and
by the tests, never imported by the runtime (engine, runner, server, kernels)."""
