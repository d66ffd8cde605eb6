"""CPU threads: the count from the process's affinity and cgroup quota, the explicit
setting, the engine thread that gets it, and OpenMP's wait policy set before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ferry import openmp_env
from ferry.config import EngineConfig
from ferry.platform import host


@pytest.fixture
def torch_threads():
    """Restore PyTorch's thread count: the tests change it for the whole process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_affinity(monkeypatch, cores: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def usable(root) -> int:
    """The derived count with cgroup files under ``root`` only (no real /proc/self/cgroup)."""
    return host.usable_cpu_count(root, root / "no-such-proc-cgroup")


def test_without_a_quota_the_count_is_the_affinity_not_the_host(monkeypatch, tmp_path):
    fake_affinity(monkeypatch, 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable(tmp_path) == 3            # no cgroup files: no quota


@pytest.mark.parametrize("cpu_max, expected", [
    ("150000 100000\n", 1),     # 1.5 CPUs: rounded down
    ("300000 100000\n", 3),
    ("50000 100000\n", 1),      # below one CPU: still one thread
    ("max 100000\n", 8),        # no quota: the affinity
    ("1600000 100000\n", 8),    # a quota above the affinity: the affinity
])
def test_cgroup_v2_quota_caps_the_affinity(monkeypatch, tmp_path, cpu_max, expected):
    fake_affinity(monkeypatch, 8)
    write(tmp_path / "cpu.max", cpu_max)
    assert usable(tmp_path) == expected


@pytest.mark.parametrize("cpu_dir", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize("quota, expected", [("200000", 2), ("-1", 8)])
def test_cgroup_v1_quota_caps_the_affinity(monkeypatch, tmp_path, cpu_dir, quota, expected):
    fake_affinity(monkeypatch, 8)
    write(tmp_path / cpu_dir / "cpu.cfs_quota_us", quota + "\n")
    write(tmp_path / cpu_dir / "cpu.cfs_period_us", "100000\n")
    assert usable(tmp_path) == expected


def test_the_quota_of_the_process_own_group_is_read(monkeypatch, tmp_path):
    """Without a cgroup namespace the root is the host's: the group is in /proc/self/cgroup."""
    fake_affinity(monkeypatch, 8)
    write(tmp_path / "proc-cgroup", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "kubepods/pod1/ctr/cpu.max", "200000 100000\n")
    assert host.usable_cpu_count(tmp_path, tmp_path / "proc-cgroup") == 2
    write(tmp_path / "v1/proc-cgroup", "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n")
    write(tmp_path / "v1/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "v1/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert host.usable_cpu_count(tmp_path / "v1", tmp_path / "v1/proc-cgroup") == 3


def test_an_explicit_count_wins_over_the_derived_one(monkeypatch, torch_threads):
    monkeypatch.setattr(host, "usable_cpu_count", lambda: 1)
    assert host.apply_cpu_threads(3) == 3 and torch.get_num_threads() == 3
    assert host.apply_cpu_threads(None) == 1 and torch.get_num_threads() == 1


def test_cpu_threads_key_takes_auto_and_integers():
    assert EngineConfig.from_flat(cpu_threads="auto").parallel.cpu_threads is None
    assert EngineConfig.from_flat(cpu_threads="2").parallel.cpu_threads == 2
    assert EngineConfig.from_flat().parallel.cpu_threads is None
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig.from_flat(cpu_threads=0)


def test_the_engine_thread_runs_its_steps_with_cpu_threads(tiny_model_dir, torch_threads):
    """Built as the server builds it: on its engine thread, which then runs every step."""
    from ferry.llm import build_engine
    from ferry.sampling_params import SamplingParams
    from ferry.server.async_engine import engine_executor

    torch.set_num_threads(5)        # what the engine thread would inherit if nothing set it
    config = EngineConfig.from_flat(model=str(tiny_model_dir("llama")), cpu_threads=3,
                                    kv_cache_memory="4MiB", max_num_seqs=2)
    executor = engine_executor()
    try:
        engine = executor.submit(build_engine, config).result()
        model = engine.executor.runner.model
        seen = []
        forward = model.forward
        model.forward = lambda *args: (seen.append(torch.get_num_threads()), forward(*args))[1]
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2))
        while executor.submit(engine.has_unfinished_requests).result():
            executor.submit(engine.step).result()
    finally:
        executor.shutdown()
    assert seen and set(seen) == {3}


def test_wait_policy_is_set_when_the_user_set_none():
    environ = {"PATH": "/bin"}
    assert openmp_env.set_wait_policy_defaults(environ) == openmp_env.DEFAULTS
    assert environ == {"PATH": "/bin", **openmp_env.DEFAULTS}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_a_wait_policy_of_the_users_is_left_alone(user):
    environ = dict(user)
    assert openmp_env.set_wait_policy_defaults(environ) == {}
    assert environ == user


def _env_after_import_ferry(**env: str) -> dict[str, str | None]:
    clean = {k: v for k, v in os.environ.items() if k not in openmp_env.USER_KEYS}
    code = ("import os, sys, ferry; assert 'torch' not in sys.modules; "
            f"print(repr({{k: os.environ.get(k) for k in {openmp_env.USER_KEYS!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return eval(out)


def test_import_ferry_sets_the_wait_policy_before_torch_is_loaded():
    assert _env_after_import_ferry() == {key: openmp_env.DEFAULTS.get(key)
                                         for key in openmp_env.USER_KEYS}
    assert _env_after_import_ferry(OMP_WAIT_POLICY="ACTIVE") == {
        "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}
