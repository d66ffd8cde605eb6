"""Imports flow one way: the import-linter contracts in pyproject.toml hold.

cli -> server | bench -> llm -> engine -> executor -> runner -> models -> layers ->
kernels -> platform -> plain data; the engine imports no torch (nor anything that does);
no import cycles; the developer tools stay out of the runtime.
"""
from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert exit_code == 0, report
    assert "Contracts: 5 kept, 0 broken." in report
