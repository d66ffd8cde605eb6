"""Platform detection: the CPU for real, NVIDIA and AMD GPUs through a mocked torch.cuda."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from ferry import platform as plat
from ferry.platform import arch_family, detect_platform, device_arch


def fake_gpu(monkeypatch, *, hip: str | None, props: SimpleNamespace, count: int = 1,
             free: int = 10 * 2**30) -> None:
    """Make torch.cuda look like a machine with ``count`` GPUs of the given properties."""
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", None if hip else "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, props.total_memory))
    monkeypatch.setattr(plat, "triton_importable", lambda: True)


def no_gpu(monkeypatch, *, hip: str | None = None, cuda: str | None = None) -> None:
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)
MI300X = SimpleNamespace(name="AMD Instinct MI300X", total_memory=192 * 2**30, major=9, minor=4,
                         gcnArchName="gfx942:sramecc+:xnack-")


def test_cpu_detection_is_real_and_plain():
    platform = detect_platform("cpu")
    assert (platform.kind, platform.vendor, platform.arch) == ("cpu", "cpu", "cpu")
    assert platform.torch_device == torch.device("cpu")
    assert not platform.use_triton_kernels
    assert platform.total_memory_bytes > 0
    assert 0 < platform.free_memory_bytes() <= platform.total_memory_bytes
    assert platform.power_watts() is None and platform.energy_joules() is None


def test_auto_without_gpu_falls_back_to_cpu(monkeypatch):
    no_gpu(monkeypatch)
    assert detect_platform("auto").kind == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "rocm"])
def test_gpu_request_without_gpu_is_a_value_error(monkeypatch, device):
    no_gpu(monkeypatch, hip="6.2" if device == "rocm" else None, cuda=None if device == "rocm" else "12.4")
    with pytest.raises(ValueError, match="no usable GPU"):
        detect_platform(device)


def test_rocm_on_a_cuda_build_is_a_value_error(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    with pytest.raises(ValueError, match="ROCm build"):
        detect_platform("rocm")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1", "", "tpu"])
def test_unknown_device_strings_are_value_errors(device):
    with pytest.raises(ValueError):
        detect_platform(device)


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_nvidia_gpu(monkeypatch, device):
    fake_gpu(monkeypatch, hip=None, props=H100)
    platform = detect_platform(device)
    assert (platform.kind, platform.vendor) == ("cuda", "nvidia")
    assert platform.compute_capability == (9, 0) and platform.gfx_arch is None
    assert platform.arch == "sm_90"
    assert platform.device_name == H100.name and platform.total_memory_bytes == 80 * 2**30
    assert platform.torch_device == torch.device("cuda", 0)
    assert platform.use_triton_kernels and platform.triton_available
    assert platform.free_memory_bytes() == 10 * 2**30


@pytest.mark.parametrize("device", ["auto", "rocm", "cuda"])
def test_amd_gpu(monkeypatch, device):
    """ROCm builds expose AMD GPUs as torch.cuda; 'cuda' there still means the AMD GPU."""
    fake_gpu(monkeypatch, hip="6.2.41133", props=MI300X)
    platform = detect_platform(device)
    assert (platform.kind, platform.vendor) == ("rocm", "amd")
    assert platform.gfx_arch == "gfx942" and platform.compute_capability is None
    assert platform.arch == "gfx942"
    assert platform.device_name == MI300X.name


def test_gpu_index_out_of_range(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100, count=2)
    assert detect_platform("cuda:1").torch_device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 GPU"):
        detect_platform("cuda:2")


def test_no_triton_means_reference_kernels(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    monkeypatch.setattr(plat, "triton_importable", lambda: False)
    platform = detect_platform("cuda")
    assert not platform.triton_available and not platform.use_triton_kernels


def test_nvidia_power_and_energy_through_pynvml(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    monkeypatch.delattr(torch.cuda, "power_draw", raising=False)
    fake_nvml = SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: f"handle{index}",
        nvmlDeviceGetPowerUsage=lambda handle: 350_000,                 # milliwatts
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: 7_000_000)   # millijoules
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    platform = detect_platform("cuda")
    assert platform.power_watts() == pytest.approx(350.0)
    assert platform.energy_joules() == pytest.approx(7000.0)


def test_amd_power_and_energy_through_amdsmi(monkeypatch):
    fake_gpu(monkeypatch, hip="6.2", props=MI300X)
    monkeypatch.delattr(torch.cuda, "power_draw", raising=False)
    fake_smi = SimpleNamespace(
        amdsmi_init=lambda: None, amdsmi_get_processor_handles=lambda: ["gpu0"],
        amdsmi_get_power_info=lambda handle: {"current_socket_power": "N/A", "average_socket_power": 512},
        amdsmi_get_energy_count=lambda handle: {"energy_accumulator": 2_000_000, "counter_resolution": 15.3})
    monkeypatch.setitem(sys.modules, "amdsmi", fake_smi)
    platform = detect_platform("rocm")
    assert platform.power_watts() == pytest.approx(512.0)
    assert platform.energy_joules() == pytest.approx(2_000_000 * 15.3 / 1e6)


def test_probes_return_none_without_vendor_libraries(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    monkeypatch.delattr(torch.cuda, "power_draw", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import fails
    platform = detect_platform("cuda")
    assert platform.power_watts() is None and platform.energy_joules() is None


def test_device_arch_and_family(monkeypatch):
    assert device_arch(torch.device("cpu")) == "cpu"
    fake_gpu(monkeypatch, hip="6.2", props=MI300X)
    assert device_arch(torch.device("cuda", 0)) == "gfx942"
    assert [arch_family(a) for a in ("sm_80", "gfx90a", "gfx942", "gfx1100", "cpu")] == \
        ["nvidia", "amd_cdna", "amd_cdna", "amd_rdna", "cpu"]
