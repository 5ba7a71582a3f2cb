"""Deployment: the MoE inference form, ONNX export + ONNX Runtime parity, loading anywhere."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import archs
from cluster import checkpoint, deploy
from cluster.config import load_config, model_from_dict
from jobs.bench_deploy import train_local
from jobs.generate import load_run
from moe.config import MoEConfig
from moe.export import InferenceMoE, to_inference
from moe.layer import MoELayer
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """A dense and an MoE debug model, each trained 40 steps in-process and checkpointed as a run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, config in (("dense", "debug"), ("moe", "moe_debug")):
        job = load_config(config, ["train.steps=40", f"data.path={tiny_data}", "train.eval_interval=0",
                                   "cluster.num_workers=1"])
        out[name] = train_local(job, root / name, log_every=1000)
    return out


@pytest.mark.parametrize("moe", [
    dict(),
    dict(top_k=1, renormalize=False),
    dict(score_func="sigmoid"),
    dict(num_experts=8, num_groups=4, group_topk=2),
    dict(bias_update_rate=0.01),
    dict(shared_expert_hidden=16),
], ids=["softmax-top2", "top1", "sigmoid", "group-limited", "bias", "shared"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_inference_moe_equals_the_training_layer_in_evaluation(moe, dense):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 24, "capacity_factor": 1.0, **moe})
    layer = MoELayer(32, cfg)
    layer.init_weights(0.1, 0.1)
    if cfg.bias_update_rate:
        layer.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.05)
    x = torch.randn(3, 10, 32)
    ref = layer.eval()(x)  # evaluation is dropless even with a capacity factor set
    got = InferenceMoE.from_layer(layer, dense=dense).eval()(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_expert_choice_routing_is_refused_for_inference():
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, router="expert_choice", capacity_factor=1.0))
    with pytest.raises(ValueError, match="training only"):
        InferenceMoE.from_layer(layer)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_onnx_runtime_matches_torch_on_held_out_batches(runs, name, tmp_path):
    model, _, _ = load_run(runs[name])
    session = deploy.ort_session(deploy.export_onnx(model, tmp_path / "m.onnx"))
    val = deploy.validation_batches(runs[name], 16, micro_batch=4)
    # Other batch sizes and lengths than the trace's example (2 x 16): the graph is dynamic.
    batches = [torch.from_numpy(b[:n, :-1][:, :T]).long() for b, n, T in zip(val, (4, 1, 3, 2), (64, 7, 33, 64))]
    assert deploy.onnx_parity(session, model, batches) < 1e-4
    logits = deploy.ort_logits(session, batches[0])
    assert logits.shape == (4, 64, model.cfg.vocab_size)


@pytest.mark.parametrize("arch", ["hourglass", "sparse_transformer"])
def test_other_attention_families_export_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    model = archs.build(model_from_dict({"arch": arch, "preset": "debug", "vocab_size": 40})).eval()
    session = deploy.ort_session(deploy.export_onnx(model, tmp_path / "m.onnx"))
    batches = [torch.randint(0, 40, (2, 64)), torch.randint(0, 40, (1, 24))]
    assert deploy.onnx_parity(session, model, batches) < 1e-4


@pytest.mark.parametrize("arch", ["performer", "mamba"])
def test_families_with_a_python_loop_over_chunks_are_refused(arch, tmp_path):
    model = archs.build(model_from_dict({"arch": arch, "preset": "debug", "vocab_size": 40}))
    with pytest.raises(ValueError, match=rf"{arch}.*cannot be exported to ONNX.*Python loop"):
        deploy.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_job_writes_model_and_summary(runs, tmp_path):
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "jobs.export", str(runs["moe"]), "--format", "onnx", "--out", str(out),
                        "--seq-lens", "16,64", "--eval-sequences", "8"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[export] ONNX Runtime vs torch" in r.stdout and (out / "model.onnx").is_file()
    summary = json.loads((out / "summary-onnx.json").read_text())
    assert summary["max_abs_diff"] < 1e-4 and summary["arch"] == "moe_transformer"
    assert [row["seq_len"] for row in summary["latency"]] == [16, 64]
    assert all(row["torch_ms"] > 0 and row["ort_ms"] > 0 for row in summary["latency"])


def test_export_job_help_and_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.export", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "usage: python -m jobs.export" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jobs.export", str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and "exactly one of --format onnx or --quantize" in r.stderr


def test_checkpoint_of_another_architecture_is_refused(runs, tiny_data, tmp_path):
    dense_cfg = load_run(runs["dense"])[0].cfg
    with pytest.raises(checkpoint.CheckpointError, match="different model.*arch: checkpoint 'moe_transformer' vs config 'transformer'"):
        load_run(runs["moe"], model_cfg=dense_cfg)
    config = tmp_path / "dense.yaml"
    config.write_text(f"model: {{arch: transformer, preset: debug}}\ndata: {{path: {tiny_data}}}\n")
    r = subprocess.run([sys.executable, "-m", "jobs.export", str(runs["moe"]), "--format", "onnx", "--config", str(config),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "different model" in r.stderr and "arch" in r.stderr


def test_big_model_loading_with_disk_offload_under_a_memory_limit(runs, tmp_path):
    """accelerate: empty-weight construction, the checkpoint streamed to safetensors, blocks past the
    budget offloaded to disk; the budget is half the model, the outputs are the full model's."""
    from archs.sampling import generate

    full, _, _ = load_run(runs["moe"])
    size = deploy.model_bytes(full)
    limit = size // 2
    model, _, _ = load_run(runs["moe"], max_memory_bytes=limit, offload_dir=tmp_path / "offload")
    assert "disk" in model.device_map.values()
    assert deploy.resident_bytes(model) <= limit < size
    tokens = torch.randint(0, full.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), full(tokens), atol=1e-6, rtol=1e-6)
    runs_out = [generate(m, tokens[:, :6], 12, 0.8, None, 0.95, torch.Generator().manual_seed(1)) for m in (full, model)]
    assert torch.equal(*runs_out)
    assert deploy.resident_bytes(model) <= limit  # still offloaded after use


def test_to_inference_keeps_every_weight(runs):
    model, _, _ = load_run(runs["moe"])
    inference = to_inference(copy.deepcopy(model))
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in inference.parameters()) == n
    assert not any(isinstance(m, MoELayer) for m in inference.modules())
