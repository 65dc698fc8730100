"""The one state table, and the parsing helpers of the Slurm backend."""

from __future__ import annotations

import pytest

from aimass_hpc.common.slurm_states import JobState, aggregate_state, normalize_state
from aimass_hpc.launch.scheduler.slurm import _output_override, _sacct_exit, _wait_status_to_exit


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("PENDING", JobState.PENDING),
        ("PD", JobState.PENDING),
        ("RUNNING", JobState.RUNNING),
        ("R", JobState.RUNNING),
        ("CG", JobState.COMPLETING),
        ("COMPLETED", JobState.COMPLETED),
        ("CANCELLED by 0", JobState.CANCELLED),
        ("CA", JobState.CANCELLED),
        ("FAILED", JobState.FAILED),
        ("TIMEOUT", JobState.TIMEOUT),
        ("OOM", JobState.OUT_OF_MEMORY),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY),
        ("NODE_FAIL", JobState.NODE_FAIL),
        ("PREEMPTED", JobState.PREEMPTED),
        ("REQUEUED", JobState.PENDING),
        ("REQUEUE_HOLD", JobState.PENDING),
        ("SUSPENDED", JobState.SUSPENDED),
        ("BOOT_FAIL", JobState.BOOT_FAIL),
        ("DEADLINE", JobState.DEADLINE),
        ("COMPLETED+", JobState.COMPLETED),
        ("  running ", JobState.RUNNING),
        ("SOMETHING_NEW", JobState.UNKNOWN),
        ("", JobState.UNKNOWN),
    ],
)
def test_every_slurm_state_maps_once(raw, state):
    assert normalize_state(raw) is state


def test_terminal_states():
    assert {s for s in JobState if s.is_terminal} == {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.PREEMPTED,
        JobState.NODE_FAIL,
        JobState.OUT_OF_MEMORY,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
    }
    assert not JobState.UNKNOWN.is_terminal and not JobState.UNKNOWN.is_active


def test_array_aggregation():
    c, f, r, p = JobState.COMPLETED, JobState.FAILED, JobState.RUNNING, JobState.PENDING
    assert aggregate_state([c, c]) is c
    assert aggregate_state([c, f, c]) is f
    assert aggregate_state([c, r, p]) is r
    assert aggregate_state([c, p]) is p
    assert aggregate_state([]) is JobState.UNKNOWN


def test_exit_codes():
    assert _wait_status_to_exit("0") == 0
    assert _wait_status_to_exit("768") == 3  # exit 3
    assert _wait_status_to_exit("15") == 128 + 15  # SIGTERM
    assert _wait_status_to_exit("") is None
    assert _sacct_exit("3:0") == 3 and _sacct_exit("0:9") == 128 + 9


def test_output_override_only_for_paths_slurm_would_expand(tmp_path):
    assert _output_override(tmp_path / "plain dir $(x)") == []
    (arg,) = _output_override(tmp_path / "a%j\\b")
    assert arg.endswith("a\\%j\\\\b/logs/slurm-batch.out")
