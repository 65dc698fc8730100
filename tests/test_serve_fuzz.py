"""Fuzzing the live service from its own OpenAPI schema (schemathesis + hypothesis).

Whatever schemathesis generates -- valid and invalid bodies, both media types, odd headers --
no operation may answer 5xx, and the service must still predict correctly afterwards.
Hypothesis also throws arbitrary bytes and arbitrary JSON documents at ``/v1/predict``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from aimass_hpc.serve import toymodels
from aimass_hpc.serve.local import LocalReplica

KWARGS = {"in_features": 4, "hidden": 8, "out_features": 2}


@schemathesis.serializer("application/x-npy")
def _raw_bytes(ctx: object, value: object) -> bytes:
    """Let schemathesis send its generated binary bodies as they are."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalReplica]:
    tmp: Path = tmp_path_factory.mktemp("serve-fuzz")
    rep = LocalReplica(
        tmp / "run",
        recipe=toymodels.recipe(**KWARGS),
        name="fuzz",
        extra_args=["--max-batch-size", "16", "--max-body-bytes", "65536"],
    )
    with rep:
        rep.wait_ready()
        yield rep


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_operation_answers_5xx(replica: LocalReplica, mode: GenerationMode) -> None:
    # schemathesis' own pytest plugin does not load under pytest 9: drive its strategies here.
    schema = schemathesis.openapi.from_url(replica.url + "/openapi.json")
    auth = {"Authorization": f"Bearer {replica.token}"}
    seen: set[str] = set()

    @given(case=schema.as_strategy(mode))
    @settings(
        max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case: schemathesis.Case) -> None:
        resp = case.call_and_validate(headers=auth, checks=[not_a_server_error])
        seen.add(f"{case.method} {case.path}")
        if case.path == "/v1/predict" and resp.status_code == 200:
            seen.add("predict answered")

    check()
    # Operations without parameters have no negative cases; predict must be fuzzed either way.
    assert "POST /v1/predict" in seen
    if mode == GenerationMode.POSITIVE:
        # The schema names the model's exact input shape, so valid cases reach the model.
        assert len(seen) == 6 and "predict answered" in seen


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=40,
)


@given(
    body=st.one_of(
        st.binary(max_size=300),
        _json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"inputs": _json_values}, optional={"dtype": st.text(max_size=8)}
        ).map(lambda v: json.dumps(v).encode()),
    ),
    ctype=st.sampled_from(["application/json", "application/x-npy", "text/plain"]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_predict_never_answers_5xx(replica: LocalReplica, body: bytes, ctype: str) -> None:
    r = httpx.post(
        replica.url + "/v1/predict",
        content=body,
        headers={"Authorization": f"Bearer {replica.token}", "Content-Type": ctype},
        trust_env=False,
    )
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["detail"]


def test_service_is_still_correct_after_fuzzing(replica: LocalReplica) -> None:
    x = np.ones((3, 4), np.float32)
    r = httpx.post(
        replica.url + "/v1/predict",
        json={"inputs": x.tolist()},
        headers={"Authorization": f"Bearer {replica.token}"},
        trust_env=False,
    )
    assert r.status_code == 200
    assert np.asarray(r.json()["outputs"]).shape == (3, 2)
    assert replica.proc.poll() is None
