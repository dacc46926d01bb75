"""Protobuf <-> the client's dataclasses: the only client module that reads or builds worker messages."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from moe.v1 import worker_pb2 as pb

from .errors import WorkerError
from .results import (
    ModelInfo,
    ExpertStats,
    GenerationResult,
    LayerStats,
    PhaseStats,
    RequestLayerStats,
    Timings,
    TokenEvent,
    Usage,
    WorkerStats,
)

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_STRING: "stop_string",
    pb.FINISH_REASON_STOP_TOKEN: "stop_token",
}
_FLOAT32_FIELDS = {"int2_tail"}  # float in the .proto: 0.3 arrives as 0.30000001192092896


def build_request(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    details: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """Exactly one of prompt / token_ids. Zero values mean the worker's defaults (greedy, its max).
    Values the message cannot carry raise WorkerError("INVALID_ARGUMENT", ...) before anything is sent."""
    for name, value, top in (("max_new_tokens", max_new_tokens, 2**32 - 1), ("top_k", top_k, 2**31 - 1)):
        if not 0 <= value <= top:
            raise WorkerError("INVALID_ARGUMENT", f"{name} must be in 0..{top} (0: the worker's default), got {value}")
    if seed is not None and not 0 <= seed < 2**64:
        raise WorkerError("INVALID_ARGUMENT", f"seed must be in 0..2^64-1, got {seed}")
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt (text) or token_ids")
    req = pb.GenerateRequest(
        request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_strings=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, details=details,
    )  # fmt: skip
    if prompt is not None:
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids)  # type: ignore[union-attr]
    if seed is not None:
        req.seed = seed
    return req


def token_from_pb(t: pb.GeneratedToken) -> TokenEvent:
    return TokenEvent(t.index, t.id, t.text, t.logprob if t.HasField("logprob") else None)


def _fields(cls: type, msg, skip: tuple[str, ...] = ()) -> dict:
    """The message's values of the dataclass's fields (same names on both sides)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        v = getattr(msg, f.name)
        out[f.name] = float(f"{v:.7g}") if f.name in _FLOAT32_FIELDS else v
    return out


def result_from_pb(f: pb.GenerateFinal) -> GenerationResult:
    u, t, e = f.usage, f.timings, f.experts
    return GenerationResult(
        request_id=f.request_id,
        finish_reason=FINISH_REASONS.get(f.finish_reason, "unspecified"),
        stop_string=f.stop_string,
        stop_token_id=f.stop_token_id,
        seed=f.seed,
        usage=Usage(u.prompt_tokens, u.completion_tokens),
        timings=Timings(t.queue_ns, t.prefill_ns, t.decode_ns, t.time_to_first_token_ns, t.total_ns),
        experts=ExpertStats(
            **_fields(ExpertStats, e, skip=("layers", "decode")),
            layers=tuple(RequestLayerStats(**_fields(RequestLayerStats, l)) for l in e.layers),
            decode=PhaseStats(**_fields(PhaseStats, e.decode)) if e.HasField("decode") else None,
        ),
        trailing_text=f.trailing_text,
    )


def stats_from_pb(s: pb.WorkerStats) -> WorkerStats:
    return WorkerStats(**_fields(WorkerStats, s, skip=("layers",)),
                       layers=tuple(LayerStats(**_fields(LayerStats, l)) for l in s.layers))


def model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.model_name, m.pack_id, m.family, m.max_context_tokens, m.vocab_size, m.has_tokenizer,
                     m.chat_template, dict(m.named_chat_templates), m.bos_token, m.eos_token, m.pad_token,
                     m.unk_token, tuple(m.eos_token_ids), m.default_max_new_tokens)
