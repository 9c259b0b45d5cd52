"""Building and loading the C++ decode step (``csrc/llama_decode.cpp``) with the system compiler.

The library has a plain C ABI and no torch headers, so it compiles in seconds; it is cached per
source, flags and CPU under ``$NIBBLE_CACHE`` (default ``~/.cache/nibble``)/native.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "llama_decode.cpp"
HEADERS = ("work_pool.h",)
FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 6


class NativeUnavailable(RuntimeError):
    """The C++ decode step cannot be built or loaded here (no compiler, unsupported platform)."""


def cache_dir() -> Path:
    root = os.environ.get("NIBBLE_CACHE") or Path.home() / ".cache" / "nibble"
    return Path(root) / "native"


def compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")


def _sources_digest(source_path: Path, headers: tuple[str, ...]) -> bytes:
    parts = [source_path.read_bytes()] + [(source_path.parent / name).read_bytes() for name in headers]
    return b"\0".join(parts)


def _library_path(source_path: Path, source: bytes, cxx: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(source + " ".join((cxx, *flags, platform.machine(), _cpu_flags())).encode())
    return cache_dir() / f"{source_path.stem}_{key.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source_path: Path = SOURCE, headers: tuple[str, ...] = HEADERS, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source_path`` (with ``headers`` beside it) into a cached shared library; return its path."""
    if not source_path.is_file():
        raise NativeUnavailable(f"{source_path} is missing from the installation")
    source = _sources_digest(source_path, headers)
    cxx = compiler()
    flags = (*FLAGS, *extra_flags)
    target = _library_path(source_path, source, cxx, flags)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [cxx, *flags, f"-I{source_path.parent}", str(source_path), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"compiling {source_path.name} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: concurrent builders never see half a file
    log.info("built %s", target)
    return target


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """The loaded decode library (built on first use). Raises ``NativeUnavailable``."""
    library = ctypes.CDLL(str(build()))
    library.nb_abi_version.restype = ctypes.c_int64
    if library.nb_abi_version() != ABI_VERSION:
        raise NativeUnavailable("stale decode library: ABI version mismatch")
    return library


@lru_cache(maxsize=None)
def load_source(source_path: Path, headers: tuple[str, ...] = (), extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Any other plain-C library built like the decode step (e.g. a format's kernel entry points)."""
    return ctypes.CDLL(str(build(source_path, headers, extra_flags)))


def available() -> bool:
    """Whether the C++ decode step can be used on this machine."""
    try:
        load_library()
    except (NativeUnavailable, OSError) as exc:
        log.warning("C++ decode step unavailable, using the torch backend: %s", exc)
        return False
    return True
