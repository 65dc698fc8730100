"""HPO benchmark: MCTSSampler against random search and Optuna's TPE.

    OMP_NUM_THREADS=1 python benchmarks/hpo/run.py                  # the full protocol
    python benchmarks/hpo/run.py --quick                            # a smoke run
    python benchmarks/hpo/run.py --seeds 5 --problems synthetic,breast_cancer-mlp --jobs 2

Protocol (issue 5): each method gets ``--budget`` trials, proposed in batches of 8 (ask 8,
evaluate, tell 8 in reverse order) and one at a time; seeds are paired across methods (seed s
is the same problem with sampler seed s). Reported per problem and mode:

* normalised simple regret at 25/50/100% of the budget:
  ``(best - f*) / (median random best at that budget - f*)``, the mean over seeds (1.0 is as
  good as a typical random search, 0 is the optimum). For the scikit-learn tasks f* is the
  lowest error any method ever reached (all runs and cached evaluations);
* the mean rank of the final best among the methods (1 = best; ties share ranks);
* the optimiser's own time per trial (ask + tell), and separately (``--latency``) the time of
  one ``ask`` once 1,000 trials are known.

Results go to a JSON file (``--out``, default under benchmarks/results/, git-ignored);
``--report FILE`` prints the tables of an earlier run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import Problem, all_problems  # noqa: E402

from aimass_hpc.hpo import MCTSSampler, RandomSampler, Sampler, Space  # noqa: E402

METHODS = ("mcts", "random", "tpe", "tpe-indep")
MODES = ("batch8", "seq")
SYNTHETIC = ("branin2", "hartmann6", "ackley10", "levy10", "rosenbrock10")
HPO = ("digits-mlp", "digits-rf", "breast_cancer-mlp", "breast_cancer-rf")


def make(method: str, space: Space, seed: int) -> Sampler:
    """A sampler by benchmark name."""
    if method == "mcts":
        return MCTSSampler(space, seed=seed)
    if method == "random":
        return RandomSampler(space, seed=seed)
    from aimass_hpc.hpo.optuna_adapter import OptunaTPESampler

    if method == "tpe":
        return OptunaTPESampler(space, seed=seed)
    if method == "tpe-indep":
        return OptunaTPESampler(space, seed=seed, multivariate=False, constant_liar=False)
    raise ValueError(method)


_SOURCES = {
    "mcts": ("mcts.py", "gp.py", "samplers.py", "space.py"),
    "random": ("samplers.py", "space.py"),
    "tpe": ("optuna_adapter.py", "samplers.py", "space.py"),
    "tpe-indep": ("optuna_adapter.py", "samplers.py", "space.py"),
}


def fingerprint(method: str) -> str:
    """What a method's result depends on: its source files (and Optuna's version)."""
    h = hashlib.sha256(method.encode())
    for name in _SOURCES[method]:
        h.update((ROOT / "aimass_hpc" / "hpo" / name).read_bytes())
    if method.startswith("tpe"):
        import optuna

        h.update(optuna.__version__.encode())
    return h.hexdigest()[:16]


def _run_key(problem: str, method: str, mode: str, seed: int, budget: int, prints: str) -> str:
    return f"{problem}|{method}|{mode}|{seed}|{budget}|{prints}"


def load_runs(cache: str | None) -> dict[str, dict[str, Any]]:
    """Finished runs memoised under the cache dir, by key (a torn last line is skipped)."""
    f = Path(cache) / "runs.jsonl" if cache else None
    out: dict[str, dict[str, Any]] = {}
    if f and f.exists():
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["key"]] = rec["run"]
    return out


def run_one(
    problem: str, method: str, mode: str, seed: int, budget: int, cache: str | None, key: str = ""
):
    """One optimisation run, memoised in ``cache``/runs.jsonl under ``key`` when both are given.

    The key is computed by the caller before the run starts: a worker process runs the code
    it imported, which may no longer be what is on disk when the run ends.
    """
    run = _run_uncached(problem, method, mode, seed, budget, cache)
    if cache and key:
        line = json.dumps({"key": key, "run": run})
        fd = os.open(Path(cache) / "runs.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    return run


def _run_uncached(
    problem: str, method: str, mode: str, seed: int, budget: int, cache: str | None
) -> dict[str, Any]:
    """One optimisation run; returns the best-so-far trace and the optimiser's own time."""
    prob = all_problems(Path(cache) if cache else None)[problem]
    sampler = make(method, prob.space, seed)
    batch = 8 if mode == "batch8" else 1
    values: list[float] = []
    t_ask = t_tell = 0.0
    asks = 0
    while len(values) < budget:
        t0 = time.perf_counter()
        trials = sampler.ask(min(batch, budget - len(values)))
        t_ask += time.perf_counter() - t0
        asks += 1
        results = [(t.id, prob.objective(t.params)) for t in trials]
        for tid, v in reversed(results):  # results arrive out of order
            t0 = time.perf_counter()
            sampler.tell(tid, v)
            t_tell += time.perf_counter() - t0
            values.append(v)
    trace = np.minimum.accumulate(np.array(values)).tolist()
    return {
        "problem": problem,
        "method": method,
        "mode": mode,
        "seed": seed,
        "trace": trace,
        "ms_per_trial": 1000 * (t_ask + t_tell) / budget,
        "ms_per_ask": 1000 * t_ask / asks,
    }


def latency(n_known: int, methods: list[str], repeats: int = 20) -> list[dict[str, Any]]:
    """Time of one ask (n=1) once ``n_known`` trials are known, on a mixed conditional space."""
    from problems import hartmann6, mlp_space

    out = []
    spaces = {"mlp-space": mlp_space(), "hartmann6": all_problems(None)["hartmann6"].space}
    for sname, space in spaces.items():
        rng = np.random.default_rng(0)
        known = [space.sample(rng) for _ in range(n_known + repeats)]

        def value(p, sname=sname):
            if sname == "hartmann6":
                return hartmann6(p)
            return float(np.log(p["learning_rate_init"]) ** 2 / 10 + p.get("momentum", 0.5))

        for method in methods:
            s = make(method, space, 0)
            for i in range(n_known):
                s.observe(i, known[i], value(known[i]))
            reps = repeats if method in ("mcts", "random") else max(3, repeats // 4)
            (trial,) = s.ask(1)  # warm-up: lazy imports, first fit
            s.tell(trial.id, value(trial.params))
            times, cpu = [], []
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                (trial,) = s.ask(1)
                times.append(1000 * (time.perf_counter() - t0))
                cpu.append(1000 * (time.process_time() - c0))
                s.tell(trial.id, value(trial.params))
            out.append(
                {
                    "space": sname,
                    "method": method,
                    "known": n_known,
                    "median_ms": float(np.median(times)),
                    "max_ms": float(np.max(times)),
                    "median_cpu_ms": float(np.median(cpu)),
                }
            )
    return out


# ----------------------------------------------------------------------------- reporting
def summarise(runs: list[dict[str, Any]], budget: int, f_stars: dict[str, float]):
    """Normalised regrets, ranks and timings per (mode, problem, method)."""
    marks = sorted({max(1, round(budget * q)) for q in (0.25, 0.5, 1.0)})
    by = defaultdict(list)
    for r in runs:
        by[(r["mode"], r["problem"], r["method"])].append(r)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (mode, problem, method), rs in by.items():
        fstar = f_stars[problem]
        rand = by.get((mode, problem, "random"), [])
        row: dict[str, Any] = {"seeds": len(rs)}
        for m in marks:
            if rand:
                ref = float(np.median([x["trace"][m - 1] for x in rand])) - fstar
            else:
                ref = float("nan")
            regrets = [(x["trace"][m - 1] - fstar) / ref if ref > 0 else 0.0 for x in rs]
            row[f"regret@{m}"] = float(np.mean(regrets))
        row["ms_per_trial"] = float(np.mean([x["ms_per_trial"] for x in rs]))
        row["ms_per_ask"] = float(np.mean([x["ms_per_ask"] for x in rs]))
        rows[(mode, problem, method)] = row
    # Ranks of the final best among the methods, per (mode, problem, seed).
    ranks = defaultdict(list)
    cell = defaultdict(dict)
    for r in runs:
        cell[(r["mode"], r["problem"], r["seed"])][r["method"]] = r["trace"][-1]
    for (mode, problem, _seed), res in cell.items():
        names = sorted(res)
        vals = np.array([res[n] for n in names])
        for n, v in zip(names, vals, strict=True):
            rank = 1 + np.sum(vals < v - 1e-12) + 0.5 * (np.sum(np.abs(vals - v) <= 1e-12) - 1)
            ranks[(mode, problem, n)].append(float(rank))
    for key, rk in ranks.items():
        rows[key]["rank"] = float(np.mean(rk))
    return marks, rows, ranks


def paired_vs_tpe(finals: dict, mode: str, problem: str, method: str) -> str:
    """Seeds where ``method``'s final best beat, tied or lost to default TPE's (same seed)."""
    mine, ref = finals.get((mode, problem, method)), finals.get((mode, problem, "tpe"))
    if method == "tpe" or not mine or not ref:
        return ""
    seeds = sorted(set(mine) & set(ref))
    win = sum(mine[s] < ref[s] - 1e-12 for s in seeds)
    loss = sum(mine[s] > ref[s] + 1e-12 for s in seeds)
    return f"{win}/{len(seeds) - win - loss}/{loss}"


def print_tables(result: dict[str, Any], console: Console) -> None:
    budget = result["budget"]
    marks, rows, ranks = summarise(result["runs"], budget, result["f_star"])
    methods = [m for m in METHODS if any(k[2] == m for k in rows)]
    modes = [m for m in MODES if any(k[0] == m for k in rows)]
    problems = [p for p in (*SYNTHETIC, *HPO) if any(k[1] == p for k in rows)]
    finals: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in result["runs"]:
        finals[(r["mode"], r["problem"], r["method"])][r["seed"]] = r["trace"][-1]
    for mode in modes:
        t = Table(
            title=f"{mode}: normalised simple regret (mean over seeds; random median = 1), "
            f"mean rank of final best, optimiser ms/trial"
        )
        t.add_column("problem", no_wrap=True)
        t.add_column("method", no_wrap=True)
        for m in marks:
            t.add_column(f"regret@{m}", justify="right", no_wrap=True)
        t.add_column("rank", justify="right")
        t.add_column("vs tpe W/T/L", justify="right")
        t.add_column("ms/trial", justify="right")
        for p in problems:
            best_rank = min(rows[(mode, p, m)]["rank"] for m in methods if (mode, p, m) in rows)
            for i, m in enumerate(methods):
                row = rows.get((mode, p, m))
                if row is None:
                    continue
                rank = f"{row['rank']:.2f}"
                if row["rank"] == best_rank:
                    rank = f"[bold]{rank}[/bold]"
                t.add_row(
                    p if i == 0 else "",
                    m,
                    *[f"{row[f'regret@{k}']:.3f}" for k in marks],
                    rank,
                    paired_vs_tpe(finals, mode, p, m),
                    f"{row['ms_per_trial']:.1f}",
                    end_section=i == len(methods) - 1,
                )
        console.print(t)
    # Summary: mean rank per method over problem groups.
    s = Table(title="mean rank of the final best (lower is better), by group and mode")
    s.add_column("group")
    s.add_column("mode")
    for m in methods:
        s.add_column(m, justify="right")
    groups = {
        "synthetic": [p for p in problems if p in SYNTHETIC],
        "hpo": [p for p in problems if p in HPO],
        "all": problems,
    }
    for gname, plist in groups.items():
        if not plist:
            continue
        for mode in [*modes, "both"]:
            mlist = modes if mode == "both" else [mode]
            vals = {
                m: np.mean([r for md in mlist for p in plist for r in ranks[(md, p, m)]])
                for m in methods
            }
            best = min(vals.values())
            s.add_row(
                gname,
                mode,
                *[
                    f"[bold]{vals[m]:.2f}[/bold]" if vals[m] == best else f"{vals[m]:.2f}"
                    for m in methods
                ],
            )
    console.print(s)
    if result.get("latency"):
        lt = Table(title="time of one ask (n=1) with trials already known (wall and CPU)")
        for c in ("space", "method", "known", "median ms", "max ms", "median CPU ms"):
            lt.add_column(c, justify="right" if "ms" in c or c == "known" else "left")
        for r in result["latency"]:
            lt.add_row(
                r["space"], r["method"], str(r["known"]), f"{r['median_ms']:.2f}",
                f"{r['max_ms']:.2f}", f"{r.get('median_cpu_ms', float('nan')):.2f}",
            )  # fmt: skip
        console.print(lt)


# ---------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    ap.add_argument("--budget", type=int, default=100, help="trials per run (default 100)")
    ap.add_argument(
        "--problems",
        default="all",
        help="comma list of problem names, or synthetic / hpo / all (default all)",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (default all)")
    ap.add_argument("--modes", default=",".join(MODES), help="batch8,seq (default both)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 2 seeds, 40 trials, 2 problems"
    )
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument(
        "--cache-dir",
        default=os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aimass-hpo-bench"
        ),
        help="where scikit-learn evaluations are memoised ('' for none)",
    )
    ap.add_argument(
        "--latency", type=int, default=1000, help="known trials for the ask timing (0: skip)"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="re-run even runs memoised in the cache dir"
    )
    ap.add_argument("--out", default="", help="JSON results file (default benchmarks/results/...)")
    ap.add_argument("--report", default="", help="print the tables of an earlier results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.budget = min(args.seeds, 2), min(args.budget, 40)
        if args.problems == "all":
            args.problems = "branin2,hartmann6"
        args.latency = min(args.latency, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console(width=max(100, Console().width))
    if args.report:
        print_tables(json.loads(Path(args.report).read_text()), console)
        return 0
    cache = args.cache_dir or None
    known = all_problems(Path(cache) if cache else None)
    names: list[str] = []
    for item in args.problems.split(","):
        item = item.strip()
        if item in ("all", "synthetic", "hpo"):
            names += [p for p in (*SYNTHETIC, *HPO) if item == "all" or known[p].group == item]
        elif item in known:
            names.append(item)
        else:
            console.print(f"unknown problem {item!r}; known: {', '.join(known)}")
            return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS] + [m for m in modes if m not in MODES]:
        console.print(f"unknown method/mode {bad}; methods {METHODS}, modes {MODES}")
        return 2
    if "random" not in methods:
        methods.append("random")  # the regret normaliser
    # Seed-major order: a run stopped early has whole seeds for every problem, which the
    # memo then serves to ``--seeds K``.
    prints = {m: fingerprint(m) for m in methods}
    jobs = [
        (p, m, mode, s, args.budget, cache, _run_key(p, m, mode, s, args.budget, prints[m]))
        for s in range(args.seeds)
        for p in names
        for mode in modes
        for m in methods
    ]
    runs: list[dict[str, Any]] = []
    t0 = time.time()
    if cache and not args.fresh:
        # Runs whose method's code and settings are unchanged are taken from the memo.
        Path(cache).mkdir(parents=True, exist_ok=True)
        memo = load_runs(cache)
        todo = []
        for j in jobs:
            hit = memo.get(j[-1])
            if hit is None:
                todo.append(j)
            else:
                runs.append(hit)
        if len(todo) < len(jobs):
            console.print(f"{len(jobs) - len(todo)} of {len(jobs)} runs taken from the memo")
        jobs = todo
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("runs", total=len(jobs))
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                futs = [pool.submit(run_one, *j) for j in jobs]
                for f in as_completed(futs):
                    runs.append(f.result())
                    progress.advance(task)
        else:
            for j in jobs:
                runs.append(run_one(*j))
                progress.advance(task)
    f_stars: dict[str, float] = {}
    problems_used: dict[str, Problem] = {
        p: all_problems(Path(cache) if cache else None)[p] for p in names
    }
    for p, prob in problems_used.items():
        if prob.f_star is not None:
            f_stars[p] = prob.f_star
        else:
            seen = [r["trace"][-1] for r in runs if r["problem"] == p]
            cached = prob.objective.cached_best if hasattr(prob.objective, "cached_best") else None
            f_stars[p] = min(seen + ([cached] if cached is not None else []))
    result = {
        "argv": sys.argv[1:] if argv is None else argv,
        "budget": args.budget,
        "seeds": args.seeds,
        "wall_s": time.time() - t0,
        "f_star": f_stars,
        "runs": runs,
        "latency": latency(args.latency, methods) if args.latency else [],
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / (time.strftime("hpo-%Y%m%d-%H%M%S") + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    print_tables(result, console)
    console.print(f"results: {out}  ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
