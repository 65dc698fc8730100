"""Where things live in a repository directory, and the lock-free protocols on top of it.

::

    <root>/aimass-repo.json                 marker: this directory is a repository
    <root>/models/<name>/versions/
        00000007.claim                      O_EXCL-created: version number 7 is taken (forever)
        00000007.json                       metadata sidecar, written before the commit
        00000007.h5                         the version; its rename into place IS the commit
        .00000008.h5.tmp-<pid>-<hex>        a save in progress (or a crashed one, for gc)
    <root>/models/<name>/aliases/<alias>.json   {"version": 7, "stack": [...], "log": [...]}
    <root>/models/<name>/shards/<key>/rank-00000-of-00004.h5   one file per rank

Why:
- Numbers are allocated by creating ``N.claim`` with ``O_CREAT|O_EXCL``, which is atomic on
  local filesystems, NFSv3+, Lustre and GPFS, unlike fcntl/flock which such mounts often
  lack. Claims are never removed, so a number is never reused, even after a delete.
- A version is listed iff ``N.h5`` exists. It appears by ``rename`` only after its bytes and
  its sidecar are fsynced, then the directory is fsynced: a crash leaves the old state or the
  complete new version. Committed files are never modified (HDF5 has no journal).
- An alias is one small JSON file replaced by one rename (``fsutil.atomic_write_json``);
  concurrent promotes of the same alias are last-writer-wins. Readers never see a partial
  alias file, so one that does not parse is damaged: an IntegrityError naming the file, and
  a repair keeps its bytes (``aliases/.<alias>.json.corrupt-<time>``).
- Nothing under ``models/`` may lead out of the repository: a model directory (or its
  ``versions``/``aliases``/``shards``) that is a symbolic link to elsewhere is refused for
  reading and writing, so a save never writes and a load never reads outside the root.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import InputError, IntegrityError, NotFoundError
from aimass_hpc.common.fsutil import atomic_write_json, fsync_dir, read_json
from aimass_hpc.repo.refs import check_name

MARKER = "aimass-repo.json"
_COMMITTED = re.compile(r"([0-9]{8,})\.h5")
_CLAIM = re.compile(r"([0-9]{8,})\.claim")
_SIDECAR = re.compile(r"([0-9]{8,})\.json")
_HIDDEN = re.compile(r"\.([0-9]{8,})\.")


def vname(number: int) -> str:
    return f"{number:08d}"


def hidden_version(filename: str) -> int | None:
    """The version number of a hidden temp/tombstone file like ``.00000007.h5.tmp-...``."""
    m = _HIDDEN.match(filename)
    return int(m.group(1)) if m else None


class ModelDir:
    """The directory of one model name."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = check_name(name)
        self.root = root
        self.dir = root / "models" / name
        self.versions = self.dir / "versions"
        self.aliases = self.dir / "aliases"
        self.shards = self.dir / "shards"

    def h5(self, n: int) -> Path:
        return self.versions / f"{vname(n)}.h5"

    def sidecar(self, n: int) -> Path:
        return self.versions / f"{vname(n)}.json"

    def claim(self, n: int) -> Path:
        return self.versions / f"{vname(n)}.claim"

    def temp(self, n: int, what: str = "tmp") -> Path:
        return self.versions / f".{vname(n)}.h5.{what}-{os.getpid()}-{secrets.token_hex(4)}"

    def alias_file(self, alias: str) -> Path:
        return self.aliases / f"{alias}.json"

    def shard_dir(self, key: str) -> Path:
        return self.shards / check_name(key, "shard key")

    def check_confined(self) -> None:
        """Raise IntegrityError if this model's directories lead out of the repository.

        Checked before every read and write: a symbolic link ``models/<name>`` (or its
        ``versions``, ``aliases``, ``shards``) to another place is not followed, so saves
        cannot write and loads cannot read outside the root. Links that stay inside are fine.
        """
        inside = os.path.realpath(self.root / "models")
        for path in (self.dir, self.versions, self.aliases, self.shards):
            real = os.path.realpath(path)
            if real != inside and not real.startswith(inside + os.sep):
                raise IntegrityError(
                    f"model {self.name}: {path} leads out of the repository (to {real}); "
                    "refusing to follow it: move the model into the repository or remove "
                    "the link"
                )

    # -- listing ----------------------------------------------------------------------------

    def _scan(self, pattern: re.Pattern[str]) -> list[int]:
        try:
            with os.scandir(self.versions) as it:
                return sorted(int(m.group(1)) for e in it if (m := pattern.fullmatch(e.name)))
        except FileNotFoundError:
            return []

    def committed(self) -> list[int]:
        """Numbers of committed versions, ascending."""
        return self._scan(_COMMITTED)

    def claimed(self) -> list[int]:
        return self._scan(_CLAIM)

    def exists(self) -> bool:
        return self.versions.is_dir()

    # -- allocation -------------------------------------------------------------------------

    def allocate(self) -> int:
        """Take the next free version number by O_EXCL-creating its claim file."""
        self.versions.mkdir(parents=True, exist_ok=True)
        n = max([0, *self.claimed(), *self.committed()]) + 1
        info = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "created_ts": time.time()}
        ).encode()
        while True:
            try:
                fd = os.open(self.claim(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                n += 1  # another writer got there first (possibly on another node)
                continue
            try:
                os.write(fd, info)
            finally:
                os.close(fd)
            return n

    def claim_info(self, n: int) -> dict[str, Any]:
        """Who took number ``n`` (host, pid, created_ts); empty if unknown."""
        try:
            info = read_json(self.claim(n))
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    # -- aliases ----------------------------------------------------------------------------

    def read_alias(self, alias: str) -> dict[str, Any] | None:
        """The alias document, None if there is no such alias; IntegrityError if damaged."""
        doc, problem = self.read_alias_raw(alias)
        if problem is not None:
            raise IntegrityError(
                f"alias file {self.alias_file(alias)} is corrupt: {problem} "
                f"(to start it anew, keeping a copy: aimass models promote --repair "
                f"{self.name}:VERSION {alias})"
            )
        return doc

    def read_alias_raw(self, alias: str) -> tuple[dict[str, Any] | None, str | None]:
        """(document, None), (None, None) if absent, or (None, what is wrong with it)."""
        path = self.alias_file(alias)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            return None, "it is a directory, not a file"
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return None, "not UTF-8 text"
        except RecursionError:
            return None, "not valid JSON (nested too deeply)"
        except ValueError as exc:
            return None, "empty file" if not raw.strip() else f"not valid JSON ({exc})"
        problem = alias_problem(doc)
        return (None, problem) if problem else (doc, None)

    def set_aside_alias(self, alias: str) -> Path:
        """Rename a damaged alias file out of the way (hidden, so never listed); its path."""
        kept = self.aliases / f".{alias}.json.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        kept = kept.with_name(f"{kept.name}-{secrets.token_hex(2)}")
        os.rename(self.alias_file(alias), kept)
        fsync_dir(self.aliases)
        return kept

    def write_alias(self, alias: str, doc: dict[str, Any]) -> None:
        self.aliases.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.alias_file(alias), doc)

    def alias_names(self) -> list[str]:
        try:
            with os.scandir(self.aliases) as it:
                names = [e.name for e in it if not e.name.startswith(".")]
            return sorted(n[:-5] for n in names if n.endswith(".json"))
        except FileNotFoundError:
            return []


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def alias_problem(doc: Any) -> str | None:
    """What is wrong with an alias document, or None: ``version`` a positive int, ``stack``
    a list of them, ``log`` a list of objects (both optional)."""
    if not isinstance(doc, dict):
        kind = "null" if doc is None else type(doc).__name__
        return f"it holds {kind}, not an object"
    if not _positive_int(doc.get("version")):
        shown = repr(doc.get("version"))[:40]
        return f'"version" is {shown}, not a positive integer'
    stack = doc.get("stack", [])
    if not isinstance(stack, list) or not all(_positive_int(n) for n in stack):
        return '"stack" is not a list of positive integers'
    log = doc.get("log", [])
    if not isinstance(log, list) or not all(isinstance(e, dict) for e in log):
        return '"log" is not a list of objects'
    return None


def writer_alive(info: dict[str, Any], mtime: float, grace_seconds: float) -> bool:
    """Could the writer of a claim (``info``: host, pid) still be working on it?

    On the same host the kernel knows (a live pid is trusted for a day, against pid reuse);
    for writers on other nodes only the age of their files (``mtime``) against the grace.
    """
    age = time.time() - mtime
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return age < max(grace_seconds, 86400.0)
    return age < grace_seconds


def _repo_creation_entry(name: str) -> bool:
    return name in ("models", MARKER) or name.startswith(f".{MARKER}.")


def ensure_repo(root: Path, create: bool) -> None:
    """Check that ``root`` is a repository, creating it if asked."""
    marker = root / MARKER
    if marker.is_file():
        return
    if not create:
        if not root.exists():
            raise NotFoundError(f"no model repository at {root}")
        raise NotFoundError(f"{root} is not a model repository (no {MARKER})")
    # Another process may be creating the same repository right now (all ranks of a job):
    # its "models" dir and the marker's temp file are not foreign content.
    if root.exists() and any(not _repo_creation_entry(p.name) for p in root.iterdir()):
        raise InputError(
            f"refusing to create a model repository in non-empty directory {root}: "
            "use an empty or new directory"
        )
    (root / "models").mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"format": 1, "created_ts": time.time()})
    fsync_dir(root)
