"""Unit tests for aimass_hpc.launch.site_live: the parsers of Slurm's machine-readable output
and the comparison with a site config (no cluster needed).

The ``DEV_*`` texts were captured from the local dev cluster (Slurm 22.05.8,
scripts/dev-cluster); the ``PROD_*`` ones are production-shaped lines in the same formats
(typed gres with socket bindings, features, partition Allow lists).
"""

from __future__ import annotations

import pytest
from _sitefixtures import site_data

from aimass_hpc.config.site import Site
from aimass_hpc.launch import site_live as L

DEV_PARTITIONS = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL "
    "Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 "
    "Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED "
    "Nodes=node[1-3] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO "
    "OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=24 TotalNodes=3 "
    "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED "
    "MaxMemPerNode=UNLIMITED TRES=cpu=24,mem=24G,node=3,billing=24,gres/gpu=12\n"
)
DEV_NODES = (
    "node1|debug|8|8192|gpu:fake:4|(null)\n"
    "node2|debug|8|8192|gpu:fake:4|(null)\n"
    "node3|debug|8|8192|gpu:fake:4|(null)\n"
)
DEV_NODE_LINE = (
    "NodeName=node1 Arch=x86_64 CoresPerSocket=8  CPUAlloc=0 CPUEfctv=8 CPUTot=8 CPULoad=1.56 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:fake:4 NodeAddr=127.0.0.1 "
    "NodeHostName=vm Version=22.05.8 OS=Linux 6.18.44-fc-v1272 #1 SMP PREEMPT_DYNAMIC @0  "
    "RealMemory=8192 AllocMem=0 FreeMem=22837 Sockets=1 Boards=1 State=IDLE"
)
DEV_ASSOC = "root||normal\n"
DEV_NO_RESERVATIONS = "No reservations in the system\n"
DEV_MPI_LIST = (
    "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\n"
    "specific pmix plugin versions available: pmix_v4\n"
)

PROD_PARTITIONS = (
    "PartitionName=h100 AllowGroups=ALL AllowAccounts=ai-research,vision AllowQos=gpu,debug "
    "Default=NO DefaultTime=04:00:00 MaxTime=2-00:00:00 Nodes=gpu[001-002] State=UP\n"
    "PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL DenyAccounts=guests AllowQos=ALL "
    "Default=YES DefaultTime=01:00:00 MaxTime=7-00:00:00 Nodes=cn[001-512] State=UP\n"
)
PROD_NODES = (
    "gpu001|h100|96|1945600|gpu:h100:4(S:0),gpu:h100:4(S:1),nvme:1|ib,nvlink\n"
    "gpu002|h100|96|1945600|gpu:h100:8(S:0-1)|ib,nvlink\n"
    "cn001|cpu|128|256000|(null)|ib\n"
)


def _site(**partition: object) -> Site:
    data = site_data("dev")
    data["partitions"]["debug"].update(partition)
    return Site.model_validate(data)


def _facts(**overrides: object) -> L.ClusterFacts:
    facts = L.ClusterFacts(
        user="root",
        partitions=L.parse_partitions(DEV_PARTITIONS),
        nodes=L.parse_nodes(DEV_NODES),
        associations=L.parse_associations(DEV_ASSOC),
        reservations=L.parse_reservation_names(DEV_NO_RESERVATIONS),
        mpi_types=L.parse_mpi_list(DEV_MPI_LIST),
    )
    for key, value in overrides.items():
        setattr(facts, key, value)
    return facts


# ------------------------------------------------------------------------------- parsers


def test_parse_partitions_reads_scontrols_one_line_form():
    parts = L.parse_partitions(DEV_PARTITIONS)
    assert list(parts) == ["debug"]
    debug = parts["debug"]
    assert debug.default and debug.max_time == "UNLIMITED" and debug.default_time == "NONE"
    assert debug.allow_accounts is None and debug.allow_qos is None and not debug.deny_accounts
    prod = L.parse_partitions(PROD_PARTITIONS)
    assert prod["h100"].allow_accounts == {"ai-research", "vision"}
    assert prod["h100"].allow_qos == {"gpu", "debug"} and not prod["h100"].default
    assert prod["cpu"].deny_accounts == {"guests"} and prod["cpu"].max_time == "7-00:00:00"


def test_parse_scontrol_line_keeps_values_with_spaces():
    fields = L.parse_scontrol_line(DEV_NODE_LINE)
    assert fields["OS"] == "Linux 6.18.44-fc-v1272 #1 SMP PREEMPT_DYNAMIC @0"
    assert fields["Gres"] == "gpu:fake:4" and fields["RealMemory"] == "8192"
    assert fields["AvailableFeatures"] == "(null)"


def test_parse_nodes_reads_sinfo_node_lines():
    nodes = L.parse_nodes(DEV_NODES)
    assert [n.name for n in nodes] == ["node1", "node2", "node3"]
    assert {(n.partition, n.cpus, n.mem_mb, n.gres_text) for n in nodes} == {
        ("debug", 8, 8192, "gpu:fake:4")
    }
    assert nodes[0].gres == (L.GresItem("gpu", "fake", 4),) and nodes[0].features == set()
    prod = L.parse_nodes(PROD_NODES + "garbage line\n")
    assert len(prod) == 3
    assert prod[0].features == {"ib", "nvlink"} and prod[2].gres == ()


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("gpu:h100:4", [("gpu", "h100", 4)]),
        ("gpu:4", [("gpu", None, 4)]),
        ("gpu", [("gpu", None, 1)]),
        ("(null)", []),
        ("gpu:h100:4(S:0),gpu:h100:4(S:1),nvme:1", [("gpu", "h100", 4)] * 2 + [("nvme", None, 1)]),
        ("gpu:a100:2(S:0,1),mps:400", [("gpu", "a100", 2), ("mps", None, 400)]),
        ("bandwidth:lustre:4G", []),  # not a count: left out
    ],
)
def test_parse_gres(text, items):
    assert [(i.name, i.type, i.count) for i in L.parse_gres(text)] == items


def test_parse_associations_reads_sacctmgr_parsable_rows():
    assert L.parse_associations(DEV_ASSOC) == [L.Association("root", "", frozenset({"normal"}))]
    rows = L.parse_associations("ai-research|h100|gpu,normal\nvision||\n\n")
    assert rows[0] == L.Association("ai-research", "h100", frozenset({"gpu", "normal"}))
    assert rows[1] == L.Association("vision", "", frozenset())


def test_parse_reservation_names():
    assert L.parse_reservation_names(DEV_NO_RESERVATIONS) == []
    text = "ReservationName=serve StartTime=now Nodes=node[1-2] Users=root Flags=IGNORE_JOBS\n"
    assert L.parse_reservation_names(text) == ["serve"]


def test_parse_mpi_list():
    assert L.parse_mpi_list(DEV_MPI_LIST) == {"pmix", "none", "cray_shasta", "pmi2", "pmix_v4"}
    newer = "srun: MPI types are...\nsrun: none\nsrun: pmi2\n"
    assert L.parse_mpi_list(newer) == {"none", "pmi2"}


# ------------------------------------------------------------------------------- compare


def test_the_dev_site_matches_the_dev_cluster():
    assert L.compare(_site(), _facts()) == []


def test_each_mismatch_is_named_by_its_key_path():
    data = site_data("dev")
    debug = data["partitions"]["debug"]
    debug.update(gpus_per_node=8, cpus_per_node=16, mem_per_node="16G", constraints=["ib"])
    data["partitions"]["gpu"] = {"gpus_per_node": 4, "max_time": "01:00:00"}
    data.update(account="nobody-account", qos="high")
    data["serving"]["default_reservation"] = "inference"
    data["mpi"]["srun_mpi"] = "pmi2"
    site = Site.model_validate(data)
    facts = _facts(mpi_types=frozenset({"pmix", "none"}))
    by_path = {p.path: p for p in L.compare(site, facts)}
    assert set(by_path) == {
        "partitions.debug.gpus_per_node",
        "partitions.debug.cpus_per_node",
        "partitions.debug.mem_per_node",
        "partitions.debug.constraints[0]",
        "partitions.gpu",
        "account",
        "serving.default_reservation",
        "mpi.srun_mpi",
    }
    assert by_path["partitions.debug.gpus_per_node"].message == (
        "config says 8, cluster nodes of partition debug have 4 (gres gpu:fake:4)"
    )
    assert "no partition 'gpu'" in by_path["partitions.gpu"].message
    assert "no association with account 'nobody-account'" in by_path["account"].message
    assert "'inference'" in by_path["serving.default_reservation"].message


def test_gpu_type_and_gres_name_are_compared():
    problems = L.compare(_site(gpu_type="h100"), _facts())
    assert [p.path for p in problems] == ["partitions.debug.gpu_type"]
    assert "gpu:fake:4" in problems[0].message
    problems = L.compare(_site(gres_name="mps"), _facts())
    assert [p.path for p in problems] == ["partitions.debug.gres_name"]
    # Fewer GPUs than equal nodes have is a mismatch too; 0 (CPU work) is not.
    assert [p.path for p in L.compare(_site(gpus_per_node=2), _facts())] == [
        "partitions.debug.gpus_per_node"
    ]
    assert L.compare(_site(gpus_per_node=0, gpu_type=None), _facts()) == []


def test_times_are_compared_with_the_one_parser():
    facts = _facts(partitions=L.parse_partitions(DEV_PARTITIONS.replace(
        "MaxTime=UNLIMITED", "MaxTime=12:00:00")))  # fmt: skip
    problems = {p.path: p for p in L.compare(_site(), facts)}
    assert set(problems) == {"partitions.debug.max_time"}
    assert "config says 1-00:00:00, partition debug's MaxTime is 12:00:00" in str(
        problems["partitions.debug.max_time"]
    )
    problems = {p.path for p in L.compare(_site(max_time="UNLIMITED", default_time="1-0"), facts)}
    assert problems == {"partitions.debug.max_time", "partitions.debug.default_time"}
    assert L.compare(_site(max_time="720"), facts) == []  # 720 minutes = 12 hours


def test_production_shaped_cluster():
    data = site_data("dev")
    data["partitions"] = {
        "h100": {"gpus_per_node": 8, "gpu_type": "h100", "cpus_per_node": 96,
                 "mem_per_node": "1900G", "max_time": "2-00:00:00", "qos": "gpu",
                 "constraints": ["ib", "nvlink"]},
        "cpu": {"default": True, "cpus_per_node": 128, "max_time": "7-00:00:00",
                "account": "guests"},
    }  # fmt: skip
    data.update(account="ai-research", qos="normal")
    site = Site.model_validate(data)
    rows = L.parse_associations("ai-research||normal,gpu\nguests|cpu|normal\n")
    facts = L.ClusterFacts(
        user="alice",
        partitions=L.parse_partitions(PROD_PARTITIONS),
        nodes=L.parse_nodes(PROD_NODES),
        associations=rows,
    )
    problems = {p.path: p.message for p in L.compare(site, facts)}
    # Two gres items on one socket each add up to 8; only the denied account is wrong.
    assert problems == {"partitions.cpu.account": "partition cpu does not allow account 'guests'"}
    facts.associations = L.parse_associations("ai-research|cpu|gpu\n")
    problems = {p.path: p.message for p in L.compare(site, facts)}
    # h100 uses the site account, which the user has only on partition cpu.
    assert problems["account"] == (
        "user alice has no association with account 'ai-research' on partition h100"
    )
    assert "QOS" not in str(problems)  # no account there: no QOS question
    facts.associations = L.parse_associations("ai-research||normal\nguests||normal\n")
    problems = {p.path: p.message for p in L.compare(site, facts)}
    assert problems["partitions.h100.qos"] == (
        "user alice may not use QOS 'gpu' with account 'ai-research'"
    )
