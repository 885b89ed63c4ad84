"""The state of one training run, in plain dataclasses the loop's functions take and change.

:class:`Progress` is where the run is (saved in every checkpoint as its ``training_state`` and read
back on resume); :class:`Inputs` is what was read and checked before anything was written;
:class:`Run` holds both and every object the loop drives.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl.console import Log
from cogradctl.distributed import Dist, StepReducer
from cogradctl.models import ParamSplit
from cogradctl.stream import ParquetStream
from cogradctl.taskgrad import TaskGradients
from cogradctl.train.batches import Batches
from cogradctl.train.config import TrainConfig
from cogradctl.train.guard import StopFlag
from cogradctl.train.logs import MetricsLog, NoLog, TensorBoard
from cogradctl.train.report import OovCount, ProgressLine
from cogradctl.train.step import Autocast, LossScaler


@dataclass
class Progress:
    """Where the run is: saved as the checkpoint's ``training_state`` and read back on resume."""

    step: int = 0
    epoch: int = 1
    batch: int = 0  # batches done in this epoch
    best_score: float | None = None
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one
    skipped: int = 0  # non-finite steps skipped (--on-nonfinite skip)
    stopped_early: bool = False
    finished_steps: bool = False  # --max-steps reached
    evaluated_step: int | None = None
    before: dict | None = None  # the evaluation before training
    last_eval: dict | None = None
    best_eval: dict | None = None  # the evaluation of best.safetensors (None in states saved before it was kept)

    @classmethod
    def saved(cls, state: dict) -> Progress:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class Inputs:
    """Everything read and checked before anything is written."""

    source: ckpt_io.Checkpoint
    model: torch.nn.Module
    split: ParamSplit
    method: torch.nn.Module
    state: dict | None  # the saved training state of the run being resumed
    batches: Batches
    valid: ParquetStream | None  # rank 0 only
    before: dict | None  # the evaluation of the starting point (a new run with --valid)
    data: dict  # {"train": report.count_rows(...), "valid": ... (rank 0, with --valid)}


@dataclass
class Run:
    """One training run: its inputs, the objects the loop drives and its progress."""

    cfg: TrainConfig
    out: Path
    log: Log
    dist: Dist
    device: torch.device
    inputs: Inputs
    optimizer: torch.optim.Optimizer
    names: list[str | None]  # the optimizer's parameters' checkpoint names
    scaler: LossScaler | None
    grads: TaskGradients
    autocast: Autocast
    reduce: StepReducer | None  # distributed only
    stop: StopFlag
    metrics: MetricsLog | NoLog
    tensorboard: TensorBoard | None
    measure_rows: data_io.Dataset | None  # --measure-every's fixed batches
    total: int  # steps this run will take in all (fixed at its start: the learning-rate schedule's length)
    history_entry: dict
    started: float  # time.time() less the training seconds of earlier sessions of this run
    progress: Progress
    method_warnings: list  # warnings the method raised during the last step
    saved_step: int | None = None  # the step of the state in last.safetensors (None: none saved yet)
    session_started: float = 0.0  # time.time() when this session (this process's part of the run) began
    sessions: int = 1  # sessions of the run that saved progress, this one included (resumes + 1)
    resumed_at: int | None = None  # the step this session resumed at (None: a new run)
    oov: OovCount | None = None  # the training data's unseen categorical values, once counted
    line: ProgressLine | None = None  # the periodic progress line (stderr not a terminal)
    valid_reported: bool = False  # --valid's unseen values and tasks without an AUC were reported

    @property
    def has_valid(self) -> bool:
        return self.cfg.valid is not None
