"""Fine-tuning inputs: tokenize, truncate to the model's length, batch with an attention mask.

Layout (RoBERTa's): ``<s> a </s>`` for one text, ``<s> a </s></s> b </s>`` for a pair, with the
tokenizer's own start and end tokens (``[CLS]`` and ``[SEP]`` for a BERT tokenizer). Inputs longer
than ``max_length`` (default: the model's n) are cut: one text keeps its head; a pair drops
tokens from whichever text is longer, one at a time (longest-first), so both keep a share. With a
model of n=4096 an IMDB review keeps up to 4096 tokens; nothing is cut at 512 unless asked.

Long inputs (``long_inputs: windows``): a single text longer than ``max_length`` becomes
overlapping windows of ``max_length`` tokens, ``stride`` content tokens apart
(linformer_train.data.windows), each its own row with the document's label; ``doc`` maps rows to
documents, and evaluation and prediction aggregate each document's window logits. Sentence pairs
are always cut longest-first.

Padding: a batch is padded to its longest input (``padding=longest``) or to ``max_length``; the
``attention_mask`` marks real tokens. The model zeroes padded keys and values before every
projection and scales projections by the real length, so the choice changes speed, not outputs.

Batches across ranks: every epoch draws a permutation from (seed, epoch), pads it by wrapping to a
whole number of global batches, and gives rank r the r-th micro-batch of each slice, so every rank
runs the same number of steps (uneven shards hang collectives at epoch end). Evaluation shards
examples by rank and pads the shorter shards with dummy batches for the same reason (a ZeRO-3
forward is collective); their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from linformer_train.data.tokenizer import PAD_ID
from linformer_train.finetune.tasks import Examples


@dataclass
class Encoded:
    """Token ids per row (specials added; truncated, or one row per window) and how many
    examples were cut (truncate) or split (windows)."""

    ids: list[np.ndarray]
    labels: Optional[np.ndarray]
    truncated: int
    pad_id: int = PAD_ID
    doc: Optional[np.ndarray] = None
    """With windows: the example each row belongs to (None: one row per example)."""
    windowed: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_docs(self) -> int:
        return len(self.ids) if self.doc is None else (int(self.doc[-1]) + 1 if len(self.doc) else 0)

    @property
    def doc_labels(self) -> Optional[np.ndarray]:
        """One label per example (the labels of each example's first row)."""
        if self.labels is None or self.doc is None:
            return self.labels
        first = np.flatnonzero(np.r_[True, self.doc[1:] != self.doc[:-1]])
        return self.labels[first]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Longest-first: drop from the end of the longer text until both fit ``budget`` together."""
    over = len(a) + len(b) - budget
    if over <= 0:
        return a, b
    la, lb = len(a), len(b)
    # cut the longer down to the shorter's length, then split what is left evenly
    cut_a = min(over, max(0, la - lb))
    cut_b = min(over - cut_a, max(0, lb - la))
    rest = over - cut_a - cut_b
    cut_a += (rest + 1) // 2
    cut_b += rest // 2
    return a[: la - cut_a], b[: lb - cut_b]


def encode(tokenizer, ex: Examples, max_length: int, label_index: Optional[list[int]] = None,
           num_threads: int = 2, long_inputs: str = "truncate", stride: Optional[int] = None) -> Encoded:
    """Tokenize and lay out every example; ``label_index`` holds the label of each as an int.
    ``long_inputs="windows"`` splits a long single text into windows (see the module docstring)."""
    bos, eos = tokenizer.special_ids["bos"], tokenizer.special_ids["eos"]
    firsts = tokenizer.encode(ex.texts, num_threads=num_threads)
    seconds = tokenizer.encode(ex.pairs, num_threads=num_threads) if ex.pairs is not None else None
    if long_inputs == "windows":
        if seconds is not None:
            raise ValueError("windows split single texts; sentence pairs are cut longest-first (long_inputs=truncate)")
        return _encode_windows(firsts, max_length, bos, eos, stride, label_index, tokenizer.special_ids["pad"])
    ids, truncated = [], 0
    for i, a in enumerate(firsts):
        if seconds is None:
            budget = max_length - 2
            cut = len(a) > budget
            seq = [bos, *a[:budget], eos]
        else:
            b = seconds[i]
            a2, b2 = _truncate_pair(a, b, max_length - 4)
            cut = len(a2) < len(a) or len(b2) < len(b)
            seq = [bos, *a2, eos, eos, *b2, eos]
        truncated += cut
        ids.append(np.asarray(seq, dtype=np.int64))
    labels = np.asarray(label_index, dtype=np.int64) if label_index is not None else None
    return Encoded(ids, labels, truncated, tokenizer.special_ids["pad"])


def _encode_windows(firsts: list[list[int]], max_length: int, bos: int, eos: int, stride: Optional[int],
                    label_index: Optional[list[int]], pad_id: int) -> Encoded:
    from linformer_train.data.windows import layout_windows

    ids, doc, windowed = [], [], 0
    for i, a in enumerate(firsts):
        rows = layout_windows(a, max_length, bos, eos, stride)
        ids.extend(rows)
        doc.extend([i] * len(rows))
        windowed += len(rows) > 1
    doc = np.asarray(doc, dtype=np.int64)
    labels = np.asarray(label_index, dtype=np.int64)[doc] if label_index is not None else None
    return Encoded(ids, labels, 0, pad_id, doc, windowed)


def collate(enc: Encoded, idx: np.ndarray, pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Examples ``idx`` as (B, L) input_ids and attention_mask (1 = real token), plus labels."""
    seqs = [enc.ids[i] for i in idx]
    L = pad_to or max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), L), enc.pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=np.int64)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if enc.labels is not None:
        batch["labels"] = torch.from_numpy(enc.labels[idx])
    return batch


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return max(1, -(-num_examples // global_batch))


def train_batches(enc: Encoded, seed: int, epoch: int, micro: int, accum: int, rank: int,
                  world: int, pad_to: Optional[int] = None) -> Iterator[list[dict]]:
    """Each optimizer step's micro-batches for this rank (see the module docstring)."""
    g = np.random.default_rng([seed, epoch])
    perm = g.permutation(len(enc))
    global_batch = micro * accum * world
    steps = steps_per_epoch(len(enc), global_batch)
    perm = np.resize(perm, steps * global_batch)  # wrap: every step is full on every rank
    for s in range(steps):
        chunk = perm[s * global_batch:(s + 1) * global_batch]
        yield [collate(enc, chunk[(m * world + rank) * micro:(m * world + rank + 1) * micro], pad_to)
               for m in range(accum)]


def eval_batches(enc: Encoded, batch_size: int, rank: int, world: int,
                 pad_to: Optional[int] = None) -> Iterator[tuple[np.ndarray, dict]]:
    """(example indices, batch) for this rank's shard, sorted by length (less padding); ranks with
    fewer batches get dummy ones (empty indices) so every rank runs the same number of forwards."""
    shard = np.arange(rank, len(enc), world)
    shard = shard[np.argsort(enc.lengths[shard], kind="stable")]
    per_rank = -(-len(enc) // world)
    total = max(1, -(-per_rank // batch_size))
    for b in range(total):
        idx = shard[b * batch_size:(b + 1) * batch_size]
        if len(idx):
            yield idx, collate(enc, idx, pad_to)
        else:
            yield idx, collate(enc, np.zeros(1, dtype=np.int64), pad_to)
