"""Spawned-rank workers of tests/test_deepseek.py, in a module that does not import transformers
(each spawned process imports the module of its function; transformers would add seconds to each)."""
import torch

from cluster.deploy.hf_deepseek import load_hf_deepseek


def import_train_worker(rank, world, hf_dir, data, out):
    import parallel
    from cluster.train.precision import DynamicLossScaler
    from cluster.train.step import train_step
    from moe.layer import moe_layers
    from parallel.mesh import ParallelDims, build_groups
    from tests.test_step import CPU, ArrayLM

    model = load_hf_deepseek(hf_dir, log=lambda _: None).train()
    cfg = model.cfg
    cfg.moe.bias_update_rate = 1e-2  # balancing moves the imported correction bias too
    dims = ParallelDims.build(world, 2, cfg.moe.num_experts, model_cfg=cfg)
    par = parallel.apply(model, build_groups(dims, rank), CPU)
    opt = torch.optim.SGD(par.model.parameters(), lr=0.2)
    for s in range(3):
        train_step(par, ArrayLM(), data[s][dims.coords(rank)[1]], opt, DynamicLossScaler(False), "fp32", CPU, 1.0,
                   (cfg.moe_layer_ids, cfg.moe.num_experts))
    torch.save({"state": {k: v.detach() for k, v in par.model.state_dict().items()},
                "offset": moe_layers(par.model)[0].experts.expert_offset}, f"{out}/rank{rank}.pt")
