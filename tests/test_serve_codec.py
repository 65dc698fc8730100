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


# --- exact dtype fit of JSON values ---------------------------------------------------------
def _json_body(values: list, dtype: str | None) -> bytes:
    return json.dumps({"inputs": values, "dtype": dtype}).encode()


@pytest.mark.parametrize(
    ("values", "dtype", "words"),
    [
        ([[1000, 1]], "int8", "value 1000 at [0][0] does not fit int8 (integers from -128 to 127)"),
        ([[1, -128, -129]], "int8", "value -129 at [0][2]"),
        ([[0, -1]], "uint8", "does not fit uint8 (integers from 0 to 255)"),
        ([[-1]], "uint64", "does not fit uint64"),
        ([[2**63]], "int64", "int64"),
        ([[2**64]], "uint64", "integers beyond 64 bits"),
        ([[1.5, 2]], "int32", "value 1.5 at [0][0] does not fit int32"),
        ([[2**53 + 1, 0.5]], "int64", "value 0.5 at [0][1]"),
        ([[70000]], "float16", "does not fit float16 (finite numbers of magnitude up to 65504)"),
        ([[1e300, 1.0]], "float32", "does not fit float32"),
        ([[2]], "bool", "value 2 at [0][0] does not fit bool (true/false, or 0/1)"),
        ([[0.5]], "bool", "does not fit bool"),
        ([[True, 2]], "int8", "mix true/false with numbers"),
        ([[True, 2.5]], None, "mix true/false with numbers"),
    ],
)
def test_json_values_must_fit_the_dtype_exactly(values: list, dtype: str, words: str) -> None:
    with pytest.raises(BadInput) as info:
        decode_json(_json_body(values, dtype))
    assert info.value.status == 422 and words in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "dtype"),
    [
        (b'{"inputs": [[NaN, 1]], "dtype": "int8"}', "int8"),
        (b'{"inputs": [[Infinity]], "dtype": "uint32"}', "uint32"),
        (b'{"inputs": [[-Infinity, 1.0]], "dtype": "int64"}', "int64"),
    ],
)
def test_json_nan_and_inf_never_become_integers(text: bytes, dtype: str) -> None:
    with pytest.raises(BadInput, match=f"does not fit {dtype}"):
        decode_json(text)


@pytest.mark.parametrize(
    ("values", "dtype", "want"),
    [
        ([[-128, 127]], "int8", [[-128, 127]]),
        ([[2.0, 255]], "uint8", [[2, 255]]),
        ([[2**53 + 1, 1.0]], "int64", [[2**53 + 1, 1]]),  # not rounded through float64
        ([[2**64 - 1, 0]], "uint64", [[2**64 - 1, 0]]),
        ([[True, False]], "int16", [[1, 0]]),
        ([[0, 1.0]], "bool", [[False, True]]),
        ([[65504.0, -1]], "float16", [[65504.0, -1.0]]),
    ],
)
def test_json_values_that_fit_are_exact(values: list, dtype: str, want: list) -> None:
    arr = decode_json(_json_body(values, dtype))
    assert arr.dtype == np.dtype(dtype) and arr.tolist() == want


_INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@given(
    st.lists(
        st.one_of(st.integers(-(2**65), 2**65), st.floats(allow_nan=True)), min_size=1, max_size=6
    ),
    st.sampled_from([*_INT_DTYPES, "bool", "float16", "float32", "float64"]),
)
@settings(max_examples=500, deadline=None)
def test_json_numbers_are_exact_or_refused(values: list, dtype: str) -> None:
    body = json.dumps({"inputs": [values], "dtype": dtype}).encode()
    try:
        arr = decode_json(body)
    except BadInput as exc:
        msg = str(exc)
        assert exc.status == 422
        assert f"does not fit {dtype}" in msg or "NaN" in msg or "64 bits" in msg, msg
        return
    assert arr.dtype == np.dtype(dtype)
    got = arr[0].tolist()
    if np.dtype(dtype).kind in "iub":
        assert got == values  # exactly the numbers sent (1 == 1.0 == True)
    else:
        assert all(np.isfinite(got))  # rounded as floats round, never overflowed to inf
        np.testing.assert_array_equal(arr[0], np.asarray(values, np.float64).astype(dtype))


# --- .npy headers ---------------------------------------------------------------------------
def _npy(header: str, payload: bytes = b"") -> bytes:
    h = header.encode("utf-8")  # numpy reads latin1: non-ASCII text arrives as mojibake
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + payload


@pytest.mark.parametrize(
    ("header", "status", "words"),
    [
        (f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({2**70}, 0)}}", 400, "too large"),
        (
            f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({2**40}, {2**40}, 0)}}",
            400,
            "too large",
        ),
        (f"{{'descr': '<f4', 'fortran_order': False, 'shape': {(1,) * 65}}}", 400, "65 axes"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 0)}", 400, "invalid shape"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (True,)}", 400, "invalid shape"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': [1]}", 400, "invalid shape"),
        ("{'descr': '<f4', 'fortran_order': 1, 'shape': (0,)}", 400, "fortran_order"),
        ("{'descr': '(1000000000000,)f4', 'fortran_order': False, 'shape': (1,)}", 422, "dtype"),
        ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}", 422, "dtype"),
        ("{'descr': '<c8', 'fortran_order': False, 'shape': (0,)}", 422, "dtype"),
        ("{'descr': 'float32', 'fortran_order': False, 'shape': (0,)}", 422, "dtype"),
        ("{[1]: 2}", 400, "unreadable"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (" * 200, 400, "unreadable"),
    ],
)
def test_hostile_npy_headers_are_refused_before_numpy_sees_them(
    header: str, status: int, words: str
) -> None:
    with pytest.raises(BadInput) as info:
        decode_npy(_npy(header))
    assert info.value.status == status and words in str(info.value), str(info.value)


def test_large_but_empty_npy_shapes_numpy_can_hold_still_decode() -> None:
    arr = decode_npy(_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({2**29}, 0)}}"))
    assert arr.shape == (2**29, 0)
    with pytest.raises(BadInput, match="no samples"):
        check_batch(
            decode_npy(_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3, 1)}")),
            SPEC,
            8,
        )


_shape_entries = st.one_of(
    st.integers(0, 4), st.integers(-(2**70), 2**130), st.booleans(), st.floats(), st.none()
)
_descrs = st.one_of(
    st.sampled_from(["<f4", ">f8", "|b1", "|u1", "<i8", "<c16", "|O", "<U3", "(3,)f4", "V8"]),
    st.text(max_size=12),
    st.integers(),
)
_npy_headers = st.builds(
    lambda shape, descr, fortran, extra: repr(
        {"descr": descr, "fortran_order": fortran, "shape": tuple(shape), **extra}
    ),
    st.one_of(
        st.lists(_shape_entries, max_size=70),
        st.lists(_shape_entries, min_size=1, max_size=3).map(lambda s: [*s, 0]),
    ),
    _descrs,
    st.one_of(st.booleans(), st.integers(-1, 2), st.text(max_size=3)),
    st.dictionaries(st.sampled_from(["x", "descr"]), st.integers(), max_size=1),
)


@given(_npy_headers, st.one_of(st.just(b""), st.binary(max_size=64)))
@settings(max_examples=500, deadline=None)
def test_any_npy_header_is_accepted_or_refused_cleanly(header: str, payload: bytes) -> None:
    _decode_and_check(_npy(header, payload), npy=True)
