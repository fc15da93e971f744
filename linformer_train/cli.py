"""Entry points shared by launch/ and tools/: argument parsing and the one-line error contract."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
    """A command-line mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user mistake
        raise UsageError(f"{self.prog}: {message}")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user's input is wrong: printed as one line, exit 2."""
    from linformer_train.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, UsageError]
    for module, name in [("linformer_train.data", "DataError"),
                         ("linformer_train.train.checkpoint", "CheckpointError"),
                         ("linformer_train.convert", "ConversionError"),
                         ("linformer_train.model.attention", "SequenceTooLongError")]:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a user's mistake prints ``error: ...`` (no traceback) and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def pretrain_main() -> None:
    from linformer_train.train.entry import pretrain

    sys.exit(run_main(pretrain))
