"""The trainer driven from outside its public API, for measurements.

`running(trainer)` starts the trainer's actors exactly as `fit` does and yields
`run_block(first, count)`: steps first .. first+count-1 as `fit` runs them but with
no log, no evaluation records and no recovery, returning the server's metrics of
each step (step_s, compute_s, apply_s, ...). Benchmarks use it to interleave the
trainer with something else, step block by step block.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def running(trainer):
    with trainer._session():
        fleet = trainer.fleet

        def run_block(first: int, count: int) -> list:
            return fleet.server_call(fleet.ps.run_steps.remote(first, count), first)
        yield run_block
