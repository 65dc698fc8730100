"""Every key a site config accepts has an effect: in a rendered script, in what a request may
ask for, in `site show`, or it is refused. `test_every_schema_key_is_in_the_table` fails when a
key is added to config/site.py without a row here (or a test named in ELSEWHERE)."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import dumps_toml
from pydantic import BaseModel

from aimass_hpc.cli import main
from aimass_hpc.common.errors import InputError
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import Partition, Site, parse_site
from aimass_hpc.launch.render import render_request


@dataclass(frozen=True)
class Problem:
    """Expect a validation problem at this key path."""

    path: str


@dataclass(frozen=True)
class Refused:
    """Expect resolving/rendering the request to fail with this text."""

    text: str


@dataclass(frozen=True)
class Absent:
    """Expect this text NOT in the rendered script."""

    text: str


@dataclass(frozen=True)
class Shown:
    """Expect this text in `aimass site show --json`."""

    text: str


@dataclass(frozen=True)
class Holds:
    """Expect this predicate on the loaded site."""

    check: Callable[[Site], bool]


def base_site() -> dict[str, Any]:
    return {
        "name": "keys",
        "scheduler": "slurm",
        "python": "python3",
        "partitions": {
            "gpu": {
                "default": True,
                "nodes": 4,
                "gpus_per_node": 4,
                "gpu_type": "fake",
                "cpus_per_node": 16,
                "mem_per_node": "64G",
                "max_time": "1-00:00:00",
            },
            "cpu": {"nodes": 4, "cpus_per_node": 16, "max_time": "1-00:00:00"},
        },
        "filesystems": {"runs": "/runs", "models": "/models"},
    }


APPTAINER = {"container.runtime": "apptainer", "container.image": "/img/site.sif"}
PYXIS = {"container.runtime": "pyxis", "container.image": "nvcr.io#nvidia/pytorch:24.05"}
LMOD = {"modules.system": "lmod"}
GPU1 = {"gpus_per_node": 1}

# (site keys -> values, request fields, expectation). One row per key, more where a key has
# a refusal as well as an effect.
ROWS: list[tuple[dict[str, Any], dict[str, Any], Any]] = [
    ({"name": "alpha"}, {}, "for site alpha;"),
    ({"description": "Our big cluster"}, {}, Shown("Our big cluster")),
    ({"scheduler": "local"}, {}, Problem("mpi.launcher")),
    ({"account": "proj1"}, {}, "#SBATCH --account=proj1\n"),
    ({"qos": "high"}, {}, "#SBATCH --qos=high\n"),
    ({"constraints": ["ib", "hdr"]}, {}, "#SBATCH --constraint=ib&hdr\n"),
    ({"python": "/opt/py/bin/python3"}, {}, "export AIMASS_PYTHON=/opt/py/bin/python3\n"),
    ({"templates": "tpl"}, {}, "echo site-override"),
    ({"sbatch_options": ["--mail-type=FAIL"]}, {}, "#SBATCH --mail-type=FAIL\n"),
    ({"sbatch_options": ["--time=1"]}, {}, Problem("sbatch_options")),
    ({"sbatch_options": ["--comment=a b"]}, {}, Problem("sbatch_options")),
    ({"srun_options": ["--cpu-bind=cores"]}, {}, " --cpu-bind=cores \\"),
    ({"srun_options": ["--mpi=pmi2"]}, {}, Problem("srun_options")),
    ({"srun_options": ["--cpu-bind=$(x)"]}, {}, Problem("srun_options")),
    ({"partitions.gpu.name": "other"}, {}, Problem("partitions.gpu.name")),
    ({"partitions.gpu.description": "4 fake GPUs"}, {}, Shown("4 fake GPUs")),
    (
        {"partitions.gpu.default": False, "partitions.cpu.default": True},
        {},
        "#SBATCH --partition=cpu\n",
    ),
    ({"partitions.gpu.nodes": 2}, {"nodes": 3}, Refused("nodes: 3 nodes asked")),
    ({"partitions.gpu.gpus_per_node": 2}, {"gpus_per_node": 3}, Refused("gpus_per_node: 3")),
    ({"partitions.gpu.gpu_type": "h100"}, GPU1, "#SBATCH --gres=gpu:h100:1\n"),
    ({"partitions.gpu.gres_name": "tpu"}, GPU1, "#SBATCH --gres=tpu:fake:1\n"),
    ({"partitions.gpu.gpu_request": "gpus-per-node"}, GPU1, "#SBATCH --gpus-per-node=fake:1\n"),
    ({"partitions.gpu.cpus_per_node": 4}, {"cpus_per_task": 8}, Refused("cpus_per_task: ")),
    ({"partitions.gpu.mem_per_node": "8G"}, {"mem": "16G"}, Refused("mem: 16G")),
    ({"partitions.gpu.max_time": "01:00:00"}, {"time": "2:00:00"}, Refused("time: ")),
    ({"partitions.gpu.default_time": "00:10:00"}, {}, "#SBATCH --time=00:10:00\n"),
    ({"partitions.gpu.account": "pacct", "account": "site"}, {}, "#SBATCH --account=pacct\n"),
    ({"partitions.gpu.qos": "pq", "qos": "site"}, {}, "#SBATCH --qos=pq\n"),
    (
        {"partitions.gpu.constraints": ["nvlink"], "constraints": ["ib"]},
        {},
        "#SBATCH --constraint=nvlink\n",
    ),
    ({"partitions.gpu.default_cpus_per_task": 3}, {}, "#SBATCH --cpus-per-task=3\n"),
    (
        {"partitions.gpu.default_cpus_per_task": 99},
        {},
        Problem("partitions.gpu.default_cpus_per_task"),
    ),
    ({"partitions.gpu.default_mem": "4G"}, {}, "#SBATCH --mem=4G\n"),
    ({"partitions.gpu.default_mem": "1T"}, {}, Problem("partitions.gpu.default_mem")),
    (
        {**LMOD, "modules.load": ["gcc"], "partitions.gpu.modules": {"load": ["cuda/12"]}},
        {},
        "module load gcc cuda/12\n",
    ),
    (
        {**APPTAINER, "partitions.gpu.container": {"image": "/img/gpu.sif"}},
        {},
        "/img/gpu.sif true",
    ),
    ({"partitions.gpu.env": {"NCCL_X": "1"}, "env": {"NCCL_X": "0"}}, {}, "export NCCL_X=1\n"),
    (LMOD, {}, "source /usr/share/lmod/lmod/init/bash\n"),
    (
        {"modules.system": "environment-modules", "modules.init": "/etc/profile.d/m.sh"},
        {},
        "source /etc/profile.d/m.sh\n",
    ),
    ({**LMOD, "modules.purge": True}, {}, "module purge\n"),
    ({**LMOD, "modules.load": ["gcc/12"]}, {}, "module load gcc/12\n"),
    ({"modules.load": ["gcc/12"]}, {}, Problem("modules.system")),
    (PYXIS, {}, "--container-image='nvcr.io#nvidia/pytorch:24.05'"),
    (APPTAINER, {}, "apptainer exec /img/site.sif true"),
    ({**APPTAINER, "container.binds": ["/data:/data"]}, {}, "--bind /data:/data "),
    ({**APPTAINER, "container.options": ["--writable-tmpfs"]}, {}, "--writable-tmpfs /img/"),
    ({**APPTAINER, "container.options": ["--cleanenv"]}, {}, Problem("container.options[0]")),
    ({**PYXIS, "container.options": ["--container-workdir=/w"]}, {}, " --container-workdir=/w"),
    ({**PYXIS, "container.options": ["--nv"]}, {}, Problem("container.options[0]")),
    ({**APPTAINER, "container.gpu_flag": True}, GPU1, "apptainer exec --nv "),
    ({**APPTAINER, "container.gpu_flag": False}, GPU1, Absent("--nv")),
    ({"mpi.launcher": "mpirun"}, {}, 'mpirun -np "${SLURM_NTASKS:-1}" '),
    ({"mpi.srun_mpi": "pmix_v4"}, {}, " --mpi=pmix_v4"),
    ({"mpi.srun_mpi": "none"}, {}, Absent("--mpi=")),
    ({"mpi.srun_mpi": "pmix;rm"}, {}, Problem("mpi.srun_mpi")),
    ({"mpi.srun_wait": 77}, {}, "srun --kill-on-bad-exit=1 --wait=77"),
    (
        {"mpi.launcher": "mpirun", "mpi.mpirun_args": ["--bind-to", "core"]},
        {},
        'mpirun -np "${SLURM_NTASKS:-1}" --bind-to core \\',
    ),
    ({"filesystems.runs": "/lustre/runs"}, {}, "export AIMASS_RUN_DIR='/lustre/runs/"),
    (
        {"filesystems.models": "/lustre/models"},
        {},
        Holds(lambda s: str(s.models_root) == "/lustre/models"),
    ),
    ({"filesystems.scratch": "/local/scratch"}, {}, "export AIMASS_SCRATCH=/local/scratch\n"),
    ({"filesystems.lustre.stripe_count": 4}, {}, "lfs setstripe -c 4 -S 1M"),
    ({"filesystems.lustre.stripe_size": "8M"}, {}, "lfs setstripe -c 1 -S 8M"),
    ({"env": {"FOO": "a b"}}, {}, "export FOO='a b'\n"),
    ({"preemption.signal": "SIGUSR2"}, {}, "#SBATCH --signal=USR2@120\n"),
    ({"preemption.grace_seconds": 99}, {}, "#SBATCH --signal=USR1@99\n"),
    ({"preemption.max_restarts": 7}, {}, "export AIMASS_MAX_RESTARTS=7\n"),
    ({"preemption.max_restarts": 0}, {"requeue": True}, Refused("requeue: ")),
    (
        {"training.backend": "horovod"},
        {"kind": "train", **GPU1},
        "export AIMASS_TRAIN_BACKEND=horovod\n",
    ),
    ({"training.partition": "cpu"}, {"kind": "train"}, "#SBATCH --partition=cpu\n"),
    ({"training.partition": "cpuu"}, {}, Problem("training.partition")),
    ({"serving.partition": "cpu"}, {"kind": "serve"}, "#SBATCH --partition=cpu\n"),
    ({"serving.default_reservation": "inf"}, {"kind": "serve"}, "#SBATCH --reservation=inf\n"),
    ({"serving.bind": "any"}, {"kind": "serve"}, "export AIMASS_SERVE_BIND=any\n"),
    ({"serving.port_range": [25000, 25100]}, {"kind": "serve"}, "export AIMASS_PORT_MAX=25100\n"),
    ({"serving.port_range": [25100, 25000]}, {}, Problem("serving.port_range")),
    ({"search.partition": "cpu"}, {"kind": "trial"}, "#SBATCH --partition=cpu\n"),
]

# Keys whose effect other test files show (added by other work on the schema).
ELSEWHERE = {
    **{
        f"serving.vllm.{key}": "tests/test_vllm_site.py"
        for key in ("python", "module", "container", "args", "env")
    },
    "training.keep_checkpoints": "tests of checkpoint retention",
    "dashboard.admins": "tests/test_dashboard_api.py::test_the_site_config_names_admins",
}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _site(tmp_path: Path, keys: dict[str, Any]) -> tuple[Site | None, list[Any]]:
    (tmp_path / "tpl").mkdir(exist_ok=True)
    (tmp_path / "tpl" / "job.j2").write_text(
        '{% extends "aimass:job.j2" %}\n{% block setup %}\necho site-override\n{% endblock %}\n'
    )
    data = base_site()
    for dotted, value in keys.items():
        _set(data, dotted, value)
    return parse_site(data, str(tmp_path / "site.toml"))


def _row_id(row: tuple[dict[str, Any], dict[str, Any], Any]) -> str:
    return ",".join(row[0])[:60]


@pytest.mark.parametrize("keys,request_fields,expect", ROWS, ids=[_row_id(r) for r in ROWS])
def test_each_key_has_an_effect(tmp_path, capsys, keys, request_fields, expect):
    site, problems = _site(tmp_path, keys)
    if isinstance(expect, Problem):
        assert site is None
        assert expect.path in [p.path for p in problems], problems
        return
    assert site is not None, [str(p) for p in problems]
    if isinstance(expect, Holds):
        assert expect.check(site)
        return
    if isinstance(expect, Shown):
        data = base_site()
        for dotted, value in keys.items():
            _set(data, dotted, value)
        (tmp_path / "site.toml").write_text(dumps_toml(data))
        with pytest.raises(SystemExit) as exit_info:
            main(["site", "show", str(tmp_path / "site.toml"), "--json"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and expect.text in json.dumps(json.loads(out))
        return
    request = JobRequest(name="keys", command=["true"], **request_fields)
    if isinstance(expect, Refused):
        with pytest.raises(InputError, match=expect.text):
            render_request(site, request)
        return
    script = render_request(site, request)
    if isinstance(expect, Absent):
        assert expect.text not in script
    else:
        assert expect in script, script


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of the schema as a dotted path (``partitions.*.gpu_type``)."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if name == "source":
            continue
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        args = typing.get_args(annotation)
        inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _leaf_keys(annotation, f"{dotted}.")
        elif typing.get_origin(annotation) is dict and inner:
            keys |= _leaf_keys(inner[0], f"{dotted}.*.")
        elif inner and model is not Partition:
            keys |= _leaf_keys(inner[0], f"{dotted}.")
        else:
            # A leaf, or a per-partition [modules]/[container] merged like the site's.
            keys.add(dotted)
    return keys


def test_every_schema_key_is_in_the_table():
    covered: set[str] = set()
    for keys, _, _ in ROWS:
        for dotted in keys:
            parts = dotted.split(".")
            if parts[0] == "partitions":
                parts[1] = "*"
            covered.add(".".join(parts[:3] if parts[0] == "partitions" else parts))
    missing = sorted(_leaf_keys(Site) - covered - set(ELSEWHERE))
    assert not missing, f"site keys without a row in ROWS: {missing}"
