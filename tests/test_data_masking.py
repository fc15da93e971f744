"""MLM masking: rates within tolerance of 15% and 80/10/10, specials never masked, pure function of
(seed, epoch, sample), whole-word masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linformer_train.data import DataError
from linformer_train.data.masking import IGNORE_INDEX, MLMMasker
from linformer_train.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_IDS, UNK_ID

V = 1000


def masker(**kw) -> MLMMasker:
    args = dict(mask_prob=0.15, replace_prob=0.8, random_prob=0.1, vocab_size=V, special_ids=SPECIAL_IDS, seed=7)
    args.update(kw)
    return MLMMasker(**args)


def blocks(b: int = 32, n: int = 512, seed: int = 0) -> np.ndarray:
    """Random ordinary tokens with <s> first and </s>, <pad>, <unk> and <mask> sprinkled in."""
    rng = np.random.default_rng(seed)
    x = rng.integers(5, V, size=(b, n)).astype(np.uint16)
    x[:, 0] = BOS_ID
    specials = rng.random((b, n)) < 0.05
    x[specials] = rng.choice([PAD_ID, EOS_ID, UNK_ID, MASK_ID], size=int(specials.sum()))
    return x


def test_rates_within_tolerance_over_many_draws():
    m, x = masker(), blocks()
    special = np.isin(x, list(SPECIAL_IDS.values()))
    selected = replaced = randomized = kept = 0
    for epoch in range(12):
        inp, lab = m(x, epoch, range(len(x)))
        inp, lab = inp.numpy(), lab.numpy()
        sel = lab != IGNORE_INDEX
        assert not (sel & special).any()                          # specials never predicted
        assert (inp[special] == x[special]).all()                 # nor changed
        assert (lab[sel] == x[sel]).all()                         # labels are the originals
        assert (inp[~sel] == x[~sel]).all()                       # nothing else changes
        selected += sel.sum()
        replaced += (inp[sel] == MASK_ID).sum()
        changed = sel & (inp != MASK_ID) & (inp != x)
        randomized += changed.sum()
        kept += (sel & (inp == x)).sum()
        assert not np.isin(inp[changed], list(SPECIAL_IDS.values())).any()  # random tokens are ordinary
    candidates = 12 * (~special).sum()
    assert abs(selected / candidates - 0.15) < 0.005
    assert abs(replaced / selected - 0.8) < 0.01
    assert abs(randomized / selected - 0.1) < 0.01
    assert abs(kept / selected - 0.1) < 0.01


def test_other_rates_are_honoured():
    m, x = masker(mask_prob=0.3, replace_prob=1.0, random_prob=0.0), blocks(16, 256)
    inp, lab = m(x, 0, range(16))
    sel = (lab != IGNORE_INDEX).numpy()
    cand = ~np.isin(x, list(SPECIAL_IDS.values()))
    assert abs(sel.sum() / cand.sum() - 0.3) < 0.02
    assert (inp.numpy()[sel] == MASK_ID).all()


def test_masks_are_a_pure_function_of_seed_epoch_and_sample():
    m, x = masker(), blocks(8, 128)
    idx = [10, 11, 12, 13, 14, 15, 16, 17]
    a_in, a_lab = m(x, 3, idx)
    b_in, b_lab = masker()(torch.from_numpy(x.astype(np.int64)), 3, idx)  # a fresh masker, torch input
    assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)
    assert a_in.dtype == torch.int64 and a_lab.shape == (8, 128)
    one_in, one_lab = m(x[5:6], 3, [15])                  # the batch a sample lands in does not matter
    assert torch.equal(one_in[0], a_in[5]) and torch.equal(one_lab[0], a_lab[5])
    assert not torch.equal(m(x, 4, idx)[1], a_lab)         # another epoch, another mask
    assert not torch.equal(masker(seed=8)(x, 3, idx)[1], a_lab)
    assert not torch.equal(m(x, 3, [i + 100 for i in idx])[1], a_lab)
    assert not torch.equal(m(x, 3, idx, stream=1)[1], a_lab)


def test_whole_word_masking_masks_words_together():
    rng = np.random.default_rng(1)
    word_start = rng.random(V) < 0.4
    m = masker(word_start=word_start)
    x = blocks(32, 256, seed=2)
    special = np.isin(x, list(SPECIAL_IDS.values()))
    total_sel = total_cand = 0
    for epoch in range(8):
        _, lab = m(x, epoch, range(32))
        sel = (lab != IGNORE_INDEX).numpy()
        for row in range(32):
            starts = word_start[x[row]] | special[row]
            word = np.cumsum(starts)
            for w in np.unique(word[sel[row]]):  # a selected word is selected whole
                members = (word == w) & ~special[row]
                assert sel[row][members].all()
        total_sel += sel.sum()
        total_cand += (~special).sum()
    assert abs(total_sel / total_cand - 0.15) < 0.01
    assert m.whole_word and not masker().whole_word


def test_invalid_settings_and_tokens():
    with pytest.raises(DataError, match="mask_prob=0"):
        masker(mask_prob=0.0)
    with pytest.raises(DataError, match="replace_prob=0.9 \\+ random_prob=0.2"):
        masker(replace_prob=0.9, random_prob=0.2)
    with pytest.raises(DataError, match="word_start has shape"):
        masker(word_start=np.ones(5, bool))
    with pytest.raises(DataError, match="token id 1500 outside the tokenizer's 1000 pieces"):
        masker()(np.array([[1, 1500]]), 0, [0])
    with pytest.raises(ValueError, match="2 sample indices for a batch of 1 rows"):
        masker()(np.array([[1, 10]]), 0, [0, 1])


def test_state_dict_checks_settings():
    m = masker()
    m.load_state_dict(masker().state_dict())
    with pytest.raises(DataError, match=r"masking differs .*seed: 8 -> 7"):
        m.load_state_dict(masker(seed=8).state_dict())
