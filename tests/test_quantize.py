"""Weight-only int8 / int4 quantization (torchao, CPU): MoE experts per expert, packed save and
exact reload, loss bounds, sizes, seeded generation, the export job."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import archs
from archs.sampling import generate
from cluster.deploy import serving as deploy
from cluster.config.job import model_from_dict
from cluster.deploy.quantize import _pack_int4, _unpack_int4, load_quantized, quantize, quantize_nf4, save_float, save_quantized
from cluster.deploy.load import load_run
from moe.export import InferenceMoE
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def runs(trained_runs):
    return trained_runs


def test_int4_packing_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = _pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(_unpack_int4(packed), q)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_quantized_model_reloads_to_the_same_outputs_and_stays_within_the_loss_bound(runs, name, mode, tmp_path):
    model, _, _ = load_run(runs[name])
    qmodel = copy.deepcopy(model)
    quantize(qmodel, mode)
    path = save_quantized(qmodel, tmp_path / f"{mode}.safetensors", model.cfg)
    reloaded = load_quantized(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), qmodel(tokens))
    batch = deploy.validation_batches(runs[name], 16)  # a fixed batch: the first 16 validation rows
    ppl_fp32 = torch.tensor(deploy.eval_loss(model, batch)).exp()
    ppl_q = torch.tensor(deploy.eval_loss(reloaded, batch)).exp()
    bound = {"int8": 1.02, "int4": 1.10}[mode]
    assert ppl_q <= ppl_fp32 * bound, (float(ppl_fp32), float(ppl_q))
    assert ppl_q != ppl_fp32  # quantization did change the weights


def test_moe_experts_are_quantized_one_by_one(runs):
    from cluster.deploy.quantize import _torchao

    _, Intx = _torchao()
    model, _, _ = load_run(runs["moe"])
    ref = copy.deepcopy(model)
    info = quantize(model, "int4", group_size=16)
    layers = [m for m in model.modules() if isinstance(m, InferenceMoE)]
    assert len(layers) == len(ref.cfg.moe_layer_ids) > 0
    for layer in layers:
        assert not isinstance(layer.gate.weight, Intx)  # routing stays fp32
        for expert in layer.experts:
            for lin in (expert.w13, expert.w2):
                w = lin.weight
                assert isinstance(w, Intx) and w.block_size == (1, 16)
                assert w.scale.shape == (lin.out_features, lin.in_features // 16)  # this expert's own scales
    assert sum(".experts." in q for q in info["quantized"]) == 2 * len(layers) * ref.cfg.moe.num_experts
    # Dequantized expert weights are close to that expert's original weights (not a shared set).
    orig = next(m for m in ref.modules() if type(m).__name__ == "MoELayer").experts.w13.detach()
    for e, expert in enumerate(layers[0].experts):
        err = (expert.w13.weight.dequantize() - orig[e].t()).abs().max()
        assert err <= orig[e].abs().max() / 7 + 1e-6


@pytest.mark.parametrize("arch", ["transformer", "moe_transformer"])
def test_small_models_int4_file_is_at_least_6x_smaller_than_fp32(arch, tmp_path):
    torch.manual_seed(0)
    cfg = model_from_dict({"arch": arch, "preset": "small", "vocab_size": 257})
    model = archs.build(cfg).eval()
    fp32 = save_float(deploy.inference_copy(model, dense=False), tmp_path / "fp32.safetensors", torch.float32)
    bf16 = save_float(deploy.inference_copy(model, dense=False), tmp_path / "bf16.safetensors", torch.bfloat16)
    quantize(model, "int4")
    int4 = save_quantized(model, tmp_path / "int4.safetensors", cfg)
    sizes = {p.stem: p.stat().st_size for p in (fp32, bf16, int4)}
    assert sizes["fp32"] / sizes["int4"] >= 6.0, sizes
    assert sizes["bf16"] / sizes["int4"] >= 3.0, sizes


def test_generation_is_reproducible_with_a_seed(runs):
    model, _, _ = load_run(runs["moe"])
    quantize(model, "int8")
    prompt = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def sample(seed):
        return generate(model, prompt, 16, 0.9, None, 0.95, torch.Generator().manual_seed(seed))

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_a_file_of_another_format_is_refused(tmp_path):
    cfg = model_from_dict({"arch": "transformer", "preset": "debug", "vocab_size": 40})
    path = save_float(archs.build(cfg), tmp_path / "plain.safetensors", torch.float32)
    with pytest.raises(ValueError, match="not a raymoe quantized model"):
        load_quantized(path)
    with pytest.raises(ValueError, match="--quantize: unknown mode 'int3'"):
        quantize(archs.build(cfg), "int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU NF4 runs")
def test_nf4_is_refused_on_cpu_with_the_reason():
    cfg = model_from_dict({"arch": "transformer", "preset": "debug", "vocab_size": 40})
    with pytest.raises(ValueError, match="CUDA GPUs only; use int4"):
        quantize_nf4(archs.build(cfg))


def test_quantize_job_writes_model_and_summary(runs, tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "jobs.export", str(runs["moe"]), "--quantize", "int4", "--out", str(out),
                        "--eval-sequences", "8", "--gen-tokens", "8"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[export] validation loss fp32" in r.stdout
    s = json.loads((out / "summary-int4.json").read_text())
    assert s["reload_max_abs_diff"] == 0.0
    assert set(s["bytes"]) == {"fp32", "bf16", "int4"} and s["ratio_vs_fp32"] > 1
    assert s["ppl_increase_pct"] < 10 and s["generation"]["int4"]["tokens_per_s"] > 0
    assert any(".experts." in q for q in s["quantization"]["quantized"])
    assert (out / "model-int4.safetensors").is_file()
