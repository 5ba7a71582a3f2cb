"""Gloo process groups among processes of one machine, met through a file instead of a TCP port.

The tests and the benchmarks spawn their own ranks. Rendezvous through a TCPStore needs a port
picked before rank 0 binds it: "bind to port 0, read the port, close" leaves a gap, and on a busy
machine (a Ray cluster next door opens hundreds of client sockets, and each takes an ephemeral
port) another socket takes the port first, and rank 0 fails with EADDRINUSE. That happened on CI.
A FileStore has nothing to take: the ranks meet through a fresh file that the caller names. Gloo's
own pair sockets bind port 0 and report the port through the store, so they do not race either.

Ray Train's workers don't use this. Ray Train sets up their process group itself.
"""
from __future__ import annotations

import gc
import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta


def new_rendezvous(directory: str | None = None) -> str:
    """A path for one group's FileStore that does not exist yet. Use it for one
    init_process_group only: FileStore must not start from an older group's file."""
    fd, path = tempfile.mkstemp(prefix="raymoe-rdzv-", dir=directory)
    os.close(fd)
    os.unlink(path)  # FileStore creates it; only the unique name is wanted
    return path


def init_local_gloo(rank: int, world: int, rendezvous: str, timeout_s: float = 90.0) -> None:
    """init_process_group("gloo") for `world` local ranks meeting at `rendezvous` (a
    new_rendezvous() path, the same on every rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


@contextmanager
def local_gloo_group(rank: int, world: int, rendezvous: str, timeout_s: float = 90.0):
    """The default process group (gloo) of `world` local ranks for the body. It is destroyed on
    the way out. `rendezvous` is the same new_rendezvous() path on every rank. The timeout is
    short on purpose: when one rank fails, the others would otherwise wait 30 min in a
    collective."""
    import torch.distributed as dist

    init_local_gloo(rank, world, rendezvous, timeout_s)
    try:
        yield
    finally:
        gc.collect()  # DDP keeps reference cycles: free its reducer before its process group goes
        dist.destroy_process_group()  # the last rank's FileStore to close removes the file
