"""The command line: parse options, call the library, print. No computation lives here.

stdout carries data only (tables, or exactly one JSON document with ``--json``); logs, warnings and
progress go to stderr. Errors are one line on stderr and an exit code from the table in
``cogradctl.errors`` (a traceback only with ``--debug`` or ``COGRADCTL_DEBUG=1``).

``core.py`` holds the Typer app, the shared error handling and ``main``; ``options.py`` the options
that several commands share; ``output.py`` stdout and ``--json``; each other module one command or
group, except ``measure_view.py`` and ``measure_plot.py``: the tables and summary, and the heatmaps, of
measure-transference.
Importing a command module registers its commands, and ``--help`` lists them in the order of the
imports below, so that order is kept by hand.
"""

# isort: off
from cogradctl.cli.core import DEBUG, app, main
from cogradctl.cli import init, import_, train, evaluate, predict, export, measure, inspect, registry, bench, data

# isort: on

__all__ = [
    "DEBUG",
    "app",
    "main",
    "init",
    "import_",
    "train",
    "evaluate",
    "predict",
    "export",
    "measure",
    "inspect",
    "registry",
    "bench",
    "data",
]
