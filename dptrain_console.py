"""The `dptrain` command's entry point: the signal handlers first, then everything else.

A signal can come at any moment, during the imports too (the dptrain package loads numpy
and the engine, a fifth of a second; Ray more), so the handlers are installed before
anything heavy is imported: this module stands outside the package and needs the
standard library only. SIGTERM is handled as Ctrl-C is: the run stops and releases its
actors and shared memory, one line says so, and the exit status is 143 (130 for
SIGINT). A driver started in the background by a non-interactive shell (`cmd &`, some CI
runners) inherits SIGINT as ignored; it is restored, so `kill -INT` and Ctrl-C work.

The handlers remember what they raised: C code may swallow the exception and raise its own
(numpy's C extension imports `datetime` through PyCapsule_Import, which turns a
KeyboardInterrupt raised inside that import into an ImportError; Ray's `ray.get` and
`ray.wait` answer any KeyboardInterrupt, SIGTERM's Terminated too, with a plain
KeyboardInterrupt), so an error that comes after a signal is reported as the signal it replaced.
"""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the run stops, its actors and shared memory are released."""


_raised: KeyboardInterrupt | None = None  # the last exception a handler raised


def _raise(error: KeyboardInterrupt) -> None:
    global _raised
    _raised = error
    raise error


def _raise_terminated(signum, frame):
    _raise(Terminated())


def _raise_interrupt(signum, frame):
    _raise(KeyboardInterrupt())


def signalled(error: BaseException) -> KeyboardInterrupt | None:
    """The signal `error` stands for: the one a handler raised, which C code may have replaced with
    `error` (Ray's blocking calls turn any KeyboardInterrupt, Terminated too, into a plain one);
    `error` itself for a KeyboardInterrupt no handler raised; None for an error no signal caused."""
    if _raised is not None:
        return _raised
    return error if isinstance(error, KeyboardInterrupt) else None


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated; an inherited 'ignore' of SIGINT is undone. Main thread only
    (Python allows handlers nowhere else); again after anything that installs its own (ray.init).
    A command calls it first: what a signal raised before (a command run earlier in this process) is forgotten."""
    global _raised
    if threading.current_thread() is not threading.main_thread():
        return
    _raised = None
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.default_int_handler):
        signal.signal(signal.SIGINT, _raise_interrupt)


def interrupted(command: str, error: KeyboardInterrupt, kept: str) -> int:
    """Say in one line that the command was stopped (and what is `kept`); its exit status."""
    terminated = isinstance(error, Terminated)
    print(f"{command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {kept}", file=sys.stderr)
    return 143 if terminated else 130


def _load_cli():
    from dptrain.cli import main as run
    return run


def main(argv=None) -> int:
    install_signal_handlers()
    try:
        run = _load_cli()
    except BaseException as e:  # while importing: nothing has started
        if (signal_error := signalled(e)) is None:
            raise
        return interrupted("dptrain", signal_error, "nothing was started")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
