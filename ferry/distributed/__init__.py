"""torch.distributed for ferry: the ranks' layout, process groups, collectives, self-test.

``state.py`` starts the process group from the config or torchrun's environment and
builds the tensor-parallel and pipeline groups (``ParallelContext``); ``collectives.py``
wraps the few collectives the model and the executor use, so that a timeout or a dead
peer becomes an error naming the rank; ``selftest.py`` is the start-up all-reduce check.
"""
from ferry.distributed.state import ParallelContext, RankLayout, init_distributed, single_rank

__all__ = ["ParallelContext", "RankLayout", "init_distributed", "single_rank"]
