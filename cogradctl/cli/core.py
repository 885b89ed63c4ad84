"""The Typer application, the error handling that every command shares, and the entry point.

Errors are one line on stderr and an exit code from the table in ``cogradctl.errors`` (a
traceback only with ``--debug`` or ``COGRADCTL_DEBUG=1``). The commands register themselves on
``app`` with the ``command`` decorator when their modules are imported (``cogradctl.cli``).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from typing import Annotated

import typer
import typer.core

from cogradctl import __version__
from cogradctl.allocator import keep_freed_memory
from cogradctl.console import stderr
from cogradctl.errors import EXIT_UNEXPECTED, CogradError, EnvironmentFailure, OutOfMemory

EXIT_CODES = (
    "Exit codes: 0 success; 1 unexpected failure (a bug; rerun with COGRADCTL_DEBUG=1 for a traceback); "
    "2 usage or input error (bad option, missing or invalid file, schema mismatch); 3 a quality gate failed; "
    "4 training diverged (non-finite loss or gradient); "
    "5 the environment refused (disk full, read-only or unwritable location; nothing half-written); "
    "130/143 stopped by SIGINT/SIGTERM after saving (rerun to resume)."
)
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


# Typer (0.29) vendors its own click: its exceptions, not the click package's, are the ones raised.
CLICK_ERRORS = typer.core._click.exceptions


class Group(typer.core.TyperGroup):
    """The root command (and each group's): a command-line parsing error (an unknown option, a missing or mistyped
    value, an unknown command) is the one ``error:`` line on stderr and exit 2, like every other
    input error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # Not standalone: an Exit comes back as its code, a parsing error is raised to here.
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ERRORS.NoArgsIsHelpError as exc:
            exc.show()  # no arguments: the help, as before
            sys.exit(exc.exit_code)
        except CLICK_ERRORS.ClickException as exc:
            stderr.print(f"error: {usage_message(exc)}", markup=False, style="red")
            sys.exit(exc.exit_code)
        except typer.Abort:
            stderr.print("error: aborted", markup=False, style="red")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def format_commands(self, ctx, formatter) -> None:
        """Each command's whole first sentence: click cut them at 45 characters on 80 columns."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class Command(typer.core.TyperCommand):
    """A command whose help names a repeatable option's value as ``<str>`` (not ``<list[str]>``) and
    leaves out the default of an off-by-default ``--x/--no-x`` flag (``[default: no-x]``)."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            if not isinstance(param, typer.core.TyperOption):
                continue
            if param.is_flag and param.secondary_opts and param.default is False:
                param.show_default = False
            if param.metavar is None and not param.is_flag:
                label = re.fullmatch(r"<list\[(\w+)\]>", param.display_type(ctx) or "")
                if label:
                    param.metavar = f"<{label.group(1).lower()}>"
        super().format_help(ctx, formatter)


def usage_message(exc) -> str:
    """A click parsing error as one line: what is wrong, the closest option or command when one is
    close (click computes it), else where the help is."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "cogradctl"
    see = f"see '{where} --help'"
    if isinstance(exc, CLICK_ERRORS.NoSuchOption):
        close = sorted(exc.possibilities or [])
        if len(close) == 1:
            return f"{where}: no such option {exc.option_name}; did you mean {close[0]}?"
        if close:
            return f"{where}: no such option {exc.option_name}; did you mean one of {', '.join(close)}?"
        return f"{where}: no such option {exc.option_name}; {see}"
    text = " ".join(exc.format_message().split()).rstrip(".")
    if text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    text = text.replace(". Did you mean", "; did you mean")
    return f"{where}: {text}" + ("" if "did you mean" in text else f"; {see}")


app = typer.Typer(
    name="cogradctl",
    help="Fine-tune multi-task models with CoGrad, GDOD or a baseline, "
    "and measure task transference and gradient conflict.",
    epilog=EXIT_CODES,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
    cls=Group,
    # Plain help: click wraps each paragraph to the terminal, shows flags without a <bool> placeholder
    # and required options as [required]; rich's boxed tables squeezed the help to a narrow column.
    rich_markup_mode=None,
)
DEBUG = {"on": os.environ.get("COGRADCTL_DEBUG", "") not in ("", "0")}


class GroupApp(typer.Typer):
    """A command group's Typer: its commands format their help as ``Command`` does."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


def command_group(help: str) -> typer.Typer:
    """A command group (``cogradctl data …``) with the root's help options and exit-code epilog."""
    return GroupApp(
        help=help,
        no_args_is_help=True,
        context_settings=dict(HELP_OPTIONS),
        epilog=EXIT_CODES,
        cls=Group,
        rich_markup_mode=None,
    )


def command(name: str, **kwargs):
    """Register a command whose CogradErrors become one line on stderr and their exit code."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except typer.Exit:
                raise
            except CogradError as exc:
                if DEBUG["on"]:
                    raise
                raise error_exit(exc, _rank_prefix()) from None
            except OSError as exc:  # the environment refused (disk full, read-only, permissions)
                if DEBUG["on"]:
                    raise
                raise error_exit(EnvironmentFailure.from_os_error(exc), _rank_prefix()) from None
            except KeyboardInterrupt:
                stderr.print("interrupted", markup=False)
                raise typer.Exit(130) from None
            except Exception as exc:
                if DEBUG["on"]:
                    raise
                if type(exc).__name__ == "OutOfMemoryError":  # torch's, raised by a CUDA allocation
                    raise error_exit(OutOfMemory.from_torch(exc), _rank_prefix()) from None
                stderr.print(
                    f"unexpected error: {type(exc).__name__}: {exc} (rerun with COGRADCTL_DEBUG=1 for a traceback)",
                    markup=False,
                    style="red",
                )
                raise typer.Exit(EXIT_UNEXPECTED) from None

        return app.command(name, epilog=EXIT_CODES, cls=Command, **kwargs)(wrapper)

    return decorate


def error_exit(exc: CogradError, prefix: str = "") -> typer.Exit:
    """Print ``exc`` as the one error line on stderr; → the ``typer.Exit`` with its code, to raise."""
    stderr.print(f"{prefix}error: {exc}", markup=False, style="red")
    return typer.Exit(exc.exit_code)


def _rank_prefix() -> str:
    """Under torchrun, errors from processes other than rank 0 name their rank."""
    from cogradctl.distributed import env_rank

    return f"[rank {env_rank()}] " if env_rank() else ""


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"cogradctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also COGRADCTL_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if debug:
        DEBUG["on"] = True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    stderr.print(f"warning: {message}", markup=False, style="yellow")


def main() -> None:
    warnings.showwarning = _show_warning
    keep_freed_memory()  # glibc: steps reuse their pages instead of faulting them in again
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        app()
        return
    # Under torchrun, leave without the interpreter's finalisation: gloo's worker threads can still
    # be releasing the tensors of the last collectives then, and taking the GIL from them during
    # finalisation aborts the process (SIGABRT after a finished run, seen in about 1 run in 5 on a
    # loaded machine with torch 2.13). Every output is written and closed by now.
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
