"""benchmarks.host_cost: the ops' host time with Triton's launches elided (compiled for sm_90a, no
GPU needed). It runs in a process of its own, without TRITON_INTERPRET (the interpreter replaces
the launch path it times)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import run_without_interpreter
from turbo_kernels import kernel_report

_UNAVAILABLE = kernel_report.unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(f"Triton cannot compile for sm_90a here: {_UNAVAILABLE}", allow_module_level=True)


def _host_cost(*args: str) -> subprocess.CompletedProcess:
    return run_without_interpreter("-m", "benchmarks.host_cost", *args)


def test_layer_norm_runs_its_launches_elided_and_is_timed(tmp_path):
    out = tmp_path / "host.json"
    done = _host_cost("--ops", "layer_norm", "--iters", "5", "--repeats", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["op"] == "layer_norm"
    # One kernel forward; the backward adds one more.
    assert (row["launches_fwd"], row["launches_fwd_bwd"]) == (1, 2)
    assert row["launching_fwd_us"] > 0 and row["kernels_fwd_us"] > 0
    assert row["kernels_triton_launch_path_fwd_us"] > 0
    assert row["kernels_fwd_bwd_us"] > 0 and row["composition_fwd_us"] > 0 and row["composition_fwd_bwd_us"] > 0
    assert "layer_norm" in done.stdout


def test_unknown_ops_are_refused_by_name():
    done = _host_cost("--ops", "layer_norm,no_such_op")
    assert done.returncode == 2
    assert "no_such_op" in done.stderr
