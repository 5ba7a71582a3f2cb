"""Configuration of one MoE layer (router, capacity, balancing, experts, kernel backend)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

BACKENDS = ("auto", "loop", "padded", "grouped", "blocksparse", "megablocks")


@dataclass
class MoEConfig:
    num_experts: Annotated[int, "routed experts per MoE layer"] = 8
    top_k: Annotated[int, "experts per token (token-choice routing)"] = 2
    expert_hidden: Annotated[int, "hidden width of each expert's SwiGLU MLP"] = 256
    router: Annotated[Literal["topk", "expert_choice"], "token-choice top-k, or expert-choice (each expert takes its top-C tokens of the micro-batch, so training looks ahead; evaluation routes each token to its top_k over the same scores, causally; cannot generate)"] = "topk"
    score_func: Annotated[Literal["softmax", "sigmoid"], "router score function"] = "softmax"
    renormalize: Annotated[bool, "rescale the kept top-k weights to sum to 1 (not for top-1 softmax, whose weight would always be 1)"] = True
    jitter: Annotated[float, "multiplicative uniform jitter on the router input in training (Switch); 0 = off"] = 0.0
    num_groups: Annotated[int | None, "group-limited routing: experts split into this many groups; null = off"] = None
    group_topk: Annotated[int | None, "groups a token may route into (group-limited routing)"] = None
    capacity_factor: Annotated[float | None, "C = ceil(capacity_factor * T * k / E) per expert over a rank's micro-batch in training (evaluation is dropless); with drop_policy score a token can be dropped because of later tokens; null = dropless (causal)"] = None
    min_capacity: Annotated[int, "lower bound on C"] = 4
    drop_policy: Annotated[Literal["score", "position"], "which overflowing copies are dropped in training: lowest score (ranks the whole micro-batch, so later tokens can drop an earlier one: looks ahead), or latest position (a copy is kept or dropped by the copies before it in micro-batch order only, never by a later token of its sequence: training stays causal within a sequence)"] = "score"
    aux_loss_coeff: Annotated[float, "Switch load-balancing loss E * sum_e f_e * P_e (per micro-batch); 0 = off"] = 1e-2
    seq_aux_loss_coeff: Annotated[float, "the same loss per sequence, averaged; 0 = off"] = 0.0
    z_loss_coeff: Annotated[float, "router z-loss mean(logsumexp(logits)^2); 0 = off"] = 1e-3
    bias_update_rate: Annotated[float, "auxiliary-loss-free balancing: per-step sign update of a selection bias; 0 = off"] = 0.0
    routed_scaling_factor: Annotated[float, "multiplies the kept top-k weights after any renormalisation (DeepSeek-V3: 2.5); 1 = off"] = 1.0
    selection_bias: Annotated[bool, "keep the selection-only correction bias (DeepSeek's e_score_correction_bias) in checkpoints even with bias_update_rate 0 (an imported model's bias); the bias, when present, always shifts selection only"] = False
    shared_expert_hidden: Annotated[int | None, "hidden width of an always-on shared expert (DeepSeek); null = none"] = None
    shared_expert_gate: Annotated[bool, "scale the shared expert's output by sigmoid(a learned linear gate of the token) (Qwen2-MoE)"] = False
    backend: Annotated[Literal[BACKENDS], "grouped-GEMM backend for the experts (kernels/); auto = fastest here"] = "auto"

    def __post_init__(self):
        E, k = self.num_experts, self.top_k
        if E < 1 or k < 1:
            raise ValueError(f"num_experts/top_k: must be >= 1, got {E}/{k}")
        if k > E:
            raise ValueError(f"top_k: {k} exceeds num_experts={E}")
        if self.expert_hidden < 1:
            raise ValueError(f"expert_hidden: must be >= 1, got {self.expert_hidden}")
        if (self.num_groups is None) != (self.group_topk is None):
            raise ValueError("num_groups/group_topk: set both for group-limited routing, or neither")
        if self.num_groups is not None:
            if E % self.num_groups:
                raise ValueError(f"num_groups: {self.num_groups} does not divide num_experts={E}")
            if not 1 <= self.group_topk <= self.num_groups:
                raise ValueError(f"group_topk: must be in [1, num_groups={self.num_groups}], got {self.group_topk}")
            if self.group_topk * (E // self.num_groups) < k:
                raise ValueError(f"group_topk: {self.group_topk} groups of {E // self.num_groups} experts "
                                 f"cannot hold top_k={k} choices")
            if self.router != "topk":
                raise ValueError("num_groups: group-limited routing applies to router: topk only")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor: must be > 0 or null (dropless), got {self.capacity_factor}")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ValueError("capacity_factor: expert_choice routing needs one (each expert takes C tokens); e.g. 1.0")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity: must be >= 0, got {self.min_capacity}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter}")
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor: must be > 0, got {self.routed_scaling_factor}")
        if self.selection_bias and self.router != "topk":
            raise ValueError("selection_bias: applies to router: topk only")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden < 1:
            raise ValueError(f"shared_expert_hidden: must be >= 1 or null, got {self.shared_expert_hidden}")
        if self.shared_expert_gate and self.shared_expert_hidden is None:
            raise ValueError("shared_expert_gate: needs a shared expert (set shared_expert_hidden)")
