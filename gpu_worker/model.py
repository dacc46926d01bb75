"""The MoE decoder in plain PyTorch: embeddings, RMSNorm, attention with a KV cache (GQA or MLA,
gpu_worker.attention), routers in fp32 (gpu_worker.routing), routed experts through an
`ExpertProvider`, shared experts and dense MLP layers, the LM head.

One forward runs a ragged batch: any number of sequences, each bringing any
number of new tokens (a whole prompt at prefill, one token per decode step).
Projections, routers and experts run on all tokens at once; only attention is
per sequence. That is what lets concurrent requests share a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
import torch.nn.functional as F

from expert_store import hf_names
from expert_store.errors import FateError
from expert_store.model_args import ModelArgs

from .attention import SequenceKV, gqa_attention, mla_attention, rms_norm, rope_cos_sin, rope_inv_freq
from .routing import Router

if TYPE_CHECKING:
    from .expert_compute import ExpertCompute
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


@dataclass
class _Layer:
    attn: dict[str, torch.Tensor]
    router: Router | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_mlp: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # gate/up [E, I], down [E, H]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def clamped_swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)."""
    g = g.clamp(max=limit)
    return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)


def _attn_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    H, hd, nh = a.hidden_size, a.head_dim, a.num_heads
    shapes = {"input_norm": (H,), "post_attention_norm": (H,), "o": (H, nh * a.value_head_dim), "o_bias": (H,)}
    if a.attention == "mla":
        r, dr, ql = a.kv_lora_rank, a.qk_rope_head_dim, a.q_lora_rank
        return shapes | {
            "q": (nh * hd, H), "q_a": (ql, H), "q_a_bias": (ql,), "q_a_norm": (ql,), "q_b": (nh * hd, ql),
            "kv_a": (r + dr, H), "kv_a_bias": (r + dr,), "kv_a_norm": (r,),
            "kv_b": (nh * (a.qk_nope_head_dim + a.value_head_dim), r),
        }
    q_dim, kv_dim = nh * hd, a.num_kv_heads * hd
    return shapes | {
        "q": (q_dim, H), "k": (kv_dim, H), "v": (a.num_kv_heads * a.value_head_dim, H),
        "q_bias": (q_dim,), "k_bias": (kv_dim,), "v_bias": (a.num_kv_heads * a.value_head_dim,),
        "q_norm": (hd,) if a.qk_norm == "head" else (q_dim,),
        "k_norm": (hd,) if a.qk_norm == "head" else (kv_dim,),
        "sinks": (nh,),
    }


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
        H, E = a.hidden_size, a.num_experts
        self.embed = w(hf_names.embed_tokens(), (a.vocab_size, H))
        self.norm = w(hf_names.final_norm(), (H,))
        self.lm_head = self.embed if a.tie_word_embeddings else w(hf_names.lm_head(), (a.vocab_size, H))
        attn_shapes = _attn_shapes(a)
        self.layers: list[_Layer] = []
        for i in range(a.num_layers):
            layer = _Layer(attn={r: w(n, attn_shapes[r]) for r, n in hf_names.attention(a, i).items()})
            if i in a.moe_layers:
                extras = {r: w(n, (E,), torch.float32) for r, n in hf_names.router_extras(a, i).items()}
                layer.router = Router(a, w(hf_names.router(a, i), (E, H), torch.float32), **extras)
                S = a.shared_expert_intermediate_size
                shapes = {"gate": (S, H), "up": (S, H), "down": (H, S), "gate_score": (1, H)}
                layer.shared = {r: w(n, shapes[r]) for r, n in hf_names.shared_expert(a, i).items()}
                I = a.expert_intermediate_size
                shapes = {"gate_up_bias": (E, 2 * I), "down_bias": (E, H)}
                b = {r: w(n, shapes[r]) for r, n in hf_names.expert_biases(a, i).items()}
                if b:  # stored interleaved like gpt-oss's gate_up (gate even, up odd)
                    layer.expert_bias = {"gate": b["gate_up_bias"][:, 0::2], "up": b["gate_up_bias"][:, 1::2],
                                         "down": b["down_bias"]}
            else:
                D = a.dense_intermediate_size
                shapes = {"gate": (D, H), "up": (D, H), "down": (H, D)}
                layer.dense_mlp = {r: w(n, shapes[r]) for r, n in hf_names.dense_mlp(a, i).items()}
            self.layers.append(layer)
        self.inv_freq = rope_inv_freq(a, self.device)  # [rope_dim / 2]
        self._attend = mla_attention if a.attention == "mla" else gqa_attention

    def new_sequence(self, capacity: int = 64) -> SequenceKV:
        return SequenceKV(self.args, self.device, self.dtype, capacity)

    # -- pieces ---------------------------------------------------------------------------

    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's router on gate input h [T, H] -> (expert ids [T, K], weights [T, K] fp32)."""
        return self.layers[i].router(h)

    def _expert(self, i: int, e: int, compute: ExpertCompute, x: torch.Tensor) -> torch.Tensor:
        """One routed expert on x [t, H]: plain SwiGLU, or with gpt-oss's biases and clamped SwiGLU."""
        a, b = self.args, self.layers[i].expert_bias
        if not b and a.expert_activation == "silu":
            return compute(x)
        g, u = compute.project_in(x)  # [t, I] fp32 each
        if b:
            g, u = g + b["gate"][e], u + b["up"][e]
        if a.expert_activation == "clamped_swiglu":
            act = clamped_swiglu(g, u, a.swiglu_limit, a.swiglu_alpha)
        else:
            act = F.silu(g) * u
        y = compute.project_out(act)
        return y + b["down"][e] if b else y

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
            ys[e] = self._expert(i, e, compute, h[tok]).to(h.dtype) * weights[tok, slot, None]  # [t_e, H]
            del compute  # let the cache free it before it builds the next one
        for e in needed:
            tok, _ = torch.where(ids == e)
            out.index_add_(0, tok, ys[e])
        shared = self.layers[i].shared
        if shared:
            s = swiglu(h, shared["gate"], shared["up"], shared["down"])
            out = out + (torch.sigmoid(F.linear(h, shared["gate_score"])) * s if "gate_score" in shared else s)
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
        cos, sin = rope_cos_sin(a, self.inv_freq, positions, self.dtype)
        x = F.embedding(ids, self.embed)  # [T, H]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn["input_norm"], a.rms_norm_eps)
            x = x + self._attend(a, i, layer.attn, h, seqs, lengths, cos, sin)
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
