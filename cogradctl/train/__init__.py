"""Fine-tune a checkpoint with a gradient method: ``train(TrainConfig(...), Log())``.

One module per concern:

- ``config``: :class:`TrainConfig`, every option of ``cogradctl train``, validated, and ``config.toml``;
- ``loop``: :func:`train`, the run read top to bottom (inputs, set-up, epochs of steps, evaluation,
  saving, stopping) around one :class:`~cogradctl.train.loop.Run` and its ``Progress``;
- ``step``: :func:`train_step`, one optimisation step (per-task gradients, the method's update,
  the optimizer step), with autocast and the fp16 loss scaler;
- ``optim``: the optimizer's parameters, its construction and fused step, the learning-rate schedule;
- ``state``: the optimizer/method/RNG state saved for an exact resume and put back, whether
  ``--out`` holds a run to resume, and the checks of a saved state (every field and tensor);
- ``batches``: this process's training batches and data shards;
- ``guard``: the output directory, created and locked (an OS file lock) before it is read, and the
  SIGTERM/SIGINT stop flag;
- ``logs``: ``metrics.jsonl``, TensorBoard and the per-step record;
- ``report``: what the run tells its user about its data (rows dropped by ``--on-invalid-rows drop``,
  counted before it starts; unseen categorical values) and its progress (a periodic line on a
  stderr that is not a terminal).

Example (a two-step fine-tune of a fresh sample model)::

    from cogradctl.console import Log
    from cogradctl.train import TrainConfig, train
    summary = train(TrainConfig(checkpoint="init.safetensors", data="sample_data/train.parquet",
                                out="runs/ft", method="cograd", max_steps=2), Log(quiet=True))
    print(summary["steps"])  # 2
"""

from cogradctl.train.batches import Batches, data_shards
from cogradctl.train.config import OPTIMIZERS, OUTPUTS, PRECISIONS, RESUME_KEYS, SCHEDULES, TrainConfig
from cogradctl.train.guard import run_dir, run_lock, stop_signals
from cogradctl.train.logs import MetricsLog, TensorBoard, step_record
from cogradctl.train.loop import train
from cogradctl.train.optim import lr_at, make_optimizer, optimizer_step, trainable
from cogradctl.train.run import Inputs, Progress, Run
from cogradctl.train.save import now, validation_score
from cogradctl.train.state import optimizer_tensors, previous_state, restore
from cogradctl.train.step import Autocast, LossScaler, train_step

__all__ = [
    "OPTIMIZERS",
    "OUTPUTS",
    "PRECISIONS",
    "RESUME_KEYS",
    "SCHEDULES",
    "Autocast",
    "Batches",
    "LossScaler",
    "Inputs",
    "MetricsLog",
    "Progress",
    "Run",
    "TensorBoard",
    "TrainConfig",
    "data_shards",
    "lr_at",
    "make_optimizer",
    "now",
    "optimizer_step",
    "optimizer_tensors",
    "previous_state",
    "restore",
    "run_dir",
    "run_lock",
    "step_record",
    "stop_signals",
    "train",
    "train_step",
    "trainable",
    "validation_score",
]
