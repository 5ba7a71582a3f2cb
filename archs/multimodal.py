"""Image-text fusion: dual tower, cross-attention and shared-parameter variants of one family.

Images [B, H, W] or [B, channels, H, W] (floats, e.g. in [0, 1]) are cut into patches, each
linearly embedded with a learned position: a bidirectional transformer encodes them. Captions are
token ids [B, T] (T <= text_len), padded on the right with `pad_id`, embedded with learned
positions.

- dual_tower: an image encoder and a separate causal text encoder. The image embedding is the mean
  of the encoded patches, the text embedding the encoder state at the last non-pad token (which,
  under causal attention, is the only position that has read the whole caption; pads after it
  cannot reach it). Both are projected and L2-normalised; similarity logits are scaled by a learned
  temperature; loss: the symmetric CLIP cross-entropy over the batch.
- cross_attention: the image encoder, then a causal text decoder whose blocks cross-attend to the
  encoded patches. The decoder reads [BOS, t_0 .. t_{T-1}]: position t predicts token t (captioning
  loss: next-token cross-entropy over non-pad tokens), and the position after the last non-pad
  token, having read the whole caption and the image, feeds a matching head (a binary logit).
  Matching is trained against in-batch negatives: the captions rolled by 1 .. match_negatives
  along the batch (a rolled caption identical to the true one is not a negative and is skipped).
- shared: one stack of blocks for both modalities (bidirectional over patches, causal over text),
  with per-modality adapters: input projections and positions, a bottleneck adapter after every
  block (its up-projection starts at zero, so it starts as the identity), final norms and
  projections. Trained contrastively like the dual tower.

Every block's FFN is a SwiGLU or an MoE layer (`archs.ffn.make_ffn`); slots are numbered image
tower first (0 .. image_layers-1), then text (image_layers ..); the shared stack has n_layers
slots. Each MoE call sees one modality only, so routing counts are kept per modality
(`modality_expert_counts`).

`forward(images, tokens)` is `loss_sum`, so a data-parallel wrapper sees the training objective
through its own forward. The contrastive loss is over the batch it is given (no gathering across
ranks: the model never sees ranks).

Shape letters: B batch (images), N candidate captions, T text length, P patches, D model width,
E contrastive embedding width, V vocabulary, K patch size, A adapter width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.common import RMSNorm, init_weights, residual_scale
from archs.ffn import MoEOptions, active_matmul_params, make_ffn
from archs.registry import register

MODALITIES = ("image", "text")


@dataclass
class MultimodalConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "multimodal"
    variant: Annotated[Literal["dual_tower", "cross_attention", "shared"], "fusion: two towers + contrastive loss; a text decoder cross-attending to patches; one stack + adapters"] = "dual_tower"
    image_size: Annotated[int, "image height and width in pixels (square images)"] = 8
    image_channels: Annotated[int, "image channels (1 = grey levels)"] = 1
    patch_size: Annotated[int, "square patch side in pixels; must divide image_size"] = 2
    text_len: Annotated[int, "longest caption in tokens (learned position table size)"] = 32
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    pad_id: Annotated[int, "token id padding captions on the right (byte 0, NUL, for byte tokens)"] = 0
    d_model: Annotated[int, "model width of every tower"] = 128
    n_layers: Annotated[int, "blocks of the text encoder / text decoder / the shared stack"] = 2
    image_layers: Annotated[int | None, "blocks of the image encoder (dual_tower, cross_attention); null = n_layers"] = None
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    embed_dim: Annotated[int | None, "contrastive embedding width (dual_tower, shared); null = d_model"] = None
    adapter_dim: Annotated[int, "bottleneck width of the per-modality adapters (shared)"] = 16
    temperature_init: Annotated[float, "initial softmax temperature of the contrastive logits (learned)"] = 0.07
    match_weight: Annotated[float, "weight of the matching loss beside the captioning loss (cross_attention)"] = 1.0
    match_negatives: Annotated[int, "rolled in-batch negative captions per image for the matching head (cross_attention)"] = 1
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        for name in ("image_size", "image_channels", "patch_size", "text_len", "d_model", "n_layers", "n_heads",
                     "adapter_dim", "match_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model={self.d_model}")
        for name in ("image_layers", "d_ff", "embed_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 or null, got {getattr(self, name)}")
        if self.variant == "shared" and self.image_layers not in (None, self.n_layers):
            raise ValueError(f"image_layers: the shared variant has one stack of n_layers={self.n_layers} blocks "
                             "for both modalities; leave image_layers null")
        if self.vocab_size is not None:
            if self.vocab_size < 2:
                raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
            if not 0 <= self.pad_id < self.vocab_size:
                raise ValueError(f"pad_id: {self.pad_id} outside the vocabulary [0, {self.vocab_size})")
        if self.temperature_init <= 0:
            raise ValueError(f"temperature_init: must be > 0, got {self.temperature_init}")
        if self.match_weight < 0:
            raise ValueError(f"match_weight: must be >= 0, got {self.match_weight}")
        self.check_moe(self.n_ffn_slots)

    @property
    def n_image_layers(self) -> int:
        return self.image_layers or self.n_layers

    @property
    def n_ffn_slots(self) -> int:
        return self.n_layers if self.variant == "shared" else self.n_image_layers + self.n_layers

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def max_seq_len(self) -> int:
        """The loop's name for the longest input: the caption length."""
        return self.text_len


class MultiHeadAttention(nn.Module):
    """Queries from x [B, T, D]; keys and values from x (self-attention) or from ctx [B, S, D]
    (cross-attention); causal or not. Positions come from the learned tables of the inputs."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, ctx_BSD: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        B, T, D = x_BTD.shape
        kv_BSD = x_BTD if ctx_BSD is None else ctx_BSD
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(kv_BSD).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(kv_BSD).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


class FusionBlock(nn.Module):
    """Pre-norm block: self-attention, then (decoder) cross-attention to ctx, then the FFN slot."""

    def __init__(self, d_model: int, n_heads: int, norm_eps: float, mlp: nn.Module, cross: bool):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.cross_norm = RMSNorm(d_model, eps=norm_eps) if cross else None
        self.cross = MultiHeadAttention(d_model, n_heads) if cross else None
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x_BTD: torch.Tensor, causal: bool, ctx_BSD: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), causal=causal)
        if self.cross is not None:
            x_BTD = x_BTD + self.cross(self.cross_norm(x_BTD), ctx_BSD)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Adapter(nn.Module):
    """x + up(gelu(down(x))): a per-modality bottleneck; `up` starts at zero (identity at init)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.down = nn.Linear(d_model, width)
        self.up = nn.Linear(width, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD + self.up(F.gelu(self.down(x_BTD)))


def last_real_token(tokens_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index [B] of the last non-pad token of each caption; -1 for an all-pad caption."""
    T = tokens_BT.shape[1]
    pos_BT = torch.arange(T, device=tokens_BT.device).expand_as(tokens_BT)
    return torch.where(tokens_BT != pad_id, pos_BT, -1).max(dim=1).values


def clip_loss(logits_BB: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss: mean of the image->text and text->image cross-entropies, pair i = i."""
    labels = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels) + F.cross_entropy(logits_BB.t(), labels))


class Multimodal(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: set it, or build through the job config, which takes it from the data")
        self.cfg = cfg
        D, K, Li = cfg.d_model, cfg.patch_size, cfg.n_image_layers
        cross = cfg.variant == "cross_attention"
        out_std = residual_scale(cfg.init_std, max(cfg.n_layers, Li))  # the deeper tower's depth

        def block(slot: int, with_cross: bool = False) -> FusionBlock:
            mlp = make_ffn(D, cfg.hidden, cfg, slot, cfg.init_std, out_std)
            return FusionBlock(D, cfg.n_heads, cfg.norm_eps, mlp, with_cross)

        # Modality inputs (in the shared variant these are its per-modality input adapters).
        self.patch_embed = nn.Linear(cfg.image_channels * K * K, D)
        self.image_pos = nn.Parameter(torch.zeros(cfg.n_patches, D))
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_len + (1 if cross else 0), D))
        if cfg.variant == "shared":
            self.layers = nn.ModuleDict({str(i): block(i) for i in range(cfg.n_layers)})
            self.adapters = nn.ModuleDict({m: nn.ModuleDict({str(i): Adapter(D, cfg.adapter_dim)
                                                             for i in range(cfg.n_layers)}) for m in MODALITIES})
        else:
            self.image_layers = nn.ModuleDict({str(i): block(i) for i in range(Li)})
            self.text_layers = nn.ModuleDict({str(i): block(Li + i, cross) for i in range(cfg.n_layers)})
        self.image_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.text_norm = RMSNorm(D, eps=cfg.norm_eps)
        if cross:
            self.bos = nn.Parameter(torch.zeros(D))
            self.match_head = nn.Linear(D, 1)  # the captioning head is tied to `embed`
        else:
            E = cfg.embed_dim or D
            self.image_proj = nn.Linear(D, E, bias=False)
            self.text_proj = nn.Linear(D, E, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))
        init_weights(self, cfg.init_std, out_std, ("wo", "w2"))
        # NOTE: inputs enter the residual stream at unit scale (torchtitan's embedding init): at 0.02
        # the blocks' first updates swamp them and the mean-pooled image embeddings start (and stay)
        # nearly identical; the contrastive loss then sits at log(batch).
        with torch.no_grad():
            for p in (self.embed.weight, self.image_pos, self.text_pos) + ((self.bos,) if cross else ()):
                nn.init.normal_(p, std=1.0)
            nn.init.normal_(self.patch_embed.weight, std=self.patch_embed.in_features ** -0.5)
            # Cross-attention queries/keys at std d_model^-1/2 (unit-scale scores): at 0.02 the decoder
            # starts by attending uniformly, i.e. it sees the mean of the patches, and measured on 8x8
            # patterns it waited ~300 steps before its captions used the image (~80 steps with this).
            for blk in self.text_layers.values() if cross else ():
                for lin in (blk.cross.wq, blk.cross.wk):
                    nn.init.normal_(lin.weight, std=D ** -0.5)
            if cfg.variant == "shared":
                for adapter in self.adapters.modules():
                    if isinstance(adapter, Adapter):
                        nn.init.zeros_(adapter.up.weight)
        self._moe_row = {slot: row for row, slot in enumerate(cfg.moe_layer_ids)}
        self._counts: dict[str, torch.Tensor] = {}
        self.last_loss_parts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------
    # Towers
    # ------------------------------------------------------------------------------------------

    def _stack(self, modality: str) -> nn.ModuleDict:
        if self.cfg.variant == "shared":
            return self.layers
        return self.image_layers if modality == "image" else self.text_layers

    def _run(self, modality: str, x_BTD: torch.Tensor, causal: bool, ctx_BSD: torch.Tensor | None = None) -> torch.Tensor:
        stack = self._stack(modality)
        for key, blk in stack.items():
            x_BTD = blk(x_BTD, causal, ctx_BSD)
            if self.cfg.variant == "shared":
                x_BTD = self.adapters[modality][key](x_BTD)
        self._record(modality, stack)
        return x_BTD

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W] or [B, channels, H, W] -> patches [B, P, channels * K * K] (row-major patch order)."""
        cfg = self.cfg
        if images.dim() == 3:
            images = images[:, None]
        S, K = cfg.image_size, cfg.patch_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.image_channels, S, S):
            raise ValueError(f"expected images [batch, {S}, {S}] or [batch, {cfg.image_channels}, {S}, {S}] "
                             f"(model.image_channels, model.image_size), got shape {tuple(images.shape)}")
        B = images.shape[0]
        x = images.unfold(2, K, K).unfold(3, K, K)  # [B, ch, S/K, S/K, K, K]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, cfg.n_patches, -1)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Encoded patches [B, P, D] (bidirectional; normalised by the image tower's final norm)."""
        x_BPD = self.patch_embed(self.patchify(images.float())) + self.image_pos
        return self.image_norm(self._run("image", x_BPD, causal=False))

    def _check_tokens(self, tokens_BT: torch.Tensor) -> None:
        if tokens_BT.dim() != 2 or tokens_BT.shape[1] > self.cfg.text_len:
            raise ValueError(f"expected captions [batch, T <= {self.cfg.text_len}] (model.text_len), "
                             f"got shape {tuple(tokens_BT.shape)}")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Contrastive image embeddings [B, E], unit norm (dual_tower, shared): mean over patches."""
        self._need_contrastive("encode_images")
        return F.normalize(self.image_proj(self.encode_image_tokens(images).mean(dim=1)), dim=-1)

    def encode_texts(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Contrastive caption embeddings [N, E], unit norm (dual_tower, shared): causal encoder, read at
        the last non-pad token."""
        self._need_contrastive("encode_texts")
        self._check_tokens(tokens_BT)
        T = tokens_BT.shape[1]
        h_BTD = self.text_norm(self._run("text", self.embed(tokens_BT) + self.text_pos[:T], causal=True))
        last_B = last_real_token(tokens_BT, self.cfg.pad_id).clamp_min(0)
        pooled_BD = h_BTD[torch.arange(tokens_BT.shape[0], device=h_BTD.device), last_B]
        return F.normalize(self.text_proj(pooled_BD), dim=-1)

    def _need_contrastive(self, what: str) -> None:
        if self.cfg.variant == "cross_attention":
            raise ValueError(f"{what}: the cross_attention variant has no contrastive embeddings; "
                             "use match_scores, or model.variant: dual_tower | shared")

    def _decode(self, image_BPD: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Decoder states [B, T+1, D] over [BOS, t_0 .. t_{T-1}], cross-attending to the patches."""
        self._check_tokens(tokens_BT)
        B, T = tokens_BT.shape
        x = torch.cat([self.bos.expand(B, 1, -1), self.embed(tokens_BT)], dim=1) + self.text_pos[:T + 1]
        return self.text_norm(self._run("text", x, causal=True, ctx_BSD=image_BPD))

    def _match_logits(self, h_BTD: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Matching logit [B] read at the position that has seen the last non-pad token."""
        read_B = last_real_token(tokens_BT, self.cfg.pad_id) + 1
        return self.match_head(h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), read_B]).squeeze(-1)

    def caption_logits(self, images: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """(cross_attention) logits [B, T, V]: position t predicts tokens[:, t] from the image and tokens[:, :t]."""
        if self.cfg.variant != "cross_attention":
            raise ValueError("caption_logits: only the cross_attention variant decodes text (model.variant)")
        h = self._decode(self.encode_image_tokens(images), tokens_BT)
        return self._caption_head(h[:, :-1])

    def _caption_head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        # Tied to the unit-scale embedding: scaled by d_model^-1/2 (as T5 does) for unit-scale logits.
        return (h_BTD @ self.embed.weight.t()) * self.cfg.d_model ** -0.5

    # ------------------------------------------------------------------------------------------
    # Objective and scores
    # ------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The training objective: see `loss_sum`."""
        return self.loss_sum(images, tokens_BT)

    def loss_sum(self, images: torch.Tensor, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B x the batch's mean objective (fp32 scalar), B) for B image-caption pairs.

        dual_tower / shared: the symmetric CLIP loss. cross_attention: mean captioning cross-entropy
        over non-pad tokens + match_weight x mean binary matching cross-entropy over the true pairs
        and the rolled negatives. The parts are kept, detached, in `last_loss_parts`.
        """
        B = images.shape[0]
        if tokens_BT.shape[0] != B:
            raise ValueError(f"loss_sum: {B} images but {tokens_BT.shape[0]} captions; they come in pairs")
        if self.cfg.variant != "cross_attention":
            logits_BB = self.logit_scale.exp().clamp(max=100.0) * self.encode_images(images) @ self.encode_texts(tokens_BT).t()
            loss = clip_loss(logits_BB.float())
            self.last_loss_parts = {"contrastive": loss.detach()}
            return loss * B, B
        cfg = self.cfg
        image_BPD = self.encode_image_tokens(images)
        shifts = list(range(1, min(cfg.match_negatives, B - 1) + 1))
        # One decoder pass over the true captions and every rolled copy (same images).
        all_tokens = torch.cat([tokens_BT] + [tokens_BT.roll(s, dims=0) for s in shifts])
        h = self._decode(image_BPD.repeat(1 + len(shifts), 1, 1), all_tokens)
        logits_BTV = self._caption_head(h[:B, :-1])
        real_BT = tokens_BT != cfg.pad_id
        ce_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), tokens_BT.flatten(), reduction="none").view_as(real_BT)
        caption = (ce_BT * real_BT).sum() / real_BT.sum().clamp_min(1)
        match = self._match_logits(h, all_tokens).float()
        is_pair = torch.zeros_like(match, dtype=torch.bool)
        is_pair[:B] = True
        # A rolled caption equal to the true one is not a negative: leave it out of the loss.
        counted = is_pair | (all_tokens != tokens_BT.repeat(1 + len(shifts), 1)).any(dim=1)
        bce = F.binary_cross_entropy_with_logits(match, is_pair.float(), reduction="none")
        match_loss = (bce * counted).sum() / counted.sum()
        loss = caption + cfg.match_weight * match_loss
        self.last_loss_parts = {"caption": caption.detach(), "match": match_loss.detach()}
        return loss * B, B

    def match_scores(self, images: torch.Tensor, tokens_NT: torch.Tensor) -> torch.Tensor:
        """Scores [B, N] of every image against every candidate caption; higher = better match.

        dual_tower / shared: cosine similarity of the embeddings. cross_attention: the matching head's
        logit, one decoder pass per (image, caption) pair (B x N rows).
        """
        if self.cfg.variant != "cross_attention":
            return self.encode_images(images) @ self.encode_texts(tokens_NT).t()
        self._check_tokens(tokens_NT)
        B, N = images.shape[0], tokens_NT.shape[0]
        image_BPD = self.encode_image_tokens(images)
        pair_tokens = tokens_NT.repeat(B, 1)  # row b * N + n: caption n
        h = self._decode(image_BPD.repeat_interleave(N, dim=0), pair_tokens)
        return self._match_logits(h, pair_tokens).view(B, N)

    # ------------------------------------------------------------------------------------------
    # Routing statistics per modality
    # ------------------------------------------------------------------------------------------

    def _record(self, modality: str, stack: nn.Module) -> None:
        """Add the routing counts of the MoE layers of `stack` (just run on `modality`) to its totals."""
        if not self._moe_row:
            return
        for m in stack.modules():
            counts_E = getattr(m, "last_counts_E", None)
            if counts_E is None:
                continue
            buf = self._counts.get(modality)
            if buf is None:
                buf = self._counts[modality] = torch.zeros(len(self._moe_row), counts_E.numel(), dtype=torch.long,
                                                           device=counts_E.device)
            buf[self._moe_row[m.layer_id]] += counts_E.long()

    def modality_expert_counts(self) -> dict[str, torch.Tensor]:
        """Token-to-expert assignments per modality since the last reset: {"image": [layers, E], "text": ...},
        int64, rows in the order of `cfg.moe_layer_ids` (rows of a tower the modality never runs stay 0).
        Counts are before capacity dropping; every position is counted, caption padding included."""
        cfg = self.cfg
        if cfg.moe is None:
            return {m: torch.zeros(0, 0, dtype=torch.long) for m in MODALITIES}
        shape = (len(self._moe_row), cfg.moe.num_experts)
        return {m: self._counts[m].clone() if m in self._counts else torch.zeros(shape, dtype=torch.long)
                for m in MODALITIES}

    def reset_modality_counts(self) -> None:
        self._counts = {}

    # ------------------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward, approximate) of one pair divided by `seq_len`, its caption
        tokens: 6 x the active matmul parameters each patch and text position runs, attention scores,
        the tied captioning head and the matching negatives' extra decoder passes."""
        cfg = self.cfg
        D, P, L = cfg.d_model, cfg.n_patches, cfg.n_layers
        cross = cfg.variant == "cross_attention"
        matrices = lambda name, p: p.dim() >= 2  # noqa: E731
        image = active_matmul_params(self._stack("image"), matrices) + self.patch_embed.weight.numel()
        text = active_matmul_params(self._stack("text"), matrices)
        if cfg.variant == "shared":
            image += active_matmul_params(self.adapters["image"], matrices)
            text += active_matmul_params(self.adapters["text"], matrices)
        Li = L if cfg.variant == "shared" else cfg.n_image_layers
        T = seq_len + 1 if cross else seq_len
        rows = 1 + (cfg.match_negatives if cross else 0)  # true captions + rolled negatives (at most B-1)
        flops = 6 * P * image + 12 * Li * D * P * P
        flops += rows * (6 * T * text + 12 * L * D * T * T + (12 * L * D * T * P if cross else 0))
        flops += 6 * seq_len * cfg.vocab_size * D if cross else 12 * D * (cfg.embed_dim or D)
        return flops / seq_len


PRESETS = {
    "debug": dict(image_size=8, patch_size=4, text_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, adapter_dim=8),
    # ~1M parameters with a 257-token vocabulary (dual_tower ~0.93M, cross_attention ~1.0M, shared ~0.52M).
    "small": dict(image_size=8, patch_size=2, text_len=32, d_model=128, n_layers=2, n_heads=4, adapter_dim=16),
}

register("multimodal", MultimodalConfig, Multimodal, PRESETS)
