"""Who am I in the job: rank, world size, local rank, rendezvous address.

Read from the environment only, in this order: torchrun-style variables (``RANK``/``WORLD_SIZE``,
also what tests set), Open MPI's (``OMPI_COMM_WORLD_*``, under ``mpirun``), then Slurm's step
variables (``SLURM_PROCID`` ... under ``srun``). A process outside any launcher is rank 0 of 1.
No torch import: this runs before the heavy libraries are loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aimass_hpc.common.slurm_cli import restart_count_from_env

# Ports derived from the job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 20000
PORT_SPAN = 20000


def port_for_job(job_id: str | int | None) -> int:
    """A rendezvous port derived from the job id, so concurrent jobs on a node don't collide."""
    digits = re.sub(r"\D", "", str(job_id or ""))
    return PORT_BASE + (int(digits) % PORT_SPAN if digits else 9500)


def expand_tasks_per_node(value: str) -> list[int]:
    """Slurm's ``2(x3),1`` notation -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"bad tasks-per-node value {value!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


@dataclass(frozen=True)
class WorldInfo:
    """The process's place in the job (all values plain, JSON-able)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = PORT_BASE + 9500
    job_id: str | None = None
    restart_count: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and requeues."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorldInfo:
        """Build from ``env`` (default ``os.environ``); see the module docstring for order."""
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID") or None
        restarts = restart_count_from_env(env)
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = int(env.get("MASTER_PORT") or port_for_job(job_id))
        common: dict[str, Any] = {
            "master_addr": addr,
            "master_port": port,
            "job_id": job_id,
            "restart_count": restarts,
        }
        if "RANK" in env and "WORLD_SIZE" in env:
            world = int(env["WORLD_SIZE"])
            local_world = int(env.get("LOCAL_WORLD_SIZE") or world)
            rank = int(env["RANK"])
            return cls(
                rank=rank,
                world_size=world,
                local_rank=int(env.get("LOCAL_RANK") or rank % local_world),
                local_world_size=local_world,
                node_rank=int(env.get("GROUP_RANK") or rank // local_world),
                num_nodes=max(1, world // local_world),
                launcher="env",
                **common,
            )
        if "OMPI_COMM_WORLD_RANK" in env:
            world = int(env["OMPI_COMM_WORLD_SIZE"])
            local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
            return cls(
                rank=int(env["OMPI_COMM_WORLD_RANK"]),
                world_size=world,
                local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK") or 0),
                local_world_size=local_world,
                node_rank=int(env.get("OMPI_COMM_WORLD_NODE_RANK") or 0),
                num_nodes=max(1, world // max(local_world, 1)),
                launcher="mpirun",
                **common,
            )
        # Inside an srun step (SLURM_STEP_NUM_TASKS is set by srun, not by the batch shell).
        if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
            node_rank = int(env.get("SLURM_NODEID") or 0)
            per_node_text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get(
                "SLURM_TASKS_PER_NODE", ""
            )
            per_node = expand_tasks_per_node(per_node_text) if per_node_text else []
            local_world = per_node[node_rank] if node_rank < len(per_node) else 1
            return cls(
                rank=int(env["SLURM_PROCID"]),
                world_size=int(env["SLURM_STEP_NUM_TASKS"]),
                local_rank=int(env.get("SLURM_LOCALID") or 0),
                local_world_size=local_world,
                node_rank=node_rank,
                num_nodes=int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1),
                launcher="srun",
                **common,
            )
        return cls(launcher="none", **common)


def torchrun_env(world: WorldInfo) -> dict[str, str]:
    """The variables torchrun sets, for ``world``: what a plain ``init_process_group()``
    (``env://``) and scripts written for torchrun read. :meth:`WorldInfo.from_env` reads the
    same world back from them."""
    return {
        "RANK": str(world.rank),
        "WORLD_SIZE": str(world.world_size),
        "LOCAL_RANK": str(world.local_rank),
        "LOCAL_WORLD_SIZE": str(world.local_world_size),
        "GROUP_RANK": str(world.node_rank),
        "MASTER_ADDR": world.master_addr,
        "MASTER_PORT": str(world.master_port),
    }


def gpu_index(local_rank: int, visible_count: int) -> int:
    """Which visible GPU this rank binds to.

    Slurm sets ``CUDA_VISIBLE_DEVICES`` per task: with ``--gpu-bind`` a task sees only its own
    GPU (index 0); otherwise every task on a node sees all of the node's allocated GPUs and
    takes the one at its ``SLURM_LOCALID``.
    """
    if visible_count <= 0:
        raise ValueError("no visible GPU")
    return local_rank % visible_count
