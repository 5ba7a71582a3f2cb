"""The family registry: `register(name, config class, build, presets)` by each family module."""
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


def register(name: str, config_cls: type, build: Callable[[Any], nn.Module], presets: dict[str, dict]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"architecture {name!r} registered twice")
    _REGISTRY[name] = Family(config_cls, build, presets)


def family(name: str) -> Family:
    if name not in _REGISTRY:
        raise ValueError(f"model.arch: unknown architecture {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(cfg: Any) -> nn.Module:
    """Build the plain (single-device, unsharded) model for config `cfg`."""
    return family(cfg.arch).build(cfg)
