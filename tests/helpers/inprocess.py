"""Run a CLI's main in this process and report what a user would see: the exit code and stderr.

Used by the bad-input tests (tests/test_mutations.py, tests/test_reliability.py): hundreds of cases
at milliseconds each, instead of seconds of interpreter start-up per case.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Accepted(Exception):
    """Raised by a stub in place of the expensive work that follows a validated input."""


def accept(*args, **kwargs):
    raise Accepted()


@dataclass
class Outcome:
    code: object          # the exit code, or "accepted", "hang", "exception: ..." when no code came
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def one_line_error(self, *names: str) -> bool:
        """Exit 2, exactly one stderr line, `error: ...`, naming one of ``names`` (when given)."""
        lines = self.lines
        return (self.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                and "Traceback" not in self.stderr
                and (not names or any(n in lines[0] for n in names)))


class _Stalled(BaseException):
    """Raised in the main thread by the watchdog (a BaseException: `except Exception` in the code
    under test must not swallow it)."""


@contextlib.contextmanager
def hang_guard(output: io.StringIO, hang_s: float | None = None):
    """Raise _Stalled in this (the main) thread when this process makes no progress, the rule of
    helpers/proc.py: no output and almost no CPU for the hang period. A watchdog thread samples;
    a signal (SIGUSR1) interrupts a blocking call. Busy loops are left to pytest-timeout."""
    from helpers.proc import CHECK_EVERY_S, ProgressWatch

    watch = ProgressWatch(hang_s)
    stop = threading.Event()
    main = threading.get_ident()

    def on_signal(signum, frame):
        raise _Stalled(watch.describe())

    def watchdog():
        while not stop.wait(CHECK_EVERY_S):
            watch.update(time.process_time(), output.tell())
            if watch.hung:
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, on_signal)
    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)


def call(main, argv: list[str], wrap: bool = True, hang_s: float | None = None) -> Outcome:
    """``run_main(main, argv)`` (or ``main(argv)`` when ``wrap`` is false: tools with their own
    handler); a SystemExit becomes its code, a hang (see hang_guard) the code "hang", any other
    escape is reported, not raised."""
    from linformer_train.cli import run_main

    err = io.StringIO()
    try:
        with hang_guard(err, hang_s), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            try:
                code = run_main(main, argv) if wrap else main(argv)
            except SystemExit as exc:
                code = exc.code
    except Accepted:
        code = "accepted"
    except _Stalled:
        code = "hang"
    except BaseException as exc:  # noqa: BLE001 - a traceback is the failure being looked for
        code = f"exception: {type(exc).__name__}: {str(exc)[:200]}"
    return Outcome(code, err.getvalue())


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package, and tools/profile.py shadows profile)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the tools edit sys.path for themselves
    return module
