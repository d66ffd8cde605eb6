"""Imports flow one way: the import-linter contracts in pyproject.toml hold.

cli -> server | bench -> llm -> engine -> executor -> runner -> models -> layers ->
kernels -> platform -> plain data; the engine imports no torch (nor anything that does);
no import cycles; the developer tools stay out of the runtime.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    # A subprocess: import-linter configures logging, which would silence this session's.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())", "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout
