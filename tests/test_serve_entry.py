"""The job entry point: options from the job environment and spec.json, crash restarts,
models from the repository, recipes without an input shape.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aimass_hpc.common.errors import InputError
from aimass_hpc.serve import Client, toymodels
from aimass_hpc.serve.__main__ import parse_args, resolve_options
from aimass_hpc.serve.endpoints import EndpointState
from aimass_hpc.serve.local import LocalReplica
from aimass_hpc.serve.model_loader import load_from_files, load_from_repository, parse_recipe
from aimass_hpc.serve.server import bind_socket, signal_number


def test_options_come_from_cli_then_spec_then_job_env(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    env = {
        "AIMASS_RUN_DIR": str(run),
        "AIMASS_SERVE_MODEL": "mnist@prod",
        "AIMASS_NODE_ADDR": "10.1.2.3",
        "AIMASS_SERVE_BIND": "node",
        "AIMASS_PORT_MIN": "21000",
        "AIMASS_PORT_MAX": "21010",
        "AIMASS_PREEMPT_SIGNAL": "USR2",
        "AIMASS_MAX_RESTARTS": "2",
    }
    opts = resolve_options(parse_args([]), env)
    assert opts["run_dir"] == run and opts["model"] == "mnist@prod"
    assert opts["host"] == "10.1.2.3" and opts["port_range"] == (21000, 21010)
    assert opts["warning_signal"] == "USR2" and opts["restarts"] == 2
    spec = {"spec": {"serve": {"repo": "/models", "max_batch_size": 8, "host": None}}}
    (run / "spec.json").write_text(json.dumps(spec))
    opts = resolve_options(parse_args(["--max-batch-size", "4"]), env)
    assert opts["repo"] == "/models" and opts["max_batch_size"] == 4
    assert opts["host"] == "10.1.2.3"  # a null in spec.json does not hide the environment
    assert resolve_options(parse_args([]), {**env, "AIMASS_SERVE_BIND": "any"})["host"] == (
        "0.0.0.0"
    )
    with pytest.raises(SystemExit):
        resolve_options(parse_args([]), {})


def test_port_range_and_signal_names() -> None:
    sock = bind_socket("127.0.0.1", 0, (23000, 23100))
    try:
        assert 23000 <= sock.getsockname()[1] <= 23100
    finally:
        sock.close()
    assert signal_number("USR1") == signal_number("SIGUSR1") == signal.SIGUSR1
    assert signal_number("12") == 12 and signal_number(None) == signal.SIGUSR1


def test_recipe_without_input_shape_is_inferred(tmp_path: Path) -> None:
    rec = toymodels.recipe(**{"in_features": 5, "hidden": 4, "out_features": 2})
    del rec["input_shape"]
    assert parse_recipe(rec).spec.shape is None
    model = load_from_files(rec, None, name="m")
    assert model.spec.shape == (5,)
    cnn = toymodels.recipe("aimass_hpc.serve.toymodels:cnn", width=4)
    del cnn["input_shape"]
    assert load_from_files(cnn, None, name="c").spec.shape == (3, None, None)
    with pytest.raises(InputError, match="input_shape"):
        parse_recipe({**rec, "input_shape": [0]})
    with pytest.raises(InputError, match="factory"):
        parse_recipe({"kwargs": {}})


def test_recipe_pythonpath_finds_user_code(tmp_path: Path) -> None:
    (tmp_path / "my_models_xyz.py").write_text(
        "import torch\ndef net(k=3):\n    return torch.nn.Linear(k, 1)\n"
    )
    rec = {"factory": "my_models_xyz:net", "kwargs": {"k": 3}, "pythonpath": [str(tmp_path)]}
    model = load_from_files(rec, None, name="u")
    assert model.spec.shape == (3,) and model.warm_up().shape == (1, 1)


def test_model_from_the_repository(tmp_path: Path) -> None:
    from aimass_hpc.repo import ModelRepository

    kwargs = {"in_features": 4, "hidden": 8, "out_features": 3}
    torch.manual_seed(0)
    net = toymodels.mlp(**kwargs).eval()
    repo = ModelRepository(tmp_path / "repo")
    v = repo.save("toy", net.state_dict(), recipe=toymodels.recipe(**kwargs))
    repo.promote("toy", v.number, "prod")
    served = load_from_repository(tmp_path / "repo", "toy@prod")
    assert (served.name, served.version) == ("toy", str(v.number))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served.forward(x), want, rtol=1e-6, atol=1e-6)


def test_crashed_replica_is_restarted(tmp_path: Path) -> None:
    rep = LocalReplica(
        tmp_path / "run",
        recipe=toymodels.recipe(in_features=4, hidden=4, out_features=1),
        name="crashy",
        extra_args=["--restarts", "1", "--drain-grace-s", "0.2"],
    )
    try:
        first = rep.wait_ready()
        assert first.pid != rep.proc.pid  # a supervised child serves
        os.kill(first.pid, signal.SIGKILL)  # the replica crashes
        deadline = time.monotonic() + 60
        while True:
            rec = rep.record()
            if rec and rec.state == EndpointState.READY and rec.pid != first.pid:
                break
            assert time.monotonic() < deadline, rep.log_text()
            time.sleep(0.1)
        with Client(rec.url, token=rep.token) as client:
            assert client.predict(np.zeros((1, 4))).shape == (1, 1)
        os.kill(rec.pid, signal.SIGKILL)  # a second crash: no restarts left
        assert rep.proc.wait(30) == 128 + signal.SIGKILL
    finally:
        rep.stop()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "No such file or directory"), ("{bad", "not JSON: Expecting property name")],
)
def test_an_unreadable_recipe_is_one_line(tmp_path: Path, content: str | None, reason: str) -> None:
    import subprocess
    import sys

    recipe = tmp_path / "recipe.json"
    if content is not None:
        recipe.write_text(content)
    args = [sys.executable, "-m", "aimass_hpc.serve", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([*args, "--recipe", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"aimass serve: error: --recipe {recipe}: {reason}")
