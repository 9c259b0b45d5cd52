"""Kernel benchmark: quantized matmul at small batch against the dense baseline of the same run.

    python benchmarks/kernels.py                # CPU: Llama-2-7B and SmolLM2 shapes, batch 1 and 8
    python benchmarks/kernels.py --batch 1,2,4,8 --formats 2x8 --shapes 11008x4096
    python benchmarks/kernels.py --clock cpu    # 1 thread, CPU time: robust on a loaded machine
    python benchmarks/kernels.py --device cuda --formats 2x8,1x16,4bit,2bit --batch 1,4,8   # GPU

For each shape (out×in), batch and backend: the median time of one call, the speed-up over
torch's dense matmul timed in the same loop (float32 on CPU, float16 on CUDA; > 1 is faster),
the bytes a call must move (codes + codebooks + scales, or the dense weight, plus x and y)
divided by that time, then the best sample and the speed-up of best over best (on a machine
shared with other jobs, the best samples are the ones least slowed by them). Backends are timed
interleaved, round after round, so that load from other processes hits all of them alike. The
PyPI ``aqlm`` package's CPU kernel (numba) runs as a peer for Kx8 configs when it imports.

Every case cycles through enough copies of its weight that one pass over them exceeds
``--rotate-mb`` (default 64 MB on the CPU, twice this machine's L3; 128 MB on a GPU, over twice
an H100's L2): a small quantized weight would otherwise stay in cache between calls while the
dense one streams from memory. On CUDA each sample replays a CUDA graph of the calls, timed with
events, so Python's launch overhead is left out, as in a graph-replayed decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from functools import partial
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
    """One row: ``runs`` computes the same product over different copies of the weight."""

    label: str
    runs: list[Callable[[], torch.Tensor]]
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


def copies_needed(weight_bytes: int, rotate_bytes: int) -> int:
    """Weight copies whose total exceeds ``rotate_bytes`` (at most 64)."""
    return max(1, min(64, -(-rotate_bytes // max(weight_bytes, 1))))


def cycle(runs: list[Callable[[], object]], calls: int) -> Callable[[], None]:
    def run_all() -> None:
        for i in range(calls):
            runs[i % len(runs)]()
    return run_all


def time_interleaved(cases: list[Case], device: torch.device, rounds: int, target_s: float,
                     clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, float]]:
    """(median, best) seconds per call of each case, sampled round-robin."""
    if device.type == "cuda":
        return time_graphs(cases, rounds, target_s)
    for case in cases:  # warm-up: builds, JIT compiles, layout caches
        for run in case.runs:
            run()
    inner = [max(len(case.runs), calls_per_sample(case.runs[0], device, target_s)) for case in cases]
    loops = [cycle(case.runs, calls) for case, calls in zip(cases, inner)]
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, loop in enumerate(loops):
            start = clock()
            loop()
            samples[i].append((clock() - start) / inner[i])
    return [(statistics.median(s), min(s)) for s in samples]


def time_graphs(cases: list[Case], rounds: int, target_s: float) -> list[tuple[float, float]]:
    """Like ``time_interleaved`` on CUDA: each sample is one replay of a graph of many calls."""
    from nibble.runtime.graphs import capture_graph

    graphs, calls = [], []
    for case in cases:
        cycle(case.runs, len(case.runs))()  # first calls (compilation) before the per-call estimate
        count = max(len(case.runs), calls_per_sample(case.runs[0], torch.device("cuda"), target_s / 10))
        count = min(count, 256 * len(case.runs))
        graph, _ = capture_graph(cycle(case.runs, count), warmups=1)
        graphs.append(graph)
        calls.append(count)
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples[i].append(begin.elapsed_time(end) / 1000 / calls[i])
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


def io_bytes(x: torch.Tensor, out: int) -> int:
    return x.numel() * x.element_size() + x.shape[0] * out * x.element_size()


def backend_cases(fmt: str, label: str, call, linear: Callable, weights: list[tuple], x: torch.Tensor,
                  backends: list[str], nbytes: int) -> list[Case]:
    """A case per selected backend of ``fmt`` that serves ``call``, cycling over ``weights``."""
    cases = []
    for backend in registry.backends(fmt):
        if backend.name in backends and registry._serves(backend, call) and backend.available():
            def run(tensors, name=backend.name):
                with use_backend(name):
                    return linear(x, *tensors)
            cases.append(Case(f"{label} {backend.name}", [partial(run, w) for w in weights], nbytes))
    return cases


def aqlm_cases(out: int, inp: int, name: str, x: torch.Tensor, backends: list[str], gen: torch.Generator,
               rotate_bytes: int) -> list[Case]:
    m, bits = AQLM_CONFIGS[name]
    weight_bytes = out * (inp // GROUP) * m * bits // 8 + m * 2**bits * GROUP * 2 + out * 2
    weights = [aqlm_tensors(out, inp, m, bits, x.device, gen)
               for _ in range(copies_needed(weight_bytes, rotate_bytes))]
    nbytes = weight_bytes + io_bytes(x, out)
    cases = backend_cases(registry.AQLM, f"aqlm {name}", registry.aqlm_call(x, *weights[0]),
                          registry.aqlm_linear, weights, x, backends, nbytes)
    if "peer" in backends and x.device.type == "cpu" and bits == 8:
        peers = [aqlm_peer(*w) for w in weights]
        if peers[0] is not None:
            cases.append(Case(f"aqlm {name} pypi-aqlm", [partial(peer, x) for peer in peers], nbytes))
    return cases


def scalar_tensors(out: int, inp: int, bits: int, device: torch.device, gen: torch.Generator):
    groups = inp // SCALAR_GROUP
    packed = pack_bits(torch.randint(0, 2**bits, (out, inp), generator=gen), bits).to(device)
    scales = (torch.rand(out, groups, generator=gen) * 0.01).half().float().to(device)
    zeros = torch.randint(0, 2**bits, (out, groups), generator=gen).to(torch.uint8).to(device)
    return packed, scales, zeros, bits, SCALAR_GROUP


def scalar_cases(out: int, inp: int, name: str, x: torch.Tensor, backends: list[str], gen: torch.Generator,
                 rotate_bytes: int) -> list[Case]:
    bits = SCALAR_CONFIGS[name]
    groups = inp // SCALAR_GROUP
    weight_bytes = out * inp * bits // 8 + out * groups * 3
    weights = [scalar_tensors(out, inp, bits, x.device, gen) for _ in range(copies_needed(weight_bytes, rotate_bytes))]
    return backend_cases(registry.SCALAR, name, registry.scalar_call(x, *weights[0]), registry.scalar_linear,
                         weights, x, backends, weight_bytes + io_bytes(x, out))


def dense_case(out: int, inp: int, x: torch.Tensor, gen: torch.Generator, rotate_bytes: int) -> Case:
    weight_bytes = out * inp * x.element_size()
    weights = [(torch.randn(out, inp, generator=gen) * 0.02).to(x.device, x.dtype)
               for _ in range(copies_needed(weight_bytes, rotate_bytes))]
    return Case(f"dense {str(x.dtype).split('.')[-1]}", [partial(F.linear, x, w) for w in weights],
                weight_bytes + io_bytes(x, out))


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
    parser.add_argument("--rotate-mb", type=int, default=None,
                        help="cycle through weight copies totalling more than this (default 64 CPU, 128 CUDA)")
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
    rotate_bytes = (args.rotate_mb or (64 if device.type == "cpu" else 128)) << 20
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, baseline dense {dense_dtype}, "
          f"{args.clock if device.type == 'cpu' else 'CUDA-graph'} clock, weights rotated over "
          f"{rotate_bytes >> 20} MB{peer_version() if 'peer' in backends else ''}")
    print(f"{'shape':>11} {'batch':>5}  {'kernel':<24} {'µs':>9} {'vs dense':>9} {'GB/s':>7}"
          f" {'best µs':>9} {'vs dense':>9}")
    with torch.inference_mode():
        for out, inp in parse_shapes(args.shapes):
            for batch in [int(b) for b in args.batch.split(",")]:
                x = torch.randn(batch, inp, generator=gen).to(device, dense_dtype)
                cases = [dense_case(out, inp, x, gen, rotate_bytes)]
                for name in args.formats.split(","):
                    make = aqlm_cases if name in AQLM_CONFIGS else scalar_cases
                    if name in AQLM_CONFIGS and inp % GROUP or name in SCALAR_CONFIGS and inp % SCALAR_GROUP:
                        continue
                    cases += make(out, inp, name, x, backends, gen, rotate_bytes)
                times = time_interleaved(cases, device, args.rounds, args.sample_ms / 1000, CLOCKS[args.clock])
                (dense, dense_best) = times[0]
                for case, (seconds, best) in zip(cases, times):
                    print(f"{out:>5}x{inp:<5} {batch:>5}  {case.label:<24} {seconds * 1e6:>9.1f} "
                          f"{dense / seconds:>8.2f}x {case.nbytes / seconds / 1e9:>7.1f} {best * 1e6:>9.1f} "
                          f"{dense_best / best:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
