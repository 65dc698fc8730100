"""The supervisor's vLLM path without a cluster (issue 14: healing and scaling vLLM services).

Specification: a replica's record names its engine (older records without the field read as
the built-in torch server); the supervisor checks a vLLM replica with ``GET /readyz`` and a real
one-token ``POST /v1/completions`` for the served model name with the service token (never
``/v1/predict``), so a draining, failing, hung or dead replica fails its check and is replaced
after ``failures`` checks in a row; it scales a vLLM service on the replicas' ``/metrics`` gauges
``vllm:num_requests_running`` + ``vllm:num_requests_waiting`` against the same target of ongoing
requests per replica; ``--engine vllm --supervise`` with autoscaling is planned, not refused;
``aimass endpoints`` shows the engine (table and ``--json``).

The replica here is a small real HTTP server that answers vLLM's routes as vLLM does (the
cluster test tests/test_vllm_heal_cluster.py runs the real vLLM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import site_data, write_site
from test_repo_hf import make_hf_dir

from aimass_hpc.launch import serving as S
from aimass_hpc.launch.service_supervisor import (
    Settings,
    Supervisor,
    check_vllm,
    vllm_busy_seconds,
    vllm_ongoing,
)
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.hf import import_hf
from aimass_hpc.serve.auth import ensure_token, read_token, token_path
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, read_records, write_record
from aimass_hpc.serve.vllm_replica import API_SERVER, vllm_launch

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 7.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
aimass_serve_request_duration_seconds_sum{route="/v1/predict"} 99.0
"""


@dataclass
class FakeVllm:
    """What the replica answers (changed by a test while it runs) and what it was asked."""

    token: str
    readyz: int = 200
    completion: int = 200
    delay_s: float = 0.0
    metrics: str = METRICS
    asked: list[tuple[str, str, dict[str, Any] | None]] | None = None


@pytest.fixture
def vllm_server() -> Iterator[tuple[FakeVllm, str]]:
    """A real HTTP server on loopback answering /readyz, /v1/completions and /metrics."""
    state = FakeVllm(token="s3cret", asked=[])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            pass

        def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            assert state.asked is not None
            state.asked.append(("GET", self.path, None))
            if self.path == "/readyz":
                self._send(state.readyz, {} if state.readyz == 200 else {"phase": "draining"})
            elif self.path == "/metrics":
                self._send(200, state.metrics, "text/plain; version=0.0.4")
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            assert state.asked is not None
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.asked.append(("POST", self.path, body))
            time.sleep(state.delay_s)
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._send(401, {"error": "Unauthorized"})
            elif self.path != "/v1/completions":
                self._send(404, {"detail": "Not Found"})
            elif state.completion != 200:
                self._send(state.completion, {"error": "engine dead"})
            else:
                self._send(200, {"choices": [{"text": "y", "finish_reason": "length"}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _service(tmp_path: Path, url: str, *, engine: str | None = "vllm") -> EndpointRecord:
    """A run directory with a READY replica record at ``url`` and the service token."""
    run_dir = tmp_path / "svc"
    run_dir.mkdir(exist_ok=True)
    ensure_token(run_dir)
    host, port = url.removeprefix("http://").split(":")
    rec = EndpointRecord(
        model_ref="tiny:1", model_name="tiny", version="1", state=EndpointState.READY,
        job_id="7_0", replica=0, run_dir=str(run_dir), host=host, port=int(port),
        token_file=str(token_path(run_dir)), engine=engine,
    )  # fmt: skip
    write_record(rec)
    return rec


def _supervisor(tmp_path: Path) -> Supervisor:
    site = write_site(tmp_path, "local")
    return Supervisor(site, tmp_path / "svc")


# -- records ----------------------------------------------------------------------------------


def test_records_name_their_engine_and_old_records_read_as_torch(tmp_path: Path) -> None:
    rec = _service(tmp_path, "http://127.0.0.1:1")
    (back,) = read_records(tmp_path / "svc")
    assert back.engine == "vllm" and back.engine_name == "vllm"
    old = back.to_dict()
    del old["engine"]  # written before the field existed
    legacy = EndpointRecord.from_dict(old)
    assert legacy.engine is None and legacy.engine_name == "torch"
    assert legacy.key == rec.key


# -- metric parsing ---------------------------------------------------------------------------


def test_vllm_ongoing_sums_running_and_waiting_over_label_sets() -> None:
    # 3 + 2 + 1: the *_by_reason gauge and the torch histogram are not counted.
    assert vllm_ongoing(METRICS) == 6.0
    assert vllm_ongoing("vllm:num_requests_waiting 4\n") == 4.0  # no labels
    assert vllm_ongoing('vllm:num_requests_running{a="b"} 1e+00\n') == 1.0
    assert vllm_ongoing('vllm:num_requests_running{a="b"} NaN\n') is None
    assert vllm_ongoing("# TYPE vllm:num_requests_running gauge\nother 5\n") is None
    assert vllm_ongoing("") is None


def test_vllm_busy_seconds_sums_the_e2e_latency_sums_over_label_sets() -> None:
    text = (
        'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="tiny"} 12.5\n'
        'vllm:e2e_request_latency_seconds_sum{engine="1",model_name="tiny"} 0.5\n'
        'vllm:e2e_request_latency_seconds_count{engine="0",model_name="tiny"} 99.0\n'
    )
    assert vllm_busy_seconds(text) == 13.0
    assert vllm_busy_seconds(METRICS) is None


# -- the engine-aware check -------------------------------------------------------------------


def test_a_healthy_vllm_replica_passes_with_a_real_completion(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    state, url = vllm_server
    rec = _service(tmp_path, url)
    state.token = read_token(str(rec.token_file))
    sup = _supervisor(tmp_path)
    assert sup.check(rec, 3.0) is None
    assert state.asked is not None
    paths = [(m, p) for m, p, _ in state.asked]
    assert paths == [("GET", "/readyz"), ("POST", "/v1/completions")]  # never /v1/predict
    assert state.asked[1][2] == {"model": "tiny", "prompt": "x", "max_tokens": 1}


def test_the_engine_comes_from_the_services_spec_when_the_record_has_none(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    state, url = vllm_server
    rec = _service(tmp_path, url, engine=None)  # e.g. a PENDING record written by an older aimass
    state.token = read_token(str(rec.token_file))
    sup = _supervisor(tmp_path)
    assert sup.engine(rec) == "torch"  # no spec.json: the built-in server, as before
    spec = {"spec": {"serve": {"engine": "vllm", "model": "tiny:1"}}}
    (tmp_path / "svc" / "spec.json").write_text(json.dumps(spec))
    assert sup.engine(rec) == "vllm"
    assert sup.check(rec, 3.0) is None


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"readyz": 503}, "/readyz answered 503"),
        ({"completion": 500}, "probe completion answered 500"),
        ({"token": "rotated"}, "probe completion answered 401"),
    ],
)
def test_a_failing_vllm_replica_fails_its_check(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str], change: dict[str, Any], expected: str
) -> None:
    state, url = vllm_server
    rec = _service(tmp_path, url)
    state.token = read_token(str(rec.token_file))
    for key, value in change.items():
        setattr(state, key, value)
    problem = _supervisor(tmp_path).check(rec, 3.0)
    assert problem is not None and problem.startswith(expected), problem


def test_hung_and_dead_vllm_replicas_fail_and_are_fenced_after_n_checks(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    state, url = vllm_server
    rec = _service(tmp_path, url)
    state.token = read_token(str(rec.token_file))
    state.delay_s = 1.5
    t0 = time.monotonic()
    hung = check_vllm(rec, url, {"Authorization": f"Bearer {state.token}"}, 0.5)
    assert hung == "no answer within 0.5s (hung?)" and time.monotonic() - t0 < 1.4
    dead = check_vllm(rec, "http://127.0.0.1:9", {}, 1.0)  # nobody listens there
    assert dead is not None and dead.startswith("ConnectError")

    # _judge: the record fails `failures` checks in a row before it must be replaced.
    state.delay_s = 0.0
    state.completion = 503
    sup = _supervisor(tmp_path)
    settings = Settings(failures=2)
    assert sup._judge(rec, None, settings) is None
    why = sup._judge(rec, None, settings)
    assert why is not None and why.startswith("failed 2 checks in a row (last: probe completion")
    decisions = S.read_decisions(tmp_path / "svc")
    assert [d["action"] for d in decisions] == ["check-failed", "check-failed"]
    assert "probe completion answered 503" in decisions[-1]["why"]


# -- scaling on vLLM's gauges -----------------------------------------------------------------


def _autoscaled(
    tmp_path: Path, url: str, replicas: int = 1
) -> tuple[EndpointRecord, Path, dict[str, Any], Supervisor]:
    """A vLLM service at ``url`` autoscaled between 1 and 2 replicas (target 2 ongoing, no
    delays) with ``replicas`` desired: its READY record, run directory, desired state and a
    supervisor."""
    rec = _service(tmp_path, url)
    run_dir = tmp_path / "svc"
    opts = S.ServeOptions(
        ref="tiny:1", engine="vllm", replicas=replicas,
        autoscale=S.Autoscale(min_replicas=1, max_replicas=2, target_ongoing=2.0,
                              upscale_delay_s=0.0, downscale_delay_s=0.0),
    )  # fmt: skip
    return rec, run_dir, S.write_desired(run_dir, opts), _supervisor(tmp_path)


def test_vllm_services_scale_on_running_plus_waiting_requests(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    state, url = vllm_server
    rec, run_dir, desired, sup = _autoscaled(tmp_path, url)
    # 6 ongoing on one replica, target 2 per replica -> 3 wanted, capped at --max-replicas 2.
    up = sup.autoscale(desired, [rec])
    assert up is not None and up["action"] == "scale-up" and up["to"] == 2
    assert up["ongoing"] == 6.0 and "6.00 ongoing requests on 1 READY" in up["why"]
    assert S.read_desired(run_dir)["replicas"] == 2  # type: ignore[index]
    # Idle: back down to the minimum on the very first scrape (a gauge needs no history).
    state.metrics = METRICS.replace(" 3.0", " 0.0").replace(" 2.0", " 0").replace(" 1.0", " 0")
    down = sup.autoscale(S.read_desired(run_dir) or {}, [rec, rec])
    assert down is not None and down["action"] == "scale-down" and down["to"] == 1
    # No gauges (not a vLLM /metrics): no data, no decision.
    state.metrics = "nothing here\n"
    assert sup.autoscale(S.read_desired(run_dir) or {}, [rec]) is None


def test_no_scale_down_while_a_replica_is_loading(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    state, url = vllm_server
    rec, run_dir, desired, sup = _autoscaled(tmp_path, url, replicas=2)
    state.metrics = 'vllm:num_requests_running{engine="0"} 0.0\n'  # idle
    loading = dataclasses.replace(rec, replica=1, job_id="8_1", state=EndpointState.LOADING)
    assert sup.autoscale(S.read_desired(run_dir) or desired, [rec, loading]) is None
    assert S.read_desired(run_dir)["replicas"] == 2  # type: ignore[index]
    ready = dataclasses.replace(loading, state=EndpointState.READY)
    down = sup.autoscale(S.read_desired(run_dir) or desired, [rec, ready])
    assert down is not None and down["action"] == "scale-down" and down["to"] == 1


def test_a_dip_of_vllms_gauges_does_not_hide_a_load(
    tmp_path: Path, vllm_server: tuple[FakeVllm, str]
) -> None:
    # Seen on the dev cluster: 6 streams kept one replica busy while its gauges read 0-1 on
    # every scrape (a second replica starting took the CPU), so it scaled down at once.
    state, url = vllm_server
    rec, run_dir, desired, sup = _autoscaled(tmp_path, url)
    gauges_zero = (
        'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0\n'
    )
    state.metrics = gauges_zero + 'vllm:e2e_request_latency_seconds_sum{engine="0"} 100.0\n'
    assert sup.autoscale(desired, [rec]) is None  # first scrape: the gauges say idle
    time.sleep(0.5)
    # 3 more seconds of finished requests in ~0.5 s: ~6 in flight on average.
    state.metrics = gauges_zero + 'vllm:e2e_request_latency_seconds_sum{engine="0"} 103.0\n'
    up = sup.autoscale(S.read_desired(run_dir) or {}, [rec])
    assert up is not None and up["action"] == "scale-up" and up["to"] == 2, up
    assert 4.0 < up["ongoing"] <= 6.0


# -- planning and listing ---------------------------------------------------------------------


def test_vllm_with_supervise_and_autoscaling_is_planned(tmp_path: Path) -> None:
    models = tmp_path / "models"
    import_hf(ModelRepository(models), make_hf_dir(tmp_path / "hf"), "llm")
    serving = {**site_data("dev")["serving"], "vllm": {"python": "/p/python"}}
    site = write_site(tmp_path, "dev", serving=serving)
    opts = S.ServeOptions(
        "llm:1", engine="vllm", repo=str(models),
        autoscale=S.Autoscale(min_replicas=1, max_replicas=2),
    )  # fmt: skip
    request, spec = S.plan_service(site, opts)
    assert opts.supervise and request.command[1:] == ["-m", "aimass_hpc.serve.vllm_replica"]
    assert spec["serve"]["engine"] == "vllm"
    out = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "serve", "start", "llm:1", "--engine", "vllm",
         "--repo", str(models), "--site", str(site.source), "--supervise", "--min-replicas", "1",
         "--max-replicas", "2", "--dry-run", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "-m aimass_hpc.serve.vllm_replica" in json.loads(out.stdout)["script"]


def test_endpoints_show_the_engine(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    for job, engine in (("local-1", "vllm"), ("local-2", None)):
        rec = EndpointRecord(
            model_ref="tiny:1", model_name="tiny", version="1", state=EndpointState.READY,
            job_id=job, replica=0, run_dir=str(site.runs_root / f"svc-{job}"), engine=engine,
        )  # fmt: skip
        write_record(rec)
    env = {**os.environ, "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "aimass_hpc", "endpoints", "--site", str(site.source)]
    out = subprocess.run([*cmd, "--json", "--no-probe"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert sorted(r["engine"] for r in json.loads(out.stdout)) == ["torch", "vllm"]
    table = subprocess.run([*cmd, "--no-probe"], capture_output=True, text=True, env=env)
    assert "engine" in table.stdout and "vllm" in table.stdout and "torch" in table.stdout


# -- how vLLM is started ----------------------------------------------------------------------


def test_the_token_reaches_vllm_in_its_environment_never_on_its_command_line(
    tmp_path: Path,
) -> None:
    # Seen on the dev cluster: a token that began with "-" made vLLM's argument parser stop
    # ("argument --api-key: expected at least one argument").
    token = "-Ab3_secret"
    cfg = {"python": "/p/python", "env": {"VLLM_API_KEY": "not-this"}, "args": ["--seed", "1"]}
    argv, env = vllm_launch(
        cfg, tmp_path / "m", "tiny", "127.0.0.1", 8000, token, 0, tmp_path,
        base_env={"PATH": "/bin", "VIRTUAL_ENV": "/v"},
    )  # fmt: skip
    assert not any(token in a for a in argv), argv
    assert "--api-key" not in argv and argv[:3] == ["/p/python", "-m", API_SERVER]
    assert argv[-2:] == ["--seed", "1"]
    # On a scancel's SIGTERM vLLM finishes the requests in flight instead of aborting them.
    assert argv[argv.index("--shutdown-timeout") + 1] == "6"
    assert env["VLLM_API_KEY"] == token and env["PATH"] == "/bin" and "VIRTUAL_ENV" not in env
