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


def call(main, argv: list[str], timeout: float = 30.0, wrap: bool = True) -> Outcome:
    """``run_main(main, argv)`` (or ``main(argv)`` when ``wrap`` is false: tools with their own
    handler); a SystemExit becomes its code, any other escape is reported, not raised."""
    from linformer_train.cli import run_main

    def on_alarm(signum, frame):
        raise TimeoutError

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = run_main(main, argv) if wrap else main(argv)
            except SystemExit as exc:
                code = exc.code
    except Accepted:
        code = "accepted"
    except TimeoutError:
        code = "hang"
    except BaseException as exc:  # noqa: BLE001 - a traceback is the failure being looked for
        code = f"exception: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
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
