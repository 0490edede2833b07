"""A Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache, with mixed LoRA.

Per layer, for the T new tokens of the batch (h: [T, hidden]):
    x = RMSNorm(h);  q, k, v = x W_q, x W_k, x W_v  (+ LoRA, + bias)
    q, k = RoPE(q, k, positions);  write k, v into the cache slots
    h = h + Attn(q, K_ctx, V_ctx) W_o  (+ LoRA)
    x = RMSNorm(h);  h = h + (silu(x W_gate) ⊙ (x W_up)) W_down  (+ LoRA on each)
logits = RMSNorm(h)[logits_index] W_lm
LoRA on projection m: y += s · (x A) B per token, with that token's adapter (SGMV).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.kernels import lora_ref
from worker.kernels.attention_ref import paged_attention, write_kv
from worker.kernels.lora_ref import StackedLora
from worker.model.config import ModelConfig
from worker.model.forward_batch import AttentionGroup, ForwardBatch, FusedLora, LoraBatch


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 kv_size, hidden]  (q, k, v fused)
    qkv_bias: torch.Tensor | None  # [q_size + 2 kv_size]
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate, hidden]  (gate, up fused)
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [num_slots, n_kv, d]
    v: list[torch.Tensor]  # per layer [num_slots, n_kv, d]


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,  # [vocab, hidden]
        layers: list[LayerWeights],
        norm: torch.Tensor,  # [hidden]
        lm_head: torch.Tensor,  # [vocab, hidden] (the embedding when tied)
    ) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def allocate_kv(self, num_slots: int) -> KVCache:
        c = self.config
        shape = (num_slots, c.num_kv_heads, c.head_dim)

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        return KVCache([zeros() for _ in self.layers], [zeros() for _ in self.layers])

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:  # [N, vocab] float32
        c = self.config
        h = self.embed[batch.input_ids]  # [T, hidden]
        cos, sin = self._rope(batch.positions)  # [T, d]
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [T, q + 2kv]
            self._lora(batch.lora, index, "qkv", x, qkv)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = apply_rope(q.view(-1, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)
            v = v.reshape(-1, c.num_kv_heads, c.head_dim)
            write_kv(kv.k[index], kv.v[index], k, v, batch.slot_mapping)
            attn = self._attention(q, kv.k[index], kv.v[index], batch.attention)  # [T, q]
            o = F.linear(attn, layer.o)
            self._lora(batch.lora, index, "o", attn, o)
            h = h + o
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            gate_up = F.linear(x, layer.gate_up)  # [T, 2 intermediate]
            self._lora(batch.lora, index, "gate_up", x, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = F.linear(act, layer.down)
            self._lora(batch.lora, index, "down", act, down)
            h = h + down
        h = rms_norm(h[batch.logits_index], self.norm, c.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.config.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, d]
        scale = self.config.rope_attention_scaling
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def _attention(
        self,
        q: torch.Tensor,  # [T, n_heads, d]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        groups: Sequence[AttentionGroup],
    ) -> torch.Tensor:  # [T, n_heads * d]
        if len(groups) == 1:  # the whole batch attends as one group (e.g. all decodes)
            return self._group_attention(q, k_cache, v_cache, groups[0]).flatten(1)
        out = torch.empty_like(q)
        for group in groups:
            out[group.rows] = self._group_attention(q[group.rows], k_cache, v_cache, group)
        return out.flatten(1)

    @staticmethod
    def _group_attention(
        q: torch.Tensor,  # [B · Lq, n_heads, d]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: AttentionGroup,
    ) -> torch.Tensor:  # [B · Lq, n_heads, d]
        b = group.num_seqs
        queries = q.view(b, q.shape[0] // b, *q.shape[1:])
        out = paged_attention(queries, k_cache, v_cache, group.ctx_slots, group.mask)
        return out.flatten(0, 1)

    @staticmethod
    def _lora(
        lora: LoraBatch | None,
        layer: int,
        group: str,  # fused projection group: qkv, o, gate_up or down
        x: torch.Tensor,  # [T, in]
        y: torch.Tensor,  # [T, fused out] updated in place
    ) -> None:
        """y[seg] += (x[seg] @ A_s) @ B_s for each segment's adapter (SGMV shrink, expand)."""
        if lora is None:
            return
        fused = [None if w is None else w.fused(layer, group) for w in lora.adapters]
        if all(f is None for f in fused):
            return
        a = [None if f is None else f.a for f in fused]
        for done in _stacked_decodes(lora, fused, x, y):
            a[done] = None  # computed by one BGMV over its stack
        v = lora_ref.sgmv_shrink(x, lora.segments, a, [1.0] * len(fused))
        parts = [() if f is None else f.parts for f in fused]
        lora_ref.sgmv_expand(y, v, lora.segments, parts)


def _stacked_decodes(
    lora: LoraBatch,
    fused: list[FusedLora | None],
    x: torch.Tensor,  # [T, in]
    y: torch.Tensor,  # [T, fused out], updated in place
) -> list[int]:
    """Run one-row segments whose adapters share a stack as one BGMV; their indices.

    A stack is used when the batch fills at least half of its slots in use, so the
    batched matmul does not read mostly idle adapters; the rest go segment by segment.
    """
    segs = lora.segments
    groups: dict[int, tuple[StackedLora, list[int], list[int], list[int]]] = {}
    for index, f in enumerate(fused):
        if f is None or f.stack is None or segs.ends[index] - segs.starts[index] != 1:
            continue
        stack, rows, slots, members = groups.setdefault(id(f.stack), (f.stack, [], [], []))
        if f.slot not in slots:
            rows.append(segs.starts[index])
            slots.append(f.slot)
            members.append(index)
    done: list[int] = []
    for stack, rows, slots, members in groups.values():
        if 2 * len(slots) >= stack.high_water:
            lora_ref.bgmv_stacked(x, y, torch.tensor(rows), torch.tensor(slots), stack)
            done += members
    return done


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 like the HF reference."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated by position: x·cos + rotate_half(x)·sin (HF's convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
