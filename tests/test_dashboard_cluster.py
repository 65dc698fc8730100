"""The dashboard's Cluster page and API on the real local Slurm cluster: partitions, nodes
with CPU and GPU (gres) allocation, reservations and the viewer's fair share (slurmdbd), read
by aimass_hpc.launch.cluster_info; plus its parsers on the tools' own output formats."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _sitefixtures import write_site
from test_dashboard_api import ME, logged_in, running

from aimass_hpc.common.errors import SchedulerError
from aimass_hpc.launch import cluster_info

SINFO = "debug*|up|infinite|1|2/6/0/8|gpu:fake:4|mixed|node1\ndebug*|up|infinite|2|0/16/0/16|gpu:fake:4|idle|node[2-3]\n"  # noqa: E501
NODE = ("NodeName=node1 CPUAlloc=2 CPUTot=8 CPULoad=0.50 Gres=gpu:fake:4 RealMemory=8192 "
        "AllocMem=1024 State=MIXED Partitions=debug CfgTRES=cpu=8,mem=8G,billing=8,gres/gpu=4 "
        "AllocTRES=cpu=2,mem=1G,gres/gpu=3\n")  # fmt: skip


def test_parsers_read_the_tools_formats() -> None:
    (part,) = cluster_info.parse_sinfo(SINFO)
    assert part["partition"] == "debug" and part["default"]
    assert (part["nodes"], part["cpus_alloc"], part["cpus_total"]) == (3, 2, 24)
    assert part["states"] == {"mixed": 1, "idle": 2} and part["gres"] == ["gpu:fake:4"]
    (node,) = cluster_info.parse_nodes(NODE)
    assert (node["node"], node["gpus_alloc"], node["gpus_total"]) == ("node1", 3, 4)
    assert (node["cpus_alloc"], node["cpus_total"], node["mem_alloc_mb"]) == (2, 8, 1024)
    (share,) = cluster_info.parse_sshare("acct|alice|1||12|0.250000|0.500000\n")
    assert share["user"] == "alice" and share["rawusage"] == 12 and share["normshares"] is None


def test_the_cluster_api_needs_a_login_and_a_slurm_site(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    with running(site) as srv:
        with httpx.Client(base_url=srv.url, trust_env=False) as anon:
            assert anon.get("api/cluster").status_code == 401
            assert anon.get("cluster", follow_redirects=False).status_code == 303
        client, _ = logged_in(srv)
        resp = client.get("api/cluster")
        assert resp.status_code == 400 and "needs a Slurm site" in resp.json()["detail"]


def test_a_failing_tool_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real sinfo that cannot reach a controller (a config naming none that listens).
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.9)\nSlurmctldPort=1\n"
                    "NodeName=n1\nPartitionName=p Nodes=n1\n")  # fmt: skip
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(SchedulerError) as err:
        cluster_info.partitions()
    assert str(err.value).startswith("sinfo failed: ") and "\n" not in str(err.value)


@pytest.mark.cluster
def test_partitions_nodes_gpus_reservations_and_fair_share(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    resv = f"aimass-dash-{int(time.time())}"
    made = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "reserve", "create", resv, "--nodes", "node3",
         "--duration", "10", "--flags", "ignore_jobs"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    job = subprocess.run(
        ["sbatch", "--parsable", "--gres=gpu:2", "-w", "node2", "-t", "2",
         "--output", str(tmp_path / "slurm-%j.out"), "--wrap", "sleep 120"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        with running(site) as srv:
            client, _ = logged_in(srv)

            def node2_gpus() -> int:
                nodes = {n["node"]: n for n in client.get("api/cluster").json()["nodes"]}
                return int(nodes["node2"]["gpus_alloc"])

            deadline = time.monotonic() + 60
            while node2_gpus() != 2:
                assert time.monotonic() < deadline, "the GPU job's allocation was not shown"
                time.sleep(1)
            d = client.get("api/cluster").json()
            assert [p["partition"] for p in d["partitions"]] == ["debug"]
            assert d["partitions"][0]["nodes"] == 3 and d["partitions"][0]["default"]
            nodes = {n["node"]: n for n in d["nodes"]}
            assert set(nodes) == {"node1", "node2", "node3"}
            assert all(n["gpus_total"] == 4 and n["cpus_total"] > 0 for n in nodes.values())
            assert d["totals"]["gpus_total"] == 12 and d["totals"]["gpus_alloc"] >= 2
            (mine,) = [r for r in d["reservations"] if r["ReservationName"] == resv]
            assert mine["Nodes"] == "node3"
            assert d["user"] == ME and d["fairshare"], d["fairshare"]  # slurmdbd keeps it
            assert {f["user"] for f in d["fairshare"]} == {ME}
            assert (
                client.get("api/cluster", params={"fairshare": "false"}).json()["fairshare"] is None
            )
            assert client.get("api/cluster", params={"fairshare": "maybe"}).status_code == 422
    finally:
        subprocess.run(["scancel", job_id], check=False)
        subprocess.run([sys.executable, "-m", "aimass_hpc", "reserve", "delete", resv],
                       capture_output=True, check=False)  # fmt: skip
