"""Loader: disjoint ranks with equal batch counts, epochs, exact resume under prefetch, clean shutdown,
deterministic validation batches, and build_training_data end to end."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from helpers import proc
from linformer_train.config import load_config
from linformer_train.data import DataError
from linformer_train.data.loader import MLMLoader, validation_batches
from linformer_train.data.pipeline import build_training_data
from linformer_train.data.masking import IGNORE_INDEX, MLMMasker
from linformer_train.data.tokenizer import SPECIAL_IDS

V, N_TOK = 500, 32


class Blocks:
    """A plain sequence of blocks (no .take): block i holds tokens derived from i."""

    def __init__(self, count: int):
        self.data = (5 + (np.arange(count)[:, None] * 31 + np.arange(N_TOK)[None]) % (V - 5)).astype(np.uint16)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def make(count=103, batch=4, rank=0, world=1, prefetch=2, **kw) -> MLMLoader:
    masker = MLMMasker(0.15, 0.8, 0.1, V, SPECIAL_IDS, seed=3)
    return MLMLoader(Blocks(count), masker, batch, rank=rank, world_size=world, seed=11, prefetch=prefetch, **kw)


def epoch_indices(loader: MLMLoader, epoch: int) -> list[np.ndarray]:
    return [loader.sample_indices(epoch, b) for b in range(loader.batches_per_epoch)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                    torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_disjoint_samples_equal_batch_counts(drop_last):
    r0, r1 = make(rank=0, world=2, drop_last=drop_last), make(rank=1, world=2, drop_last=drop_last)
    assert r0.batches_per_epoch == r1.batches_per_epoch == (12 if drop_last else 13)
    for epoch in (0, 1):
        a = np.concatenate(epoch_indices(r0, epoch))
        b = np.concatenate(epoch_indices(r1, epoch))
        assert len(a) == len(b) == r0.batches_per_epoch * 4
        if drop_last:
            assert not set(a) & set(b) and len(set(a)) == len(a) and len(set(b)) == len(b)
        else:  # the last batch wraps around the order: everything seen, only the wrap repeats
            assert set(a) | set(b) == set(range(103))
            assert len(set(a[:-4]) & set(b[:-4])) == 0
    assert not np.array_equal(np.concatenate(epoch_indices(r0, 0)), np.concatenate(epoch_indices(r0, 1)))
    # the batches really are the blocks at those indices
    batch = next(r1)
    idx = r1.sample_indices(0, 0)
    sel = batch["labels"] != IGNORE_INDEX
    want = torch.from_numpy(Blocks(103).data[idx].astype(np.int64))
    assert torch.equal(batch["labels"][sel], want[sel]) and torch.equal(batch["input_ids"][~sel], want[~sel])
    r0.close(), r1.close()


def test_endless_across_epochs_with_epoch_counter():
    loader = make(count=20, batch=4, prefetch=0, shuffle=False)
    assert loader.batches_per_epoch == 5
    epochs = []
    for _ in range(12):
        epochs.append(loader.epoch)
        next(loader)
    assert epochs == [0] * 5 + [1] * 5 + [2] * 2
    assert loader.batches_consumed == 12 and loader.state_dict()["batch"] == 2
    assert list(loader.sample_indices(1, 0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_gives_identical_batches_and_masks(prefetch):
    ref = make(count=30, batch=4, prefetch=prefetch)  # 7 batches per epoch
    head = [next(ref) for _ in range(5)]
    time.sleep(0.05)  # let the prefetch thread run ahead of the consumer
    state = ref.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 5)  # consumed, not produced
    tail = [next(ref) for _ in range(9)]               # crosses into epoch 1
    resumed = make(count=30, batch=4, prefetch=prefetch)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/torch.save round trip
    assert same([next(resumed) for _ in range(9)], tail)
    assert not same(head[:1], tail[:1])
    ref.load_state_dict(state)  # rewinding a running loader restarts its prefetch from there
    assert same([next(ref) for _ in range(3)], tail[:3])
    ref.close(), resumed.close()


def test_other_rank_count_resumes_from_the_global_sample_position():
    two = [make(rank=r, world=2, prefetch=0) for r in (0, 1)]
    for _ in range(3):
        for loader in two:
            next(loader)
    one = make(batch=8, world=1, prefetch=0)
    one.load_state_dict(two[0].state_dict())
    expected = [next(loader) for loader in two]
    got = next(one)
    assert torch.equal(got["input_ids"], torch.cat([e["input_ids"] for e in expected]))
    assert torch.equal(got["labels"], torch.cat([e["labels"] for e in expected]))
    state = one.state_for_consumed(4 * 8 + 12 * 8)  # 4 batches of epoch 1
    assert (state["epoch"], state["batch"]) == (1, 4)
    odd = make(batch=3, world=1, prefetch=0)
    with pytest.raises(DataError, match=r"32 samples consumed is not a multiple of micro_batch_size x ranks = 3"):
        odd.load_state_dict(two[0].state_dict())
    with pytest.raises(DataError, match=r"num_blocks=103 but this run has 50"):
        make(count=50).load_state_dict(two[0].state_dict())


def test_prefetch_thread_shuts_down_and_restarts():
    loader = make(prefetch=2)
    next(loader)
    thread = loader._thread
    assert thread is not None and thread.is_alive()
    loader.close()
    assert not thread.is_alive() and loader._thread is None
    position = loader.state_dict()["batch"]
    next(loader)  # iterating again restarts it at the consumed position
    assert loader.state_dict()["batch"] == position + 1
    with make(prefetch=2) as ctx:
        next(ctx)
    assert ctx._thread is None
    assert not [t for t in threading.enumerate() if t.name.startswith("mlm-prefetch") and t.is_alive()
                and t is not loader._thread]
    loader.close()


def test_wait_seconds_measures_time_blocked_in_next():
    class Slow(Blocks):
        def __getitem__(self, i):
            time.sleep(0.01)
            return super().__getitem__(i)

    loader = MLMLoader(Slow(40), MLMMasker(0.15, 0.8, 0.1, V, SPECIAL_IDS), 4, prefetch=1)
    for _ in range(3):
        next(loader)
    assert loader.wait_seconds >= 0.05  # three batches of four 10 ms reads, mostly waited for
    loader.close()


def test_errors_in_the_prefetch_thread_reach_next():
    class Broken(Blocks):
        def __getitem__(self, i):
            raise OSError("disk went away")

    loader = MLMLoader(Broken(40), MLMMasker(0.15, 0.8, 0.1, V, SPECIAL_IDS), 4, prefetch=2)
    with pytest.raises(OSError, match="disk went away"):
        next(loader)
    loader.close()


def test_too_few_blocks_for_one_global_batch():
    with pytest.raises(DataError, match=r"has 7 blocks, fewer than one global batch of micro_batch_size=4 x 2 ranks = 8"):
        make(count=7, batch=4, world=2)


def test_validation_batches_are_fixed_and_equal_per_rank():
    blocks = Blocks(21)
    masker = MLMMasker(0.15, 0.8, 0.1, V, SPECIAL_IDS, seed=3)
    runs = [[list(validation_batches(blocks, masker, 4, 10, rank=r, world_size=2)) for r in (0, 1)]
            for _ in range(2)]
    assert same(runs[0][0], runs[1][0]) and same(runs[0][1], runs[1][1])  # same batches every time
    assert len(runs[0][0]) == len(runs[0][1]) == 3                       # ceil(21 / 8), equal per rank
    last = runs[0][1][-1]  # rank 1's last batch: positions 20..23, only 20 exists
    assert (last["labels"][1:] == IGNORE_INDEX).all() and (last["labels"][0] != IGNORE_INDEX).any()
    assert len(list(validation_batches(blocks, masker, 4, 2, rank=0, world_size=2))) == 2
    train_masks = masker(blocks.data[:4], 0, range(4))[1]
    assert not torch.equal(runs[0][0][0]["labels"], train_masks)  # its own mask stream


def test_build_training_data_end_to_end(tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    overrides = ["data.source=files", f"data.paths=[{corpus}]", "data.tokenizer_vocab_size=400",
                 "data.num_proc=1", "data.validation_fraction=0.1", "data.whole_word_masking=true",
                 "model.vocab_size=512", "model.max_seq_len=64", "model.k=16",
                 "train.micro_batch_size=4", f"train.run_dir={tmp_path / 'run'}"]
    cfg = load_config([], overrides)
    data = build_training_data(cfg.data, cfg.model, cfg.train, cfg.train.run_dir)
    batch = next(data.train_loader)
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].dtype == torch.int64
    assert data.masker.whole_word and data.tokenizer.vocab_size == 400
    evals = list(data.eval_batches(2))
    assert len(evals) == 2 and same(evals, list(data.eval_batches(2)))
    assert (data.prepared.root / "manifest.json").is_file()
    data.close()
    tok = data.prepared.tokenizer_path
    small = load_config([], [o for o in overrides if "tokenizer_vocab_size" not in o]
                        + ["model.vocab_size=300", f"data.tokenizer={tok}"])
    with pytest.raises(DataError, match=r"has 400 pieces but model.vocab_size=300"):
        build_training_data(small.data, small.model, small.train, small.train.run_dir)


def _rank_main(rank: int, port: int, overrides: list[str], out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config([], overrides)
        data = build_training_data(cfg.data, cfg.model, cfg.train, cfg.train.run_dir, rank=rank, world_size=2)
        indices = [data.train_loader.sample_indices(0, b).tolist() for b in range(data.train_loader.batches_per_epoch)]
        out.put((rank, "ok", str(data.prepared.root), indices, len(list(data.eval_batches(50)))))
        data.close()
    except Exception as exc:
        out.put((rank, type(exc).__name__, str(exc), None, None))
    finally:
        dist.destroy_process_group()


def _two_ranks(overrides: list[str]) -> dict:
    import multiprocessing
    import queue
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # fork of a process running threads can deadlock
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, overrides, out)) for r in (0, 1)]
    results = {}

    def both_reported() -> bool:
        while len(results) < 2:
            try:
                r = out.get_nowait()
            except queue.Empty:
                return False
            results[r[0]] = r
        return True

    def alive() -> list[int]:
        return [p.pid for p in procs if p.is_alive()]

    try:  # no deadline: waits while the ranks progress (helpers/proc.py), never leaves them running
        for p in procs:
            p.start()
        proc.wait_for_processes(both_reported, "both ranks' results", alive)
        proc.wait_for_processes(lambda: not alive(), "both ranks to exit", alive)
    finally:
        proc.kill_trees(alive())
        for p in procs:
            if p.pid is not None:
                p.join()
    return results


@pytest.mark.slow
def test_two_process_ranks_share_one_preparation(tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    overrides = ["data.source=files", f"data.paths=[{corpus}]", "data.tokenizer_vocab_size=400",
                 "data.num_proc=1", "data.validation_fraction=0.1", "model.vocab_size=512",
                 "model.max_seq_len=64", "model.k=16", "train.micro_batch_size=4",
                 f"train.run_dir={tmp_path / 'run'}"]
    res = _two_ranks(overrides)
    assert res[0][1] == res[1][1] == "ok" and res[0][2] == res[1][2]
    a, b = np.concatenate(res[0][3]), np.concatenate(res[1][3])
    assert len(a) == len(b) and not set(a) & set(b)   # disjoint samples, equal batch counts
    assert res[0][4] == res[1][4] > 0                   # equal validation batch counts
    bad = _two_ranks([o if not o.startswith("data.paths") else f"data.paths=[{tmp_path / 'nope.txt'}]"
                      for o in overrides])
    assert bad[0][1] == bad[1][1] == "DataError"        # rank 1 is told, instead of waiting forever
    assert "nope.txt does not exist" in bad[0][2]
    assert bad[1][2].startswith("rank 0 could not prepare the data: data.paths: ")
