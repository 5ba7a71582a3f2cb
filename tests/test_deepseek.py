"""DeepSeek-V3 (archs/deepseek.py, cluster/deploy/hf_deepseek.py) against transformers 5's
DeepseekV3 on tiny random models: logits, cached greedy generation, routing, export layout, FP8
import; MLA's cache size; TP / PP / EP against the single process."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter  # noqa: E402

import archs  # noqa: E402
from archs.common import KVCache  # noqa: E402
from archs.deepseek import PRESETS, DeepSeekV3, DeepSeekV3Config  # noqa: E402
from archs.sampling import generate  # noqa: E402
from cluster.deploy.hf_deepseek import (HFConfigError, config_from_hf, load_hf_deepseek,  # noqa: E402
                                        save_hf_deepseek)
from moe.config import MoEConfig  # noqa: E402
from moe.layer import MoELayer  # noqa: E402
from moe.router import TopKRouter  # noqa: E402

VOCAB = 97
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=1.0)


def hf_config(**kw) -> DeepseekV3Config:
    """Tiny, with the published model's options on: q_lora_rank, YaRN, 4 groups (2 kept), one dense
    layer first, a shared expert, routed scaling 2.5, interleaved RoPE weights."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
                qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                max_position_embeddings=128, initializer_range=0.2, rope_parameters=YARN, num_nextn_predict_layers=0)
    return DeepseekV3Config(**{**base, **kw})


def hf_model(seed=0, **kw) -> DeepseekV3ForCausalLM:
    """Random weights with spread (std 0.2, norms around 1, a nonzero correction bias) so that
    logits and routing are not near-tied."""
    torch.manual_seed(seed)
    m = DeepseekV3ForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(1, 0.2)
    return m


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{q_lora_rank: (transformers model, raymoe model imported from its save_pretrained dir, dir)}."""
    out = {}
    for q in (24, None):
        hf = hf_model(q_lora_rank=q)
        d = tmp_path_factory.mktemp(f"hf_q{q}")
        hf.save_pretrained(d)
        out[q] = (hf, load_hf_deepseek(d), d)
    return out


def tokens(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q_lora", [24, None])
def test_logits_equal_transformers(pair, q_lora):
    hf, ours, _ = pair[q_lora]
    assert hasattr(ours.layers["0"].attn, "wq") == (q_lora is None)
    assert not isinstance(ours.layers["0"].mlp, MoELayer) and isinstance(ours.layers["1"].mlp, MoELayer)
    for x in (tokens(2, 48), tokens(3, 7, seed=2)):  # positions past original_max_position_embeddings, and short
        with torch.no_grad():
            diff = (hf(x).logits - ours(x)).abs().max().item()
        print(f"[parity] q_lora_rank={q_lora} batch {tuple(x.shape)}: max |logit diff| vs transformers {diff:.2e}")
        assert diff < 1e-4, diff


def test_cached_greedy_generation_equals_transformers_where_the_margin_is_clear(pair):
    hf, ours, _ = pair[24]
    prompt = tokens(2, 6, seed=3)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, top_k=None, top_p=None,
                             pad_token_id=0, eos_token_id=None)
        ref = hf(theirs).logits  # transformers' logits along its own greedy sequence
        # ours along the same sequence, decoding through the latent cache one token at a time
        cache = ours.new_cache(2, theirs.shape[1])
        steps = [ours(theirs[:, :6], cache=cache, pos=0)]
        steps += [ours(theirs[:, t:t + 1], cache=cache, pos=t) for t in range(6, theirs.shape[1] - 1)]
        cached = torch.cat(steps, dim=1)
    assert (cached - ref[:, :-1]).abs().max() < 1e-4
    top2 = ref[:, 5:-1].topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    picked = cached[:, 5:].argmax(-1)
    print(f"[parity] cached decode along transformers' greedy sequence: max |logit diff| "
          f"{(cached - ref[:, :-1]).abs().max().item():.2e}; greedy tokens matched "
          f"{int((picked[clear] == theirs[:, 6:][clear]).sum())} / {int(clear.sum())} positions with margin > 1e-3 "
          f"(of {clear.numel()})")
    assert clear.sum() >= 30  # of 40 generated positions
    assert torch.equal(picked[clear], theirs[:, 6:][clear])
    mine = generate(ours, prompt, 20, temperature=0)  # our own cached greedy loop
    first_unclear = int((~clear).any(0).int().argmax()) if (~clear).any() else 20
    assert torch.equal(mine[:, :6 + first_unclear], theirs[:, :6 + first_unclear])


def test_cached_decode_equals_the_full_forward_and_caches_the_latent_only():
    cfg = DeepSeekV3Config(**{**PRESETS["debug"], "vocab_size": 50, "q_lora_rank": 12,
                              "yarn": dict(factor=2.0, original_max_seq_len=32, mscale_all_dim=1.0)})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).eval()
    x = tokens(2, 40) % 50
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 40)
        parts = [model(x[:, :9], cache=cache, pos=0), model(x[:, 9:13], cache=cache, pos=9)]  # a chunk, then steps
        parts += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(13, 40)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    assert torch.equal(generate(model, x[:, :5], 12, temperature=0),
                       generate(model, x[:, :5], 12, temperature=0, use_cache=False))
    # per token and layer: kv_lora_rank + qk_rope_head_dim numbers, not 2 x heads x head dim
    per_token = cache.nbytes() / (2 * 40 * 4)
    assert per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) == 2 * (16 + 4)
    gqa = KVCache(cfg.n_layers, 2, cfg.n_heads, 40, cfg.qk_head_dim, torch.float32, "cpu")
    assert (gqa.k.nbytes + gqa.v.nbytes) / (2 * 40 * 4) == 2 * 2 * 4 * 12


ROUTING_CASES = [dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
                 dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
                 dict(n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, num_experts_per_tok=3)]


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_router_equals_transformers_on_the_same_logits(case):
    """Sigmoid scores, the correction bias (selection only), group-limited top-k by the top-2 sum,
    renormalisation and the routing scale."""
    hf_cfg = hf_config(**case)
    theirs = DeepseekV3TopkRouter(hf_cfg)
    cfg, _ = config_from_hf(hf_cfg.to_dict())
    ours = TopKRouter(64, cfg.moe).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.3)
        theirs.e_score_correction_bias.normal_(0, 0.1)
        ours.gate.weight.copy_(theirs.weight)
        ours.expert_bias.copy_(theirs.e_score_correction_bias)
    assert "expert_bias" in ours.state_dict()  # kept in checkpoints although bias balancing is off
    x = torch.randn(64, 64)
    _, w_ref, idx_ref = theirs(x)
    r = ours(x)
    idx, w = r.expert_A.view(64, -1), r.weight_A.view(64, -1)
    o_ref, o = idx_ref.sort(-1), idx.sort(-1)
    assert torch.equal(o.values, o_ref.values)
    torch.testing.assert_close(w.gather(1, o.indices), w_ref.gather(1, o_ref.indices), atol=1e-6, rtol=1e-6)
    if case["n_group"] > 1:  # the group limit changed some choices (the test is not vacuous)
        plain = (x @ theirs.weight.t()).sigmoid() + theirs.e_score_correction_bias
        assert not torch.equal(plain.topk(idx.shape[1], -1).indices.sort(-1).values, o.values)


def test_moe_layer_with_shared_expert_equals_transformers():
    hf_cfg = hf_config()
    torch.manual_seed(6)
    theirs = DeepseekV3MoE(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        theirs.gate.e_score_correction_bias.normal_(0, 0.05)
    cfg, _ = config_from_hf(hf_cfg.to_dict())
    ours = MoELayer(64, MoEConfig(**{**cfg.moe.__dict__, "backend": "loop"})).eval()
    F_ = hf_cfg.moe_intermediate_size
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.gate.weight)
        ours.router.expert_bias.copy_(theirs.gate.e_score_correction_bias)
        ours.experts.w13.copy_(theirs.experts.gate_up_proj.transpose(1, 2))  # [E, 2F, C] -> [E, C, 2F]
        ours.experts.w2.copy_(theirs.experts.down_proj.transpose(1, 2))
        ours.shared.w1.weight.copy_(theirs.shared_experts.gate_proj.weight)
        ours.shared.w3.weight.copy_(theirs.shared_experts.up_proj.weight)
        ours.shared.w2.weight.copy_(theirs.shared_experts.down_proj.weight)
    assert ours.experts.w13.shape[-1] == 2 * F_
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def _layout(d):
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def test_export_writes_save_pretrained_layout_and_reloads_in_transformers(pair, tmp_path):
    hf, ours, hf_dir = pair[24]
    out = save_hf_deepseek(ours, tmp_path / "one")
    assert _layout(out) == _layout(hf_dir)  # exact key names, shapes, dtypes (fp32 bias included)
    sharded = save_hf_deepseek(ours, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(_layout(hf_dir))
    back = DeepseekV3ForCausalLM.from_pretrained(sharded).eval()
    x = tokens(2, 33)
    with torch.no_grad():
        diff = (back(x).logits - ours(x)).abs().max()
    print(f"[parity] export -> from_pretrained: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert (sharded / "generation_config.json").is_file()


def _fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and its weight_scale_inv per block x block tile (amax / 448)."""
    O, I = w.shape
    so, si = -(-O // block), -(-I // block)
    pad = torch.zeros(so * block, si * block)
    pad[:O, :I] = w
    tiles = pad.view(so, block, si, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(so * block, si * block)[:O, :I]
    return q.contiguous(), scale.float()


def test_fp8_block_checkpoint_imports_dequantized_and_mtp_layer_is_skipped(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf = hf_model(seed=2)
    src = tmp_path / "bf"
    hf.save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    block, quant, deq = 16, {}, {}
    for k, w in state.items():
        # as published: the 2-D projections inside the blocks are FP8, embeddings/head/norms/gates are not
        if w.dim() == 2 and k.startswith("model.layers.") and ".mlp.gate.weight" not in k:
            q, s = _fp8_blocks(w, block)
            quant[k], quant[k.removesuffix("weight") + "weight_scale_inv"] = q, s
            deq[k] = (q.float() * s.repeat_interleave(block, 0)[:w.shape[0]].repeat_interleave(block, 1)[:, :w.shape[1]])
        else:
            quant[k] = w
    n_fp8 = sum(t.dtype == torch.float8_e4m3fn for t in quant.values())
    assert n_fp8 > 20
    quant["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # a multi-token-prediction module
    quant["model.layers.3.enorm.weight"] = torch.ones(64)
    dst = tmp_path / "fp8"
    dst.mkdir()
    save_file(quant, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [block, block]}, num_nextn_predict_layers=1)
    (dst / "config.json").write_text(json.dumps(cfg))
    ours = load_hf_deepseek(dst)
    assert "multi-token-prediction" in capsys.readouterr().out
    # reference: transformers with the dequantized weights
    ref_dir = tmp_path / "dequantized"
    ref_dir.mkdir()
    save_file({**state, **deq}, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    (ref_dir / "config.json").write_text((src / "config.json").read_text())
    ref = DeepseekV3ForCausalLM.from_pretrained(ref_dir).eval()
    x = tokens(2, 40)
    with torch.no_grad():
        vs_deq = (ours(x) - ref(x).logits).abs().max()
        err = (ours(x) - hf(x).logits).abs().max()
    print(f"[parity] FP8 import: max |logit diff| vs transformers on the dequantized weights {vs_deq:.2e}, "
          f"vs the unquantized model {err:.2e} ({n_fp8} FP8 tensors)")
    assert vs_deq < 1e-4
    assert err > 1e-3  # the quantization changed the model: the comparison above is not with the original
    worst = max((deq[k] - state[k]).abs().max() / state[k].abs().max() for k in deq)
    assert worst < 2 ** -3  # e4m3's 3 mantissa bits: dequantized within the format's error


def test_config_fields_that_cannot_be_honoured_are_refused_by_name():
    good = hf_config().to_dict()
    config_from_hf(good)
    for field, value in (("attention_bias", True), ("hidden_act", "gelu"), ("num_key_value_heads", 2),
                         ("topk_method", "greedy"), ("some_new_field", 1)):
        with pytest.raises(HFConfigError, match=field):
            config_from_hf({**good, field: value})
    hub = {**good, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 1.0, "original_max_position_embeddings": 32}}
    del hub["rope_parameters"]
    assert config_from_hf(hub)[0] == config_from_hf(good)[0]  # the hub's rope_scaling reads like rope_parameters


def test_presets_build_and_count_flops():
    for name in ("debug", "small"):
        cfg = DeepSeekV3Config(**PRESETS[name], vocab_size=256)
        model = archs.build(cfg)
        assert model.flops_per_token(cfg.max_seq_len) > 0
        assert [i for i, b in model.layers.items() if isinstance(b.mlp, MoELayer)] == [str(i) for i in cfg.moe_layer_ids]


# --- parallel layouts against the single process (harness: test_parallel_layouts) -------------

def _layout_cfg(**kw):
    base = dict(PRESETS["debug"])
    moe = MoEConfig(**{**base.pop("moe"), "backend": "loop", "num_experts": 4})
    return DeepSeekV3Config(**{**base, "q_lora_rank": 12, **kw}, moe=moe, vocab_size=50)


@pytest.mark.multiproc
def test_tp2_mla_shards_heads_and_equals_single_process(tmp_path):
    from tests.test_parallel_layouts import check_layout

    check_layout(tmp_path, 2, _layout_cfg(), {"tp": 2},
                 grad_keys=("layers.0.attn.wkv_a.weight", "layers.0.attn.wq_b.weight", "layers.0.attn.wkv_b.weight",
                            "layers.1.attn.kv_norm.weight", "layers.1.attn.wq_a.weight", "layers.1.mlp.router.gate.weight"))


@pytest.mark.multiproc
def test_pp2_equals_single_process(tmp_path):
    # (expert parallelism of the MoE layers is the family-independent MoELayer's: tests/test_expert_parallel.py,
    # and this family's EP=2 job in test_deepseek_trains_at_ep2_on_ray_and_exports)
    from tests.test_parallel_layouts import check_layout

    check_layout(tmp_path, 2, _layout_cfg(), {"pp": 2, "schedule": "1f1b"}, micro=2,
                 grad_keys=("layers.0.attn.wkv_a.weight", "layers.1.mlp.experts.w13"))


@pytest.mark.ray
def test_deepseek_trains_at_ep2_on_ray_and_exports(ray_cluster, tiny_data, tmp_path):
    """jobs/configs/deepseek_v3_debug.yaml through the Ray driver on 2 workers (EP=2, bias
    balancing, the sequence-wise balance loss), then the run's checkpoint (each worker wrote half
    the experts) exported to the HF layout and reloaded in transformers."""
    from cluster.config.job import load_config
    from cluster.deploy.load import load_run
    from cluster.train.driver import fit, read_metrics
    from tests.test_ray_train import debug_overrides

    job = load_config("deepseek_v3_debug", debug_overrides(tiny_data, tmp_path, "dsv3") +
                      ["train.steps=4", "train.eval_interval=4", "train.checkpoint_interval=4"])
    summary = fit(job)
    assert summary["steps"] == 4 and summary["world_size"] == 2
    moe = [r["moe"] for r in read_metrics(tmp_path / "dsv3") if "moe" in r]
    assert moe and len(moe[-1]) == 1  # layer 1's statistics (layer 0 is dense), reduced over both ranks
    assert sum(moe[-1][0]["tokens_per_expert"]) == 8 * 64 * 2  # global batch x seq x top-2
    model, _, _ = load_run(tmp_path / "dsv3")
    bias = model.layers["1"].mlp.router.expert_bias
    assert bias.abs().sum() > 0  # balancing moved the correction bias, and the checkpoint kept it
    out = save_hf_deepseek(model, tmp_path / "hf")
    experts = {k.split(".")[5] for k in _layout(out) if ".mlp.experts." in k}
    assert experts == {str(e) for e in range(4)}  # every expert, from both workers' shards
    back = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    x = tokens(2, 30) % 257
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max() < 1e-4


@pytest.mark.multiproc
def test_import_train_3_steps_at_ep2_export_reloads_in_transformers(pair, tmp_path):
    """Import, 3 SGD steps at EP=2 on 2 gloo ranks (each holds 4 of the 8 experts), merge the
    ranks' experts, export: transformers' logits equal raymoe's, and every expert moved."""
    from tests.deepseek_workers import import_train_worker
    from tests.test_expert_parallel import spawn
    from tests.test_parallel_layouts import step_data

    _, imported, hf_dir = pair[24]
    spawn(import_train_worker, 2, str(hf_dir), step_data(2, 2, steps=3), str(tmp_path))
    ranks = sorted((torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)), key=lambda g: g["offset"])
    merged = {}
    for key, value in ranks[0]["state"].items():
        if ".experts." in key:
            merged[key] = torch.cat([g["state"][key] for g in ranks])
        else:
            torch.testing.assert_close(ranks[1]["state"][key], value, atol=0, rtol=0)  # replicated: identical
            merged[key] = value
    trained = load_hf_deepseek(hf_dir, log=lambda _: None)
    trained.load_state_dict(merged)
    before = imported.state_dict()
    for key in merged:
        if ".experts." in key:
            moved_E = (merged[key] - before[key]).flatten(1).abs().amax(1)
            assert (moved_E > 0).all(), (key, moved_E)
    assert not torch.equal(merged["layers.1.mlp.router.expert_bias"], before["layers.1.mlp.router.expert_bias"])
    back = DeepseekV3ForCausalLM.from_pretrained(save_hf_deepseek(trained, tmp_path / "hf")).eval()
    x = tokens(2, 21)
    with torch.no_grad():
        diff = (back(x).logits - trained(x)).abs().max()
        moved = (back(x).logits - imported(x)).abs().max()
    print(f"[parity] import -> 3 steps at EP=2 -> export -> transformers: max |logit diff| {diff:.2e} "
          f"(the training moved the logits by up to {moved:.2f})")
    assert diff < 1e-4 and moved > 1e-2


def test_import_hf_and_export_hf_runs_of_the_family(pair, tmp_path):
    """jobs.import_hf's library path writes a run (weights-only step-0 checkpoint) that loads like
    any run, and export_hf of that run writes save_pretrained's layout back."""
    from cluster.deploy.hf.convert import export_hf, import_hf
    from cluster.deploy.load import load_run

    hf, _, hf_dir = pair[24]
    run = tmp_path / "run"
    summary = import_hf(hf_dir, run, progress=lambda m: None)
    assert summary["model_type"] == "deepseek_v3" and summary["arch"] == "deepseek_v3"
    model, _, ckpt = load_run(run, tokenizer=False)
    x = tokens(2, 21)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    out = tmp_path / "export"
    export_hf(run, out, progress=lambda m: None)
    assert _layout(out) == _layout(hf_dir)
    back = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max() < 1e-4
