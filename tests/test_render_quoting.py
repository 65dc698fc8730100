"""Quoting is enforced by the template layer: values never change a script's meaning."""

from __future__ import annotations

import subprocess

import pytest
from _sitefixtures import write_site

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.job_spec import JobRequest, request_from_mapping
from aimass_hpc.launch.render import (
    UnquotedValueError,
    check_script_syntax,
    comment_text,
    env_name,
    render_request,
    sbatch_value,
    shell_quote,
)

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
    "",
]

# Refused in every value (aimass_hpc.common.names): no argv/env can carry NUL; sbatch refuses CR-LF.
REFUSED = ["carriage\rreturn", "dos line\r\n", "nul\x00byte"]


def test_there_are_at_least_twenty_nasty_strings():
    assert len(NASTY) >= 20


@pytest.mark.parametrize("value", NASTY)
def test_q_round_trips_through_bash(value):
    out = subprocess.run(["bash", "-c", f"printf %s {shell_quote(value)}"], capture_output=True)
    assert out.stdout.decode() == value


@pytest.mark.parametrize("value", REFUSED)
def test_nul_and_cr_are_refused_in_every_job_value(value):
    for fields in (
        {"command": ["echo", value]},
        {"env": {"X": value}},
        {"name": value},
        {"workdir": value},
    ):
        with pytest.raises(InputError, match=f"job.{next(iter(fields))}"):
            request_from_mapping({"name": "x", "command": ["true"], **fields}, where="job")


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
    from aimass_hpc.launch.scheduler import get_scheduler
    from aimass_hpc.launch.submit import submit

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


# --------------------------------------------------------------------------- issue 10


def test_an_env_name_ending_in_a_newline_is_refused_in_a_job_spec(tmp_path):
    """It used to render `export FOO` and a separate line `=x` that bash ran."""
    from aimass_hpc.config.job_spec import load_job_spec

    spec = tmp_path / "job.toml"
    spec.write_text('[job]\nname = "x"\ncommand = ["true"]\n[job.env]\n"FOO\\n" = "x"\n')
    with pytest.raises(InputError, match=r"job\.env\['FOO\\n'\]: .*environment variable name"):
        load_job_spec(spec)
    with pytest.raises(ValueError, match="environment variable name"):
        JobRequest(name="x", command=["true"], env={"FOO\n": "x"})


@pytest.mark.parametrize("value", ["FOO\n", "\nFOO", "FO\nO", "FOO ", "F-O", "1FOO", "FÖÖ", ""])
def test_ident_refuses_anything_but_a_whole_name(value):
    with pytest.raises(UnquotedValueError):
        env_name(value)
    assert env_name("_FOO_1") == "_FOO_1"


@pytest.mark.parametrize("value", ["gpu\n", "a\r", "x\x00", "ü"])
def test_sb_matches_the_whole_value(value):
    with pytest.raises(UnquotedValueError):
        sbatch_value(value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partition", "debug\n"),
        ("account", "acct\n"),
        ("qos", "normal\n"),
        ("reservation", "resv\n"),
        ("constraint", "feat\n"),
        ("dependency", "afterok:1\n"),
        ("array", "0-3\n"),
        ("mem", "1G\n"),
        ("sbatch_extra", ["--comment=x\n"]),
        ("sbatch_extra", ["--comment\n=x"]),
    ],
)
def test_slurm_values_with_a_trailing_newline_are_refused(field, value):
    with pytest.raises(InputError, match=f"job.{field}"):
        request_from_mapping({"name": "x", "command": ["true"], field: value}, where="job")


@pytest.mark.parametrize("value", ["a\nb", "end\n", "\x1b[31mred", "nul\x00", "cr\r", "\u2028x"])
def test_comment_keeps_any_value_on_one_comment_line(value):
    text = comment_text(value)
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert text.isprintable()
    script = f"#!/bin/bash\n# {text}\necho ok\n"
    assert subprocess.run(["bash", "-c", script], capture_output=True).stdout == b"ok\n"


def test_a_site_override_can_show_any_value_in_a_comment(tmp_path):
    site = _override(tmp_path, "job.j2", "#!/bin/bash\n# job {{ job.name|comment }}\ntrue\n")
    script = render_request(site, _request(name="two\nlines 'q' $(x)"))
    assert script.splitlines()[1] == "# job two\\x0alines 'q' $(x)"


def test_render_refuses_a_script_bash_cannot_parse(tmp_path):
    site = _override(tmp_path, "job.j2", "#!/bin/bash\nif true; then\necho {{ job.name|q }}\n")
    with pytest.raises(InputError, match=r"template job\.j2 .*not valid bash: .*line"):
        render_request(site, _request())


def test_check_script_syntax_names_where():
    check_script_syntax("#!/bin/bash\necho 'ok'\n", "here")
    with pytest.raises(InputError, match=r"^here: the rendered script is not valid bash"):
        check_script_syntax("echo 'unterminated\n", "here")


def test_submit_and_render_cli_refuse_a_broken_template(tmp_path):
    """Every caller goes through render_request: `aimass render` exits 2 and queues nothing."""
    import sys

    site = _override(tmp_path, "job.j2", "#!/bin/bash\necho 'unterminated {{ job.name|q }}\n")
    spec = tmp_path / "job.toml"
    spec.write_text('[job]\nname = "x"\ncommand = ["true"]\n')
    for command in (["render"], ["submit", "--dry-run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "aimass_hpc", *command, str(spec), "--site", site.source],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "template job.j2" in proc.stderr and "not valid bash" in proc.stderr
    assert not site.runs_root.exists() or not any(site.runs_root.iterdir())
