"""Tiny random Hugging Face models of each imported family (no downloads), for tests and benchmarks.

Sizes fit a CPU test; the options the published checkpoints use are on (GQA, RoPE scaling,
per-head or whole-projection q/k norm, biases, shared expert, dense layers between MoE ones);
weights are redrawn with enough spread that logits are not near-tied.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=16),
                                  tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="linear", rope_theta=1e6, factor=2.0))),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=4,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         norm_topk_prob=False, decoder_sparse_step=2, qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=16, num_experts_per_tok=8, moe_intermediate_size=24,
                                         head_dim=24, norm_topk_prob=True, mlp_only_layers=[1])),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
                                  intermediate_size=32, router_aux_loss_coef=0.01)),
}


def hf_config(family: str, **changes):
    import transformers

    cls_name, opts = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**BASE, **opts, **changes})


@torch.no_grad()
def spread_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every weight: matrices at 1/sqrt(fan_in) (unit-scale activations), norms around 1,
    biases around 0, so that logits spread over several units and the top-2 margin is rarely tiny."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif "norm" in name:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def build_hf_model(family: str, seed: int = 0, **changes):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **changes))
    spread_weights(model, seed)
    return model.eval()


def tiny_tokenizer(out: Path):
    """A byte-level BPE trained on pydoc text with bos/eos/pad and a bos-prepending post-processor
    (Llama's), saved as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE["vocab_size"] - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return fast


def write_hf_dir(family: str, out: Path, seed: int = 0, max_shard_size: str | None = "100KB", **changes):
    """save_pretrained of a tiny spread-out model (sharded with an index) plus the tiny tokenizer."""
    model = build_hf_model(family, seed, **changes)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kw)
    tiny_tokenizer(out)
    return model
