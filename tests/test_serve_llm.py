"""OpenAI clients with replica failover (serve/llm.py) and the LLM load test (serve/llm_bench.py).

The replicas are real HTTP servers on loopback speaking the part of vLLM's OpenAI API the
client and the bench use (``/readyz``, ``/v1/models``, ``/v1/completions`` with SSE streaming,
bearer tokens), found through real endpoint records and token files in run directories.
The real vLLM service is tests/test_vllm_service_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aimass_hpc.common.errors import NotFoundError
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.client import Client
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, write_record
from aimass_hpc.serve.llm import async_openai_client, is_llm_service, openai_client
from aimass_hpc.serve.llm_bench import bench_llm


@dataclass
class Replica:
    """One fake vLLM replica: its URL, token and what it saw."""

    name: str
    token: str
    url: str = ""
    status: int = 200  # what /v1/* answers (503: draining)
    completions: int = 0
    auth_seen: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    dead: bool = False

    def stop(self) -> None:
        """As a killed server: refuse new connections, drop kept-alive ones unanswered."""
        assert self.server is not None
        self.dead = True
        self.server.shutdown()
        self.server.server_close()


def _handler(rep: Replica) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def _send(self, code: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/readyz":
                self._send(200, {"phase": "ready"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            else:
                self._send(404, {"detail": "no route"})

        def do_POST(self) -> None:  # noqa: N802
            if rep.dead:
                self.close_connection = True
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ptoks = 2 * len(str(body.get("prompt", "")).split())  # two tokens a word here
            if self.path == "/tokenize":
                self._send(200, {"count": ptoks, "max_model_len": 128, "tokens": []})
                return
            rep.auth_seen.append(self.headers.get("Authorization", ""))
            if self.headers.get("Authorization") != f"Bearer {rep.token}":
                self._send(401, {"error": {"message": "Unauthorized"}})
                return
            if rep.status != 200:
                self._send(rep.status, {"error": {"message": "draining"}})
                return
            rep.completions += 1
            n = int(body.get("max_tokens", 4))
            if not body.get("stream"):
                choice = {"index": 0, "text": rep.name * n, "finish_reason": "length"}
                if "messages" in body:
                    choice = {"index": 0, "finish_reason": "length",
                              "message": {"role": "assistant", "content": rep.name}}  # fmt: skip
                self._send(200, {
                    "id": "x", "object": "text_completion", "created": 0, "model": "tiny",
                    "choices": [choice],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3},
                })  # fmt: skip
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [
                {"id": "x", "object": "text_completion", "created": 0, "model": "tiny",
                 "choices": [{"index": 0, "text": rep.name, "finish_reason": None}]}
                for _ in range(n)
            ]  # fmt: skip
            events.append({"id": "x", "object": "text_completion", "created": 0,
                           "model": "tiny", "choices": [],
                           "usage": {"prompt_tokens": ptoks, "completion_tokens": n,
                                     "total_tokens": n + ptoks}})  # fmt: skip
            for ev in [*(json.dumps(e) for e in events), "[DONE]"]:
                chunk = f"data: {ev}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.002)
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@dataclass
class Service:
    runs: Path
    replicas: list[Replica]
    records: list[EndpointRecord]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """Two fake vLLM replicas of ``tiny:1`` in two run directories, each with its token."""
    runs = tmp_path / "runs"
    reps, recs = [], []
    for i, name in enumerate("ab"):
        run_dir = runs / f"serve-{name}"
        run_dir.mkdir(parents=True)
        rep = Replica(name, ensure_token(run_dir))
        rep.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rep))
        rep.server.daemon_threads = True
        threading.Thread(target=rep.server.serve_forever, daemon=True).start()
        port = rep.server.server_address[1]
        rep.url = f"http://127.0.0.1:{port}"
        rec = EndpointRecord(
            model_ref="tiny:1", model_name="tiny", version="1", state=EndpointState.READY,
            job_id=f"10{i}", replica=0, run_dir=str(run_dir), host="127.0.0.1", port=port,
            token_file=str(token_path(run_dir)),
        )  # fmt: skip
        write_record(rec, EndpointState.READY, message="engine vllm")
        reps.append(rep)
        recs.append(rec)
    try:
        yield Service(runs, reps, recs)
    finally:
        for rep in reps:
            rep.stop()


def test_openai_client_spreads_requests_with_each_replicas_token(service: Service) -> None:
    client = openai_client("tiny", runs_root=service.runs)
    texts = {client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].text
             for _ in range(4)}  # fmt: skip
    assert texts == {"aa", "bb"}
    for rep in service.replicas:  # each replica got its own token, never the other's
        assert set(rep.auth_seen) == {f"Bearer {rep.token}"}
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True))
    assert [c.choices[0].text for c in chunks if c.choices] in (["a"] * 3, ["b"] * 3)
    raw = client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=1)
    by_url = {rep.url: rep.name for rep in service.replicas}
    assert raw.headers["x-aimass-version"] == "1"
    assert raw.parse().choices[0].text == by_url[raw.headers["x-aimass-endpoint"]]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.choices[0].message.role == "assistant"
    client.close()


def test_draining_and_dead_replicas_are_skipped_without_a_failure(service: Service) -> None:
    a, b = service.replicas
    client = openai_client("tiny", runs_root=service.runs, refresh_interval=60)
    a.status = 503  # draining: the request goes to b, before any byte reached the caller
    for _ in range(4):
        assert (
            client.completions.create(model="tiny", prompt="x", max_tokens=1).choices[0].text == "b"
        )
    a.status = 200
    b.stop()  # connection refused now; the records still say READY
    for _ in range(4):
        out = client.completions.create(model="tiny", prompt="x", max_tokens=2, stream=True)
        assert "".join(c.choices[0].text for c in out if c.choices) == "aa"
    client.close()


def test_every_replica_gone_is_one_connection_error(service: Service) -> None:
    import openai

    for rep in service.replicas:
        rep.status = 503
    client = openai_client("tiny", runs_root=service.runs, retry_timeout=0.5)
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1)
    client.close()
    with pytest.raises(NotFoundError, match="no service for 'nope'"):
        openai_client("nope", runs_root=service.runs)


def test_async_openai_client(service: Service) -> None:
    import asyncio

    async def go() -> set[str]:
        client = async_openai_client("tiny:1", runs_root=service.runs)
        outs = await asyncio.gather(*(
            client.completions.create(model="tiny", prompt="x", max_tokens=1) for _ in range(6)
        ))  # fmt: skip
        await client.close()
        return {o.choices[0].text for o in outs}

    assert asyncio.run(go()) == {"a", "b"}


def test_llm_detection_and_bench(service: Service) -> None:
    with Client("tiny", runs_root=service.runs) as c:
        assert is_llm_service(c)
    report = bench_llm("tiny", runs_root=service.runs, concurrency=4, prompt_len=8,
                       max_tokens=5, duration=0.6, warmup=0.2)  # fmt: skip
    assert report["requests_failed"] == 0 and report["requests_ok"] > 0
    assert report["replicas"] == 2 and report["model"] == "tiny"
    assert report["output_tokens"] == 5 * report["requests_ok"]
    assert report["prompt_tokens"] == 8  # fitted with /tokenize: 4 words of 2 tokens
    assert report["output_tokens_per_s"] > report["requests_per_s"] > 0
    assert 0 < report["ttft_p50_ms"] <= report["ttft_p99_ms"]
    assert 0 < report["itl_p50_ms"] <= report["itl_p90_ms"] <= report["itl_p99_ms"]


def test_cli_bench_detects_an_llm_service(service: Service) -> None:
    rep = service.replicas[0]
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "bench", rep.url, "--token", rep.token,
         "--concurrency", "2", "--duration", "0.5", "--max-tokens", "3", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["engine"] == "vllm" and report["requests_failed"] == 0
    assert report["target"] == rep.url and report["ttft_p90_ms"] is not None
    bad = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "bench", rep.url, "--llm", "--token", rep.token,
         "--prompt-len", "0"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--prompt-len" in bad.stderr and "Traceback" not in bad.stderr
