"""Build the C++ CPU kernels at first use and load them as ``torch.ops.nibble_cpu``.

The build goes through ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja) with
``-O3 -march=native`` into a per-machine cache folder, so a later process loads the finished
library in about a second. ``NIBBLE_CACHE`` moves that folder (default ``~/.cache/nibble``);
``NIBBLE_CPU_KERNELS=0`` skips the build. When the build fails, one warning says why and the
callers fall back to pure torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCES = ("ops.cpp", "aqlm_lut.cpp", "aqlm_decode.cpp", "scalar_gemv.cpp")
HEADERS = ("kernels.h", "simd.h", "aqlm_lut.h")
# The lookup loops are written for scalar loads; gcc's auto-vectoriser would turn them into slow
# gathers, so it is off and the vector code is explicit (GCC vector extensions).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-tree-vectorize"]

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """The CPU model and flags, so that a shared cache never mixes -march=native builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((_HERE / name).read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(_cpu_signature().encode())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """Folder of the build for these sources, flags, torch version and CPU."""
    root = os.environ.get("NIBBLE_CACHE") or Path.home() / ".cache" / "nibble"
    return Path(root) / "kernels" / f"cpu-{_digest()}"


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv's ninja (pip package) may not be there when the venv
    is used without activating it."""
    if shutil.which("ninja"):
        return
    places = [Path(sys.executable).parent]
    try:
        import ninja

        if ninja.BIN_DIR:
            places.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError, OSError):
        pass
    for place in places:
        if (place / "ninja").exists():
            os.environ["PATH"] = f"{place}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _build() -> None:
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"nibble_cpu_{folder.name.split('-')[-1]}",
        sources=[str(_HERE / name) for name in SOURCES],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=os.environ.get("NIBBLE_VERBOSE_BUILD") == "1",
    )


def _prune_old_builds(keep: Path, min_age_s: float = 3600.0) -> None:
    """Remove builds of other source versions untouched for an hour (a process still using one
    keeps its loaded copy)."""
    now = time.time()
    for folder in keep.parent.glob("cpu-*"):
        try:
            if folder != keep and now - folder.stat().st_mtime > min_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def load() -> bool:
    """Build (or find in the cache) and load the kernels once per process; False if impossible."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _try_build()
            if not _state["ok"]:
                warnings.warn(f"nibble: C++ CPU kernels unavailable ({_state['error']}); "
                              "using pure-torch kernels", RuntimeWarning, stacklevel=3)
        return bool(_state["ok"])


def error() -> str | None:
    """Why the kernels could not be loaded (None when they were, or were never tried)."""
    return _state.get("error")  # type: ignore[return-value]


def _try_build() -> tuple[bool, str | None]:
    if os.environ.get("NIBBLE_CPU_KERNELS", "1") == "0":
        return False, "disabled by NIBBLE_CPU_KERNELS=0"
    try:
        _build()
        torch.ops.nibble_cpu.aqlm_lut_linear  # noqa: B018 - raises if the library did not register
    except Exception as exc:  # any compiler, ninja or loader failure means: fall back
        message = str(exc).strip().splitlines()
        return False, f"{type(exc).__name__}: {message[0] if message else ''}"[:200]
    _prune_old_builds(cache_dir())
    return True, None
