"""The `dptrain` command's entry point: the signal handlers first, then everything else.

A signal can come at any moment, during the imports too (the dptrain package loads numpy
and the engine, a fifth of a second; Ray more), so the handlers are installed before
anything heavy is imported: this module stands outside the package and needs the
standard library only. SIGTERM is handled as Ctrl-C is: the run stops and releases its
actors and shared memory, one line says so, and the exit status is 143 (130 for
SIGINT). A driver started in the background by a non-interactive shell (`cmd &`, some CI
runners) inherits SIGINT as ignored; it is restored, so `kill -INT` and Ctrl-C work.
"""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the run stops, its actors and shared memory are released."""


def _raise_terminated(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated; an inherited 'ignore' of SIGINT is undone. Main thread only
    (Python allows handlers nowhere else); again after anything that installs its own (ray.init)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted(command: str, error: KeyboardInterrupt, kept: str) -> int:
    """Say in one line that the command was stopped (and what is `kept`); its exit status."""
    terminated = isinstance(error, Terminated)
    print(f"{command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {kept}", file=sys.stderr)
    return 143 if terminated else 130


def main(argv=None) -> int:
    install_signal_handlers()
    try:
        from dptrain.cli import main as run
    except KeyboardInterrupt as e:  # while importing: nothing has started
        return interrupted("dptrain", e, "nothing was started")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
