"""Rank-aware, resumable MLM loader with background prefetch, and the validation iterator.

Order: epoch ``e`` visits the blocks in a permutation drawn from ``(seed, e)``. Global batch ``b``
of an epoch is positions ``[b*B*W, (b+1)*B*W)`` of that order and rank ``r`` takes its slice
``[r*B, (r+1)*B)``: ranks read disjoint samples and all have ``batches_per_epoch`` batches, so no rank
waits at an epoch's end for another. The position (epoch, batch) is all the state there is; with
masks a pure function of (seed, epoch, sample), restoring it replays the same batches exactly.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from linformer_train.data import DataError
from linformer_train.data.masking import EVAL_STREAM, IGNORE_INDEX, TRAIN_STREAM, MLMMasker

STATE_VERSION = 1
_SHUFFLE_STREAM = 0x5F1E


def mlm_batch(input_ids: torch.Tensor, labels: torch.Tensor, pin: bool = False) -> dict[str, torch.Tensor]:
    """A batch as the model takes it: ids, labels and ``predict_index``, the flat positions of the
    predicted tokens, found here on the host (the model gathers them with index_select, so no device
    ever waits for a boolean mask's nonzero). ``pin`` page-locks the tensors for non_blocking copies."""
    index = torch.from_numpy(np.flatnonzero(labels.numpy().reshape(-1) != IGNORE_INDEX))
    batch = {"input_ids": input_ids, "labels": labels, "predict_index": index}
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


def _take(blocks: Sequence, indices: np.ndarray) -> np.ndarray:
    """(len(indices), n) tokens: one fancy-indexed read from a BlockSet, row by row otherwise."""
    if hasattr(blocks, "take"):
        return blocks.take(indices)
    return np.stack([np.asarray(blocks[int(i)]) for i in indices])


class _Failure:
    """An exception raised in the prefetch thread, handed to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class MLMLoader:
    """Endless iterator of ``{"input_ids": (B, n), "labels": (B, n)}`` LongTensor batches.

    ``epoch`` and ``batch`` name the position of the next batch ``next()`` returns; ``state_dict()``
    counts batches consumed (not the ones the prefetch thread has made ahead). ``wait_seconds`` is
    the total time ``next()`` spent blocked on the prefetch queue (the data-wait the trainer reports).
    """

    def __init__(self, blocks: Sequence, masker: MLMMasker, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 prefetch: int = 2, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        self.blocks, self.masker = blocks, masker
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.prefetch = int(seed), shuffle, drop_last, prefetch
        self.pin_memory = pin_memory
        self.num_blocks = len(blocks)
        per_step = micro_batch_size * world_size
        self.batches_per_epoch = (self.num_blocks // per_step if drop_last
                                  else math.ceil(self.num_blocks / per_step))
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split has {self.num_blocks} blocks, fewer than one global batch "
                            f"of micro_batch_size={micro_batch_size} x {world_size} ranks = {per_step}; use "
                            f"more text, a smaller batch, or a smaller model.max_seq_len")
        self.epoch, self.batch = 0, 0
        self.wait_seconds = 0.0
        self.batches_consumed = 0
        self._order_cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------- positions

    def order(self, epoch: int) -> np.ndarray:
        """All block indices of ``epoch`` in visiting order (cached for the latest epoch asked)."""
        cached_epoch, order = self._order_cache  # one tuple: safe to read from either thread
        if cached_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                    [self.seed % 2**64, _SHUFFLE_STREAM, int(epoch)])))
                order = rng.permutation(self.num_blocks)
            else:
                order = np.arange(self.num_blocks, dtype=np.int64)
            self._order_cache = (epoch, order)
        return order

    def sample_indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's block indices for one batch (wrapping around the order when not drop_last)."""
        start = (batch * self.world_size + self.rank) * self.micro_batch_size
        positions = np.arange(start, start + self.micro_batch_size) % self.num_blocks
        return self.order(epoch)[positions]

    def _advance(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        return (epoch + 1, 0) if batch == self.batches_per_epoch else (epoch, batch)

    def make_batch(self, epoch: int, batch: int) -> dict[str, torch.Tensor]:
        """The batch at a position, computed now (what the prefetch thread runs)."""
        indices = self.sample_indices(epoch, batch)
        input_ids, labels = self.masker(_take(self.blocks, indices), epoch, indices, stream=TRAIN_STREAM)
        return mlm_batch(input_ids, labels, self.pin_memory)

    # ----------------------------------------------------------------------------- iteration

    def __iter__(self) -> "MLMLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch <= 0:
            t0 = time.perf_counter()
            out = self.make_batch(self.epoch, self.batch)
            self.wait_seconds += time.perf_counter() - t0
        else:
            if self._thread is None:
                self._start()
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if isinstance(item, _Failure):
                self._join()
                raise item.exc
            position, out = item
            assert position == (self.epoch, self.batch), (position, self.epoch, self.batch)
        self.epoch, self.batch = self._advance(self.epoch, self.batch)
        self.batches_consumed += 1
        return out

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self.epoch, self.batch, self._queue),
                                        name=f"mlm-prefetch-rank{self.rank}", daemon=True)
        self._thread.start()

    def _produce(self, epoch: int, batch: int, out: queue.Queue) -> None:
        try:
            while not self._stop.is_set():
                item = ((epoch, batch), self.make_batch(epoch, batch))
                while not self._stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                epoch, batch = self._advance(epoch, batch)
        except BaseException as exc:  # hand it to next(); the thread ends here
            out.put(_Failure(exc))

    def _join(self) -> None:
        """Stop the prefetch thread and drop what it made ahead (the position is unaffected)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # make room so a blocked put sees the stop flag
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread, self._queue = None, None

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts it from the current position."""
        self._join()

    def __enter__(self) -> "MLMLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch to consume, and what it is only valid with."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "num_blocks": self.num_blocks, "micro_batch_size": self.micro_batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "batches_consumed": self.batches_consumed, "masking": self.masker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. Another micro batch or rank count is accepted when the
        samples consumed in the epoch fall on a batch boundary of the new layout."""
        for key in ("seed", "num_blocks", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the saved data-loader state has {key}={state[key]} but this run has "
                                f"{getattr(self, key)}; resume with the same data and train.seed")
        if "masking" in state:
            self.masker.load_state_dict(state["masking"])
        epoch, batch = int(state["epoch"]), int(state["batch"])
        per_step = self.micro_batch_size * self.world_size
        saved_step = state["micro_batch_size"] * state["world_size"]
        if saved_step != per_step:
            samples = batch * saved_step
            if samples % per_step:
                raise DataError(f"cannot resume mid-epoch: {samples} samples consumed is not a multiple of "
                                f"micro_batch_size x ranks = {per_step}; keep that product or resume at an "
                                f"epoch boundary")
            batch = samples // per_step
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._join()
        self.epoch, self.batch = epoch, batch
        self.batches_consumed = int(state.get("batches_consumed", 0))

    def state_for_consumed(self, consumed_samples: int) -> dict[str, Any]:
        """A state positioned after ``consumed_samples`` samples over all ranks (e.g. after resuming
        on another number of ranks); epochs hold ``batches_per_epoch`` global batches."""
        per_step = self.micro_batch_size * self.world_size
        total = int(consumed_samples) // per_step
        epoch, batch = divmod(total, self.batches_per_epoch)
        state = self.state_dict()
        state.update(epoch=epoch, batch=batch, batches_consumed=total)
        return state


def validation_batches(blocks: Sequence, masker: MLMMasker, micro_batch_size: int, num_batches: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``num_batches`` global batches of the validation blocks, in order, with fixed masks.

    Every call yields the same batches. When the blocks run out, a rank's last batch is filled with
    rows whose labels are all -100 (they add nothing to the loss), so every rank yields the same
    number of equally shaped batches.
    """
    per_step = micro_batch_size * world_size
    count = min(num_batches, math.ceil(len(blocks) / per_step))
    for b in range(count):
        start = (b * world_size + rank) * micro_batch_size
        positions = np.arange(start, start + micro_batch_size)
        real = positions < len(blocks)
        indices = np.where(real, positions, 0)
        input_ids, labels = masker(_take(blocks, indices), 0, indices, stream=EVAL_STREAM)
        if not real.all():
            pad = torch.from_numpy(~real)
            labels[pad] = IGNORE_INDEX
        yield mlm_batch(input_ids, labels)

