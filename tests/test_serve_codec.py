"""Wire formats and input validation (pure logic: no server needed).

Specification: whatever bytes arrive, decoding and checking either return an array of the
model's shape and dtype or raise ``BadInput`` with a 4xx status -- never anything else.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aimass_hpc.serve.codec import (
    BadInput,
    InputSpec,
    check_batch,
    decode_json,
    decode_npy,
    encode_json,
    encode_npy,
    json_schema_for,
    media_type_of,
    shape_of,
    wants_npy,
)

SPEC = InputSpec((3, None), np.dtype("float32"))


def test_json_round_trip() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    arr = decode_json(json.dumps({"inputs": x.tolist(), "dtype": "float32"}).encode())
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(check_batch(arr, SPEC, 8), x)


def test_npy_round_trip_keeps_dtype_and_order() -> None:
    x = np.asfortranarray(np.arange(24, dtype=np.float64).reshape(4, 3, 2))
    arr = decode_npy(encode_npy(x))
    np.testing.assert_array_equal(arr, x)
    assert check_batch(arr, SPEC, 8).dtype == np.float32
    assert np.load(io.BytesIO(encode_npy(x)), allow_pickle=False).shape == (4, 3, 2)


def test_wildcard_dims_take_any_size() -> None:
    assert check_batch(np.zeros((1, 3, 7)), SPEC, 8).shape == (1, 3, 7)
    assert SPEC.describe() == "[N, 3, *] float32"
    assert SPEC.example(2).shape == (2, 3, 1)


@pytest.mark.parametrize(
    ("arr", "status", "words"),
    [
        (np.zeros((2, 4, 1)), 422, "axis 1 is 4"),
        (np.zeros((3, 1)), 422, "expected [N, 3, *]"),
        (np.zeros((0, 3, 1)), 422, "no samples"),
        (np.zeros((9, 3, 1)), 413, "limit is 8"),
        (np.full((1, 3, 1), np.nan), 422, "NaN"),
        (np.full((1, 3, 1), 1e300), 422, "float32 range"),
        (np.zeros((1, 3, 1), np.complex64), 422, "complex64"),
    ],
)
def test_check_batch_refuses(arr: np.ndarray, status: int, words: str) -> None:
    with pytest.raises(BadInput) as info:
        check_batch(arr, SPEC, 8)
    assert info.value.status == status and words in str(info.value)


def test_int_model_refuses_floats_and_overflow() -> None:
    spec = InputSpec((2,), np.dtype("int8"))
    assert check_batch(np.array([[1, 2]]), spec, 4).dtype == np.int8
    with pytest.raises(BadInput, match="float64"):
        check_batch(np.array([[1.5, 2]]), spec, 4)
    with pytest.raises(BadInput, match="int8 range"):
        check_batch(np.array([[1000, 2]]), spec, 4)


def test_npy_header_is_not_trusted() -> None:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 8
    with pytest.raises(BadInput, match="needs 400000000000"):
        decode_npy(body)


def test_media_negotiation() -> None:
    assert media_type_of(None) == "application/json"
    assert media_type_of("Application/X-Npy; q=1") == "application/x-npy"
    assert wants_npy("application/x-npy", "application/json")
    assert not wants_npy("application/json", "application/x-npy")
    assert wants_npy("*/*", "application/x-npy") and not wants_npy(None, "application/json")


def test_shape_of_and_schema() -> None:
    assert shape_of([3, -1, None]) == (3, None, None)
    for bad in ([0], [1.5], ["a"], [True]):
        with pytest.raises(ValueError):
            shape_of(bad)
    schema = json_schema_for(InputSpec((2,), np.dtype("float32")), 5)
    assert schema["maxItems"] == 5 and schema["items"]["minItems"] == 2


def test_json_answer_carries_shape_and_meta() -> None:
    doc = json.loads(encode_json(np.ones((2, 1), np.float32), {"model": "m", "version": "3"}))
    assert doc == {
        "outputs": [[1.0], [1.0]],
        "shape": [2, 1],
        "dtype": "float32",
        "model": "m",
        "version": "3",
    }


def _decode_and_check(body: bytes, npy: bool) -> None:
    try:
        arr = decode_npy(body) if npy else decode_json(body)
        out = check_batch(arr, SPEC, 8)
    except BadInput as exc:
        assert 400 <= exc.status < 500 and str(exc)
        return
    assert out.dtype == np.float32 and out.shape[1] == 3 and 1 <= out.shape[0] <= 8


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=30,
)


@given(
    st.one_of(
        st.binary(max_size=200),
        _json.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda v, d: json.dumps({"inputs": v, "dtype": d}).encode(),
            _json,
            st.sampled_from([None, "float32", "int8", "bool", "float16", "x"]),
        ),
    )
)
@settings(max_examples=400, deadline=None)
def test_any_json_body_is_accepted_or_refused_cleanly(body: bytes) -> None:
    _decode_and_check(body, npy=False)


@given(
    hnp.arrays(
        hnp.scalar_dtypes(),
        hnp.array_shapes(min_dims=0, max_dims=4, max_side=4),
    ),
    st.integers(0, 40),
    st.binary(max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_any_npy_body_is_accepted_or_refused_cleanly(
    arr: np.ndarray, cut: int, junk: bytes
) -> None:
    body = encode_npy(arr) if arr.dtype.kind not in "OVUSmM" else b"\x93NUMPY" + junk
    _decode_and_check(body, npy=True)
    _decode_and_check(body[:-cut] if cut else body + junk, npy=True)  # truncated / padded
