"""Config loading: YAML + --set overrides, and errors that name the field before any worker starts."""
import subprocess
import sys

import pytest

from cluster.config.job import JobConfig, dump_config, job_from_dict, load_config
from cluster.config.typed import ConfigError, apply_overrides, parse_override


def test_default_config_loads_small_preset():
    cfg = load_config("default")
    assert (cfg.model.d_model, cfg.model.n_layers) == (256, 4)
    assert cfg.cluster.num_workers == 2
    assert cfg.accumulation_steps == cfg.train.global_batch_size // (cfg.train.micro_batch_size * 2)


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config("debug", ["train.steps=7", "train.lr=1e-3", "model.attn_window=16",
                                "cluster.run_name=abc", "train.grad_clip=null", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.model.attn_window == 16
    assert cfg.cluster.run_name == "abc" and cfg.train.grad_clip is None and cfg.train.betas == (0.8, 0.9)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config("debug", ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 2.5"):
        load_config("debug", ["train.steps=2.5"])


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", r"unknown config key 'train.learning_rate'"),
    ("model.d_modle=64", r"unknown config key 'model.d_modle'; did you mean 'd_model'"),
    ("optimizer.lr=1", r"unknown config key 'optimizer'; valid keys here: model, train"),
    ("train.lr=fast", r"train.lr: expected a number, got 'fast'"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    ("model.n_heads=3", r"model.n_heads: 3 does not divide d_model=32"),
    ("model.preset=huge", r"model.preset: unknown preset 'huge'.*debug, small"),
    ("model.arch=nope", r"model.arch: unknown architecture 'nope'"),
    ("train.global_batch_size=6", r"train.global_batch_size: 6 is not divisible by micro_batch_size x workers = 2 x 2"),
    ("train.warmup_steps=100", r"train.warmup_steps: 100 exceeds steps=6"),
    ("train.precision=fp16", r"train.precision: fp16 needs GPUs"),
    ("cluster.num_workers=0", r"cluster.num_workers: must be >= 1"),
    ("cluster.run_name=../x", r"cluster.run_name: '../x' must be a plain directory name"),
    ("train.stop_at_step=99", r"train.stop_at_step: must be in \[1, steps=6\]"),
    ("parallel.dp=3", r"parallel.dp: 3 != cluster.num_workers=2"),
    ("train", r"expected section.key=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug", [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load refuses python tags
        load_config(str(unsafe))


def test_dump_round_trips():
    cfg = load_config("debug", ["model.attn_window=8"])
    import yaml
    again = job_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_train_cli_rejects_before_starting_workers():
    # No Ray is started: the error comes from config validation, exit code 2.
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "debug", "--set", "train.lr=oops"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "config error: train.lr: expected a number, got 'oops'" in r.stderr


def test_train_cli_print_config():
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "debug", "--print-config",
                        "--set", "train.steps=3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "steps: 3" in r.stdout


def test_job_config_default_is_valid():
    assert JobConfig().model.arch == "transformer"


def test_expert_parallel_layout_is_checked_at_every_elastic_size():
    base = ["cluster.num_workers=2", "train.global_batch_size=4", "train.micro_batch_size=1"]
    assert load_config("moe_debug", base + ["parallel.ep=2"]).parallel_dims().ep == 2
    with pytest.raises(ConfigError, match=r"parallel.ep: 2 does not divide the data-parallel size 1.*"
                                          r"at 1 workers of the elastic range 1..2"):
        load_config("moe_debug", base + ["parallel.ep=2", "cluster.min_workers=1"])
    cfg = load_config("moe_debug", base + ["parallel.ep=auto", "cluster.min_workers=1"])
    assert [cfg.parallel_dims(w).ep for w in cfg.world_sizes] == [1, 2]  # the policy fits each size
    with pytest.raises(ConfigError, match=r"parallel.ep: 3 does not divide model.moe.num_experts=4"):
        load_config("moe_debug", ["cluster.num_workers=3", "train.global_batch_size=6", "parallel.ep=3"])
    with pytest.raises(ConfigError, match=r"parallel.ep: 2 needs a model with MoE layers"):
        load_config("debug", ["parallel.ep=2"])
