"""`aimass site check` reports every problem in one pass: field errors, cross-field problems
and template errors (with file and line), with hints for the usual misspellings."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import dumps_toml

from aimass_hpc.cli import main
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import BUNDLED_SITES, parse_site
from aimass_hpc.launch.render import render_request
from aimass_hpc.launch.site_check import check_site


def _example() -> dict[str, Any]:
    return tomllib.loads((BUNDLED_SITES / "example-hpc.toml").read_text())


def _check(capsys, path: Path) -> tuple[int, list[dict[str, str]]]:
    with pytest.raises(SystemExit) as exit_info:
        main(["site", "check", str(path), "--json", "--no-live"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return exit_info.value.code, json.loads(out)


def test_field_and_cross_field_problems_come_in_one_pass(tmp_path, capsys):
    data = _example()
    data["partitions"]["h100"]["gpus_per_node"] = -1  # a field error
    data["partitions"]["cpu"]["default"] = True  # a second default partition
    data["training"]["partition"] = "h1000"  # a partition that does not exist
    data["search"]["partition"] = "gpu"
    data["serving"]["port_range"] = [30999, 30000]  # reversed
    data["partitions"]["cpu"]["default_mem"] = "1T"  # above mem_per_node
    path = tmp_path / "site.toml"
    path.write_text(dumps_toml(data))
    code, problems = _check(capsys, path)
    by_path = {p["path"]: p for p in problems}
    assert code == 2
    assert {
        "partitions.h100.gpus_per_node",
        "partitions",
        "training.partition",
        "search.partition",
        "serving.port_range",
        "partitions.cpu.default_mem",
    } <= set(by_path)
    assert "did you mean 'h100'" in by_path["training.partition"]["hint"]
    assert "more than one default partition: a100, cpu" in by_path["partitions"]["message"]
    # the table with a field error is not second-guessed (gpu_type "set but 0 GPUs")
    assert "partitions.h100.gpu_type" not in by_path


@pytest.mark.parametrize(
    "edit,path,hint",
    [
        (("container", "runtime", "singularity"), "container.runtime", "'apptainer'"),
        (("container", "runtime", "enroot"), "container.runtime", "'pyxis'"),
        (("modules", "system", "Lmod"), "modules.system", "'lmod'"),
        (("modules", "system", "tcl"), "modules.system", "'environment-modules'"),
        (("mpi", "launcher", "mpiexec"), "mpi.launcher", "'mpirun'"),
        (("training", "backend", "Horovod"), "training.backend", "'horovod'"),
        (("mpi", "srun_wiat", 3), "mpi.srun_wiat", "'srun_wait'"),
        (("container", "bind", []), "container.bind", "'binds'"),
    ],
)
def test_common_misspellings_get_a_hint(edit, path, hint):
    data = _example()
    table, key, value = edit
    data[table][key] = value
    site, problems = parse_site(data, "x.toml")
    found = {p.path: p for p in problems}
    assert site is None and path in found, problems
    assert f"did you mean {hint}?" in str(found[path])


def test_a_template_syntax_error_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "mysite").mkdir()
    data = _example()
    data["mpi"]["srun_wait"] = -5  # a field error too: both come in the same pass
    (tmp_path / "mysite" / "site.toml").write_text(dumps_toml(data))
    (tmp_path / "mysite" / "job.j2").write_text(
        '{% extends "aimass:job.j2" %}\n{% block setup %}\n{% if x %}\necho\n{% endblock %}\n'
    )
    (tmp_path / "mysite" / "_extra.j2").write_text("ok\n{{ x|nosuchfilter }}\n")
    code, problems = _check(capsys, tmp_path / "mysite")
    assert code == 2
    messages = {p["path"]: p["message"] for p in problems}
    assert "mpi.srun_wait" in messages
    job = messages["templates.job.j2"]
    assert job.startswith(str(tmp_path / "mysite" / "job.j2") + " line 5: ")
    assert "endblock" in job or "endif" in job
    assert messages["templates._extra.j2"].endswith(" line 2: No filter named 'nosuchfilter'.")


def test_a_render_error_in_an_override_names_the_line(tmp_path):
    (tmp_path / "mysite").mkdir()
    (tmp_path / "mysite" / "site.toml").write_text(dumps_toml(_example()))
    (tmp_path / "mysite" / "serve.j2").write_text(
        '{% extends "aimass:serve.j2" %}\n{% block setup %}\n\necho {{ job.name }}\n'
        "{% endblock %}\n"
    )
    result = check_site(str(tmp_path / "mysite"))
    assert [p.path for p in result.problems] == ["templates.serve.j2 (partition h100)"]
    assert f"{tmp_path / 'mysite' / 'serve.j2'} line 4)" in result.problems[0].message


@pytest.mark.parametrize("mpi", ["pmix", "pmix_v4", "pmix_v5", "pmi2", "cray_shasta", "none"])
def test_srun_mpi_takes_what_srun_lists(tmp_path, mpi):
    data = tomllib.loads((BUNDLED_SITES / "dev.toml").read_text())
    data["mpi"]["srun_mpi"] = mpi
    site, problems = parse_site(data, str(tmp_path / "dev.toml"))
    assert site is not None, problems
    script = render_request(site, JobRequest(name="m", command=["true"]))
    assert (f" --mpi={mpi}" in script) == (mpi != "none")


@pytest.mark.parametrize("mpi", ["PMIx", "pmix v4", "pmix;id", "$(x)", "", "pmi-2"])
def test_srun_mpi_refuses_what_is_not_a_plugin_name(mpi):
    data = tomllib.loads((BUNDLED_SITES / "dev.toml").read_text())
    data["mpi"]["srun_mpi"] = mpi
    site, problems = parse_site(data, "dev.toml")
    assert site is None and [p.path for p in problems] == ["mpi.srun_mpi"]


@pytest.mark.parametrize("option", ["--cleanenv", "-e", "--containall", "-C"])
def test_apptainer_options_that_clear_the_environment_are_refused(option):
    data = _example()
    data["container"]["options"] = ["--writable-tmpfs", option]
    site, problems = parse_site(data, "x.toml")
    assert site is None
    assert [str(p).split(":")[0] for p in problems] == ["container.options[1]"]
    assert "clear the environment the ranks need" in problems[0].message
    data = _example()
    data["partitions"]["h100"]["container"] = {"options": [option]}
    assert [p.path for p in parse_site(data, "x.toml")[1]] == [
        "partitions.h100.container.options[0]"
    ]


def test_partition_overrides_are_checked_like_the_site_tables():
    data = _example()
    data["partitions"]["cpu"]["container"] = {"runtime": "pyxis"}  # no image
    data["partitions"]["a100"]["modules"] = {"system": "none"}  # site modules still to load
    data["partitions"]["h100"]["env"] = {"1BAD": "x"}
    site, problems = parse_site(data, "x.toml")
    paths = [p.path for p in problems]
    assert site is None
    assert "partitions.cpu.container.image" in paths
    assert "partitions.a100.modules.system" in paths
    assert "partitions.h100.env" in paths or "partitions.h100.env.1BAD" in paths


def test_bundled_sites_pass_in_one_pass(capsys):
    for name in ("dev", "local", "example-hpc"):
        with pytest.raises(SystemExit) as exit_info:
            main(["site", "check", name, "--no-live"])
        out = capsys.readouterr().out
        assert exit_info.value.code in (0, None), out
        assert out.rstrip().endswith("templates render)")
