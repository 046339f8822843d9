"""The `budget-middleware` command (SPEC §16): manage budgets from a shell.

It works on the store of `BUDGET_DATABASE_URL` directly (the same `BUDGET_*` settings as the
middleware), or on a running admin API with `--url` and `--admin-key` (`BUDGET_ADMIN_URL`,
`BUDGET_ADMIN_KEY`). Tables for people, `--json` for scripts; a failure prints one line,
`error: <cause>`, and exits non-zero (1; 2 for a command used wrongly; 130 for Ctrl-C). Output
into a pipe whose reader has gone (`| head -1`) ends it quietly, with 141 (128 + SIGPIPE: what a
shell reports for `git log | head -1`'s git).

    budget-middleware keys create --name alice --team-id T --budget 10/1d --request-limit 60/1m
    budget-middleware usage --by model --since 7d
    budget-middleware --url http://localhost:8000/budget-admin budgets list --json
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import click

__all__ = ["PIPE_CLOSED", "main", "run"]

PIPE_CLOSED = 141
"""The status of a command whose output's reader has gone (`| head -1`): 128 + SIGPIPE, as a
shell reports it for `git log | head -1`'s git; nothing is printed."""


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: the process's); its exit status."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # Ctrl-C while the package loads, before click could see it
        return _fail("interrupted", 130)
    except BrokenPipeError:  # written outside click's command (a group's help): the same
        return PIPE_CLOSED


def _run(argv: Sequence[str] | None) -> int:
    from budget_middleware.cli.client import CliError
    from budget_middleware.cli.commands import cli
    from budget_middleware.exceptions import BudgetError

    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if sys.stdout is None:  # `>&-`: click wrote nothing, and a create's value was lost, exit 0
        return _fail("the output could not be written: standard output is closed", 1)
    for arg in argv if argv is not None else sys.argv[1:]:
        # Bytes the locale cannot decode reach Python as lone surrogates (`\udcff`), which no
        # store, URL or JSON body can carry: each command died on them with a traceback.
        if any("\ud800" <= c <= "\udfff" for c in arg):
            return _fail(f"the argument {arg!r} is not valid text in this terminal's encoding", 2)
    try:
        status = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="budget-middleware",
            standalone_mode=False,
        )
    except SystemExit:
        # Out of click's main without standalone mode, only where a write met EPIPE (the
        # reader of the output has gone): click has silenced the streams and exits 1, the
        # status of a failure that names its cause, which this is not.
        return PIPE_CLOSED
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except no_args_help as exc:  # a group alone: its help, as click shows it
        click.echo(exc.format_message())
        return 2
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except click.Abort:  # click's word for Ctrl-C once a command runs
        return _fail("interrupted", 130)
    except BudgetError as exc:  # a setting, a config file: messages that name the cause
        return _fail(str(exc), 1)
    except OSError as exc:  # the store's and the files' are CliErrors: writing the output
        return _output_failed(exc)
    try:  # what is still buffered, written now: its failure is this command's, not the exit's
        sys.stdout.flush()
    except OSError as exc:
        return _output_failed(exc)
    return status if isinstance(status, int) else 0


def _output_failed(exc: OSError) -> int:
    """Output that could not be written (`> /dev/full`, a disk or quota full: `ENOSPC`) is a
    failure naming it, exit 1: it was an OSError's traceback. (`main` then drops what the failed
    write left buffered: the interpreter's exit would try it again, "Exception ignored".)"""
    if isinstance(exc, BrokenPipeError):
        return PIPE_CLOSED
    return _fail(f"the output could not be written: {exc.strerror or exc}", 1)


def _fail(message: str, code: int) -> int:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {line}", err=True)
    return code


def main() -> None:
    """The console script `budget-middleware` and `python -m budget_middleware`."""
    _unencodable_replaced()
    status = run()
    if status == PIPE_CLOSED:
        _drop_output()
    elif sys.stdout is not None:
        try:  # (output a failed write left in the buffer: not written again at the exit)
            sys.stdout.flush()
        except OSError:
            _drop_output()
    sys.exit(status)


def _unencodable_replaced() -> None:
    """A character the output's encoding has no byte for is written as "?", not a traceback:
    output redirected on Windows (`> keys.txt`, `| findstr`) is in the ANSI code page (cp1252),
    which has no `名` for a team named so (`--json` writes such a character as its `\\u` escape,
    `output.emit_json`; standard error's is `backslashreplace` already)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        with contextlib.suppress(OSError, ValueError):
            reconfigure(errors="replace")


def _drop_output() -> None:
    """Whatever is still buffered for the closed pipe goes nowhere: the interpreter's last
    flush would print an 'Exception ignored … BrokenPipeError' of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)
        os.close(devnull)
    except (OSError, ValueError):
        pass
