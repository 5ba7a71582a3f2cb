"""Forward+backward timing of every available backend against one dense matmul of equal FLOPs.

    python -m kernels.bench [--device cpu] [--dtype float32] [--repeats 3]
Not a test: prints a table (ms and GFLOP/s, counting 3 matmuls of 2*N*I*O FLOPs each).
"""
from __future__ import annotations

import argparse
import time

import torch

import kernels
from kernels import grouped

SHAPES = ((16384, 8, 512, 2048), (65536, 64, 512, 512))  # (N, G, I, O)


def even_sizes(num_rows: int, num_groups: int, generator: torch.Generator) -> torch.Tensor:
    """Roughly even random group sizes (multinomial over uniform groups) summing to num_rows."""
    picks = torch.randint(num_groups, (num_rows,), generator=generator)
    return torch.bincount(picks, minlength=num_groups)


def time_fwd_bwd(fn, x, w, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats + 1):
        x.grad = w.grad = None
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x, w).backward(torch.ones(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype))
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first run is warm-up
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}/{dtype}")
    for N, G, I, O in SHAPES:
        sizes = even_sizes(N, G, gen).to(device)
        x = torch.randn(N, I, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(G, I, O, generator=gen) / I ** 0.5).to(device, dtype).requires_grad_()
        flops = 3 * 2 * N * I * O
        cases = {name: (lambda a, b, n=name: kernels.grouped_mm(a, b, sizes, n))
                 for name in kernels.available_backends(device, dtype)}
        cases["grouped(builtin bwd)"] = lambda a, b: grouped.grouped_mm_builtin(a, b, sizes)
        cases["dense x @ w[0]"] = lambda a, b: a @ b[0]
        if "grouped" not in kernels.available_backends(device, dtype):
            del cases["grouped(builtin bwd)"]
        print(f"\nN={N} G={G} d_in={I} d_out={O}  sizes {int(sizes.min())}..{int(sizes.max())}")
        # Rounds interleave the cases so a noisy neighbour hurts them alike; keep each one's best.
        best = {name: min(time_fwd_bwd(fn, x, w, 1) for _ in range(1)) for name, fn in cases.items()}
        for _ in range(args.repeats - 1):
            for name, fn in cases.items():
                best[name] = min(best[name], time_fwd_bwd(fn, x, w, 1))
        for name, sec in best.items():
            print(f"  {name:22s} {sec * 1e3:8.1f} ms  {flops / sec / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
