"""``cogradctl measure-transference``: pairwise lookahead transference and gradient conflict."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

import typer

from cogradctl.cli.core import command
from cogradctl.cli.measure_plot import plot_heatmaps, require_matplotlib
from cogradctl.cli.measure_view import capped_note, print_measurement, untrained_note
from cogradctl.cli.options import (
    Device,
    Json,
    MissingLabels,
    OnInvalid,
    PluginPath,
    Quiet,
    Seed,
    WeightColumn,
    count,
    finite,
    label_options,
    open_data,
    paths,
    report_data,
)
from cogradctl.cli.output import emit_json
from cogradctl.console import Log
from cogradctl.errors import UsageError


@command("measure-transference")
def measure_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to measure.")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob with the label columns.")],
    batches: Annotated[
        int,
        typer.Option(
            help="Number of batches to average over (non-overlapping: at most rows ÷ --batch-size; "
            "fewer is said on stderr and in the output)."
        ),
    ] = 10,
    batch_size: Annotated[int, typer.Option(help="Rows per measured batch.")] = 1024,
    lookahead: Annotated[
        str,
        typer.Option(
            help="sgd: step −α·g_i; optimizer: Adam's next step −α·g_i/(sqrt(v̂')+ε) from the "
            "checkpoint's saved Adam state, v' = β2·v + (1−β2)·g_i² (bias-corrected for step t+1)."
        ),
    ] = "sgd",
    lookahead_lr: Annotated[
        float | None,
        typer.Option(
            "--lookahead-lr",
            help="Lookahead step α (default 0.1 for sgd; the training lr saved in the checkpoint for optimizer).",
        ),
    ] = None,
    holdout: Annotated[
        bool,
        typer.Option(
            "--holdout", help="Step on each batch, measure the losses on the next one (generalising transfer)."
        ),
    ] = False,
    by_module: Annotated[
        bool, typer.Option("--by-module", help="Also break every matrix down by group of shared parameters.")
    ] = False,
    normalize_rows: Annotated[
        bool,
        typer.Option(
            "--normalize-rows",
            help="Also report Z and Z_rel divided by the row's diagonal (the source's own progress).",
        ),
    ] = False,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint from before (e.g. before fine-tuning): "
            "measure it on the same batches and report the change."
        ),
    ] = None,
    min_transference: Annotated[
        float | None, typer.Option(help="Gate: exit 3 if any off-diagonal Z_rel is below this.")
    ] = None,
    max_conflict_rate: Annotated[
        float | None, typer.Option(help="Gate: exit 3 if any pair's conflict rate is above this.")
    ] = None,
    max_regression: Annotated[
        float | None, typer.Option(help="Gate (needs --baseline): exit 3 if any pair's Z_rel fell by more than this.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write heatmaps of Z_rel and the gradient cosine to this PNG, mean ± standard error in "
            'every cell (needs matplotlib: pip install -e ".[plot]").'
        ),
    ] = None,
    raw: Annotated[
        Path | None,
        typer.Option(help="Write every per-batch quantity to this Parquet file (one row per batch × ordered pair)."),
    ] = None,
    embeddings: Annotated[
        str,
        typer.Option(
            help="Shared embedding tables: coordinate (row-sparse: the touched rows of each batch only), "
            "dense (every row a column), auto (coordinate from 2^24 table numbers on, as train --embeddings auto)."
        ),
    ] = "auto",
    on_invalid_rows: OnInvalid = "error",
    missing_labels: MissingLabels = "mask",
    weight_column: WeightColumn = None,
    device: Device = "auto",
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Pairwise lookahead transference (rows: source task, columns: target) and gradient conflict.

    Gates (--min-transference, --max-conflict-rate, --max-regression) print the results first, then
    exit 3 with a one-line reason naming the pair when one fails.
    """
    from cogradctl import checkpoint as ckpt_io
    from cogradctl import measurement
    from cogradctl import transference as tr
    from cogradctl.models import from_checkpoint, resolve_device

    count("--seed", seed, 0)  # a seed must be a non-negative 64-bit integer (torch and numpy take no other)
    labels = label_options(missing_labels, weight_column)
    _check(batches, batch_size, lookahead, lookahead_lr, baseline, max_regression, max_conflict_rate, min_transference)
    if embeddings not in measurement.EMBEDDINGS:
        raise UsageError(f"--embeddings {embeddings!r}: expected {', '.join(measurement.EMBEDDINGS)}")
    if plot is not None:
        require_matplotlib()
    import torch

    from cogradctl.distributed import env_rank, process_group

    log = Log(quiet or env_rank() != 0)
    options = measurement.Options(
        batches=batches,
        batch_size=batch_size,
        lookahead=lookahead,
        lookahead_lr=lookahead_lr,
        seed=seed,
        holdout=holdout,
        by_module=by_module,
        normalize_rows=normalize_rows,
        embeddings=embeddings,
    )
    # Under torchrun, each process measures its share of the batches (docs/distributed.md).
    with process_group(str(resolve_device(device))) as (dist, device_name):
        dev = torch.device(device_name)
        ckpt, model, split = from_checkpoint(checkpoint, paths(plugin_path), dev)
        ckpt.state.clear()  # the model holds the weights: not a second copy of its tables all run
        base_ckpt = None
        if baseline is not None:
            base_ckpt = ckpt_io.load(baseline)
            mine, theirs = ckpt.schema.task_names, base_ckpt.schema.task_names
            if set(mine) != set(theirs):
                raise UsageError(
                    f"--baseline {baseline} has tasks {', '.join(theirs)} but --checkpoint {checkpoint} has "
                    f"{', '.join(mine)}; both must have the same tasks"
                )
            base_ckpt.state.clear()  # its model is loaded from the file when it is measured

        def run(ck, net, sp, path, label):
            mode = measurement.take_tables(net, sp, options)
            if mode == "coordinate":
                log.info(
                    f"{path}: embedding tables {', '.join(sp.table_names)} measured row-sparse (--embeddings coordinate)"
                )
            precond, alpha, state = measurement.lookahead_step(ck, sp, options, path)
            # only the picked row ranges are read
            stream = open_data(data, ck.schema, log, on_invalid_rows, labels=labels)
            with _batch_progress(log, f"measuring {label}") as progress:
                out = measurement.measure(ck, net, sp, stream, precond, alpha, options, dev, dist, progress)
            if mode is not None:
                out[0]["embeddings"] = mode
            if state is not None:
                state["untrained_entries_moved"] = out[0].pop("untrained_entries_moved", 0)
                out[0]["lookahead_state"] = state
                if untrained_note(out[0]):
                    log.warn(f"{path}: {untrained_note(out[0])}")
            return out, stream

        log.info(f"measuring {checkpoint}")
        (result, per_batch), stream = run(ckpt, model, split, checkpoint, "the checkpoint")
        report_data(stream, log)
        if stream.stats["labels_masked"]:  # per task, in the rows measured (the key only when there are some)
            result["labels_masked"] = dict(stream.stats["labels_masked"])
        if capped_note(result):
            log.warn(capped_note(result))
        runs = [("checkpoint", per_batch, result["measured"])]
        if base_ckpt is not None:
            log.info(f"measuring the baseline {baseline} on the same batches")
            _, base_model, base_split = from_checkpoint(baseline, paths(plugin_path), dev)
            (before, before_pb), base_stream = run(base_ckpt, base_model, base_split, baseline, "the baseline")
            # The same rows: what reading them dropped or mapped to OOV was said once, above, unless
            # the baseline's own vocabulary reads them differently.
            if base_stream.stats != stream.stats:
                report_data(base_stream, _Prefixed(log, f"--baseline {baseline}: "))
            before_pb = measurement.add_baseline(result, per_batch, before, before_pb, baseline, normalize_rows)
            runs.append(("baseline", before_pb, result["baseline"]["measured"]))
        result["checkpoint"] = str(checkpoint)
        if not dist.main:
            return  # under torchrun, rank 0 alone writes and prints
        _write_and_print(result, runs, raw, plot, json_out, log)
        tr.gate(
            result,
            min_transference=min_transference,
            max_conflict_rate=max_conflict_rate,
            max_regression=max_regression,
        )


@contextmanager
def _batch_progress(log: Log, description: str):
    """Yields ``progress(done, total)`` for the measurement: a bar on stderr (TTY only, not --quiet),
    started when the number of batches is known."""
    with ExitStack() as stack:
        advance = None

        def progress(done: int, total: int) -> None:
            nonlocal advance
            if advance is None:
                advance = stack.enter_context(log.progress(description, total))
            if done:
                advance()

        yield progress


class _Prefixed(Log):
    """``log`` with every line starting with ``prefix`` (the baseline's own data report)."""

    def __init__(self, log: Log, prefix: str) -> None:
        super().__init__(log.quiet)
        self.log, self.prefix = log, prefix

    def info(self, message: str) -> None:
        self.log.info(self.prefix + message)

    def warn(self, message: str) -> None:
        self.log.warn(self.prefix + message)


def _write_and_print(result: dict, runs: list, raw: Path | None, plot: Path | None, json_out: bool, log: Log) -> None:
    from cogradctl import transference as tr

    if raw is not None:
        tr.write_raw(tr.raw_table(result["tasks"], runs), raw)
        log.info(f"wrote {raw}")
    if plot is not None:
        plot_heatmaps(result, plot)
        log.info(f"wrote {plot}")
    if json_out:
        emit_json(result)
    else:
        print_measurement(result)


def _check(
    batches, batch_size, lookahead, lookahead_lr, baseline, max_regression, max_conflict_rate, min_transference
) -> None:
    count("--batches", batches)
    count("--batch-size", batch_size)
    finite("--lookahead-lr", lookahead_lr, 0, above=True)
    finite("--min-transference", min_transference)
    finite("--max-conflict-rate", max_conflict_rate, 0, 1)
    finite("--max-regression", max_regression)
    if lookahead not in ("sgd", "optimizer"):
        raise UsageError(f"--lookahead {lookahead!r}: expected sgd or optimizer")
    if max_regression is not None and baseline is None:
        raise UsageError("--max-regression needs --baseline BEFORE.safetensors")
