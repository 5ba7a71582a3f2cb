"""transformers beside raymoe: the one import-time conflict, explained before it bites.

raymoe's grouped-GEMM package is the top-level module `kernels` (kernels/). Hugging Face ships a
distribution of the same import name (`pip install kernels`); transformers >= 5.25 requires it and
imports it while `import transformers` runs, which then finds raymoe's package and fails with
"cannot import name 'CUDAProperties' from 'kernels'". transformers 5.23-5.24 only use it when its
distribution is installed. `import_transformers()` names the cause and the fix instead.
"""
from __future__ import annotations

import importlib.metadata


def hub_kernels_version() -> str | None:
    """The installed version of Hugging Face's `kernels` distribution, or None."""
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_transformers_can_import() -> None:
    """Raise ImportError naming the fix when Hugging Face's `kernels` is installed (it shadows
    raymoe's kernels/ package, or is shadowed by it, at `import transformers`)."""
    version = hub_kernels_version()
    if version is None:
        return
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = "not installed"
    raise ImportError(
        f"Hugging Face's `kernels` {version} is installed (transformers >= 5.25 requires it; this one is {tf}); its import name "
        "`kernels` is raymoe's kernels/ package, so `import transformers` cannot work here. Fix: "
        "pip install 'transformers>=5.23,<5.25' && pip uninstall -y kernels (the versions pyproject.toml's "
        "`dev` extra pins).")


def import_transformers():
    """`import transformers`, after the check above."""
    check_transformers_can_import()
    import transformers

    return transformers
