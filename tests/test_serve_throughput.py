"""The serving hot path's shortcuts give exactly what the slow, obvious code gives.

Specification: ``encode_npy`` writes the bytes ``np.save`` writes; the JSON body parser
(orjson when installed) accepts, refuses and reports exactly as the standard ``json`` module
would; the metrics' cached label children count like ``labels()``; the load generator reads
the headers it needs; and a real replica answers predictions through the fast path while
its other routes still go through FastAPI.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aimass_hpc.serve import codec, toymodels
from aimass_hpc.serve.client import encode_request
from aimass_hpc.serve.codec import BadInput, decode_json, encode_npy
from aimass_hpc.serve.loadgen import _header, run_load_sync
from aimass_hpc.serve.local import LocalReplica
from aimass_hpc.serve.metrics import ServeMetrics


def _np_save(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the format-2.0 notice
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(["bool", "i1", "<i2", ">i4", "u8", "<f2", "f4", ">f8", "c8"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.booleans(),
)
def test_encode_npy_writes_what_np_save_writes(arr: np.ndarray, transpose: bool) -> None:
    arr = arr.T if transpose else arr
    assert encode_npy(arr) == _np_save(arr)


def test_encode_npy_large_header_and_object_arrays() -> None:
    big = np.zeros((1,) * 60, dtype=[(f"field{i:04d}" * 8, "<f4") for i in range(300)])
    assert encode_npy(big) == _np_save(big)  # a header over 64 KiB: format 2.0, as np.save
    with pytest.raises(ValueError):
        encode_npy(np.array([object()]))  # np.save's own refusal


def _outcome(parse, body: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(parse(body))
    except BadInput as exc:
        return "bad", f"{exc.status} {exc}"


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[18446744073709551616, 1]]}',  # beyond 64 bits: json keeps an int
        b'{"inputs": [[-9223372036854775809, 1.5]]}',
        b'{"inputs": [[18446744073709551615, 1]]}',  # uint64 max fits
        b'{"inputs": [[1e0000000000000000001, 2]]}',
        b'{"inputs": [[0.000123456789012345678901234, 2]]}',  # long fraction: orjson is fine
        b'{"inputs": [[NaN, 1]]}',
        b'{"inputs": [[Infinity]]}',
        b'{"inputs": [[1E400]]}',
        b'\xef\xbb\xbf{"inputs": [[1]]}',  # UTF-8 BOM: json accepts it
        b'{"inputs": [["\\ud800"]]}',
        b'{"inputs": [[1, 2]], "dtype": 18446744073709551616}',
        b'{"inputs": [[1]], "inputs": [[2.5]]}',
        b'{"inputs": [[true, 1]]}',
        b"[" * 3000 + b"]" * 3000,
        b'{"inputs": [[1, 2], [3]]}',
        b'{"inputs": [[01]]}',
    ],
)
def test_json_parser_matches_the_standard_one(body: bytes, monkeypatch) -> None:
    fast = _outcome(decode_json, body)
    monkeypatch.setattr(codec, "_orjson", None)
    assert fast == _outcome(decode_json, body)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(min_value=-(2**70), max_value=2**70),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_json_values_parse_identically(values: list) -> None:
    body = json.dumps({"inputs": [values]}).encode()
    assert repr(codec._loads(body)) == repr(json.loads(body))


def test_metrics_label_cache_counts_like_labels() -> None:
    m = ServeMetrics(frozenset({"/v1/predict"}))
    for _ in range(3):
        m.observe_request("/v1/predict", "POST", 200, 0.001)
    for i in range(400):  # a scanner: unknown paths are "other" and do not grow the cache
        m.observe_request(f"/x{i}", "GET", 404, 0.001)
    text = m.render().decode()
    assert 'aimass_serve_requests_total{code="200",method="POST",route="/v1/predict"} 3.0' in text
    assert 'aimass_serve_requests_total{code="404",method="GET",route="other"} 400.0' in text
    assert len(m._children) <= 256
    m.routes = frozenset({"/v1/predict", "/x1"})  # the server sets the real routes later
    m.observe_request("/x1", "GET", 404, 0.001)
    assert 'code="404",method="GET",route="/x1"} 1.0' in m.render().decode()


def test_loadgen_header_lookup() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ndate: x\r\nContent-Length: 12\r\nConnection:  Close \r\n"
        b"Transfer-Encoding: gzip, Chunked\r\n\r\n"
    ).lower()
    assert _header(head, b"content-length") == b"12"
    assert _header(head, b"connection") == b"close"
    assert _header(head, b"transfer-encoding") == b"gzip, chunked"
    assert _header(head, b"x-missing") is None


def test_replica_fast_path_and_framework_routes(tmp_path: Path) -> None:
    rep = LocalReplica(
        tmp_path / "run",
        recipe=toymodels.recipe(in_features=8, hidden=16, out_features=3, depth=1),
        name="tp",
        extra_args=["--threads", "1"],
    )
    with rep:
        rep.wait_ready()
        auth = {"Authorization": f"Bearer {rep.token}"}
        x = np.ones((4, 8), dtype=np.float32)
        for binary in (False, True):
            body, headers = encode_request(x, binary=binary)
            res = run_load_sync(
                rep.url, body, {**headers, **auth}, concurrency=4, duration_s=0.5, warmup_s=0.1,
                rows_per_request=4,
            )  # fmt: skip
            assert res.ok > 0 and res.failed == 0
        with httpx.Client(base_url=rep.url, trust_env=False) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            assert client.get("/v1/models").status_code == 401
            assert client.get("/v1/models", headers=auth).json()["models"][0]["name"] == "tp"
            bad = client.post("/v1/predict", content=b"{", headers=auth)
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["detail"]
            text = client.get("/metrics", headers=auth).text
        assert 'route="/v1/predict"' in text and 'route="/healthz"' in text
        assert 'code="400",method="POST",route="/v1/predict"' in text
