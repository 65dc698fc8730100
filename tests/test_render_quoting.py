"""Quoting is enforced by the template layer: values never change a script's meaning."""

from __future__ import annotations

import subprocess

import pytest
from _sitefixtures import write_site

from aimass_hpc.errors import InputError
from aimass_hpc.render import UnquotedValueError, render_request, sbatch_value, shell_quote
from aimass_hpc.specs import JobRequest

NASTY = [
    "plain",
    "with space",
    "  leading and trailing  ",
    "it's",
    'double "quoted"',
    "$(touch CANARY)",
    "`touch CANARY`",
    "; touch CANARY",
    "&& touch CANARY",
    "| touch CANARY",
    "'; touch CANARY; '",
    '"; touch CANARY; "',
    "line one\nline two",
    "\ntouch CANARY\n",
    "$HOME ${HOME} $((1+1))",
    "*",
    "~",
    "-n",
    "--help",
    "a\\b\\\\c",
    "tab\there",
    "héllo wörld ✓ 日本語",
    "emoji 🚀",
    "<in >out 2>&1",
    "#not a comment",
    "!event !!",
    "{a,b}",
    "$'ansi\\x41'",
    "%j %x %A",
    "carriage\rreturn",
    "",
]


def test_there_are_at_least_twenty_nasty_strings():
    assert len(NASTY) >= 20


@pytest.mark.parametrize("value", NASTY)
def test_q_round_trips_through_bash(value):
    out = subprocess.run(["bash", "-c", f"printf %s {shell_quote(value)}"], capture_output=True)
    assert out.stdout.decode() == value


def test_q_quotes_lists_word_by_word():
    assert shell_quote(["a b", "c"]) == "'a b' c"
    with pytest.raises(UnquotedValueError):
        shell_quote({"a": 1})


def test_sb_refuses_anything_sbatch_would_mangle():
    assert sbatch_value("gpu:fake:2") == "gpu:fake:2"
    for value in ["a b", "a'b", "x\ny", "$(x)", "", "#"]:
        with pytest.raises(UnquotedValueError):
            sbatch_value(value)


def _override(tmp_path, name: str, text: str):
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / name).write_text(text, encoding="utf-8")
    return write_site(tmp_path, "dev", templates=str(templates))


def _request(**fields):
    return JobRequest(**{"name": "x$(id)", "command": ["true"], **fields})


def test_a_site_override_template_is_used(tmp_path):
    site = _override(tmp_path, "job.j2", "#!/bin/bash\necho {{ job.name|q }}\n")
    assert render_request(site, _request()) == "#!/bin/bash\necho 'x$(id)'\n"


@pytest.mark.parametrize(
    "body",
    [
        "{{ job.name }}",  # forgot |q
        "{{ job.name|upper }}",  # a filter that returns a plain string
        "{{ job.name|q ~ job.name }}",  # concatenation after quoting
        "{{ job.name|q|replace('x', 'y') }}",  # str methods drop the mark
        "{{ job.command|join(' ') }}",
        "{{ env }}",
        "{{ none }}",
        "{{ job.name|e }}",  # escaping for HTML is not quoting for a shell
    ],
)
def test_an_override_cannot_print_unquoted_values(tmp_path, body):
    site = _override(tmp_path, "job.j2", f"#!/bin/bash\necho {body}\n")
    with pytest.raises(InputError):
        render_request(site, _request())


def test_the_sandbox_blocks_dunder_tricks(tmp_path):
    body = "{{ (job.name|q).__class__('$(id)') }}"
    site = _override(tmp_path, "job.j2", f"#!/bin/bash\necho {body}\n")
    with pytest.raises(InputError):
        render_request(site, _request())


def test_a_partial_override_is_checked_too(tmp_path):
    site = _override(tmp_path, "_launch.j2", "{{ job.command[0] }}\n")
    with pytest.raises(InputError, match="unquoted value"):
        render_request(site, _request())


def test_undefined_variables_are_errors(tmp_path):
    site = _override(tmp_path, "job.j2", "#!/bin/bash\necho {{ no_such_thing|q }}\n")
    with pytest.raises(InputError, match="no_such_thing"):
        render_request(site, _request())


def test_nasty_values_run_byte_for_byte_without_a_cluster(tmp_path):
    """The rendered script, run by bash with the local site: every value arrives intact."""
    from aimass_hpc.scheduler import get_scheduler
    from aimass_hpc.submission import submit

    canary = tmp_path / "canary"
    values = [v.replace("CANARY", str(canary)) for v in NASTY]
    site = write_site(tmp_path, "local", runs=tmp_path / "runs $(touch x) `y` 'q'")
    workdir = tmp_path / "work dir $(touch w) ;'\" ü"
    workdir.mkdir()
    dump = (
        "import json, os, sys; "
        "json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
        "if k.startswith('NASTY_')}, 'name': os.environ['AIMASS_JOB_NAME'], 'cwd': os.getcwd()}, "
        "open(os.path.join(os.environ['AIMASS_RUN_DIR'], 'out.json'), 'w'))"
    )
    request = JobRequest(
        name=" ".join(values[:8]),
        command=[site.python, "-c", dump, *values],
        env={f"NASTY_{i}": v for i, v in enumerate(values)},
        workdir=str(workdir),
    )
    sub = submit(site, request)
    final = get_scheduler(site).wait([sub.job_id], timeout=60)[sub.job_id]
    assert final.state.value == "COMPLETED", sub.run_dir.log_file().read_text()
    import json

    got = json.loads((sub.run_dir.path / "out.json").read_text(encoding="utf-8"))
    assert got["argv"] == values
    assert got["env"] == {f"NASTY_{i}": v for i, v in enumerate(values)}
    assert got["name"] == request.name
    assert got["cwd"] == str(workdir)
    assert not canary.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [workdir.name, site.runs_root.name, "site-local.toml"]
    )
