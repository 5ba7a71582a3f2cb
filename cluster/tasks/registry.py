"""Task registry: `train.task` name -> a Task built from the data and train configs."""
from __future__ import annotations

from cluster.tasks.lm import LanguageModeling, Task


def _distillation(data_cfg, train_cfg, verify) -> Task:
    from cluster.tasks.distill import (
        Distillation,  # loads a teacher model: imported only when used
    )

    return Distillation.from_config(data_cfg, train_cfg, verify)


def _forecasting(data_cfg, train_cfg, verify) -> Task:
    from cluster.tasks.forecast import Forecasting

    return Forecasting(data_cfg.path)


def _image_text(data_cfg, train_cfg, verify) -> Task:
    from cluster.tasks.image_text import ImageText

    return ImageText(data_cfg.path)


# name -> build(data config, train config, verify)
TASKS = {"lm": lambda data_cfg, train_cfg, verify: LanguageModeling.from_config(data_cfg, verify),
         "distill": _distillation, "forecast": _forecasting, "image_text": _image_text}


def build_task(name: str, data_cfg, train_cfg=None, verify: str = "footers") -> Task:
    """`verify`: how much of a token dataset is checked up front (cluster.data.tokens.VERIFY). The
    driver checks it all once ("footers"); each worker passes "listing" (the forecast and
    image-text datasets are read whole, so they ignore it)."""
    if name not in TASKS:
        raise ValueError(f"train.task: unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name](data_cfg, train_cfg, verify)
