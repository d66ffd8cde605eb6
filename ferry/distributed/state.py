"""Who is who among the ranks, and the process groups (tensor parallel, pipeline).

Rank layout (as Megatron/vLLM): ``rank = pp_rank * tp_size + tp_rank``, so the ranks of
one pipeline stage are consecutive, and on one node when ``tp_size`` divides the ranks
per node. Global rank 0 is tensor rank 0 of stage 0: it runs the engine.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ferry.platform import set_current_device

logger = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankLayout:
    """Plain data: one rank's place in the tp x pp grid and how to reach rank 0."""

    rank: int
    tp_size: int = 1
    pp_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_seconds: float = 120.0          # collectives while serving
    startup_timeout_seconds: float = 300.0  # the rendezvous and the rest of start-up
    from_env: bool = False     # started by torchrun: join through its store (env://)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (tensor rank {self.tp_rank}/{self.tp_size}, "
                f"pipeline stage {self.pp_rank}/{self.pp_size})")


def layouts_from_config(parallel: Any) -> list[RankLayout]:
    """The layouts of the ranks this node runs, from ``ParallelConfig`` (``nnodes``,
    ``node_rank``), or from torchrun's environment when it set ``RANK``/``WORLD_SIZE``
    (then this process is one rank, and torchrun started the others)."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    world = tp * pp
    common = dict(tp_size=tp, pp_size=pp, timeout_seconds=parallel.distributed_timeout_seconds,
                  startup_timeout_seconds=parallel.distributed_startup_timeout_seconds)
    if all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world:
            raise ValueError(f"torchrun started WORLD_SIZE={env_world} ranks but "
                             f"tensor_parallel_size x pipeline_parallel_size = {world}")
        return [RankLayout(rank=int(os.environ["RANK"]),
                           local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                           master_addr=os.environ.get("MASTER_ADDR", parallel.master_addr),
                           master_port=int(os.environ.get("MASTER_PORT", parallel.master_port)),
                           from_env=True, **common)]
    per_node = world // parallel.nnodes
    first = parallel.node_rank * per_node
    return [RankLayout(rank=first + i, local_rank=i, master_addr=parallel.master_addr,
                       master_port=parallel.master_port, **common) for i in range(per_node)]


@dataclass
class ParallelContext:
    """This process's rank and groups; what the parallel layers and runners read.

    ``single_rank()`` is the context of an ordinary one-device run (no process group).
    """

    layout: RankLayout
    tp_group: Any = None           # dist.ProcessGroup of this stage's tensor ranks
    pp_group: Any = None           # the ranks holding this tensor rank in every stage
    cpu_group: Any = None          # gloo group of all ranks, for pickled messages
    backend: str = "none"
    serving: bool = False          # start-up is over: the groups have the serving timeout
    extras: dict = field(default_factory=dict)

    @property
    def timeout_seconds(self) -> float:
        """The groups' timeout now: the start-up one until ``set_serving_timeout``."""
        layout = self.layout
        return layout.timeout_seconds if self.serving else layout.startup_timeout_seconds

    @property
    def timeout_setting(self) -> str:
        """The config key of ``timeout_seconds``, for error messages."""
        return ("distributed_timeout_seconds" if self.serving
                else "distributed_startup_timeout_seconds")

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    @property
    def pp_rank(self) -> int:
        return self.layout.pp_rank

    @property
    def pp_size(self) -> int:
        return self.layout.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """The global rank of this tensor rank in stage ``pp_rank``."""
        return pp_rank * self.tp_size + self.tp_rank


def single_rank() -> ParallelContext:
    return ParallelContext(RankLayout(rank=0))


def backend_for(device: torch.device) -> str:
    """NCCL (RCCL on ROCm builds, same name) for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(layout: RankLayout, device: torch.device) -> ParallelContext:
    """Join the process group of ``layout.world_size`` ranks and build the groups.

    Every rank must call this (it blocks until all have joined, up to
    ``layout.startup_timeout_seconds``: a rank may be slow to start on a loaded machine).
    The groups keep that timeout until ``set_serving_timeout``; messages go over a gloo
    group on the CPU.
    """
    set_current_device(device)
    backend = backend_for(device)
    timeout = timedelta(seconds=layout.startup_timeout_seconds)
    if not dist.is_initialized():
        # torchrun's agent already serves a store at MASTER_PORT: join it through env://
        init_method = "env://" if layout.from_env else f"tcp://{_host(layout)}"
        dist.init_process_group(backend=backend, init_method=init_method,
                                rank=layout.rank, world_size=layout.world_size, timeout=timeout)
    tp, pp = layout.tp_size, layout.pp_size
    tp_group = pp_group = None
    # new_group must be called by every rank for every group, in the same order.
    for stage in range(pp):
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)), timeout=timeout)
        if stage == layout.pp_rank:
            tp_group = group
    for tp_rank in range(tp):
        group = dist.new_group(list(range(tp_rank, tp * pp, tp)), timeout=timeout)
        if tp_rank == layout.tp_rank:
            pp_group = group
    cpu_group = (dist.new_group(list(range(layout.world_size)), backend="gloo", timeout=timeout)
                 if backend != "gloo" else dist.group.WORLD)
    logger.info("joined torch.distributed as %s over %s", layout.describe(), backend)
    return ParallelContext(layout, tp_group, pp_group, cpu_group, backend)


def _host(layout: RankLayout) -> str:
    addr = layout.master_addr
    return f"[{addr}]:{layout.master_port}" if ":" in addr else f"{addr}:{layout.master_port}"


def set_serving_timeout(ctx: ParallelContext) -> None:
    """Give every group of ``ctx`` the serving timeout (``layout.timeout_seconds``), so a
    peer that hangs while serving is reported quickly. Call it on every rank at the same
    point (after a barrier), once start-up is over."""
    if ctx.layout.world_size == 1:
        ctx.serving = True
        return
    timeout = timedelta(seconds=ctx.layout.timeout_seconds)
    groups = {id(g): g for g in (None, ctx.tp_group, ctx.pp_group, ctx.cpu_group)}
    for group in groups.values():   # None: the default (world) group
        dist.distributed_c10d._set_pg_timeout(timeout, group)
    ctx.serving = True
