"""The HTTP API of a replica: a real ``python -m aimass_hpc.serve`` process, a real httpx client.

Specification:
- predictions over JSON and .npy equal a local forward of the same weights;
- no token / a wrong token -> 401 on everything except /healthz and /readyz (the schema too);
  there is no /docs or /redoc page;
- a value that does not fit the requested dtype exactly (1000 as int8) is a 422 naming the
  dtype and its range, never a wrapped or truncated value;
- malformed JSON, wrong shapes, dtypes, sizes -> 4xx with a message, and the service stays up;
- /metrics is Prometheus text with request, latency and batch-size series;
- concurrent requests are batched (seen in the batch-size metric); --no-batching is not;
- SIGTERM drains: in-flight requests finish, the record ends STOPPED, exit code 0.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from aimass_hpc.serve import toymodels
from aimass_hpc.serve.codec import encode_npy
from aimass_hpc.serve.endpoints import EndpointState, read_records
from aimass_hpc.serve.local import LocalReplica

KWARGS = {"in_features": 8, "hidden": 32, "out_features": 3}
MAX_BODY = 256 * 1024
MAX_BATCH = 32


def _weights(tmp: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = toymodels.mlp(**KWARGS).eval()
    path = tmp / f"weights-{seed}.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalReplica, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("serve-app")
    weights, model = _weights(tmp)
    rep = LocalReplica(
        tmp / "run",
        recipe=toymodels.recipe(**KWARGS),
        weights=weights,
        name="toy",
        version="1",
        extra_args=["--max-body-bytes", str(MAX_BODY), "--max-batch-size", str(MAX_BATCH)],
    )
    with rep:
        rep.wait_ready()
        yield rep, model


@pytest.fixture
def api(served: tuple[LocalReplica, torch.nn.Module]) -> Iterator[httpx.Client]:
    rep, _ = served
    with httpx.Client(
        base_url=rep.url, headers={"Authorization": f"Bearer {rep.token}"}, trust_env=False
    ) as client:
        yield client


def _local(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def _still_up(api: httpx.Client, model: torch.nn.Module) -> None:
    x = np.ones((2, 8), np.float32)
    r = api.post("/v1/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"], _local(model, x), rtol=1e-5, atol=1e-6)


def test_endpoint_record_and_token_file(served: tuple[LocalReplica, torch.nn.Module]) -> None:
    rep, _ = served
    (rec,) = read_records(rep.run_dir)
    assert rec.state == EndpointState.READY
    assert (rec.host, rec.model_name, rec.version, rec.model_ref) == (
        "127.0.0.1",
        "toy",
        "1",
        "toy:1",
    )
    assert rec.pid == rep.proc.pid and rec.port and rec.job_id == rep.job_id
    mode = stat.S_IMODE((rep.run_dir / "serve.token").stat().st_mode)
    assert mode == 0o600


def test_predict_json_equals_local_forward(served, api: httpx.Client) -> None:
    _, model = served
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    r = api.post("/v1/predict", json={"inputs": x.tolist(), "dtype": "float32"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["shape"] == [5, 3] and doc["dtype"] == "float32"
    assert (doc["model"], doc["version"]) == ("toy", "1")
    np.testing.assert_allclose(np.asarray(doc["outputs"]), _local(model, x), rtol=1e-5, atol=1e-6)


def test_predict_npy_equals_local_forward(served, api: httpx.Client) -> None:
    _, model = served
    x = np.random.default_rng(2).standard_normal((MAX_BATCH, 8)).astype(np.float64)
    r = api.post(
        "/v1/predict", content=encode_npy(x), headers={"Content-Type": "application/x-npy"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    assert r.headers["x-aimass-version"] == "1"
    import io

    y = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert y.dtype == np.float32 and y.shape == (MAX_BATCH, 3)
    np.testing.assert_allclose(y, _local(model, x), rtol=1e-5, atol=1e-6)


def test_accept_header_chooses_the_answer_format(api: httpx.Client) -> None:
    r = api.post(
        "/v1/predict",
        json={"inputs": [[0.0] * 8]},
        headers={"Accept": "application/x-npy"},
    )
    assert r.status_code == 200 and r.content.startswith(b"\x93NUMPY")


def test_models_describes_what_is_served(api: httpx.Client) -> None:
    r = api.get("/v1/models")
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m["name"] == "toy" and m["version"] == "1" and m["device"] == "cpu"
    assert m["input_shape"] == [8] and m["input_dtype"] == "float32"
    assert m["output_shape"] == [3] and m["max_batch_size"] == MAX_BATCH
    assert m["max_body_bytes"] == MAX_BODY and m["batching"] is True


def test_health_probes_need_no_token(served) -> None:
    rep, _ = served
    assert httpx.get(rep.url + "/healthz", trust_env=False).json() == {"status": "ok"}
    r = httpx.get(rep.url + "/readyz", trust_env=False)
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["version"] == "1"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "basic", "empty"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/predict"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json")],
)
def test_requests_without_the_token_get_401(served, headers, method, path) -> None:
    rep, _ = served
    r = httpx.request(
        method, rep.url + path, headers=headers, json={"inputs": [[0.0] * 8]}, trust_env=False
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["detail"]


def _npy_with_header(header: str, payload: bytes) -> bytes:
    h = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + payload


def _npy_shape(shape: str) -> bytes:
    return _npy_with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}", b"")


def _inputs(row: list, dtype: str | None) -> bytes:
    return json.dumps({"inputs": [row], "dtype": dtype}).encode()


BAD_REQUESTS = {
    "not-json": ("application/json", b"{inputs: [1,2", 400),
    "not-utf8": ("application/json", b"\xff\xfe\x00", 400),
    "json-list": ("application/json", b"[[1,2,3]]", 422),
    "no-inputs": ("application/json", b'{"x": [[1]]}', 422),
    "extra-field": ("application/json", b'{"inputs": [[0,0,0,0,0,0,0,0]], "y": 1}', 422),
    "scalar-inputs": ("application/json", b'{"inputs": 3}', 422),
    "wrong-width": ("application/json", b'{"inputs": [[1,2,3]]}', 422),
    "no-batch-axis": ("application/json", b'{"inputs": [1,2,3,4,5,6,7,8]}', 422),
    "too-many-axes": ("application/json", json.dumps({"inputs": [[[0] * 8]]}).encode(), 422),
    "ragged": ("application/json", b'{"inputs": [[1,2,3,4,5,6,7,8],[1]]}', 422),
    "strings": ("application/json", json.dumps({"inputs": [["a"] * 8]}).encode(), 422),
    "nulls": ("application/json", json.dumps({"inputs": [[None] * 8]}).encode(), 422),
    "nan": ("application/json", b'{"inputs": [[NaN,0,0,0,0,0,0,0]]}', 422),
    "huge-int": ("application/json", json.dumps({"inputs": [[10**40] * 8]}).encode(), 422),
    "bad-dtype": ("application/json", b'{"inputs": [[0,0,0,0,0,0,0,0]], "dtype": "str"}', 422),
    "float-as-int": (
        "application/json",
        b'{"inputs": [[0.5,0,0,0,0,0,0,0]], "dtype": "int32"}',
        422,
    ),
    "empty-batch": ("application/json", b'{"inputs": []}', 422),
    "too-many-rows": (
        "application/json",
        json.dumps({"inputs": [[0] * 8] * (MAX_BATCH + 1)}).encode(),
        413,
    ),
    "oversized-body": ("application/json", b" " * (MAX_BODY + 1), 413),
    "deep-nesting": (
        "application/json",
        b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        400,
    ),
    "npy-garbage": ("application/x-npy", b"definitely not numpy", 400),
    "npy-lying-shape": (
        "application/x-npy",
        _npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (10**9, 8), }", b"x"),
        400,
    ),
    "npy-object": (
        "application/x-npy",
        _npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1, 8), }", b""),
        422,
    ),
    "npy-code": (
        "application/x-npy",
        _npy_with_header("{'descr': __import__('os').getcwd(), 'shape': (1,)}", b""),
        400,
    ),
    "npy-wrong-shape": ("application/x-npy", encode_npy(np.zeros((2, 7), np.float32)), 422),
    "npy-complex": ("application/x-npy", encode_npy(np.zeros((2, 8), np.complex64)), 422),
    "form": ("application/x-www-form-urlencoded", b"a=1", 415),
    # Values that do not fit the requested dtype exactly: never wrapped, truncated or inf.
    "int8-wraps": ("application/json", _inputs([1000] + [0] * 7, "int8"), 422),
    "uint8-negative": ("application/json", _inputs([-1] + [0] * 7, "uint8"), 422),
    "int64-too-big": ("application/json", _inputs([2**63] + [0] * 7, "int64"), 422),
    "int-nan": ("application/json", b'{"inputs": [[NaN,0,0,0,0,0,0,0]], "dtype": "int8"}', 422),
    "int-inf": (
        "application/json",
        b'{"inputs": [[Infinity,0,0,0,0,0,0,0]], "dtype": "int16"}',
        422,
    ),
    "float16-overflow": ("application/json", _inputs([70000.0] + [0] * 7, "float16"), 422),
    "float32-overflow": ("application/json", _inputs([1e300] + [0] * 7, "float32"), 422),
    "bool-two": ("application/json", _inputs([2] + [0] * 7, "bool"), 422),
    "bool-mixed-with-numbers": ("application/json", _inputs([True] + [0.5] * 7, None), 422),
    # .npy headers numpy would choke on (ValueError) after the size check passed.
    "npy-huge-empty-2d": ("application/x-npy", _npy_shape("(2**70, 0)"), 400),
    "npy-huge-empty-2d-literal": ("application/x-npy", _npy_shape(f"({2**70}, 0)"), 400),
    "npy-huge-empty-3d": ("application/x-npy", _npy_shape(f"({2**40}, {2**40}, 0)"), 400),
    "npy-subarray-descr": (
        "application/x-npy",
        _npy_with_header(
            "{'descr': '(1000000000000,)f4', 'fortran_order': False, 'shape': (1,)}", b""
        ),
        422,
    ),
    "npy-unhashable-key": ("application/x-npy", _npy_with_header("{[1]: 2}", b""), 400),
    "npy-fortran-not-bool": (
        "application/x-npy",
        _npy_with_header("{'descr': '<f4', 'fortran_order': 'no', 'shape': (1, 8)}", b"\0" * 32),
        400,
    ),
    "npy-too-many-axes": (
        "application/x-npy",
        _npy_with_header(
            f"{{'descr': '<f4', 'fortran_order': False, 'shape': {(1,) * 70}}}", b"\0" * 4
        ),
        400,
    ),
    "json-huge-int-literal": ("application/json", b'{"inputs": [[' + b"1" * 5000 + b"]]}", 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_4xx_and_service_stays_up(served, api: httpx.Client, case: str) -> None:
    _, model = served
    ctype, body, status = BAD_REQUESTS[case]
    r = api.post("/v1/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    _still_up(api, model)


@pytest.mark.parametrize(
    ("row", "dtype", "words"),
    [
        ([1000] + [0] * 7, "int8", "int8 (integers from -128 to 127)"),
        ([0, -3] + [0] * 6, "uint16", "uint16 (integers from 0 to 65535)"),
        ([0.5] + [0] * 7, "int32", "int32 (integers from -2147483648 to 2147483647)"),
        ([70000] + [0] * 7, "float16", "float16 (finite numbers of magnitude up to 65504)"),
        ([0, 0, 3] + [0] * 5, "bool", "bool (true/false, or 0/1)"),
    ],
)
def test_dtype_misfit_names_the_dtype_and_its_range(
    api: httpx.Client, row: list, dtype: str, words: str
) -> None:
    r = api.post("/v1/predict", json={"inputs": [row], "dtype": dtype})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_values_that_fit_are_served_exactly(served, api: httpx.Client) -> None:
    _, model = served
    row = [-128, 127, 0, 5, -7, 1, 2, 3]
    r = api.post("/v1/predict", json={"inputs": [row], "dtype": "int8"})
    assert r.status_code == 200, r.text
    want = _local(model, np.asarray([row], np.float32))
    np.testing.assert_allclose(r.json()["outputs"], want, rtol=1e-5, atol=1e-6)
    # Integral floats are integers; booleans alone are 0/1.
    r = api.post("/v1/predict", json={"inputs": [[2.0] * 8], "dtype": "uint8"})
    assert r.status_code == 200, r.text
    r = api.post("/v1/predict", json={"inputs": [[True, False] * 4], "dtype": "bool"})
    assert r.status_code == 200, r.text


def test_chunked_body_is_cut_off_at_the_limit(served, api: httpx.Client) -> None:
    _, model = served

    def chunks() -> Iterator[bytes]:  # chunked upload: no Content-Length at all
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    r = api.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    _still_up(api, model)


def _metrics(api: httpx.Client) -> dict[str, list]:
    r = api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def _sample(fams: dict[str, list], metric: str, **labels: str) -> float:
    total = 0.0
    for fam in fams.values():
        for s in fam:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_are_prometheus_text(api: httpx.Client) -> None:
    api.post("/v1/predict", json={"inputs": [[0.0] * 8] * 3})
    api.post("/v1/predict", content=b"nope", headers={"Content-Type": "application/json"})
    fams = _metrics(api)
    assert _sample(fams, "aimass_serve_requests_total", route="/v1/predict", code="200") >= 1
    assert _sample(fams, "aimass_serve_requests_total", route="/v1/predict", code="400") >= 1
    assert _sample(fams, "aimass_serve_request_duration_seconds_count", route="/v1/predict") >= 2
    assert _sample(fams, "aimass_serve_batch_size_count") >= 1
    assert _sample(fams, "aimass_serve_samples_total") >= 3
    assert _sample(fams, "aimass_serve_ready") == 1
    assert _sample(fams, "aimass_serve_model_info", version="1", name="toy") == 1
    # Unknown paths are lumped together: a scanner cannot grow the label set.
    api.get("/no/such/path/12345")
    fams = _metrics(api)
    assert _sample(fams, "aimass_serve_requests_total", route="other", code="404") >= 1
    assert _sample(fams, "aimass_serve_requests_total", route="/no/such/path/12345") == 0


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_interactive_docs_pages(served, api: httpx.Client, path: str) -> None:
    rep, _ = served
    assert api.get(path).status_code == 404  # not even with the token
    assert httpx.get(rep.url + path, trust_env=False).status_code in (401, 404)


def test_openapi_schema_is_published_to_token_holders(api: httpx.Client) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    predict = doc["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    assert {"401", "413", "422"} <= set(predict["responses"])
    assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())
    assert {"/v1/models", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])


# --- batching ------------------------------------------------------------------------------
def _concurrent_predicts(url: str, token: str, xs: list[np.ndarray]) -> list[np.ndarray]:
    async def go() -> list[np.ndarray]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as c:
            rs = await asyncio.gather(
                *(c.post("/v1/predict", json={"inputs": x.tolist()}) for x in xs)
            )
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [np.asarray(r.json()["outputs"], np.float32) for r in rs]

    return asyncio.run(go())


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_concurrent_requests_are_batched(tmp_path: Path, batching: bool) -> None:
    weights, model = _weights(tmp_path, seed=3)
    extra = ["--max-wait-ms", "200", "--max-batch-size", "64"]
    if not batching:
        extra.append("--no-batching")
    # Every forward sleeps 50 ms, so requests pile up while the worker is busy.
    recipe = toymodels.recipe("aimass_hpc.serve.toymodels:slow_mlp", delay_ms=50.0, **KWARGS)
    state = {f"inner.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, weights)
    with LocalReplica(
        tmp_path / "run", recipe=recipe, weights=weights, name="slow", extra_args=extra
    ) as rep:
        rep.wait_ready()
        rng = np.random.default_rng(4)
        xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(24)]
        ys = _concurrent_predicts(rep.url, rep.token, xs)
        # Batching must not mix up whose rows are whose.
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(y, _local(model, x), rtol=1e-5, atol=1e-6)
        with httpx.Client(
            base_url=rep.url, headers={"Authorization": f"Bearer {rep.token}"}, trust_env=False
        ) as api:
            fams = _metrics(api)
    forwards = _sample(fams, "aimass_serve_batch_requests_count") - 1  # minus the warm-up
    merged = _sample(fams, "aimass_serve_batch_requests_sum") - 1
    rows = _sample(fams, "aimass_serve_batch_size_sum") - 1
    assert merged == 24 and rows == sum(len(x) for x in xs)
    if batching:
        assert forwards < 24 / 2  # most forwards carried several requests
        assert _sample(fams, "aimass_serve_batch_requests_bucket", le="1.0") - 1 < forwards
    else:
        assert forwards == 24


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    recipe = toymodels.recipe("aimass_hpc.serve.toymodels:slow_mlp", delay_ms=300.0, **KWARGS)
    rep = LocalReplica(
        tmp_path / "run", recipe=recipe, name="slow", extra_args=["--drain-grace-s", "0.5"]
    )
    rep.wait_ready()
    url, token = rep.url, rep.token

    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as c:
            tasks = [
                asyncio.create_task(c.post("/v1/predict", json={"inputs": [[0.0] * 8]}))
                for _ in range(4)
            ]
            await asyncio.sleep(0.1)  # requests are in flight (the forward takes 300 ms)
            rep.signal(__import__("signal").SIGTERM)
            await asyncio.sleep(0.1)
            ready = await c.get("/readyz")  # still answering, but no longer ready
            return [*(await asyncio.gather(*tasks)), ready]

    *answers, ready = asyncio.run(go())
    assert [r.status_code for r in answers] == [200] * 4
    assert ready.status_code == 503 and ready.json()["phase"] == "DRAINING"
    assert rep.proc.wait(30) == 0
    (rec,) = read_records(rep.run_dir)
    assert rec.state == EndpointState.STOPPED
    rep.stop()


def test_model_that_cannot_load_marks_the_record_failed(tmp_path: Path) -> None:
    recipe = toymodels.recipe(**KWARGS)
    recipe["factory"] = "aimass_hpc.serve.toymodels:no_such_factory"
    rep = LocalReplica(tmp_path / "run", recipe=recipe, name="broken")
    rec = rep.wait_state(EndpointState.FAILED, timeout=60)
    assert "no_such_factory" in (rec.message or "")
    assert rep.proc.wait(30) == 1
    rep.stop()
