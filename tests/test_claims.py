"""The claims report (cluster/bench/claims.py): its fitting helpers on synthetic data of known
exponents, and the generator on small JSON fixtures that take every verdict path."""
import json

import numpy as np
import pytest

from cluster.bench import claims as C


# ------------------------------------------------------------------------------------- fitting

@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_power_law_fit_recovers_a_known_exponent(p):
    x = np.array([256, 512, 1024, 2048, 4096])
    f = C.fit_power_law(x, 3e-4 * x ** p)
    assert f.exponent == pytest.approx(p, abs=1e-9) and f.prefactor == pytest.approx(3e-4) and f.r2 == pytest.approx(1)


def test_power_law_fit_with_an_offset_recovers_the_scaling_part():
    """A constant part (weights, logits) bends a plain log-log fit; the offset fit sees through it."""
    n = np.array([2, 4, 8, 16, 32])
    y = 5e6 + 1e6 * n ** 0.5
    assert C.fit_power_law(n, y).exponent < 0.3  # the plain fit is misled
    f = C.fit_power_law_offset(n, y)
    assert f.exponent == pytest.approx(0.5, abs=0.01) and f.offset == pytest.approx(5e6, rel=0.02)
    rng = np.random.default_rng(0)
    noisy = (2e5 + 3e4 * n ** 1.0) * (1 + 0.01 * rng.standard_normal(n.size))
    assert C.fit_power_law_offset(n, noisy).exponent == pytest.approx(1.0, abs=0.1)


def test_exponent_spread_over_repeats():
    x = [1024, 2048, 4096, 8192]
    repeats = [[t ** 1.0, 1.1 * t ** 1.0, t ** 1.0] for t in x]  # 3 repeats, all linear
    s = C.exponent_spread(x, repeats)
    assert s["runs"] == 3 and s["median"] == pytest.approx(1.0) and s["min"] == pytest.approx(1.0)


def test_fits_refuse_too_few_or_bad_points():
    with pytest.raises(ValueError, match="positive"):
        C.fit_power_law([1, 2], [1, -1])
    with pytest.raises(ValueError, match=">= 3 points"):
        C.fit_power_law_offset([1, 2], [1, 2])


# ------------------------------------------------------------------------------------ fixtures

def archs_fixture(local_speedups: dict, hourglass_cut: float) -> dict:
    """dense/local/hourglass/sparse forward+train rows with the given local speed-ups per T."""
    results = []
    for T, s in local_speedups.items():
        for kind in ("forward", "train"):
            dense = dict(seq_len=T, kind=kind, seconds=1.0, tokens_per_s=100.0, peak_bytes=1000)
            results += [dict(model="dense", **dense),
                        dict(model="local", **{**dense, "seconds": 1.0 / s, "tokens_per_s": 100.0 * s}),
                        dict(model="hourglass", **{**dense, "peak_bytes": int(1000 * (1 - hourglass_cut))})]
    Tmax = max(local_speedups)
    return {"meta": dict(quick=True, preset="small", threads=2, tokens_per_step=8192, repeats=1, seq_lens=list(local_speedups),
                         forward_only_lens=[], loadavg_start=[1.0], loadavg_end=[1.0], window=256),
            "results": results,
            "claims": {"local_window_3x_faster": dict(seq_len=Tmax, train_speedup=local_speedups[Tmax],
                                                      forward_speedup=local_speedups[Tmax], forward_seq_len=Tmax),
                       "sparse_4x_less_memory": dict(seq_len=Tmax, forward_memory_ratio={"sparse_blockwise": 0.7},
                                                     train_memory_ratio={"sparse_blockwise": 0.8}),
                       "ssm_5x_faster_inference": dict(context=4096, per_token_speedup=0.9, cache_ratio=30.0,
                                                       forward_speedup_longest=2.4)}}


def seed_fixture(ckpt_exponents=(1.0, 1.0, 0.5), moe_flops=(0.3, 1.0), perf_p=1.0) -> dict:
    depths = [2, 4, 8, 16]
    rows = [dict(depth=n, segment=max(1, round(n ** 0.5)), grad_bytes=0,
                 **{m: 1e6 + 2e5 * n ** p for m, p in zip(("none", "per_block", "sqrt_segments"), ckpt_exponents)})
            for n in depths]
    lens = [1024, 2048, 4096, 8192]
    perf = [dict(model=m, seq_len=T, seconds=[1e-6 * T ** q] * 2, seconds_median=1e-6 * T ** q, peak_bytes=int(1e3 * T ** q))
            for m, q in (("performer", perf_p), ("dense", 2.0)) for T in lens]
    moe_total, moe_active = moe_flops
    models = {"moe_top2": dict(parameters=100, forward_flops_per_token=30.0, seconds=[0.3, 0.31, 0.29]),
              "dense_equal_total_params": dict(parameters=100, forward_flops_per_token=30.0 / moe_total,
                                               seconds=[0.3 / moe_total] * 3),
              "dense_equal_active_flops": dict(parameters=40, forward_flops_per_token=30.0 / moe_active,
                                               seconds=[0.3 / moe_active] * 3)}
    return {"meta": dict(quick=True, threads=2, loadavg_start=[1.0], loadavg_end=[1.0]),
            "moe_compute": dict(seq_len=256, batch=4, repeats=3, experts=8, top_k=2, expert_hidden=352,
                                models=models, backend="loop"),
            "checkpointing": dict(seq_len=128, batch=4, d_model=128, rows=rows, method="synthetic"),
            "performer": dict(batch=1, repeats=2, rows=perf),
            "mixed_precision": dict(model="debug", batch="8 x 32", steps=3,
                                    runs={p: dict(losses=[3.9, 3.8, 3.7 + d]) for p, d in
                                          (("fp32", 0.0), ("bf16", 0.001), ("fp16", 0.0))})}


def verdicts(inputs, tmp_path) -> dict[str, str]:
    full = {k: None for k in C.DEFAULT_INPUTS} | inputs
    return {claim.key: r.verdict for claim, r in C.evaluate(full, None)}  # no PNGs: verdicts only


def test_every_verdict_path(tmp_path):
    # holds: local window >= 3x at every length; conditional: only at the longest; fails: never
    v = verdicts({"archs": archs_fixture({512: 3.5, 8192: 4.0}, 0.5)}, tmp_path)
    assert v["local_window"] == C.HOLDS and v["hierarchical_memory"] == C.HOLDS
    v = verdicts({"archs": archs_fixture({512: 1.1, 8192: 3.6}, 0.2)}, tmp_path)
    assert v["local_window"] == C.CONDITIONAL and v["hierarchical_memory"] == C.FAILS
    assert v["sparse_memory"] == C.FAILS and v["ssm_speed"] == C.FAILS
    # cannot be measured here: no code-generation benchmark; mixed-precision speed without a GPU figure
    assert v["hierarchical_codegen"] == C.UNMEASURABLE
    # no figure yet: the inputs are absent
    assert v["rnn_hybrid_mae"] == C.MISSING and v["int4_size"] == C.MISSING and v["moe_top2_compute"] == C.MISSING

    v = verdicts({"seed": seed_fixture()}, tmp_path)
    assert v["checkpointing_sqrt"] == C.CONDITIONAL  # O(sqrt n) with sqrt segments only
    assert v["moe_top2_compute"] == C.CONDITIONAL  # -70% vs equal total params, 0% vs equal active FLOPs
    assert v["performer_linear"] == C.HOLDS and v["mixed_precision"] == C.UNMEASURABLE
    v = verdicts({"seed": seed_fixture(ckpt_exponents=(1.0, 0.5, 0.5), moe_flops=(0.3, 0.3), perf_p=1.6)}, tmp_path)
    assert v["checkpointing_sqrt"] == C.HOLDS and v["moe_top2_compute"] == C.HOLDS and v["performer_linear"] == C.FAILS
    v = verdicts({"seed": seed_fixture(ckpt_exponents=(1.0, 1.0, 1.0), moe_flops=(0.8, 1.0)),
                  "gpu": {"mixed_precision_speedup": 2.4, "device": "H200"}}, tmp_path)
    assert v["checkpointing_sqrt"] == C.FAILS and v["moe_top2_compute"] == C.FAILS and v["mixed_precision"] == C.HOLDS


def test_a_json_without_the_claims_figures_says_which_command_makes_them(tmp_path):
    res = dict((c.key, r) for c, r in C.evaluate({"archs": {"meta": {}, "results": [], "claims": {}}}, None))
    assert res["local_window"].verdict == C.MISSING and res["hierarchical_memory"].verdict == C.MISSING
    assert "jobs.bench claims --measure" in res["checkpointing_sqrt"].detail[0]


def test_the_report_from_json_files_on_disk(tmp_path):
    tasks = {"forecast": [{"model": "rnn_transformer", "params": 121240, "mae_ppm": {"mean": 5.2, "std": 0.2}},
                          {"model": "ts_transformer", "params": 120792, "mae_ppm": {"mean": 5.5, "std": 0.2}}],
             "fusion": [{"variant": "dual_tower", "match_acc": {"mean": 0.93, "std": 0.01}},
                        {"variant": "cross_attention", "match_acc": {"mean": 0.30, "std": 0.01}}],
             "claims": {"hybrid_mae_change_vs_plain": 5.2 / 5.5 - 1, "cross_attention_match_acc_change_vs_dual_tower": -0.63},
             "settings": {"seeds": 3, "forecast_steps": 300, "fusion_steps": 200, "batch": 32, "threads": 1}}
    # The deploy benchmark names each model by "arch": both rows must reach the report.
    deploy = {"train_steps": 60, "models": [{"arch": "transformer", "ratio_vs_fp32": {"int4": 6.1},
                                             "val_ppl": {"fp32": 5.0, "int4": 5.2}},
                                            {"arch": "moe_transformer", "ratio_vs_fp32": {"int4": 6.7},
                                             "val_ppl": {"fp32": 6.0, "int4": 6.1}}]}
    files = {"archs": archs_fixture({512: 1.1, 8192: 3.6}, 0.2), "tasks": tasks, "deploy": deploy, "seed": seed_fixture()}
    args = []
    for key, data in files.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(data))
        args += [f"--{key}", str(tmp_path / f"{key}.json")]
    out = tmp_path / "docs" / "claims.md"
    assert C.main(args + ["--gpu", str(tmp_path / "absent.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("\n## ") == len(C.CLAIMS) and "分层注意力架构可将内存占用降低40%" in text
    assert "| [rnn_hybrid_mae]" in text and "MAE -5.5%" in text and "**does not hold**" in text
    assert "transformer 6.10x smaller than fp32, moe_transformer 6.70x smaller" in text
    assert (tmp_path / "docs" / "claims" / "claims_checkpointing.png").stat().st_size > 1000
    assert "](claims/claims_performer_time.png)" in text and "absent" in text
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not valid JSON"):
        C.main(["--archs", str(tmp_path / "bad.json"), "--out", str(out)])
