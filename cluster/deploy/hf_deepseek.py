"""DeepSeek-V3 checkpoints in the Hugging Face layout <-> the raymoe `deepseek_v3` family.

Self-contained until the generic Hugging Face import/export machinery (issue 17, a per-family
mapping in cluster/deploy/hf/) lands; then `config_from_hf` / `config_to_hf` and the key mapping
(`hub_sources`, `export_tensors`) plug in as its `deepseek_v3` family. Until then
`load_hf_deepseek(dir)` gives a plain raymoe model and `save_hf_deepseek(model, dir)` writes the
layout `save_pretrained` writes (per-expert tensors, sharded safetensors with an index,
config.json, generation_config.json). `jobs.import_hf` / `jobs.export --format hf` are issue 17's.

What the mapping does beyond renaming:
- experts: the hub stores `experts.<e>.{gate,up,down}_proj.weight` per expert; raymoe's
  `GroupedExperts` holds w13 [E, C, 2F] = [gate | up]^T and w2 [E, F, C] = down^T;
- RoPE layout: with `rope_interleave` (the published checkpoints) the RoPE rows of q_b_proj /
  q_proj (per head) and of kv_a_proj_with_mqa are rotated as interleaved pairs (x0, x1), (x2, x3);
  raymoe rotates halves, so import permutes those rows to [evens | odds] and export permutes back
  (q.k is unchanged by a permutation applied to both);
- FP8: a published weight is float8_e4m3fn with a `weight_scale_inv` [ceil(out/b0), ceil(in/b1)]
  per block of `quantization_config.weight_block_size`; import dequantizes w * scale to the
  training dtype, tensor by tensor;
- multi-token prediction: the `num_nextn_predict_layers` modules stored after the last layer
  (model.layers.<n_layers>.*) are not supported; import skips them and prints a notice.

Weights stream: safetensors files are memory-mapped and each raymoe tensor is built from its hub
tensors and copied into the model before the next is read (one layer's experts at most in flight).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from archs.deepseek import DeepSeekV3, DeepSeekV3Config, YarnConfig
from moe.config import MoEConfig

# Fields of transformers' DeepseekV3Config (and hub-only keys of the published config.json) that
# carry no model semantics here: ids, cache/output switches, bookkeeping.
IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
           "eos_token_id", "pad_token_id", "use_cache", "output_router_logits", "pretraining_tp", "qk_head_dim",
           "head_dim", "auto_map", "ep_size", "aux_loss_alpha", "seq_aux", "_name_or_path", "quantization_config",
           "num_nextn_predict_layers", "num_mtp_layers", "initializer_range", "rope_interleave", "tie_word_embeddings",
           "attention_dropout", "attention_bias", "hidden_act", "num_key_value_heads", "scoring_func", "topk_method",
           "moe_layer_freq", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
           "n_shared_experts", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
           "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
           "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rms_norm_eps",
           # PreTrainedConfig's generic fields (outputs, task heads), in `to_dict()` output
           "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
           "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class"}


class HFConfigError(ValueError):
    """A config.json field this family cannot honour; the message names it."""


def _rope_params(hf: dict) -> dict:
    """transformers 5 `rope_parameters`, or the hub's `rope_theta` + `rope_scaling` ("type" or "rope_type")."""
    rp = dict(hf.get("rope_parameters") or {})
    if not rp:
        rp = dict(hf.get("rope_scaling") or {})
        rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp.pop("type")
    rp.setdefault("rope_type", "default")
    return rp


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[DeepSeekV3Config, bool]:
    """(raymoe config, rope_interleave) of a DeepSeek-V3 config.json; a field it cannot honour
    raises `HFConfigError` naming it."""
    def refuse(name: str, why: str):
        raise HFConfigError(f"{source}: {name}={hf.get(name)!r}: {why}")

    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        refuse("model_type", "not a DeepSeek-V3 checkpoint")
    unknown = sorted(set(hf) - IGNORED)
    if unknown:
        raise HFConfigError(f"{source}: unknown field(s) {unknown} for deepseek_v3; the import cannot tell what they change")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) is implemented")
    if hf.get("attention_bias", False):
        refuse("attention_bias", "biases on q_a/kv_a/o projections are not implemented (DeepSeek-V3 has none)")
    if hf.get("attention_dropout", 0.0):
        refuse("attention_dropout", "attention dropout is not implemented")
    heads = hf.get("num_attention_heads", 128)
    if hf.get("num_key_value_heads") not in (None, heads):
        refuse("num_key_value_heads", f"MLA expands keys for every head; must equal num_attention_heads={heads}")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "DeepSeek-V3 routing scores with sigmoid")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        refuse("topk_method", "only noaux_tc (group-limited top-k with the correction bias) is implemented")
    if hf.get("moe_layer_freq", 1) != 1:
        refuse("moe_layer_freq", "every layer after first_k_dense_replace is MoE in this family")
    if hf.get("pretraining_tp", 1) != 1:
        refuse("pretraining_tp", "sliced pre-training TP matmuls are not implemented")
    rp = _rope_params(hf)
    yarn = None
    if rp["rope_type"] == "yarn":
        known = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim"}
        extra = sorted(set(rp) - known)
        if extra:
            raise HFConfigError(f"{source}: rope scaling field(s) {extra} are not implemented (attention_factor, truncate)")
        if rp.get("factor") is None:
            refuse("rope_parameters", "YaRN needs factor")
        yarn = YarnConfig(factor=float(rp["factor"]), original_max_seq_len=int(rp["original_max_position_embeddings"]),
                          beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                          mscale=float(rp.get("mscale") or 0.0), mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0))
    elif rp["rope_type"] != "default":
        refuse("rope_parameters", f"rope_type {rp['rope_type']!r}: only default and yarn are implemented")
    E = hf.get("n_routed_experts", 256)
    n_group, topk_group = hf.get("n_group", 8) or 1, hf.get("topk_group", 4) or 1
    F_moe = hf.get("moe_intermediate_size", 2048)
    shared = hf.get("n_shared_experts", 1) or 0
    moe = MoEConfig(num_experts=E, top_k=hf.get("num_experts_per_tok", 8), expert_hidden=F_moe, score_func="sigmoid",
                    renormalize=bool(hf.get("norm_topk_prob", True)),
                    num_groups=n_group if n_group > 1 else None, group_topk=topk_group if n_group > 1 else None,
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)), selection_bias=True,
                    shared_expert_hidden=F_moe * shared if shared else None,
                    aux_loss_coeff=0.0, z_loss_coeff=0.0)
    cfg = DeepSeekV3Config(
        vocab_size=hf.get("vocab_size", 129280), max_seq_len=hf.get("max_position_embeddings", 4096),
        d_model=hf.get("hidden_size", 7168), n_layers=hf.get("num_hidden_layers", 61), n_heads=heads,
        q_lora_rank=hf.get("q_lora_rank", 1536), kv_lora_rank=hf.get("kv_lora_rank", 512),
        qk_nope_head_dim=hf.get("qk_nope_head_dim", 128), qk_rope_head_dim=hf.get("qk_rope_head_dim", 64),
        v_head_dim=hf.get("v_head_dim", 128), d_ff=hf.get("intermediate_size", 18432),
        first_k_dense=hf.get("first_k_dense_replace", 3), moe=moe, rope_theta=float(rp.get("rope_theta", 10000.0)),
        yarn=yarn, norm_eps=hf.get("rms_norm_eps", 1e-6), latent_norm_eps=1e-6,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02))
    return cfg, bool(hf.get("rope_interleave", True))


def config_to_hf(cfg: DeepSeekV3Config, rope_interleave: bool = True) -> dict:
    """config.json (transformers 5 keys) of a raymoe deepseek_v3 config."""
    moe = cfg.moe
    if moe is None:
        raise HFConfigError("model.moe: null (an all-dense model) has no DeepSeek-V3 layout; the hub format needs routed experts")
    if moe.score_func != "sigmoid" or moe.router != "topk":
        raise HFConfigError(f"model.moe.score_func/router: {moe.score_func}/{moe.router}; DeepSeek-V3 routes sigmoid top-k")
    if moe.shared_expert_hidden is not None and moe.shared_expert_hidden % moe.expert_hidden:
        raise HFConfigError(f"model.moe.shared_expert_hidden: {moe.shared_expert_hidden} is not a multiple of "
                            f"expert_hidden={moe.expert_hidden} (the hub stores n_shared_experts)")
    if cfg.latent_norm_eps != 1e-6:
        raise HFConfigError("model.latent_norm_eps: transformers fixes the latent norms' eps at 1e-6")
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn is not None:
        y = cfg.yarn
        rp = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
              "original_max_position_embeddings": y.original_max_seq_len, "beta_fast": y.beta_fast,
              "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden,
        "moe_intermediate_size": moe.expert_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": (moe.shared_expert_hidden or 0) // moe.expert_hidden,
        "n_routed_experts": moe.num_experts, "routed_scaling_factor": moe.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "n_group": moe.num_groups or 1, "topk_group": moe.group_topk or 1, "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": cfg.first_k_dense, "norm_topk_prob": moe.renormalize, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rp, "rope_interleave": rope_interleave,
        "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 0,
    }


# --- tensors ---------------------------------------------------------------------------------

def _deinterleave(n: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs (x0, x1), (x2, x3), ... to halves [x0 x2 ... | x1 x3 ...]."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def _permute_q(w: torch.Tensor, cfg: DeepSeekV3Config, order: torch.Tensor) -> torch.Tensor:
    w_HXI = w.view(cfg.n_heads, cfg.qk_head_dim, -1)
    rope = w_HXI[:, cfg.qk_nope_head_dim:].index_select(1, order)
    return torch.cat([w_HXI[:, :cfg.qk_nope_head_dim], rope], dim=1).reshape(w.shape)


def _permute_kv_a(w: torch.Tensor, cfg: DeepSeekV3Config, order: torch.Tensor) -> torch.Tensor:
    R = cfg.kv_lora_rank
    return torch.cat([w[:R], w[R:].index_select(0, order)])


def hub_sources(cfg: DeepSeekV3Config, interleave: bool) -> dict[str, tuple[list[str], Callable]]:
    """{raymoe state key: (hub keys it is built from, function of those tensors)}."""
    order = _deinterleave(cfg.qk_rope_head_dim)
    same = lambda t: t  # noqa: E731
    q_fix = (lambda t: _permute_q(t, cfg, order)) if interleave else same
    kv_fix = (lambda t: _permute_kv_a(t, cfg, order)) if interleave else same
    out: dict[str, tuple[list[str], Callable]] = {"embed.weight": (["model.embed_tokens.weight"], same),
                                                  "norm.weight": (["model.norm.weight"], same)}
    if not cfg.tie_embeddings:
        out["head.weight"] = (["lm_head.weight"], same)
    for i in range(cfg.n_layers):
        h, r = f"model.layers.{i}.", f"layers.{i}."
        out[r + "attn_norm.weight"] = ([h + "input_layernorm.weight"], same)
        out[r + "mlp_norm.weight"] = ([h + "post_attention_layernorm.weight"], same)
        a, s = r + "attn.", h + "self_attn."
        if cfg.q_lora_rank is None:
            out[a + "wq.weight"] = ([s + "q_proj.weight"], q_fix)
        else:
            out[a + "wq_a.weight"] = ([s + "q_a_proj.weight"], same)
            out[a + "q_norm.weight"] = ([s + "q_a_layernorm.weight"], same)
            out[a + "wq_b.weight"] = ([s + "q_b_proj.weight"], q_fix)
        out[a + "wkv_a.weight"] = ([s + "kv_a_proj_with_mqa.weight"], kv_fix)
        out[a + "kv_norm.weight"] = ([s + "kv_a_layernorm.weight"], same)
        out[a + "wkv_b.weight"] = ([s + "kv_b_proj.weight"], same)
        out[a + "wo.weight"] = ([s + "o_proj.weight"], same)
        m, hm = r + "mlp.", h + "mlp."
        if i in cfg.moe_layer_ids:
            E = cfg.moe.num_experts
            out[m + "router.gate.weight"] = ([hm + "gate.weight"], same)
            out[m + "router.expert_bias"] = ([hm + "gate.e_score_correction_bias"], lambda t: t.float())
            gates = [f"{hm}experts.{e}.gate_proj.weight" for e in range(E)]
            ups = [f"{hm}experts.{e}.up_proj.weight" for e in range(E)]
            downs = [f"{hm}experts.{e}.down_proj.weight" for e in range(E)]
            out[m + "experts.w13"] = (gates + ups, lambda *ts, E=E: torch.stack(
                [torch.cat([g, u]).t() for g, u in zip(ts[:E], ts[E:])]))
            out[m + "experts.w2"] = (downs, lambda *ts: torch.stack([d.t() for d in ts]))
            if cfg.moe.shared_expert_hidden:
                for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    out[f"{m}shared.{ours}.weight"] = ([f"{hm}shared_experts.{theirs}.weight"], same)
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{m}{ours}.weight"] = ([f"{hm}{theirs}.weight"], same)
    return out


def export_tensors(model: DeepSeekV3, interleave: bool = True, dtype: torch.dtype | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) of every weight of a whole (unsharded) raymoe model, in save_pretrained's
    per-expert layout, one at a time."""
    cfg = model.cfg
    inverse = torch.argsort(_deinterleave(cfg.qk_rope_head_dim))
    sd = model.state_dict()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype or t.dtype).contiguous()

    for ours, (theirs, _) in hub_sources(cfg, interleave).items():
        t = sd[ours]
        if ours.endswith("experts.w13"):
            if t.shape[0] != cfg.moe.num_experts:
                raise ValueError(f"{ours}: holds {t.shape[0]} of {cfg.moe.num_experts} experts (an expert-parallel "
                                 "shard); load the whole model on one process first (cluster.deploy.load.load_run)")
            F_ = cfg.moe.expert_hidden
            E = t.shape[0]
            for e in range(E):
                yield theirs[e], cast(t[e, :, :F_].t())
                yield theirs[E + e], cast(t[e, :, F_:].t())
        elif ours.endswith("experts.w2"):
            for e, name in enumerate(theirs):
                yield name, cast(t[e].t())
        elif ours.endswith("router.expert_bias"):
            yield theirs[0], t.detach().float().contiguous()  # transformers keeps it fp32 whatever the dtype
        elif interleave and (ours.endswith("attn.wq.weight") or ours.endswith("attn.wq_b.weight")):
            yield theirs[0], cast(_permute_q(t, cfg, inverse))
        elif interleave and ours.endswith("attn.wkv_a.weight"):
            yield theirs[0], cast(_permute_kv_a(t, cfg, inverse))
        else:
            yield theirs[0], cast(t)


# --- files -----------------------------------------------------------------------------------

class _HubTensors:
    """Memory-mapped tensors of an HF directory (one or sharded safetensors), dequantizing FP8 blocks."""

    def __init__(self, hf_dir: Path, block: tuple[int, int] | None):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {f: safe_open(str(hf_dir / f), "pt") for f in files}
        self.where = weight_map or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        self.block, self.dir = block, hf_dir

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(f"{self.dir}: tensor {key} missing from the checkpoint")
        t = self.handles[self.where[key]].get_tensor(key)
        scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_key not in self.where or self.block is None:
                raise ValueError(f"{self.dir}: {key} is {t.dtype} but there is no {scale_key} / "
                                 "quantization_config.weight_block_size to dequantize it with")
            return dequantize_fp8(t, self.handles[self.where[scale_key]].get_tensor(scale_key), self.block, dtype)
        return t.to(dtype)


def dequantize_fp8(w_OI: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """w * scale per [b0, b1] block (DeepSeek's `weight_scale_inv` is the dequantization multiplier)."""
    b0, b1 = block
    O, I = w_OI.shape
    if scale_inv.shape != (-(-O // b0), -(-I // b1)):
        raise ValueError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not tile a [{O}, {I}] weight "
                         f"in blocks of {b0}x{b1}")
    s = scale_inv.float().repeat_interleave(b0, 0)[:O].repeat_interleave(b1, 1)[:, :I]
    return (w_OI.float() * s).to(dtype)


def load_hf_deepseek(hf_dir: str | Path, dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print
                     ) -> DeepSeekV3:
    """A raymoe DeepSeekV3 model holding an HF directory's weights (dequantized to `dtype`)."""
    hf_dir = Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg, interleave = config_from_hf(hf, str(hf_dir / "config.json"))
    q = hf.get("quantization_config")
    block = None
    if q is not None:
        if q.get("quant_method") != "fp8" or "weight_block_size" not in q:
            raise HFConfigError(f"{hf_dir}/config.json: quantization_config {q!r}: only block FP8 "
                                "(quant_method fp8 with weight_block_size) is implemented")
        block = tuple(q["weight_block_size"])
    tensors = _HubTensors(hf_dir, block)
    mtp = re.compile(r"model\.layers\.(\d+)\.")
    extra = sorted(k for k in tensors.keys() if (m := mtp.match(k)) and int(m.group(1)) >= cfg.n_layers)
    if extra:
        log(f"notice: skipping {len(extra)} tensors of the multi-token-prediction module(s) after layer "
            f"{cfg.n_layers - 1} (num_nextn_predict_layers={hf.get('num_nextn_predict_layers', 0)}): MTP is not supported")
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    # Buffers not in the state dict (RoPE tables) were lost to the meta device: rebuild them.
    model.rope_cos, model.rope_sin = DeepSeekV3.rope_buffers(cfg)
    params = dict(model.state_dict(keep_vars=True))
    sources = hub_sources(cfg, interleave)
    missing = set(params) - set(sources)
    if missing:
        raise RuntimeError(f"deepseek_v3 mapping misses raymoe tensors {sorted(missing)}")
    used: set[str] = set()
    with torch.no_grad():
        for ours, (theirs, fn) in sources.items():
            t = fn(*(tensors.get(k, dtype) for k in theirs))
            target = params[ours]
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{hf_dir}: {theirs[0]} gives {ours} of shape {tuple(t.shape)}, "
                                 f"the config says {tuple(target.shape)}")
            target.copy_(t)
            used.update(theirs)
    scales = {k for k in tensors.keys() if k.endswith("weight_scale_inv")}
    left = tensors.keys() - used - set(extra) - scales
    if left:
        raise ValueError(f"{hf_dir}: tensors the deepseek_v3 mapping does not use: {sorted(left)[:8]}")
    return model.eval()


def save_hf_deepseek(model: DeepSeekV3, out_dir: str | Path, max_shard_bytes: int = 2 << 30,
                     rope_interleave: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write the HF layout of a whole raymoe model: sharded safetensors + index, config.json,
    generation_config.json. Tensors stream into shards of at most `max_shard_bytes`."""
    from safetensors.torch import save_file

    if not isinstance(model, DeepSeekV3):
        raise TypeError(f"save_hf_deepseek: expected a deepseek_v3 model, got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.cfg, rope_interleave)
    hf["dtype"] = str(dtype or model.embed.weight.dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    total = 0
    tmp: list[Path] = []

    def flush():
        path = out / f"part-{len(tmp)}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        tmp.append(path)
        shards[-1] = {}

    for name, t in export_tensors(model, rope_interleave, dtype):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
            names.append([])
            size = 0
        shards[-1][name] = t
        names[-1].append(name)
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    if len(tmp) == 1:
        tmp[0].rename(out / "model.safetensors")
        (out / "model.safetensors.index.json").unlink(missing_ok=True)  # of an earlier export to this dir
    else:
        for i, (path, keys) in enumerate(zip(tmp, names)):
            final = f"model-{i + 1:05d}-of-{len(tmp):05d}.safetensors"
            path.rename(out / final)
            weight_map.update({k: final for k in keys})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
    return out

