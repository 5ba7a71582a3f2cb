"""The caching malloc settings (cluster/train/malloc.py) take effect: a freed large block is reused
without being faulted in again. glibc takes its settings from the environment without a word on
what it accepted, so the test counts the page faults of a child process started with them."""
import json
import os
import subprocess
import sys

from cluster.train.malloc import CACHING_MALLOC_ENV

CHILD = r"""
import json, resource, torch
a = torch.ones(16, 2 ** 20)  # 64 MiB of fp32, above glibc's largest mmap threshold
faults = []
for _ in range(16):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = a * 2  # a new 64 MiB block, freed below
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    del b
print(json.dumps(faults))
"""
PAGES = 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")


def _faults(env: dict) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout)


def test_a_freed_large_block_is_reused_without_page_faults():
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    system = _faults(base)
    caching = _faults({**base, **CACHING_MALLOC_ENV})
    # glibc's default maps every such block afresh: each product faults in all its pages.
    assert sum(system[8:]) >= 7 * PAGES, (system, PAGES)
    # With the settings the blocks come from the heap: once the heap has grown (the first few
    # products), a new block lands on pages touched before (seen here: at most one in eight re-faults).
    assert sum(caching[8:]) <= 3 * PAGES, (caching, PAGES)
