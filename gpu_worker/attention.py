"""Attention for every family: RoPE (default, linear, YaRN; full, partial or interleaved), the KV cache,
grouped-query attention (biases, q/k norm, sliding window, gpt-oss's attention sinks) and DeepSeek's
multi-head latent attention (MLA).

MLA caches what its keys and values are made from, not the keys and values: per token the
normalized KV latent [kv_lora_rank] and the RoPE key [qk_rope_head_dim] shared by all heads
(`ModelArgs.kv_bytes_per_token`). Attention runs in the absorbed form: the query's no-RoPE part is
mapped into the latent space through kv_b's key half, scores are taken against the latents directly,
and the probabilities' mix of latents goes through kv_b's value half. That is the same sum as
expanding every cached latent into per-head keys and values (transformers' order), regrouped.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from expert_store.model_args import ModelArgs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# -- RoPE ---------------------------------------------------------------------------------------------


def rope_dim(a: ModelArgs) -> int:
    return a.rotary_dim or a.head_dim


def rope_inv_freq(a: ModelArgs, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [rope_dim / 2]; YaRN blends interpolated and extrapolated ones as transformers does."""
    d = rope_dim(a)
    pos_freqs = a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(device, torch.float32) / d)
    if a.rope_type != "yarn":
        return 1.0 / pos_freqs

    def correction_dim(rotations: float) -> float:
        return d * math.log(a.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(a.rope_theta))

    low, high = correction_dim(a.rope_beta_fast), correction_dim(a.rope_beta_slow)
    if a.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # share of the original frequency, per dim pair
    return (1.0 / (a.rope_scaling_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(a: ModelArgs, inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] (YaRN's attention factor folded in)."""
    pos = positions.float() / (a.rope_scaling_factor if a.rope_type == "linear" else 1.0)
    freqs = pos[:, None] * inv_freq[None, :]  # [T, d/2]
    f = a.rope_attention_factor
    return (freqs.cos() * f).to(dtype), (freqs.sin() * f).to(dtype)


def apply_rope(a: ModelArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]: rotate the first rope_dim dims of each head (pairs (i, i + d/2), or (2i, 2i + 1)
    with rope_interleave, whose result is laid out evens then odds as transformers' DeepSeek-V3 does:
    a permutation applied to queries and keys alike, so every score is the same)."""
    d = cos.shape[-1] * 2
    rot, rest = x[..., :d], x[..., d:]
    c, s = cos[:, None], sin[:, None]  # [T, 1, d/2]
    if a.rope_interleave:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


# -- the KV cache ----------------------------------------------------------------------------------------


class SequenceKV:
    """One sequence's KV cache, grown by doubling. Per layer two buffers [heads, capacity, dim]:
    keys and values (GQA), or MLA's latent [1, capacity, kv_lora_rank] and rope key [1, capacity, rope dim]."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.length = 0
        if args.attention == "mla":
            shapes = ((1, args.kv_lora_rank), (1, args.qk_rope_head_dim))
        else:
            shapes = ((args.num_kv_heads, args.head_dim), (args.num_kv_heads, args.value_head_dim))
        (n_a, d_a), (n_b, d_b) = shapes
        self.k = [torch.empty((n_a, capacity, d_a), device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.v = [torch.empty((n_b, capacity, d_b), device=device, dtype=dtype) for _ in range(args.num_layers)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [n, t, d] after the cached tokens; return everything cached [n, length + t, d]."""
        t = k.shape[1]
        end = self.length + t
        if end > self.k[layer].shape[1]:
            new_cap = max(end, 2 * self.k[layer].shape[1])
            for cache in (self.k, self.v):
                old = cache[layer]
                grown = torch.empty((old.shape[0], new_cap, old.shape[2]), device=old.device, dtype=old.dtype)
                grown[:, : self.length] = old[:, : self.length]
                cache[layer] = grown
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, t: int) -> None:
        self.length += t


# -- attention -------------------------------------------------------------------------------------------


def _probs(a: ModelArgs, layer: int, scores: torch.Tensor, past: int, sinks: torch.Tensor | None) -> torch.Tensor:
    """scores [nh, t, past + t] -> attention probabilities (causal, sliding window, sinks) in scores' dtype."""
    t, n = scores.shape[1], scores.shape[2]
    q_pos = torch.arange(past, past + t, device=scores.device)[:, None]
    k_pos = torch.arange(n, device=scores.device)[None, :]
    allowed = k_pos <= q_pos
    if a.sliding_window is not None and layer not in a.full_attention_layers:
        allowed &= k_pos > q_pos - a.sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    # gpt-oss: each head's sink logit joins the softmax, then its column is dropped
    sink = sinks.to(scores.dtype)[:, None, None].expand(-1, t, 1)
    combined = torch.cat((scores, sink), dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def _scale(a: ModelArgs) -> float:
    return a.softmax_scale or 1.0 / math.sqrt(a.head_dim)


def gqa_attention(a: ModelArgs, layer: int, p: dict[str, torch.Tensor], h: torch.Tensor, seqs: Sequence[SequenceKV],
                  lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """h [T, H] (all sequences' new tokens, in order) -> attention output [T, H]."""
    T = h.shape[0]
    q = F.linear(h, p["q"], p.get("q_bias"))  # [T, nh*hd]
    k = F.linear(h, p["k"], p.get("k_bias"))  # [T, nkv*hd]
    v = F.linear(h, p["v"], p.get("v_bias"))  # [T, nkv*vd]
    if a.qk_norm == "full":
        q, k = rms_norm(q, p["q_norm"], a.rms_norm_eps), rms_norm(k, p["k_norm"], a.rms_norm_eps)
    if a.clip_qkv is not None:
        q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
    q = q.view(T, a.num_heads, a.head_dim)
    k = k.view(T, a.num_kv_heads, a.head_dim)
    v = v.view(T, a.num_kv_heads, a.value_head_dim)
    if a.qk_norm == "head":
        q, k = rms_norm(q, p["q_norm"], a.rms_norm_eps), rms_norm(k, p["k_norm"], a.rms_norm_eps)
    q, k = apply_rope(a, q, cos, sin), apply_rope(a, k, cos, sin)

    out = q.new_empty((T, a.num_heads, a.value_head_dim))
    groups = a.num_heads // a.num_kv_heads
    scale = _scale(a)
    start = 0
    for seq, t in zip(seqs, lengths):
        past = seq.length
        keys, values = seq.append(layer, k[start : start + t].transpose(0, 1), v[start : start + t].transpose(0, 1))
        keys = keys.repeat_interleave(groups, dim=0)  # [nh, past+t, hd]
        values = values.repeat_interleave(groups, dim=0)
        qs = q[start : start + t].transpose(0, 1)  # [nh, t, hd]
        probs = _probs(a, layer, (qs @ keys.transpose(1, 2)) * scale, past, p.get("sinks"))  # [nh, t, past+t]
        out[start : start + t] = (probs @ values).transpose(0, 1)
        start += t
    return F.linear(out.reshape(T, -1), p["o"], p.get("o_bias"))


def mla_attention(a: ModelArgs, layer: int, p: dict[str, torch.Tensor], h: torch.Tensor, seqs: Sequence[SequenceKV],
                  lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2/V3 attention on h [T, H] -> [T, H]; the cache holds latents and rope keys only."""
    T, nh = h.shape[0], a.num_heads
    dn, dr, dv, r = a.qk_nope_head_dim, a.qk_rope_head_dim, a.value_head_dim, a.kv_lora_rank
    if a.q_lora_rank:
        q_lat = rms_norm(F.linear(h, p["q_a"], p.get("q_a_bias")), p["q_a_norm"], a.rms_norm_eps)  # [T, q_lora]
        q = F.linear(q_lat, p["q_b"])
    else:
        q = F.linear(h, p["q"])
    q = q.view(T, nh, dn + dr)
    q_nope, q_pe = q[..., :dn], apply_rope(a, q[..., dn:], cos, sin)  # [T, nh, dn], [T, nh, dr]
    ckv = F.linear(h, p["kv_a"], p.get("kv_a_bias"))  # [T, r + dr]
    latent = rms_norm(ckv[:, :r], p["kv_a_norm"], a.rms_norm_eps)  # [T, r]
    k_pe = apply_rope(a, ckv[:, None, r:], cos, sin)  # [T, 1, dr]
    w_kv = p["kv_b"].view(nh, dn + dv, r)
    w_k, w_v = w_kv[:, :dn], w_kv[:, dn:]  # [nh, dn, r], [nh, dv, r]
    q_abs = torch.einsum("thd,hdr->htr", q_nope, w_k)  # [nh, T, r]: the query in latent space
    q_pe = q_pe.transpose(0, 1)  # [nh, T, dr]

    out = q.new_empty((T, nh, dv))
    scale = _scale(a)
    start = 0
    for seq, t in zip(seqs, lengths):
        past = seq.length
        lat, kpe = seq.append(layer, latent[None, start : start + t], k_pe[start : start + t].transpose(0, 1))
        # lat [1, past+t, r], kpe [1, past+t, dr]
        scores = (q_abs[:, start : start + t] @ lat.transpose(1, 2) + q_pe[:, start : start + t] @ kpe.transpose(1, 2))
        probs = _probs(a, layer, scores * scale, past, None)  # [nh, t, past+t]
        mixed = probs @ lat  # [nh, t, r]
        out[start : start + t] = torch.einsum("htr,hvr->thv", mixed, w_v)
        start += t
    return F.linear(out.reshape(T, -1), p["o"], p.get("o_bias"))
