"""The client's protobuf edge and the worker's error -> status mapping (no servers)."""

from __future__ import annotations

import grpc
import pytest

from client.convert import build_request, result_from_pb, stats_from_pb
from moe.v1 import worker_pb2 as pb


def test_build_request_sets_exactly_one_input_and_the_seed_only_when_given():
    r = build_request("hi", max_new_tokens=3, stop=["\n"])
    assert r.WhichOneof("input") == "prompt" and not r.HasField("seed") and list(r.stop_strings) == ["\n"]
    r = build_request(token_ids=[1, 2], seed=0)
    assert list(r.token_ids.ids) == [1, 2] and r.HasField("seed") and r.seed == 0
    with pytest.raises(ValueError):
        build_request("hi", token_ids=[1])
    with pytest.raises(ValueError):
        build_request()


def test_results_and_stats_convert_to_plain_dataclasses():
    f = pb.GenerateFinal(request_id="r", finish_reason=pb.FINISH_REASON_STOP_STRING, stop_string="\n", seed=7,
                         usage=pb.GenerateUsage(prompt_tokens=3, completion_tokens=5),
                         timings=pb.GenerateTimings(decode_ns=2_000_000_000),
                         experts=pb.RequestExpertStats(lookups=10, hits=7, misses=3), trailing_text="x")
    r = result_from_pb(f)
    assert (r.finish_reason, r.stop_string, r.seed, r.trailing_text) == ("stop_string", "\n", 7, "x")
    assert r.experts.hit_rate == 0.7 and r.decode_tokens_per_s == 2.0
    s = stats_from_pb(pb.WorkerStats(worker_id="w", budget_bytes=10, layers=[pb.LayerCacheStats(layer=1, slots=2)]))
    assert s.worker_id == "w" and s.budget_bytes == 10 and s.layers[0].slots == 2
    assert "pb2" not in type(s.layers).__module__


def test_worker_errors_map_to_status_codes():
    from expert_store.errors import ChecksumError
    from gpu_worker.engine import ContextLengthError, EngineStoppedError, QueueFullError, RequestError
    from gpu_worker.generate import SamplingError
    from gpu_worker.server import status_for
    from gpu_worker.store_client import StoreUnavailableError

    cases = {
        SamplingError("t"): grpc.StatusCode.INVALID_ARGUMENT,
        RequestError("empty"): grpc.StatusCode.INVALID_ARGUMENT,
        ContextLengthError("long"): grpc.StatusCode.OUT_OF_RANGE,
        QueueFullError("full"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        StoreUnavailableError("down"): grpc.StatusCode.UNAVAILABLE,
        EngineStoppedError("bye"): grpc.StatusCode.UNAVAILABLE,
        ChecksumError("bad"): grpc.StatusCode.DATA_LOSS,
        KeyError("bug"): grpc.StatusCode.INTERNAL,
    }
    for exc, code in cases.items():
        assert status_for(exc)[0] == code, exc


def test_stats_print_tidy_numbers_and_n_a_without_a_predictor():
    from client.formatting import stats_json, stats_lines

    s = stats_from_pb(pb.WorkerStats(worker_id="w", predictor="none", int2_tail=0.3, layer_compute_ns=1686006.4976,
                                     lookups=10, hits=5, layers=[pb.LayerCacheStats(layer=1, slots=2, lookups=4)]))
    lines = stats_lines(s)
    figures = dict(line.split(None, 1) for line in lines if len(line.split()) == 2)
    assert figures["int2_tail"] == "0.3" and figures["layer_compute_ns"] == "1686006"
    assert figures["strict_topk_accuracy"] == figures["prefetch_recall"] == figures["prefetch_precision"] == "n/a"
    assert figures["hit_rate"] == "0.5000"
    assert lines[-1].split()[-4:-1] == ["n/a", "n/a", "n/a"]  # the layer's strict%, recall%, prec%
    doc = stats_json(s)
    assert doc["int2_tail"] == 0.3 and doc["layer_compute_ns"] == 1686006 and doc["strict_topk_accuracy"] is None
    assert doc["layers"][0]["prefetch_precision"] is None


def test_decode_totals_are_no_layer():
    import dataclasses

    f = pb.GenerateFinal(experts=pb.RequestExpertStats(lookups=4, decode=pb.RequestLayerExpertStats(lookups=2),
                                                       layers=[pb.RequestLayerExpertStats(layer=3, lookups=4)]))
    e = dataclasses.asdict(result_from_pb(f))["experts"]
    assert e["decode"]["lookups"] == 2 and "layer" not in e["decode"]
    assert e["layers"][0]["layer"] == 3
