"""Pure-Python LoRA pieces: path confinement, the directory scanner, the registry."""
from __future__ import annotations

import os
import time

import pytest

from ferry.lora.adapter_config import LoRAError, LoRANotFoundError
from ferry.lora.paths import resolve_adapter_path
from ferry.lora.registry import AdapterEntry, LoRARegistry, check_adapter_name
from ferry.lora.watcher import DirectoryScanner


@pytest.fixture
def root(tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", adapters / "escape")
    os.symlink(adapters / "a", adapters / "alias")
    return adapters


def test_paths_inside_the_directory_resolve(root):
    assert resolve_adapter_path("a", str(root)) == root / "a"
    assert resolve_adapter_path(str(root / "a"), str(root)) == root / "a"
    assert resolve_adapter_path("alias", str(root)) == root / "a"   # a symlink inside is fine


@pytest.mark.parametrize("requested,error,reason", [
    ("../outside", LoRAError, "'..'"),
    ("a/../../outside", LoRAError, "'..'"),
    ("escape", LoRAError, "not allowed"),            # symlink out of the directory
    ("/etc", LoRAError, "not allowed"),
    ("", LoRAError, "non-empty"),
    ("missing", LoRANotFoundError, "no such directory"),
    (".", LoRAError, "adapters directory itself"),
])
def test_escapes_and_missing_paths_are_refused(root, requested, error, reason):
    with pytest.raises(error, match=reason):
        resolve_adapter_path(requested, str(root))


def test_allow_list_without_a_directory(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_adapter_path(str(tmp_path / "m"), None, (str(tmp_path / "m"),)) == tmp_path / "m"
    with pytest.raises(LoRAError, match="has none"):
        resolve_adapter_path(str(tmp_path), None, (str(tmp_path / "m"),))


def _write_adapter(path, payload=b"x"):
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(payload)


def test_scanner_waits_for_complete_files_then_loads_reloads_unloads(tmp_path):
    scanner = DirectoryScanner(str(tmp_path))
    assert scanner.poll() == []
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")   # weights not written yet
    _write_adapter(tmp_path / ".tmp-new")                          # hidden: a rename source
    assert scanner.poll() == [] and scanner.poll() == []
    os.rename(tmp_path / ".tmp-new", tmp_path / "new")
    assert scanner.poll() == []                                    # seen once: wait
    assert [(a.kind, a.name) for a in scanner.poll()] == [("load", "new")]
    assert scanner.poll() == []
    time.sleep(0.01)
    _write_adapter(tmp_path / "new", b"changed!")
    assert scanner.poll() == []
    assert [(a.kind, a.name) for a in scanner.poll()] == [("reload", "new")]
    for f in (tmp_path / "new").iterdir():
        f.unlink()
    (tmp_path / "new").rmdir()
    assert [(a.kind, a.name) for a in scanner.poll()] == [("unload", "new")]


class _Req:
    def __init__(self, lora_id):
        self.lora_id = lora_id


def test_registry_ids_retirement_and_admission():
    reg = LoRARegistry(max_loras=2)
    first = AdapterEntry("x", reg.new_id(), "/p", "api")
    assert reg.register(first) is None
    reg.acquire(first)
    second = AdapterEntry("x", reg.new_id(), "/p", "api")
    assert reg.register(second) is None          # the old version still runs a request
    assert reg.resolve("x").lora_id == second.lora_id != first.lora_id
    assert reg.release(first.lora_id) == first.lora_id   # now it can be dropped
    entry, drop = reg.unregister("x")
    assert drop == second.lora_id and "x" not in reg
    with pytest.raises(LoRANotFoundError):
        reg.resolve("x")
    running = [_Req(1), _Req(2), _Req(None)]
    assert reg.admits(_Req(None), running) and reg.admits(_Req(2), running)
    assert not reg.admits(_Req(3), running)
    assert reg.admits(_Req(3), running[:1])


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_bad_adapter_names(name):
    with pytest.raises(LoRAError):
        check_adapter_name(name)
