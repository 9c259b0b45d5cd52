"""Kernel benchmark: quantized matmul at small batch against the dense baseline of the same run.

    python benchmarks/kernels.py                # CPU: Llama-2-7B and SmolLM2 shapes, batch 1 and 8
    python benchmarks/kernels.py --batch 1,2,4,8 --formats 2x8 --shapes 11008x4096
    python benchmarks/kernels.py --clock cpu    # 1 thread, CPU time: robust on a loaded machine

For each shape (out×in), batch and backend: the median time of one call, the speed-up over
torch's dense matmul timed in the same loop (float32 on CPU, float16 on CUDA; > 1 is faster),
the bytes a call must move (codes + codebooks + scales, or the dense weight, plus x and y)
divided by that time, then the best sample and the speed-up of best over best (on a machine
shared with other jobs, the best samples are the ones least slowed by them). Backends are timed
interleaved, round after round, so that load from other processes hits all of them alike. The
PyPI ``aqlm`` package's CPU kernel (numba) runs as a peer for Kx8 configs when it imports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nibble.formats.packing import pack_bits
from nibble.kernels import registry
from nibble.kernels.registry import use_backend

SHAPES = {
    "llama": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "smollm": [(576, 576), (1536, 576), (576, 1536), (192, 576)],
}
AQLM_CONFIGS = {"1x8": (1, 8), "2x8": (2, 8), "4x8": (4, 8), "1x16": (1, 16)}
SCALAR_CONFIGS = {"4bit": 4, "2bit": 2}
GROUP = 8  # AQLM input group size
SCALAR_GROUP = 128


@dataclass
class Case:
    label: str
    run: Callable[[], torch.Tensor]
    nbytes: int


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def calls_per_sample(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(1000, int(target_s / once)))


def time_interleaved(cases: list[Case], device: torch.device, rounds: int, target_s: float,
                     clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, float]]:
    """(median, best) seconds per call of each case, sampled round-robin."""
    for case in cases:  # warm-up: builds, JIT compiles, layout caches
        case.run()
    inner = [calls_per_sample(case.run, device, target_s) for case in cases]
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, case in enumerate(cases):
            sync(device)
            start = clock()
            for _ in range(inner[i]):
                case.run()
            sync(device)
            samples[i].append((clock() - start) / inner[i])
    return [(statistics.median(s), min(s)) for s in samples]


def aqlm_tensors(out: int, inp: int, m: int, bits: int, device: torch.device, gen: torch.Generator):
    dtype = torch.uint8 if bits <= 8 else torch.int16
    codes = torch.randint(0, 2**bits, (out, inp // GROUP, m), generator=gen)
    codes = (codes - (codes >= 2**15).long() * 2**16).to(dtype)
    codebooks = (torch.randn(m, 2**bits, GROUP, generator=gen) * 0.05).half().float()
    scales = (torch.rand(out, generator=gen) + 0.5).half().float()
    return codes.to(device), codebooks.to(device), scales.to(device)


def aqlm_peer(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> Callable | None:
    """The PyPI aqlm package's numba LUT kernel on this weight (None when it does not import)."""
    try:
        import numba
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
    except ImportError:
        return None
    numba.set_num_threads(torch.get_num_threads())
    their_codes = codes.permute(1, 0, 2).contiguous().view(torch.int8)
    their_books = codebooks[:, :, None, :].contiguous()
    their_scales = scales.view(-1, 1, 1, 1)
    return lambda x: numba_gemm_lut(x, their_codes, their_books, their_scales, None)


def peer_version() -> str:
    try:
        from importlib.metadata import version

        return f", peer aqlm {version('aqlm')} (numba {version('numba')})"
    except Exception:
        return ", peer aqlm not installed"


def aqlm_cases(out: int, inp: int, name: str, batch: int, x: torch.Tensor, backends: list[str],
               gen: torch.Generator) -> list[Case]:
    m, bits = AQLM_CONFIGS[name]
    codes, codebooks, scales = aqlm_tensors(out, inp, m, bits, x.device, gen)
    nbytes = out * (inp // GROUP) * m * bits // 8 + m * 2**bits * GROUP * 2 + out * 2
    nbytes += x.numel() * x.element_size() + batch * out * x.element_size()
    call = registry.aqlm_call(x, codes, codebooks, scales)
    cases = []
    for backend in registry.backends(registry.AQLM):
        if backend.name in backends and registry._serves(backend, call) and backend.available():
            def run(name=backend.name):
                with use_backend(name):
                    return registry.aqlm_linear(x, codes, codebooks, scales)
            cases.append(Case(f"aqlm {name} {backend.name}", run, nbytes))
    peer = aqlm_peer(codes, codebooks, scales) if "peer" in backends and x.device.type == "cpu" and bits == 8 else None
    if peer is not None:
        cases.append(Case(f"aqlm {name} pypi-aqlm", lambda: peer(x), nbytes))
    return cases


def scalar_cases(out: int, inp: int, name: str, batch: int, x: torch.Tensor, backends: list[str],
                 gen: torch.Generator) -> list[Case]:
    bits = SCALAR_CONFIGS[name]
    groups = inp // SCALAR_GROUP
    packed = pack_bits(torch.randint(0, 2**bits, (out, inp), generator=gen), bits).to(x.device)
    scales = (torch.rand(out, groups, generator=gen) * 0.01).half().float().to(x.device)
    zeros = torch.randint(0, 2**bits, (out, groups), generator=gen).to(torch.uint8).to(x.device)
    nbytes = packed.numel() * 4 + scales.numel() * 2 + zeros.numel()
    nbytes += x.numel() * x.element_size() + batch * out * x.element_size()
    call = registry.scalar_call(x, packed, scales, zeros, bits, SCALAR_GROUP)
    cases = []
    for backend in registry.backends(registry.SCALAR):
        if backend.name in backends and registry._serves(backend, call) and backend.available():
            def run(name=backend.name):
                with use_backend(name):
                    return registry.scalar_linear(x, packed, scales, zeros, bits, SCALAR_GROUP)
            cases.append(Case(f"{name} {backend.name}", run, nbytes))
    return cases


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        if item in SHAPES:
            shapes += SHAPES[item]
        else:
            out, inp = item.split("x")
            shapes.append((int(out), int(inp)))
    return shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="llama,smollm", help="llama, smollm or OUTxIN, comma-separated")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--formats", default="2x8,1x8,4bit,2bit",
                        help=f"of {list(AQLM_CONFIGS) + list(SCALAR_CONFIGS)}")
    parser.add_argument("--backends", default="cpu-lut,cpu-scalar,triton,peer",
                        help="of cpu-lut, cpu-scalar, triton, torch-lut, reference, peer (the PyPI aqlm kernel)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sample-ms", type=float, default=20.0, help="target length of one timing sample")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: CPU time of the calling thread, which other processes' "
                             "load hardly inflates (implies --threads 1 and no peer: numba runs in its own threads)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dense_dtype = torch.float32 if device.type == "cpu" else torch.float16
    backends = args.backends.split(",")
    if args.clock == "cpu":
        args.threads = 1
        backends = [b for b in backends if b != "peer"]
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, baseline dense {dense_dtype}, "
          f"{args.clock} clock{peer_version() if 'peer' in backends else ''}")
    print(f"{'shape':>11} {'batch':>5}  {'kernel':<24} {'µs':>9} {'vs dense':>9} {'GB/s':>7}"
          f" {'best µs':>9} {'vs dense':>9}")
    with torch.inference_mode():
        for out, inp in parse_shapes(args.shapes):
            for batch in [int(b) for b in args.batch.split(",")]:
                x = torch.randn(batch, inp, generator=gen).to(device, dense_dtype)
                weight = (torch.randn(out, inp, generator=gen) * 0.02).to(device, dense_dtype)
                dense_bytes = weight.numel() * weight.element_size() + (x.numel() + batch * out) * x.element_size()
                cases = [Case(f"dense {str(dense_dtype).split('.')[-1]}", lambda: F.linear(x, weight), dense_bytes)]
                for name in args.formats.split(","):
                    make = aqlm_cases if name in AQLM_CONFIGS else scalar_cases
                    if name in AQLM_CONFIGS and inp % GROUP or name in SCALAR_CONFIGS and inp % SCALAR_GROUP:
                        continue
                    cases += make(out, inp, name, batch, x, backends, gen)
                times = time_interleaved(cases, device, args.rounds, args.sample_ms / 1000, CLOCKS[args.clock])
                (dense, dense_best) = times[0]
                for case, (seconds, best) in zip(cases, times):
                    print(f"{out:>5}x{inp:<5} {batch:>5}  {case.label:<24} {seconds * 1e6:>9.1f} "
                          f"{dense / seconds:>8.2f}x {case.nbytes / seconds / 1e9:>7.1f} {best * 1e6:>9.1f} "
                          f"{dense_best / best:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
