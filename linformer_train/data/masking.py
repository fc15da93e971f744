"""Dynamic MLM masking: a fresh mask each time a block is drawn, a pure function of (seed, epoch, sample).

Each sample gets its own numpy Generator seeded from ``(seed, stream, epoch, sample index)``, so the
mask of a block depends on nothing else: not on the batch it lands in, the rank that reads it, the
prefetch thread's timing, or how many batches came before. A resumed run therefore sees exactly the
masks the uninterrupted run would have seen, and the validation stream (``EVAL_STREAM``) is the same
at every evaluation.

Selection is a Bernoulli(mask_prob) draw per token (per word with whole-word masking, so each token
is still selected with probability mask_prob); special tokens (<pad> <s> </s> <unk> <mask>) are never
selected. Of the selected tokens, ``replace_prob`` become <mask>, ``random_prob`` a random
non-special piece, and the rest stay as they are (BERT's 80/10/10). Labels hold the original token at
selected positions and -100 elsewhere.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import numpy as np
import torch

from linformer_train.data import DataError

IGNORE_INDEX = -100
TRAIN_STREAM = 0
EVAL_STREAM = 1


class MLMMasker:
    """Turns (B, n) token blocks into ``(input_ids, labels)`` LongTensors for masked-LM training."""

    def __init__(self, mask_prob: float = 0.15, replace_prob: float = 0.8, random_prob: float = 0.1,
                 vocab_size: int = 0, special_ids: Mapping[str, int] | Iterable[int] = (),
                 word_start: Optional[np.ndarray] = None, seed: int = 0, mask_id: Optional[int] = None):
        if not 0.0 < mask_prob < 1.0:
            raise DataError(f"mask_prob={mask_prob} must lie in (0, 1)")
        if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1.0:
            raise DataError(f"replace_prob={replace_prob} + random_prob={random_prob} must be "
                            f"non-negative and at most 1")
        if vocab_size <= 0:
            raise DataError(f"vocab_size={vocab_size} must be positive (the tokenizer's piece count)")
        ids = list(special_ids.values()) if isinstance(special_ids, Mapping) else list(special_ids)
        if mask_id is None:  # the tokenizer's own, from its special ids
            if not isinstance(special_ids, Mapping) or "mask" not in special_ids:
                raise DataError("the mask token's id is unknown: pass mask_id, or special_ids with a 'mask' entry")
            mask_id = int(special_ids["mask"])
        if not 0 <= mask_id < vocab_size:
            raise DataError(f"mask_id={mask_id} lies outside the vocabulary of {vocab_size}")
        self.mask_prob, self.replace_prob, self.random_prob = mask_prob, replace_prob, random_prob
        self.vocab_size, self.seed, self.mask_id = vocab_size, int(seed) % 2**64, mask_id
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[i for i in ids if 0 <= i < vocab_size] + [mask_id]] = True
        self.random_pool = np.flatnonzero(~self.special)  # what a "random token" may be
        if word_start is not None:
            word_start = np.asarray(word_start, dtype=bool)
            if word_start.shape != (vocab_size,):
                raise DataError(f"word_start has shape {word_start.shape}, expected ({vocab_size},)")
            word_start = word_start | self.special  # a special token ends the word before it
        self.word_start = word_start

    @property
    def whole_word(self) -> bool:
        return self.word_start is not None

    def rng(self, epoch: int, index: int, stream: int = TRAIN_STREAM) -> np.random.Generator:
        """The generator of one sample's mask."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, int(stream), int(epoch), int(index)])))

    def mask_one(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) int64 arrays for one (n,) block."""
        tokens = tokens.astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"a block holds token id {int(tokens.max())} outside the tokenizer's "
                            f"{self.vocab_size} pieces; the data was prepared with another tokenizer")
        n = tokens.shape[0]
        candidate = ~self.special[tokens]
        if self.word_start is None:
            selected = (rng.random(n) < self.mask_prob) & candidate
        else:
            word = np.cumsum(self.word_start[tokens]) - 1  # word id per token; -1 before a first start
            word -= word.min(initial=0)
            selected = (rng.random(int(word[-1]) + 1 if n else 0)[word] < self.mask_prob) & candidate
        action = rng.random(n)
        to_mask = selected & (action < self.replace_prob)
        to_random = selected & (action >= self.replace_prob) & (action < self.replace_prob + self.random_prob)
        inputs = tokens.copy()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = self.random_pool[rng.integers(0, len(self.random_pool), int(to_random.sum()))]
        labels = np.where(selected, tokens, IGNORE_INDEX)
        return inputs, labels

    def __call__(self, tokens: np.ndarray | torch.Tensor, epoch: int, sample_indices: Iterable[int],
                 stream: int = TRAIN_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a (B, n) batch whose rows are the samples ``sample_indices`` of ``epoch``."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        indices = [int(i) for i in sample_indices]
        if len(indices) != tokens.shape[0]:
            raise ValueError(f"{len(indices)} sample indices for a batch of {tokens.shape[0]} rows")
        inputs = np.empty(tokens.shape, dtype=np.int64)  # (B, n)
        labels = np.empty(tokens.shape, dtype=np.int64)  # (B, n)
        for row, index in enumerate(indices):
            inputs[row], labels[row] = self.mask_one(tokens[row], self.rng(epoch, index, stream))
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def state_dict(self) -> dict:
        """Masks are stateless beyond these settings; stored to catch a resume with other ones."""
        return {"seed": self.seed, "mask_prob": self.mask_prob, "replace_prob": self.replace_prob,
                "random_prob": self.random_prob, "vocab_size": self.vocab_size, "whole_word": self.whole_word}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = [f"{k}: {state[k]} -> {mine[k]}" for k in mine if k in state and state[k] != mine[k]]
        if diff:
            raise DataError(f"the checkpoint's masking differs from this run's ({'; '.join(diff)}); "
                            f"resume with the same data.mask_* settings and train.seed")
