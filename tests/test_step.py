"""The training step: accumulation, fp16 loss scaling, data-parallel equivalence (gloo, 2 ranks)."""

import numpy as np
import pytest
import torch

import archs
from archs.transformer import PRESETS, TransformerConfig
from cluster.train.precision import DynamicLossScaler
from cluster.train.optim import build_optimizer, build_scheduler, lr_factor
from cluster.train.step import train_step
from cluster.tasks.lm import LanguageModeling
from parallel.data_parallel import apply_data_parallel
from tests import ranks

CPU = torch.device("cpu")


class ArrayLM(LanguageModeling):
    """Language modelling on in-memory token arrays (the loss code under test is the real one)."""

    def __init__(self):  # no dataset on disk needed
        pass


def make_model(seed=0):
    torch.manual_seed(seed)
    return archs.build(TransformerConfig(**PRESETS["debug"], vocab_size=50))


def global_batches(steps, rows=8, T=17, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, size=(rows, T), dtype=np.int64) for _ in range(steps)]


def run_steps(model, batches, micro, rank=0, world=1):
    """Train on this rank's contiguous share of each global batch, split into `micro` rows each.

    Plain SGD, so that weights after several steps compare gradients: Adam divides tiny
    gradients by their own magnitude and would turn float noise into visible weight changes.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = build_scheduler(opt, 1, len(batches), 0.1)
    losses = []
    for gb in batches:
        share = np.array_split(gb, world)[rank]
        mbs = [share[i:i + micro] for i in range(0, len(share), micro)]
        r = train_step(model, ArrayLM(), mbs, opt, DynamicLossScaler(False), "fp32", CPU, grad_clip=1.0)
        sched.step()
        losses.append(r.loss)
    return losses


def test_two_accumulated_half_batches_equal_one_full_batch():
    batches = global_batches(4)
    full, accum = make_model(), make_model()
    l_full = run_steps(full, batches, micro=8)
    l_accum = run_steps(accum, batches, micro=4)
    np.testing.assert_allclose(l_accum, l_full, rtol=1e-6, atol=1e-6)
    for (n, a), (_, b) in zip(full.named_parameters(), accum.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_loss_scaler_skips_overflowing_step_and_backs_off():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = DynamicLossScaler(True, init_scale=1024.0, growth_interval=2)
    loss = scaler.scale_loss((p * torch.tensor([1.0, float("inf"), 1.0])).sum())
    loss.backward()
    assert scaler.unscale_and_check([p]) is True
    scaler.update(True)
    assert scaler.scale == 512.0 and torch.equal(p.detach(), torch.ones(3))  # step skipped
    opt.zero_grad()
    for _ in range(2):  # clean steps: gradient unscaled exactly, scale grows after growth_interval
        scaler.scale_loss(p.sum()).backward()
        assert scaler.unscale_and_check([p]) is False
        torch.testing.assert_close(p.grad, torch.ones(3))
        opt.step()
        opt.zero_grad()
        scaler.update(False)
    assert scaler.scale == 1024.0
    assert DynamicLossScaler(False).scale_loss(torch.tensor(2.0)).item() == 2.0


def test_fp16_step_with_inf_gradient_is_skipped_in_train_step():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95))
    scaler = DynamicLossScaler(True, init_scale=2.0 ** 200)  # overflows fp32 gradients -> inf
    r = train_step(model, ArrayLM(), global_batches(1), opt, scaler, "fp32", CPU, grad_clip=1.0)
    assert r.skipped and scaler.scale == 2.0 ** 199
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def _ddp_worker(rank, world, batches, out):
    model = make_model()
    losses = run_steps(apply_data_parallel(model, CPU), batches, micro=2, rank=rank, world=world)
    if rank == 0:
        torch.save({"losses": losses, "state": model.state_dict()}, out)


@pytest.mark.multiproc
def test_data_parallel_two_ranks_equal_single_process(tmp_path):
    batches = global_batches(4)
    ref_model = make_model()
    ref_losses = run_steps(ref_model, batches, micro=8)
    out = tmp_path / "rank0.pt"
    ranks.run(_ddp_worker, 2, batches, str(out))
    result = torch.load(out, weights_only=True)
    losses, state = result["losses"], result["state"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_autocast_step_tracks_fp32():
    """bf16 is a GPU path; on CPU it is only checked for correctness on a tiny model."""
    batches = global_batches(2, rows=4, T=9)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[precision] = [train_step(model, ArrayLM(), [b], opt, DynamicLossScaler(False), precision, CPU, 1.0).loss
                             for b in batches]
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=2e-2)
