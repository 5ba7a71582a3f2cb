"""Pipeline parallelism on spawned gloo ranks against the single process (harness: test_parallel_layouts)."""
import numpy as np
import pytest

from tests.test_parallel_layouts import (check_checkpoint_to_single_process, check_layout, dense_cfg, moe_cfg,
                                         reference, step_data)

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp2_dense_equals_single_process(tmp_path, schedule):
    # 4 micro-batches over 2 stages: warm-up, steady state and cool-down all happen; tied embedding
    check_layout(tmp_path, 2, dense_cfg(n_layers=3), {"pp": 2, "schedule": schedule}, micro=4,
                 grad_keys=("embed.weight", "layers.0.attn.wq.weight", "layers.2.mlp.w1.weight", "norm.weight"))


def test_pp2_interleaved_with_explicit_split_and_untied_head(tmp_path):
    # 4 stages on 2 ranks (0, 2 | 1, 3), cut 2 + 1 + 1 + 1 by pp_split; 2 micro-batches re-split into 4
    check_layout(tmp_path, 2, dense_cfg(n_layers=5, tie_embeddings=False),
                 {"pp": 2, "schedule": "interleaved_1f1b", "pp_split": [2, 3, 4], "microbatches": 4},
                 grad_keys=("head.weight", "layers.4.mlp.w2.weight", "layers.1.attn.wo.weight"))


def test_pp2_moe_aux_loss_crosses_stages_from_a_stage_without_moe_layers(tmp_path):
    """Stage 0 holds the dense layer 0, stage 1 the MoE layer 1. The router's gradient equals the
    single process only if the auxiliary losses reached backward; the statistics reduction has a
    fixed shape, so the stage without MoE layers does not hang it."""
    cfg = moe_cfg(moe={"aux_loss_coeff": 0.5, "z_loss_coeff": 0.05, "capacity_factor": 1.0, "min_capacity": 1})
    key = "layers.1.mlp.router.gate.weight"
    _, ref_opt, got = check_layout(tmp_path, 2, cfg, {"pp": 2, "schedule": "1f1b"}, micro=2, grad_keys=(key,))
    # the auxiliary losses matter for this gradient: without them it is measurably different
    no_aux = moe_cfg(moe={"aux_loss_coeff": 0.0, "z_loss_coeff": 0.0, "capacity_factor": 1.0, "min_capacity": 1})
    _, opt_no_aux, _ = reference(no_aux, step_data(1, 2), steps=1)
    assert (ref_opt.first_grads[key] - opt_no_aux.first_grads[key]).abs().max() > 1e-3
    assert key not in got[0]["grads"] and key in got[1]["grads"]


def test_checkpoint_written_at_pp2_loads_in_one_process(tmp_path):
    # MoE layer on stage 1 only, tied embedding on both stages: DCP keeps one copy of each key
    check_checkpoint_to_single_process(tmp_path, moe_cfg(moe={"capacity_factor": 1.0}), {"pp": 2, "schedule": "gpipe"})


@pytest.mark.ray
def test_pp2_job_on_ray_train_follows_the_one_worker_run(ray_cluster, tiny_data, tmp_path):
    """`parallel.pp=2` from the job config, run by Ray Train on 2 workers: the same per-step losses
    and validation losses as the same job on 1 worker, and a checkpoint the one-process tools read."""
    import archs
    from cluster import checkpoint
    from cluster.config.job import load_config
    from cluster.train.driver import fit, read_metrics, step_losses

    def job(name, *extra):
        return load_config("debug", [f"data.path={tiny_data}", "data.builtin=null", f"cluster.storage_path={tmp_path}",
                                     f"cluster.run_name={name}", "train.steps=4", "train.warmup_steps=1",
                                     "train.eval_interval=2", "train.checkpoint_interval=4", "metrics.prometheus=false",
                                     *extra])

    fit(job("pp2", "parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"))
    fit(job("one", "cluster.num_workers=1"))
    runs = {name: read_metrics(tmp_path / name) for name in ("pp2", "one")}
    pp2, one = (step_losses(runs[n]) for n in ("pp2", "one"))
    assert sorted(pp2) == [1, 2, 3, 4]
    np.testing.assert_allclose([pp2[s] for s in sorted(pp2)], [one[s] for s in sorted(one)], rtol=0, atol=1e-4)
    vals = {n: [r["val_loss"] for r in runs[n] if "val_loss" in r] for n in runs}
    np.testing.assert_allclose(vals["pp2"], vals["one"], rtol=0, atol=1e-4)
    start = next(r for r in runs["pp2"] if r.get("event") == "launch_start")
    assert (start["layout"]["pp"], start["layout"]["dp"], start["layout"]["tp"]) == (2, 1, 1)
    ckpt = checkpoint.latest_complete(tmp_path / "pp2")
    cfg = checkpoint.read_meta(ckpt)["model"]
    model_cfg = load_config("debug", [f"model.vocab_size={cfg['vocab_size']}"]).model
    checkpoint.load_model_weights(ckpt, archs.build(model_cfg), model_cfg)  # every key of both stages is there
