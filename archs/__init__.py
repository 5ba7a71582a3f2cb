"""Model families. Each is a plain `nn.Module` built from its own config dataclass.

`archs.build(cfg)` looks the family up by `cfg.arch` in a small registry. Each family also
registers named presets (`debug` for tests, `small` for the default job) that the job config
resolves before user keys override them. Nothing here imports Ray, `torch.distributed`,
`parallel/` or `cluster/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    config_cls: type
    build: Callable[[Any], nn.Module]
    presets: dict[str, dict]


_REGISTRY: dict[str, Family] = {}
# Modules whose import registers a family. Imported on first lookup, not at package import, so
# that `moe/` can use `archs.common` without a cycle (the MoE transformer imports `moe`).
_FAMILY_MODULES = ("archs.transformer", "archs.moe_transformer", "archs.hourglass", "archs.sparse_attention",
                   "archs.performer", "archs.mamba", "archs.forecast", "archs.multimodal")


def _load_families() -> None:
    import importlib

    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def register(name: str, config_cls: type, build: Callable[[Any], nn.Module], presets: dict[str, dict]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"architecture {name!r} registered twice")
    _REGISTRY[name] = Family(config_cls, build, presets)


def family(name: str) -> Family:
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"model.arch: unknown architecture {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(cfg: Any) -> nn.Module:
    """Build the plain (single-device, unsharded) model for config `cfg`."""
    return family(cfg.arch).build(cfg)

