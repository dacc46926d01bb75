"""Routers of every family, in fp32, as one object per MoE layer: the model routes with it and the
cross_layer predictor ranks with it (so a prediction applies the same bias, correction and grouping).

Scoring (`ModelArgs.router_scoring`):
    softmax       probs = softmax(W h); top-k of probs (Mixtral, Qwen, OLMoE, DeepSeek-V2)
    sigmoid       s = sigmoid(W h); choose by s + e_score_correction_bias; weights are s (DeepSeek-V3, GLM)
    topk_softmax  top-k of W h + b, softmax over the k chosen logits (gpt-oss)
Group-limited selection (`router_group_score`): experts form n_group equal groups; a group's score is its
best expert's (V2 group_limited_greedy: "max") or its two best experts' sum (V3 noaux_tc: "top2_sum");
only the topk_group best groups may be chosen. Weights are renormalized over the k (norm_topk_prob)
and scaled by routed_scaling_factor.

Ranking for prediction (`rank`): the selection score, with every expert of the allowed groups ahead of
every other expert (each part by score), so the first top_k ids are exactly the experts the layer
would choose for that input and the rest continue in the order the router prefers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expert_store.model_args import ModelArgs


class Router:
    """One MoE layer's router: weight [E, H], optional bias / correction [E], all fp32."""

    def __init__(self, args: ModelArgs, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None):
        self.args = args
        self.weight, self.bias, self.correction = weight, bias, correction
        self.num_experts = weight.shape[0]

    def _scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight source [T, E], selection score [T, E]) before grouping."""
        logits = F.linear(h.float(), self.weight, self.bias)  # [T, E]
        a = self.args
        if a.router_scoring == "sigmoid":
            s = logits.sigmoid()
            return s, s + self.correction if self.correction is not None else s
        if a.router_scoring == "topk_softmax":
            return logits, logits
        probs = torch.softmax(logits, dim=-1)
        return probs, probs

    def _allowed(self, choice: torch.Tensor) -> torch.Tensor | None:
        """[T, E] bool: experts in the topk_group best groups (None: no grouping)."""
        a = self.args
        if a.router_group_score == "none" or a.topk_group >= a.n_group:
            return None
        grouped = choice.view(choice.shape[0], a.n_group, -1)  # [T, G, E/G]
        if a.router_group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best = group_scores.topk(a.topk_group, dim=-1).indices  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return mask[:, :, None].expand_as(grouped).reshape_as(choice)

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate input h [T, H] -> (expert ids [T, K], weights [T, K] fp32)."""
        a = self.args
        source, choice = self._scores(h)
        allowed = self._allowed(choice)
        if allowed is not None:
            # V2 fills with 0 (its probabilities are positive), V3 with -inf: the same choice for valid configs
            choice = choice.masked_fill(~allowed, float("-inf"))
        top, ids = torch.topk(choice, a.top_k, dim=-1)  # [T, K]
        if a.router_scoring == "topk_softmax":
            return ids, torch.softmax(top, dim=-1)
        weights = source.gather(1, ids)
        if a.norm_topk_prob:
            eps = 1e-20 if a.router_scoring == "sigmoid" else 0.0
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
        if a.routed_scaling_factor != 1.0:
            weights = weights * a.routed_scaling_factor
        return ids, weights

    def rank(self, h: torch.Tensor, width: int) -> torch.Tensor:
        """Up to `width` expert ids per row [T, width], most likely first (see the module docstring)."""
        width = min(width, self.num_experts)
        _, choice = self._scores(h)
        allowed = self._allowed(choice)
        if allowed is None:
            return torch.topk(choice, width, dim=-1).indices
        order = torch.sort(choice, dim=-1, descending=True, stable=True).indices  # [T, E]
        first = torch.sort((~allowed).gather(1, order).to(torch.int8), dim=-1, stable=True).indices  # allowed first
        return order.gather(1, first)[:, :width]
