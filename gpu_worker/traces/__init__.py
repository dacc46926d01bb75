"""Expert-activation traces: the moe-trace/1 file format (`format`) and recording in the worker (`recorder`)."""

from .format import (  # noqa: F401
    DECODE, PREFILL, TRACE_FORMAT, Trace, TraceError, concat_traces, infer_steps, load_trace, make_meta, save_trace,
    trace_arrays, validate,
)
from .recorder import RecordingPredictor, TraceRecorder, cache_config_of, recorder_for  # noqa: F401
