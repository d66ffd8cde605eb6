"""The float32 decode linear (csrc/f32_gemv.cpp) against F.linear, and ferry's worker pool
(csrc/thread_pool.h) that every C++ kernel now splits its work over."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from ferry.kernels import cpu
from ferry.kernels.cpu import build
from ferry.kernels.cpu.dense import dense_linear, max_kernel_rows
from ferry.kernels.cpu import dense
from ferry.layers.linear_method import store_column_major

if build.find_compiler() is None:
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here", allow_module_level=True)


def column_major(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.randn(out_features, in_features,
                                            generator=torch.Generator().manual_seed(seed)),
                                requires_grad=False)
    store_column_major(weight)
    return weight.data


def kernel_runs() -> bool:
    return cpu.available() and max_kernel_rows() > 0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the C++ kernel (so a silent fallback fails the test)."""
    if not kernel_runs():
        pytest.skip("the library has no AVX-512 path: dense_linear is F.linear here")
    real, calls = dense.functions().f32_gemv, []

    def counted(*args):
        calls.append(args[2])   # rows
        return real(*args)

    monkeypatch.setattr(dense.functions(), "f32_gemv", counted)
    return calls


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16, 61, 128])
@pytest.mark.parametrize("out_features,in_features", [(512, 512), (1000, 96), (17, 64), (130, 7),
                                                       (3000, 256), (40, 1411), (2816, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(rows, out_features, in_features, with_bias, kernel_calls):
    weight = column_major(out_features, in_features)
    x = torch.randn(rows, in_features)
    bias = torch.randn(out_features) if with_bias else None
    torch.testing.assert_close(dense_linear(x, weight, bias), F.linear(x, weight, bias),
                               rtol=1e-4, atol=3e-4)
    assert kernel_calls == [rows]


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 128])
@pytest.mark.parametrize("out_features,in_features", [(1000, 96), (33, 64), (130, 7), (64, 517)])
def test_row_major_weight_matches_f_linear(rows, out_features, in_features, monkeypatch):
    """The LM head keeps the embedding's (vocab, hidden) row order."""
    if not kernel_runs():
        pytest.skip("no AVX-512 path")
    real, calls = dense.functions().f32_gemv_row_major, []
    monkeypatch.setattr(dense.functions(), "f32_gemv_row_major",
                        lambda *args: calls.append(args[2]) or real(*args))
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features)
    bias = torch.randn(out_features)
    torch.testing.assert_close(dense_linear(x, weight, bias), F.linear(x, weight, bias),
                               rtol=1e-4, atol=3e-4)
    assert calls == [rows]


def test_strided_rows_of_a_wider_tensor(kernel_calls):
    """Decode inputs are often views (e.g. the last token of each prompt)."""
    weight = column_major(300, 64)
    wide = torch.randn(3, 100)
    x = wide[:, 10:74]
    torch.testing.assert_close(dense_linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=3e-4)
    assert kernel_calls == [3]


@pytest.mark.parametrize("case", ["many_rows", "transposed_view", "float64", "grad"])
def test_other_inputs_take_f_linear(case, monkeypatch):
    weight = column_major(64, 32)
    x = torch.randn(2, 32)
    if case == "many_rows":
        x = torch.randn(max(max_kernel_rows(), 4) + 1, 32)
    elif case == "transposed_view":
        weight = torch.randn(64, 64)[:, :32]   # neither layout: a strided slice
    elif case == "float64":
        weight, x = weight.double(), x.double()
    elif case == "grad":
        x.requires_grad_(True)
    calls = []
    if kernel_runs():
        for name in ("f32_gemv", "f32_gemv_row_major"):
            monkeypatch.setattr(dense.functions(), name, lambda *args: calls.append(args) or 0)
    out = dense_linear(x, weight)
    assert not calls
    torch.testing.assert_close(out, F.linear(x, weight))


def test_pool_gives_every_item_once_under_concurrent_callers(kernel_calls):
    """Two Python threads calling pooled kernels at once, many times, with more threads
    asked for than there are cores: every result must equal the serial one."""
    weight = column_major(4096, 128, seed=3)
    inputs = [torch.randn(1 + i % 16, 128, generator=torch.Generator().manual_seed(i))
              for i in range(40)]
    expected = [F.linear(x, weight) for x in inputs]
    failures = []

    def call_repeatedly(threads: int) -> None:
        torch.set_num_threads(threads)
        for _ in range(10):
            for x, want in zip(inputs, expected):
                if not torch.allclose(dense_linear(x, weight), want, rtol=1e-4, atol=3e-4):
                    failures.append(threads)

    workers = [threading.Thread(target=call_repeatedly, args=(threads,)) for threads in (2, 5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures and len(kernel_calls) == 2 * 10 * len(inputs)
