"""Dashboard page load time at 1,000 jobs and 1,000 trials, against optuna-dashboard.

Builds a temporary dev-cluster site (tests/_sitefixtures.py) holding N run directories as
`aimass submit` leaves them (every 10th with training metrics), a few real jobs submitted to
the local cluster (`aimass submit --wait`), one search journal of T trials written through
the real Journal API, and a model repository with some versions. Serves it with the real app
(`aimass_hpc.dashboard.launch.prepare` + uvicorn, real HTTP) and times, in headless Chromium
(Playwright driving Debian's /usr/bin/chromium), each page from navigation to "content
ready" (its table rows, charts or figures present), median of --loads loads after one
warm-up load. Also times the list APIs (httpx, page_size 50, median of --api-repeat).

Peer: optuna-dashboard serving an Optuna JournalFileStorage study with the same T trials
(same params, values and failures), its study page (history plot + importance) and trials
list timed the same way; the ratio ours/peer is printed for the search page.

    .venv/bin/python benchmarks/bench_dashboard.py [--jobs 1000] [--trials 1000] [--loads 5]
        [--api-repeat 20] [--real-jobs 2] [--no-peer] [--json]

Needs the local cluster (`scripts/dev-cluster up`) for the real jobs and the Cluster page,
Debian's chromium, playwright, and optuna-dashboard (dev extra) for the peer. Temp dirs,
servers and the browser are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the site and run-dir builders the tests use

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PAGE_SIZE = 50
METRICS_EVERY = 10  # every 10th synthetic run is a training run (has metrics.jsonl)


def _cluster_env() -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "dev-cluster"), "env"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        line = line.removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            os.environ[key] = value.strip("'\"")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_metrics(run_dir: Path, steps: int, scale: float = 1.0) -> None:
    """metrics.jsonl as a built-in training's rank 0 writes it."""
    lines = [json.dumps({"kind": "event", "event": "start", "total_steps": steps})]
    lines += [json.dumps({"kind": "step", "step": s, "loss": scale / s, "samples_per_s": 100.0 + s,
                          "lr": 0.1}) for s in range(1, steps + 1)]  # fmt: skip
    lines.append(json.dumps({"kind": "epoch", "step": steps, "epoch": 1, "val_acc": 0.9}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- the data


@dataclass
class Fixture:
    site: Any
    job_id: str  # the job page measured (a real job if any was submitted)
    training_runs: list[str]
    search_id: str
    trials: list[dict[str, Any]]  # {"params", "value" | None (failed)}: the peer gets these
    real_jobs: int
    models: int


def build(
    tmp: Path, n_jobs: int, n_trials: int, n_real: int, say: Callable[[str], None]
) -> Fixture:
    """The site, runs, search and models the pages show."""
    from _sitefixtures import write_site
    from test_dashboard_api import make_models, make_run
    from test_dashboard_searches import make_search

    from aimass_hpc.launch import journal as J

    site = write_site(tmp, "dev")
    say(f"writing {n_jobs} run directories")
    training: list[str] = []
    for i in range(n_jobs):
        job_id = str(5_000_000 + i)
        state = "FAILED" if i % 17 == 16 else "COMPLETED"
        run = make_run(site.runs_root, f"bench-{i:04d}", job_id, state=state)
        if i % METRICS_EVERY == 0 or i == n_jobs - 1:
            _write_metrics(run.path, 200, scale=1.0 + i / n_jobs)
            training.append(job_id)
    job_id = training[-1]
    real = 0
    for k in range(n_real):  # real jobs on the dev cluster, their logs and scripts real
        spec = tmp / f"real-{k}.toml"
        command = '["bash", "-c", "echo hello from the dashboard bench"]'
        spec.write_text(f'[job]\nname = "bench-real-{k}"\ntime = "5"\ncommand = {command}\n')
        out = subprocess.run(
            [sys.executable, "-m", "aimass_hpc", "submit", "--site", str(site.source), str(spec),
             "--wait", "--json"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if out.returncode != 0:
            say(f"real job {k} not submitted: {out.stderr.strip().splitlines()[-1:]}")
            break
        sub = json.loads(out.stdout)
        _write_metrics(Path(sub["run_dir"]), 200)
        job_id = sub["job_id"]
        training.append(job_id)
        real += 1
    say(f"writing a search journal of {n_trials} trials")
    (tmp / "search").mkdir()
    sdir = make_search(site, tmp / "search", n_trials)
    trials = []
    for t in sdir.journal().state().trials.values():
        value = t.value if t.state == J.FINISHED else None
        trials.append({"params": dict(t.params), "value": value})
    say("saving model versions")
    repo = make_models(site.models_root)
    import torch

    for i in range(20):
        repo.save(f"net{i % 4}", {"w": torch.ones(4)}, model_type="classifier",
                  flops_per_sample=1e3 * (i + 1), metrics={"acc": i / 20})  # fmt: skip
    return Fixture(site, job_id, training[-2:], sdir.path.name, trials, real, 3 + 20)


# ---------------------------------------------------------------------------- servers


@contextlib.contextmanager
def ours(site: Any, tmp: Path) -> Iterator[tuple[str, str]]:
    """The real dashboard (prepare + uvicorn in a thread): (base URL, login token)."""
    import uvicorn

    from aimass_hpc.dashboard.launch import prepare

    port = _free_port()
    ready = prepare(site, host="127.0.0.1", port=port, token_file=str(tmp / "token"))
    server = uvicorn.Server(
        uvicorn.Config(ready.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/", ready.token
    finally:
        server.should_exit = True
        thread.join(10)


def write_optuna_journal(path: Path, trials: list[dict[str, Any]]) -> None:
    """An Optuna study with the same trials (JournalFileStorage: sqlite's per-trial commits
    take ~24 s for 1,000 trials here; the dashboard reads both)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    dists = {"x": FloatDistribution(-3.0, 3.0), "kind": CategoricalDistribution(["a", "b"])}
    study = optuna.create_study(study_name="quad", storage=storage, direction="minimize")
    study.add_trials([
        create_trial(params=t["params"], distributions=dists, value=t["value"])
        if t["value"] is not None
        else create_trial(params=t["params"], distributions=dists, state=TrialState.FAIL)
        for t in trials
    ])  # fmt: skip


@contextlib.contextmanager
def optuna_dashboard(journal: Path, log: Path) -> Iterator[str]:
    """`optuna-dashboard JOURNAL` as its users start it (default server), in a subprocess."""
    exe = Path(sys.executable).with_name("optuna-dashboard")
    port = _free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(exe), str(journal), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/api/meta", trust_env=False).is_success:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard did not start: {log.read_text()[-300:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- measuring


@dataclass
class PageSpec:
    page: str  # what the table calls it
    path: str  # relative to the base URL
    ready: str  # a JS expression, true once the content is there
    what: str  # what "ready" means, for the table


def _rows(table: str, n: int) -> str:
    return f"document.querySelectorAll('{table} tbody tr').length >= {n}"


def _total_shown() -> str:
    return "(document.getElementById('total')||{}).textContent !== '…'"


def _chart(canvas: str, min_sets: int = 1) -> str:
    return (
        f"(() => {{ const c = document.querySelector('{canvas}'); const g = c && window.Chart"
        f" && Chart.getChart(c); return !!g && g.data.datasets.length >= {min_sets}; }})()"
    )


def our_pages(fx: Fixture, n_jobs: int) -> list[PageSpec]:
    sid, runs = fx.search_id, fx.training_runs
    n_rows = min(PAGE_SIZE, n_jobs + fx.real_jobs)
    loss = '#curves [data-series="step-loss"] canvas'
    return [
        PageSpec("Jobs", "jobs", f"{_total_shown()} && {_rows('#jobs', n_rows)}",
                 f"{n_rows} rows + total"),
        PageSpec(f"Job {fx.job_id}", f"jobs/{fx.job_id}",
                 "document.getElementById('script').textContent.length > 0 &&"
                 " document.querySelectorAll('#metrics svg.chart').length >= 1 &&"
                 + (" document.getElementById('log').textContent.length > 0 &&"
                    if fx.real_jobs else "")
                 + " document.getElementById('state').textContent !== '…'",
                 "state, script, log, curves"),
        PageSpec(f"Training ({len(runs)} runs overlaid)", f"training?runs={','.join(runs)}",
                 f"{_rows('#runs', 1)} && {_chart(loss, len(runs))}",
                 f"runs rows + {len(runs)}-run loss chart"),
        PageSpec("Searches", "searches", f"{_total_shown()} && {_rows('#searches', 1)}", "rows"),
        PageSpec(f"Search ({len(fx.trials)} trials)", f"searches/{sid}",
                 f"{_rows('#trials', min(PAGE_SIZE, len(fx.trials)))} && {_chart('#best-chart')}"
                 f" && {_chart('#importance-chart')} && {_chart('#parallel-chart')}",
                 f"{min(PAGE_SIZE, len(fx.trials))} rows, best-so-far, importance, parallel"),
        PageSpec("Models", "models", f"{_total_shown()} && {_rows('#models', 1)}", "rows + total"),
        PageSpec("Services", "services", _total_shown(), "total (no services)"),
        PageSpec("Cluster", "cluster",
                 f"{_rows('#nodes', 1)} && {_rows('#partitions', 1)}", "partitions + nodes"),
    ]  # fmt: skip


def peer_pages(n_finished: int, n_trials: int) -> list[PageSpec]:
    return [
        PageSpec("Study (history + importance)", "dashboard/studies/0",
                 f"document.querySelectorAll('#plot-history .scatterlayer .points path').length"
                 f" >= {n_finished} && document.querySelectorAll("
                 "'#graph-hyperparameter-importances .barlayer path').length >= 2",
                 f"{n_finished} history points + importance bars"),
        PageSpec("Trials list", "dashboard/studies/0/trials",
                 "(document.body.innerText.match(/Trial \\d+/g) || []).length >"
                 f" {min(20, n_trials)} && document.body.innerText.includes('Completed At')",
                 "first 20 trials listed + one's details"),
    ]  # fmt: skip


def time_pages(
    browser: Any, base: str, cookies: dict[str, str], pages: list[PageSpec], loads: int
) -> list[dict[str, Any]]:
    """Median navigation -> ready time of each page over ``loads`` loads (after a warm-up)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if cookies:  # the session of an httpx login: the token is accepted once
        context.add_cookies([{"name": k, "value": v, "url": base} for k, v in cookies.items()])
    out = []
    for spec in pages:
        samples = []
        for i in range(loads + 1):
            start = time.perf_counter()
            page.goto(base + spec.path, wait_until="commit")
            # a function, not an expression: the app's CSP forbids eval()
            try:
                page.wait_for_function(f"() => ({spec.ready})", timeout=60_000)
            except PlaywrightTimeout:
                raise RuntimeError(f"{base}{spec.path}: not ready ({spec.what}) in 60 s") from None
            if i:  # the first load warms the browser's cache and the server's
                samples.append(time.perf_counter() - start)
        out.append({"page": spec.page, "path": spec.path, "ready_when": spec.what,
                    "median_s": statistics.median(samples), "min_s": min(samples),
                    "max_s": max(samples), "loads": loads})  # fmt: skip
    context.close()
    if errors:
        raise RuntimeError(f"page errors at {base}: {errors[:3]}")
    return out


def time_api(client: Any, paths: list[str], repeat: int) -> list[dict[str, Any]]:
    """Median wall time of GET ``path`` (after one warm-up), and the response size."""
    out = []
    for path in paths:
        resp = client.get(path)
        resp.raise_for_status()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            client.get(path).raise_for_status()
            samples.append(time.perf_counter() - start)
        out.append({"endpoint": path, "median_ms": statistics.median(samples) * 1000,
                    "bytes": len(resp.content)})  # fmt: skip
    return out


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    import httpx
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="aimass-bench-dash-"))
    try:
        fx = build(tmp, args.jobs, args.trials, args.real_jobs, say)
        result: dict[str, Any] = {
            "jobs": args.jobs + fx.real_jobs, "real_jobs": fx.real_jobs, "trials": len(fx.trials),
            "loads": args.loads, "api_repeat": args.api_repeat, "search_id": fx.search_id,
        }  # fmt: skip
        sid = fx.search_id
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                with (
                    ours(fx.site, tmp) as (base, token),
                    httpx.Client(base_url=base, trust_env=False, timeout=60) as client,
                ):
                    client.get("login", params={"token": token})
                    say("timing our pages")
                    result["ours"] = time_pages(
                        browser,
                        base,
                        dict(client.cookies),
                        our_pages(fx, args.jobs),
                        args.loads,
                    )
                    say("timing our list APIs")
                    q = f"?page_size={PAGE_SIZE}"
                    result["ours_api"] = time_api(client, [
                            f"api/jobs{q}", f"api/training{q}", f"api/searches{q}",
                            f"api/searches/{sid}", f"api/searches/{sid}/trials{q}",
                            f"api/searches/{sid}/plots", f"api/models{q}", f"api/services{q}",
                            "api/cluster",
                        ], args.api_repeat)  # fmt: skip
                if not args.no_peer:
                    result["peer"] = peer(browser, fx, tmp, args, say)
            finally:
                browser.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peer(
    browser: Any, fx: Fixture, tmp: Path, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    """optuna-dashboard over the same trials, or why it could not run."""
    import httpx

    if not Path(sys.executable).with_name("optuna-dashboard").exists():
        return {"skipped": "optuna-dashboard is not installed (pip install optuna-dashboard)"}
    say("writing the Optuna study")
    journal = tmp / "optuna-journal.log"
    write_optuna_journal(journal, fx.trials)
    finished = sum(t["value"] is not None for t in fx.trials)
    with optuna_dashboard(journal, tmp / "optuna-dashboard.log") as base:
        say("timing optuna-dashboard")
        pages = time_pages(browser, base, {}, peer_pages(finished, len(fx.trials)), args.loads)
        with httpx.Client(base_url=base, trust_env=False, timeout=60) as client:
            api = time_api(client, ["api/studies", "api/studies/0?after=0"], args.api_repeat)
    return {"pages": pages, "api": api}


def show(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    title = (f"Page load, navigation -> content ready: {result['jobs']:,} jobs"
             f" ({result['real_jobs']} real), {result['trials']:,} trials;"
             f" median of {result['loads']} loads after a warm-up")  # fmt: skip
    table = Table(title=title)
    for col in ("app", "page", "ready when", "median", "min", "max"):
        table.add_column(col, justify="right" if col in ("median", "min", "max") else "left")
    rows = [("aimass", r) for r in result["ours"]]
    peer = result.get("peer") or {}
    rows += [("optuna-dashboard", r) for r in peer.get("pages", [])]
    for app, r in rows:
        table.add_row(app, r["page"], r["ready_when"], f"{r['median_s'] * 1000:.0f} ms",
                      f"{r['min_s'] * 1000:.0f} ms", f"{r['max_s'] * 1000:.0f} ms")  # fmt: skip
    console.print(table)
    if "pages" in peer:
        ours_search = next(r for r in result["ours"] if r["page"].startswith("Search ("))
        for p in peer["pages"]:
            console.print(
                f"aimass search page / optuna-dashboard {p['page']}: "
                f"{ours_search['median_s'] / p['median_s']:.2f}"
            )
    elif peer:
        console.print(f"peer not measured: {peer.get('skipped')}")
    api = Table(title=f"Server-side API latency (httpx, page_size {PAGE_SIZE} where paged, "
                      f"median of {result['api_repeat']})")  # fmt: skip
    for col in ("app", "endpoint", "median", "response"):
        api.add_column(col, justify="right" if col in ("median", "response") else "left")
    for app, rs in (("aimass", result["ours_api"]), ("optuna-dashboard", peer.get("api", []))):
        for r in rs:
            endpoint = r["endpoint"].replace(result.get("search_id") or "\0", "SID")
            size = f"{r['bytes'] / 1024:.1f} KiB"
            api.add_row(app, endpoint, f"{r['median_ms']:.1f} ms", size)
    console.print(api)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--jobs", type=int, default=1000, help="synthetic run directories")
    parser.add_argument("--trials", type=int, default=1000, help="trials in the search journal")
    parser.add_argument("--loads", type=int, default=5, help="timed loads of each page")
    parser.add_argument("--api-repeat", type=int, default=20, help="timed calls of each API")
    parser.add_argument("--real-jobs", type=int, default=2,
                        help="real jobs submitted to the dev cluster (0: none)")  # fmt: skip
    parser.add_argument("--no-peer", action="store_true", help="skip optuna-dashboard")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if min(args.jobs, args.trials, args.loads, args.api_repeat) < 1 or args.real_jobs < 0:
        parser.error("--jobs, --trials, --loads and --api-repeat must be >= 1")
    _cluster_env()

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run(args, say)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)


if __name__ == "__main__":
    main()
