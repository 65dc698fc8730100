"""No traceback ever reaches a user: a mutation test over specs, site configs and CLI arguments.

The valid example specs (``examples/**/*.toml``) and bundled site configs (``site_configs/``)
are mutated systematically -- each key dropped, renamed, set to a value of the wrong type (list,
table, int, float, bool, empty string, huge int, negative, hostile strings with a newline, a NUL
or ``$(x)``), an unknown key added to each table, the text truncated, non-UTF-8 bytes put in --
and fed to the CLI in-process (``aimass_hpc.cli.main``) with ``--dry-run``. CLI arguments are
mutated too (unknown options, bad job ids, bad numbers, huge strings), and the journal of a
search is corrupted the ways a crash or a careless edit corrupts it.

For every case: the exit code is one of the documented ones (0, 2, 3, 4, 5, 6), nothing on
stderr looks like a traceback, stderr is at most a few lines, and a bad-input exit (2) names
the mutated key (at least its leaf) -- or, for text that is not TOML at all, the file.

Commands that talk to the scheduler of the dev site run under the ``cluster`` fixture (marked
``cluster``); everything else needs no cluster (dry runs, the ``local`` site). ``AIMASS_DEBUG``
is set, so an OSError that a module let through shows as the traceback it is, not as the CLI's
last-resort one-liner.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import dumps_toml

from aimass_hpc.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SITE_CONFIGS = ROOT / "site_configs"

OK_EXITS = {0, 2, 3, 4, 5, 6}
MAX_STDERR_LINES = 4

# Wrong values, by name. TOML cannot hold None; a NUL is written as the escape \u0000.
WRONG: dict[str, Any] = {
    "list": [1, "a"],
    "table": {"k": 1},
    "int": 7,
    "float": 2.5,
    "bool": True,
    "empty": "",
    "huge": 2**63 - 1,
    "negative": -1,
    "newline": "a\nb",
    "nul": "a\x00b",
    "subst": "$(x)`x`",
    "long": "x" * 5000,
}
_ROTATION = [n for n in WRONG if n not in ("list", "table")]


# ---------------------------------------------------------------------------------------------
# Running the CLI in-process


@dataclass
class Outcome:
    """What one CLI call did."""

    argv: list[str]
    code: int
    out: str
    err: str

    def describe(self) -> str:
        argv = [a if len(a) < 80 else a[:40] + f"...({len(a)} chars)" for a in self.argv]
        err = re.sub(r"(.)\1{80,}", lambda m: f"{m.group(1) * 8}<...{len(m.group(0))}>", self.err)
        return f"argv={argv}\nexit={self.code}\nstderr:\n{err[-3000:]}"


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Outcome:
    """``aimass ARGV`` in this process; an exception escaping ``main`` is a traceback."""
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # what the user would see as a traceback
        import traceback

        captured = capsys.readouterr()
        tb = "".join(traceback.format_exception(exc))
        return Outcome(argv, 1, captured.out, captured.err + "Traceback (escaped main):\n" + tb)
    else:
        code = 0
    captured = capsys.readouterr()
    return Outcome(argv, code, captured.out, captured.err)


def check_outcome(result: Outcome, names: tuple[str, ...] = (), *, also_stdout: bool = False):
    """The assertions every case makes (see the module docstring)."""
    assert "Traceback" not in result.err, result.describe()
    assert result.code in OK_EXITS, result.describe()
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) <= MAX_STDERR_LINES, result.describe()
    if result.code == 2 and names:
        text = result.err + (result.out if also_stdout else "")
        assert any(n in text for n in names if n), (
            f"exit 2 without naming any of {names}\n" + result.describe()
        )


# ---------------------------------------------------------------------------------------------
# Mutations of TOML documents


@dataclass(frozen=True)
class Mutation:
    """One mutated document: its text and the names an exit-2 message must mention."""

    id: str
    data: bytes
    names: tuple[str, ...]


def _paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in doc.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _tables(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from _tables(value, (*prefix, key))


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc))


def _parent(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _wrong_values(value: Any, index: int) -> list[str]:
    """Names of the wrong values tried for a key holding ``value`` (a rotating sample)."""
    names = ["table" if isinstance(value, list) else "list"]
    if isinstance(value, str):
        names += ["int", "long", "nul"]  # strings are often paths: too long, or a NUL in them
    elif isinstance(value, bool | int | float | dict):
        names.append("empty")
    # two more from the rotation, so that every value meets every kind of key somewhere
    names += [_ROTATION[(2 * index + k) % len(_ROTATION)] for k in (0, 1)]
    return list(dict.fromkeys(names))


# Tables whose keys are the user's own names (a parameter, a partition, a variable): an error
# about one of their entries may name the entry's table rather than the key.
DATA_TABLES = frozenset({"when", "env", "args", "partitions", "space"})

# A mutation whose right answer names another key: (file, key path) -> acceptable names.
CONSEQUENCES: dict[tuple[str, str], tuple[str, ...]] = {
    # without the pythonpath, the task's module is not found: task.ref says so
    ("search-digits/train.toml", "pythonpath"): ("task.ref",),
    # 7 ranks do not divide the global batch: train.batch_size says so (and names the ranks)
    ("search-digits/train.toml", "job.tasks_per_node"): ("batch_size",),
}


def _names(path: tuple[str, ...]) -> tuple[str, ...]:
    """The names an exit-2 message about key ``path`` may use."""
    names = [".".join(path), path[-1]]
    if len(path) > 1 and path[-2] in DATA_TABLES:
        names.append(".".join(path[:-1]))
    if path[0] == "space" and len(path) > 2:
        # a bound of a parameter: the trial's training spec may be what refuses the value
        names += [f"space.{path[1]}", f".{path[1]}:"]
    return tuple(names)


def mutations(text: str, *, full: bool = True) -> Iterator[Mutation]:
    """Systematic mutations of the TOML document ``text``.

    ``full``: every key gets dropped, renamed and set to wrong values; otherwise (for big
    documents whose keys repeat) a smaller rotating sample of the same.
    """
    doc = tomllib.loads(text)
    for index, path in enumerate(_paths(doc)):
        dotted, leaf = ".".join(path), path[-1]
        names = _names(path)
        value = _parent(doc, path)[leaf]
        if not full and index % 3:
            kinds = ["drop"]
        else:
            kinds = ["drop", "rename", *(f"set-{n}" for n in _wrong_values(value, index))]
        for kind in kinds:
            mutated = _copy(doc)
            parent = _parent(mutated, path)
            if kind == "drop":
                del parent[leaf]
                these = names
            elif kind == "rename":
                parent[f"{leaf}_typo"] = parent.pop(leaf)
                these = (*names, f"{leaf}_typo")
            else:
                parent[leaf] = WRONG[kind.removeprefix("set-")]
                these = names
            yield Mutation(f"{dotted}:{kind}", dumps_toml(mutated).encode("utf-8"), these)
    for table in _tables(doc):
        mutated = _copy(doc)
        _parent(mutated, (*table, "x"))["bogus_key"] = 1
        where = ".".join((*table, "bogus_key"))
        yield Mutation(
            f"{where}:unknown",
            dumps_toml(mutated).encode("utf-8"),
            (where, "bogus_key", *(_names((*table, "bogus_key")) if table else ())),
        )
    raw = text.encode("utf-8")
    for fraction in (0.3, 0.5, 0.77):
        cut = raw[: int(len(raw) * fraction)]
        yield Mutation(f"truncated-{fraction}", cut, ())
    first_quote = raw.index(b'"')
    yield Mutation(
        "non-utf8-in-string", raw[: first_quote + 1] + b"\xff\xfe" + raw[first_quote + 1 :], ()
    )
    yield Mutation("non-utf8-first-byte", b"\xff" + raw, ())
    yield Mutation("nul-byte", raw.replace(b"\n", b"\n\x00", 1), ())
    yield Mutation("empty-file", b"", ())
    yield Mutation("not-toml", b"[[[ this is not toml\n", ())


def _file_names(path: Path) -> tuple[str, ...]:
    return (str(path), path.name)


def _names_for(mutation: Mutation, path: Path) -> tuple[str, ...]:
    """What an exit-2 message must name: the key, or the file when the text is not TOML."""
    try:
        tomllib.loads(mutation.data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return _file_names(path)
    return mutation.names


# ---------------------------------------------------------------------------------------------
# Fixtures: a private copy of the examples, a HOME of our own


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ (specs find their task modules and train specs next to them)."""
    base = tmp_path_factory.mktemp("no-traceback")
    shutil.copytree(EXAMPLES, base / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return base


@pytest.fixture(autouse=True)
def _private_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing a case does may land in the real ~ (the bundled sites put runs under ~)."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    # An OSError no module handled shows its traceback (the CLI's last resort would hide it).
    monkeypatch.setenv("AIMASS_DEBUG", "1")


# (example spec, command, site): what each spec is fed to.
SPEC_TARGETS = [
    ("hello/hello.toml", ["submit"], "dev"),
    ("digits/spec.toml", ["train"], "dev"),
    ("synthetic/spec.toml", ["train"], "dev"),
    ("search-digits/train.toml", ["train"], "dev"),
    ("search-digits/search.toml", ["search"], "dev"),
    ("search-quadratic/search.toml", ["search"], "dev"),
]


def _spec_cases() -> list[Any]:
    cases = []
    for rel, command, site in SPEC_TARGETS:
        text = (EXAMPLES / rel).read_text(encoding="utf-8")
        for mutation in mutations(text):
            cases.append(pytest.param(rel, command, site, mutation, id=f"{rel}:{mutation.id}"))
    return cases


@pytest.mark.parametrize(("rel", "command", "site", "mutation"), _spec_cases())
def test_mutated_spec_never_shows_a_traceback(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    rel: str,
    command: list[str],
    site: str,
    mutation: Mutation,
) -> None:
    original = workdir / "examples" / rel
    target = original.with_name(f"mutated-{original.name}")
    target.write_bytes(mutation.data)
    try:
        result = run_cli(capsys, [*command, str(target), "--site", site, "--dry-run"])
        key = mutation.id.rsplit(":", 1)[0]
        names = (*_names_for(mutation, target), *CONSEQUENCES.get((rel, key), ()))
        check_outcome(result, names)
        if command == ["submit"]:
            rendered = run_cli(capsys, ["render", str(target), "--site", site])
            check_outcome(rendered, _names_for(mutation, target))
    finally:
        target.unlink()


# A job spec every bundled site can run, to load mutated site configs through.
PROBE_SPEC = """\
[job]
name = "probe"
nodes = 1
ntasks_per_node = 1
time = "00:05:00"
command = ["bash", "-c", "echo $GREETING"]

[job.env]
GREETING = "hi"
"""


def _site_cases() -> list[Any]:
    cases = []
    for path in sorted(SITE_CONFIGS.glob("*.toml")):
        text = path.read_text(encoding="utf-8")
        for i, mutation in enumerate(mutations(text, full=path.stem != "example-hpc")):
            # `site check` renders every template through bash -n: slow when the config is
            # valid, so it sees a rotating third of the cases; the dry-run submit sees all.
            check = i % 3 == 0
            cases.append(pytest.param(path.name, mutation, check, id=f"{path.name}:{mutation.id}"))
    return cases


@pytest.mark.parametrize(("name", "mutation", "site_check"), _site_cases())
def test_mutated_site_config_never_shows_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    mutation: Mutation,
    site_check: bool,
) -> None:
    site = tmp_path / name
    site.write_bytes(mutation.data)
    spec = tmp_path / "probe.toml"
    spec.write_text(PROBE_SPEC, encoding="utf-8")
    names = _names_for(mutation, site)
    check_outcome(run_cli(capsys, ["submit", str(spec), "--site", str(site), "--dry-run"]), names)
    if site_check:
        result = run_cli(capsys, ["site", "check", str(site)])
        check_outcome(result, names, also_stdout=True)


# ---------------------------------------------------------------------------------------------
# Mutated CLI arguments

BAD_IDS = ["abc", "-1", "1;ls", "", "x" * 10000, "12345678901234567890", "1_x", "../../etc"]
BAD_NUMBERS = ["abc", "-1", "nan", "inf", "1e400", "", "0x10", "1" * 400]


def _argv_cases(site: str) -> list[list[str]]:
    cases: list[list[str]] = []
    for cmd in ("status", "wait", "logs", "cancel", "plot"):
        cases.append([cmd, "--bogus-option", "1", "--site", site])
        for bad in BAD_IDS:
            cases.append([cmd, bad, "--site", site])
    for bad in BAD_NUMBERS:
        cases.append(["wait", "1", "--timeout", bad, "--site", site])
        cases.append(["status", "--last", bad, "--site", site])
        cases.append(["logs", "1", "--restart", bad, "--site", site])
        cases.append(["logs", "1", "--task", bad, "--site", site])
    cases.append(["wait", "999999", "--timeout", "-1", "--site", site])
    return cases


def _local_site_file(base: Path) -> Path:
    """The bundled local site with its runs and models under ``base``."""
    data = tomllib.loads((SITE_CONFIGS / "local.toml").read_text(encoding="utf-8"))
    data["filesystems"].update(runs=str(base / "runs"), models=str(base / "models"))
    path = base / "local.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    return path


def _ids(cases: list[list[str]]) -> list[str]:
    return [" ".join(a if len(a) < 30 else f"<{len(a)} chars>" for a in c) for c in cases]


LOCAL_ARGV = _argv_cases("@local")


@pytest.mark.parametrize("argv", LOCAL_ARGV, ids=_ids(LOCAL_ARGV))
def test_bad_job_arguments_on_the_local_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    site = str(_local_site_file(tmp_path))
    argv = [site if a == "@local" else a for a in argv]
    check_outcome(run_cli(capsys, argv), ())


DEV_ARGV = _argv_cases("dev")


@pytest.mark.cluster
@pytest.mark.parametrize("argv", DEV_ARGV, ids=_ids(DEV_ARGV))
def test_bad_job_arguments_on_slurm(
    cluster: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    check_outcome(run_cli(capsys, argv), ())


BAD_MODEL_REFS = [
    "abc",
    "-1",
    "1;ls",
    "",
    "x" * 10000,
    "m@",
    "@best",
    "m:",
    "m:-1",
    "m:abc",
    "m:99999999999999999999999",
    "m@best@best",
    "../../etc/passwd",
    "m\nn",
]


@pytest.mark.parametrize("ref", BAD_MODEL_REFS, ids=_ids([[r] for r in BAD_MODEL_REFS]))
def test_bad_model_references(tmp_path: Path, capsys: pytest.CaptureFixture[str], ref: str) -> None:
    repo = str(tmp_path / "models")
    check_outcome(run_cli(capsys, ["models", "--repo", repo, "show", ref]), ())
    site = str(_local_site_file(tmp_path))
    check_outcome(
        run_cli(capsys, ["serve", "start", ref, "--site", site, "--repo", repo, "--dry-run"]), ()
    )


def _option_cases() -> list[list[str]]:
    hello = "@examples/hello/hello.toml"
    digits = "@examples/digits/spec.toml"
    quad = "@examples/search-quadratic/search.toml"
    cases = [
        ["submit", hello, "--site", "dev", "--dry-run", "--bogus"],
        ["submit", hello, "--site", "dev", "--dry-run", "--name", ""],
        ["submit", hello, "--site", "dev", "--dry-run", "--name", "a\nb"],
        ["submit", hello, "--site", "dev", "--dry-run", "--name", "x" * 10000],
        ["submit", hello, "--site", "dev", "--dry-run", "--sbatch-arg", "--wrap=$(x)"],
        ["submit", hello, "--site", "dev", "--dry-run", "--sbatch-arg", ""],
        ["submit", hello, "--site", "", "--dry-run"],
        ["submit", hello, "--site", "x" * 10000, "--dry-run"],
        ["submit", hello, "--site", "no-such-site", "--dry-run"],
        ["submit", "/no/such/spec.toml", "--site", "dev", "--dry-run"],
        ["submit", "/etc/passwd/x.toml", "--site", "dev", "--dry-run"],
        ["submit", "x" * 10000 + ".toml", "--site", "dev", "--dry-run"],
        ["submit", "/tmp", "--site", "dev", "--dry-run"],
        ["render", "/no/such/script.sh", "--site", "dev"],
        ["search", quad, "--site", "dev", "--dry-run", "--dir", "/etc/passwd/x"],
        ["search", quad, "--site", "dev", "--dry-run", "--dir", "x" * 10000],
        ["search", "/no/such/search.toml", "--site", "dev", "--dry-run"],
        ["search", "--bogus"],
        ["site", "check", ""],
        ["site", "check", "x" * 10000],
        ["site", "check", "/etc/passwd/x.toml"],
        ["site", "show", "/no/such/site.toml"],
    ]
    for option, values in (
        ("--nodes", ["0", "abc", "-1", "99999999999999999999999"]),
        ("--gpus-per-node", ["-1", "abc"]),
        ("--tasks-per-node", ["0"]),
        ("--time", ["", "abc", "99:99", "-1", "1-99", "x" * 10000]),
        ("--backend", ["mpi"]),
    ):
        for value in values:
            cases.append(["train", digits, "--site", "dev", "--dry-run", option, value])
    return cases


OPTION_CASES = _option_cases()


@pytest.mark.parametrize("argv", OPTION_CASES, ids=_ids(OPTION_CASES))
def test_bad_options_of_dry_runs(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    argv = [str(workdir / a[1:]) if a.startswith("@") else a for a in argv]
    check_outcome(run_cli(capsys, argv), ())


@pytest.mark.parametrize("value", ["１０", "٣:٠٠", "10\n", "10\n5", " 5:00 "])
def test_a_time_limit_is_ascii_slurm_syntax(
    workdir: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    spec = str(workdir / "examples" / "digits" / "spec.toml")
    result = run_cli(capsys, ["train", spec, "--site", "dev", "--dry-run", "--time", value])
    if value.strip().isascii() and "\n" not in value.strip():
        assert result.code == 0, result.describe()
    else:
        check_outcome(result, ("time",))
        assert result.code == 2, result.describe()


# ---------------------------------------------------------------------------------------------
# A runs root that cannot be written


def _broken_runs_roots(tmp_path: Path) -> dict[str, Path]:
    regular = tmp_path / "a-file"
    regular.write_text("not a directory\n")
    return {
        "under-a-regular-file": regular / "runs",
        "the-root-is-a-file": regular,
        "too-long-a-name": tmp_path / ("r" * 300),
    }


@pytest.mark.parametrize(
    "problem", ["under-a-regular-file", "the-root-is-a-file", "too-long-a-name"]
)
@pytest.mark.parametrize("command", ["submit", "train", "search"])
def test_a_runs_root_that_cannot_be_written_is_one_line(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str, command: str
) -> None:
    root = _broken_runs_roots(tmp_path)[problem]
    data = tomllib.loads((SITE_CONFIGS / "local.toml").read_text(encoding="utf-8"))
    data["filesystems"].update(runs=str(root), models=str(tmp_path / "models"))
    site = tmp_path / "site.toml"
    site.write_text(dumps_toml(data), encoding="utf-8")
    spec = {
        "submit": tmp_path / "probe.toml",
        "train": workdir / "examples" / "search-digits" / "train.toml",
        "search": workdir / "examples" / "search-quadratic" / "search.toml",
    }[command]
    if command == "submit":
        spec.write_text(PROBE_SPEC, encoding="utf-8")
    result = run_cli(capsys, [command, str(spec), "--site", str(site)])
    check_outcome(result, ())
    assert result.code in (2, 5), result.describe()
    assert str(root)[:60] in result.err or root.name[:60] in result.err, result.describe()
    assert len(result.err.strip().splitlines()) == 1, result.describe()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_dir() and p.name[:8].isdigit()]
    assert not leftovers, f"half-made run directories left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------
# A damaged search journal


def _search_dir(base: Path) -> Path:
    """A search directory as `aimass search` creates it (spec record, two trials)."""
    from aimass_hpc.config.search_spec import load_search_spec
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch import journal as J
    from aimass_hpc.launch.search_driver import create_search

    spec = load_search_spec(EXAMPLES / "search-quadratic" / "search.toml")
    site = load_site(str(_local_site_file(base)))
    sdir = create_search(spec, site, directory=base / "search")
    journal = sdir.journal()
    journal.append(J.TRIAL_PROPOSED, trial=0, params={"x": 1.0, "y": 2.0, "shape": "bowl"})
    journal.append(J.TRIAL_PROPOSED, trial=1, params={"x": 0.0, "y": 0.5, "shape": "ridge"})
    journal.append(J.TRIAL_FINISHED, trial=0, value=0.25, ended_at=1.0)
    journal.append(J.TRIAL_CANCELLED, trial=1, reason="by hand")
    best = {"trial": 0, "value": 0.25}
    journal.append(J.SEARCH_FINISHED, best=best, cancelled=True, counts={"finished": 1})
    return sdir.path


def _damage(path: Path, how: str) -> int | None:
    """Damage the journal at ``path``; returns the 1-based line an error must name (or None)."""
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "torn-last-line":
        path.write_bytes(b"".join(lines) + b'{"seq": 7, "type": "trial_fin')
        return None
    if how == "nul-tail":
        path.write_bytes(b"".join(lines) + b"\x00" * 64)
        return None
    if how == "array-line":
        lines.insert(2, b"[1, 2, 3]\n")
        path.write_bytes(b"".join(lines))
        return 3
    if how == "number-line":
        lines.insert(2, b"42\n")
        path.write_bytes(b"".join(lines))
        return 3
    if how in ("trial-is-a-list", "seq-is-a-string", "params-is-a-list", "type-is-a-number",
               "value-is-a-string", "spec-is-a-list"):  # fmt: skip
        number = {"spec-is-a-list": 1, "trial-is-a-list": 2, "params-is-a-list": 2,
                  "seq-is-a-string": 3, "type-is-a-number": 3,
                  "value-is-a-string": 4}[how]  # fmt: skip
        rec = json.loads(lines[number - 1])
        if how == "trial-is-a-list":
            rec["trial"] = [0]
        elif how == "seq-is-a-string":
            rec["seq"] = "two"
        elif how == "params-is-a-list":
            rec["params"] = [1, 2]
        elif how == "type-is-a-number":
            rec["type"] = 3
        elif how == "spec-is-a-list":
            rec["spec"] = ["x"]
        else:
            rec["type"], rec["value"] = "trial_finished", "0.5; rm -rf /"
        lines[number - 1] = (json.dumps(rec, sort_keys=True) + "\n").encode()
        path.write_bytes(b"".join(lines))
        return number
    if how == "non-utf8":
        lines[2] = lines[2][:10] + b"\xff\xfe" + lines[2][10:]
        path.write_bytes(b"".join(lines))
        return 3
    if how == "garbled-middle-line":
        lines[2] = lines[2][: len(lines[2]) // 2] + b"\n"
        path.write_bytes(b"".join(lines))
        return 3
    if how == "deleted-middle-line":
        del lines[2]
        path.write_bytes(b"".join(lines))
        return 3
    raise AssertionError(how)


JOURNAL_DAMAGE = [
    "torn-last-line",
    "nul-tail",
    "array-line",
    "number-line",
    "trial-is-a-list",
    "seq-is-a-string",
    "params-is-a-list",
    "type-is-a-number",
    "value-is-a-string",
    "spec-is-a-list",
    "non-utf8",
    "garbled-middle-line",
    "deleted-middle-line",
]


@pytest.mark.parametrize("how", JOURNAL_DAMAGE)
def test_a_damaged_journal_is_one_line_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    sdir = _search_dir(tmp_path)
    journal = sdir / "journal.jsonl"
    line = _damage(journal, how)
    for command in ("status", "resume"):
        result = run_cli(capsys, ["search", command, str(sdir)])
        check_outcome(result, ())
        if line is None:
            # A torn last line (a writer died mid-record) is tolerated, and said.
            if command == "status":
                assert result.code == 0, result.describe()
                assert "journal" in result.err and "last line" in result.err, result.describe()
            continue
        assert result.code == 6, result.describe()
        assert str(journal) in result.err and f"line {line}" in result.err, result.describe()
        assert len(result.err.strip().splitlines()) == 1, result.describe()


@pytest.mark.parametrize(
    "directory", ["", "x" * 10000, "/etc/passwd", "/etc/passwd/x", "/nonexistent", "-1"]
)
@pytest.mark.parametrize("command", ["status", "resume", "cancel", "plot"])
def test_bad_search_directories(
    capsys: pytest.CaptureFixture[str], command: str, directory: str
) -> None:
    check_outcome(run_cli(capsys, ["search", command, directory]), ())


def test_the_mutation_test_covers_what_it_says() -> None:
    """Guard against a generator bug silently shrinking the test."""
    assert len(_spec_cases()) > 700
    assert len(_site_cases()) > 500
