"""An LLM served through vLLM on the real local Slurm cluster (issue 14, first slice).

A tiny random-weight Llama (aimass_hpc/serve/tiny_llm.py, built in seconds by the vLLM
environment's Python) is imported with `aimass models import-hf`, served with
`aimass serve NAME:1 --engine vllm` (vLLM's CPU build from `.venv-vllm`, which
`scripts/setup-vllm` makes), answers the `openai` client with the service token
(completions, streaming, chat), is listed READY by `aimass endpoints`, and `aimass serve stop`
ends it (record STOPPED, no vLLM process left).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from _llmfixtures import aimass, build_tiny, llm_site

from aimass_hpc.serve.auth import read_token
from aimass_hpc.serve.endpoints import EndpointState, find_records

pytestmark = pytest.mark.cluster


def _tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def test_vllm_service_answers_the_openai_client(cluster, tmp_path: Path) -> None:
    from openai import OpenAI

    site = llm_site(tmp_path)
    site_file = str(site.source)
    build_tiny(tmp_path / "tiny-hf")
    imported = aimass("models", "--site", site_file, "import-hf", str(tmp_path / "tiny-hf"), "tiny")
    assert "imported tiny:1: LlamaForCausalLM" in imported.stdout

    t0 = time.monotonic()
    try:
        out = aimass("serve", "start", "tiny:1", "--engine", "vllm", "--site", site_file,
                     "--cpus", "2", "--wait", "--timeout", "600", "--json")  # fmt: skip
        ready_s = time.monotonic() - t0
        started = json.loads(out.stdout)
        assert started["endpoints"] and started["endpoints"][0].startswith("http://")

        rows = json.loads(aimass("endpoints", "tiny", "--site", site_file, "--json").stdout)
        assert [(r["state"], r["health"], r["version"]) for r in rows] == [("READY", "ready", "1")]
        rec = find_records(site.runs_root, "tiny")[0]
        token = read_token(str(rec.token_file))
        client = OpenAI(base_url=f"{rec.url}/v1", api_key=token, max_retries=0, timeout=120)

        t_ask = time.monotonic()
        done = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        first_answer_s = time.monotonic() - t_ask
        assert done.choices[0].finish_reason in ("length", "stop")
        assert done.usage is not None and done.usage.completion_tokens >= 1

        chunks = list(client.completions.create(
            model="tiny", prompt="The quick brown", max_tokens=8, stream=True))  # fmt: skip
        assert len(chunks) >= 2 and any(c.choices and c.choices[0].text for c in chunks)

        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert chat.choices[0].message.role == "assistant"

        bad = OpenAI(base_url=f"{rec.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(Exception, match="401|nauthorized"):
            bad.completions.create(model="tiny", prompt="Hello", max_tokens=1)

        rss = _tree_rss(int(rec.pid or 0))
        print(f"\nvLLM replica: READY {ready_s:.1f} s after `serve start`, first completion "
              f"{first_answer_s * 1000:.0f} ms, RSS {rss / 2**30:.2f} GiB")  # fmt: skip
        assert rss > 0

        tree = [psutil.Process(int(rec.pid or 0)), *psutil.Process(int(rec.pid or 0)).children(
            recursive=True)]  # fmt: skip
        assert any("vllm.entrypoints" in " ".join(p.cmdline()) for p in tree[1:])
        stopped = aimass("serve", "stop", "tiny", "--site", site_file)
        assert "stopped 1 replica(s)" in stdout_of(stopped)
        final = find_records(site.runs_root, "tiny")
        assert [r.state for r in final] == [EndpointState.STOPPED]
        assert [h["state"] for h in final[0].history][-3:] == ["READY", "DRAINING", "STOPPED"]
        _, alive = psutil.wait_procs(tree, timeout=30)  # the wrapper, vLLM and its workers
        assert alive == []
    finally:
        aimass("serve", "stop", "tiny", "--site", site_file, check=False)


def stdout_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr
