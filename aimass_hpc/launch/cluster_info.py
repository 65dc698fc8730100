"""What the cluster looks like now: partitions, nodes (CPU and GPU allocation), reservations
and a user's fair share, read from Slurm's command-line tools (the dashboard's Cluster page).

Every reading uses a fixed ``-o`` format or ``scontrol -o`` key=value lines (stable across
Slurm releases, unlike ``--json``, which not every site's build has). A tool that fails is a
one-line :class:`SchedulerError`; ``sshare`` failing (no accounting) is not an error: the
fair share is then ``None``.
"""

from __future__ import annotations

import re
from typing import Any

from aimass_hpc.common import slurm_cli
from aimass_hpc.common.errors import SchedulerError
from aimass_hpc.launch.reservations import list_reservations

# sinfo columns, one partition (and node state) per line: name (with * for the default),
# availability, time limit, node count, CPUs A/I/O/T, gres, state, node list.
_SINFO_FORMAT = "%P|%a|%l|%D|%C|%G|%T|%N"
_SSHARE_FIELDS = ("Account", "User", "RawShares", "NormShares", "RawUsage", "EffectvUsage",
                  "FairShare")  # fmt: skip
_GPU_TRES = re.compile(r"(?:^|,)gres/gpu(?::[^=,]*)?=(\d+)")
_CPU_TRES = re.compile(r"(?:^|,)cpu=(\d+)")


def _run(argv: list[str]) -> str:
    """stdout of one Slurm tool; SchedulerError naming it and its message when it fails."""
    proc = slurm_cli.run_command(argv, env=slurm_cli.submission_env(), timeout=30)
    if proc.returncode != 0:
        raise SchedulerError(f"{argv[0]} failed: {slurm_cli.error_line(proc.stderr, proc.stdout)}")
    return proc.stdout


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def parse_sinfo(text: str) -> list[dict[str, Any]]:
    """``sinfo -h -o`` lines (see ``_SINFO_FORMAT``) -> one row per partition, the node
    states of its lines added up (sinfo splits a partition by node state)."""
    parts: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        cols = line.strip().split("|")
        if len(cols) != 8:
            continue
        name, avail, limit, count, cpus, gres, state, nodes = cols
        default = name.endswith("*")
        name = name.rstrip("*")
        row = parts.setdefault(name, {
            "partition": name, "default": default, "avail": avail, "time_limit": limit,
            "nodes": 0, "cpus_alloc": 0, "cpus_idle": 0, "cpus_total": 0, "gres": set(),
            "states": {}, "node_lists": [],
        })  # fmt: skip
        n = _int(count) or 0
        row["nodes"] += n
        a, i, _o, t = (cpus.split("/") + ["0"] * 4)[:4]
        row["cpus_alloc"] += _int(a) or 0
        row["cpus_idle"] += _int(i) or 0
        row["cpus_total"] += _int(t) or 0
        if gres and gres != "(null)":
            row["gres"].add(gres)
        row["states"][state] = row["states"].get(state, 0) + n
        row["node_lists"].append(nodes)
    out = []
    for row in parts.values():
        row["gres"] = sorted(row["gres"])
        out.append(row)
    return out


def parse_nodes(text: str) -> list[dict[str, Any]]:
    """``scontrol show node -o`` lines -> one row per node with CPU and GPU allocation."""
    out = []
    for line in text.splitlines():
        if not line.startswith("NodeName="):
            continue
        f: dict[str, str] = {}
        for item in line.split():
            key, sep, value = item.partition("=")
            if sep:
                f[key] = value
        cfg, alloc = f.get("CfgTRES", ""), f.get("AllocTRES", "")
        gpus = _GPU_TRES.search(cfg)
        gpus_alloc = _GPU_TRES.search(alloc)
        out.append({
            "node": f.get("NodeName"),
            "state": f.get("State"),
            "partitions": [p for p in f.get("Partitions", "").split(",") if p],
            "cpus_alloc": _int(f.get("CPUAlloc")) or 0,
            "cpus_total": _int(f.get("CPUTot")) or 0,
            "cpu_load": f.get("CPULoad"),
            "mem_mb": _int(f.get("RealMemory")),
            "mem_alloc_mb": _int(f.get("AllocMem")) or 0,
            "gpus_total": int(gpus.group(1)) if gpus else 0,
            "gpus_alloc": int(gpus_alloc.group(1)) if gpus_alloc else 0,
            "gres": f.get("Gres") if f.get("Gres") not in (None, "(null)") else None,
            "reason": f.get("Reason"),
        })  # fmt: skip
    return out


def parse_sshare(text: str) -> list[dict[str, Any]]:
    """``sshare -h -P -o ...`` lines -> rows keyed by ``_SSHARE_FIELDS`` (numbers as floats)."""
    rows = []
    for line in text.splitlines():
        cols = line.split("|")
        if len(cols) != len(_SSHARE_FIELDS):
            continue
        row: dict[str, Any] = {}
        for key, value in zip(_SSHARE_FIELDS, cols, strict=True):
            value = value.strip()
            if key in ("Account", "User"):
                row[key.lower()] = value or None
                continue
            try:
                row[key.lower()] = float(value) if value else None
            except ValueError:
                row[key.lower()] = None
        rows.append(row)
    return rows


def partitions() -> list[dict[str, Any]]:
    """Every partition: availability, time limit, nodes by state, CPUs allocated/total, gres."""
    return parse_sinfo(_run(["sinfo", "-h", "-o", _SINFO_FORMAT]))


def nodes() -> list[dict[str, Any]]:
    """Every node: state, CPUs and GPUs allocated of total, memory."""
    return parse_nodes(_run(["scontrol", "show", "node", "-o"]))


def user_fairshare(user: str) -> list[dict[str, Any]] | None:
    """``user``'s associations with shares, usage and fair-share factor; None where the
    cluster keeps no accounting (sshare fails)."""
    proc = slurm_cli.run_command(
        ["sshare", "-h", "-P", "-U", "-u", user, "-o", ",".join(_SSHARE_FIELDS)],
        env=slurm_cli.submission_env(), timeout=30,
    )  # fmt: skip
    if proc.returncode != 0:
        return None
    return [r for r in parse_sshare(proc.stdout) if r.get("user") == user]


def overview(user: str, *, fairshare: bool = True) -> dict[str, Any]:
    """Partitions, nodes (with GPU allocation), reservations and ``user``'s fair share
    (``fairshare=False``: not asked, None)."""
    node_rows = nodes()
    return {
        "partitions": partitions(),
        "nodes": node_rows,
        "totals": {
            "nodes": len(node_rows),
            "cpus_alloc": sum(n["cpus_alloc"] for n in node_rows),
            "cpus_total": sum(n["cpus_total"] for n in node_rows),
            "gpus_alloc": sum(n["gpus_alloc"] for n in node_rows),
            "gpus_total": sum(n["gpus_total"] for n in node_rows),
        },
        "reservations": list_reservations(),
        "user": user,
        "fairshare": user_fairshare(user) if fairshare else None,
    }
