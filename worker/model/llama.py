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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.model.config import ModelConfig
from worker.model.forward_batch import ForwardBatch
from worker.model.linear import Linear
from worker.model.ops import Ops, ops_for


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [T, hidden] -> [T, q_size + 2 kv_size]  (q, k, v fused; Qwen2: + bias)
    o: Linear  # [T, q_size] -> [T, hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [T, hidden] -> [T, 2 intermediate]  (gate, up fused)
    down: Linear  # [T, intermediate] -> [T, hidden]

    @property
    def qkv_bias(self) -> torch.Tensor | None:  # [q_size + 2 kv_size]
        return self.qkv.bias


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
        self.ops: Ops = ops_for(embed.device)
        # on the model's device once: a copy per step would be a host transfer inside a
        # captured decode graph (worker/decode_graphs.py), where none may happen
        self.inv_freq = config.inv_freq.to(embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv: torch.Tensor,  # [pool rows, kv_size]: the page pool as KV rows (docs/memory.md)
    ) -> torch.Tensor:  # [N, vocab] float32
        c, ops, lora = self.config, self.ops, batch.lora
        h = self.embed[batch.input_ids]  # [T, hidden]
        cos, sin = self._rope(batch.positions)  # [T, d]
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(x)  # [T, q + 2kv]
            if lora is not None:
                ops.lora(x, qkv, lora, index, 0)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = apply_rope(q.view(-1, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)
            v = v.reshape(-1, c.num_kv_heads, c.head_dim)
            ops.write_kv(kv, index, k, v, batch)
            attn = ops.attention(q, kv, index, batch).flatten(1)  # [T, q]
            o = layer.o(attn)  # [T, hidden]
            if lora is not None:
                ops.lora(attn, o, lora, index, 1)
            h = h + o
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            gate_up = layer.gate_up(x)  # [T, 2 intermediate]
            if lora is not None:
                ops.lora(x, gate_up, lora, index, 2)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = layer.down(act)  # [T, hidden]
            if lora is not None:
                ops.lora(act, down, lora, index, 3)
            h = h + down
        h = rms_norm(h[batch.logits_index], self.norm, c.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, d]
        scale = self.config.rope_attention_scaling
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)


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
