"""``aimass models ...`` through the real entry point (``aimass_hpc.cli.main``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from aimass_hpc.cli import main
from aimass_hpc.repo import ModelRepository

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    for i in range(3):
        repo.save(
            "net",
            {"fc.weight": torch.full((64, 64), float(i)), "fc.bias": torch.zeros(64)},
            metrics={"acc": 0.5 + i / 10},
            tags=["cv"] if i else ["cv", "first"],
            flops_per_sample=(i + 1) * 1e9,
            peak_memory_bytes=(i + 1) << 30,
        )
    repo.save("other", {"w": torch.ones(1)}, description="tiny")
    return repo


@pytest.fixture
def cli(repo, capsys):  # noqa: ANN001, ANN201
    def run(*args: str, repo_opt: bool = True) -> tuple[int, str, str]:
        argv = ["models", "--repo", str(repo.root), *args] if repo_opt else ["models", *args]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return run


def test_ls_models_and_versions(cli) -> None:
    code, out, _ = cli("ls")
    assert code == 0 and "net" in out and "net:3" in out and "other" in out
    code, out, _ = cli("ls", "--json")
    rows = json.loads(out)
    assert [(r["name"], r["versions"], r["latest"]) for r in rows] == [
        ("net", 3, "net:3"),
        ("other", 1, "other:1"),
    ]
    code, out, _ = cli("ls", "net", "--json")
    assert [v["ref"] for v in json.loads(out)] == ["net:1", "net:2", "net:3"]
    code, out, _ = cli("ls", "net")
    assert code == 0 and "acc=0.7" in out


def test_show_with_tensors(cli) -> None:
    code, out, _ = cli("show", "net:2", "--tensors")
    assert code == 0 and "fc.weight" in out and "float32" in out and "64×64" in out
    code, out, _ = cli("show", "net", "--json", "--tensors")
    doc = json.loads(out)
    assert doc["ref"] == "net:3" and doc["param_count"] == 64 * 64 + 64
    assert [t["name"] for t in doc["tensors"]] == ["model/fc.weight", "model/fc.bias"]


def test_search_filters(cli) -> None:
    code, out, _ = cli("search", "--metric", "acc=0.55:", "--json")
    assert [v["ref"] for v in json.loads(out)] == ["net:2", "net:3"]
    code, out, _ = cli("search", "--flops", ":2G", "--memory", "1.5GiB:", "--json")
    assert [v["ref"] for v in json.loads(out)] == ["net:2"]
    # Issue 11: memory units are binary as in Slurm (2G = 2GB = 2GiB = 2^31 bytes, which net:2
    # peaks at exactly), FLOPs decimal (2G = 2e9, net:2's count).
    for two_g in ("2G", "2GB", "2GiB", "2g"):
        code, out, _ = cli("search", "--memory", f"{two_g}:{two_g}", "--json")
        assert [v["ref"] for v in json.loads(out)] == ["net:2"], two_g
    code, out, _ = cli("search", "--flops", "2G", "--json")
    assert [v["ref"] for v in json.loads(out)] == ["net:2"]
    code, out, _ = cli("search", "--metric", "acc=-1:0.55", "--json")
    assert code == 0 and [v["ref"] for v in json.loads(out)] == ["net:1"]
    code, out, _ = cli("search", "--tag", "first", "--name", "n*", "--since", "1d", "--json")
    assert [v["ref"] for v in json.loads(out)] == ["net:1"]
    code, out, _ = cli("search", "--tag", "cv")
    assert code == 0 and "3 matching version(s)" in out
    code, _, err = cli("search", "--metric", "acc")
    assert (
        code == 2
        and err == "aimass: error: invalid --metric 'acc': expected NAME=LO:HI, e.g. acc=0.9:\n"
    )


def test_promote_rollback_aliases_and_rm(cli) -> None:
    assert cli("promote", "net:1", "prod")[1] == "net@prod -> net:1\n"
    assert cli("promote", "net:3", "prod")[1] == "net@prod -> net:3 (was net:1)\n"
    code, out, _ = cli("aliases", "net", "--json")
    assert json.loads(out) == {"prod": 3}
    code, out, _ = cli("aliases", "net@prod", "--json")
    assert [e["version"] for e in json.loads(out)] == [1, 3]
    assert cli("rollback", "net@prod")[1] == "net@prod -> net:1 (was net:3)\n"
    code, _, err = cli("rm", "net:1", "--yes")
    assert code == 4 and "net:1 is the target of alias prod" in err
    code, out, _ = cli("rm", "net:2", "--yes")
    assert code == 0 and out == "deleted net:2\n"
    code, _, err = cli("rm", "net", "--yes")
    assert code == 2 and "say which version of net to delete" in err
    code, out, _ = cli("ls", "net", "--json")
    assert [(v["ref"], v["aliases"]) for v in json.loads(out)] == [
        ("net:1", ["prod"]),
        ("net:3", []),
    ]


def test_verify_reports_corruption_with_exit_6(cli, repo) -> None:
    code, out, _ = cli("verify")
    assert code == 0 and "net:3: ok" in out and "other:1: ok" in out
    path = repo.get("net:2").path
    with open(path, "r+b") as fh:  # flip a byte in the middle of the packed tensors
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            off = f["aimass/packed"].id.get_offset()
        fh.seek(off + 100)
        fh.write(b"\x99")
    code, out, err = cli("verify", "net", "--all")
    assert code == 6
    assert "tensor 'model/fc.weight': checksum mismatch" in err
    assert err.count("\n") == 1 and err.startswith("aimass: error: net:2:")
    code, out, _ = cli("verify", "net:2", "--json")
    assert code == 6 and json.loads(out.split("aimass:")[0])[0]["ok"] is False


def test_export_import_and_gc(cli, tmp_path) -> None:
    target = tmp_path / "net.safetensors"
    code, out, _ = cli("export", "net@latest", str(target))
    assert code == 0 and target.exists() and "exported net:3" in out
    code, _, err = cli("export", "net", str(target))
    assert code == 4 and "exists" in err
    code, out, _ = cli(
        "export", "net", str(tmp_path / "a.h5"), "--format", "hdf5", "--compression", "gzip"
    )
    assert code == 0
    code, out, _ = cli("import", str(target), "imported", "--tag", "ext", "--metric", "acc=0.9")
    assert code == 0 and out == f"imported {target} as imported:1\n"
    code, out, _ = cli("show", "imported", "--json")
    assert json.loads(out)["metrics"] == {"acc": 0.9}
    code, out, _ = cli("gc", "--grace", "0", "--json")
    assert code == 0 and json.loads(out)["removed"] == []


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["show", "nope"], 3, "aimass: error: unknown model 'nope' in "),
        (["show", "net:9"], 3, "aimass: error: model net has no version 9 (latest is net:3)\n"),
        (["show", "net@prod"], 3, "aimass: error: model net has no alias 'prod' (aliases: none)\n"),
        (["show", "net:x"], 2, "aimass: error: invalid version 'x' in model reference 'net:x'"),
        (["rollback", "net"], 2, "aimass: error: rollback needs NAME@ALIAS, got 'net'\n"),
        (["search", "--memory", "lots"], 2, "aimass: error: invalid --memory 'lots'"),
        (["search", "--flops", ":5GiB"], 2, "aimass: error: invalid --flops '5GiB'"),
        (["search", "--memory", "8G\n"], 2, "aimass: error: invalid --memory '8G\\n'"),
    ],
)
def test_user_errors_are_one_line_with_exit_codes(cli, args, exit_code, message) -> None:
    code, out, err = cli(*args)
    assert code == exit_code
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_repository_location_from_env_and_missing(cli, repo, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AIMASS_REPO", str(repo.root))
    code, out, _ = cli("ls", "--json", repo_opt=False)
    assert code == 0 and len(json.loads(out)) == 2
    monkeypatch.setenv("AIMASS_REPO", str(tmp_path / "missing"))
    code, _, err = cli("ls", repo_opt=False)
    assert code == 3 and err == f"aimass: error: no model repository at {tmp_path / 'missing'}\n"


def _python() -> list[str]:
    return [sys.executable, "-m", "aimass_hpc"]


def test_subprocess_entry_point(repo) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [*_python(), "models", "--repo", str(repo.root), "ls", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2
    bad = subprocess.run(
        [*_python(), "models", "--repo", str(repo.root), "show", "zzz"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert bad.returncode == 3 and bad.stderr.startswith("aimass: error: unknown model 'zzz'")


def _cli_as_other_user(argv: list[str], err_path: Path) -> None:
    """Forked child: become a user without write access (nobody, if we are root), run the CLI."""
    err = open(err_path, "w")  # noqa: SIM115 - opened before dropping privileges
    sys.stdout = sys.stderr = err
    # Import what the command loads lazily while we may still read the checkout: a clone made
    # in a private directory (mktemp -d is mode 0700) is unreadable to nobody.
    import aimass_hpc.cli.models  # noqa: F401
    import aimass_hpc.repo.portable  # noqa: F401

    torch.load(argv[-2], map_location="cpu", weights_only=True)
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    try:
        main(argv)
    finally:
        err.flush()


def test_permission_denied_is_a_clear_error(tmp_path: Path) -> None:
    """A user who may read but not write the repository gets one line, and nothing is lost."""
    shared = Path(tempfile.mkdtemp(prefix="aimass-perm-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        repo = ModelRepository(shared / "repo")
        repo.save("net", {"w": torch.ones(2)})
        src = shared / "w.pt"
        torch.save({"w": torch.zeros(2)}, src)
        for p in [repo.root, *repo.root.rglob("*"), src]:
            read_only = 0o555 if os.geteuid() else 0o755  # root is made nobody instead
            p.chmod(read_only if p.is_dir() else 0o644)
        err = tmp_path / "stderr.txt"
        argv = ["models", "--repo", str(repo.root), "import", str(src), "net"]
        child = multiprocessing.get_context("fork").Process(
            target=_cli_as_other_user, args=(argv, err)
        )
        child.start()
        child.join(timeout=120)
        message = err.read_text()
        assert child.exitcode == 2, message
        assert message.startswith("aimass: error: permission denied while saving model net")
        assert message.count("\n") == 1
        for p in repo.root.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        assert [v.number for v in repo.versions("net")] == [1]
        assert repo.verify("net:1").ok
        assert repo.gc(grace_seconds=0).removed == []
    finally:
        for p in shared.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(shared, ignore_errors=True)
