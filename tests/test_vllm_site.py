"""`[serving.vllm]` and `aimass serve --engine vllm` without the cluster: the site keys, the
plan (job command, spec.serve), the refusals, the vLLM command forms, and the /readyz
middleware loaded into vLLM (aimass_hpc/serve/vllm_readyz.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _sitefixtures import site_data, write_site
from test_repo_hf import make_hf_dir

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.site import Site, parse_site
from aimass_hpc.launch.serving import ServeOptions, plan_service
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.hf import import_hf
from aimass_hpc.serve.vllm_readyz import Readyz
from aimass_hpc.serve.vllm_replica import vllm_command

ARGS = ["--enforce-eager", "--dtype", "float32"]


def _site_with(tmp_path: Path, vllm: dict[str, Any] | None) -> Site:
    serving = {k: v for k, v in site_data("dev")["serving"].items() if k != "vllm"}
    if vllm is not None:
        serving["vllm"] = vllm
    return write_site(tmp_path, "dev", serving=serving)


def _problems(vllm: dict[str, Any]) -> list[str]:
    data = site_data("dev")
    data["filesystems"] = {"runs": "/tmp/r", "models": "/tmp/m"}
    data["serving"] = {"vllm": vllm}
    site, problems = parse_site(data, "/tmp/x/site.toml")
    assert site is None
    return [str(p) for p in problems]


@pytest.mark.parametrize(
    "vllm",
    [{}, {"python": "/p/python", "module": "vllm/0.32"}, {"module": "m", "container": "i.sif"}],
)
def test_exactly_one_way_to_provide_vllm(vllm: dict[str, Any]) -> None:
    problems = _problems(vllm)
    assert len(problems) == 1 and "serving.vllm" in problems[0]
    assert "exactly one of python, module, container" in problems[0]


@pytest.mark.parametrize("key", ["python", "module", "container"])
def test_a_line_break_in_where_vllm_lives_is_refused_by_key(key: str) -> None:
    problems = _problems({key: "/opt/vllm/bin/python\n"})
    assert len(problems) == 1 and f"serving.vllm.{key}" in problems[0]
    assert "line break" in problems[0] and "\n" not in problems[0].rstrip("\n")


def test_the_bundled_dev_site_uses_the_checkout_venv() -> None:
    vllm = site_data("dev")["serving"]["vllm"]
    assert vllm["python"] == "../.venv-vllm/bin/python" and "--enforce-eager" in vllm["args"]


@pytest.fixture
def repo_with_models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    repo = ModelRepository(models)
    import_hf(repo, make_hf_dir(tmp_path / "hf"), "llm")
    repo.save("plain", {"w": np.zeros(3, np.float32)}, recipe={"kind": "x"})
    return models


def test_plan_resolves_the_sites_vllm_into_the_spec(tmp_path: Path, repo_with_models) -> None:
    # A relative python is relative to the site file's folder.
    site = _site_with(tmp_path, {"python": "venv/bin/python", "args": ARGS, "env": {"A": "1"}})
    request, spec = plan_service(
        site, ServeOptions("llm:1", engine="vllm", gpus=2, repo=str(repo_with_models))
    )
    assert request.command[1:] == ["-m", "aimass_hpc.serve.vllm_replica"]
    serve = spec["serve"]
    assert serve["engine"] == "vllm" and serve["gpus"] == 2 and serve["resolved_version"] == 1
    assert serve["vllm"]["python"] == str((tmp_path / "venv/bin/python").resolve())
    assert serve["vllm"]["args"] == ARGS and serve["vllm"]["env"] == {"A": "1"}
    # The torch engine's plan is what it was: no engine keys.
    assert "engine" not in ServeOptions("llm:1").serve_section("/r", 1)


def test_refusals_are_one_line(tmp_path: Path, repo_with_models) -> None:
    repo = str(repo_with_models)
    site = _site_with(tmp_path, {"python": "/p/python"})
    with pytest.raises(InputError, match=r"plain:1 is not a Hugging Face model"):
        plan_service(site, ServeOptions("plain:1", engine="vllm", repo=repo))
    with pytest.raises(InputError, match=r"--engine 'tgi': use one of torch, vllm"):
        plan_service(site, ServeOptions("llm:1", engine="tgi", repo=repo))
    (tmp_path / "bare").mkdir()
    bare = _site_with(tmp_path / "bare", None)
    with pytest.raises(InputError, match=r"has no \[serving.vllm\] table"):
        plan_service(bare, ServeOptions("llm:1", engine="vllm", repo=repo))


def test_cli_dry_run_prints_the_vllm_job(tmp_path: Path, repo_with_models) -> None:
    site = _site_with(tmp_path, {"python": "/p/python", "args": ARGS})
    out = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "serve", "start", "llm:1", "--engine", "vllm",
         "--repo", str(repo_with_models), "--site", str(site.source), "--dry-run", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "-m aimass_hpc.serve.vllm_replica" in json.loads(out.stdout)["script"]
    bad = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "serve", "start", "llm:1", "--engine", "tgi",
         "--site", str(site.source), "--dry-run"], capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_vllm_command_forms() -> None:
    server = ["-m", "vllm.entrypoints.openai.api_server", "--port", "1"]
    assert vllm_command({"python": "/v/python"}, ["--port", "1"], 0) == ["/v/python", *server]
    module = vllm_command({"module": "vllm/0.32 x"}, ["--port", "1"], 0)
    assert module[:2] == ["bash", "-lc"]
    assert module[2].startswith("module load 'vllm/0.32 x' && exec python3 -m vllm.")
    assert vllm_command({"container": "v.sif"}, ["--port", "1"], 2) == [
        "apptainer", "exec", "--nv", "v.sif", "python3", *server,
    ]  # fmt: skip


def _call(app: Readyz, path: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    asyncio.run(app({"type": "http", "path": path, "raw_path": path.encode()}, receive, send))
    return sent[0]["status"], sent[1].get("body", b"")


def test_readyz_middleware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    drain = tmp_path / "draining"
    monkeypatch.setenv("AIMASS_VLLM_DRAIN_FILE", str(drain))
    app = Readyz(inner)
    assert _call(app, "/readyz") == (200, b"/health")
    assert _call(app, "/healthz") == (200, b"/health")
    assert _call(app, "/v1/models") == (200, b"/v1/models")
    drain.write_text("x")
    status, body = _call(app, "/readyz")
    assert status == 503 and json.loads(body) == {"phase": "draining"}
    assert _call(app, "/healthz") == (200, b"/health")  # alive while draining


def test_a_request_meeting_the_engine_stopping_gets_503_not_500() -> None:
    class EngineDeadError(Exception):  # vLLM's, by name: the middleware imports no vLLM
        pass

    def raising(exc: Exception) -> Any:
        async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
            raise exc

        return Readyz(inner)

    stopping = RuntimeError("cannot schedule new futures after shutdown")
    for exc in (EngineDeadError("gone"), stopping):
        status, body = _call(raising(exc), "/v1/completions")
        assert status == 503 and "stopping" in json.loads(body)["detail"]
    with pytest.raises(ValueError):  # anything else stays vLLM's own error
        _call(raising(ValueError("bad")), "/v1/completions")


def test_the_time_limit_handover_drives_a_vllm_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """handover.handover_on_warning reads a VllmReplica as it reads a torch Replica: here the
    replacement's sbatch fails (no job.sh) and the record says so, then the replica drains."""
    from aimass_hpc.serve.endpoints import read_records, write_record
    from aimass_hpc.serve.handover import handover_on_warning
    from aimass_hpc.serve.vllm_replica import VllmReplica

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("AIMASS_GRACE_SECONDS", "10")
    opts = {"run_dir": tmp_path, "model": "llm:1", "repo": "/r", "drain_grace_s": 1.0,
            "warning_signal": "USR1", "job_id": "77_0"}  # fmt: skip
    replica = VllmReplica(opts)
    write_record(replica.record)
    asyncio.run(handover_on_warning(replica))  # type: ignore[arg-type]
    (rec,) = read_records(tmp_path)
    assert rec.job_id == "77_0" and "handover failed" in str(rec.message)
