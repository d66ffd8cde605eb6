"""Structured-output backends: grammars compiled by xgrammar or llguidance, behind one
interface (``backend.GrammarBackend``), with a compile cache and a thread pool
(``compiler.GrammarCompiler``).

The engine (pure Python, no torch) holds the matchers through this interface only:
``ferry.llm.build_engine`` builds a ``GrammarCompiler`` and hands it to the ``Engine``.
xgrammar imports torch when it loads, which is why this package is outside ``ferry/engine``
and the engine never imports it (an import-linter contract).
"""
from ferry.structured_output.compiler import GrammarCompiler, make_compiler

__all__ = ["GrammarCompiler", "make_compiler"]
