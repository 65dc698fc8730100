"""The distributed world: Horovod or torch.distributed, behind one small interface.

``connect(backend, world)`` returns a :class:`Backend` that the trainer and the script API use
for everything collective: wrapping the model/optimizer for gradient averaging, agreeing on a
flag, broadcasting a checkpoint, gathering RNG states. A world of one process gets
:class:`LocalBackend` (no process group, no overhead).

Device choice: a CUDA device when one is visible (bound through ``SLURM_LOCALID`` and the
``CUDA_VISIBLE_DEVICES`` Slurm set), else CPU. torch.distributed then uses NCCL on GPUs and Gloo
on CPUs; Horovod uses MPI when it was started by ``srun --mpi=...`` (or mpirun) and its Gloo
controller otherwise.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
from typing import Any

import torch
from torch import nn

from aimass_hpc.runtime.env import WorldInfo, gpu_index

BACKENDS = ("torch", "horovod", "fsdp")


def pick_device(world: WorldInfo, want: str = "auto") -> torch.device:
    """CUDA device for this rank (``SLURM_LOCALID`` among the visible ones) or CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible to this rank")
    index = gpu_index(world.local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class Backend:
    """Collectives the runtime needs. Subclasses implement them for one library."""

    name = "local"
    # True where parameters are sharded over ranks (FSDP): checkpoints are then saved by
    # every rank in parallel, and the model is called collectively (all ranks or none).
    sharded = False

    def __init__(self, world: WorldInfo, device: torch.device) -> None:
        self.world = world
        self.device = device

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to call in training (DDP wraps it; others return it)."""
        return model

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> torch.optim.Optimizer:
        """The optimizer to step (Horovod wraps it to average gradients)."""
        return optimizer

    def clip_and_step(
        self, optimizer: torch.optim.Optimizer, parameters: Any, max_norm: float
    ) -> None:
        """Clip the (already averaged) gradients to ``max_norm``, then step."""
        nn.utils.clip_grad_norm_(parameters, max_norm)
        optimizer.step()

    def allreduce_max(self, value: int) -> int:
        """The maximum of an integer over all ranks (used to agree on stopping)."""
        return value

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on CPU for metric sums)."""
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from ``root`` on every rank (pickled)."""
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Leave the process group."""


class LocalBackend(Backend):
    """A single process: every collective is the identity."""

    name = "local"


class TorchBackend(Backend):
    """torch.distributed: NCCL for tensors on GPUs, Gloo on CPUs and for control messages."""

    name = "torch"

    def __init__(self, world: WorldInfo, device: torch.device, timeout_s: float) -> None:
        super().__init__(world, device)
        import torch.distributed as dist

        self._dist = dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        init_method = f"tcp://{world.master_addr}:{world.master_port}"
        if not world.distributed:
            # A world of one (FSDP on one rank) needs no port: two such runs on one host
            # must not meet at the default one.
            import tempfile

            fd, store = tempfile.mkstemp(prefix="aimass-pg-")
            os.close(fd)
            os.unlink(store)
            init_method = f"file://{store}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=world.rank,
            world_size=world.world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
            **kwargs,
        )
        # Control traffic (stop flag, pickled objects) goes over Gloo on the CPU so it does not
        # queue behind gradient NCCL kernels or force device syncs.
        self._control = dist.new_group(backend="gloo") if backend == "nccl" else None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def allreduce_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self._control)
        return int(t.item())

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().to("cpu", torch.float64).clone()
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self._control)
        return t

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=root, group=self._control)
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._control)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self._control)

    def shutdown(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class FSDPBackend(TorchBackend):
    """torch.distributed with FSDP2: parameters, gradients and optimizer state sharded.

    The process group is the torch backend's (NCCL on GPUs, Gloo on CPUs). ``wrap_optimizer``
    shards the model (see :mod:`aimass_hpc.runtime.fsdp`) and points the optimizer at the
    sharded parameters; ``wrap_model`` then returns the same, already sharded module.
    """

    name = "fsdp"
    sharded = True

    def __init__(
        self, world: WorldInfo, device: torch.device, timeout_s: float, options: Any = None
    ) -> None:
        from aimass_hpc.runtime.fsdp import FSDPOptions

        super().__init__(world, device, timeout_s)
        self.options = options or FSDPOptions()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from aimass_hpc.runtime.fsdp import shard_model

        return shard_model(model, self.device, self.options)

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> torch.optim.Optimizer:
        from aimass_hpc.runtime.fsdp import is_sharded, param_names, rebuild_param_groups

        if not is_sharded(model):
            before = param_names(model)
            self.wrap_model(model)
            rebuild_param_groups(optimizer, before, model)
        return optimizer


class HorovodBackend(Backend):
    """Horovod: MPI controller under ``srun --mpi``/mpirun, Gloo controller otherwise."""

    name = "horovod"

    def __init__(self, world: WorldInfo, device: torch.device) -> None:
        super().__init__(world, device)
        if _under_mpi():
            # Horovod makes every MPI call from its one background thread, so it needs no
            # MPI_THREAD_MULTIPLE; Open MPI's TCP paths under THREAD_MULTIPLE are where start-up
            # races live. A job that calls MPI from its own threads sets this to 0.
            os.environ.setdefault("HOROVOD_MPI_THREADS_DISABLE", "1")
        elif world.distributed:
            _prepare_horovod_gloo(world)
        import horovod.torch as hvd

        self._hvd = hvd
        hvd.init()
        if hvd.size() != world.world_size or hvd.rank() != world.rank:
            raise RuntimeError(
                f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher set "
                f"rank {world.rank} of {world.world_size}: was srun given the site's --mpi?"
            )
        self.controller = "mpi" if hvd.mpi_enabled() and _under_mpi() else "gloo"

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> torch.optim.Optimizer:
        hvd = self._hvd
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # On CPU, one group: every gradient goes through one fused allreduce whose layout is
        # fixed, so the summation order (and the bits) never depend on timing - what makes a
        # resumed run identical. On GPUs, Horovod's own fusion overlaps comms with backward.
        groups = 1 if self.device.type == "cpu" else 0
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            op=hvd.Average,
            num_groups=groups,
        )

    def clip_and_step(
        self, optimizer: torch.optim.Optimizer, parameters: Any, max_norm: float
    ) -> None:
        # Horovod averages asynchronously: wait for it before clipping, then step without
        # a second synchronisation.
        optimizer.synchronize()  # type: ignore[attr-defined]
        nn.utils.clip_grad_norm_(parameters, max_norm)
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            optimizer.step()

    def allreduce_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        return int(self._hvd.allreduce(t, op=self._hvd.Max, name="aimass.stop").item())

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().to("cpu", torch.float64).clone()
        return self._hvd.allreduce(t, op=self._hvd.Sum, name="aimass.sum")

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root, name="aimass.bcast")

    def allgather_object(self, obj: Any) -> list[Any]:
        # hvd.allgather_object exists, but pickling ourselves keeps the byte layout explicit.
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self._hvd.allgather(torch.tensor([data.numel()]), name="aimass.gsz").tolist()
        blob = self._hvd.allgather(data, name="aimass.gobj")
        out, offset = [], 0
        for size in sizes:
            out.append(pickle.loads(blob[offset : offset + size].numpy().tobytes()))
            offset += size
        return out

    def barrier(self) -> None:
        self._hvd.allreduce(torch.zeros(1), name="aimass.barrier")

    def shutdown(self) -> None:
        self._hvd.shutdown()


def _under_mpi() -> bool:
    """True when an MPI launcher (srun --mpi=pmix/pmi2, mpirun) set up this process."""
    return any(k in os.environ for k in ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"))


def _prepare_horovod_gloo(world: WorldInfo, timeout_s: float = 120.0) -> None:
    """Point Horovod's Gloo controller at a rendezvous server run by rank 0.

    Horovod normally gets these from ``horovodrun``; under plain ``srun`` (no MPI) we derive
    them from the Slurm world: rank 0 serves the rendezvous on MASTER_PORT + 1, the others
    wait until it answers. Ranks are laid out in blocks per node, as Slurm does by default.
    """
    import socket
    import threading
    import time

    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    port = world.master_port + 1
    if world.rank == 0:
        hosts = ",".join(f"host{n}:{world.local_world_size}" for n in range(world.num_nodes))
        plan = get_host_assignments(parse_hosts(hosts), world.world_size)
        httpd = RendezvousHTTPServer(("0.0.0.0", port), RendezvousHandler, 0)
        httpd.init(plan)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        globals()["_rendezvous_server"] = httpd  # lives as long as the process
    else:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((world.master_addr, port), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Horovod rendezvous at {world.master_addr}:{port} did not answer"
                    ) from None
                time.sleep(0.2)
    env = {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": world.master_addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_HOSTNAME": f"host{world.node_rank}",
        "HOROVOD_RANK": str(world.rank),
        "HOROVOD_SIZE": str(world.world_size),
        "HOROVOD_LOCAL_RANK": str(world.local_rank),
        "HOROVOD_LOCAL_SIZE": str(world.local_world_size),
        "HOROVOD_CROSS_RANK": str(world.node_rank),
        "HOROVOD_CROSS_SIZE": str(world.num_nodes),
    }
    if world.master_addr.startswith("127.") and "HOROVOD_GLOO_IFACE" not in os.environ:
        env["HOROVOD_GLOO_IFACE"] = "lo"  # every rank on this host (tests, one-node runs)
    os.environ.update(env)


def connect(
    backend: str,
    world: WorldInfo,
    *,
    device: str = "auto",
    timeout_s: float = 600.0,
    fsdp: Any = None,
) -> Backend:
    """Initialise ``backend`` ("torch", "horovod" or "fsdp") for ``world`` and return it.

    A single-process world with the torch backend skips the process group entirely;
    Horovod is always initialised when asked for (``hvd.init`` works with one rank), and so
    is FSDP (a world of one is a valid mesh; the checkpoints keep their sharded form).
    ``fsdp``: :class:`~aimass_hpc.runtime.fsdp.FSDPOptions` for the fsdp backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = pick_device(world, device)
    if backend == "horovod":
        return HorovodBackend(world, dev)
    if backend == "fsdp":
        return FSDPBackend(world, dev, timeout_s, fsdp)
    if not world.distributed:
        return LocalBackend(world, dev)
    return TorchBackend(world, dev, timeout_s)
