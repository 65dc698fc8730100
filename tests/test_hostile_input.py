"""Hostile input (issue 10): every field of every spec kind and every site key that reaches a
script either is refused at validation, with an ``InputError`` naming its key path, or renders
a script that ``bash -n`` accepts and that hands the value to the job byte for byte.

Without a cluster, "byte for byte" is checked by running the rendered script with bash on a
site whose launcher is ``none`` (the job command is a small ``sh -c`` that writes what it got
into files), or for values that only go on ``#SBATCH`` lines / into quoted words, by finding
them there exactly. One cluster test does the same through sbatch on the local Slurm cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import site_data, write_site
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.config.job_spec import JobRequest, request_from_mapping
from aimass_hpc.config.site import Site, expand_path, parse_site
from aimass_hpc.launch.render import render_request

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

FRAGMENTS = [
    "'", '"', "$(touch CANARY)", "`touch CANARY`", "\n", "\r", "\x00", ";", "&&", "%", "%j",
    "\\", "*", "?", "[", "]", "-", "--help", "ü", "日本", "🚀", " ", "\t", "$HOME", "${X}", "#",
    "FOO", "x", "0", "=", ":", "{x}", "|", ">", "!", "~", "\u2028", "\x1b",
]  # fmt: skip
EXPLICIT = [
    "\nx", "x\ny", "x\n", "\r", "x\r\n", "\x00", "a\x00b", "-n", "--help", "*", "?", "[a]",
    "ok", "debug", "x" * 10_000, "ü" * 10_000, "$(id)\n" * 50,
]  # fmt: skip
HOSTILE = st.one_of(
    st.sampled_from(EXPLICIT),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map("".join),
    st.text(max_size=12),
)
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# What the job writes: argument $1, $HOSTILE, the job name and the cwd, one file each.
PROBE = [
    "sh",
    "-c",
    'cd "$AIMASS_RUN_DIR" && printf %s "$1" > arg && printf %s "${HOSTILE-}" > env'
    ' && printf %s "$AIMASS_JOB_NAME" > name && printf %s "$AIMASS_PYTHON" > python'
    ' && printf %s "$OLDPWD" > cwd',
    "sh",
]


def _local_site(tmp: Path, **changes: Any) -> tuple[Site | None, list]:
    data = site_data("local")
    data["filesystems"] = {"runs": str(tmp / "runs"), "models": str(tmp / "models")}
    data["python"] = "python3"
    for dotted, value in changes.items():
        _set(data, dotted, value)
    return parse_site(data)


def _dev_data(tmp: Path) -> dict[str, Any]:
    data = site_data("dev")
    data["filesystems"] = {"runs": str(tmp / "runs"), "models": str(tmp / "models")}
    return data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def _assert_names(exc: BaseException, *keys: str) -> None:
    """The error is one line and names one of ``keys`` as a key (not just in a value)."""
    message = str(exc)
    assert "\n" not in message and "\r" not in message, repr(message)
    assert any(re.search(rf"(^|[ .:\[]){re.escape(k)}([ .:\[]|$)", message) for k in keys), (
        keys,
        message,
    )


def _bash_n(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr


def _run(script: str, run_dir: Path) -> dict[str, str]:
    """Run a rendered launcher-none script with bash; what the PROBE command wrote."""
    (run_dir / "job.sh").write_text(script, encoding="utf-8")
    env = {"PATH": os.environ["PATH"], "HOME": str(run_dir), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        ["bash", str(run_dir / "job.sh")], cwd=run_dir, env=env, capture_output=True, timeout=60
    )
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
    assert proc.returncode == 0, (proc.stderr, logs)
    return {
        name: (run_dir / name).read_bytes().decode("utf-8", "surrogateescape")
        for name in ("arg", "env", "name", "python", "cwd")
        if (run_dir / name).exists()
    }


def _sbatch_line(script: str, option: str) -> str:
    lines = [ln for ln in script.splitlines() if ln.startswith(f"#SBATCH --{option}=")]
    assert len(lines) == 1, lines
    return lines[0].split("=", 1)[1]


# --------------------------------------------------------------------------- [job] specs

JOB_FIELDS = [
    "name", "command0", "arg", "env_key", "env_value", "workdir", "mem", "time", "partition",
    "account", "qos", "reservation", "constraint", "dependency", "array", "sbatch_extra",
]  # fmt: skip


def _job_mapping(field: str, value: str, tmp: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    data: dict[str, Any] = {"name": "h", "command": [*PROBE, "plain"]}
    keys: tuple[str, ...] = (f"job.{field}", field)
    if field == "command0":
        data["command"] = [value, "x"]
        keys = ("job.command[0]", "job.command")
    elif field == "arg":
        data["command"] = [*PROBE, value]
        keys = ("job.command[4]",)
    elif field == "env_key":
        data["env"] = {value: "v"}
        keys = ("job.env",)
    elif field == "env_value":
        data["env"] = {"HOSTILE": value}
        keys = ("job.env.HOSTILE",)
    elif field == "workdir":
        data["workdir"] = f"{tmp}/{value}"
    elif field == "sbatch_extra":
        data["sbatch_extra"] = [f"--comment={value}"]
    else:
        data[field] = value
    return data, keys


@SETTINGS
@given(field=st.sampled_from(JOB_FIELDS), value=HOSTILE)
def test_job_spec_fields(field: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        site, problems = _local_site(tmp)
        assert site is not None, problems
        data, keys = _job_mapping(field, value, tmp)
        run_dir = tmp / "run"
        try:
            request = request_from_mapping(data, where="job")
            script = render_request(site, request, run_dir)
        except InputError as exc:
            _assert_names(exc, *keys)
            return
        _bash_n(script)
        _check_job_value(field, value, script, run_dir, tmp)


def _check_job_value(field: str, value: str, script: str, run_dir: Path, tmp: Path) -> None:
    option = {"sbatch_extra": "comment"}.get(field, field)
    if field in {"account", "qos", "reservation", "constraint", "dependency", "array", "mem"}:
        assert _sbatch_line(script, option) == value
        return
    if field == "sbatch_extra":
        assert f"#SBATCH --comment={value}\n" in script
        return
    if field in {"time", "partition", "command0", "env_key"}:
        return  # normalised (time), a known partition, a program name, a valid name: rendered
    if field == "workdir":
        try:
            (tmp / value).mkdir(parents=True, exist_ok=True)
        except OSError:
            assert f"cd -- {shlex.quote(f'{tmp}/{value}')}\n" in script
            return
    run_dir.mkdir()
    got = _run(script, run_dir)
    expected = {"name": ("name", "h"), "arg": ("arg", value), "env_value": ("env", value)}
    if field in expected:
        key, want = expected[field]
        assert got[key] == (value if field == "name" else want)
    if field == "workdir":
        assert got["cwd"] == f"{tmp}/{value}" or Path(got["cwd"]) == (tmp / value).resolve()


# --------------------------------------------------------------------------- train specs

TRAIN_FIELDS = {
    "name": ("name", "name"),
    "model.name": ("model.name", "model.name"),
    "model.repository": ("model.repository", "model.repository"),
    "model.tags": ("model.tags[0]", "model.tags"),
    "pythonpath": ("pythonpath[1]", "pythonpath"),
    "script.arg": ("script.command[4]", "script.command"),
    "task.args": ("task.args.hidden", "task.args"),
    "task.ref": ("task.ref", "task.ref"),
    "job.env.key": ("job.env", "job.env"),
    "job.env.value": ("job.env.HOSTILE", "job.env"),
    "job.mem": ("job.mem", "mem"),
    "job.time": ("job.time", "time"),
    "job.partition": ("job.partition", "partition"),
    "job.account": ("job.account", "account"),
    "job.qos": ("job.qos", "qos"),
    "job.reservation": ("job.reservation", "reservation"),
}


def _train_mapping(field: str, value: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "pythonpath": [str(DIGITS)],
        "train": {"batch_size": 4},
        "model": {"name": "m"},
        "job": {"nodes": 1, "tasks_per_node": 1},
    }
    if field in {"script.arg", "job.env.value", "job.env.key"}:
        data["script"] = {"command": [*PROBE, value if field == "script.arg" else "a"]}
    else:
        data["task"] = {"ref": "digits_mlp:build"}
    if field == "job.env.key":
        data["job"]["env"] = {value: "v"}
    elif field == "job.env.value":
        data["job"]["env"] = {"HOSTILE": value}
    elif field == "model.tags":
        data["model"]["tags"] = [value]
    elif field == "pythonpath":
        data["pythonpath"].append(value)
    elif field == "task.args":
        data["task"]["args"] = {"hidden": value}
    elif field != "script.arg":
        _set(data, field, value)
    return data


@SETTINGS
@given(field=st.sampled_from(sorted(TRAIN_FIELDS)), value=HOSTILE)
def test_train_spec_fields(field: str, value: str) -> None:
    from aimass_hpc.config.train_spec import plan_training, spec_from_mapping

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        site, problems = _local_site(tmp)
        assert site is not None, problems
        run_dir = tmp / "run"
        try:
            spec = spec_from_mapping(_train_mapping(field, value), source=None, where="spec")
            plan = plan_training(spec, site)
            script = render_request(site, plan.request, run_dir)
        except InputError as exc:
            _assert_names(exc, *TRAIN_FIELDS[field])
            return
        _bash_n(script)
        config = json.loads(plan.files()["train.json"])
        if field == "model.name":
            assert config["model_name"] == value
        elif field == "model.tags":
            assert config["tags"] == [value]
        elif field == "task.args":
            assert config["task_args"] == {"hidden": value}
        elif field in {"script.arg", "job.env.value"}:
            run_dir.mkdir()
            got = _run(script, run_dir)
            assert got["arg" if field == "script.arg" else "env"] == value


# --------------------------------------------------------------------------- search specs

SEARCH_FIELDS = {
    "search.name": ("search.name",),
    "search.metric": ("search.metric",),
    "objective.arg": ("objective.command[4]", "objective.command"),
    "objective.env.key": ("objective.env",),
    "objective.env.value": ("objective.env.HOSTILE",),
    "objective.workdir": ("objective.workdir",),
    "trial.mem": ("trial.mem", "mem"),
    "trial.time": ("trial.time",),
    "trial.partition": ("trial.partition", "partition"),
    "trial.account": ("trial.account", "account"),
    "trial.qos": ("trial.qos", "qos"),
    "trial.constraint": ("trial.constraint", "constraint"),
    "space.name": ("space",),
    "space.choice": ("space.c.choices[0]", "space.c"),
    "pruning.metric": ("pruning.metric",),
    "driver.partition": ("driver.partition",),
}


# A search command's braces are placeholders: the probe's own are doubled.
SEARCH_PROBE = [arg.replace("{", "{{").replace("}", "}}") for arg in PROBE]


def _search_mapping(field: str, value: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "search": {"name": "s", "budget": 2},
        "objective": {"command": [*SEARCH_PROBE, "{c}"]},
        "space": {"c": {"type": "categorical", "choices": ["a"]}},
    }
    if field == "objective.arg":
        data["objective"]["command"] = [*SEARCH_PROBE, value]
    elif field == "objective.env.key":
        data["objective"]["env"] = {value: "v"}
    elif field == "objective.env.value":
        data["objective"]["env"] = {"HOSTILE": value}
    elif field == "space.name":
        data["space"][value] = {"type": "float", "low": 0, "high": 1}
    elif field == "space.choice":
        data["space"]["c"]["choices"] = [value]
    else:
        _set(data, field, value)
    return data


@SETTINGS
@given(field=st.sampled_from(sorted(SEARCH_FIELDS)), value=HOSTILE)
def test_search_spec_fields(field: str, value: str) -> None:
    from aimass_hpc.config.search_spec import spec_from_mapping
    from aimass_hpc.launch.search_driver import SearchDir, build_trial

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        site, problems = _local_site(tmp)
        assert site is not None, problems
        run_dir = tmp / "run"
        try:
            spec = spec_from_mapping(_search_mapping(field, value), base_dir=tmp, where="s.toml")
            params = {"c": spec.space_obj()["c"].choices[0]}
            request, _ = build_trial(spec, site, SearchDir(tmp / "sdir"), 0, params)
            script = render_request(site, request, run_dir)
        except InputError as exc:
            _assert_names(exc, *SEARCH_FIELDS[field])
            return
        _bash_n(script)
        if field in {"objective.arg", "objective.env.value", "space.choice", "search.metric"}:
            run_dir.mkdir()
            got = _run(script, run_dir)
            if field == "objective.env.value":
                assert got["env"] == value
            elif field == "search.metric":
                assert request.env["AIMASS_SEARCH_METRIC"] == value
            elif not {"{", "}"} & set(value) or field == "space.choice":
                assert got["arg"] == value


# --------------------------------------------------------------------------- serve options

SERVE_FIELDS = ["ref", "alias", "reservation", "partition", "time", "mem", "extra"]


@pytest.fixture(scope="module")
def serve_site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    import torch

    from aimass_hpc.repo import ModelRepository
    from aimass_hpc.serve import toymodels

    tmp = tmp_path_factory.mktemp("serve")
    site = write_site(tmp, "dev")
    kwargs = {"in_features": 2, "hidden": 2, "out_features": 1}
    repo = ModelRepository(site.models_root)
    repo.save("toy", toymodels.mlp(**kwargs).state_dict(), recipe=toymodels.recipe(**kwargs))
    repo.promote("toy", 1, "prod")
    del torch
    return site


@SETTINGS
@given(field=st.sampled_from(SERVE_FIELDS), value=HOSTILE)
def test_serve_options(serve_site: Site, field: str, value: str) -> None:
    from aimass_hpc.launch.serving import ServeOptions, plan_service

    opts = ServeOptions(ref="toy@prod", time="00:10:00")
    if field == "ref":
        opts.ref = value
    elif field == "alias":
        opts.ref = f"toy@{value}"
    elif field == "extra":
        opts.extra = {"note": value}
    else:
        setattr(opts, field, value)
    try:
        request, payload = plan_service(serve_site, opts)
        script = render_request(serve_site, request)
    except NotFoundError:
        assert field in {"ref", "alias"}  # a valid name that is not in the repository
        return
    except InputError as exc:
        keys = {"alias": ("serve.ref",), "extra": ("serve.extra.note",)}.get(field, ())
        _assert_names(exc, f"serve.{field}", field, *keys)
        return
    _bash_n(script)
    if field in {"reservation", "mem"}:
        assert _sbatch_line(script, field) == value
    if field in {"ref", "alias"}:
        assert f"export AIMASS_SERVE_MODEL={shlex.quote(opts.ref)}\n" in script
    if field == "extra":
        assert json.loads(json.dumps(payload))["serve"]["note"] == value


# --------------------------------------------------------------------------- site keys

LMOD_INIT = "/usr/share/lmod/lmod/init/bash"
# key -> (base site, how the value is found in a rendered script, or None: run it)
SITE_KEYS: dict[str, tuple[str, Callable[[str], str] | None]] = {
    "name": ("local", None),
    "description": ("local", None),
    "python": ("local", None),
    "env.HOSTILE": ("local", None),
    "env.KEY": ("local", None),
    "account": ("dev", lambda v: f"#SBATCH --account={v}\n"),
    "qos": ("dev", lambda v: f"#SBATCH --qos={v}\n"),
    "constraints": ("dev", lambda v: f"#SBATCH --constraint={v}\n"),
    "partitions.debug.gpu_type": ("dev", lambda v: f"#SBATCH --gres=gpu:{v}:1\n"),
    "partitions.debug.gres_name": ("dev", lambda v: f"#SBATCH --gres={v}:fake:1\n"),
    "partitions.debug.account": ("dev", lambda v: f"#SBATCH --account={v}\n"),
    "preemption.signal": ("dev", lambda v: "#SBATCH --signal="),
    "modules.load": ("dev", lambda v: f"module load {shlex.quote(v)}\n"),
    # an empty init means "the system's default"; paths get ~ and $VAR expanded at load time
    "modules.init": ("dev", lambda v: f"source {shlex.quote(v or LMOD_INIT)}\n"),
    "container.image": ("dev", lambda v: f"--container-image={shlex.quote(expand_path(v))}"),
    "container.binds": ("dev", lambda v: f"--container-mounts={shlex.quote(expand_path(v))}"),
    "mpi.mpirun_args": ("dev", lambda v: f'mpirun -np "${{SLURM_NTASKS:-1}}" {shlex.quote(v)} '),
    "serving.default_reservation": ("dev", lambda v: ""),
    "filesystems.scratch": ("dev", lambda v: ""),
}


def _site_with(key: str, value: str, tmp: Path) -> tuple[Site | None, list, str]:
    base, _ = SITE_KEYS[key]
    data = _dev_data(tmp) if base == "dev" else site_data("local")
    if base == "local":
        data["filesystems"] = {"runs": str(tmp / "runs"), "models": str(tmp / "models")}
    path = key
    if key == "env.KEY":
        data["env"] = {value: "v"}
        path = "env"
    elif key == "env.HOSTILE":
        data["env"] = {"HOSTILE": value}
    elif key in {"constraints", "modules.load", "container.binds", "mpi.mpirun_args"}:
        _set(data, key, [value])
        path = f"{key}[0]"
    else:
        _set(data, key, value)
    if key.startswith("modules."):
        data["modules"]["system"] = "lmod"
    if key.startswith("container."):
        data["container"].setdefault("image", "img.sqsh")
        data["container"]["runtime"] = "pyxis"
    if key == "mpi.mpirun_args":
        data["mpi"]["launcher"] = "mpirun"
    site, problems = parse_site(data)
    return site, problems, path


@SETTINGS
@given(key=st.sampled_from(sorted(SITE_KEYS)), value=HOSTILE)
def test_site_keys(key: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        site, problems, path = _site_with(key, value, tmp)
        if problems:
            first = str(problems[0])
            assert problems[0].path.startswith(path), (path, first)
            assert "\n" not in first and "\r" not in first
            return
        assert site is not None
        gpus = 1 if SITE_KEYS[key][0] == "dev" else 0
        command = [*PROBE, "a"]
        request = JobRequest(name="h", command=command, env={}, gpus_per_node=gpus)
        run_dir = tmp / "run"
        try:
            script = render_request(site, request, run_dir)
        except InputError as exc:  # refused when resolved against the request
            _assert_names(exc, *path.split("."))
            return
        _bash_n(script)
        finder = SITE_KEYS[key][1]
        if finder is not None:
            assert finder(value) in script
            return
        run_dir.mkdir()
        got = _run(script, run_dir)
        if key == "python":
            assert got["python"] == (value or sys.executable)
        elif key == "env.HOSTILE":
            assert got["env"] == value
        elif key == "name":
            assert f"site {value}" in script


# --------------------------------------------------------------------------- aimass reserve


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["r\n", "--nodes", "node1"], "NAME"),
        (["r", "--nodes", "node1\n"], "--nodes"),
        (["r", "--nodes", "node1", "--users", "me\n"], "--users"),
        (["r", "--nodes", "node1", "--flags", "ignore_jobs\n"], "--flags"),
        (["r", "--nodes", "node1", "--partition", "debug\n"], "--partitionname"),
        (["r", "--nodes", "node1", "--duration", "60\n"], "--duration"),
        (["r" * 65, "--nodes", "node1"], "NAME"),
    ],
)
def test_reserve_create_refuses_names_with_a_newline(args: list[str], key: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "reserve", "create", *args, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and f"error: {key}: " in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the cluster

CLUSTER_VALUES = [
    "\nstarts with a newline",
    "middle\nnewline",
    "ends with a newline\n",
    "'single' \"double\" `tick` $(touch CANARY) ${HOME} $((1+1))",
    "; touch CANARY && touch CANARY || true | cat",
    "%j %x %A %% 100%",
    "back\\slash \\\\ \\n",
    "* ? [a-z] {a,b} ~",
    "-n",
    "--help",
    "héllo 日本語 🚀 \u2028 \x1b[31m",
    "x" * 10_000,
    "",
]


@pytest.mark.cluster
def test_hostile_values_reach_a_slurm_job_byte_for_byte(cluster, tmp_path):
    from aimass_hpc.launch.scheduler import JobState, get_scheduler
    from aimass_hpc.launch.submit import submit

    canary = tmp_path / "canary"
    values = [v.replace("CANARY", str(canary)) for v in CLUSTER_VALUES]
    site = write_site(tmp_path, "dev")
    dump = (
        "import json, os, sys; "
        "json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
        "if k.startswith('HOSTILE_')}, 'name': os.environ['AIMASS_JOB_NAME']}, "
        "open(os.path.join(os.environ['AIMASS_RUN_DIR'], 'out.json'), 'w', encoding='utf-8'))"
    )
    request = request_from_mapping(
        {
            "name": "".join(values[:3]),
            "command": [site.python, "-c", dump, *values],
            "env": {f"HOSTILE_{i}": v for i, v in enumerate(values)},
            "time": "5",
        },
        where="job",
    )
    sub = submit(site, request)
    final = get_scheduler(site).wait([sub.job_id], timeout=180)[sub.job_id]
    assert final.state is JobState.COMPLETED, (final, sub.run_dir.log_file().read_text())
    got = json.loads((sub.run_dir.path / "out.json").read_text(encoding="utf-8"))
    assert got["argv"] == values
    assert got["env"] == {f"HOSTILE_{i}": v for i, v in enumerate(values)}
    assert got["name"] == request.name
    assert not canary.exists()
