"""This process's training batches, epoch by epoch, from the run's position in the data."""

from __future__ import annotations

import math

from cogradctl.distributed import Dist
from cogradctl.errors import UsageError
from cogradctl.stream import ParquetStream
from cogradctl.train.config import TrainConfig


def data_shards(cfg: TrainConfig, state: dict | None, world: int) -> int:
    """How many shards the data is cut into: --data-shards, else the resumed run's, else one per
    process. Each process reads shards/world of them, so the world size must divide it."""
    shards = cfg.data_shards or (state["config"].get("data_shards", 1) if state else world)
    if shards % world:
        where = (
            f"the run in {cfg.out} reads its data in {shards} shard(s)"
            if state and not cfg.data_shards
            else f"--data-shards {shards}"
        )
        raise UsageError(f"{where}: run it with a number of processes that divides {shards} (now {world})")
    if (cfg.batch_size * world) % shards:
        raise UsageError(
            f"--batch-size {cfg.batch_size} × {world} process(es) is not a multiple of the {shards} data shards"
        )
    return shards


class Batches:
    """This process's training batches: its data shards, and the first batch (at the run's starting
    position) read up front to check the data before anything is written."""

    def __init__(
        self,
        stream: ParquetStream,
        cfg: TrainConfig,
        shards: int,
        dist: Dist,
        position: tuple[int, int],
        device,
        rows_used: int | None = None,
    ) -> None:
        self.stream, self.cfg, self.shards, self.device = stream, cfg, shards, device
        self.take = dist.shards(shards)
        self.shard_batch = cfg.batch_size * dist.world // shards
        self.num_rows = stream.num_rows  # every row of the files (global row numbers)
        self.rows_used = stream.num_rows if rows_used is None else rows_used  # less the rows dropped
        # Steps per epoch: exact with one shard; with several, a shard holding more than its share
        # of the rows left after dropping can make an epoch a step longer than this.
        self.steps_per_epoch = self.steps(self.rows_used)
        self.position = position
        self.rest = self._read(*position)
        self.first = next(self.rest, None)

    def steps(self, rows: int) -> int:
        """Steps of an epoch of ``rows`` rows."""
        return math.ceil(math.ceil(rows / self.shards) / self.shard_batch)

    def _read(self, epoch: int, start_batch: int):
        return self.stream.batches(
            self.shard_batch,
            shuffle=True,
            seed=self.cfg.seed,
            epoch=epoch,
            start_batch=start_batch,
            device=self.device,
            shards=self.shards,
            take=self.take,
        )

    def batches(self, epoch: int, start_batch: int):
        if (epoch, start_batch) == self.position and self.first is not None:
            first, self.first = self.first, None
            yield first
            yield from self.rest
        else:
            yield from self._read(epoch, start_batch)
