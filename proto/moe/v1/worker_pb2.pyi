from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "token_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_strings", "stop_token_ids", "ignore_eos", "details")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    token_ids: TokenIds
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    details: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_strings: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., details: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "final")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    final: GenerateFinal
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., final: _Optional[_Union[GenerateFinal, _Mapping]] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("index", "id", "text", "logprob")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: int
    text: str
    logprob: float
    def __init__(self, index: _Optional[int] = ..., id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GenerateUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateTimings(_message.Message):
    __slots__ = ("queue_ns", "prefill_ns", "decode_ns", "time_to_first_token_ns", "total_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    prefill_ns: int
    decode_ns: int
    time_to_first_token_ns: int
    total_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., prefill_ns: _Optional[int] = ..., decode_ns: _Optional[int] = ..., time_to_first_token_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class RequestExpertStats(_message.Message):
    __slots__ = ("lookups", "hits", "misses", "prefetch_hits", "prefetches_issued", "bytes_fetched", "fetch_wait_ns", "predictions", "predictions_exact", "predicted_routed", "prefetch_bytes", "prefetch_wasted_bytes", "int2_misses", "layers", "decode")
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFETCHES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    FETCH_WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_EXACT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ROUTED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_WASTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    INT2_MISSES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    bytes_fetched: int
    fetch_wait_ns: int
    predictions: int
    predictions_exact: int
    predicted_routed: int
    prefetch_bytes: int
    prefetch_wasted_bytes: int
    int2_misses: int
    layers: _containers.RepeatedCompositeFieldContainer[RequestLayerExpertStats]
    decode: RequestLayerExpertStats
    def __init__(self, lookups: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., prefetch_hits: _Optional[int] = ..., prefetches_issued: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., fetch_wait_ns: _Optional[int] = ..., predictions: _Optional[int] = ..., predictions_exact: _Optional[int] = ..., predicted_routed: _Optional[int] = ..., prefetch_bytes: _Optional[int] = ..., prefetch_wasted_bytes: _Optional[int] = ..., int2_misses: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[RequestLayerExpertStats, _Mapping]]] = ..., decode: _Optional[_Union[RequestLayerExpertStats, _Mapping]] = ...) -> None: ...

class RequestLayerExpertStats(_message.Message):
    __slots__ = ("layer", "lookups", "hits", "misses", "prefetch_hits", "predictions", "predictions_exact", "predicted_routed")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_EXACT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ROUTED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    predictions: int
    predictions_exact: int
    predicted_routed: int
    def __init__(self, layer: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., prefetch_hits: _Optional[int] = ..., predictions: _Optional[int] = ..., predictions_exact: _Optional[int] = ..., predicted_routed: _Optional[int] = ...) -> None: ...

class GenerateFinal(_message.Message):
    __slots__ = ("request_id", "finish_reason", "stop_string", "stop_token_id", "seed", "usage", "timings", "experts", "trailing_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: FinishReason
    stop_string: str
    stop_token_id: int
    seed: int
    usage: GenerateUsage
    timings: GenerateTimings
    experts: RequestExpertStats
    trailing_text: str
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_string: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., seed: _Optional[int] = ..., usage: _Optional[_Union[GenerateUsage, _Mapping]] = ..., timings: _Optional[_Union[GenerateTimings, _Mapping]] = ..., experts: _Optional[_Union[RequestExpertStats, _Mapping]] = ..., trailing_text: _Optional[str] = ...) -> None: ...

class GetWorkerStatsRequest(_message.Message):
    __slots__ = ("include_layers",)
    INCLUDE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    include_layers: bool
    def __init__(self, include_layers: _Optional[bool] = ...) -> None: ...

class LayerCacheStats(_message.Message):
    __slots__ = ("layer", "slots", "resident_experts", "lookups", "hits", "misses", "prefetch_hits", "evictions", "prefetches_issued", "prefetch_unused_evictions", "prefetch_bytes", "prefetch_wasted_bytes", "prefetch_late_hits", "prefetch_dropped", "fetch_wait_ns", "predictions", "predictions_exact", "predicted_routed", "int2_misses", "demand_bytes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFETCHES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_UNUSED_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_WASTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_LATE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FETCH_WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_EXACT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ROUTED_FIELD_NUMBER: _ClassVar[int]
    INT2_MISSES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_BYTES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    slots: int
    resident_experts: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    evictions: int
    prefetches_issued: int
    prefetch_unused_evictions: int
    prefetch_bytes: int
    prefetch_wasted_bytes: int
    prefetch_late_hits: int
    prefetch_dropped: int
    fetch_wait_ns: int
    predictions: int
    predictions_exact: int
    predicted_routed: int
    int2_misses: int
    demand_bytes: int
    def __init__(self, layer: _Optional[int] = ..., slots: _Optional[int] = ..., resident_experts: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., prefetch_hits: _Optional[int] = ..., evictions: _Optional[int] = ..., prefetches_issued: _Optional[int] = ..., prefetch_unused_evictions: _Optional[int] = ..., prefetch_bytes: _Optional[int] = ..., prefetch_wasted_bytes: _Optional[int] = ..., prefetch_late_hits: _Optional[int] = ..., prefetch_dropped: _Optional[int] = ..., fetch_wait_ns: _Optional[int] = ..., predictions: _Optional[int] = ..., predictions_exact: _Optional[int] = ..., predicted_routed: _Optional[int] = ..., int2_misses: _Optional[int] = ..., demand_bytes: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "model_family", "device", "expert_format", "cache_policy", "predictor", "uptime_ms", "store_connected", "active_requests", "queued_requests", "requests_total", "requests_failed", "requests_cancelled", "prompt_tokens_total", "generated_tokens_total", "budget_bytes", "used_bytes", "high_water_bytes", "resident_experts", "lookups", "hits", "misses", "prefetch_hits", "prefetches_issued", "evictions", "bytes_fetched_shm", "bytes_fetched_grpc", "fetch_wait_ns", "layers", "allocation", "top_k", "total_slots", "staging_slots", "prefetch_width", "measured_width", "lookahead", "int2_tail", "layer_compute_ns", "expert_fetch_ns", "prefetch_bytes", "prefetch_wasted_bytes", "prefetch_unused_evictions", "prefetch_late_hits", "prefetch_dropped", "predictions", "predictions_exact", "predicted_routed", "int2_misses", "int2_bytes", "demand_bytes", "steps_total", "store_hints_sent", "store_hint_experts", "store_hint_errors", "fetched_tier_ram", "fetched_tier_nvme", "fetched_tier_ram_demand", "fetched_tier_nvme_demand")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFETCHES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_SHM_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_GRPC_FIELD_NUMBER: _ClassVar[int]
    FETCH_WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    STAGING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEASURED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    INT2_TAIL_FIELD_NUMBER: _ClassVar[int]
    LAYER_COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FETCH_NS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_WASTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_UNUSED_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_LATE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_EXACT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ROUTED_FIELD_NUMBER: _ClassVar[int]
    INT2_MISSES_FIELD_NUMBER: _ClassVar[int]
    INT2_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STORE_HINTS_SENT_FIELD_NUMBER: _ClassVar[int]
    STORE_HINT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    STORE_HINT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_TIER_RAM_FIELD_NUMBER: _ClassVar[int]
    FETCHED_TIER_NVME_FIELD_NUMBER: _ClassVar[int]
    FETCHED_TIER_RAM_DEMAND_FIELD_NUMBER: _ClassVar[int]
    FETCHED_TIER_NVME_DEMAND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model_family: str
    device: str
    expert_format: str
    cache_policy: str
    predictor: str
    uptime_ms: int
    store_connected: bool
    active_requests: int
    queued_requests: int
    requests_total: int
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    generated_tokens_total: int
    budget_bytes: int
    used_bytes: int
    high_water_bytes: int
    resident_experts: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    evictions: int
    bytes_fetched_shm: int
    bytes_fetched_grpc: int
    fetch_wait_ns: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerCacheStats]
    allocation: str
    top_k: int
    total_slots: int
    staging_slots: int
    prefetch_width: int
    measured_width: int
    lookahead: int
    int2_tail: float
    layer_compute_ns: float
    expert_fetch_ns: float
    prefetch_bytes: int
    prefetch_wasted_bytes: int
    prefetch_unused_evictions: int
    prefetch_late_hits: int
    prefetch_dropped: int
    predictions: int
    predictions_exact: int
    predicted_routed: int
    int2_misses: int
    int2_bytes: int
    demand_bytes: int
    steps_total: int
    store_hints_sent: int
    store_hint_experts: int
    store_hint_errors: int
    fetched_tier_ram: int
    fetched_tier_nvme: int
    fetched_tier_ram_demand: int
    fetched_tier_nvme_demand: int
    def __init__(self, worker_id: _Optional[str] = ..., model_family: _Optional[str] = ..., device: _Optional[str] = ..., expert_format: _Optional[str] = ..., cache_policy: _Optional[str] = ..., predictor: _Optional[str] = ..., uptime_ms: _Optional[int] = ..., store_connected: _Optional[bool] = ..., active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., high_water_bytes: _Optional[int] = ..., resident_experts: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., prefetch_hits: _Optional[int] = ..., prefetches_issued: _Optional[int] = ..., evictions: _Optional[int] = ..., bytes_fetched_shm: _Optional[int] = ..., bytes_fetched_grpc: _Optional[int] = ..., fetch_wait_ns: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerCacheStats, _Mapping]]] = ..., allocation: _Optional[str] = ..., top_k: _Optional[int] = ..., total_slots: _Optional[int] = ..., staging_slots: _Optional[int] = ..., prefetch_width: _Optional[int] = ..., measured_width: _Optional[int] = ..., lookahead: _Optional[int] = ..., int2_tail: _Optional[float] = ..., layer_compute_ns: _Optional[float] = ..., expert_fetch_ns: _Optional[float] = ..., prefetch_bytes: _Optional[int] = ..., prefetch_wasted_bytes: _Optional[int] = ..., prefetch_unused_evictions: _Optional[int] = ..., prefetch_late_hits: _Optional[int] = ..., prefetch_dropped: _Optional[int] = ..., predictions: _Optional[int] = ..., predictions_exact: _Optional[int] = ..., predicted_routed: _Optional[int] = ..., int2_misses: _Optional[int] = ..., int2_bytes: _Optional[int] = ..., demand_bytes: _Optional[int] = ..., steps_total: _Optional[int] = ..., store_hints_sent: _Optional[int] = ..., store_hint_experts: _Optional[int] = ..., store_hint_errors: _Optional[int] = ..., fetched_tier_ram: _Optional[int] = ..., fetched_tier_nvme: _Optional[int] = ..., fetched_tier_ram_demand: _Optional[int] = ..., fetched_tier_nvme_demand: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "pack_id", "family", "max_context_tokens", "vocab_size", "has_tokenizer", "chat_template", "named_chat_templates", "bos_token", "eos_token", "pad_token", "unk_token", "eos_token_ids", "default_max_new_tokens")
    class NamedChatTemplatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NAMED_CHAT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    UNK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    pack_id: str
    family: str
    max_context_tokens: int
    vocab_size: int
    has_tokenizer: bool
    chat_template: str
    named_chat_templates: _containers.ScalarMap[str, str]
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    default_max_new_tokens: int
    def __init__(self, model_name: _Optional[str] = ..., pack_id: _Optional[str] = ..., family: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., has_tokenizer: _Optional[bool] = ..., chat_template: _Optional[str] = ..., named_chat_templates: _Optional[_Mapping[str, str]] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., pad_token: _Optional[str] = ..., unk_token: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., default_max_new_tokens: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...
