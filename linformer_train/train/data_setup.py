"""The trainer's view of the data: prepare once (rank 0), open everywhere, one loader per rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from linformer_train.config import DataConfig, ModelConfig, TrainConfig


@dataclass
class TrainingData:
    train_loader: object          # MLMLoader: endless, stateful, rank-aware
    eval_loader_factory: object   # () -> iterator over fixed-mask validation batches of this rank
    tokenizer: object
    manifest: dict

    def eval_batches(self, count: int) -> Iterator[dict]:
        return self.eval_loader_factory(count)

    def close(self) -> None:
        self.train_loader.close()


def build_training_data(data: DataConfig, model: ModelConfig, train: TrainConfig, run_dir: Path,
                        rank: int, world_size: int) -> TrainingData:
    """Rank 0 prepares (tokenizer + packed blocks, reused when already there) while the others
    wait; then every rank opens the memory-mapped blocks and builds its own loader."""
    from linformer_train.data import DataError
    from linformer_train.data.loader import MLMLoader, validation_batches
    from linformer_train.data.masking import MLMMasker
    from linformer_train.data.prepare import ensure_prepared, open_prepared
    from linformer_train.data.tokenizer import load_tokenizer

    prepared_dir = None
    error = None
    if rank == 0:
        try:
            prepared_dir = ensure_prepared(data, model.max_seq_len, run_dir, model.vocab_size)
        except DataError as exc:  # every rank must leave the barrier and report the same line
            error = str(exc)
    box = [str(prepared_dir) if prepared_dir else None, error]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise DataError(box[1])
    prepared = open_prepared(Path(box[0]), model.max_seq_len)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    if tokenizer.vocab_size > model.vocab_size:
        raise DataError(
            f"tokenizer {prepared.tokenizer_path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={model.vocab_size}; raise model.vocab_size or train a smaller tokenizer"
        )
    masker = MLMMasker(data.mask_prob, data.mask_replace_prob, data.mask_random_prob,
                       vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                       word_start=tokenizer.word_start if data.whole_word_masking else None,
                       seed=train.seed)
    loader = MLMLoader(prepared.train, masker, train.micro_batch_size, rank=rank,
                       world_size=world_size, seed=train.seed, prefetch=data.prefetch_batches)

    def eval_factory(count: int):
        return validation_batches(prepared.validation, masker, train.micro_batch_size,
                                  rank=rank, world_size=world_size, max_batches=count)

    return TrainingData(loader, eval_factory, tokenizer, prepared.manifest)
