"""The search spec (TOML -> validated model, errors naming the field) and the pruning rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.search_spec import (
    format_command,
    load_search_spec,
    spec_from_record,
    train_overrides,
    train_param_key,
)
from aimass_hpc.hpo.pruning import SuccessiveHalving, read_history

COMMAND_LINE = (
    'command = ["{python}", "obj.py", "--x={x:.3f}", "--opt={opt}", "--m={momentum}", "{trial_id}"]'
)
GOOD = """
[search]
name = "quad"
sampler = "mcts"
direction = "maximize"
metric = "acc"
budget = 12
parallel = 3

[objective]
command = ["{python}", "obj.py", "--x={x:.3f}", "--opt={opt}", "--m={momentum}", "{trial_id}"]

[space]
x = {type = "float", low = 0.001, high = 1.0, log = true}
opt = {type = "categorical", choices = ["sgd", "adam"]}
momentum = {type = "float", low = 0.0, high = 0.9, when = {opt = ["sgd"]}}

[trial]
gpus_per_node = 1
time = "00:10:00"
"""


def write(tmp: Path, text: str, name: str = "search.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_a_good_spec_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_search_spec(write(tmp_path, GOOD))
    assert (spec.search.budget, spec.search.parallel, spec.search.sampler) == (12, 3, "mcts")
    assert spec.search.seed is None and spec.search.max_attempts == 3
    assert spec.trial.gpus_per_node == 1 and spec.trial.requeue
    assert not spec.pruning.enabled
    assert spec.objective.kind == "command"
    assert spec.workdir == tmp_path.resolve()
    assert spec.space_obj().names == ("x", "opt", "momentum")


def test_the_journaled_record_is_self_contained(tmp_path: Path) -> None:
    spec = load_search_spec(write(tmp_path, GOOD))
    record = spec.to_record()
    assert record["objective"]["workdir"] == str(tmp_path.resolve())
    again = spec_from_record(record)
    assert again.to_record() == record


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("budget = 12", "budget = 0"), "search.budget"),
        (("parallel = 3", "parallel = -1"), "search.parallel"),
        (('sampler = "mcts"', 'sampler = "bayes"'), "search.sampler"),
        (('direction = "maximize"', 'direction = "up"'), "search.direction"),
        (('name = "quad"', 'name = "my search"'), "search.name"),
        (
            ("budget = 12", "budget = 12\nbudjet = 3"),
            "search.budjet: unknown key (did you mean 'budget'?)",
        ),
        (("[trial]", "[trail]"), "trail: unknown table; did you mean 'trial'?"),
        (('time = "00:10:00"', 'time = "ten minutes"'), "trial.time"),
        (("gpus_per_node = 1", "gpus_per_node = -1"), "trial.gpus_per_node"),
        (("{trial_id}", "{y}"), "objective.command[5]: placeholder {y} is not a parameter"),
        (("--x={x:.3f}", "--x={x"), "objective.command[2]: bad placeholder"),
        (("low = 0.001", "low = 0.0"), "space.x: log scale needs low > 0"),
        (("opt = {", "trial_id = {type = 'int', low = 0, high = 1}\nopt = {"), "space.trial_id"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*edit, 1))
    with pytest.raises(InputError) as err:
        load_search_spec(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_objective_needs_exactly_one_of_command_or_train(tmp_path: Path) -> None:
    both = GOOD.replace("[objective]", '[objective]\ntrain = "t.toml"')
    with pytest.raises(InputError, match="exactly one of `command`"):
        load_search_spec(write(tmp_path, both))
    neither = GOOD.replace('command = ["{python}"', 'env = {A = "1"}\n#')
    with pytest.raises(InputError, match="exactly one of `command`"):
        load_search_spec(write(tmp_path, neither))


def test_a_command_string_is_refused_with_a_hint(tmp_path: Path) -> None:
    text = GOOD.replace(
        COMMAND_LINE,
        'command = "python obj.py"',
    )
    with pytest.raises(InputError, match="objective.command: give a list of arguments"):
        load_search_spec(write(tmp_path, text))


def test_missing_tables_and_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="space: required table is missing"):
        load_search_spec(write(tmp_path, GOOD.split("[space]")[0]))
    with pytest.raises(InputError, match="search spec not found"):
        load_search_spec(tmp_path / "nope.toml")
    with pytest.raises(InputError, match="not valid TOML"):
        load_search_spec(write(tmp_path, "[search\n"))
    text = GOOD.replace("[objective]\ncommand", '[objective]\ntrain = "missing.toml"\n#')
    with pytest.raises(InputError, match="objective.train: no such file"):
        load_search_spec(write(tmp_path, text))


def test_format_command_fills_placeholders() -> None:
    command = ["py", "--x={x:.2f}", "--opt={opt}", "--m={momentum}", "{trial_id}", "{{lit}}", "{b}"]
    sgd = format_command(
        command, {"x": 0.12345, "opt": "sgd", "momentum": 0.5, "b": True}, trial_id=7, python="p"
    )
    assert sgd == ["py", "--x=0.12", "--opt=sgd", "--m=0.5", "7", "{lit}", "true"]
    adam = format_command(command, {"x": 0.5, "opt": "adam", "b": False}, trial_id=8, python="p")
    assert adam[3] == "--m="  # inactive conditional parameter
    with pytest.raises(InputError, match=r"objective.command\[1\]: cannot format opt"):
        format_command(["py", "{opt:.2f}"], {"opt": "sgd"}, trial_id=0, python="p")


def test_training_parameters_map_onto_the_training_spec(tmp_path: Path) -> None:
    assert train_param_key("lr", has_task=True) == "train.lr"
    assert train_param_key("hidden", has_task=True) == "task.args.hidden"
    assert train_param_key("hidden", has_task=False) is None  # script specs: env only
    assert train_param_key("model.tags", has_task=True) == "model.tags"
    (tmp_path / "task_mod.py").write_text("def build(hidden=1):\n    pass\n")
    (tmp_path / "train.toml").write_text(
        '[task]\nref = "task_mod:build"\n[model]\nname = "m"\n[job]\ntime = "00:05:00"\n'
    )
    text = (
        GOOD.replace(
            COMMAND_LINE,
            'train = "train.toml"',
        )
        .replace("x = {", "lr = {")
        .replace("opt", "optimizer")
    )
    spec = load_search_spec(write(tmp_path, text))
    over = train_overrides(spec, {"lr": 0.1, "optimizer": "sgd", "momentum": 0.5})
    assert over == {
        "train.lr": 0.1,
        "train.optimizer": "sgd",
        "train.momentum": 0.5,
        "job.gpus_per_node": 1,  # [trial] keys the search spec sets override [job]
        "job.time": "00:10:00",
    }
    bad = text.replace("lr = {", '"train.lrr" = {')
    with pytest.raises(InputError, match="train.lrr"):
        load_search_spec(write(tmp_path, bad, "bad.toml"))


# ---------------------------------------------------------------------------------------------
# successive halving


def test_rungs_take_the_first_value_at_or_after_each_rung_step() -> None:
    sh = SuccessiveHalving(min_step=2, reduction_factor=3)
    assert [sh.rung_step(k) for k in range(3)] == [2, 6, 18]
    values = sh.rung_values([(1, 9.0), (2, 5.0), (3, 4.0), (7, 2.0), (20, 1.0)])
    assert values == {0: (2, 5.0), 1: (7, 2.0), 2: (20, 1.0)}


def test_no_pruning_until_enough_trials_reached_the_rung() -> None:
    sh = SuccessiveHalving(min_step=1, reduction_factor=3)
    histories = {0: [(1, 1.0)], 1: [(1, 9.0)]}
    assert sh.decide(1, histories) is None  # two trials at rung 0: too few to judge
    histories[2] = [(1, 2.0)]
    decision = sh.decide(1, histories)
    assert decision is not None
    assert (decision.rung, decision.step, decision.value, decision.rank, decision.peers) == (
        0,
        1,
        9.0,
        3,
        3,
    )
    assert "ranked 3 of 3" in decision.reason


def test_the_best_third_survives_and_each_rung_is_judged_once() -> None:
    sh = SuccessiveHalving(min_step=1, reduction_factor=3)
    histories = {i: [(1, float(i))] for i in range(6)}  # lower is better
    assert sh.decide(0, histories) is None
    assert sh.decide(1, histories) is None  # top ceil(6/3) = 2 kept
    assert sh.decide(2, histories) is not None
    assert sh.decide(2, histories) is None  # already judged at rung 0


def test_maximize_keeps_the_largest() -> None:
    sh = SuccessiveHalving(min_step=1, reduction_factor=2, direction="maximize")
    histories = {0: [(1, 0.9)], 1: [(1, 0.1)]}
    assert sh.decide(0, histories) is None
    assert sh.decide(1, histories) is not None


def test_history_reads_metrics_with_or_without_steps(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"loss": 3.0}\n{"loss": 2.0}\n{"kind": "epoch", "step": 10, "loss": 1.0}\n'
        '{"kind": "event", "event": "checkpoint", "step": 10}\n{"loss": "nan?"}\n'
    )
    assert read_history(tmp_path, "loss") == [(1, 3.0), (2, 2.0), (10, 1.0)]
    assert read_history(tmp_path / "missing", "loss") == []


# --------------------------------------------------------------------------- issue 10


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('name = "quad"', 'name = "quad\\n"'), "search.name"),
        (('metric = "acc"', 'metric = "acc\\u0000"'), "search.metric"),
        (('metric = "acc"', 'metric = "a\\rcc"'), "search.metric"),
        (('"obj.py"', '"obj\\u0000.py"'), "objective.command[1]"),
        (("[trial]", '[objective.env]\n"K\\n" = "v"\n[trial]'), "objective.env['K\\n']"),
        (("[trial]", '[objective.env]\nK = "\\r"\n[trial]'), "objective.env.K"),
        (("gpus_per_node = 1", 'gpus_per_node = 1\npartition = "p\\n"'), "trial.partition"),
        (("gpus_per_node = 1", 'gpus_per_node = 1\nconstraint = "f\\n"'), "trial.constraint"),
        (('"sgd", "adam"', '"sgd", "ad\\u0000am"'), "space.opt.choices[1]"),
        (('"{trial_id}"', '"{trial_id"'), "objective.command[5]"),
    ],
)
def test_hostile_values_are_refused_naming_the_key(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(InputError) as err:
        load_search_spec(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)
