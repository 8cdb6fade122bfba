"""The exit convention every command shares: a user's mistake is one ``error: ...`` line on stderr, never a traceback.

Exit codes: 0 success, 2 a user error (bad input, bad flag value, occupied --out), 1 an OS error
where a command reports it (disk full, no permission), 3 a non-finite training loss. argparse's own
usage errors also exit 2.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

USER_ERROR = 2
OS_ERROR = 1
NON_FINITE_LOSS = 3

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]
#: (is_bad(args), message): a value check argparse's types cannot express.
Check = tuple[Callable[[argparse.Namespace], bool], str]
#: Exception types → exit code; a function so that the library is imported only when the command runs
#: (``--help`` stays fast).
ErrorCodes = Callable[[], Mapping[ExceptionTypes, int]]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, checks: Sequence[Check] = ()
          ) -> argparse.Namespace:
    """Parse with ``parse_intermixed_args`` (positionals and options in any order, ``key=value`` overrides
    before or after options), then run ``checks``: the first failing one exits 2 with argparse's usage line."""
    args = parser.parse_intermixed_args(argv)
    for is_bad, message in checks:
        if is_bad(args):
            parser.error(message)
    return args


def fail(exc: BaseException | str, code: int = USER_ERROR) -> int:
    """Print ``error: <exc>`` to stderr (flushed: ranks and subprocesses interleave) and return ``code``.

    Under ``accelerate launch`` / torchrun the line also becomes the root cause of the launcher's failure
    report, which would otherwise end in "To enable traceback see ...".
    """
    from bicogan_dist.train.launcher import report_error

    message = f"error: {exc}"
    _write_line(message)
    report_error(message)
    return code


def _write_line(text: str) -> None:
    """``text`` and its newline in one write(2): ranks share the launcher's stderr, and with an unbuffered
    stream (PYTHONUNBUFFERED) ``print`` writes the newline apart, so two ranks' lines could merge into one."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # a stream without a descriptor (captured)
        print(text, file=sys.stderr, flush=True)
        return
    os.write(fd, (text + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace"))


def run_command(action: Callable[[], int], errors: Mapping[ExceptionTypes, int]) -> int:
    """``action()``'s exit code, or ``fail(exc, code)`` for the first entry of ``errors`` (in order) that matches.

    Anything not listed propagates with its traceback: it is a bug, not the user's doing.
    """
    try:
        return action()
    except Exception as exc:
        for types, code in errors.items():
            if isinstance(exc, types):
                return fail(exc, code)
        raise


@dataclass(frozen=True)
class Command:
    """One command line: its parser, the value checks, the action and the errors that are the user's doing.

    A ``cli/<name>.py`` module declares ``COMMAND = Command(...)`` and exposes ``main = COMMAND.main`` (the
    console script) and ``parse_args = COMMAND.parse_args``; only the flags and the action differ per command.
    """

    build_parser: Callable[[], argparse.ArgumentParser]
    action: Callable[[argparse.Namespace], int]
    errors: ErrorCodes = dict
    checks: Sequence[Check] = field(default_factory=tuple)

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Flags → namespace; a failing check exits 2 with argparse's usage message."""
        return parse(self.build_parser(), argv, self.checks)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The command's exit code (see the module docstring for the convention)."""
        args = self.parse_args(argv)
        return run_command(lambda: self.action(args), self.errors())
