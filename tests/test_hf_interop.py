"""Models that leave the framework: a model directory -> transformers (AutoModel*, fill-mask,
Trainer) and back. Tiny models and tokenizers are made here; nothing is downloaded.

- the fast tokenizer gives our sentencepiece ids (BPE: every line; Unigram: every line but exact
  score ties, which come out as the same pieces in another order), special ids 0-4
- AutoModelForMaskedLM / AutoModel give our logits and states (< 1e-5) for every sharing, per-layer
  k, projection, norm and attention option, padding included
- pipeline("fill-mask") answers with our probabilities; Trainer fine-tunes
  AutoModelForSequenceClassification, and the result converts back and predicts
- to-hf -> from-hf is exact (tensors bit for bit, config, model_info, tokenizer bytes)
- a warm-started model's Hugging Face tokenizer.json exports with its own ids
- bad input is one line, exit 2
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from linformer_train.cli import run_main
from linformer_train.config import DataConfig, config_from_dict
from linformer_train.convert import from_pretrained, save_pretrained
from linformer_train.convert.entry import convert
from linformer_train.model import LinformerForMLM, LinformerForSequenceClassification

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("linformer_train.hf")

N = 64
VOCAB = 600
TEXTS = ["The assert statement is a convenient way to insert debugging assertions into a program.",
         "Augmented assignment is the combination, in a single statement, of a binary operation.",
         "x = [1, 2, 3]  # a list",
         "Short."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine OpenMP threads waiting
    for a core make each small matmul ~100x slower (measured: 1.3 s vs 13 ms per training step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toks(corpus, tmp_path_factory) -> dict[str, Path]:
    """Unigram and BPE sentencepiece models trained here on Python's reference topics."""
    from linformer_train.data.pipeline import train_tokenizer

    root = tmp_path_factory.mktemp("toks")
    return {kind: train_tokenizer(DataConfig(source="files", paths=[str(corpus)], format="text",
                                             tokenizer_type=kind), root / kind, VOCAB)
            for kind in ("unigram", "bpe")}


def model_cfg(**kw):
    base = dict(preset="tiny", vocab_size=VOCAB, max_seq_len=N, k=16, dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return config_from_dict({"model": base}).model


def make_model_dir(path: Path, tokenizer: Path, arch: str = "mlm", seed: int = 0, labels=None, **kw) -> Path:
    """A model directory holding a random model whose weights are all perturbed (so no LayerNorm
    or projection sits at an init value that would hide a wrong key)."""
    torch.manual_seed(seed)
    cfg = model_cfg(**kw)
    if arch == "classification":
        cfg = config_from_dict({"model": {**cfg.__dict__, "num_labels": len(labels)}}).model
        model = LinformerForSequenceClassification(cfg)
    else:
        model = LinformerForMLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(model.eval(), path, tokenizer=tokenizer, labels=labels)
    return path


def to_hf(src: Path, out: Path, *extra: str) -> Path:
    assert run_main(convert, ["to-hf", str(src), str(out), *extra]) == 0
    return out


def batch(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # padded rows are part of every comparison
    return enc["input_ids"], enc["attention_mask"]


def topics_texts() -> list[str]:
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        texts.append(topics[key])
        texts.extend(line for line in topics[key].splitlines())
    return texts + ["  leading  and   trailing  ", "tab\there", "café naïve 日本語 😀 Ωmega", "ﬁ ① ＡＢＣ", "", " "]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_fast_tokenizer_gives_our_ids_on_real_text(toks, tmp_path, kind):
    from linformer_train.data.tokenizer import load_tokenizer

    out = to_hf(make_model_dir(tmp_path / "m", toks[kind]), tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.is_fast
    ours = load_tokenizer(toks[kind])
    assert [fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.unk_token_id, fast.mask_token_id] == \
        [0, 1, 2, 3, 4]
    texts = topics_texts()
    want = ours.encode(texts)
    got = fast(texts, add_special_tokens=False)["input_ids"]
    differ = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    if kind == "bpe":
        assert differ == []
    else:  # score ties only: the same pieces, in another order, and the same text back
        assert len(differ) < 0.02 * len(texts), len(differ)
        for text, w, g in differ:
            assert sorted(w) == sorted(g) and fast.decode(g) == ours.decode(w), text[:60]
    # the layout fine-tuning uses: <s> a </s> and <s> a </s></s> b </s>
    assert fast("a b")["input_ids"] == [1, *ours.encode("a b")[0], 2]
    assert fast("a", "b")["input_ids"] == [1, *ours.encode("a")[0], 2, 2, *ours.encode("b")[0], 2]
    assert "token_type_ids" not in fast("a", "b")
    assert fast.model_max_length == N


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

OPTIONS = {
    "headwise-window": dict(sharing="headwise"),
    "none-normal-sqrt": dict(sharing="none", projection_init="normal"),
    "kv-per-layer-k": dict(sharing="kv", k=[16, 8]),
    "layerwise-per-layer-k-pre-norm": dict(sharing="layerwise", k=[16, 8], norm="pre"),
    "mean-projection": dict(projection="mean", k=16),
    "conv-projection": dict(projection="conv", k=16),
    "full-attention": dict(attention="full"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_auto_model_for_masked_lm_gives_our_logits(toks, tmp_path, name):
    src = make_model_dir(tmp_path / "m", toks["bpe"], **OPTIONS[name])
    out = to_hf(src, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linformer-train" and "auto_map" not in config  # no remote code
    ours = from_pretrained(src)
    for key in ("sharing", "k", "projection", "norm", "attention", "projection_init", "short_input_scaling"):
        assert config[key] == getattr(ours.cfg, key)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert isinstance(mlm, hf.LinformerForMaskedLM)
    ids, mask = batch(transformers.AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        want = ours(ids, mask)
        got = mlm(input_ids=ids, attention_mask=mask).logits
        states = transformers.AutoModel.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-5
    with torch.no_grad():
        assert (states.last_hidden_state - ours.encoder(ids, mask))[real].abs().max() < 1e-5
    # a classifier from the MLM export: the encoder as trained (the fresh head's init touches nothing else)
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    encoder = {k: v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(clf.state_dict()[k], v) for k, v in encoder.items())
    assert clf.classifier.weight.std() > 0.01 and not clf.classifier.bias.any()


def test_fill_mask_pipeline_answers_with_our_probabilities(toks, tmp_path):
    src = make_model_dir(tmp_path / "m", toks["bpe"])
    out = to_hf(src, tmp_path / "hf")
    fill = transformers.pipeline("fill-mask", model=str(out), top_k=3)
    answers = fill("The <mask> statement is used for debugging.")
    assert len(answers) == 3 and all("<mask>" not in a["sequence"] for a in answers)
    tok = fill.tokenizer
    ids = tok("The <mask> statement is used for debugging.", return_tensors="pt")["input_ids"]
    pos = int((ids[0] == 4).nonzero())
    with torch.no_grad():
        probs = from_pretrained(src)(ids)[0, pos].softmax(-1)
    top = probs.topk(3)
    assert [a["token"] for a in answers] == top.indices.tolist()
    assert np.allclose([a["score"] for a in answers], top.values.numpy(), atol=1e-6)


def test_trainer_fine_tunes_a_classifier_that_converts_back(toks, tmp_path):
    """HF Trainer on a generated task (the label is whether a keyword occurs); the saved model
    converts back with from-hf and gives transformers' logits in our code and in predict."""
    from datasets import Dataset

    out = to_hf(make_model_dir(tmp_path / "m", toks["bpe"]), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    rng = random.Random(0)
    words = "the statement value list object function class module name error".split()

    def example():
        y = rng.random() < 0.5
        text = rng.choices(words, k=rng.randint(3, 8))
        text.insert(rng.randrange(len(text) + 1), "yes" if y else "no")
        return {"text": " ".join(text), "label": int(y)}

    train = Dataset.from_list([example() for _ in range(192)]).map(lambda b: tok(b["text"]), batched=True)
    test = [example() for _ in range(64)]
    texts, labels = [t["text"] for t in test], torch.tensor([t["label"] for t in test])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    assert isinstance(model, hf.LinformerForSequenceClassification)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=3,
                                          per_device_train_batch_size=16, learning_rate=3e-3, use_cpu=True,
                                          report_to=[], save_strategy="no", logging_steps=8, seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   data_collator=transformers.DataCollatorWithPadding(tok))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy > 0.9, accuracy

    trainer.save_model(str(tmp_path / "ft"))
    tok.save_pretrained(tmp_path / "ft")
    assert run_main(convert, ["from-hf", str(tmp_path / "ft"), str(tmp_path / "back"),
                              "--tokenizer", str(toks["bpe"])]) == 0
    back = from_pretrained(tmp_path / "back")
    info = json.loads((tmp_path / "back" / "model_info.json").read_text())
    assert info["architecture"] == "classification" and info["labels"] == ["neg", "pos"]
    assert info["source"]["kind"] == "transformers"
    with torch.no_grad():
        assert (back(enc["input_ids"], enc["attention_mask"]) - logits).abs().max() < 1e-5
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    from linformer_train.finetune.predict import predict_file

    predict_file(tmp_path / "back", tmp_path / "in.txt", tmp_path / "labels.txt")
    want = ["pos" if i else "neg" for i in logits.argmax(-1).tolist()]
    assert (tmp_path / "labels.txt").read_text().splitlines() == want


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def _same_directory(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
    for name in ("config.yaml", "model_info.json", "tokenizer.model", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["mlm", "classification-bf16"])
def test_round_trip_is_exact(toks, tmp_path, arch):
    if arch == "mlm":
        src = make_model_dir(tmp_path / "m", toks["unigram"], sharing="layerwise", k=[16, 8])
    else:
        src = make_model_dir(tmp_path / "m0", toks["unigram"], "classification", labels=["b", "a", "c"],
                             sharing="kv")
        model = from_pretrained(src)
        save_pretrained(model, tmp_path / "m", tokenizer=toks["unigram"], dtype="bf16", labels=["b", "a", "c"],
                        task={"name": "custom", "text_column": "text"}, source={"kind": "test"})
        src = tmp_path / "m"
    out = to_hf(src, tmp_path / "hf")
    assert run_main(convert, ["from-hf", str(out), str(tmp_path / "back")]) == 0
    _same_directory(src, tmp_path / "back")
    if arch != "mlm":
        config = json.loads((out / "config.json").read_text())
        assert config["id2label"] == {"0": "b", "1": "a", "2": "c"} and config["dtype"] == "bfloat16"
        clf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
        assert clf.classifier.weight.dtype == torch.bfloat16


def test_warm_started_hf_tokenizer_exports_with_its_own_ids(tmp_path):
    """A model directory whose tokenizer is a Hugging Face WordPiece tokenizer.json (as after a
    warm start): the export keeps its ids and names [CLS] [SEP] [PAD] [MASK] as its specials."""
    from test_hf_tokenizer import SPECIALS, train_wordpiece

    from linformer_train.data.tokenizer import HFTokenizer

    rng = random.Random(0)
    words = "the a movie film plot actor story music scene good bad".split()
    lines = [" ".join(rng.choices(words, k=10)) for _ in range(500)]
    tok_file = train_wordpiece(tmp_path / "tok", lines)
    ours = HFTokenizer(tok_file)
    torch.manual_seed(0)
    cfg = model_cfg(vocab_size=ours.vocab_size, pad_token_id=ours.special_ids["pad"])
    save_pretrained(LinformerForMLM(cfg), tmp_path / "m", tokenizer=tok_file)
    out = to_hf(tmp_path / "m", tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.cls_token == "[CLS]" and fast.mask_token_id == SPECIALS.index("[MASK]")
    assert fast.pad_token_id == ours.special_ids["pad"]
    text = "The movie had a good plot"
    assert fast(text)["input_ids"] == [ours.special_ids["bos"], *ours.encode(text)[0], ours.special_ids["eos"]]
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask = batch(fast, [text, "bad"])
    with torch.no_grad():
        assert (mlm(input_ids=ids, attention_mask=mask).logits - from_pretrained(tmp_path / "m")(ids, mask))[
            mask.bool()].abs().max() < 1e-5
    assert run_main(convert, ["from-hf", str(out), str(tmp_path / "back")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "m" / name).read_bytes()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line(toks, tmp_path, capsys):
    src = make_model_dir(tmp_path / "m", toks["bpe"])
    out = to_hf(src, tmp_path / "hf")
    capsys.readouterr()
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((out / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    cases = {
        ("to-hf", str(tmp_path / "missing"), str(tmp_path / "o1")): "does not exist",
        ("to-hf", str(src), str(src / "inside")): "inside the model directory",
        ("to-hf", str(src), str(out)): "already exists",
        ("to-hf", str(out), str(tmp_path / "o2")): "convert it back with `tools/convert.py from-hf",
        ("from-hf", str(src), str(tmp_path / "o3")): "no config.json",
        ("from-hf", str(roberta), str(tmp_path / "o4")): "warm-start",
        ("from-hf", str(pickled), str(tmp_path / "o5")): "pickled weights",
        ("from-hf", str(out), str(out / "x")): "inside the transformers directory",
    }
    for argv, fragment in cases.items():
        assert run_main(convert, list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)
    for name in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / name).exists()
