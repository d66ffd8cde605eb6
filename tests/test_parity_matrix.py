"""The parity matrix (docs/parity.md): a row for every feature that exists, cells made
from recorded evidence only, and the document in step with its records."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ferry.tools import parity
from ferry.tools.parity_features import (FEATURE_BY_ID, FEATURES, Feature, UnclassifiedKey,
                                         existing_features, is_built)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "parity_results.json"
KERNELS = ROOT / "docs" / "kernels.md"


def test_every_feature_that_exists_has_a_row():
    missing = sorted(set(existing_features()) - set(FEATURE_BY_ID))
    assert not missing, f"features without a row in ferry/tools/parity_features.py: {missing}"


def test_a_new_config_key_must_be_classified(monkeypatch):
    from ferry.tools import parity_features

    monkeypatch.setattr(parity_features, "SETTING_KEYS",
                        parity_features.SETTING_KEYS - {"block_size"})
    with pytest.raises(UnclassifiedKey, match="block_size"):
        existing_features()


def test_a_new_enum_value_is_a_new_feature(monkeypatch):
    from ferry.tools import parity_features

    monkeypatch.setattr(parity_features, "ENUM_DEFAULTS", {**parity_features.ENUM_DEFAULTS,
                                                           "quant_type": {"auto"}})
    assert "quant:none" in existing_features()   # no row: the test above would fail


def test_built_features_have_tests_that_exist():
    existing = existing_features()
    for feature in FEATURES:
        if not is_built(feature, existing):
            continue
        assert feature.tests, feature.id
        for test in feature.tests + feature.gpu_tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), test
            if name:
                functions = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text()))
                             if isinstance(n, ast.FunctionDef)}
                assert name in functions, test


def test_refused_features_are_not_built(monkeypatch):
    from ferry.runner import model_setup
    existing = existing_features()
    assert is_built(FEATURE_BY_ID["quant:gptq_int4"], existing)
    monkeypatch.setattr(model_setup, "_NOT_YET", {"quant_type": ("auto", "none")})
    assert not is_built(FEATURE_BY_ID["quant:gptq_int4"], existing)   # refused at start
    assert not is_built(FEATURE_BY_ID["spec_decoding"], existing)     # no key at all
    assert is_built(FEATURE_BY_ID["kernel:paged_attention"], existing)


def test_gpu_kernels_named_by_rows_are_in_the_aot_matrix():
    aot = parity.aot_kernels(KERNELS.read_text())
    for feature in FEATURES:
        for kernel in feature.triton_kernels:
            assert kernel in aot, (feature.id, kernel)


def _evidence(runs, aot=None):
    return parity.Evidence(runs, aot or {}, existing_features())


def test_cells_say_how_a_feature_is_proven():
    feature = FEATURE_BY_ID["kernel:rms_norm"]
    run = {"device": "Test CPU", "date": "2026-01-02", "commit": "abc",
           "outcomes": {"tests/test_models.py::test_full_prefill_matches_hf[llama]": "passed",
                        "tests/test_models.py::test_full_prefill_matches_hf_other": "failed"}}
    aot = {"rms_norm_kernel": {"sm_80": True, "sm_90": True, "gfx942": False}}
    evidence = _evidence({"cpu-reference": run}, aot)
    assert parity.cell(feature, "cpu-reference", evidence) == \
        "tested: 1 passed (2026-01-02, Test CPU)"       # a name that merely starts alike: no
    assert parity.cell(feature, "cpu-cpp", evidence) == "untested"
    assert parity.cell(feature, "nvidia", evidence) == \
        "compiled AOT (sm_80, sm_90); not run on hardware"
    assert parity.cell(feature, "amd", evidence).startswith("untested")
    failed = {**run, "outcomes": {"tests/test_models.py::test_full_prefill_matches_hf[x]":
                                  "failed"}}
    assert parity.cell(feature, "nvidia", _evidence({"nvidia": failed}, aot)).startswith(
        "**FAILED**")
    assert parity.cell(FEATURE_BY_ID["spec_decoding"], "cpu-cpp", evidence) == \
        "not built (no config key)"


def test_cpp_kernel_tests_do_not_prove_the_reference():
    feature = Feature("kernel:rms_norm", "x", ("tests/kernels/test_cpu_kernels.py::t",))
    run = {"device": "d", "date": "x", "commit": "c",
           "outcomes": {"tests/kernels/test_cpu_kernels.py::t": "passed"}}
    evidence = _evidence({"cpu-reference": run, "cpu-cpp": run})
    assert parity.cell(feature, "cpu-reference", evidence) == "untested"
    assert parity.cell(feature, "cpu-cpp", evidence).startswith("tested")


def test_no_gpu_cell_claims_a_hardware_run_without_a_record():
    runs = parity.load_results(RESULTS)
    evidence = parity.gather(RESULTS, KERNELS)
    for column in ("nvidia", "amd"):
        if column in runs:
            continue
        for feature in FEATURES:
            assert not parity.cell(feature, column, evidence).startswith("tested")


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase file="tests/a.py" name="test_x[1]"/>'
                   '<testcase file="tests/a.py" name="test_y"><failure message="m"/></testcase>'
                   '<testcase file="tests/a.py" name="test_z"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    assert parity.junit_outcomes(xml) == {"tests/a.py::test_x[1]": "passed",
                                          "tests/a.py::test_y": "failed",
                                          "tests/a.py::test_z": "skipped"}


def test_the_document_is_in_step_with_its_records():
    """docs/parity.md's table is exactly what the recorded runs and the AOT matrix give:
    rerun ``python scripts/parity_matrix.py`` after changing either."""
    document = (ROOT / "docs" / "parity.md").read_text()
    expected = parity.render(parity.gather(RESULTS, KERNELS))
    assert parity.generated_block(document) == expected
