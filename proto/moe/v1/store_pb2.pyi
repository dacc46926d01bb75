from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERT_FORMAT_UNSPECIFIED: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_BF16: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_INT8: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_INT4: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_INT2: _ClassVar[ExpertFormat]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class StoreTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORE_TIER_UNSPECIFIED: _ClassVar[StoreTier]
    STORE_TIER_RAM: _ClassVar[StoreTier]
    STORE_TIER_NVME: _ClassVar[StoreTier]

class FetchPriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FETCH_PRIORITY_DEMAND: _ClassVar[FetchPriority]
    FETCH_PRIORITY_PREFETCH: _ClassVar[FetchPriority]
EXPERT_FORMAT_UNSPECIFIED: ExpertFormat
EXPERT_FORMAT_BF16: ExpertFormat
EXPERT_FORMAT_INT8: ExpertFormat
EXPERT_FORMAT_INT4: ExpertFormat
EXPERT_FORMAT_INT2: ExpertFormat
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
STORE_TIER_UNSPECIFIED: StoreTier
STORE_TIER_RAM: StoreTier
STORE_TIER_NVME: StoreTier
FETCH_PRIORITY_DEMAND: FetchPriority
FETCH_PRIORITY_PREFETCH: FetchPriority

class ExpertKey(_message.Message):
    __slots__ = ("layer", "expert", "format")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    format: ExpertFormat
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., format: _Optional[_Union[ExpertFormat, str]] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset_bytes", "data", "compression", "uncompressed_bytes")
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset_bytes: int
    data: bytes
    compression: Compression
    uncompressed_bytes: int
    def __init__(self, offset_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., uncompressed_bytes: _Optional[int] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertFormatInfo(_message.Message):
    __slots__ = ("format", "expert_bytes", "group_size")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    format: ExpertFormat
    expert_bytes: int
    group_size: int
    def __init__(self, format: _Optional[_Union[ExpertFormat, str]] = ..., expert_bytes: _Optional[int] = ..., group_size: _Optional[int] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("pack_id", "pack_format_version", "family", "model_args_json", "formats", "num_moe_layers", "num_experts", "top_k", "dense_bytes", "tokenizer_files", "manifest_json", "shm_enabled", "shm_host_id", "ram_tier_bytes", "max_chunk_bytes", "shm_segment_name", "shm_directory_name")
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    PACK_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    NUM_MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SHM_ENABLED_FIELD_NUMBER: _ClassVar[int]
    SHM_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    RAM_TIER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SHM_DIRECTORY_NAME_FIELD_NUMBER: _ClassVar[int]
    pack_id: str
    pack_format_version: int
    family: str
    model_args_json: str
    formats: _containers.RepeatedCompositeFieldContainer[ExpertFormatInfo]
    num_moe_layers: int
    num_experts: int
    top_k: int
    dense_bytes: int
    tokenizer_files: _containers.RepeatedScalarFieldContainer[str]
    manifest_json: bytes
    shm_enabled: bool
    shm_host_id: str
    ram_tier_bytes: int
    max_chunk_bytes: int
    shm_segment_name: str
    shm_directory_name: str
    def __init__(self, pack_id: _Optional[str] = ..., pack_format_version: _Optional[int] = ..., family: _Optional[str] = ..., model_args_json: _Optional[str] = ..., formats: _Optional[_Iterable[_Union[ExpertFormatInfo, _Mapping]]] = ..., num_moe_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., dense_bytes: _Optional[int] = ..., tokenizer_files: _Optional[_Iterable[str]] = ..., manifest_json: _Optional[bytes] = ..., shm_enabled: _Optional[bool] = ..., shm_host_id: _Optional[str] = ..., ram_tier_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., shm_segment_name: _Optional[str] = ..., shm_directory_name: _Optional[str] = ...) -> None: ...

class StreamDenseRequest(_message.Message):
    __slots__ = ("names", "chunk_bytes", "compression")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    compression: Compression
    def __init__(self, names: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "total_bytes", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    checksum: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class DenseChunk(_message.Message):
    __slots__ = ("name", "header", "chunk", "last")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    header: TensorHeader
    chunk: DataChunk
    last: bool
    def __init__(self, name: _Optional[str] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., last: _Optional[bool] = ...) -> None: ...

class StreamFilesRequest(_message.Message):
    __slots__ = ("names", "chunk_bytes")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "total_bytes", "chunk", "last")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    total_bytes: int
    chunk: DataChunk
    last: bool
    def __init__(self, name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., last: _Optional[bool] = ...) -> None: ...

class FetchExpertsRequest(_message.Message):
    __slots__ = ("experts", "priority", "compression", "max_reply_bytes", "client_id")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    priority: FetchPriority
    compression: Compression
    max_reply_bytes: int
    client_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., priority: _Optional[_Union[FetchPriority, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., max_reply_bytes: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class ExpertBlobs(_message.Message):
    __slots__ = ("index", "padding", "payload")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    index: ExpertBlobIndex
    padding: bytes
    payload: bytes
    def __init__(self, index: _Optional[_Union[ExpertBlobIndex, _Mapping]] = ..., padding: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ExpertBlobIndex(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[ExpertPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[ExpertPart, _Mapping]]] = ...) -> None: ...

class ExpertPart(_message.Message):
    __slots__ = ("index", "key", "total_bytes", "offset_bytes", "payload_offset_bytes", "payload_bytes", "compression", "uncompressed_bytes", "last", "tier", "checksum")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: ExpertKey
    total_bytes: int
    offset_bytes: int
    payload_offset_bytes: int
    payload_bytes: int
    compression: Compression
    uncompressed_bytes: int
    last: bool
    tier: StoreTier
    checksum: str
    def __init__(self, index: _Optional[int] = ..., key: _Optional[_Union[ExpertKey, _Mapping]] = ..., total_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., payload_offset_bytes: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., uncompressed_bytes: _Optional[int] = ..., last: _Optional[bool] = ..., tier: _Optional[_Union[StoreTier, str]] = ..., checksum: _Optional[str] = ...) -> None: ...

class FetchExpertsShmRequest(_message.Message):
    __slots__ = ("experts", "priority", "client_id", "lease_ttl_ms")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    priority: FetchPriority
    client_id: str
    lease_ttl_ms: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., priority: _Optional[_Union[FetchPriority, str]] = ..., client_id: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class ShmDescriptor(_message.Message):
    __slots__ = ("index", "key", "segment_name", "segment_bytes", "offset_bytes", "length_bytes", "lease_id", "generation", "lease_ttl_ms", "tier", "checksum")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: ExpertKey
    segment_name: str
    segment_bytes: int
    offset_bytes: int
    length_bytes: int
    lease_id: int
    generation: int
    lease_ttl_ms: int
    tier: StoreTier
    checksum: str
    def __init__(self, index: _Optional[int] = ..., key: _Optional[_Union[ExpertKey, _Mapping]] = ..., segment_name: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., length_bytes: _Optional[int] = ..., lease_id: _Optional[int] = ..., generation: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., tier: _Optional[_Union[StoreTier, str]] = ..., checksum: _Optional[str] = ...) -> None: ...

class FetchExpertsShmResponse(_message.Message):
    __slots__ = ("descriptors", "unavailable_indices")
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_INDICES_FIELD_NUMBER: _ClassVar[int]
    descriptors: _containers.RepeatedCompositeFieldContainer[ShmDescriptor]
    unavailable_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, descriptors: _Optional[_Iterable[_Union[ShmDescriptor, _Mapping]]] = ..., unavailable_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseLeasesRequest(_message.Message):
    __slots__ = ("client_id", "lease_ids", "all")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[int]
    all: bool
    def __init__(self, client_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[int]] = ..., all: _Optional[bool] = ...) -> None: ...

class ReleaseLeasesResponse(_message.Message):
    __slots__ = ("released_count", "unknown_count")
    RELEASED_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    released_count: int
    unknown_count: int
    def __init__(self, released_count: _Optional[int] = ..., unknown_count: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("experts", "client_id")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    client_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., client_id: _Optional[str] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("accepted_count", "already_resident_count", "dropped_count")
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_RESIDENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    accepted_count: int
    already_resident_count: int
    dropped_count: int
    def __init__(self, accepted_count: _Optional[int] = ..., already_resident_count: _Optional[int] = ..., dropped_count: _Optional[int] = ...) -> None: ...

class GetStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreTierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "resident_experts", "hits", "bytes_read", "read_ns")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    READ_NS_FIELD_NUMBER: _ClassVar[int]
    tier: StoreTier
    capacity_bytes: int
    used_bytes: int
    resident_experts: int
    hits: int
    bytes_read: int
    read_ns: int
    def __init__(self, tier: _Optional[_Union[StoreTier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., resident_experts: _Optional[int] = ..., hits: _Optional[int] = ..., bytes_read: _Optional[int] = ..., read_ns: _Optional[int] = ...) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("pack_id", "uptime_ms", "tiers", "fetch_requests", "experts_served_grpc", "experts_served_shm", "bytes_served_grpc", "bytes_sent_wire", "bytes_served_shm", "dense_bytes_served", "promotions", "evictions", "leases_granted", "leases_active", "leases_expired", "prefetch_hints", "prefetch_promotions", "checksum_failures", "demand_ram_hits", "demand_ram_misses", "prefetch_ram_hits", "prefetch_ram_misses", "directory_reads", "directory_demand_reads", "directory_refreshes", "hints_refused", "hints_used", "hints_wasted", "hints_skipped")
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    FETCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_SERVED_GRPC_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_SERVED_SHM_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_GRPC_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_WIRE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_SHM_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LEASES_GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HINTS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RAM_HITS_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RAM_MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_RAM_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_RAM_MISSES_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_READS_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_DEMAND_READS_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_REFRESHES_FIELD_NUMBER: _ClassVar[int]
    HINTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    HINTS_USED_FIELD_NUMBER: _ClassVar[int]
    HINTS_WASTED_FIELD_NUMBER: _ClassVar[int]
    HINTS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    pack_id: str
    uptime_ms: int
    tiers: _containers.RepeatedCompositeFieldContainer[StoreTierStats]
    fetch_requests: int
    experts_served_grpc: int
    experts_served_shm: int
    bytes_served_grpc: int
    bytes_sent_wire: int
    bytes_served_shm: int
    dense_bytes_served: int
    promotions: int
    evictions: int
    leases_granted: int
    leases_active: int
    leases_expired: int
    prefetch_hints: int
    prefetch_promotions: int
    checksum_failures: int
    demand_ram_hits: int
    demand_ram_misses: int
    prefetch_ram_hits: int
    prefetch_ram_misses: int
    directory_reads: int
    directory_demand_reads: int
    directory_refreshes: int
    hints_refused: int
    hints_used: int
    hints_wasted: int
    hints_skipped: int
    def __init__(self, pack_id: _Optional[str] = ..., uptime_ms: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[StoreTierStats, _Mapping]]] = ..., fetch_requests: _Optional[int] = ..., experts_served_grpc: _Optional[int] = ..., experts_served_shm: _Optional[int] = ..., bytes_served_grpc: _Optional[int] = ..., bytes_sent_wire: _Optional[int] = ..., bytes_served_shm: _Optional[int] = ..., dense_bytes_served: _Optional[int] = ..., promotions: _Optional[int] = ..., evictions: _Optional[int] = ..., leases_granted: _Optional[int] = ..., leases_active: _Optional[int] = ..., leases_expired: _Optional[int] = ..., prefetch_hints: _Optional[int] = ..., prefetch_promotions: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., demand_ram_hits: _Optional[int] = ..., demand_ram_misses: _Optional[int] = ..., prefetch_ram_hits: _Optional[int] = ..., prefetch_ram_misses: _Optional[int] = ..., directory_reads: _Optional[int] = ..., directory_demand_reads: _Optional[int] = ..., directory_refreshes: _Optional[int] = ..., hints_refused: _Optional[int] = ..., hints_used: _Optional[int] = ..., hints_wasted: _Optional[int] = ..., hints_skipped: _Optional[int] = ...) -> None: ...
