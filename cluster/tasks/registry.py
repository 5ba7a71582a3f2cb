"""Task registry: `train.task` name -> a Task built from the data and train configs."""
from __future__ import annotations

from cluster.tasks.lm import LanguageModeling, Task


def _distillation(data_cfg, train_cfg) -> Task:
    from cluster.tasks.distill import (
        Distillation,  # loads a teacher model: imported only when used
    )

    return Distillation.from_config(data_cfg, train_cfg)


def _forecasting(data_cfg, train_cfg) -> Task:
    from cluster.tasks.forecast import Forecasting

    return Forecasting(data_cfg.path)


def _image_text(data_cfg, train_cfg) -> Task:
    from cluster.tasks.image_text import ImageText

    return ImageText(data_cfg.path)


# name -> build(data config, train config)
TASKS = {"lm": lambda data_cfg, train_cfg: LanguageModeling.from_config(data_cfg), "distill": _distillation,
         "forecast": _forecasting, "image_text": _image_text}


def build_task(name: str, data_cfg, train_cfg=None) -> Task:
    if name not in TASKS:
        raise ValueError(f"train.task: unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name](data_cfg, train_cfg)
