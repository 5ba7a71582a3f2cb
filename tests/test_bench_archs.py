"""`python -m jobs.bench archs`: the memory instrument, and the --quick sweep's JSON on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from jobs import bench
from cluster.bench.archs import MODELS, LiveBytes, tensor_bytes

TINY = ["--quick", "--preset", "debug", "--seq-lens", "32", "64", "--tokens-per-step", "128", "--window", "16",
        "--gen-context", "32", "--gen-tokens", "3", "--scan-lens", "32", "--repeats", "1", "--cache-lens", "64", "256"]


def test_live_bytes_counts_allocations_frees_and_backward():
    with LiveBytes() as rec:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 1 MiB more
        del a  # freed: live drops, the peak stays
        view = b.view(-1)
        b.add_(1)  # a view and an in-place result are not new memory
        assert (rec.live, rec.peak) == (2**20, 2**21)
        del b, view
        assert rec.live == 0
        w = torch.zeros(64, 64, requires_grad=True)
        before = rec.live
        (torch.ones(8, 64) @ w).sum().backward()
        assert rec.live - before >= w.numel() * 4  # the gradient, allocated in backward, is seen


def test_tensor_bytes_walks_caches_once_per_storage():
    class Cache:
        def __init__(self):
            self.k = torch.zeros(4, 8)
            self.states = [torch.zeros(2), None, (self.k[0], torch.zeros(3))]

    assert tensor_bytes(Cache()) == 4 * (32 + 2 + 3)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "archs.json"
    assert bench.main(["archs", *TINY, "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_quick_sweep_json(quick):
    data, out = quick
    assert set(data) == {"meta", "models", "results", "generation", "scan", "claims", "cache_sizes"}
    assert [m["name"] for m in data["models"]] == list(MODELS)
    params = {m["name"]: m["params"] for m in data["models"]}
    assert all(n > 0 for n in params.values())
    # Equal-parameter variants: attention families differ only in their mixer (no extra weights).
    assert params["local"] == params["dense"] == params["sparse_blockwise"] == params["performer"]
    assert {m["config"]["attn_window"] for m in data["models"] if m["name"] in ("dense", "local")} == {None, 16}
    for name in MODELS:
        for kind in ("train", "forward"):
            rows = {r["seq_len"]: r for r in data["results"] if r["model"] == name and r["kind"] == kind}
            assert sorted(rows) == [32, 64], (name, kind)
            for T, r in rows.items():
                assert r["skipped"] is None
                assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
                assert r["batch"] == (128 // T if kind == "train" else 1)
        fwd = {r["seq_len"]: r["peak_bytes"] for r in data["results"] if r["model"] == name and r["kind"] == "forward"}
        assert fwd[64] > fwd[32], name  # one sequence twice as long holds more activations
    assert [g["model"] for g in data["generation"]] == list(MODELS)
    for g in data["generation"]:
        assert g["context"] == 32 and g["new_tokens"] == 3 and g["ms_per_token"] > 0 and g["cache_bytes"] > 0
    assert sorted(r["impl"] for r in data["scan"]) == ["chunked", "sequential"]
    assert all(r["max_abs_diff"] < 1e-4 for r in data["scan"])  # the two scans compute the same thing
    assert set(data["claims"]) == {"local_window_3x_faster", "sparse_4x_less_memory", "ssm_5x_faster_inference",
                                   "mla_vs_gqa_equal_params"}
    # MLA against GQA at equal parameters (within one SwiGLU unit per layer); its cache holds the
    # latent + RoPE key per token and layer
    assert abs(params["mla"] - params["dense_gqa"]) <= 3 * 32 * 2
    mla_cfg = next(m["config"] for m in data["models"] if m["name"] == "mla")
    caches = {c["model"]: c["sizes"] for c in data["cache_sizes"]}
    assert caches["mla"][0]["bytes_per_token"] == 4 * mla_cfg["n_layers"] * (mla_cfg["kv_lora_rank"] + mla_cfg["qk_rope_head_dim"])
    assert caches["mla"][0]["cache_bytes"] < caches["dense_gqa"][0]["cache_bytes"] < caches["dense"][0]["cache_bytes"]
    assert data["meta"]["memory_method"].startswith("LiveBytes")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_over_budget_length_is_recorded_as_skipped(tmp_path, capsys):
    out = tmp_path / "skip.json"
    args = [*TINY, "--models", "dense", "--gen-tokens", "0", "--scan-lens", "--case-budget-s", "0", "--out", str(out)]
    assert bench.main(["archs", *args]) == 0
    data = json.loads(out.read_text())
    train = {r["seq_len"]: r for r in data["results"] if r["kind"] == "train"}
    assert train[32]["skipped"] is None  # the first length always runs: it is what predicts the next
    assert "--case-budget-s" in train[64]["skipped"] and train[64]["predicted_s"] > 0
    assert data["generation"] == [] and data["scan"] == []
    assert "skip" in capsys.readouterr().out


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit):
        bench.main(["archs", "--tokens-per-step", "0"])
