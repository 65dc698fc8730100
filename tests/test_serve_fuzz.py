"""Fuzzing the live service from its own OpenAPI schema (schemathesis + hypothesis).

Whatever schemathesis generates -- valid and invalid bodies, both media types, odd headers --
no operation may answer 5xx, and the service must still predict correctly afterwards.
Hypothesis also throws arbitrary bytes, arbitrary JSON documents, numbers of every size with
every dtype name, and ``.npy`` bodies with hostile headers (shapes like ``(2**70, 0)``, odd
descr and fortran_order values) at ``/v1/predict``.
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
from aimass_hpc.serve.codec import ALLOWED_DTYPES
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
    auth = {"Authorization": f"Bearer {replica.token}"}
    schema = schemathesis.openapi.from_url(replica.url + "/openapi.json", headers=auth)
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


_DTYPES = sorted(ALLOWED_DTYPES)  # every dtype a request may name
_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.sampled_from([127, 128, -129, 255, 256, -1, 65504.0, 65520.0, 2**63, 2**64, 0.5]),
)
_shape_entries = st.one_of(
    st.integers(0, 8),
    st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64, 2**70, -1]),
    st.integers(-(2**80), 2**80),
    st.booleans(),
    st.floats(),
)
_npy_headers = st.builds(
    lambda shape, descr, fortran: repr(
        {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}
    ),
    # An axis of 0 makes the payload check pass for any other axes: the case numpy refused.
    st.one_of(
        st.lists(_shape_entries, max_size=80),
        st.lists(_shape_entries, min_size=1, max_size=3).map(lambda s: [*s, 0]),
    ),
    st.one_of(
        st.sampled_from(["<f4", ">f4", "<f8", "|u1", "|b1", "<i8", "|O", "<c8", "(2,)f4", "V4"]),
        st.text(max_size=10),
        st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["<f4", "|O"]))),
    ),
    st.one_of(st.booleans(), st.none(), st.integers(0, 2)),
)


def _npy_body(header: str, payload: bytes, major: int) -> bytes:
    h = header.encode("utf-8")
    size = len(h).to_bytes(2 if major == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([major, 0]) + size + h + payload


def _post(replica: LocalReplica, body: bytes, ctype: str) -> httpx.Response:
    return httpx.post(
        replica.url + "/v1/predict",
        content=body,
        headers={"Authorization": f"Bearer {replica.token}", "Content-Type": ctype},
        trust_env=False,
    )


@given(
    header=_npy_headers,
    payload=st.one_of(st.just(b""), st.binary(max_size=64), st.just(b"\0" * 16)),
    major=st.sampled_from([1, 2, 3]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_malformed_npy_headers_never_answer_5xx(
    replica: LocalReplica, header: str, payload: bytes, major: int
) -> None:
    r = _post(replica, _npy_body(header, payload, major), "application/x-npy")
    assert r.status_code < 500, (header, r.text)
    if r.status_code >= 400:
        assert r.json()["detail"]


@given(
    rows=st.lists(st.lists(_numbers, min_size=4, max_size=4), min_size=1, max_size=3),
    dtype=st.sampled_from([None, *_DTYPES]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_numbers_of_any_size_never_answer_5xx(
    replica: LocalReplica, rows: list, dtype: str | None
) -> None:
    body = json.dumps({"inputs": rows, "dtype": dtype}).encode()
    r = _post(replica, body, "application/json")
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 422 and dtype is not None and "does not fit" in r.json()["detail"]:
        assert dtype in r.json()["detail"]


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
