"""Model families. Each is a plain `nn.Module` built from its own config dataclass.

`archs.build(cfg)` looks the family up by `cfg.arch` in a small registry (`archs/registry.py`).
Each family also registers named presets (`debug` for tests, `small` for the default job) that
the job config resolves before user keys override them. Nothing here imports Ray,
`torch.distributed`, `parallel/` or `cluster/`.
"""
# Importing a family module registers it.
from archs import (  # noqa: F401
    deepseek,
    forecast,
    hourglass,
    mamba,
    moe_transformer,
    multimodal,
    performer,
    sparse_attention,
    transformer,
)
from archs.registry import Family, build, family, register  # noqa: F401
