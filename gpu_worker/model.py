"""The MoE decoder in plain PyTorch: embeddings, RMSNorm, RoPE, GQA attention with a
KV cache, routers in fp32, routed experts through an `ExpertProvider`, the LM head.

One forward runs a ragged batch: any number of sequences, each bringing any
number of new tokens (a whole prompt at prefill, one token per decode step).
Projections, routers and experts run on all tokens at once; only attention is
per sequence. That is what lets concurrent requests share a decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
import torch.nn.functional as F

from expert_store import hf_names
from expert_store.errors import FateError

from expert_store.model_args import ModelArgs

if TYPE_CHECKING:
    from .experts import ExpertProvider


class WeightsError(FateError, ValueError):
    """Dense weights missing or of the wrong shape (names the tensor)."""


class TokenRangeError(FateError, ValueError):
    """A token id outside the vocabulary."""


class RoutingObserver(Protocol):
    """Sees what the model routes, for predictors, statistics and traces."""

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        """`gate_input` [T, H]: layer `layer`'s post-attention norm output, before its router runs."""

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """expert_ids, weights: [T, K] for MoE layer `layer`."""


class SequenceKV:
    """One sequence's KV cache: per layer [n_kv, capacity, head_dim], grown by doubling."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.length = 0
        self._shape = (args.num_kv_heads, capacity, args.head_dim)
        self.k = [torch.empty(self._shape, device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.v = [torch.empty(self._shape, device=device, dtype=dtype) for _ in range(args.num_layers)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [n_kv, t, hd] after the cached tokens; return all keys/values [n_kv, length + t, hd]."""
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


@dataclass
class _Layer:
    attn: dict[str, torch.Tensor]
    router: torch.Tensor | None = None  # [E, H] fp32
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_mlp: dict[str, torch.Tensor] = field(default_factory=dict)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class MoEModel:
    def __init__(
        self,
        args: ModelArgs,
        dense: dict[str, torch.Tensor],
        experts: ExpertProvider,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        observer: RoutingObserver | None = None,
    ):
        self.args = args
        self.device = torch.device(device)
        self.dtype = dtype
        self.experts = experts
        self.observer = observer
        self.loaded_names: set[str] = set()

        def w(name: str, shape: tuple[int, ...], dt: torch.dtype = dtype) -> torch.Tensor:
            if name not in dense:
                raise WeightsError(f"dense weights: tensor {name!r} is missing")
            t = dense[name]
            if tuple(t.shape) != shape:
                raise WeightsError(f"dense weights: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
            self.loaded_names.add(name)
            return t.to(device=self.device, dtype=dt)

        a = args
        H, hd = a.hidden_size, a.head_dim
        q_dim, kv_dim = a.num_heads * hd, a.num_kv_heads * hd
        self.embed = w(hf_names.embed_tokens(), (a.vocab_size, H))
        self.norm = w(hf_names.final_norm(), (H,))
        self.lm_head = self.embed if a.tie_word_embeddings else w(hf_names.lm_head(), (a.vocab_size, H))
        attn_shapes = {
            "input_norm": (H,), "post_attention_norm": (H,),
            "q": (q_dim, H), "k": (kv_dim, H), "v": (kv_dim, H), "o": (H, q_dim),
            "q_bias": (q_dim,), "k_bias": (kv_dim,), "v_bias": (kv_dim,), "o_bias": (H,),
            "q_norm": (hd,) if a.qk_norm == "head" else (q_dim,),
            "k_norm": (hd,) if a.qk_norm == "head" else (kv_dim,),
        }  # fmt: skip
        self.layers: list[_Layer] = []
        for i in range(a.num_layers):
            layer = _Layer(attn={r: w(n, attn_shapes[r]) for r, n in hf_names.attention(a, i).items()})
            if i in a.moe_layers:
                layer.router = w(hf_names.router(a, i), (a.num_experts, H), torch.float32)
                S = a.shared_expert_intermediate_size
                shapes = {"gate": (S, H), "up": (S, H), "down": (H, S), "gate_score": (1, H)}
                layer.shared = {r: w(n, shapes[r]) for r, n in hf_names.shared_expert(a, i).items()}
            else:
                D = a.dense_intermediate_size
                shapes = {"gate": (D, H), "up": (D, H), "down": (H, D)}
                layer.dense_mlp = {r: w(n, shapes[r]) for r, n in hf_names.dense_mlp(a, i).items()}
            self.layers.append(layer)
        self.inv_freq = 1.0 / (
            a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(self.device, torch.float32) / hd)
        )  # [hd/2]

    def new_sequence(self, capacity: int = 64) -> SequenceKV:
        return SequenceKV(self.args, self.device, self.dtype, capacity)

    # -- pieces ---------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (positions.float() / self.args.rope_scaling_factor)[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _attention(
        self, i: int, h: torch.Tensor, seqs: Sequence[SequenceKV], lengths: list[int], cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        a, p = self.args, self.layers[i].attn
        T = h.shape[0]
        q = F.linear(h, p["q"], p.get("q_bias"))  # [T, nh*hd]
        k = F.linear(h, p["k"], p.get("k_bias"))  # [T, nkv*hd]
        v = F.linear(h, p["v"], p.get("v_bias"))
        if a.qk_norm == "full":
            q, k = rms_norm(q, p["q_norm"], a.rms_norm_eps), rms_norm(k, p["k_norm"], a.rms_norm_eps)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.view(T, a.num_heads, a.head_dim)
        k = k.view(T, a.num_kv_heads, a.head_dim)
        v = v.view(T, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = rms_norm(q, p["q_norm"], a.rms_norm_eps), rms_norm(k, p["k_norm"], a.rms_norm_eps)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]

        out = torch.empty_like(q)  # [T, nh, hd]
        groups = a.num_heads // a.num_kv_heads
        start = 0
        for seq, t in zip(seqs, lengths):
            past = seq.length
            keys, values = seq.append(i, k[start : start + t].transpose(0, 1), v[start : start + t].transpose(0, 1))
            keys = keys.repeat_interleave(groups, dim=0)  # [nh, past+t, hd]
            values = values.repeat_interleave(groups, dim=0)
            qs = q[start : start + t].transpose(0, 1)  # [nh, t, hd]
            scores = (qs @ keys.transpose(1, 2)) / math.sqrt(a.head_dim)  # [nh, t, past+t]
            q_pos = torch.arange(past, past + t, device=h.device)[:, None]
            k_pos = torch.arange(past + t, device=h.device)[None, :]
            allowed = k_pos <= q_pos
            if a.sliding_window is not None:
                allowed &= k_pos > q_pos - a.sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
            out[start : start + t] = (probs @ values).transpose(0, 1)
            start += t
        return F.linear(out.reshape(T, -1), p["o"], p.get("o_bias"))

    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's router on gate input h [T, H] -> (expert ids [T, K], weights [T, K] fp32)."""
        logits = F.linear(h.float(), self.layers[i].router)  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.args.top_k, dim=-1)  # [T, K], [T, K]
        if self.args.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def _moe(self, i: int, h: torch.Tensor, observer: RoutingObserver | None, experts: ExpertProvider
             ) -> torch.Tensor:
        ids, weights = self.route(i, h)
        if observer is not None:
            observer.on_routing(i, ids, weights)
        weights = weights.to(h.dtype)
        needed = torch.unique(ids).tolist()  # ascending: the order of the sum below
        counts = torch.bincount(ids.reshape(-1), minlength=self.args.num_experts).tolist()  # [E]
        popular = sorted(needed, key=lambda e: (-counts[e], e))  # most token assignments first: fetch order
        out = torch.zeros_like(h)
        # The provider yields each expert when it is ready (resident ones first) and may
        # evict it once we ask for the next: the order of the sum is fixed below, so the
        # result does not depend on the arrival order.
        ys: dict[int, torch.Tensor] = {}
        for e, compute in experts.iter_experts(i, popular):
            tok, slot = torch.where(ids == e)
            ys[e] = compute(h[tok]).to(h.dtype) * weights[tok, slot, None]  # [t_e, H]
            del compute  # let the cache free it before it builds the next one
        for e in needed:
            tok, _ = torch.where(ids == e)
            out.index_add_(0, tok, ys[e])
        shared = self.layers[i].shared
        if shared:
            s = swiglu(h, shared["gate"], shared["up"], shared["down"])
            out = out + torch.sigmoid(F.linear(h, shared["gate_score"])) * s
        return out

    # -- the forward ----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, seqs: Sequence[SequenceKV], tokens: Sequence[torch.Tensor], all_logits: bool = False,
        observer: RoutingObserver | None = None, experts: ExpertProvider | None = None,
    ) -> torch.Tensor:
        """Run new `tokens[j]` (1-D ids) of each sequence `seqs[j]` through the model.

        `observer` / `experts`: this forward's routing observer and expert provider (default: the
        model's own, given at construction).

        Returns logits fp32: [sum t_j, V] when all_logits, else the last token's [len(seqs), V].
        Each sequence's KV cache is advanced by its tokens.
        """
        a = self.args
        observer = self.observer if observer is None else observer
        experts = self.experts if experts is None else experts
        lengths = [int(t.numel()) for t in tokens]
        ids = torch.cat([t.reshape(-1) for t in tokens]).to(self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= a.vocab_size:
            raise TokenRangeError(f"token id out of range 0..{a.vocab_size - 1}")
        positions = torch.cat(
            [torch.arange(s.length, s.length + t, device=self.device) for s, t in zip(seqs, lengths)]
        )
        cos, sin = self._rope(positions)
        x = F.embedding(ids, self.embed)  # [T, H]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn["input_norm"], a.rms_norm_eps)
            x = x + self._attention(i, h, seqs, lengths, cos, sin)
            h = rms_norm(x, layer.attn["post_attention_norm"], a.rms_norm_eps)
            if layer.router is not None:
                if observer is not None:
                    observer.on_gate_input(i, h)
                x = x + self._moe(i, h, observer, experts)
            else:
                m = layer.dense_mlp
                x = x + swiglu(h, m["gate"], m["up"], m["down"])
        for s, t in zip(seqs, lengths):
            s.advance(t)
        if not all_logits:
            last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            x = x[last]
        x = rms_norm(x, self.norm, a.rms_norm_eps)
        return F.linear(x, self.lm_head).float()
