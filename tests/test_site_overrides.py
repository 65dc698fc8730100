"""Per-partition modules/container/env and defaults, site sbatch/srun options, GPU/CPU
partition rules, template overrides that extend the bundled ones, `site show`, and
`aimass train --sbatch-arg`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import dumps_toml

from aimass_hpc.cli import main
from aimass_hpc.common.errors import InputError
from aimass_hpc.config.job_spec import JobRequest, with_sbatch_extra
from aimass_hpc.config.site import BUNDLED_SITES, Site, load_site, parse_site
from aimass_hpc.launch.render import render_request


def _site(tmp_path: Path, **top: Any) -> Site:
    data: dict[str, Any] = {
        "name": "ovr",
        "python": "python3",
        "modules": {"system": "lmod", "purge": True, "load": ["gcc/12", "openmpi/4"]},
        "container": {
            "runtime": "apptainer",
            "image": "/img/site.sif",
            "binds": ["/lustre"],
            "options": ["--writable-tmpfs"],
        },
        "env": {"NCCL_DEBUG": "WARN", "SHARED": "site"},
        "partitions": {
            "gpu": {
                "default": True,
                "gpus_per_node": 4,
                "cpus_per_node": 32,
                "mem_per_node": "256G",
                "default_cpus_per_task": 8,
                "default_mem": "200G",
                "modules": {"load": ["cuda/12.4"]},
                "container": {"binds": ["/gpfs"], "options": ["--nvccli"]},
                "env": {"SHARED": "gpu", "NCCL_IB_HCA": "mlx5"},
            },
            "cpu": {
                "cpus_per_node": 64,
                "modules": {"purge": False, "load": ["python/3.11"]},
                "container": {"runtime": "none"},
            },
            "pyx": {
                "gpus_per_node": 8,
                "container": {"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:24.05"},
            },
        },
        "filesystems": {"runs": str(tmp_path / "runs"), "models": str(tmp_path / "models")},
    }
    data.update(top)
    site, problems = parse_site(data, str(tmp_path / "site.toml"))
    assert site is not None, [str(p) for p in problems]
    return site


def _script(site: Site, **fields: Any) -> str:
    return render_request(site, JobRequest(name="o", command=["prog", "a b"], **fields))


def test_partition_modules_extend_the_site_list_and_replace_scalars(tmp_path):
    site = _site(tmp_path)
    gpu = _script(site, gpus_per_node=1)
    assert "module purge\nmodule load gcc/12 openmpi/4 cuda/12.4\n" in gpu
    cpu = _script(site, partition="cpu")
    assert "module purge" not in cpu  # the partition's purge = false replaces the site's
    assert "module load gcc/12 openmpi/4 python/3.11\n" in cpu


def test_partition_container_merges_or_is_replaced_by_another_runtime(tmp_path):
    site = _site(tmp_path)
    gpu = _script(site, gpus_per_node=2)
    assert (
        "apptainer exec --nv --bind /lustre --bind /gpfs --writable-tmpfs --nvccli "
        "/img/site.sif prog 'a b'" in gpu
    )
    cpu = _script(site, partition="cpu")
    assert "apptainer" not in cpu and "\n  prog 'a b'\n" in cpu
    pyx = _script(site, partition="pyx", gpus_per_node=8)
    # another runtime: nothing of the site's container (binds, options) is kept
    assert "--container-image='nvcr.io#nvidia/pytorch:24.05' \\\n  prog 'a b'" in pyx
    assert "/lustre" not in pyx and "apptainer" not in pyx


def test_env_order_is_site_then_partition_then_job(tmp_path):
    site = _site(tmp_path)
    script = _script(site, gpus_per_node=1, env={"NCCL_IB_HCA": "job"})
    assert "export NCCL_DEBUG=WARN\nexport SHARED=gpu\nexport NCCL_IB_HCA=job\n" in script
    assert "export SHARED=site\n" in _script(site, partition="cpu")


def test_partition_default_cpus_and_mem_apply_unless_the_job_asks(tmp_path):
    site = _site(tmp_path)
    default = _script(site, gpus_per_node=1)
    assert "#SBATCH --cpus-per-task=8\n" in default and "#SBATCH --mem=200G\n" in default
    own = _script(site, gpus_per_node=1, cpus_per_task=2, mem="10G")
    assert "#SBATCH --cpus-per-task=2\n" in own and "#SBATCH --mem=10G\n" in own
    # the default counts against the node: 8 CPUs x 8 tasks > 32
    with pytest.raises(InputError, match="^cpus_per_task: 8 tasks x 8 CPUs"):
        _script(site, gpus_per_node=1, ntasks_per_node=8)


def test_constraint_precedence_job_then_partition_then_site(tmp_path):
    parts = _site(tmp_path).model_dump()["partitions"]
    data_parts = {name: {"gpus_per_node": p["gpus_per_node"]} for name, p in parts.items()}
    data_parts["gpu"].update(default=True, constraints=["nvlink", "ib"])
    site = _site(tmp_path, constraints=["avx512"], partitions=data_parts)
    assert "#SBATCH --constraint=nvlink&ib\n" in _script(site, gpus_per_node=1)
    assert "#SBATCH --constraint=avx512\n" in _script(site, partition="cpu")
    mine = _script(site, gpus_per_node=1, constraint="h100&[rack1|rack2]")
    assert "#SBATCH --constraint=h100&[rack1|rack2]\n" in mine and "nvlink" not in mine


def test_site_sbatch_and_srun_options_render_and_a_job_option_wins(tmp_path):
    site = _site(
        tmp_path,
        sbatch_options=["--mail-type=FAIL", "--exclusive"],
        srun_options=["--cpu-bind=cores", "--distribution=block:block"],
    )
    script = _script(site, gpus_per_node=1, sbatch_extra=["--mail-type=END"])
    assert "#SBATCH --exclusive\n#SBATCH --mail-type=END\n" in script
    assert "--mail-type=FAIL" not in script
    assert "--mpi=pmix --cpu-bind=cores --distribution=block:block \\" in script


def test_gpu_jobs_need_a_gpu_partition_and_cpu_training_stays_off_gpus(tmp_path):
    site = _site(tmp_path)
    with pytest.raises(
        InputError, match=r"^gpus_per_node: .*'cpu' nodes have 0; use a GPU partition \(gpu, pyx\)$"
    ):
        _script(site, partition="cpu", gpus_per_node=1)
    with pytest.raises(InputError, match="^partition: CPU-only training .* use partition 'cpu'"):
        _script(site, kind="train")
    assert "#SBATCH --partition=cpu\n" in _script(site, kind="train", partition="cpu")
    # a plain job (not training) may use a GPU partition without GPUs
    assert "#SBATCH --partition=gpu\n" in _script(site)
    # a site with GPU partitions only (the dev cluster) may train on CPUs there
    dev = load_site("dev")
    assert JobRequest(kind="train", name="t", command=["true"]).resolve(dev).partition == "debug"


def test_an_override_extends_the_bundled_template_under_its_prefix(tmp_path):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "job.j2").write_text(
        '{% extends "aimass:job.j2" %}\n'
        "{% block setup %}\n"
        "{{ super() }}\n"
        "echo site-setup {{ partition.name|q }}\n"
        "{% endblock %}\n"
    )
    site = _site(tmp_path, templates="tpl")
    script = _script(site, gpus_per_node=1)
    assert "echo site-setup gpu\n" in script and "#SBATCH --job-name=o\n" in script
    # train.j2 extends job.j2, which is now the override: the override applies to it too
    train = _script(site, kind="train", gpus_per_node=1)
    assert "echo site-setup gpu" not in train  # train.j2 replaces the setup block itself
    assert "export MASTER_PORT=" in train
    assert site.template_overrides() == ["job.j2"]


def test_site_show_lists_accounts_qos_and_overrides(tmp_path, capsys):
    (tmp_path / "mysite").mkdir()
    data = (BUNDLED_SITES / "example-hpc.toml").read_text()
    (tmp_path / "mysite" / "site.toml").write_text(data)
    (tmp_path / "mysite" / "train.j2").write_text('{% extends "aimass:train.j2" %}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["site", "show", str(tmp_path / "mysite"), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == 0
    assert shown["templates_overridden"] == ["train.j2"]
    assert shown["partitions"]["h100"]["effective"] == {
        "account": "ai-research",
        "qos": "gpu",
        "constraint": "ib&nvlink",
    }
    assert shown["partitions"]["cpu"]["effective"]["qos"] == "cpu"
    with pytest.raises(SystemExit):
        main(["site", "show", str(tmp_path / "mysite")])
    text = capsys.readouterr().out
    assert "account" in text and "train.j2 overridden" in text


def test_with_sbatch_extra_checks_each_item(tmp_path):
    site = _site(tmp_path)
    request = JobRequest(name="x", command=["true"], gpus_per_node=1).resolve(site)
    extended = with_sbatch_extra(request, ["--exclusive"], site, where="--sbatch-arg")
    assert extended.sbatch_extra == ["--exclusive"] and extended.partition == "gpu"
    with pytest.raises(InputError, match=r"^--sbatch-arg: --partition is set by aimass"):
        with_sbatch_extra(request, ["--partition=cpu"], site, where="--sbatch-arg")
    with pytest.raises(InputError, match=r"^--sbatch-arg: .*cannot go on an #SBATCH line"):
        with_sbatch_extra(request, ["--comment=a;b c"], site, where="--sbatch-arg")


def test_train_sbatch_arg_reaches_the_script(tmp_path, capsys):
    spec = Path(__file__).resolve().parents[1] / "examples" / "synthetic" / "spec.toml"
    site_path = tmp_path / "dev.toml"
    data = dict(__import__("tomllib").loads((BUNDLED_SITES / "dev.toml").read_text()))
    data["filesystems"] = {"runs": str(tmp_path / "runs"), "models": str(tmp_path / "m")}
    site_path.write_text(dumps_toml(data))
    argv = ["train", str(spec), "--site", str(site_path), "--dry-run"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--sbatch-arg=--exclusive", "--sbatch-arg", "--comment=nightly"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "#SBATCH --exclusive\n#SBATCH --comment=nightly\n" in out
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--sbatch-arg=--time=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--sbatch-arg: --time is set by aimass" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # dry runs write nothing


@pytest.mark.parametrize("doc", ["docs/site-admin.md", "job_templates/README.md"])
def test_the_documented_extension_example_renders(tmp_path, doc):
    import re

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    example = re.search(r"```jinja\n(.*?)```", text, re.DOTALL)
    assert example is not None
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "job.j2").write_text(example.group(1))
    site = _site(tmp_path, templates="tpl", filesystems={
        "runs": str(tmp_path / "runs"), "models": str(tmp_path / "m"), "scratch": "/local",
    })  # fmt: skip
    script = _script(site, partition="cpu")
    expected = {"docs/site-admin.md": 'echo "partition cpu"\n', "job_templates/README.md": (
        'echo "site setup on cpu"\n'
    )}  # fmt: skip
    assert expected[doc] in script, script


def test_a_job_spec_constraint_replaces_the_partition_default(tmp_path, capsys):
    site_path = tmp_path / "site.toml"
    data = __import__("tomllib").loads((BUNDLED_SITES / "example-hpc.toml").read_text())
    data["filesystems"] = {"runs": str(tmp_path / "runs"), "models": str(tmp_path / "m")}
    site_path.write_text(dumps_toml(data))
    spec = tmp_path / "job.toml"
    base = '[job]\nname = "c"\ncommand = ["true"]\npartition = "h100"\ngpus_per_node = 8\n'
    for extra, expected in [
        ("", "#SBATCH --constraint=ib&nvlink\n"),
        ('constraint = "h100&[rack1|rack2]"\n', "#SBATCH --constraint=h100&[rack1|rack2]\n"),
    ]:
        spec.write_text(base + extra)
        with pytest.raises(SystemExit) as exit_info:
            main(["submit", str(spec), "--site", str(site_path), "--dry-run"])
        out = capsys.readouterr().out
        assert exit_info.value.code in (0, None) and expected in out
