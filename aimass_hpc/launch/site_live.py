"""Comparing a site config with the cluster it describes: ``aimass site check --live``.

What the config says is checked against what Slurm says, each mismatch a
:class:`~aimass_hpc.config.site.Problem` named by its key path:

* partitions exist (``scontrol show partition -o``); MaxTime against ``max_time`` and
  ``default_time``; AllowAccounts/AllowQos against the accounts and QOS a partition is used with;
* per node of each partition (``sinfo -h -a -N -o NODE_FORMAT``): GPUs of ``gres_name`` /
  ``gpu_type`` against ``gpus_per_node``, CPUs and memory against ``cpus_per_node`` and
  ``mem_per_node``, features against ``constraints``;
* the accounts and QOS the user may use (``sacctmgr -nP show assoc user=USER ...``);
* ``serving.default_reservation`` (``scontrol show reservation -o``);
* ``mpi.srun_mpi`` in ``srun --mpi=list``.

Commands run through :func:`~aimass_hpc.common.slurm_cli.run_command` with a timeout; their
output is read by pure ``parse_*`` functions (tested on output captured from a real cluster) and
compared by the pure :func:`compare`. A controller that does not answer is a
:class:`~aimass_hpc.common.errors.SchedulerError`; a part that cannot be asked (no accounting
database, no srun here) becomes a note, not a problem.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aimass_hpc.common.errors import AimassError, SchedulerError
from aimass_hpc.common.names import key_path
from aimass_hpc.common.slurm_cli import Runner, error_line, run_command, submission_env
from aimass_hpc.common.timelimit import UNLIMITED_WORDS, TimeLimitError, format_time, parse_time
from aimass_hpc.config.site import Partition, Problem, Site, load_site
from aimass_hpc.launch.reservations import parse_reservations

# Seconds each command may take: a plain `site check` only looks when the scheduler answers
# quickly; `--live` waits as long as any other aimass command would for a busy controller.
QUICK_TIMEOUT = 5.0
LIVE_TIMEOUT = 30.0

# sinfo, one line per (node, partition): name|partition|CPUs|memory MB|gres|features.
NODE_FORMAT = "%N|%R|%c|%m|%G|%f"

_NO_VALUE = frozenset({"", "(NULL)", "N/A", "NONE"})

# ------------------------------------------------------------------------------ parsed facts


@dataclass(frozen=True)
class GresItem:
    """One generic resource of a node: ``gpu:h100:4`` -> ("gpu", "h100", 4)."""

    name: str
    type: str | None
    count: int


@dataclass(frozen=True)
class PartitionInfo:
    """What ``scontrol show partition -o`` says about one partition (None = ALL)."""

    name: str
    default: bool
    max_time: str
    default_time: str
    allow_accounts: frozenset[str] | None
    deny_accounts: frozenset[str]
    allow_qos: frozenset[str] | None


@dataclass(frozen=True)
class NodeInfo:
    """One node of one partition, as ``sinfo -N -o NODE_FORMAT`` prints it."""

    name: str
    partition: str
    cpus: int | None
    mem_mb: int | None
    gres_text: str
    gres: tuple[GresItem, ...]
    features: frozenset[str]


@dataclass(frozen=True)
class Association:
    """One row of ``sacctmgr show assoc``: an account, on one partition ("" = any), its QOS."""

    account: str
    partition: str
    qos: frozenset[str]


@dataclass
class ClusterFacts:
    """Everything asked of the cluster; a ``None`` part was not asked or could not be."""

    user: str
    partitions: dict[str, PartitionInfo]
    nodes: list[NodeInfo]
    associations: list[Association] | None = None
    reservations: list[str] | None = None
    mpi_types: frozenset[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LiveCheck:
    """The outcome of a live check: mismatches, and one-line notes on what was not checked."""

    problems: list[Problem]
    notes: list[str]
    ran: bool


# ---------------------------------------------------------------------------------- parsers

_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_:/.]*=")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line -> its ``Key=Value`` fields.

    A word without ``Key=`` continues the previous value (``OS=Linux 6.1.0 #1 SMP``).
    """
    fields: dict[str, str] = {}
    last: str | None = None
    for word in line.split():
        match = _KEY_RE.match(word)
        if match:
            last = match.group(0)[:-1]
            fields[last] = word[match.end() :]
        elif last is not None:
            fields[last] += " " + word
    return fields


def _name_set(value: str | None) -> frozenset[str] | None:
    """``ALL`` (or unset) -> None; ``a,b`` -> {a, b}."""
    if value is None or value.upper() in {"ALL", ""}:
        return None
    return frozenset(v for v in value.split(",") if v)


def parse_partitions(text: str) -> dict[str, PartitionInfo]:
    """``scontrol show partition -o`` -> partitions by name."""
    out: dict[str, PartitionInfo] = {}
    for line in text.splitlines():
        fields = parse_scontrol_line(line)
        name = fields.get("PartitionName")
        if not name:
            continue
        out[name] = PartitionInfo(
            name=name,
            default=fields.get("Default", "NO").upper() == "YES",
            max_time=fields.get("MaxTime", "UNLIMITED"),
            default_time=fields.get("DefaultTime", "NONE"),
            allow_accounts=_name_set(fields.get("AllowAccounts")),
            deny_accounts=_name_set(fields.get("DenyAccounts")) or frozenset(),
            allow_qos=_name_set(fields.get("AllowQos")),
        )
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``gpu:a:2(S:0,1),nvme:1``)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_gres(text: str) -> tuple[GresItem, ...]:
    """A node's Gres (``gpu:h100:4(S:0-1),nvme:1``) -> its items; ``(null)`` -> none.

    An item without a count is one; a count with a suffix (``1K``) is not a GPU count and is
    left out.
    """
    if text.strip().upper() in _NO_VALUE:
        return ()
    items = []
    for item in _split_top(text):
        parts = item.split("(", 1)[0].split(":")
        count = 1
        if len(parts) > 1 and parts[-1].isascii() and parts[-1].isdigit():
            count = int(parts.pop())
        elif len(parts) > 1 and parts[-1][:1].isdigit():
            continue
        name, gtype = parts[0], (parts[1] if len(parts) > 1 else None)
        items.append(GresItem(name, gtype, count))
    return tuple(items)


def _int_or_none(text: str) -> int | None:
    text = text.strip().rstrip("+")  # sinfo writes "8+" for a group of unequal nodes
    return int(text) if text.isascii() and text.isdigit() else None


def parse_nodes(text: str) -> list[NodeInfo]:
    """``sinfo -h -a -N -o NODE_FORMAT`` -> one :class:`NodeInfo` per (node, partition)."""
    nodes = []
    for line in text.splitlines():
        cols = line.strip().split("|")
        if len(cols) != 6:
            continue
        name, part, cpus, mem, gres, features = cols
        feats = frozenset(f for f in features.split(",") if f and f.upper() not in _NO_VALUE)
        nodes.append(
            NodeInfo(
                name=name,
                partition=part,
                cpus=_int_or_none(cpus),
                mem_mb=_int_or_none(mem),
                gres_text=gres,
                gres=parse_gres(gres),
                features=feats,
            )
        )
    return nodes


def parse_associations(text: str) -> list[Association]:
    """``sacctmgr -nP show assoc user=U format=account,partition,qos`` -> rows."""
    rows = []
    for line in text.splitlines():
        cols = line.strip().split("|")
        if len(cols) != 3 or not cols[0]:
            continue
        account, partition, qos = cols
        rows.append(Association(account, partition, frozenset(q for q in qos.split(",") if q)))
    return rows


def parse_reservation_names(text: str) -> list[str]:
    """``scontrol show reservation -o`` -> reservation names ("No reservations..." -> [])."""
    return [r["ReservationName"] for r in parse_reservations(text) if r.get("ReservationName")]


def parse_mpi_list(text: str) -> frozenset[str]:
    """``srun --mpi=list`` -> the plugin types (and versioned names such as ``pmix_v4``).

    Slurm 22.05 prints a header, one tab-indented type per line, then
    ``specific pmix plugin versions available: pmix_v4``; newer ones ``srun: MPI types are...``
    with ``srun: none`` lines, or the types on one line after a colon.
    """
    types: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip().removeprefix("srun:").strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        if "available" in head or "types are" in head.lower():
            types.update(w for w in re.split(r"[\s,]+", rest) if w)
            continue
        if "types are" in line.lower() or " " in line:
            continue
        types.add(line)
    return frozenset(types)


# --------------------------------------------------------------------------- asking Slurm


def _ask(argv: Sequence[str], *, run: Runner, timeout: float, env: Mapping[str, str]) -> str:
    """stdout of ``argv``; SchedulerError (one line) when it fails or does not answer."""
    proc = run(list(argv), env=env, timeout=timeout)
    if proc.returncode != 0:
        raise SchedulerError(f"{' '.join(argv[:3])}: {error_line(proc.stderr, proc.stdout)}")
    return proc.stdout or ""


def _uses_accounts(site: Site) -> bool:
    return bool(
        site.account or site.qos or any(p.account or p.qos for p in site.partitions.values())
    )


def gather(
    site: Site,
    *,
    run: Runner = run_command,
    timeout: float = LIVE_TIMEOUT,
    user: str | None = None,
) -> ClusterFacts:
    """Ask the cluster what ``site`` needs compared. SchedulerError when the controller does
    not answer (scontrol/sinfo); parts that cannot be asked become notes."""
    env = submission_env()
    user = user or os.environ.get("USER") or getpass.getuser()
    parts = parse_partitions(
        _ask(["scontrol", "show", "partition", "-o"], run=run, timeout=timeout, env=env)
    )
    nodes = parse_nodes(
        _ask(["sinfo", "-h", "-a", "-N", "-o", NODE_FORMAT], run=run, timeout=timeout, env=env)
    )
    facts = ClusterFacts(user=user, partitions=parts, nodes=nodes)
    if _uses_accounts(site):
        argv = ["sacctmgr", "-nP", "show", "assoc", f"user={user}",
                "format=account,partition,qos"]  # fmt: skip
        try:
            facts.associations = parse_associations(_ask(argv, run=run, timeout=timeout, env=env))
        except SchedulerError as exc:
            facts.notes.append(f"accounts and QOS not checked: {exc}")
    if site.serving.default_reservation:
        argv = ["scontrol", "show", "reservation", "-o"]
        try:
            facts.reservations = parse_reservation_names(
                _ask(argv, run=run, timeout=timeout, env=env)
            )
        except SchedulerError as exc:
            facts.notes.append(f"serving.default_reservation not checked: {exc}")
    if site.mpi.launcher == "srun":
        try:
            proc = run(["srun", "--mpi=list"], env=env, timeout=timeout)
            # Some versions print the list on stderr.
            facts.mpi_types = parse_mpi_list(f"{proc.stdout or ''}\n{proc.stderr or ''}")
        except SchedulerError as exc:
            facts.notes.append(f"mpi.srun_mpi not checked: {exc}")
    return facts


# ------------------------------------------------------------------------------- comparing


def _cluster_seconds(text: str) -> tuple[bool, int | None]:
    """A Slurm MaxTime/DefaultTime -> (known, seconds); seconds None = unlimited."""
    value = text.strip()
    if value.upper() in UNLIMITED_WORDS:
        return True, None
    if value.upper() in _NO_VALUE:
        return False, None
    try:
        return True, parse_time(value)
    except TimeLimitError:
        return False, None


def _gpu_count(node: NodeInfo, part: Partition) -> int:
    return sum(
        g.count
        for g in node.gres
        if g.name == part.gres_name and (part.gpu_type is None or g.type == part.gpu_type)
    )


def _counts(values: list[int]) -> str:
    """``4`` for equal nodes, ``2 to 4`` for unequal ones."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low} to {high}"


def _gres_shown(nodes: list[NodeInfo]) -> str:
    return ", ".join(sorted({n.gres_text for n in nodes}))


def _gpu_problems(where: str, part: Partition, nodes: list[NodeInfo]) -> list[Problem]:
    want = part.gpus_per_node
    if not want:
        return []  # CPU work on a GPU partition is allowed
    names = {g.name for n in nodes for g in n.gres}
    gres = _gres_shown(nodes)
    if not names:
        return [
            Problem(
                f"{where}.gpus_per_node",
                f"config says {want}, cluster nodes of partition {part.name} have no gres",
                "set gpus_per_node = 0 or use a GPU partition",
            )
        ]
    if part.gres_name not in names:
        return [
            Problem(
                f"{where}.gres_name",
                f"config says {part.gres_name!r}, cluster nodes of partition {part.name} have "
                f"gres {gres}",
                f"use one of: {', '.join(sorted(names))}",
            )
        ]
    if part.gpu_type is not None:
        types = {g.type for n in nodes for g in n.gres if g.name == part.gres_name}
        if part.gpu_type not in types:
            known = ", ".join(sorted(t for t in types if t)) or "none (untyped)"
            return [
                Problem(
                    f"{where}.gpu_type",
                    f"config says {part.gpu_type!r}, cluster nodes of partition {part.name} "
                    f"have gres {gres}",
                    f"types there: {known}",
                )
            ]
    counts = [_gpu_count(n, part) for n in nodes]
    # Equal nodes must match exactly; on unequal ones the config may not ask above the least.
    if (min(counts) == max(counts) and want != counts[0]) or want > min(counts):
        return [
            Problem(
                f"{where}.gpus_per_node",
                f"config says {want}, cluster nodes of partition {part.name} have "
                f"{_counts(counts)} (gres {gres})",
                f"set gpus_per_node = {min(counts)}",
            )
        ]
    return []


def _node_problems(where: str, part: Partition, nodes: list[NodeInfo]) -> list[Problem]:
    problems = _gpu_problems(where, part, nodes)
    cpus = [n.cpus for n in nodes if n.cpus is not None]
    if cpus and part.cpus_per_node > min(cpus):
        problems.append(
            Problem(
                f"{where}.cpus_per_node",
                f"config says {part.cpus_per_node}, cluster nodes of partition {part.name} have "
                f"{_counts(cpus)} CPUs",
                f"set cpus_per_node = {min(cpus)}",
            )
        )
    mems = [n.mem_mb for n in nodes if n.mem_mb is not None]
    if mems and part.mem_mb is not None and part.mem_mb > min(mems):
        problems.append(
            Problem(
                f"{where}.mem_per_node",
                f"config says {part.mem_per_node} ({part.mem_mb} MiB), cluster nodes of "
                f"partition {part.name} have {_counts(mems)} MiB (RealMemory)",
                f"set mem_per_node = {min(mems)} or less",
            )
        )
    offered = frozenset().union(*(n.features for n in nodes)) if nodes else frozenset()
    for i, feature in enumerate(part.constraints):
        if feature not in offered:
            problems.append(
                Problem(
                    f"{where}.constraints[{i}]",
                    f"no node of partition {part.name} offers feature {feature!r}",
                    f"features there: {', '.join(sorted(offered)) or 'none'}",
                )
            )
    return problems


def _time_problems(where: str, part: Partition, info: PartitionInfo) -> list[Problem]:
    known, limit = _cluster_seconds(info.max_time)
    if not known or limit is None:
        return []
    problems = []
    if part.max_seconds is None or part.max_seconds > limit:
        problems.append(
            Problem(
                f"{where}.max_time",
                f"config says {part.max_time}, partition {part.name}'s MaxTime is {info.max_time}",
                f"set max_time = {format_time(limit)!r} or less",
            )
        )
    if part.default_time is not None:
        wanted = parse_time(part.default_time)
        if wanted is None or wanted > limit:
            problems.append(
                Problem(
                    f"{where}.default_time",
                    f"config says {part.default_time}, above partition {part.name}'s MaxTime "
                    f"{info.max_time}",
                    "lower it",
                )
            )
    return problems


def _account_problems(site: Site, facts: ClusterFacts) -> list[Problem]:
    """Accounts and QOS against the user's associations and the partitions' Allow lists."""
    problems: list[Problem] = []
    rows = facts.associations
    reported: set[str] = set()

    def add(path: str, message: str, hint: str) -> None:
        if path not in reported:  # the site account is used by every partition: say it once
            reported.add(path)
            problems.append(Problem(path, message, hint))

    for name, part in site.partitions.items():
        where = key_path("partitions", name)
        info = facts.partitions.get(name)
        account, acct_at = (
            (part.account, f"{where}.account") if part.account else (site.account, "account")
        )
        qos, qos_at = (part.qos, f"{where}.qos") if part.qos else (site.qos, "qos")
        if (
            info is not None
            and account
            and (
                account in info.deny_accounts
                or (info.allow_accounts is not None and account not in info.allow_accounts)
            )
        ):
            allow_list = ",".join(sorted(info.allow_accounts or ())) or "ALL"
            add(acct_at, f"partition {name} does not allow account {account!r}",
                f"AllowAccounts={allow_list}")  # fmt: skip
        if info is not None and qos and info.allow_qos is not None and qos not in info.allow_qos:
            add(qos_at, f"partition {name} does not allow QOS {qos!r}",
                f"AllowQos={','.join(sorted(info.allow_qos))}")  # fmt: skip
        if rows is None:
            continue
        here = [r for r in rows if r.partition in ("", name)]
        if account:
            mine = [r for r in here if r.account == account]
            if not mine:
                has = sorted({r.account for r in here})
                add(acct_at,
                    f"user {facts.user} has no association with account {account!r}"
                    + (f" on partition {name}" if any(r.account == account for r in rows)
                       else ""),
                    f"accounts there: {', '.join(has) or 'none'}; "
                    f"see sacctmgr show assoc user={facts.user}")  # fmt: skip
                continue
            here = mine
        if qos and here:
            allowed = frozenset().union(*(r.qos for r in here))
            if qos not in allowed:
                add(qos_at,
                    f"user {facts.user} may not use QOS {qos!r}"
                    + (f" with account {account!r}" if account else ""),
                    f"QOS allowed: {', '.join(sorted(allowed)) or 'none'}")  # fmt: skip
    return problems


def compare(site: Site, facts: ClusterFacts) -> list[Problem]:
    """Every difference between ``site`` and ``facts``, each named by its key path."""
    problems: list[Problem] = []
    default = next((n for n, p in site.partitions.items() if p is site.default_partition), "")
    for name, part in site.partitions.items():
        where = key_path("partitions", name)
        info = facts.partitions.get(name)
        if part.name != name:  # a Site built without load_site leaves the name unfilled
            part = part.model_copy(update={"name": name})
        if info is None:
            problems.append(
                Problem(
                    where,
                    f"no partition {name!r} on the cluster"
                    + (" (the site's default partition)" if name == default else ""),
                    f"partitions there: {', '.join(sorted(facts.partitions)) or 'none'}",
                )
            )
            continue
        problems += _time_problems(where, part, info)
        nodes = [n for n in facts.nodes if n.partition == name]
        if nodes:
            problems += _node_problems(where, part, nodes)
        elif part.gpus_per_node or part.constraints:
            problems.append(Problem(where, f"partition {name} has no nodes to compare with", ""))
    for i, feature in enumerate(site.constraints):
        for name in site.partitions:
            nodes = [n for n in facts.nodes if n.partition == name]
            if name in facts.partitions and not any(feature in n.features for n in nodes):
                problems.append(
                    Problem(
                        f"constraints[{i}]",
                        f"no node of partition {name} offers feature {feature!r}",
                        "every job asks for it (--constraint)",
                    )
                )
                break
    problems += _account_problems(site, facts)
    wanted = site.serving.default_reservation
    if wanted and facts.reservations is not None and wanted not in facts.reservations:
        problems.append(
            Problem(
                "serving.default_reservation",
                f"no reservation {wanted!r} on the cluster",
                f"reservations there: {', '.join(facts.reservations) or 'none'}; "
                "aimass reserve create makes one, with admin rights",
            )
        )
    mpi = site.mpi
    offered = facts.mpi_types
    if mpi.launcher == "srun" and offered is not None and mpi.srun_mpi not in offered:
        problems.append(
            Problem(
                "mpi.srun_mpi",
                f"config says {mpi.srun_mpi!r}, srun --mpi=list offers "
                f"{', '.join(sorted(offered)) or 'nothing'}",
                "pick one srun offers",
            )
        )
    return problems


# ------------------------------------------------------------------------------ entry points


def live_problems(
    site: Site,
    *,
    run: Runner = run_command,
    timeout: float = LIVE_TIMEOUT,
    user: str | None = None,
) -> list[Problem]:
    """Every mismatch between ``site`` and the cluster that answers here.

    SchedulerError when the controller does not answer within ``timeout`` seconds a command.
    """
    return compare(site, gather(site, run=run, timeout=timeout, user=user))


def live_check(path: Path | str, *, required: bool, run: Runner = run_command) -> LiveCheck:
    """The live part of ``aimass site check``, for the site file ``path``.

    ``required`` (``--live``): the scheduler must answer (SchedulerError otherwise) and gets
    :data:`LIVE_TIMEOUT` per command. Otherwise (the default) the cluster gets
    :data:`QUICK_TIMEOUT`, and a silence, or a cluster that has none of the site's partitions
    (a config written for another cluster), is a note instead of a comparison. A file that does
    not load is left alone: its own problems are already reported.
    """
    try:
        site = load_site(str(path))
    except AimassError:
        return LiveCheck([], [], ran=False)
    if site.scheduler != "slurm":
        note = f"live checks skipped: site {site.name} uses the {site.scheduler} scheduler"
        return LiveCheck([], [note] if required else [], ran=False)
    timeout = LIVE_TIMEOUT if required else QUICK_TIMEOUT
    try:
        facts = gather(site, run=run, timeout=timeout)
    except SchedulerError as exc:
        if required:
            raise SchedulerError(f"live checks failed: {exc}") from None
        return LiveCheck(
            [], [f"live checks skipped: {exc} (--live to insist, --no-live to skip)"], ran=False
        )
    if not required and not set(site.partitions) & set(facts.partitions):
        # The scheduler here is another cluster's (a config written for elsewhere): comparing
        # would only list every partition as missing.
        note = (
            f"live checks skipped: the cluster here has none of the site's partitions "
            f"({', '.join(site.partitions)}; it has {', '.join(facts.partitions) or 'none'}); "
            "--live compares anyway"
        )
        return LiveCheck([], [note], ran=False)
    return LiveCheck(compare(site, facts), facts.notes, ran=True)
