"""Worker processes: start-up, parent-death watch, and the message loop of ranks other than 0.

A worker spawned by the engine's process (``torch.multiprocessing`` spawn) gets the read
end of a pipe whose only write end the engine's process holds: when that process ends in
any way (exit, SIGTERM, SIGKILL, a crash) the pipe closes and the worker exits at once,
so no worker outlives its server. Workers ignore SIGINT (a Ctrl-C reaches the whole
process group; the engine's process decides). Ranks on other nodes have no pipe: they
notice rank 0 is gone when a collective fails or times out (rank 0 pings while idle).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ferry.config import EngineConfig
from ferry.distributed.collectives import CollectiveError
from ferry.distributed.state import RankLayout
from ferry.distributed.teardown import destroy_group, exit_process, leave

logger = logging.getLogger(__name__)

EXIT_LOST_RANK0 = 3   # a worker that lost the engine's process exits with this code


def _watch_parent(pipe: Any, stopping: threading.Event) -> None:
    try:
        pipe.recv()           # nothing is ever sent: returns only when the pipe closes
    except (EOFError, OSError):
        pass
    if not stopping.is_set():
        print(f"ferry worker {os.getpid()}: the engine process is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_RANK0)


def run_rank(config: EngineConfig, model_dir: Path, layout: RankLayout, ranks_on_node: int,
             pipe: Any = None) -> int:
    """Join as ``layout``'s rank, load its part and follow rank 0 until told to stop.

    Returns the exit code: 0 after ``stop``, 1 when a collective failed (its message
    names the rank) or start-up failed.
    """
    from ferry.executor.rank_worker import RankWorker

    stopping = threading.Event()
    if pipe is not None:
        threading.Thread(target=_watch_parent, args=(pipe, stopping), daemon=True,
                         name="ferry-parent-watch").start()
    try:
        worker = RankWorker(config, model_dir, layout, ranks_on_node)
        worker.serve_messages()
        stopping.set()     # told to stop: rank 0 may exit (and close the pipe) from now on
        leave(worker.ctx)  # in order with rank 0; a peer already gone is logged, not an error
        return 0
    except CollectiveError as exc:
        logger.error("%s", exc)
        return 1
    except Exception:
        logger.exception("%s failed", layout.describe())
        return 1
    finally:
        stopping.set()
        destroy_group()


def spawned_worker_main(config: EngineConfig, model_dir: str, layout: RankLayout,
                        ranks_on_node: int, pipe: Any) -> None:
    """The target of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{layout.rank} %(name)s: %(message)s")
    exit_process(run_rank(config, Path(model_dir), layout, ranks_on_node, pipe))


def spawn_workers(config: EngineConfig, model_dir: Path, layouts: list[RankLayout],
                  ranks_on_node: int) -> list[tuple[Any, Any]]:
    """Start one process per layout; returns (process, write end of its pipe) pairs."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    started = []
    for layout in layouts:
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=spawned_worker_main, daemon=False,
                                  name=f"ferry-rank{layout.rank}",
                                  args=(config, str(model_dir), layout, ranks_on_node, reader))
        process.start()
        reader.close()       # only the child holds the read end
        started.append((process, writer))
    return started


def run_node(config: EngineConfig, model_dir: Path) -> int:
    """Run the ranks of a node that does not hold rank 0 (``node_rank`` > 0, or a torchrun
    rank other than 0): its first rank here, the others spawned. Returns an exit code."""
    from ferry.distributed.state import layouts_from_config

    layouts = layouts_from_config(config.parallel)
    children = spawn_workers(config, model_dir, layouts[1:], len(layouts))
    code = run_rank(config, model_dir, layouts[0], len(layouts))
    for process, writer in children:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
        writer.close()
        code = code or (process.exitcode or 0)
    return code
