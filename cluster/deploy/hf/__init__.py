"""Hugging Face checkpoints in and out: `families.py` maps each family's config and tensor names
(pluggable: `register(HFFamily(...))`), `convert.py` streams the weights both ways."""
from cluster.deploy.hf.convert import export_hf, import_hf, tensor_plan  # noqa: F401
from cluster.deploy.hf.families import FAMILIES, HFConfigError, HFFamily, Names, register, to_raymoe_config  # noqa: F401
