"""The Python client against a real replica (local subprocess, real HTTP).

Specification:
- a batch with more rows than the replica takes in one request (its ``max_batch_size``, read
  from ``/v1/models``) is split into requests of at most that many rows and the outputs come
  back joined in input order, for the sync and the async client;
- without ``runs_root=`` the client finds the endpoint records through ``site=``, else
  ``$AIMASS_RUNS_ROOT``, else ``$AIMASS_SITE`` (the site every command uses by default);
- with none of them it says, in one line, what to give;
- the README's curl example (token file, bearer header, ``/metrics`` behind the token) works.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.common.errors import InputError
from aimass_hpc.serve import AsyncClient, Client, toymodels
from aimass_hpc.serve.auth import token_path
from aimass_hpc.serve.local import LocalReplica

KWARGS: dict[str, Any] = {"in_features": 6, "hidden": 16, "out_features": 2}
LIMIT = 16  # the replica's max_batch_size: small, so 113 rows take 8 requests


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, LocalReplica, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("client-split")
    torch.manual_seed(11)
    model = toymodels.mlp(**KWARGS).eval()
    weights = tmp / "w.pt"
    torch.save(model.state_dict(), weights)
    runs = tmp / "runs"
    rep = LocalReplica(
        runs / "run0",
        recipe=toymodels.recipe(**KWARGS),
        weights=weights,
        model="toy@prod",
        version="1",
        extra_args=["--max-batch-size", str(LIMIT), "--drain-grace-s", "0.5"],
    )
    try:
        rep.wait_ready()
        yield runs, rep, model
    finally:
        rep.signal(15)
        rep.stop()


def _local(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()


def test_a_batch_over_the_limit_is_split_and_joined_in_order(served) -> None:
    runs, rep, model = served
    x = np.random.default_rng(0).standard_normal((113, 6)).astype(np.float32)
    with Client("toy@prod", runs_root=runs) as client:
        y = client.predict(x)
        assert client.max_rows == LIMIT  # learned from the server, not assumed
        np.testing.assert_allclose(y, _local(model, x), rtol=1e-5, atol=1e-6)
        assert y.shape == (113, 2)
        # Binary (.npy) bodies split the same way.
        np.testing.assert_allclose(client.predict(x, binary=True), y, rtol=0, atol=0)
        # A batch within the limit stays one request.
        np.testing.assert_allclose(client.predict(x[:LIMIT]), y[:LIMIT], rtol=0, atol=0)


def test_a_smaller_limit_named_by_a_413_splits_further(served) -> None:
    runs, _, model = served
    x = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)
    with Client("toy@prod", runs_root=runs) as client:
        client._limit_known, client.max_rows = True, 64  # as if an older replica had said 64
        y = client.predict(x)
        assert client.max_rows == LIMIT  # the server's 413 named its own limit
    np.testing.assert_allclose(y, _local(model, x), rtol=1e-5, atol=1e-6)


def test_async_client_splits_too(served) -> None:
    runs, _, model = served
    x = np.random.default_rng(2).standard_normal((113, 6)).astype(np.float32)

    async def go() -> np.ndarray:
        async with AsyncClient("toy@prod", runs_root=runs) as client:
            return await client.predict(x)

    np.testing.assert_allclose(asyncio.run(go()), _local(model, x), rtol=1e-5, atol=1e-6)


def test_the_site_finds_the_endpoint_records(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, rep, _ = served
    site = write_site(tmp_path, "dev", runs=runs)
    x = np.zeros((3, 6), np.float32)
    monkeypatch.delenv("AIMASS_RUNS_ROOT", raising=False)
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    with Client("toy@prod", site=site.source) as client:
        assert [e.url for e in client.endpoints()] == [rep.url]
    monkeypatch.setenv("AIMASS_SITE", site.source or "")
    with Client("toy@prod") as client:  # like every aimass command without --site
        assert client.predict(x).shape == (3, 2)
    # An explicit runs root outranks the environment's site.
    monkeypatch.setenv("AIMASS_SITE", str(tmp_path / "no-such-site.toml"))
    with Client("toy@prod", runs_root=runs) as client:
        assert client.predict(x).shape == (3, 2)


def test_no_runs_root_and_no_site_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIMASS_RUNS_ROOT", raising=False)
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    with pytest.raises(InputError, match=r"runs_root= or site=.*\$AIMASS_SITE"):
        Client("toy@prod")


def test_readme_curl_example_with_the_token(served, tmp_path: Path) -> None:
    _, rep, _ = served
    token_file = token_path(rep.run_dir)
    assert token_file.stat().st_mode & 0o777 == 0o600
    # The README's lines, as a user types them (token_file and url from `aimass endpoints
    # --json`), for this model's 6 inputs instead of the digits' 64.
    readme = f"""
TOKEN=$(cat {token_file})
python3 -c 'import json; print(json.dumps({{"inputs": [[0.0] * 6]}}))' >x.json
curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
     -d @x.json {rep.url}/v1/predict
echo
curl -s -H "Authorization: Bearer $TOKEN" {rep.url}/metrics
"""
    out = subprocess.run(
        ["bash", "-ec", readme], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    first, metrics = out.stdout.split("\n", 1)
    assert np.asarray(json.loads(first)["outputs"]).shape == (1, 2)
    assert "# TYPE" in metrics
    bare = f"curl -s -o /dev/null -w '%{{http_code}}' {rep.url}/metrics"
    out = subprocess.run(["bash", "-c", bare], capture_output=True, text=True, check=True)
    assert out.stdout == "401"
