"""Deployment: the MoE inference form, ONNX export + ONNX Runtime parity, loading anywhere."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import archs
from cluster import checkpoint
from cluster.deploy import serving as deploy
from cluster.config.job import model_from_dict
from cluster.deploy.load import load_run
from moe.config import MoEConfig
from moe.export import InferenceMoE, to_inference
from moe.layer import MoELayer
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def runs(trained_runs):
    return trained_runs


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


MOE_DEBUG = {"num_experts": 4, "top_k": 2, "expert_hidden": 32}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("arch", ["performer", "mamba"])
def test_chunked_loop_families_export_in_their_one_chunk_form_with_parity(arch, moe, tmp_path):
    """Performer and Mamba loop over chunks in torch; traced in `export_form` (one [T, T] chunk) the
    graph is dynamic: ONNX Runtime equals the chunked torch forward at other batch sizes and lengths
    than the trace's (2 x 16), over several chunks and with a padded last chunk (chunk_size 16)."""
    torch.manual_seed(0)
    spec = {"arch": arch, "preset": "debug", "vocab_size": 40, **({"moe": MOE_DEBUG} if moe else {})}
    model = archs.build(model_from_dict(spec)).eval()
    assert any(isinstance(m, MoELayer) for m in model.modules()) == moe
    session = deploy.ort_session(deploy.export_onnx(model, tmp_path / "m.onnx"))
    assert not any(getattr(m, "whole_sequence", False) for m in model.modules())  # the model keeps its chunked form
    batches = [torch.randint(0, 40, (3, 23)), torch.randint(0, 40, (1, 50))]
    assert deploy.onnx_parity(session, model, batches) < 1e-4
    assert deploy.ort_logits(session, batches[1]).shape == (1, 50, 40)


def test_performer_one_chunk_form_equals_the_chunked_form():
    """float64: `favor_causal_whole` (export) equals `favor_causal` (training) over 3.5 chunks, with
    logits large enough that the stabilisers matter (exp of them alone overflows float64's range)."""
    from archs.performer import favor_causal, favor_causal_ref, favor_causal_whole

    gen = torch.Generator().manual_seed(0)
    qlog, klog = (torch.randn(2, 3, 56, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    klog = klog + 20 * torch.randn(2, 3, 56, 1, generator=gen, dtype=torch.float64)  # per-position key scale
    v = torch.randn(2, 3, 56, 5, generator=gen, dtype=torch.float64)
    whole = favor_causal_whole(qlog, klog, v)
    torch.testing.assert_close(whole, favor_causal(qlog, klog, v, chunk=16)[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(whole, favor_causal_ref(qlog, klog, v), atol=1e-10, rtol=1e-8)
    huge = klog + 800.0  # exp overflows without the stabiliser; both forms stay finite and equal
    torch.testing.assert_close(favor_causal_whole(qlog, huge, v), favor_causal(qlog, huge, v, chunk=16)[0],
                               atol=1e-12, rtol=1e-10)


def test_mamba_one_chunk_form_equals_the_chunked_form():
    """float64: `selective_scan_whole` (export) equals `selective_scan_chunked` (training) and the
    recurrence over 3.5 chunks, with step sizes whose decays span many orders of magnitude."""
    from archs.mamba import selective_scan_chunked, selective_scan_ref, selective_scan_whole

    gen = torch.Generator().manual_seed(0)
    Bsz, T, H, P, N = 2, 56, 3, 4, 6
    x = torch.randn(Bsz, T, H, P, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(2 * torch.randn(Bsz, T, H, generator=gen, dtype=torch.float64))
    A = -torch.tensor([0.05, 1.0, 12.0], dtype=torch.float64)
    Bm, Cm = (torch.randn(Bsz, T, N, generator=gen, dtype=torch.float64) for _ in range(2))
    whole = selective_scan_whole(x, dt, A, Bm, Cm)
    torch.testing.assert_close(whole, selective_scan_chunked(x, dt, A, Bm, Cm, chunk=16)[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(whole, selective_scan_ref(x, dt, A, Bm, Cm)[0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("arch", ["performer", "mamba"])
def test_export_form_is_a_scoped_switch_with_the_same_model_outputs(arch):
    """Inside `export_form()` the whole model (fp32: the attention / scan run in fp32 in both forms)
    gives the chunked forward's logits; leaving it restores the chunked form; a cached forward
    (generation) inside it still runs chunked / recurrent, equal to the cache-free one."""
    torch.manual_seed(0)
    model = archs.build(model_from_dict({"arch": arch, "preset": "debug", "vocab_size": 40, "moe": MOE_DEBUG})).eval()
    tokens = torch.randint(0, 40, (2, 45))
    with torch.no_grad():
        chunked = model(tokens)
        with model.export_form():
            assert all(m.whole_sequence for m in model.modules() if hasattr(m, "whole_sequence"))
            whole = model(tokens)
            cache = model.new_cache(2, 45)
            cached = torch.cat([model(tokens[:, :30], cache, 0), model(tokens[:, 30:], cache, 30)], dim=1)
    assert not any(getattr(m, "whole_sequence", False) for m in model.modules())
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, chunked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["ts_transformer", "multimodal"])
def test_families_without_a_token_to_logits_forward_are_refused(arch):
    with pytest.raises(ValueError, match=rf"model.arch: '{arch}' cannot be exported to ONNX: it is not a language model"):
        deploy.check_exportable(model_from_dict({"arch": arch, "preset": "debug"}))


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
