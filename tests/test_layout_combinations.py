"""Layout combinations against the single process (harness: test_parallel_layouts.check_layout:
losses, gradient norms, auxiliary losses, MoE statistics per step, first-step gradients, final
weights): TP x PP together, interleaved 1F1B with MoE, EP with activation checkpointing, and
pipeline micro-batches other than the training ones with capacity dropping."""
import pytest
import torch
import torch.utils.checkpoint

from cluster.train.precision import DynamicLossScaler
from cluster.train.step import train_step
from moe.layer import moe_layers
from parallel.data_parallel import apply_activation_checkpointing
from tests.test_parallel_layouts import _moe_counts, _moe_layout, build, check_layout, moe_cfg, step_data
from tests.test_step import CPU, ArrayLM

CAPACITY = {"capacity_factor": 1.0, "min_capacity": 1}  # drops copies at these tiny batch sizes


@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing_counts_moe_statistics_once(early_stop):
    """Recomputation re-runs each MoE layer in backward: its statistics (tokens per expert, the
    bias update's input) must count the forward once. One process, so the cause is the layer.
    With torch's early stop (the default) recomputation happens to stop before the statistics
    when the MoE layer is the block's last op with saved tensors; without it (or with an op after
    the MoE layer) the layer ran whole twice and counted twice before the fix."""
    cfg = moe_cfg(moe={**CAPACITY, "bias_update_rate": 1e-2})
    data = step_data(1, 2, steps=3)
    runs = []
    for recompute in (False, True):
        model = build(cfg)
        if recompute:
            apply_activation_checkpointing(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            res = [train_step(model, ArrayLM(), data[s][0], opt, DynamicLossScaler(False), "fp32", CPU, 1.0,
                              _moe_layout(cfg)) for s in range(3)]
        runs.append((res, [layer.router.expert_bias.clone() for layer in moe_layers(model)]))
    (plain, plain_bias), (ckpt, ckpt_bias) = runs
    assert sum(_moe_counts(plain[0])[0][:-1]) == 2 * 2 * 16 * 2  # micro-batches x rows x tokens x top-2
    for a, b in zip(plain, ckpt):
        assert _moe_counts(a) == _moe_counts(b)
        assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.aux_loss == pytest.approx(b.aux_loss, abs=1e-7)
    for a, b in zip(plain_bias, ckpt_bias):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.multiproc
def test_tp2_x_pp2_moe_with_capacity_equals_single_process(tmp_path):
    # 4 ranks: pp=2 x tp=2 (dp=1); the dense layer 0 on stage 0, MoE layers 1, 2 split 1 | 2
    cfg = moe_cfg(moe_layers=[1, 2], n_layers=3, moe={**CAPACITY, "aux_loss_coeff": 0.1})
    check_layout(tmp_path, 4, cfg, {"tp": 2, "pp": 2, "schedule": "1f1b"},
                 grad_keys=("layers.0.attn.wq.weight", "layers.1.mlp.router.gate.weight",
                            "layers.2.mlp.experts.w13", "embed.weight", "norm.weight"))


@pytest.mark.multiproc
def test_pp2_interleaved_1f1b_moe_equals_single_process(tmp_path):
    # 4 stages on 2 ranks (layers 0 | 1 | 2 | 3, looped: rank 0 holds 0 and 2), MoE on layers 1 and 2: one on each rank
    cfg = moe_cfg(moe_layers=[1, 2], n_layers=4, moe={**CAPACITY, "aux_loss_coeff": 0.1})
    check_layout(tmp_path, 2, cfg, {"pp": 2, "schedule": "interleaved_1f1b"}, micro=2,
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.2.mlp.experts.w2", "layers.3.attn.wq.weight"))


@pytest.mark.multiproc
def test_ep2_with_activation_checkpointing_equals_single_process(tmp_path):
    # recomputation re-runs the all-to-all in backward; statistics and bias counted once
    cfg = moe_cfg(moe={**CAPACITY, "bias_update_rate": 1e-2})
    check_layout(tmp_path, 2, cfg, {"ep": 2, "activation_checkpointing": True},
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.1.mlp.experts.w13", "layers.0.attn.wq.weight"))


@pytest.mark.multiproc
def test_pipeline_microbatches_other_than_training_ones_with_capacity_dropping(tmp_path):
    # 2 training micro-batches of 2 sequences re-cut into 4 pipeline micro-batches of 1: capacity
    # (and the auxiliary losses) are per pipeline micro-batch, as in the single process on 4.
    cfg = moe_cfg(moe={**CAPACITY, "aux_loss_coeff": 0.1})
    _, _, got = check_layout(tmp_path, 2, cfg, {"pp": 2, "schedule": "1f1b", "microbatches": 4}, micro=2,
                             grad_keys=("layers.1.mlp.router.gate.weight",))
    assert max(layer[-1] for step in got[0]["moe"] for layer in step) > 0  # copies were really dropped
