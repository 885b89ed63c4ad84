"""What goes to stdout: rich tables and text, or exactly one JSON document (``--json``)."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value, digits: int = 4) -> str:
    """A metric with ``digits`` decimals, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"
