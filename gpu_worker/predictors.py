"""The predictor that needs torch: Fate's cross-layer gate (the others: gpu_worker.policy.predictors)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .policy.predictors import (  # noqa: F401
    BASELINE_PREDICTOR_NAMES, PREDICTOR_NAMES, Predictor, PredictorError,
)
from .policy.predictors import make_predictor as _make_predictor


class CrossLayerPredictor(Predictor):
    """Fate's predictor: MoE layer t's router applied to an earlier layer's gate input (layer t - 1's for a
    lookahead of one, t - 2's for two): the top-`width` experts of its logits, per row.

    `routers[t]`: MoE layer t's router: the runtime's `gpu_worker.routing.Router` (its `rank` applies the
    family's bias, correction and group limits), or a bare weight [E, H] (fp32), ranked by its logits
    (only the ranking matters, so the softmax, monotonic, is skipped)."""

    name = "cross_layer"
    needs_gate_input = True

    def __init__(self, routers: Sequence[Any]):
        if not routers:
            raise PredictorError("cross_layer needs the model's routers (routers=[tensor [E, H] per MoE layer])")
        self.routers = list(routers)

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        if gate_input is None:
            raise PredictorError("cross_layer predicts from hidden states: pass gate_input [rows, hidden]")
        if not 0 <= moe_layer < len(self.routers):
            raise PredictorError(f"cross_layer: MoE layer {moe_layer} out of range 0..{len(self.routers) - 1}")
        router = self.routers[moe_layer]
        if width <= 0:
            return [[] for _ in rids]
        if hasattr(router, "rank"):
            return router.rank(gate_input, width).tolist()  # [T, min(width, E)]
        width = min(width, router.shape[0])
        logits = torch.nn.functional.linear(gate_input.float(), router)  # [T, E]
        return torch.topk(logits, width, dim=-1).indices.tolist()  # [T, width]




def make_predictor(name: str, **kw) -> Predictor:
    """gpu_worker.policy.predictors.make_predictor with `cross_layer` as well."""
    return _make_predictor(name, {"cross_layer": CrossLayerPredictor}, **kw)
