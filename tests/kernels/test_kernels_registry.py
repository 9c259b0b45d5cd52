"""Backend choice: by device, config, batch and gradients; forcing; fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from nibble.kernels import (KernelError, aqlm_call, aqlm_linear, builtin, registry, scalar_call, select,
                            set_backend, use_backend)


def names(data, batch: int, config=(2, 8), device="cpu") -> str:
    codes, codebooks, scales, bias = data.make_aqlm(16, 64, *config)
    x = torch.randn(batch, 64)
    call = aqlm_call(x, codes, codebooks, scales, bias)
    call = registry.Call(**{**call.__dict__, "device": device})
    return select(call).name


def test_cpu_picks_the_lut_kernel_then_reference_for_huge_batches(cpu_kernels, data):
    assert names(data, 1) == "cpu-lut"
    assert names(data, builtin.CPU_LUT_MAX_BATCH) == "cpu-lut"
    assert names(data, builtin.CPU_LUT_MAX_BATCH + 1) == "reference"


def test_unsupported_configs_fall_back(cpu_kernels, data):
    assert names(data, 1, config=(1, 16)) == "cpu-lut"  # decoded, 65536 codewords being too many for tables
    assert names(data, 1, config=(2, 8), device="meta") == "reference"
    codes, codebooks, scales, bias = data.make_aqlm(16, 64, 1, 16, group=4)
    call = aqlm_call(torch.randn(1, 64), codes, codebooks, scales, bias)
    assert select(call).name == "reference"  # decoding takes groups of 8


def test_gradients_go_to_the_differentiable_reference(cpu_kernels, data):
    codes, codebooks, scales, bias = data.make_aqlm(16, 64, 2, 8)
    codebooks.requires_grad_(True)
    x = torch.randn(2, 64, requires_grad=True)
    assert select(aqlm_call(x, codes, codebooks, scales, bias)).name == "reference"
    aqlm_linear(x, codes, codebooks, scales, bias).sum().backward()
    assert x.grad is not None and codebooks.grad is not None
    with torch.no_grad():
        assert select(aqlm_call(x, codes, codebooks, scales, bias)).name == "cpu-lut"


def test_env_var_and_context_force_a_backend(cpu_kernels, data, monkeypatch):
    monkeypatch.setenv("NIBBLE_KERNEL", "reference")
    assert names(data, 1) == "reference"
    with use_backend("torch-lut"):
        assert names(data, 1) == "torch-lut"
        with use_backend(None):
            assert names(data, 1) == "cpu-lut"
    assert names(data, 1) == "reference"
    monkeypatch.delenv("NIBBLE_KERNEL")
    set_backend("torch-lut")
    try:
        assert names(data, 1) == "torch-lut"
    finally:
        set_backend(None)
    assert names(data, 1) == "cpu-lut"


def test_forcing_a_backend_of_another_format_leaves_this_one_automatic(cpu_kernels, data):
    packed, scales, zeros, bias = data.make_scalar(8, 64, 4, 32)
    with use_backend("cpu-lut"):
        call = scalar_call(torch.randn(1, 64), packed, scales, zeros, 4, 32, bias)
        assert select(call).name == "cpu-scalar"


def test_bad_forcing_raises(data):
    with use_backend("no-such-kernel"), pytest.raises(KernelError, match="unknown"):
        names(data, 1)
    with use_backend("triton"), pytest.raises(KernelError, match="cannot serve"):
        names(data, 1)


def test_without_the_cpp_kernels_the_torch_fallback_serves(data, monkeypatch):
    from nibble.kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)
    assert names(data, 1) == "torch-lut"
    packed, scales, zeros, bias = data.make_scalar(8, 64, 4, 32)
    assert select(scalar_call(torch.randn(1, 64), packed, scales, zeros, 4, 32, bias)).name == "reference"


def test_failed_build_warns_once_and_reports_why(monkeypatch):
    from nibble.kernels.cpu import build

    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_try_build", lambda: (False, "RuntimeError: no compiler"))
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert build.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.load() is False  # the outcome is remembered: no second build, no second warning
    assert build.error() == "RuntimeError: no compiler"


def test_build_can_be_disabled(monkeypatch):
    from nibble.kernels.cpu import build

    monkeypatch.setenv("NIBBLE_CPU_KERNELS", "0")
    assert build._try_build() == (False, "disabled by NIBBLE_CPU_KERNELS=0")


def test_cache_folder_depends_on_sources_and_honours_nibble_cache(monkeypatch, tmp_path):
    from nibble.kernels.cpu import build

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path))
    assert build.cache_dir().parent == tmp_path / "kernels"
    assert build.cache_dir().name.startswith("cpu-")


def test_old_builds_of_other_sources_are_pruned(tmp_path):
    import os
    import time

    from nibble.kernels.cpu import build

    keep, stale, fresh = (tmp_path / name for name in ("cpu-keep", "cpu-stale", "cpu-fresh"))
    for folder in (keep, stale, fresh):
        folder.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(keep, (old, old))
    build._prune_old_builds(keep)
    assert keep.exists() and fresh.exists() and not stale.exists()
