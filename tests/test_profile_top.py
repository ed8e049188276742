"""benchmarks/profile_top.py's trace summary on a hand-made perfetto trace (no profiler run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_top.py"
_spec = importlib.util.spec_from_file_location("profile_top", _PATH)
PT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PT)


def _meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _x(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def _gpu_trace():
    return {"traceEvents": [
        _meta(1, "/host:CPU"), _meta(1, "python", tid=10),
        _meta(2, "/device:GPU:0"), _meta(2, "XLA Modules", tid=20),
        _meta(2, "Stream #7(compute)", tid=21), _meta(2, "Stream #8(copy)", tid=22),
        _x(1, 10, "PjitFunction(step)", 0, 1000),                 # host: never counted
        _x(2, 20, "jit_step", 0, 1000),                           # module span: not a kernel
        _x(2, 21, "sm90_xmma_gemm_bf16", 100, 300),
        _x(2, 21, "loop_multiply_fusion", 400, 100),
        _x(2, 21, "cudnn_fmha_fwd", 500, 200),
        _x(2, 22, "Memcpy DtoD", 450, 100),                       # overlaps the fusion
        _x(2, 21, "sm90_xmma_gemm_bf16", 800, 100),
    ]}


def test_stream_kernels_only_and_their_kinds() -> None:
    events, where = PT.device_events(_gpu_trace())
    assert "Stream" in where
    names = sorted(e["name"] for e in events)
    assert names == ["Memcpy DtoD", "cudnn_fmha_fwd", "loop_multiply_fusion",
                     "sm90_xmma_gemm_bf16", "sm90_xmma_gemm_bf16"]
    assert [PT.kind_of(n) for n in ("sm90_xmma_gemm_bf16", "cudnn_fmha_fwd", "Memcpy DtoD",
                                    "loop_multiply_fusion", "something")] == [
        "matmul", "attention", "copy", "fusion", "other"]


def test_summary_times_and_busy_union() -> None:
    events, _ = PT.device_events(_gpu_trace())
    text = PT.summarize(events, runs=1, wall_s=2e-3, top=10)
    # kernels 300 + 100 + 200 + 100 + 100 us = 0.8 ms; busy = [100, 700] + [800, 900] = 0.7 ms
    assert "kernel time 0.80 ms in 5 kernels per run" in text
    assert "device busy 0.70 ms (35 % of wall)" in text
    assert "| matmul | 0.400 | 50.0 |" in text
    assert "| `sm90_xmma_gemm_bf16` | matmul | 2.0 | 0.400 | 200.0 | 50.0 |" in text


def test_leaf_events_drop_wrappers_per_thread() -> None:
    evs = [_x(1, 1, "while", 0, 100), _x(1, 1, "a", 10, 20), _x(1, 1, "b", 40, 20),
           _x(1, 2, "c", 5, 200)]                                  # another thread: kept
    assert sorted(e["name"] for e in PT.leaf_events(evs)) == ["a", "b", "c"]


def test_empty_trace_and_bad_flags() -> None:
    assert PT.summarize([], 1, 1.0, 5) == "no device events in the trace"
    with pytest.raises(SystemExit):
        PT.parse_args(["--runs", "0", "train"])
    with pytest.raises(SystemExit):
        PT.parse_args(["decode", "--batch", "0"])
