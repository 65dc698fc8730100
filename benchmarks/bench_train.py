"""Training benchmarks, printed as ratios against hand-written peers.

1. Framework overhead: seconds per step of the built-in ``Trainer`` (metrics to a run dir,
   stop-signal checks, scheduler bookkeeping) against a plain PyTorch loop over the same model,
   data, optimizer and batches, in one process. Target: ratio <= 1.05.
2. Launch latency: from invoking ``aimass train`` to the first training step in the job,
   against a hand-written sbatch script that starts the same workload with ``srun``
   (torch.distributed set up by hand). Needs the local Slurm cluster. Target: ratio <= 1.1.
3. With ``--device cuda``: samples/s of the synthetic model through the trainer vs the plain
   loop on one GPU (run it where a GPU is present).
4. CLI start-up (login side, part of 2): wall time of ``aimass --version`` and of
   ``aimass train examples/digits/spec.toml --dry-run`` (start-up + site load + render +
   ``bash -n``) as subprocesses, against a bare ``python -c pass``; then the top-level imports
   of ``aimass train --help`` and of that dry run by ``-X importtime`` cumulative time (median
   over the runs). ``--bytecode-cache`` gives these subprocesses a private
   ``PYTHONPYCACHEPREFIX`` (what an installed package has) where ``PYTHONDONTWRITEBYTECODE``
   would make every start compile the package's sources again.

    .venv/bin/python benchmarks/bench_train.py                 # all, on the dev cluster
    .venv/bin/python benchmarks/bench_train.py --skip-launch   # overhead + CLI, no Slurm jobs
    .venv/bin/python benchmarks/bench_train.py --skip-overhead --skip-launch  # CLI only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "synthetic"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import synthetic_mlp  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from aimass_hpc.runtime import rng  # noqa: E402
from aimass_hpc.runtime.config import TrainParams  # noqa: E402
from aimass_hpc.runtime.distributed import LocalBackend  # noqa: E402
from aimass_hpc.runtime.env import WorldInfo  # noqa: E402
from aimass_hpc.runtime.metrics import MetricsWriter  # noqa: E402
from aimass_hpc.runtime.task import TrainTask  # noqa: E402
from aimass_hpc.runtime.trainer import Trainer  # noqa: E402

# ----------------------------------------------------------------------------- overhead


def make_task(size: dict[str, int]) -> TrainTask:
    x, y = synthetic_mlp.make_data(size["samples"], size["features"])
    model = synthetic_mlp.make_model(size["features"], size["width"], size["depth"])
    return TrainTask(model=model, train=(x, y), loss=nn.MSELoss())


def run_trainer(size: dict[str, int], steps: int, batch: int, device: str) -> list[float]:
    """Step-to-step intervals (s) of Trainer.fit, from its own per-step metrics records."""
    from aimass_hpc.runtime.metrics import read_metrics

    rng.seed_everything(0)
    task = make_task(size)
    params = TrainParams(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=batch, steps=steps)
    backend = LocalBackend(WorldInfo(), torch.device(device))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(task, params, backend=backend, metrics=MetricsWriter(run_dir))
        trainer.fit()
        records = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
    # samples_per_s = batch / (time since the previous step ended): invert it.
    return [batch / r["samples_per_s"] for r in records[WARMUP:]]


def run_plain(size: dict[str, int], steps: int, batch: int, device: str) -> list[float]:
    """Step-to-step intervals (s) of the loop a user would write by hand."""
    rng.seed_everything(0)
    task = make_task(size)
    model = task.model.to(device)
    x_all, y_all = task.train  # type: ignore[misc]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.MSELoss()
    order = torch.randperm(len(x_all))
    intervals = []
    last = time.perf_counter()
    for i in range(steps):
        idx = order[i * batch : (i + 1) * batch]
        x, y = x_all[idx].to(device, non_blocking=True), y_all[idx].to(device, non_blocking=True)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss = loss.detach()  # what a hand-written loop keeps for logging
        now = time.perf_counter()
        intervals.append(now - last)
        last = now
    return intervals[WARMUP:]


WARMUP = 3


def overhead(size: dict[str, int], steps: int, batch: int, repeats: int, device: str) -> dict:
    """Median step interval of both over all runs, alternating runs so that load changes on a
    shared machine hit both alike. On a GPU, intervals include queueing, so use many steps."""
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    plain: list[float] = []
    trainer: list[float] = []
    run_plain(size, 5, batch, device)  # warm up allocator / kernels
    for _ in range(repeats):
        plain += run_plain(size, steps, batch, device)
        trainer += run_trainer(size, steps, batch, device)
    p, t = statistics.median(plain), statistics.median(trainer)
    return {"plain_s_per_step": p, "trainer_s_per_step": t, "ratio": t / p, "batch": batch}


# ----------------------------------------------------------------------------- launch latency

PLAIN_STEP = r"""
import os, sys, time
t_start = time.time()
# For the benchmark only: when this process started (as aimass's runtime reports it).
_tick = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
t_process = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - _tick)
import torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, os.environ["DIGITS_DIR"])
import digits_mlp
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']}", rank=rank, world_size=world)
torch.manual_seed(0)
task = digits_mlp.build()
model = nn.parallel.DistributedDataParallel(task.model)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = task.train
idx = torch.randperm(len(x))[: 64 // world]
opt.zero_grad()
task.loss(model(x[idx]), y[idx]).backward()
opt.step()
if rank == 0:
    with open(os.environ["FIRST_STEP_FILE"], "w") as fh:
        fh.write(f"{time.time()} {t_process}")
dist.destroy_process_group()
"""

PLAIN_SBATCH = """#!/bin/bash
#SBATCH --job-name=plain-train
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks}
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
#SBATCH --output={out}/slurm-%j.out
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$(scontrol show node -o "$first" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export DIGITS_DIR={digits} FIRST_STEP_FILE={out}/first_step OMP_NUM_THREADS=1
srun --kill-on-bad-exit=1 {python} {out}/plain.py
"""

AIMASS_SPEC = """
name = "bench-launch"
pythonpath = [{digits}]
[task]
ref = "digits_mlp:build"
[train]
batch_size = 64
steps = 2
[model]
name = "bench-launch"
[job]
nodes = {nodes}
tasks_per_node = {tasks}
cpus_per_task = 1
time = "00:05:00"
"""


JOBS: list[str] = []  # every job this benchmark queued, waited for before cleaning up
CLI_SECONDS: list[float] = []  # how long `aimass train` itself took (part of its latency)


class Launch(NamedTuple):
    """One launch: seconds from the command to the first step, and of those the seconds from
    the submission to the start of rank 0's process (Slurm's queue wait, and batch shell and
    srun starting the task)."""

    latency: float
    queued: float


class LaunchFailed(RuntimeError):
    """The job ended before its first step (e.g. its rendezvous port was taken: every node
    of the dev cluster is this machine). The launch is tried again; it is not a result."""


def _job_gone(job_id: str) -> bool:
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True
    ).stdout.split()
    return job_id not in queued


def _wait_file(path: Path, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        if time.monotonic() - checked > 2:
            checked = time.monotonic()
            if _job_gone(job_id) and not path.exists():
                raise LaunchFailed(f"job {job_id} ended without a first step")
        time.sleep(0.05)


def _wait_idle(timeout: float = 120) -> None:
    """Until every job this benchmark queued has left the queue.

    Each launch starts on an idle cluster: the previous job's tail (an aimass job saves its
    checkpoint and final model after the first step; any job's interpreter exits) would
    otherwise share the two cores with the next launch and be counted in its latency.
    """
    deadline = time.monotonic() + timeout
    while JOBS and time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(JOBS)], capture_output=True, text=True
        ).stdout.split()
        if not queued:
            return
        time.sleep(0.2)


def _retrying(launch_once: Any, *args: Any) -> Launch:
    """``launch_once(*args)`` on an idle cluster, tried up to three times when the job
    failed to start."""
    for attempt in range(3):
        _wait_idle()
        try:
            return launch_once(*args)
        except LaunchFailed as exc:
            print(f"bench: {exc}; launching again", file=sys.stderr)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def launch_plain(work: Path, nodes: int, tasks: int) -> Launch:
    out = Path(tempfile.mkdtemp(dir=work))
    (out / "plain.py").write_text(PLAIN_STEP)
    script = out / "job.sh"
    script.write_text(
        PLAIN_SBATCH.format(
            nodes=nodes,
            tasks=tasks,
            out=out,
            digits=ROOT / "examples" / "digits",
            python=sys.executable,
        )
    )
    t0 = time.time()
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True
    )
    submitted = time.time()
    JOBS.append(proc.stdout.strip().split(";")[0])
    _wait_file(out / "first_step", JOBS[-1])
    first_step, rank_started = map(float, (out / "first_step").read_text().split())
    return Launch(first_step - t0, rank_started - submitted)


def launch_aimass(work: Path, site: str, nodes: int, tasks: int) -> Launch:
    out = Path(tempfile.mkdtemp(dir=work))
    spec = out / "spec.toml"
    spec.write_text(
        AIMASS_SPEC.format(
            digits=json.dumps(str(ROOT / "examples" / "digits")), nodes=nodes, tasks=tasks
        )
    )
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "train", str(spec), "--site", site, "--json"],
        capture_output=True,
        text=True,
    )
    CLI_SECONDS.append(time.time() - t0)
    if proc.returncode != 0:
        raise SystemExit(f"aimass train failed ({proc.returncode}): {proc.stderr.strip()}")
    JOBS.append(json.loads(proc.stdout)["job_id"])
    run_dir = Path(json.loads(proc.stdout)["run_dir"])
    submitted = json.loads((run_dir / "state.json").read_text())["submitted_at"]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    checked = time.monotonic()
    while True:
        if time.monotonic() - checked > 2:
            checked = time.monotonic()
            if _job_gone(JOBS[-1]) and not metrics.exists():
                raise LaunchFailed(f"job {JOBS[-1]} ended without a first step")
        if metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            start = next((r for r in records if r.get("event") == "start"), None)
            for rec in records:
                if rec.get("kind") == "step" and start is not None:
                    # The step record's wall time is taken right after the step finished;
                    # the start record says how long rank 0 had been running by then.
                    rank_started = start["time"] - start["startup_s"]
                    return Launch(rec["time"] - t0, rank_started - submitted)
        if time.monotonic() > deadline:
            raise TimeoutError("no first step")
        time.sleep(0.05)


def _bench_site(work: Path, base: str, srun_mpi: str | None) -> str:
    """A copy of the site with runs/models under ``work`` (the benchmark leaves no trace)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _sitefixtures import site_data, write_site

    top = {}
    if srun_mpi is not None:  # e.g. "none": torch.distributed needs no PMI from srun
        top["mpi"] = {**site_data(base)["mpi"], "srun_mpi": srun_mpi}
    return str(write_site(work, base, **top).source)


def launch(
    site_base: str,
    nodes: int,
    tasks: int,
    repeats: int,
    srun_mpi: str | None = None,
    bytecode: bool = False,
) -> dict:
    """Median seconds from submit to the first step, both ways, alternating.

    Slurm on the dev cluster starts a job at its next scheduling pass (every second here),
    so each launch also waits 0-1 s in the queue, by chance: the largest noise in a ratio of
    a few launches. Besides the raw figures this reports them with each launch's own queue
    wait (submission to rank 0's process start) replaced by the mean wait of all launches:
    the same expected value (the wait does not depend on who submitted; the time before
    ``sbatch`` stays in), with that part of the noise gone.

    With ``bytecode`` both ways run with a private ``PYTHONPYCACHEPREFIX`` (the job inherits
    the environment from sbatch), as an installed package has its compiled modules; without
    it, where ``PYTHONDONTWRITEBYTECODE`` is set, every rank compiles aimass_hpc's sources anew.
    One unmeasured launch of each warms the page cache (and that bytecode cache).
    """
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        work = Path(tmp)
        site = _bench_site(work, site_base, srun_mpi)
        if bytecode:
            os.environ.update(_cli_env(work / "pycache"))
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        _retrying(launch_plain, work, nodes, tasks)  # warm-up, not measured
        _retrying(launch_aimass, work, site, nodes, tasks)
        CLI_SECONDS.clear()
        plain, ours = [], []
        for _ in range(repeats):
            plain.append(_retrying(launch_plain, work, nodes, tasks))
            ours.append(_retrying(launch_aimass, work, site, nodes, tasks))
        _wait_idle(timeout=600)  # let the jobs finish writing before their directories go
        p, a = (
            statistics.median(x.latency for x in plain),
            statistics.median(x.latency for x in ours),
        )
        wait = statistics.mean(x.queued for x in plain + ours)
        p_adj = statistics.median(x.latency - x.queued + wait for x in plain)
        a_adj = statistics.median(x.latency - x.queued + wait for x in ours)
        return {
            "plain_s": p,
            "aimass_s": a,
            "ratio": a / p,
            # Robust to a shared machine's load spikes: each pair ran back to back.
            "paired_diff_s": statistics.median(
                x.latency - y.latency for x, y in zip(ours, plain, strict=True)
            ),
            "min_ratio": min(x.latency for x in ours) / min(x.latency for x in plain),
            "aimass_cli_s": statistics.median(CLI_SECONDS),
            "mean_queue_wait_s": wait,
            "plain_wait_adjusted_s": p_adj,
            "aimass_wait_adjusted_s": a_adj,
            "wait_adjusted_ratio": a_adj / p_adj,
            "plain_all": [x._asdict() for x in plain],
            "aimass_all": [x._asdict() for x in ours],
        }


# ----------------------------------------------------------------------------- CLI start-up

DIGITS_SPEC = ROOT / "examples" / "digits" / "spec.toml"


def _cli_env(bytecode_dir: Path | None) -> dict[str, str]:
    """The environment of the measured commands; with ``bytecode_dir`` compiled modules are
    kept there (and reused) even where ``PYTHONDONTWRITEBYTECODE`` is set."""
    env = dict(os.environ)
    if bytecode_dir is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_dir)
    return env


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_times(
    argv: list[str], env: dict[str, str], repeats: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys, its children included) seconds of ``argv`` run ``repeats``
    times, after one unmeasured warm-up run. CPU time moves less than wall time when other
    work shares the machine."""
    subprocess.run(argv, env=env, capture_output=True, check=True)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _child_cpu(), time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(_child_cpu() - c0)
    return walls, cpus


def _top_imports(argv: list[str], env: dict[str, str], repeats: int, top: int) -> list[dict]:
    """The ``top`` top-level imports of ``python -X importtime ARGV`` by median cumulative time.

    Top level means imported by the command itself, not by another module: a module the
    command imports inside a function (``aimass_hpc.config.site`` in ``train``) shows here.
    """
    seen: dict[str, list[tuple[int, int]]] = {}
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", *argv],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            self_us, cum_us, name = line.removeprefix("import time:").split("|")
            if len(name) - len(name.lstrip()) != 1:  # nested: inside its importer's figure
                continue
            seen.setdefault(name.strip(), []).append((int(self_us), int(cum_us)))
    rows = [
        {
            "module": name,
            "cumulative_ms": statistics.median(c for _, c in times) / 1e3,
            "self_ms": statistics.median(s for s, _ in times) / 1e3,
        }
        for name, times in seen.items()
    ]
    rows.sort(key=lambda r: r["cumulative_ms"], reverse=True)
    return rows[:top]


def cli_startup(site_base: str, repeats: int, bytecode: bool, top: int = 8) -> dict[str, dict]:
    """Median wall seconds of the CLI's cheapest and of its dry-run path, and their imports."""
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        site = _bench_site(work, site_base, None)
        env = _cli_env(work / "pycache" if bytecode else None)
        aimass = [sys.executable, "-m", "aimass_hpc"]
        dry_run = ["train", str(DIGITS_SPEC), "--site", site, "--dry-run"]
        floor_walls, floor_cpus = _run_times([sys.executable, "-c", "pass"], env, repeats)
        floor = statistics.median(floor_walls)
        results: dict[str, dict] = {}
        commands = {"aimass --version": ["--version"], "aimass train --dry-run": dry_run}
        for label, args in commands.items():
            walls, cpus = _run_times(aimass + args, env, repeats)
            median = statistics.median(walls)
            results[f"CLI: {label}"] = {
                "cli_s": median,
                "python_s": floor,
                "ratio": median / floor,
                "cli_cpu_s": statistics.median(cpus),
                "python_cpu_s": statistics.median(floor_cpus),
                "all": walls,
                "bytecode_cache": bytecode,
            }
        results["CLI: aimass train --dry-run"]["imports"] = _top_imports(
            ["-m", "aimass_hpc", *dry_run], env, repeats, top
        )
        results["CLI: aimass --version"]["imports"] = _top_imports(
            ["-m", "aimass_hpc", "train", "--help"], env, repeats, top
        )
    return results


def _print_imports(results: dict[str, dict]) -> None:
    for name, r in results.items():
        if "imports" not in r:
            continue
        command = "aimass train --help" if "--version" in name else name.removeprefix("CLI: ")
        print(f"\ntop-level imports of `{command}` (-X importtime, median):")
        print(f"  {'module':40} {'cumulative':>12} {'self':>9}")
        for row in r["imports"]:
            print(f"  {row['module']:40} {row['cumulative_ms']:9.1f} ms {row['self_ms']:6.1f} ms")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (overhead/throughput)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-launch", action="store_true")
    ap.add_argument("--site", default="dev", help="bundled site to copy for the launch test")
    ap.add_argument("--launch-repeats", type=int, default=7)
    ap.add_argument("--srun-mpi", help="override the site's mpi.srun_mpi for the launch test")
    ap.add_argument("--skip-cli", action="store_true", help="no CLI start-up measurements")
    ap.add_argument("--cli-repeats", type=int, default=15)
    ap.add_argument(
        "--bytecode-cache",
        action="store_true",
        help="CLI start-up and launch with compiled modules cached (a private "
        "PYTHONPYCACHEPREFIX, as an installed package has them)",
    )
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    args = ap.parse_args()

    results: dict[str, dict] = {}
    if not args.skip_overhead:
        if args.device == "cpu":
            sizes = {
                "small (64->128x2)": {"samples": 65536, "features": 64, "width": 128, "depth": 2},
                "synthetic (256->512x4)": {
                    "samples": 32768,
                    "features": 256,
                    "width": 512,
                    "depth": 4,
                },
            }
            batch = 128
        else:
            sizes = {"synthetic (512->1024x8)": {"samples": 65536, "features": 512,
                                                 "width": 1024, "depth": 8}}  # fmt: skip
            batch = 1024
        for label, size in sizes.items():
            results[f"step time, {label}"] = overhead(
                size, args.steps, batch, args.repeats, args.device
            )
    if not args.skip_launch:
        label = "launch to first step (1 node x 2 ranks)"
        if args.srun_mpi:
            label += f", srun --mpi={args.srun_mpi}"
        if args.bytecode_cache:
            label += ", bytecode cached"
        results[label] = launch(
            args.site, 1, 2, args.launch_repeats, args.srun_mpi, args.bytecode_cache
        )
    if not args.skip_cli:
        results.update(cli_startup(args.site, args.cli_repeats, args.bytecode_cache))

    print(f"\n{'benchmark':45} {'aimass':>12} {'peer':>12} {'ratio':>7} {'target':>7}")
    for name, r in results.items():
        if "trainer_s_per_step" in r:
            ours, peer, unit, target = r["trainer_s_per_step"], r["plain_s_per_step"], "ms", 1.05
            ours, peer = ours * 1e3, peer * 1e3
            sps = r["batch"] / r["trainer_s_per_step"]
            print(
                f"{name:45} {ours:9.3f} {unit} {peer:9.3f} {unit} {r['ratio']:7.3f} "
                f"{target:7.2f}   ({sps:,.0f} samples/s through the trainer)"
            )
        elif "cli_s" in r:
            ours, peer = r["cli_s"] * 1e3, r["python_s"] * 1e3
            cached = "; bytecode cached" if r["bytecode_cache"] else ""
            cpu, peer_cpu = r["cli_cpu_s"] * 1e3, r["python_cpu_s"] * 1e3
            print(
                f"{name:45} {ours:9.0f} ms {peer:9.0f} ms {r['ratio']:7.2f} {'-':>7}   "
                f"(CPU {cpu:.0f} ms vs {peer_cpu:.0f} ms; peer: bare interpreter{cached})"
            )
        else:
            ours, peer, target = r["aimass_s"], r["plain_s"], 1.10
            print(
                f"{name:45} {ours:10.2f} s {peer:10.2f} s {r['ratio']:7.3f} {target:7.2f}   "
                f"(of which `aimass train` itself: {r['aimass_cli_s']:.2f} s; median "
                f"pairwise difference {r['paired_diff_s']:+.2f} s, ratio of minima "
                f"{r['min_ratio']:.3f})"
            )
            ours, peer = r["aimass_wait_adjusted_s"], r["plain_wait_adjusted_s"]
            print(
                f"{'  the same, queue wait at its mean':45} {ours:10.2f} s {peer:10.2f} s "
                f"{r['wait_adjusted_ratio']:7.3f} {target:7.2f}   (each launch's wait for "
                f"Slurm's next scheduling pass replaced by the mean, "
                f"{r['mean_queue_wait_s']:.2f} s)"
            )
    print(
        "peer: plain PyTorch loop (step time) / hand-written sbatch + srun script (launch) / "
        "`python -c pass` (CLI)"
    )
    _print_imports(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
