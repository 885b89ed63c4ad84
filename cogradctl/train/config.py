"""The run's configuration: every option of ``cogradctl train`` as one flat, validated dataclass.

``config.toml`` in the output directory is the effective configuration, in the same flat keys that
``train --config`` accepts back. ``RESUME_KEYS`` are the settings a resumed run must share with the
run it continues.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cogradctl.atomic_files import atomic_write_bytes
from cogradctl.errors import UsageError
from cogradctl.labels import MISSING_LABELS, LabelOptions

OUTPUTS = ("last.safetensors", "best.safetensors", "metrics.jsonl")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
EMBEDDINGS = ("auto", "coordinate", "sum", "freeze", "dense")  # tables.MODES
INT_OPTIONS = (
    "warmup_steps",
    "batch_size",
    "data_shards",
    "epochs",
    "max_steps",
    "eval_every",
    "early_stopping",
    "save_every",
    "shuffle_buffer",
    "seed",
    "log_every",
    "measure_every",
)
MAX_INT = 2**63 - 1  # torch's and numpy's seeds, and every count, fit in 64 bits
# Changing these between a run and its resumption would make the result something else.
RESUME_KEYS = (
    "checkpoint",
    "data",
    "method",
    "method_options",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "grad_clip",
    "warmup_steps",
    "schedule",
    "epochs",
    "max_steps",
    "seed",
    "precision",
    "on_invalid_rows",
    "shuffle_buffer",
    "embeddings",
)
LABEL_KEYS = {"missing_labels": "mask", "weight_column": None}  # resume keys too, saved when not these defaults


@dataclass
class TrainConfig:
    """Every option of ``cogradctl train`` (a ``--config`` TOML file uses the same flat keys)."""

    checkpoint: str
    data: str
    out: str
    method: str = "ew"
    method_options: dict = field(default_factory=dict)
    valid: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_clip: float | None = None  # max global norm of the final gradients
    warmup_steps: int = 0
    schedule: str = "constant"
    batch_size: int = 1024  # per process
    data_shards: int | None = None  # default: one per process (or the resumed run's)
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int | None = None  # steps; evaluation also runs at every epoch end and after the last step
    early_stopping: int | None = None  # evaluations without improvement before stopping
    save_every: int | None = None  # steps; state is also saved at every epoch end
    precision: str = "fp32"
    on_nonfinite: str = "abort"
    on_invalid_rows: str = "error"  # or "drop": rows with NaN/inf labels or features
    missing_labels: str = "mask"  # a null label: mask (that task's loss leaves it out), drop (the row) or error
    weight_column: str | None = None  # a column of row weights (finite, ≥ 0) for every loss and metric
    shuffle_buffer: int = 65536  # rows held for shuffling, beyond file and row-group order
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    measure_every: int | None = None  # every N steps: transference on a few fixed training batches
    # shared embedding tables: auto|coordinate|sum|freeze|dense (cogradctl/tables.py); a run's
    # config holds the mode "auto" resolved to (train.setup.read_inputs)
    embeddings: str = "auto"
    tensorboard: bool = False
    overwrite: bool = False
    resume: bool = False

    def check(self) -> None:
        """Every option in range, numbers finite, before anything is read or written."""
        if not str(self.out).strip():
            raise UsageError("--out is empty: give the output directory")
        for name in ("lr", "weight_decay", "momentum", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise UsageError(f"--{_flag(name)} must be a finite number, got {value!r}")
        for name in INT_OPTIONS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value > MAX_INT):
                raise UsageError(f"--{_flag(name)} must be an integer up to {MAX_INT}, got {value!r}")
        if not self.seed >= 0:
            raise UsageError(f"--seed must be in [0, {MAX_INT}], got {self.seed}")
        for name in ("lr", "batch_size", "epochs", "log_every"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("data_shards", "max_steps", "eval_every", "early_stopping", "save_every", "measure_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {value}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.shuffle_buffer < 0:
            raise UsageError(f"--shuffle-buffer must be at least 0, got {self.shuffle_buffer}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or not 0 <= self.momentum < 1:
            raise UsageError("--weight-decay and --warmup-steps must be ≥ 0 and --momentum in [0, 1)")
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("on_nonfinite", ("abort", "skip")),
            ("on_invalid_rows", ("error", "drop")),
            ("missing_labels", MISSING_LABELS),
            ("embeddings", EMBEDDINGS),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.early_stopping is not None and self.valid is None:
            raise UsageError("--early-stopping needs --valid data to evaluate on")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise UsageError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")

    def identity(self, world: int = 1, shards: int = 1) -> dict:
        """What a resumed run must share with the saved one. The batch counts as the global batch
        and the data shards, so a run may resume with another number of processes (docs/distributed.md)."""
        return {
            **{k: getattr(self, k) for k in RESUME_KEYS},
            # only when not the default: a run saved before these options resumes as it was
            **{k: getattr(self, k) for k, default in LABEL_KEYS.items() if getattr(self, k) != default},
            "global_batch": self.batch_size * world,
            "data_shards": shards,
        }

    @property
    def label_options(self) -> LabelOptions:
        """--missing-labels and --weight-column as the data readers take them."""
        return LabelOptions(self.missing_labels, self.weight_column)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def write_config(path: Path, cfg: TrainConfig) -> None:
    """The effective configuration as a flat TOML file that ``--config`` accepts back."""
    lines = ["# the effective configuration of this run (cogradctl train --config accepts this file)"]
    for key, value in plain(cfg).items():
        if value is None or key in ("overwrite", "resume"):
            continue
        if isinstance(value, dict):
            lines.append(f"{key} = {{ {', '.join(f'{json.dumps(k)} = {json.dumps(v)}' for k, v in value.items())} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def plain(cfg: TrainConfig) -> dict:
    """The configuration as JSON-ready values (tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))
