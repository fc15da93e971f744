"""A warm start keeps the source model's own tokenizer (a WordPiece trained here with `tokenizers`)
and that tokenizer works end to end: conversion with the HF model's outputs, data preparation,
pretraining with train.init_from, export, fine-tuning and prediction, special ids read from it."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pretrain, run_cli
from linformer_train.cli import run_main
from linformer_train.convert import from_pretrained
from linformer_train.convert.entry import convert
from linformer_train.data import DataError
from linformer_train.data.tokenizer import HFTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the a movie film plot actor story music scene very really quite good great love fun bad terrible "
         "hate boring long short dark bright old new".split())
POS, NEG = {"good", "great", "love", "fun"}, {"bad", "terrible", "hate", "boring"}
# ids 0-4 in this order: each special sits where the sentencepiece layout (<pad> <s> </s> <unk> <mask>)
# has another one, so any code still assuming that layout fails here
SPECIALS = ["[UNK]", "[MASK]", "[CLS]", "[SEP]", "[PAD]"]
UNK, MASK, CLS, SEP, PAD = range(5)


def sentence(rng: random.Random) -> tuple[str, str]:
    words = rng.choices([w for w in WORDS if w not in POS | NEG], k=rng.randint(4, 10))
    label = rng.random() < 0.5
    words.insert(rng.randrange(len(words) + 1), rng.choice(sorted(POS if label else NEG)))
    return " ".join(words).capitalize() + ".", "pos" if label else "neg"


def train_wordpiece(folder: Path, lines: list[str]) -> Path:
    """A BERT-style WordPiece trained offline, saved as HF saves a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_truncation(16)  # as saved tokenizers often are: the data code must not be cut by it
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
         "mask_token": "[MASK]", "do_lower_case": True}))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A random BERT MLM (2 x 64, n=64) saved with its own WordPiece tokenizer, a text corpus and
    a labelled sentence task."""
    root = tmp_path_factory.mktemp("hf_tok")
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + "." for _ in range(3000)]
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    hf_dir = root / "bert"
    tok_file = train_wordpiece(hf_dir, corpus)
    vocab = HFTokenizer(tok_file).vocab_size
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, pad_token_id=PAD,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(hf_dir)
    for split, count in (("train", 500), ("dev", 200)):
        with open(root / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n")
            for _ in range(count):
                f.write("\t".join(sentence(rng)) + "\n")
    return root, hf_dir, model


def test_special_ids_are_read_from_the_tokenizer(bert, tmp_path):
    _, hf_dir, _ = bert
    tok = load_tokenizer(hf_dir)  # a directory holding only tokenizer.json: Hugging Face
    assert tok.kind == "hf" and tok.special_ids == {"bos": CLS, "eos": SEP, "pad": PAD, "unk": UNK, "mask": MASK}
    long = " ".join(["movie"] * 40)
    assert len(tok.encode(long)[0]) == 40                         # the file's truncation is switched off
    ids = tok.encode("The plot was boring.")[0]
    assert tok.word_start[ids].tolist() == [not tok.pipeline.id_to_token(i).startswith("##") for i in ids]
    # fine-tuning inputs: [CLS] a [SEP] (pairs: [CLS] a [SEP][SEP] b [SEP]), padded with [PAD]
    from linformer_train.finetune.data import collate, encode
    from linformer_train.finetune.tasks import Examples

    enc = encode(tok, Examples(["a good film", "bad"], ["fun", "the plot"], ["1", "0"], "mem"), 32, [1, 0])
    assert [x[0] for x in enc.ids] == [CLS, CLS] and [x[-1] for x in enc.ids] == [SEP, SEP]
    assert (enc.ids[0] == SEP).sum() == 3
    batch = collate(enc, np.arange(2))
    assert batch["input_ids"][1, len(enc.ids[1]):].tolist() == [PAD] * (len(enc.ids[0]) - len(enc.ids[1]))
    # no config: the usual names are found; a tokenizer without a mask token is one clear line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(bare).special_ids["bos"] == CLS
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[MASK]"]
    spec["model"]["vocab"].pop("[MASK]")
    (bare / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"names no mask token \(mask_token in tokenizer_config.json / "
                                        r"special_tokens_map.json\) and has none of \[MASK\], <mask>"):
        load_tokenizer(bare)


def test_warm_start_keeps_the_own_tokenizer_and_runs_end_to_end(bert, tmp_path, capsys):
    root, hf_dir, hf_model = bert
    full = tmp_path / "full"
    assert run_main(convert, ["warm-start", str(hf_dir), str(full), "model.attention=full"]) == 0
    assert "note: attention=linformer" not in capsys.readouterr().out
    assert sorted(p.name for p in full.iterdir()) == ["config.yaml", "model.safetensors", "model_info.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(full)
    ours = from_pretrained(full)
    assert ours.cfg.vocab_size == hf_model.config.vocab_size and ours.cfg.pad_token_id == PAD
    texts = ["The music was great fun.", "A terrible, boring plot."]
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), pad_token="[PAD]",
                                                  cls_token="[CLS]", sep_token="[SEP]")
    ids = [[CLS, *x, SEP] for x in tok.encode(texts)]              # [CLS] a [SEP] with the tokenizer's ids
    width = max(map(len, ids))
    batch = torch.tensor([x + [PAD] * (width - len(x)) for x in ids])
    mask = (batch != PAD).long()
    assert [hf_tok(t)["input_ids"] for t in texts] == ids           # the same ids the HF tokenizer gives
    with torch.no_grad():
        diff = (ours(batch, mask) - hf_model(input_ids=batch, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4                                  # the source model's outputs, unchanged

    # into Linformer: said at once that E/F start untrained; then continued pretraining on the
    # corpus tokenized with the same WordPiece, export, fine-tuning and prediction
    lin = tmp_path / "lin"
    assert run_main(convert, ["warm-start", str(hf_dir), str(lin), "model.k=16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: attention=linformer: the source model has no E/F projections, so they start "
                          f"untrained (mean pooling over windows) and {lin} does not yet compute")
    run_dir = tmp_path / "run"
    res = pretrain(["--config", str(lin / "config.yaml"), f"train.init_from={lin}", f"data.tokenizer={lin}",
                    "data.source=files", f"data.paths=[{root / 'corpus.txt'}]", "data.text_split=line",
                    "data.num_proc=1", "data.validation_fraction=0.05", "data.whole_word_masking=true",
                    "train.max_steps=20", "train.micro_batch_size=8", "train.eval_every=10", "train.eval_batches=2",
                    "train.peak_tflops=1.0", "optim.lr=1e-3", "optim.warmup_steps=2", "precision.dtype=fp32",
                    "logging.log_every=5", "logging.tensorboard=false", f"train.run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["special_ids"] == tok.special_ids
    blocks = np.fromfile(run_dir / "data" / "train.bin", dtype=np.uint16).reshape(-1, 64)
    assert (blocks[:, 0] == CLS).all() and (blocks == SEP).any() and not np.isin(blocks, [PAD, MASK]).any()
    from linformer_train.config import load_config
    from linformer_train.data.pipeline import build_training_data

    cfg = load_config([run_dir / "config.yaml"], [])
    data = build_training_data(cfg.data, cfg.model, cfg.train, run_dir)
    try:
        inputs, labels = data.masker(blocks[:64], 0, range(64))
        assert data.masker.mask_id == MASK and (inputs == MASK).any()
        assert not np.isin(labels[labels != -100].numpy(), [CLS, SEP, PAD, UNK, MASK]).any()
    finally:
        data.close()
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "eval"]
    assert losses[-1] < losses[0], losses
    exported = tmp_path / "exported"
    assert run_main(convert, ["export", str(run_dir), str(exported)]) == 0
    assert (exported / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()

    ft = tmp_path / "ft"
    res = run_cli([sys.executable, "tools/finetune.py", "train", f"model.pretrained={exported}",
                   f"task.train_file={root / 'train.tsv'}", f"task.eval_file={root / 'dev.tsv'}",
                   "task.text_column=sentence", "train.epochs=4", "train.micro_batch_size=16", "optim.lr=2e-3",
                   "precision.dtype=fp32", "logging.tensorboard=false", f"train.output_dir={ft}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ft / "results.json").read_text())["mean"]["accuracy"] > 0.8
    best = ft / "seed_1234" / "best"
    (tmp_path / "in.txt").write_text("What a great, fun movie.\nA boring and terrible story.\n")
    res = run_cli([sys.executable, "tools/finetune.py", "predict", "--model", str(best), "--input",
                   str(tmp_path / "in.txt"), "--output", str(tmp_path / "labels.txt")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "labels.txt").read_text().splitlines() == ["pos", "neg"]


def test_warm_start_refuses_another_hf_tokenizer_and_a_missing_one(bert, tmp_path, capsys):
    _, hf_dir, _ = bert
    other = tmp_path / "other"
    train_wordpiece(other, ["completely different words here"] * 50)
    code = run_main(convert, ["warm-start", str(hf_dir), str(tmp_path / "o"), "--tokenizer", str(other),
                              "model.attention=full"])
    err = capsys.readouterr().err
    assert code == 2 and f"--tokenizer {other / 'tokenizer.json'} is a Hugging Face tokenizer other than" in err
    bare = tmp_path / "no_tok"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    code = run_main(convert, ["warm-start", str(bare), str(tmp_path / "o2"), "model.attention=full"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bare} has no tokenizer.json (the fast-tokenizer file")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
