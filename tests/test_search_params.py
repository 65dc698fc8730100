"""Search parameters as ``{placeholders}`` in a training spec's ``[script]`` (issue 12, item 3),
and the per-search best alias (item 10): unit level, no cluster.

The cluster side (placeholders reaching a real job's argv, two searches over one model) is
tests/test_search_params_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _sitefixtures import write_site

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.search_spec import format_command, load_search_spec
from aimass_hpc.config.train_spec import (
    fill_placeholders,
    load_train_spec,
    placeholder_value,
    plan_training,
)
from aimass_hpc.launch.search_driver import (
    SearchDir,
    best_alias,
    build_trial,
    promote_best,
)
from aimass_hpc.launch.submit import submit

HOSTILE = "a b'\"$(touch PWNED);`id` \\ {x} %s\n--lr=9"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _train_spec(tmp: Path, args: list[str], *, model: str = "pm") -> Path:
    (tmp / "trial.py").write_text("import sys\nprint(sys.argv[1:])\n")
    path = tmp / "train.toml"
    path.write_text(
        f"""
name = "pt"
[script]
path = "trial.py"
args = {json.dumps(args)}
[model]
name = "{model}"
[job]
nodes = 1
tasks_per_node = 1
time = "00:03:00"
"""
    )
    return path


def _search_spec(tmp: Path, *, name: str = "sp", space: str | None = None) -> Path:
    path = tmp / "search.toml"
    path.write_text(
        f"""
[search]
name = "{name}"
sampler = "random"
seed = 3
budget = 2
parallel = 2
[objective]
train = "train.toml"
[space]
{space or 'lr = {type = "float", low = 1e-5, high = 1e-1, log = true}'}
n = {{type = "int", low = 1, high = 9}}
flag = {{type = "categorical", choices = [true, false]}}
tag = {{type = "categorical", choices = {json.dumps([HOSTILE])}}}
"""
    )
    return path


# --------------------------------------------------------------------------- the one rule


def test_values_are_spelled_so_they_read_back() -> None:
    for value in (0.1, 1e-05, 3.0000000000000004, 1e300, -2.5):
        text = placeholder_value(value)
        assert float(text) == value and text == repr(value)
    assert placeholder_value(7) == "7" and int(placeholder_value(2**40)) == 2**40
    assert placeholder_value(np.float64(0.1)) == "0.1"  # never "np.float64(0.1)"
    assert placeholder_value(np.int64(4)) == "4"
    assert placeholder_value(True) == "true" and placeholder_value(np.bool_(False)) == "false"
    assert placeholder_value("adam") == "adam"


def test_fill_placeholders_one_word_per_argument() -> None:
    values = {"lr": 1e-05, "n": 3, "flag": True, "tag": HOSTILE, "opt": "sgd"}
    args = ["--lr={lr}", "{n}", "--flag={flag}", "{tag}", "{{literal}}", "{lr:.2g}", "x{opt}y"]
    out = fill_placeholders(args, values, field="script.args")
    assert out == ["--lr=1e-05", "3", "--flag=true", HOSTILE, "{literal}", "1e-05", "xsgdy"]
    # a value holding braces is never expanded again
    assert fill_placeholders(["{tag}"], {"tag": "{n}"}, field="f") == ["{n}"]


def test_fill_placeholders_refuses_what_it_cannot_fill() -> None:
    with pytest.raises(InputError, match=r"^script.args\[1\]: placeholder \{nope\} has no value"):
        fill_placeholders(["ok", "--x={nope}"], {"lr": 1}, field="script.args")
    with pytest.raises(InputError, match=r"^script.args\[0\]: bad placeholder"):
        fill_placeholders(["{lr"], {"lr": 1}, field="script.args")
    # braces that are the script's own pass through: shell, brace expansion, awk, positional
    own = ["${HOME}", "${A:-${B}}", "{a,b}", "{print $1}", "{0}", "f() { x; }"]
    assert fill_placeholders(own, {}, field="script.command") == own


def test_format_command_keeps_its_behaviour() -> None:
    out = format_command(["{python}", "{x}", "{m}", "{trial_id}"], {"x": 0.25}, trial_id=4,
                         python="py")  # fmt: skip
    assert out == ["py", "0.25", "", "4"]  # {m}: an inactive conditional parameter


# --------------------------------------------------------------------------- plain aimass train


def test_plain_train_refuses_a_placeholder_naming_the_field(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    spec = load_train_spec(_train_spec(tmp_path, ["--epochs", "3", "--lr={lr}"]))
    with pytest.raises(InputError, match=r"^script.args\[2\]: placeholder \{lr\} has no value"):
        plan_training(spec, site)
    out = _cli("train", str(tmp_path / "train.toml"), "--site", str(site.source), "--dry-run")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "script.args[2]: placeholder {lr}" in lines[0], out.stderr
    assert "aimass search" in lines[0] and "{{" in lines[0]


def test_plain_train_reads_double_braces_as_literal_braces(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    spec = load_train_spec(_train_spec(tmp_path, ['{{"a": 1}}']))
    plan = plan_training(spec, site)
    assert plan.config.script_args == ['{"a": 1}']
    assert plan.request.command[-1] == '{"a": 1}'


# --------------------------------------------------------------------------- search specs


def test_unknown_placeholder_is_refused_when_the_search_spec_loads(tmp_path: Path) -> None:
    _train_spec(tmp_path, ["--lr={lrr}"])
    with pytest.raises(InputError) as err:
        load_search_spec(_search_spec(tmp_path))
    text = str(err.value)
    assert "objective.train: train.toml: script.args[0]: placeholder {lrr}" in text
    assert "did you mean {lr}?" in text and "\n" not in text


def test_trial_fills_script_args_and_the_script_stays_safe(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    _train_spec(tmp_path, ["--lr={lr}", "--n={n}", "{flag}", "{tag}", "{trial_id}", "{{x}}"])
    spec = load_search_spec(_search_spec(tmp_path))
    sdir = SearchDir(tmp_path / "search")
    params = {"lr": 0.001, "n": 5, "flag": False, "tag": HOSTILE}
    request, files = build_trial(spec, site, sdir, 3, params)
    args = ["--lr=0.001", "--n=5", "false", HOSTILE, "3", "{x}"]
    assert request.command[-6:] == args
    assert json.loads(files["train.json"])["script_args"] == args
    preview = submit(site, request, dry_run=True, runs_root=sdir.trials_root)
    check = subprocess.run(["bash", "-n"], input=preview.script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert "PWNED" in preview.script  # present, but only inside a quoted word


def test_dry_run_refuses_an_unknown_placeholder_in_one_line(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    _train_spec(tmp_path, ["--lr={learning_rate}"])
    spec = _search_spec(tmp_path)
    out = _cli("search", str(spec), "--site", str(site.source), "--dry-run")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "script.args[0]: placeholder {learning_rate} is not a parameter of [space]" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("journal.jsonl"))


# --------------------------------------------------------------------------- best aliases


def test_best_alias_names_are_valid_aliases() -> None:
    from aimass_hpc.common.names import ALIAS_NAME

    for name in ("quad", "a", "x" * 80, "9lives.v2_final-run"):
        assert ALIAS_NAME.matches(best_alias(name))


def test_each_search_keeps_its_own_best_alias(tmp_path: Path) -> None:
    from aimass_hpc.repo import ModelRepository

    repo = ModelRepository(tmp_path / "models")
    for i in range(4):
        repo.save("m", {"w": np.full(3, float(i))})
    a1 = promote_best(repo.root, "m:1", "alpha")
    assert a1["aliases"] == ["best-alpha", "best"] and a1["previous"] is None
    b = promote_best(repo.root, "m:2", "beta")
    assert b["aliases"] == ["best-beta"] and b["best_kept"] == 1
    assert repo.aliases("m") == {"best-alpha": 1, "best": 1, "best-beta": 2}
    # the same search name again: its own alias moves (and says from where), best follows it
    a2 = promote_best(repo.root, "m:3", "alpha")
    assert a2["aliases"] == ["best-alpha", "best"] and a2["previous"] == 1
    assert repo.aliases("m") == {"best-alpha": 3, "best": 3, "best-beta": 2}
    # the old call (no search name) still sets the plain alias
    assert promote_best(repo.root, "m:4")["alias"] == "best"
