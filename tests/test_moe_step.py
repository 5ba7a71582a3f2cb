"""The MoE layers' per-step hooks (moe/step.py): one reduction and one bias update per optimizer step."""
import torch

import parallel
from moe.config import MoEConfig
from moe.layer import MoELayer

RATE = float(torch.tensor(0.1))  # the fp32 bias step, as a Python float


class Wrapper(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, bias_update_rate=0.1, **kw))

    def forward(self, x):
        return self.mlp(x)


class SGDSubclass(torch.optim.SGD):
    def step(self, closure=None):  # calls the parent's (separately wrapped) step: hooks fire twice
        return super().step(closure)


def test_bias_moves_once_per_optimizer_step_under_accumulation():
    model = Wrapper().train()
    par = parallel.local(model)
    opt = par.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    par.prepare_optimizer(opt)  # idempotent: still one hook
    for _ in range(3):  # three accumulated micro-batches, then one step
        model(torch.randn(2, 8, 16)).sum().backward()
    opt.step()
    s = par.step_metrics()["layers"][0]
    assert sum(s["tokens_per_expert"]) == 3 * 16 * 2  # the whole step's load, all micro-batches
    bias = model.mlp.router.expert_bias
    assert set(bias.abs().tolist()) <= {0.0, RATE}  # one sign update of size rate, not three
    assert bias.abs().sum() > 0


def test_a_skipped_step_reports_its_statistics_and_keeps_the_bias():
    model = Wrapper().train()
    par = parallel.local(model)
    par.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    model(torch.randn(2, 8, 16))
    s = par.step_metrics()["layers"][0]  # no optimizer.step(): an fp16 overflow skipped it
    assert sum(s["tokens_per_expert"]) == 16 * 2
    assert model.mlp.router.expert_bias.abs().sum() == 0
    model(torch.randn(2, 8, 16))
    assert sum(par.step_metrics()["layers"][0]["tokens_per_expert"]) == 16 * 2  # reset each step


def test_hooks_fire_once_when_an_optimizer_subclass_calls_super_step():
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # SGD.step gets wrapped too
    model = Wrapper().train()
    par = parallel.local(model)
    opt = par.prepare_optimizer(SGDSubclass(model.parameters(), lr=0.0))
    model(torch.randn(2, 8, 16)).sum().backward()
    opt.step()
    s = par.step_metrics()["layers"][0]
    assert sum(s["tokens_per_expert"]) == 16 * 2 and s["aux_loss"] > 0
    assert set(model.mlp.router.expert_bias.abs().tolist()) <= {0.0, RATE}


def test_loss_weight_reaches_every_moe_layer():
    model = Wrapper()
    par = parallel.local(model)
    par.set_loss_weight(0.25)
    assert model.mlp.aux_loss_scale == 0.25
