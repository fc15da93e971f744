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


def make_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose mistakes are UsageError (one line, exit 2); ``kwargs`` go to it."""
    return _Parser(prog=prog, description=description, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "") -> None:
    """``--config YAML`` (repeatable) and trailing ``key=value`` overrides: how every command that
    reads the config takes it (``load_config(args.config, args.overrides)``, files first)."""
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides" + (f", e.g. {example}" if example else ""))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user's input is wrong: printed as one line, exit 2."""
    from linformer_train.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, UsageError]
    for module, name in [("linformer_train.data", "DataError"),
                         ("linformer_train.serialization", "UnsafeFileError"),
                         ("linformer_train.paths", "PathOverlapError"),
                         ("linformer_train.train.run_dir", "RunDirError"),
                         ("linformer_train.train.checkpoint", "CheckpointError"),
                         ("linformer_train.convert", "ConversionError"),
                         ("linformer_train.model.attention", "SequenceTooLongError")]:
        # a module that was never imported cannot have raised its error: importing it here (torch
        # and all) only made every config mistake take ~2 s longer to report
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def run_failures() -> tuple[type[BaseException], ...]:
    """Exception types that end a run for a stated reason (a non-finite policy, a lost rank): printed
    as one line, exit 1. Their modules are imported only once the run has loaded them."""
    failures: list[type[BaseException]] = []
    for module, name in [("linformer_train.train.trainer", "TrainingError"),
                         ("linformer_train.train.run_dir", "RunFileError"),
                         ("linformer_train.train.distributed", "RankLostError")]:
        if module in sys.modules:
            failures.append(getattr(sys.modules[module], name))
    return tuple(failures)


def _say(line: str) -> None:
    """One write for the whole line: the ranks of a job share stderr, and print() writes the text and
    its newline separately, so two ranks' lines could run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a user's mistake prints ``error: ...`` (no traceback) and returns 2; a run that
    stops for a stated reason (non-finite loss policy, a rank lost) prints one line and returns 1."""
    from linformer_train.serialization import forbid_code_in_loads

    forbid_code_in_loads()  # no torch.load in this process (DeepSpeed's included) may run pickled code
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except user_errors() as exc:
        _say(f"error: {exc}")
        return 2
    except run_failures() as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
