"""The server's step-loop seam: how a chunk of steps is driven over the workers.

A `StepLoop` runs `run(first, count, out)` for the parameter server (server.py) through a
`ServerView` (messages.py): it asks the workers for gradients through the carriers
(transports), and hands each step's gradients to `view.conclude`, which updates, records,
evaluates at epoch ends and checkpoints. The server also calls `reset` when its workers
change, `settle` before an evaluation, `checkpoint` and `restored` around checkpoints.

Two loops: `Synchronous` (here: every worker computes its shard of step k on version k,
the update waits for all of them) and `Relaxed` (relaxed.py: bounded staleness or backup
workers). A new loop is one class with these methods and one line in `make`.
"""

from __future__ import annotations

import time

from .messages import ServerView


class StepLoop:
    """The interface, and what the synchronous loop needs of it: nothing in flight between calls."""

    workers_wait_for_update = True  # whether every worker is idle while the server updates

    def __init__(self, view: ServerView):
        self.view = view

    def run(self, first: int, count: int, out: list) -> None:
        """Apply updates first .. first+count-1, each step's record appended to `out` as it is done."""
        raise NotImplementedError

    def reset(self) -> None:
        """The workers changed: forget what is in flight (it is computed again)."""

    def settle(self) -> None:
        """Let what is in flight finish, so no worker is busy and the parameters stay put."""

    def checkpoint(self) -> dict | None:
        """What a checkpoint records of the loop (None: nothing)."""
        return None

    def restored(self, folder: str) -> None:
        """The server restored a checkpoint from `folder`."""


class Synchronous(StepLoop):
    """Step k: every worker's gradient of its shard on version k, then the update."""

    def run(self, first, count, out):
        view = self.view
        for step in range(first, first + count):
            view.begin(step)
            t0 = time.perf_counter()
            gradients = view.gather(step)
            view.progressed()
            view.conclude(step, gradients, t0, out)


def make(cfg, view: ServerView) -> StepLoop:
    """The loop of a run's config: --staleness or --backup-workers relax it."""
    if cfg.relaxed:
        from .relaxed import Relaxed
        return Relaxed(view, cfg.staleness, cfg.backup_workers)
    return Synchronous(view)
