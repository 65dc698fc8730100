"""Training specs and ``aimass train`` on the login node: checks that run before anything is
queued, and what the job is told to do. No Slurm needed: every failing case must stop before
sbatch (the runs root stays empty), and dry runs only render.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.train_spec import check_task_ref, load_train_spec, plan_training
from aimass_hpc.runtime.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPEC = ROOT / "examples" / "digits" / "spec.toml"
SYNTHETIC_SPEC = ROOT / "examples" / "synthetic" / "spec.toml"
AIMASS = [sys.executable, "-m", "aimass_hpc"]


def aimass(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AIMASS, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BASE = f"""
name = "t"
pythonpath = [{json.dumps(str(ROOT / "examples" / "digits"))}]
[task]
ref = "digits_mlp:build"
[train]
batch_size = 64
[model]
name = "t-model"
[job]
nodes = 2
tasks_per_node = 2
"""


def test_examples_are_valid_specs() -> None:
    for path in (DIGITS_SPEC, SYNTHETIC_SPEC):
        spec = load_train_spec(path)
        spec.check_workload()
    digits = load_train_spec(DIGITS_SPEC)
    assert digits.job.world_size == 4 and digits.train.batch_size % 4 == 0


def test_checking_a_spec_imports_neither_torch_nor_user_code(tmp_path: Path) -> None:
    # A task module whose import would fail loudly: validation must only read it.
    (tmp_path / "loud.py").write_text("raise SystemExit('imported!')\ndef build(): pass\n")
    spec = write_spec(tmp_path, BASE.replace("digits_mlp:build", "loud:build"))
    code = (
        "import sys\n"
        "from aimass_hpc.config.train_spec import load_train_spec\n"
        f"s = load_train_spec({str(spec)!r}, {{'pythonpath': [{str(tmp_path)!r}]}})\n"
        "s.check_workload()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'loud' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_task_refs_are_located_without_importing_parent_packages(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('package executed')\n")
    (pkg / "tasks.py").write_text("if True:\n    def build(width=1, **kw):\n        pass\n")
    assert check_task_ref("pkg.tasks:build", [str(tmp_path)], {"width": 2}).name == "tasks.py"
    with pytest.raises(InputError, match=r"task.ref: 'pkg.tasks' .* defines no 'nope'"):
        check_task_ref("pkg.tasks:nope", [str(tmp_path)])
    with pytest.raises(InputError, match="module 'pkg.missing'"):
        check_task_ref("pkg.missing:build", [str(tmp_path)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task.ref": "no_such_module:build"}, "task.ref: module 'no_such_module'"),
        ({"task.ref": "digits_mlp:no_such_fn"}, "defines no 'no_such_fn'"),
        ({"task.ref": "not a ref"}, "task.ref"),
        ({"task.args": {"widht": 3}}, "task.args.widht: digits_mlp:build takes no argument"),
        ({"backend": "mpi"}, "backend: Input should be 'torch', 'horovod' or 'fsdp'"),
        ({"train.batch_size": 30}, "train.batch_size: 30 is not divisible by the 4 ranks"),
        ({"train.optimizer": "lbfgs"}, "train.optimizer"),
        ({"job.gpus_per_node": 2, "job.tasks_per_node": 3}, "one task per GPU"),
        ({"train.lr": 0}, "train.lr"),
        ({"trian": {}}, "trian: unknown key"),
    ],
)
def test_bad_specs_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    spec_path = write_spec(tmp_path, BASE)
    with pytest.raises(InputError) as info:
        load_train_spec(spec_path, change).check_workload()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_plan_gives_the_job_a_complete_run_config(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    plan = plan_training(load_train_spec(DIGITS_SPEC), site)
    assert plan.request.kind == "train" and plan.request.requeue and plan.request.signal
    assert plan.request.command[1:] == ["-m", "aimass_hpc.runtime", "train"]
    config = RunConfig.from_dict(json.loads(plan.files()["train.json"]))
    assert config.backend == site.training.backend == "torch"
    assert config.repository == str(site.models_root)
    assert config.warning_signal == "USR1" and config.max_restarts == 3
    assert config.pythonpath[0] == str(DIGITS_SPEC.parent)
    assert config.spec["task"]["ref"] == "digits_mlp:build"  # lineage of the final model


def test_dry_run_renders_a_requeueable_srun_job(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    out = aimass("train", str(DIGITS_SPEC), "--site", site.source, "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["dry_run"] and data["world_size"] == 4 and data["backend"] == "torch"
    script = data["script"]
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@30" in script
    assert "srun --kill-on-bad-exit=1" in script and "-m aimass_hpc.runtime train" in script
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _assert_refused(tmp_path: Path, out: subprocess.CompletedProcess[str], text: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was created"


def test_unknown_task_is_refused_before_queueing(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec = write_spec(tmp_path, BASE.replace("digits_mlp:build", "digits_mlp:bulid"))
    out = aimass("train", str(spec), "--site", site.source)
    _assert_refused(tmp_path, out, "aimass: error: task.ref: 'digits_mlp'")


def test_more_gpus_than_a_node_has_is_refused(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    out = aimass("train", str(write_spec(tmp_path, BASE)), "--site", site.source,
                 "--gpus-per-node", "8")  # fmt: skip
    _assert_refused(tmp_path, out, "gpus_per_node: 8 GPUs per node asked")


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    out = aimass("train", str(write_spec(tmp_path, BASE)), "--site", site.source,
                 "--backend", "mpi")  # fmt: skip
    _assert_refused(tmp_path, out, "Invalid value for '--backend'")
    spec = write_spec(tmp_path, 'backend = "gloo"\n' + BASE, "b.toml")
    out = aimass("train", str(spec), "--site", site.source)
    _assert_refused(tmp_path, out, "backend: Input should be 'torch', 'horovod' or 'fsdp'")


def test_horovod_where_the_jobs_python_lacks_it_is_refused(tmp_path: Path) -> None:
    # The site's jobs run the system interpreter, which has no Horovod.
    site = write_site(tmp_path, "dev", python="/usr/bin/python3")
    out = aimass("train", str(write_spec(tmp_path, BASE)), "--site", site.source,
                 "--backend", "horovod")  # fmt: skip
    _assert_refused(tmp_path, out, "backend: horovod requested but Horovod is not installed")


def test_horovod_is_accepted_where_it_is_built(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev", python=sys.executable)
    out = aimass("train", str(write_spec(tmp_path, BASE)), "--site", site.source,
                 "--backend", "horovod", "--dry-run", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["backend"] == "horovod"
    assert "--mpi=pmix" in json.loads(out.stdout)["script"]


def test_torch_and_fsdp_steps_start_without_pmi_and_scripts_keep_it(tmp_path: Path) -> None:
    # torch.distributed and FSDP meet over TCP: srun need not set up PMIx for them. The user's
    # own script may call MPI, so it keeps the site's --mpi (as Horovod does, above).
    site = write_site(tmp_path, "dev", python=sys.executable)
    spec = write_spec(tmp_path, BASE)
    for backend in ("torch", "fsdp"):
        out = aimass("train", str(spec), "--site", site.source, "--backend", backend,
                     "--dry-run", "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        script = json.loads(out.stdout)["script"]
        assert "srun --kill-on-bad-exit=1" in script and "--mpi=" not in script, script
    (tmp_path / "train.py").write_text("print('hi')\n")
    script_spec = write_spec(
        tmp_path,
        'name = "s"\n[script]\npath = "train.py"\n[model]\nname = "s"\n[job]\nnodes = 1\n',
        "script.toml",
    )
    out = aimass("train", str(script_spec), "--site", site.source, "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    assert "--mpi=pmix" in json.loads(out.stdout)["script"]


def test_plot_draws_a_png_from_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "step", "step": s, "loss": 1 / s, "samples_per_s": 100.0} for s in (1, 2, 3)]
    lines.append({"kind": "epoch", "step": 3, "epoch": 1, "val_loss": 0.3, "accuracy": 0.9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = aimass("plot", str(run), "-o", str(tmp_path / "m.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert aimass("plot", str(empty)).returncode == 2


# --------------------------------------------------------------------------- issue 10


def test_a_200_character_model_name_is_refused_at_dry_run(tmp_path: Path) -> None:
    """It used to pass --dry-run and fail at the first checkpoint inside the job."""
    site = write_site(tmp_path, "dev")
    spec = write_spec(tmp_path, BASE.replace('name = "t-model"', f'name = "{"m" * 200}"'))
    out = aimass("train", str(spec), "--site", site.source, "--dry-run")
    _assert_refused(tmp_path, out, "model.name")
    assert "at most 128 characters" in out.stderr


@pytest.mark.parametrize("name", ["_private", "a.b-c_d", "7up", "m" * 128])
def test_model_names_the_repository_accepts_are_accepted(tmp_path: Path, name: str) -> None:
    from aimass_hpc.repo.refs import check_name

    assert check_name(name) == name
    spec = load_train_spec(write_spec(tmp_path, BASE.replace('"t-model"', f'"{name}"')))
    assert spec.model.name == name


@pytest.mark.parametrize("name", ["-x", ".hidden", "a b", "x\n", "m" * 129, "ü"])
def test_model_names_the_repository_refuses_are_refused(tmp_path: Path, name: str) -> None:
    from aimass_hpc.repo.refs import check_name

    with pytest.raises(InputError):
        check_name(name)
    text = BASE.replace('"t-model"', json.dumps(name))
    with pytest.raises(InputError, match="model.name"):
        load_train_spec(write_spec(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[job.env]\n"FOO\\n" = "x"\n', r"job.env['FOO\n']"),
        ('[job.env]\nX = "a\\u0000b"\n', "job.env.X"),
        ('[job.env]\nX = "a\\rb"\n', "job.env.X"),
    ],
)
def test_hostile_job_keys_and_values_are_refused(tmp_path: Path, text: str, path: str) -> None:
    spec = write_spec(tmp_path, BASE + text)
    with pytest.raises(InputError) as err:
        load_train_spec(spec)
    assert path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ('name = "t"', 'name = "t\\u0000"', "name"),
        ('ref = "digits_mlp:build"', 'ref = "digits_mlp:build\\n"', "task.ref"),
        ('ref = "digits_mlp:build"', 'ref = "digits_mlp:build"\nargs = {a = "\\r"}', "task.args.a"),
        ("tasks_per_node = 2", 'tasks_per_node = 2\npartition = "debug\\n"', "job.partition"),
        ("tasks_per_node = 2", 'tasks_per_node = 2\nreservation = "r\\n"', "job.reservation"),
    ],
)
def test_nul_cr_and_newline_name_the_field(tmp_path: Path, old: str, new: str, path: str) -> None:
    with pytest.raises(InputError) as err:
        load_train_spec(write_spec(tmp_path, BASE.replace(old, new)))
    assert f": {path}" in str(err.value) and "\n" not in str(err.value)


def test_fsdp_wrap_names_python_classes(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[task]\nref = "m:f"\n[train]\nfsdp_wrap = ["Block", "Lin\\near"]\n[model]\nname = "m"\n'
    )
    with pytest.raises(InputError, match=r"train\.fsdp_wrap\[1\]: .* is not a valid class name"):
        load_train_spec(spec)
