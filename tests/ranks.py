"""Gloo ranks for the multi-process tests, spawned once per test session and reused.

`run(fn, world, *args)` runs `fn(rank, world, *args)` on ranks 0..world-1, each inside a fresh
gloo process group (a new rendezvous file per call, parallel/local_group.py: no TCP port to
race for), and returns when every rank has finished; the first
failing rank's traceback is raised here. The processes stay up between calls, so a test pays for
a process group, not for four interpreters importing torch (spawning them was a third of the
suite's time on this 2-core machine).

What a fresh process would give, each call gets again: the default torch generator at its
start-up seed (ranks that draw unseeded numbers draw the same ones), fp32 default dtype, one
intra-op thread, the environment as it was, dynamo's caches emptied. After a failure or a
timeout the pool is torn down (the other ranks may sit in a collective) and the next call
spawns a new one.
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback

from parallel.local_group import local_gloo_group, new_rendezvous

_CTX = mp.get_context("spawn")
_SEED0 = 67280421310721  # torch's default generator seed in a new process
TIMEOUT_S = 280.0  # under pytest-timeout's 300 s, so the pool is torn down cleanly first


_RDZV_DIR: list[str] = []  # made on first use, by the test process only (the ranks import this module too)


def _rendezvous() -> str:
    if not _RDZV_DIR:
        _RDZV_DIR.append(tempfile.mkdtemp(prefix="raymoe-ranks-"))
        atexit.register(shutil.rmtree, _RDZV_DIR[0], True)
    return new_rendezvous(_RDZV_DIR[0])


def _serve(rank: int, inbox, results) -> None:
    import torch

    env0 = dict(os.environ)
    while True:
        task = inbox.get()
        if task is None:
            return
        fn, world, rdzv, args = task
        os.environ.clear()
        os.environ.update(env0)
        torch.manual_seed(_SEED0)
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(1)
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        try:
            try:
                with local_gloo_group(rank, world, rdzv):
                    fn(rank, world, *args)
            finally:
                _clear_distributed_caches()
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - reported to the test, which raises it
            results.put((rank, traceback.format_exc()))


def _clear_distributed_caches() -> None:
    """DTensor memoises sharding plans by mesh, and a DeviceMesh compares equal to the same shape
    of ranks in the next call's process groups: a plan from the last call would name its (now
    destroyed) groups ("Could not resolve the process group registered under the name 5")."""
    import functools

    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and getattr(obj, "__module__", "").startswith("torch.distributed"):
            obj.cache_clear()
    import torch

    if "torch.distributed.tensor._redistribute" in sys.modules:
        sys.modules["torch.distributed.tensor._redistribute"].clear_redistribute_planner_cache()
    if hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"):
        torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ fast path's own cache


class _Pool:
    def __init__(self):
        self.procs: list = []
        self.inboxes: list = []
        self.results = None

    def _grow(self, world: int) -> None:
        if self.results is None:
            self.results = _CTX.Queue()
        while len(self.procs) < world:
            inbox = _CTX.Queue()
            proc = _CTX.Process(target=_serve, args=(len(self.procs), inbox, self.results), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.inboxes.append(inbox)

    def shutdown(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=10)
        self.procs, self.inboxes, self.results = [], [], None

    def run(self, fn, world: int, args: tuple, timeout_s: float = TIMEOUT_S) -> None:
        if any(not p.is_alive() for p in self.procs):
            self.shutdown()
        self._grow(world)
        rdzv = _rendezvous()
        for rank in range(world):
            self.inboxes[rank].put((fn, world, rdzv, args))
        pending, errors = set(range(world)), {}
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                try:
                    rank, err = self.results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r in pending if not self.procs[r].is_alive()]
                    if dead:
                        raise RuntimeError(f"rank {dead[0]} died (exit code {self.procs[dead[0]].exitcode}) "
                                           f"running {fn.__module__}.{fn.__qualname__}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{fn.__module__}.{fn.__qualname__}: ranks {sorted(pending)} still "
                                           f"running after {timeout_s:.0f} s") from None
                    continue
                pending.discard(rank)
                if err is not None:
                    errors[rank] = err
                    break  # the other ranks may wait in a collective for the failed one
        except BaseException:
            self.shutdown()
            raise
        if errors:
            self.shutdown()
            rank, err = min(errors.items())
            raise RuntimeError(f"rank {rank} of {world} failed in {fn.__module__}.{fn.__qualname__}:\n{err}")


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def run(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` reused gloo ranks; raises the first failing rank's error."""
    _POOL.run(fn, world, args)


def run_fresh(fn, world: int, *args) -> None:
    """The same on newly spawned processes, for a test that needs what only a new process has: a
    peak-memory reading from zero, or malloc settings read from the environment at start-up."""
    import torch.multiprocessing as tmp

    tmp.start_processes(_fresh_entry, args=(fn, world, _rendezvous(), args), nprocs=world, start_method="spawn")


def _fresh_entry(rank, fn, world, rdzv, args):
    import torch

    torch.set_num_threads(1)
    with local_gloo_group(rank, world, rdzv):
        fn(rank, world, *args)
