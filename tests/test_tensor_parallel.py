"""Tensor parallelism on spawned gloo ranks against the single process (harness: test_parallel_layouts)."""
import pytest

from tests.test_parallel_layouts import check_checkpoint_to_single_process, check_layout, dense_cfg, moe_cfg

pytestmark = pytest.mark.multiproc


def test_tp2_dense_equals_single_process(tmp_path):
    check_layout(tmp_path, 2, dense_cfg(n_kv_heads=2), {"tp": 2},
                 grad_keys=("layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.1.mlp.w2.weight",
                            "layers.1.attn_norm.weight", "embed.weight"))


def test_tp2_moe_splits_tokens_and_equals_single_process(tmp_path):
    # capacity dropping + bias balancing: the routing decisions must be those of the whole batch
    cfg = moe_cfg(moe={"capacity_factor": 0.75, "min_capacity": 1, "bias_update_rate": 1e-3})
    check_layout(tmp_path, 2, cfg, {"tp": 2}, grad_keys=("layers.1.mlp.router.gate.weight", "layers.1.mlp.experts.w13"))


def test_checkpoint_written_at_tp2_loads_in_one_process(tmp_path):
    # MoE: experts and router (plain tensors) share AdamW groups with sharded DTensors
    check_checkpoint_to_single_process(tmp_path, moe_cfg(moe={"capacity_factor": 1.0}), {"tp": 2})
