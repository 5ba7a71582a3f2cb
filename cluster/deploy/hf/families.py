"""The Hugging Face families raymoe reads and writes: how each one's `config.json` becomes a
raymoe model config (and back), and what its tensors are called.

A family is one `HFFamily` in `FAMILIES`, keyed by the hub's `model_type`. Adding one (DeepSeek-V3
is next) means writing three things and registering them with `register`:

- `to_raymoe(hf: dict) -> dict`: the raymoe `model` mapping. Read fields through `HFConfig.take`
  (honoured), `HFConfig.expect` (refused unless at the value raymoe implements) or `HFConfig.inert`
  (no effect on the weights, the forward pass or training); `HFConfig.finish` then refuses
  every field nobody looked at, naming it. So a field transformers adds later fails loudly instead
  of being ignored.
- `to_hf(model_cfg, base: dict) -> dict`: the `config.json` of an export (`base` is the imported
  one, or {}), written as transformers 5 writes it (`rope_parameters`).
- `names`: a `Names` table of the hub's tensor names. The generic plan (`tensor_plan`) walks raymoe's
  modules and asks the table for each one; a family whose tensors do not fit the table (fused
  projections, extra routers) overrides `plan` instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


class HFConfigError(ValueError):
    """A Hugging Face config field raymoe cannot honour (the message names the field)."""


# Fields every PreTrainedConfig carries that say nothing about the weights or the maths.
COMMON_INERT = ("transformers_version", "architectures", "output_hidden_states", "output_attentions",
                "return_dict", "id2label", "label2id", "problem_type", "_name_or_path", "model_type",
                "use_cache", "chunk_size_feed_forward", "torchscript", "tokenizer_class",
                "output_router_logits", "_attn_implementation_autoset", "_commit_hash", "task_specific_params",
                "prefix", "finetuning_task", "sep_token_id", "decoder_start_token_id")


class HFConfig:
    """A config.json being read: records which fields were looked at, refuses the rest."""

    def __init__(self, data: dict, family: str):
        self.data, self.family, self.seen = dict(data), family, set()

    def _field(self, name: str) -> str:
        return f"{self.family} config field '{name}'"

    def take(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def inert(self, *names: str) -> None:
        self.seen.update(names)

    def expect(self, name: str, allowed: Any, why: str, default: Any = None) -> Any:
        """The value must be one of `allowed` (a tuple) or equal it; else a refusal saying why."""
        value = self.take(name, default)
        ok = value in allowed if isinstance(allowed, tuple) else value == allowed
        if not ok:
            raise HFConfigError(f"{self._field(name)} = {value!r} is not supported: {why}")
        return value

    def refuse(self, name: str, why: str) -> None:
        raise HFConfigError(f"{self._field(name)} = {self.data.get(name)!r} is not supported: {why}")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen - set(COMMON_INERT))
        if unknown:
            raise HFConfigError(f"{self._field(unknown[0])} is not known to raymoe's importer (all unread: "
                                f"{unknown}); it may change the model, so the import stops rather than ignore it")


def read_rope(c: HFConfig) -> tuple[float, dict | None]:
    """(rope_theta, raymoe rope_scaling) from transformers 5's `rope_parameters` or the hub files'
    `rope_theta` + `rope_scaling` (whichever the file has; both must agree if both are there)."""
    params = c.take("rope_parameters")
    theta, scaling = c.take("rope_theta"), c.take("rope_scaling")
    if params is not None:
        if "rope_theta" in params and theta is not None and float(params["rope_theta"]) != float(theta):
            c.refuse("rope_theta", f"disagrees with rope_parameters.rope_theta={params['rope_theta']}")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"} or scaling
        theta = params.get("rope_theta", theta)
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "default":
        if set(scaling) - {"partial_rotary_factor"} or scaling.get("partial_rotary_factor", 1.0) != 1.0:
            c.refuse("rope_parameters", f"default RoPE with extra keys {sorted(scaling)}")
        return theta, None
    if kind == "linear":
        keep = ("factor",)
    elif kind == "llama3":
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    else:
        c.refuse("rope_parameters", f"rope_type {kind!r}; raymoe implements default, linear and llama3")
    extra = set(scaling) - set(keep)
    if extra - {"partial_rotary_factor"} or scaling.get("partial_rotary_factor", 1.0) != 1.0:
        c.refuse("rope_parameters", f"keys {sorted(extra)} are not part of {kind} scaling as raymoe implements it")
    out = {"type": kind, **{k: scaling[k] for k in keep if k in scaling}}
    if kind == "llama3" and "original_max_position_embeddings" not in out:
        out["original_max_position_embeddings"] = c.data.get("max_position_embeddings")
    missing = [k for k in keep if k not in out]
    if missing:
        c.refuse("rope_parameters", f"{kind} scaling needs {missing}")
    return theta, out


def write_rope(cfg) -> dict:
    params = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    if cfg.rope_scaling is not None:
        params.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"}, rope_type=cfg.rope_scaling["type"])
    return params


def read_attention(c: HFConfig, bias_field: str | None, bias_kind: str, qk_norm: str) -> dict:
    """The fields every family shares: sizes, heads, RoPE, norms, embeddings, attention options."""
    d_model, n_heads = c.take("hidden_size"), c.take("num_attention_heads")
    head_dim = c.take("head_dim")
    theta, scaling = read_rope(c)
    out = dict(
        vocab_size=c.take("vocab_size"), max_seq_len=c.take("max_position_embeddings"), d_model=d_model,
        n_layers=c.take("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=c.take("num_key_value_heads") or n_heads, d_ff=c.take("intermediate_size"),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(c.take("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.take("tie_word_embeddings", False)),
        init_std=float(c.take("initializer_range", 0.02)),
        head_dim=head_dim if head_dim not in (None, d_model // n_heads) else None,
        attn_bias=bias_kind if bias_field and c.take(bias_field, False) else "none",
        qk_norm=qk_norm)
    c.expect("hidden_act", "silu", "raymoe's MLPs are SwiGLU (silu)")
    c.expect("attention_dropout", (0, 0.0), "raymoe's attention has no dropout", default=0.0)
    c.expect("is_encoder_decoder", (False, None), "decoder-only models only", default=False)
    c.expect("pruned_heads", ({}, None), "pruned heads change the shapes per layer", default={})
    c.expect("tie_encoder_decoder", (False, None), "decoder-only models only", default=False)
    c.expect("add_cross_attention", (False, None), "decoder-only models only", default=False)
    # Token ids go to the tokenizer and generation_config; dtype is the export's dtype.
    c.inert("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype")
    return out


def read_no_window(c: HFConfig) -> None:
    """Sliding-window fields: refused when they would change attention."""
    use = c.take("use_sliding_window", False)
    window = c.take("sliding_window")
    if "use_sliding_window" in c.data:  # Qwen: the window applies only with use_sliding_window
        c.expect("use_sliding_window", False, "sliding-window attention is not imported (full attention only)")
        c.inert("sliding_window", "max_window_layers")
    elif window not in (None, 0):
        c.refuse("sliding_window", "sliding-window attention is not imported (full attention only)")
    del use
    types = c.take("layer_types")
    if types is not None and any(t != "full_attention" for t in types):
        c.refuse("layer_types", "only full_attention layers are imported")


def read_moe(c: HFConfig, experts_field: str, hidden_field: str, renormalize: bool | None) -> dict:
    """The routed experts: softmax top-k, optional renormalisation, the aux-loss coefficient.

    transformers' load-balancing loss is top_k x raymoe's Switch loss on the same routing (it
    divides the token fraction by N, raymoe by N*k), so the same gradient needs coef * top_k.
    """
    k = c.take("num_experts_per_tok")
    E = c.take(experts_field)
    if renormalize is None:
        renormalize = bool(c.take("norm_topk_prob", False))
    if k == 1 and renormalize:
        c.refuse("norm_topk_prob", "with num_experts_per_tok=1 the renormalised weight is always 1; raymoe keeps "
                 "top-1's softmax probability so the router still learns")
    c.expect("router_jitter_noise", (0, 0.0, None), "transformers multiplies the experts' input too, raymoe only "
             "the router's", default=0.0)
    coef = float(c.take("router_aux_loss_coef", 0.0))
    return dict(num_experts=E, top_k=k, expert_hidden=c.take(hidden_field), router="topk", score_func="softmax",
                renormalize=renormalize, capacity_factor=None, aux_loss_coeff=coef * k, z_loss_coeff=0.0)


def sparse_layers(c: HFConfig, n_layers: int) -> list[int]:
    """Qwen-MoE's layer rule: MoE where (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    step = c.take("decoder_sparse_step", 1) or 1
    dense = set(c.take("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


@dataclass(frozen=True)
class Names:
    """Hub tensor names of one family, relative to `model.layers.{i}.` for per-layer ones."""

    moe_prefix: str = "mlp."  # the sparse block's module
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # raymoe w1 (gate), w3 (up), w2 (down)
    router: str = "gate"
    shared: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"


@dataclass(frozen=True)
class HFFamily:
    model_type: str
    architecture: str  # the CausalLM class name written to config.json
    to_raymoe: Callable[[HFConfig], dict]
    to_hf: Callable[[Any, dict], dict]
    names: Names = field(default_factory=Names)


FAMILIES: dict[str, HFFamily] = {}


def register(fam: HFFamily) -> None:
    if fam.model_type in FAMILIES:
        raise ValueError(f"Hugging Face family {fam.model_type!r} registered twice")
    FAMILIES[fam.model_type] = fam


def family_of(hf: dict, where: str) -> HFFamily:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise HFConfigError(f"{where}: model_type {kind!r} is not one raymoe imports; supported: {sorted(FAMILIES)}")
    return FAMILIES[kind]


def to_raymoe_config(hf: dict, where: str = "config.json") -> dict:
    """The raymoe `model` mapping of a Hugging Face config dict (refusing what it cannot honour)."""
    fam = family_of(hf, where)
    c = HFConfig(hf, fam.model_type)
    out = fam.to_raymoe(c)
    c.finish()
    return out


# --- the families -----------------------------------------------------------------------------

def _llama(c: HFConfig) -> dict:
    out = read_attention(c, "attention_bias", "qkvo", "none")
    c.expect("mlp_bias", False, "raymoe's SwiGLU has no biases", default=False)
    c.inert("pretraining_tp")  # transformers 5 no longer uses it in the forward pass
    return {"arch": "transformer", **out}


def _qwen3(c: HFConfig) -> dict:
    out = read_attention(c, "attention_bias", "qkvo", "head")
    read_no_window(c)
    return {"arch": "transformer", **out}


def _mixtral(c: HFConfig) -> dict:
    out = read_attention(c, None, "none", "none")
    read_no_window(c)
    moe = read_moe(c, "num_local_experts", "intermediate_size", renormalize=True)
    return {"arch": "moe_transformer", **out, "moe": moe, "moe_layers": list(range(out["n_layers"]))}


def _qwen2_moe(c: HFConfig) -> dict:
    out = read_attention(c, "qkv_bias", "qkv", "none")
    read_no_window(c)
    moe = read_moe(c, "num_experts", "moe_intermediate_size", renormalize=None)
    shared = c.take("shared_expert_intermediate_size")
    if shared:
        moe.update(shared_expert_hidden=shared, shared_expert_gate=True)
    return {"arch": "moe_transformer", **out, "moe": moe, "moe_layers": sparse_layers(c, out["n_layers"])}


def _qwen3_moe(c: HFConfig) -> dict:
    out = read_attention(c, "attention_bias", "qkvo", "head")
    read_no_window(c)
    experts = "num_experts" if "num_experts" in c.data else "num_local_experts"
    c.inert("num_experts", "num_local_experts")
    moe = read_moe(c, experts, "moe_intermediate_size", renormalize=None)
    return {"arch": "moe_transformer", **out, "moe": moe, "moe_layers": sparse_layers(c, out["n_layers"])}


def _olmoe(c: HFConfig) -> dict:
    out = read_attention(c, "attention_bias", "qkvo", "full")
    c.expect("clip_qkv", None, "raymoe does not clamp q/k/v", default=None)
    moe = read_moe(c, "num_experts", "intermediate_size", renormalize=None)
    return {"arch": "moe_transformer", **out, "moe": moe, "moe_layers": list(range(out["n_layers"]))}


def _hf_common(cfg, base: dict, model_type: str, architecture: str) -> dict:
    out = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    out.update(model_type=model_type, architectures=[architecture], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
               rope_parameters=write_rope(cfg), tie_word_embeddings=cfg.tie_embeddings,
               initializer_range=cfg.init_std, hidden_act="silu")
    out.setdefault("dtype", "float32")
    return out


def _refuse_options(cfg, family: str, **allowed) -> None:
    """An export target must have every raymoe option the model uses."""
    for name, ok in allowed.items():
        if getattr(cfg, name) not in ok:
            raise HFConfigError(f"model.{name} = {getattr(cfg, name)!r} has no {family} equivalent (allowed: {ok})")
    if cfg.attn_window is not None:
        raise HFConfigError(f"model.attn_window: local attention has no {family} equivalent")


def _moe_hf(cfg, family: str, norm_field: bool = True) -> dict:
    m = cfg.moe
    if m.router != "topk" or m.score_func != "softmax" or m.num_groups is not None:
        raise HFConfigError(f"model.moe: {family} routes by softmax top-k over all experts (router topk, "
                            "score_func softmax, no groups)")
    out = dict(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coeff / m.top_k)
    if norm_field:
        out["norm_topk_prob"] = m.renormalize
    return out


def _hf_llama(cfg, base: dict) -> dict:
    _refuse_options(cfg, "Llama", qk_norm=("none",), attn_bias=("none", "qkvo"))
    out = _hf_common(cfg, base, "llama", "LlamaForCausalLM")
    out.update(head_dim=cfg.attn_head_dim, attention_bias=cfg.attn_bias == "qkvo")
    return out


def _hf_qwen3(cfg, base: dict) -> dict:
    _refuse_options(cfg, "Qwen3", qk_norm=("head",), attn_bias=("none", "qkvo"))
    out = _hf_common(cfg, base, "qwen3", "Qwen3ForCausalLM")
    out.update(head_dim=cfg.attn_head_dim, attention_bias=cfg.attn_bias == "qkvo",
               layer_types=["full_attention"] * cfg.n_layers)
    return out


def _all_moe(cfg, family: str) -> None:
    if cfg.moe_layer_ids != list(range(cfg.n_layers)):
        raise HFConfigError(f"model.moe_layers: {family} has an MoE FFN in every layer, this model in {cfg.moe_layer_ids}")
    if cfg.moe.shared_expert_hidden:
        raise HFConfigError(f"model.moe.shared_expert_hidden: {family} has no shared expert")


def _hf_mixtral(cfg, base: dict) -> dict:
    _refuse_options(cfg, "Mixtral", qk_norm=("none",), attn_bias=("none",))
    _all_moe(cfg, "Mixtral")
    if not cfg.moe.renormalize and cfg.moe.top_k > 1:
        raise HFConfigError("model.moe.renormalize: Mixtral always renormalises its top-k weights")
    out = _hf_common(cfg, base, "mixtral", "MixtralForCausalLM")
    out.update(**_moe_hf(cfg, "Mixtral", norm_field=False), num_local_experts=cfg.moe.num_experts,
               intermediate_size=cfg.moe.expert_hidden, head_dim=cfg.attn_head_dim, router_jitter_noise=0.0)
    return out


def _sparse_hf(cfg) -> dict:
    """decoder_sparse_step = 1 and the dense layers listed: any raymoe layer choice."""
    return dict(decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if i not in cfg.moe_layer_ids])


def _hf_qwen2_moe(cfg, base: dict) -> dict:
    _refuse_options(cfg, "Qwen2-MoE", qk_norm=("none",), attn_bias=("none", "qkv"), head_dim=(None, cfg.d_model // cfg.n_heads))
    m = cfg.moe
    if bool(m.shared_expert_hidden) != m.shared_expert_gate:
        raise HFConfigError("model.moe.shared_expert_gate: Qwen2-MoE's shared expert always has its sigmoid gate")
    out = _hf_common(cfg, base, "qwen2_moe", "Qwen2MoeForCausalLM")
    out.update(**_moe_hf(cfg, "Qwen2-MoE"), **_sparse_hf(cfg), num_experts=m.num_experts,
               moe_intermediate_size=m.expert_hidden, shared_expert_intermediate_size=m.shared_expert_hidden or 0,
               qkv_bias=cfg.attn_bias == "qkv", layer_types=["full_attention"] * cfg.n_layers)
    return out


def _hf_qwen3_moe(cfg, base: dict) -> dict:
    _refuse_options(cfg, "Qwen3-MoE", qk_norm=("head",), attn_bias=("none", "qkvo"))
    if cfg.moe.shared_expert_hidden:
        raise HFConfigError("model.moe.shared_expert_hidden: Qwen3-MoE has no shared expert")
    out = _hf_common(cfg, base, "qwen3_moe", "Qwen3MoeForCausalLM")
    out.pop("num_experts", None)
    out.update(**_moe_hf(cfg, "Qwen3-MoE"), **_sparse_hf(cfg), num_local_experts=cfg.moe.num_experts,
               moe_intermediate_size=cfg.moe.expert_hidden, head_dim=cfg.attn_head_dim,
               attention_bias=cfg.attn_bias == "qkvo")
    return out


def _hf_olmoe(cfg, base: dict) -> dict:
    _refuse_options(cfg, "OLMoE", qk_norm=("full",), attn_bias=("none", "qkvo"), head_dim=(None, cfg.d_model // cfg.n_heads))
    _all_moe(cfg, "OLMoE")
    out = _hf_common(cfg, base, "olmoe", "OlmoeForCausalLM")
    out.update(**_moe_hf(cfg, "OLMoE"), num_experts=cfg.moe.num_experts, intermediate_size=cfg.moe.expert_hidden,
               attention_bias=cfg.attn_bias == "qkvo", clip_qkv=None)
    return out


register(HFFamily("llama", "LlamaForCausalLM", _llama, _hf_llama))
register(HFFamily("qwen3", "Qwen3ForCausalLM", _qwen3, _hf_qwen3))
register(HFFamily("mixtral", "MixtralForCausalLM", _mixtral, _hf_mixtral,
                  Names(moe_prefix="block_sparse_moe.", expert=("w1", "w3", "w2"))))
register(HFFamily("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe, _hf_qwen2_moe))
register(HFFamily("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe, _hf_qwen3_moe))
register(HFFamily("olmoe", "OlmoeForCausalLM", _olmoe, _hf_olmoe))

__all__ = ["FAMILIES", "HFConfig", "HFConfigError", "HFFamily", "Names", "register", "to_raymoe_config",
           "family_of", "dataclasses"]
