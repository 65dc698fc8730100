"""Issue 11: serve defaults have one home (``aimass_hpc/serve/defaults.py``).

Specification: the click options of ``aimass serve start`` / ``upgrade``, the replica's
argparse options and the options it resolves when nothing else is given, ``ServeOptions``
(and the successor options read back from an older ``spec.json``), ``ServeConfig``,
``ReplicaOptions`` and ``DynamicBatcher`` all agree with :data:`DEFAULTS`. Handover is on by
default everywhere (README "Serving": replicas hand over before the time limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path

import click
import pytest

from aimass_hpc.cli.serve import start, upgrade_cmd
from aimass_hpc.launch.serving import ServeOptions, service_options
from aimass_hpc.serve.__main__ import REPLICA_DEFAULTS, build_parser, parse_args, resolve_options
from aimass_hpc.serve.app import ServeConfig
from aimass_hpc.serve.batching import DynamicBatcher
from aimass_hpc.serve.defaults import DEFAULTS, REPLICA_KEYS, ServeDefaults
from aimass_hpc.serve.server import ReplicaOptions

# click parameter name -> the ServeDefaults field it defaults to
START_OPTIONS = {
    "replicas": "replicas", "gpus": "gpus", "cpus": "cpus", "port": "port",
    "max_batch_size": "max_batch_size", "max_wait_ms": "max_wait_ms", "batching": "batching",
    "handover": "handover", "timeout": "ready_timeout_s",
}  # fmt: skip


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name}


def test_handover_is_on_by_default() -> None:
    assert DEFAULTS.handover is True
    assert ServeOptions(ref="m@prod").serve_section("/r", 1)["handover"] is True


@pytest.mark.parametrize(("param", "field"), sorted(START_OPTIONS.items()))
def test_serve_start_options_default_to_the_one_home(param: str, field: str) -> None:
    assert _params(start)[param].default == getattr(DEFAULTS, field)


def test_serve_start_flags_can_switch_both_ways() -> None:
    params = _params(start)
    assert set(params["handover"].opts + params["handover"].secondary_opts) == {
        "--handover", "--no-handover",
    }  # fmt: skip
    assert "--no-batching" in params["batching"].secondary_opts


def test_serve_upgrade_timeout_defaults_to_the_one_home() -> None:
    assert _params(upgrade_cmd)["timeout"].default == DEFAULTS.ready_timeout_s


def _replica_actions() -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for action in build_parser()._actions:
        out.setdefault(action.dest, []).append(action)
    return out


def test_replica_argparse_options_fall_through_to_the_one_home(tmp_path: Path) -> None:
    actions = _replica_actions()
    # Every replica default has a command-line option, and none of them has its own default:
    # an option not given must fall through to spec.json, the job environment, then DEFAULTS.
    env_only = {"warning_signal"}  # $AIMASS_PREEMPT_SIGNAL (the site's preemption.signal)
    assert REPLICA_KEYS - env_only <= set(actions)
    for key in REPLICA_KEYS - env_only:
        for action in actions[key]:
            assert action.default is None, (key, action.option_strings)
            default = getattr(DEFAULTS, key)
            if default is not None and action.const is None:  # --help shows the home's value
                assert f"(default: {default})" in (action.help or ""), (key, action.help)
    resolved = resolve_options(parse_args([]), {"AIMASS_RUN_DIR": str(tmp_path)})
    for key in REPLICA_KEYS:
        assert resolved[key] == getattr(DEFAULTS, key), key
    assert DEFAULTS.replica_options() == REPLICA_DEFAULTS


def test_replica_handover_switches_both_ways(tmp_path: Path) -> None:
    env = {"AIMASS_RUN_DIR": str(tmp_path)}
    assert resolve_options(parse_args(["--no-handover"]), env)["handover"] is False
    assert resolve_options(parse_args(["--handover"]), env)["handover"] is True
    # spec.json (what `aimass serve --no-handover` wrote) beats the default.
    (tmp_path / "spec.json").write_text(json.dumps({"spec": {"serve": {"handover": False}}}))
    assert resolve_options(parse_args([]), env)["handover"] is False


def test_dataclasses_default_to_the_one_home(tmp_path: Path) -> None:
    opts = ServeOptions(ref="m@prod")
    for field in ("replicas", "gpus", "cpus", "port", "max_batch_size", "max_wait_ms",
                  "batching", "threads", "handover"):  # fmt: skip
        assert getattr(opts, field) == getattr(DEFAULTS, field), field
    config = ServeConfig()
    for f in dataclasses.fields(ServeConfig):
        assert getattr(config, f.name) == getattr(DEFAULTS, f.name), f.name
    replica = ReplicaOptions(run_dir=tmp_path, model_ref="m@prod")
    for field in ("host", "port", "warning_signal", "drain_grace_s", "drain_timeout_s",
                  "log_level"):  # fmt: skip
        assert getattr(replica, field) == getattr(DEFAULTS, field), field
    sig = inspect.signature(DynamicBatcher)
    for field in ("max_batch_size", "max_wait_ms", "batching", "max_queue"):
        assert sig.parameters[field].default == getattr(DEFAULTS, field), field


def test_successor_of_a_bare_spec_gets_the_one_homes_defaults(tmp_path: Path) -> None:
    # An older run directory whose spec.json names only the model.
    (tmp_path / "spec.json").write_text(json.dumps({"spec": {"serve": {"model": "m@prod"}}}))
    back = service_options(tmp_path)
    assert back == ServeOptions(ref="m@prod", repo=None)


def test_the_home_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.handover = False  # type: ignore[misc]
    assert ServeDefaults() == DEFAULTS
