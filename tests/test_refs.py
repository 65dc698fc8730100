"""Issue 11: model references have one parser (``aimass_hpc/repo/refs.py``).

Specification:
- ``Ref.parse(text, where)`` reads ``NAME``, ``NAME:N``, ``NAME:latest``, ``NAME@ALIAS`` and
  ``NAME@latest``; ``str(ref)`` writes the canonical form back, and parsing that gives the
  same ``Ref``. ``NAME``, ``NAME:latest`` and ``NAME@latest`` are one reference.
- Names and aliases follow ``aimass_hpc.common.names`` (full-string match): every other form
  is refused with a one-line ``InputError`` that starts with ``where``.
- Service lookup compares parsed references: ``aimass bench NAME:latest`` finds a service
  started as ``aimass serve NAME:latest`` (it did not: ``latest`` was compared with the
  version number the replica resolved).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site
from hypothesis import given
from hypothesis import strategies as st

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import MODEL_NAME
from aimass_hpc.repo import Ref, parse_ref
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, find_records, write_record

NAMES = st.from_regex(MODEL_NAME.compiled, fullmatch=True).filter(lambda s: len(s) <= 128)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("net", Ref("net")),
        ("net:12", Ref("net", version=12)),
        ("net@prod", Ref("net", alias="prod")),
        ("a.b-c_d:3", Ref("a.b-c_d", version=3)),
        ("_x@v1.2-rc_3", Ref("_x", alias="v1.2-rc_3")),
        ("9lives", Ref("9lives")),
        ("x" * 128 + ":1", Ref("x" * 128, version=1)),
    ],
)
def test_canonical_forms_round_trip(text: str, ref: Ref) -> None:
    assert Ref.parse(text, "where") == ref == parse_ref(text)
    assert str(ref) == text and Ref.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("net:latest", "net"), ("net@latest", "net"), ("net:007", "net:7")],
)
def test_other_spellings_normalise(text: str, canonical: str) -> None:
    ref = Ref.parse(text, "where")
    assert str(ref) == canonical and ref == Ref.parse(canonical)
    assert ref.is_latest is (canonical == "net")


@given(name=NAMES, version=st.integers(min_value=1, max_value=10**12), alias=NAMES)
def test_any_valid_reference_round_trips(name: str, version: int, alias: str) -> None:
    for ref in (Ref(name), Ref(name, version=version), Ref(name, alias=alias)):
        if ref.alias == "latest":
            continue  # spelled NAME@latest, it is Ref(NAME)
        assert Ref.parse(str(ref), "where") == ref


def test_a_ref_passes_through() -> None:
    ref = Ref("net", version=3)
    assert Ref.parse(ref, "where") is ref and parse_ref(ref) is ref


NAME_RULE = "is not a valid model name (use letters, digits"
ALIAS_RULE = "is not a valid alias (use letters, digits"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid model reference '': expected NAME, NAME:VERSION, NAME:latest or NAME@ALIAS"),
        ("net:", "invalid version '' in model reference 'net:': expected a positive integer"),
        ("net:0", "invalid version '0' in model reference 'net:0'"),
        ("net:-1", "invalid version '-1' in model reference 'net:-1'"),
        ("net:+1", "invalid version '+1' in model reference 'net:+1'"),
        ("net:x", "invalid version 'x' in model reference 'net:x'"),
        ("net: 3", "invalid version ' 3' in model reference 'net: 3'"),
        ("net:3\n", "invalid version '3\\n' in model reference 'net:3\\n'"),
        ("net:\u0663", "invalid version '\u0663' in model reference"),  # an Arabic-Indic 3
        ("net:1:2", "invalid version '1:2' in model reference 'net:1:2'"),
        ("net:3@prod", "invalid model reference 'net:3@prod': give :VERSION or @ALIAS, not both"),
        ("net@prod:3", f"invalid alias: 'prod:3' {ALIAS_RULE}"),
        ("net@", f"invalid alias: '' {ALIAS_RULE}"),
        ("net@a@b", f"invalid alias: 'a@b' {ALIAS_RULE}"),
        ("net@.hidden", f"invalid alias: '.hidden' {ALIAS_RULE}"),
        ("net@prod\n", f"invalid alias: 'prod\\n' {ALIAS_RULE}"),
        (":3", f"invalid model name: '' {NAME_RULE}"),
        ("@prod", f"invalid model name: '' {NAME_RULE}"),
        (".hidden", f"invalid model name: '.hidden' {NAME_RULE}"),
        ("-opt", f"invalid model name: '-opt' {NAME_RULE}"),
        ("a/b", f"invalid model name: 'a/b' {NAME_RULE}"),
        ("../x", f"invalid model name: '../x' {NAME_RULE}"),
        ("bad name", f"invalid model name: 'bad name' {NAME_RULE}"),
        ("net\n", f"invalid model name: 'net\\n' {NAME_RULE}"),  # full-string match, not $
        ("n\u00e9t", f"invalid model name: 'n\u00e9t' {NAME_RULE}"),
        ("x" * 129, "invalid model name: 'xxxxxxxx"),
    ],
)
def test_refused_forms_name_where(text: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        Ref.parse(text, "serve.ref")
    got = str(info.value)
    assert got.startswith(f"serve.ref: {message}"), got
    assert "\n" not in got and info.value.exit_code == 2
    with pytest.raises(InputError) as bare:  # the repository API's form: no where
        parse_ref(text)
    assert str(bare.value) == got.removeprefix("serve.ref: ")


@pytest.mark.parametrize("value", [None, 3, b"net"])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InputError, match=r"^target: invalid model reference"):
        Ref.parse(value, "target")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- service lookup


def _start_records(run_dir: Path, ref: str, job: str, replicas: int = 1) -> list[EndpointRecord]:
    """The PENDING records ``aimass serve REF`` writes (launch.serving.start_service)."""
    ensure_token(run_dir)
    out = []
    for i in range(replicas):
        rec = EndpointRecord(
            model_ref=ref,
            model_name=Ref.parse(ref).name,
            version=None,
            state=EndpointState.PENDING,
            job_id=f"{job}_{i}",
            replica=i,
            run_dir=str(run_dir),
            token_file=str(token_path(run_dir)),
        )
        write_record(rec)
        out.append(rec)
    return out


def test_lookup_compares_parsed_references(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (latest,) = _start_records(runs / "a", "toy:latest", "100")
    (prod,) = _start_records(runs / "b", "toy@prod", "101")
    (pinned,) = _start_records(runs / "c", "toy:2", "102")  # still PENDING: no version yet
    _start_records(runs / "d", "other", "103")
    write_record(latest, EndpointState.READY, version="3", host="127.0.0.1", port=1)
    write_record(prod, EndpointState.READY, version="2", host="127.0.0.1", port=2)

    def jobs(target: str | Ref) -> set[str]:
        return {r.job_id for r in find_records(runs, target)}

    # NAME = NAME:latest = NAME@latest: every replica of the model, however it was started.
    for target in ("toy", "toy:latest", "toy@latest", Ref("toy")):
        assert jobs(target) == {"100_0", "101_0", "102_0"}, target
    assert jobs("toy@prod") == {"101_0"}  # started under the alias
    assert jobs("toy:2") == {"101_0", "102_0"}  # serving version 2, or asked for it
    assert jobs("toy:3") == {"100_0"}
    assert jobs("toy:02") == jobs("toy:2")
    assert jobs("toy@staging") == set() and jobs("nope") == set()
    assert latest.parsed_ref == Ref("toy") and pinned.parsed_ref == Ref("toy", version=2)


def test_a_record_from_a_recipe_replica_is_only_found_by_name(tmp_path: Path) -> None:
    rec = EndpointRecord("toy:v1", "toy", "v1", "READY", "1", 0, str(tmp_path / "r"))
    write_record(rec)
    assert rec.parsed_ref is None  # "v1" is no repository version
    assert [r.job_id for r in find_records(tmp_path, "toy")] == ["1"]
    assert find_records(tmp_path, "toy:1") == []


def test_a_bad_target_is_one_line_naming_it(tmp_path: Path) -> None:
    from aimass_hpc.serve import Client

    with pytest.raises(InputError, match=r"^target: invalid version 'x' in model reference"):
        find_records(tmp_path, "toy:x")
    with pytest.raises(InputError, match=r"^target: invalid model name: 'a/b'"):
        Client("a/b", runs_root=tmp_path)


def test_bench_finds_a_service_started_as_name_latest(tmp_path: Path) -> None:
    """The bug found in use: ``aimass bench NAME:latest`` said no service was running."""
    from aimass_hpc.repo import ModelRepository
    from aimass_hpc.serve import toymodels
    from aimass_hpc.serve.local import LocalReplica

    site = write_site(tmp_path, "dev")
    kwargs = {"in_features": 4, "hidden": 4, "out_features": 1}
    repo = ModelRepository(site.models_root)
    repo.save("toy", toymodels.mlp(**kwargs).state_dict(), recipe=toymodels.recipe(**kwargs))
    run_dir = Path(site.runs_root) / "20250101-000000-serve-toy"
    _start_records(run_dir, "toy:latest", "4242")  # what `aimass serve toy:latest` wrote
    # ... and what the job then runs: the replica announces itself under the same key.
    rep = LocalReplica(
        run_dir,
        model="toy:latest",
        repo=site.models_root,
        job_id="4242_0",
        extra_args=["--drain-grace-s", "0.2"],
    )
    try:
        ready = rep.wait_ready()
        assert (ready.model_ref, ready.version, ready.key) == ("toy:latest", "1", "4242_0.0")
        for target in ("toy:latest", "toy", "toy@latest"):
            proc = subprocess.run(
                [sys.executable, "-m", "aimass_hpc", "bench", target, "--site", str(site.source),
                 "--duration", "0.3", "--concurrency", "2", "--json"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            report = json.loads(proc.stdout)
            assert report["replicas"] == 1 and report["requests_ok"] > 0, report
            assert (report["model"], report["version"]) == ("toy", "1")
    finally:
        rep.stop()
