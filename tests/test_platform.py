"""Platform detection, probes and capabilities: the CPU for real, NVIDIA and AMD GPUs through a
mocked torch.cuda."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from ferry.platform import arch_family, capabilities, detect_platform, device_arch, kernel_backend


def fake_gpu(monkeypatch, *, hip: str | None, props: SimpleNamespace, count: int = 1,
             free: int = 10 * 2**30) -> None:
    """Make torch.cuda look like a machine with ``count`` GPUs of the given properties."""
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", None if hip else "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, props.total_memory))
    monkeypatch.setattr(capabilities, "triton_importable", lambda: True)


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
    assert platform.energy_joules() is None
    assert platform.memory_probe() is None and platform.energy_probe() is None
    assert platform.memory_used_bytes() == 0


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
    monkeypatch.setattr(capabilities, "triton_importable", lambda: False)
    platform = detect_platform("cuda")
    assert not platform.triton_available and not platform.use_triton_kernels


def test_nvidia_energy_through_pynvml(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    opened = []
    fake_nvml = SimpleNamespace(
        nvmlInit=lambda: opened.append(1), nvmlDeviceGetHandleByIndex=lambda index: f"handle{index}",
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: 7_000_000)   # millijoules
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    platform = detect_platform("cuda")
    assert platform.energy_joules() == pytest.approx(7000.0)
    probe = platform.energy_probe()
    opened.clear()
    assert probe() == pytest.approx(7000.0) and probe() == pytest.approx(7000.0)
    assert not opened                       # the library is opened once, not per reading


def test_amd_energy_through_amdsmi(monkeypatch):
    fake_gpu(monkeypatch, hip="6.2", props=MI300X)
    fake_smi = SimpleNamespace(
        amdsmi_init=lambda: None, amdsmi_get_processor_handles=lambda: ["gpu0"],
        amdsmi_get_energy_count=lambda handle: {"energy_accumulator": 2_000_000, "counter_resolution": 15.3})
    monkeypatch.setitem(sys.modules, "amdsmi", fake_smi)
    platform = detect_platform("rocm")
    assert platform.energy_joules() == pytest.approx(2_000_000 * 15.3 / 1e6)


def test_no_energy_probe_without_vendor_library_or_counter(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100)
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import fails
    platform = detect_platform("cuda")
    assert platform.energy_probe() is None and platform.energy_joules() is None

    def no_counter(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")     # pre-Volta: no energy counter
    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: "h",
        nvmlDeviceGetTotalEnergyConsumption=no_counter))
    assert platform.energy_probe() is None


def test_gpu_memory_probe_reads_reserved_memory_of_its_device(monkeypatch):
    fake_gpu(monkeypatch, hip=None, props=H100, count=2)
    asked = []
    monkeypatch.setattr(torch.cuda, "memory_reserved",
                        lambda device=None: asked.append(device) or 3 * 2**30)
    probe = detect_platform("cuda:1").memory_probe()
    assert probe() == 3 * 2**30 and asked == [torch.device("cuda", 1)]


def test_kernel_backend_per_device_type(monkeypatch):
    monkeypatch.setattr(capabilities, "triton_importable", lambda: True)
    assert kernel_backend("cuda") == "triton"
    monkeypatch.setattr(capabilities, "triton_importable", lambda: False)
    assert kernel_backend("cuda") == "reference"
    monkeypatch.setattr(capabilities, "cxx_compiler", lambda: "/usr/bin/c++")
    monkeypatch.delenv("FERRY_CPU_KERNELS", raising=False)
    assert kernel_backend("cpu") == "cpu"
    monkeypatch.setenv("FERRY_CPU_KERNELS", "0")
    assert kernel_backend("cpu") == "reference"
    monkeypatch.delenv("FERRY_CPU_KERNELS")
    monkeypatch.setattr(capabilities, "cxx_compiler", lambda: None)
    assert kernel_backend("cpu") == "reference"
    assert kernel_backend("meta") == "reference"


def test_device_arch_and_family(monkeypatch):
    assert device_arch(torch.device("cpu")) == "cpu"
    fake_gpu(monkeypatch, hip="6.2", props=MI300X)
    assert device_arch(torch.device("cuda", 0)) == "gfx942"
    assert [arch_family(a) for a in ("sm_80", "gfx90a", "gfx942", "gfx1100", "cpu")] == \
        ["nvidia", "amd_cdna", "amd_cdna", "amd_rdna", "cpu"]
