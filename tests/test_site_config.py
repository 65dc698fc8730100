"""Site configs: every bundled one validates; broken ones name the key path and give a hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import dumps_toml, site_data, write_site

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.config.site import (
    BUNDLED_SITES,
    list_sites,
    load_site,
    parse_mem_mb,
    parse_site,
    validate_site_file,
)

BUNDLED = sorted(p.stem for p in BUNDLED_SITES.glob("*.toml"))


def test_the_required_sites_are_bundled():
    assert {"dev", "local", "example-hpc"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_site_validates(name):
    assert validate_site_file(BUNDLED_SITES / f"{name}.toml") == []
    site = load_site(name)
    assert site.name == name
    assert site.partition(None) in site.partitions.values()


def test_production_example_is_realistic():
    site = load_site("example-hpc")
    gpu_counts = {p.gpus_per_node for p in site.partitions.values()}
    assert {8, 4, 0} <= gpu_counts
    assert site.account and site.qos
    assert site.modules.system == "lmod" and site.modules.load
    assert site.container.runtime == "apptainer" and site.container.image
    assert site.filesystems.lustre is not None
    assert any(k.startswith("NCCL_") for k in site.env)


def test_dev_site_matches_the_local_cluster():
    site = load_site("dev")
    debug = site.partition("debug")
    assert debug.default and debug.gpus_per_node == 4 and debug.gpu_type == "fake"
    assert debug.gpu_gres(2) == "gpu:fake:2"
    assert site.mpi.launcher == "srun" and site.mpi.srun_mpi == "pmix"
    assert site.env["OMPI_MCA_btl"] == "self,tcp"
    assert site.runs_root == Path("~/aimass-dev/runs").expanduser()


def _problems(tmp_path: Path, data: dict) -> list:
    path = tmp_path / "broken.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    return validate_site_file(path)


def _paths(problems) -> dict[str, object]:
    return {p.path: p for p in problems}


def test_missing_keys_are_named(tmp_path):
    data = site_data("dev")
    del data["name"]
    del data["filesystems"]["runs"]
    found = _paths(_problems(tmp_path, data))
    assert set(found) == {"name", "filesystems.runs"}
    assert "missing" in found["filesystems.runs"].message


def test_wrong_types_and_negative_gpus(tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["gpus_per_node"] = -1
    data["partitions"]["debug"]["cpus_per_node"] = "eight"
    data["preemption"]["grace_seconds"] = "soon"
    found = _paths(_problems(tmp_path, data))
    assert {
        "partitions.debug.gpus_per_node",
        "partitions.debug.cpus_per_node",
        "preemption.grace_seconds",
    } <= set(found)
    assert "-1" in found["partitions.debug.gpus_per_node"].hint


def test_bad_time_strings(tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["max_time"] = "1:75"
    data["partitions"]["debug"]["default_time"] = "soon"
    found = _paths(_problems(tmp_path, data))
    assert "above 59" in found["partitions.debug.max_time"].message
    assert "not a Slurm time" in found["partitions.debug.default_time"].message


def test_misspelt_keys_get_a_did_you_mean(tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["defualt"] = True
    data["mpi"]["lancher"] = "srun"
    data["filesytems"] = {"runs": "/tmp"}
    found = _paths(_problems(tmp_path, data))
    assert found["partitions.debug.defualt"].hint == "did you mean 'default'?"
    assert found["mpi.lancher"].hint == "did you mean 'launcher'?"
    assert found["filesytems"].hint == "did you mean 'filesystems'?"


def test_unknown_partition_references(tmp_path):
    data = site_data("dev")
    data["training"]["partition"] = "debgu"
    data["serving"]["partition"] = "gpu"
    found = _paths(_problems(tmp_path, data))
    assert found["training.partition"].hint == "did you mean 'debug'?"
    assert "known: debug" in found["serving.partition"].hint


def test_literal_choices_and_cross_checks(tmp_path):
    data = site_data("dev")
    data["scheduler"] = "pbs"
    # srun_mpi is a pattern (what `srun --mpi=list` prints), so only a malformed name fails.
    data["mpi"]["srun_mpi"] = "pmix v4"
    found = _paths(_problems(tmp_path, data))
    assert {"scheduler", "mpi.srun_mpi"} <= set(found)
    data = site_data("dev")
    data["container"] = {"runtime": "apptainer"}
    data["partitions"]["other"] = {"default": True, "cpus_per_node": 2, "max_time": "1:00:00"}
    found = _paths(_problems(tmp_path, data))
    assert "container.image" in found and "partitions" in found


def test_every_problem_is_reported_at_once(tmp_path):
    data = site_data("example-hpc")
    data["partitions"]["h100"]["gpus_per_node"] = -8
    data["partitions"]["a100"]["max_time"] = "three days"
    data["preemption"]["signal"] = "SIGFOO"
    data["env"]["NOT A NAME"] = "x"
    data["serving"]["port_range"] = [30000, 20]
    assert len(_problems(tmp_path, data)) == 5


def test_not_toml_is_one_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = [\n", encoding="utf-8")
    (problem,) = validate_site_file(path)
    assert "not valid TOML" in problem.message


def test_load_site_raises_one_line_with_a_count(tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["gpus_per_node"] = -1
    data["mpi"]["lancher"] = "srun"
    path = tmp_path / "broken.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_site(str(path))
    message = str(err.value)
    assert "\n" not in message and "+1 more" in message and "aimass site check" in message


def test_lookup_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    user_sites = home / ".config" / "aimass" / "sites"
    user_sites.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    # A user site shadows the bundled one of the same name.
    data = site_data("local")
    data["description"] = "mine"
    (user_sites / "local.toml").write_text(dumps_toml(data), encoding="utf-8")
    assert load_site("local").description == "mine"
    # The directory form NAME/site.toml, with templates beside it.
    (user_sites / "dirform").mkdir()
    data["name"] = "dirform"
    (user_sites / "dirform" / "site.toml").write_text(dumps_toml(data), encoding="utf-8")
    site = load_site("dirform")
    assert site.template_dir == user_sites / "dirform"
    assert ("dirform", user_sites / "dirform" / "site.toml") in list_sites()
    # $AIMASS_SITE is used when no ref is given; an explicit path beats it.
    monkeypatch.setenv("AIMASS_SITE", "dev")
    assert load_site(None).name == "dev"
    assert load_site(str(BUNDLED_SITES / "example-hpc.toml")).name == "example-hpc"
    monkeypatch.delenv("AIMASS_SITE")
    with pytest.raises(InputError, match="no site given"):
        load_site(None)


def test_unknown_site_suggests_a_name():
    with pytest.raises(NotFoundError, match="did you mean 'example-hpc'"):
        load_site("example-hcp")
    with pytest.raises(NotFoundError, match="site file not found"):
        load_site("/nonexistent/site.toml")


def test_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_TEST_ROOT", str(tmp_path))
    site = write_site(tmp_path, "dev", runs="$AIMASS_TEST_ROOT/runs", models="~/models")
    assert site.runs_root == tmp_path / "runs"
    assert site.models_root == Path.home() / "models"
    data = site_data("dev")
    data["filesystems"]["runs"] = "${AIMASS_SURELY_UNSET_VAR}/runs"
    (problem,) = _problems(tmp_path, data)
    assert problem.path == "filesystems.runs" and "AIMASS_SURELY_UNSET_VAR" in problem.message


def test_partition_helper_names_the_field():
    site = load_site("example-hpc")
    assert site.partition(None).name == "a100"
    assert site.partition("h100").gpu_gres(8) == "gpu:h100:8"
    with pytest.raises(InputError, match="partition: unknown partition 'h10'.*did you mean 'h100'"):
        site.partition("h10")


@pytest.mark.parametrize(
    ("text", "mb"),
    [("16000", 16000), ("64G", 65536), ("1T", 1048576), ("512GB", 524288), (100, 100)],
)
def test_memory_sizes(text, mb):
    assert parse_mem_mb(text) == mb


def test_bad_memory_size():
    with pytest.raises(ValueError):
        parse_mem_mb("lots")


@pytest.mark.parametrize("text", ["16G\n", " 16G", "16G ", "16 G", "\uff11\uff16G"])
def test_memory_sizes_match_the_whole_string(text):
    with pytest.raises(ValueError):
        parse_mem_mb(text)


# --------------------------------------------------------------------------- hostile values
# Issue 10: names are matched as whole strings (a trailing newline used to pass `re.match(...$)`),
# NUL/CR are refused in every string, and every problem names its own key.


def _debug(data: dict) -> dict:
    return data["partitions"]["debug"]


def _site_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "site", "check", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda d: d.update(name="dev\n"), "name"),
        (lambda d: _debug(d).update(gpu_type="fake\n"), "partitions.debug.gpu_type"),
        (lambda d: _debug(d).update(gres_name="gpu\n"), "partitions.debug.gres_name"),
        (lambda d: d["preemption"].update(signal="USR1\n"), "preemption.signal"),
        (lambda d: d["preemption"].update(signal="\u0661"), "preemption.signal"),  # Arabic 1
        (lambda d: d.update(account="acct\n"), "account"),
        (lambda d: d.update(constraints=["feat\n"]), "constraints[0]"),
    ],
)
def test_site_check_names_the_key_with_the_newline(tmp_path, edit, path):
    data = site_data("dev")
    edit(data)
    target = tmp_path / "site.toml"
    target.write_text(dumps_toml(data), encoding="utf-8")
    proc = _site_check(target)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    problems = json.loads(proc.stdout)
    assert [p["path"] for p in problems] == [path]
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_site_name_with_a_newline_is_refused_before_rendering(tmp_path):
    data = site_data("local")
    data["name"] = "local\n"
    site, problems = parse_site(data)
    assert site is None
    assert [p.path for p in problems] == ["name"]
    assert "\n" not in str(problems[0])


def test_a_site_env_name_ending_in_a_newline_is_refused(tmp_path):
    data = site_data("dev")
    data["env"] = {"FOO\n": "x", "OK": "y"}
    site, problems = parse_site(data)
    assert site is None
    assert [p.path for p in problems] == ["env['FOO\\n']"]
    assert "environment variable name" in problems[0].message
    path = tmp_path / "site.toml"  # the bundled file with one more line under [env]
    text = (BUNDLED_SITES / "dev.toml").read_text(encoding="utf-8")
    path.write_text(text.replace("[env]\n", '[env]\n"FOO\\n" = "x"\n', 1), encoding="utf-8")
    with pytest.raises(InputError, match=r"env\['FOO\\n'\]"):
        load_site(str(path))


@pytest.mark.parametrize("bad", ["a\x00b", "a\rb", "crlf\r\n"])
@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda d, v: d.update(python=v), "python"),
        (lambda d, v: d.update(description=v), "description"),
        (lambda d, v: d.update(env={"X": v}), "env.X"),
        (lambda d, v: d.update(modules={"system": "lmod", "load": ["ok", v]}), "modules.load[1]"),
        (lambda d, v: d["filesystems"].update(scratch=v), "filesystems.scratch"),
        (lambda d, v: d["mpi"].update(mpirun_args=[v]), "mpi.mpirun_args[0]"),
    ],
)
def test_nul_and_cr_are_refused_in_site_strings(edit, path, bad):
    data = site_data("dev")
    edit(data, bad)
    site, problems = parse_site(data)
    assert site is None
    assert [p.path for p in problems] == [path]
    assert "NUL" in problems[0].message or "CR" in problems[0].message


def test_a_newline_in_a_free_text_site_value_is_fine():
    data = site_data("dev")
    data["env"] = {"X": "two\nlines"}
    site, problems = parse_site(data)
    assert problems == [] and site is not None
    assert site.env["X"] == "two\nlines"


def test_odd_keys_are_shown_quoted_on_one_line(tmp_path):
    data = site_data("dev")
    data["preemption"]["bad\nkey"] = 1
    problems = _problems(tmp_path, data)
    assert [p.path for p in problems] == ["preemption['bad\\nkey']"]
    assert "\n" not in str(problems[0])
