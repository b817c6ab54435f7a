"""The trainer driven from outside its public API, for measurements.

`running(trainer)` starts the trainer's actors exactly as `fit` does and yields a
`Running`: `run_block(first, count)` runs steps first .. first+count-1 as `fit` runs
them but with no log, no evaluation records and no recovery, returning the server's
metrics of each step (step_s, compute_s, apply_s, ...); `weights()` is the server's
flat parameters. Benchmarks use it to interleave the trainer with something else,
block of steps by block of steps.
"""

from __future__ import annotations

import contextlib


class Running:
    def __init__(self, fleet):
        self.fleet = fleet

    def run_block(self, first: int, count: int) -> list:
        fleet = self.fleet
        return fleet.server_call(fleet.ps.run_steps.remote(first, count), first)

    def weights(self):
        import ray
        return ray.get(self.fleet.ps.get_weights.remote())


@contextlib.contextmanager
def running(trainer):
    with trainer._session():
        yield Running(trainer.fleet)
