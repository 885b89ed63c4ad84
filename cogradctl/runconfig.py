"""``cogradctl train --config run.toml``: a flat TOML file whose keys are train's options.

Keys are the option names with underscores (``batch_size = 2048``, ``method = "cograd"``,
``method_options = { gamma = 0.2 }``); flags given on the command line override the file. Unknown
keys and values of the wrong type are errors naming the key. The run writes its effective
configuration to ``OUT/config.toml`` in the same format.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from cogradctl.errors import UsageError

# TrainConfig field → accepted Python types (bool is not an int here; an int is a float).
TYPES: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,),
    "data": (str,),
    "out": (str,),
    "method": (str,),
    "method_options": (dict,),
    "valid": (str,),
    "optimizer": (str,),
    "lr": (float, int),
    "weight_decay": (float, int),
    "momentum": (float, int),
    "grad_clip": (float, int),
    "warmup_steps": (int,),
    "schedule": (str,),
    "batch_size": (int,),
    "data_shards": (int,),
    "epochs": (int,),
    "max_steps": (int,),
    "eval_every": (int,),
    "early_stopping": (int,),
    "save_every": (int,),
    "precision": (str,),
    "on_nonfinite": (str,),
    "on_invalid_rows": (str,),
    "missing_labels": (str,),
    "weight_column": (str,),
    "shuffle_buffer": (int,),
    "seed": (int,),
    "device": (str,),
    "log_every": (int,),
    "measure_every": (int,),
    "tensorboard": (bool,),
    "embeddings": (str,),
}


def read(path: Path) -> dict:
    """The validated key → value table of a run file (exit 2 on any problem, naming it)."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(table) - set(TYPES))
    if unknown:
        raise UsageError(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(TYPES))}"
        )
    for key, value in table.items():
        ok = isinstance(value, TYPES[key]) and not (isinstance(value, bool) and bool not in TYPES[key])
        if not ok:
            expected = " or ".join(t.__name__ for t in TYPES[key])
            raise UsageError(f"--config {path}: key '{key}' must be {expected}, got {type(value).__name__} {value!r}")
    return table
