"""Classification of documents longer than n: predict runs overlapping windows and aggregates their
logits (mean or max) at 1x, 3.5x and 10x n; fine-tuning with model.long_inputs=windows learns a
label whose only evidence lies beyond the first window (which truncation cannot see), and predict
then windows by default; misuse is one line, exit 2."""

import json
import random
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from linformer_train.cli import run_main
from linformer_train.config import DataConfig, config_from_dict
from linformer_train.convert import from_pretrained, save_pretrained
from linformer_train.data.windows import window_spans
from linformer_train.finetune.data import encode
from linformer_train.finetune.entry import finetune
from linformer_train.finetune.predict import predict_logits
from linformer_train.finetune.tasks import Examples
from linformer_train.model import LinformerForMLM, LinformerForSequenceClassification

N = 64
NEUTRAL = "the a movie film plot actor story music scene very really quite".split()
POS, NEG = ["good", "great", "love", "fun"], ["bad", "terrible", "hate", "boring"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is as fast, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def long_review(rng: random.Random, label: bool) -> str:
    """n neutral words (at least n tokens: past the first window), then 2.5 n words among which
    one in six says the label."""
    tail = [rng.choice(POS if label else NEG) if rng.random() < 1 / 6 else rng.choice(NEUTRAL)
            for _ in range(int(2.5 * N))]
    return " ".join(rng.choices(NEUTRAL, k=N) + tail)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer, a random 'pretrained' MLM and a classifier (n=64),
    and a task of reviews of over 3.5 n tokens whose label only the text past the first n tells."""
    from linformer_train.data.pipeline import train_tokenizer

    root = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choices(NEUTRAL + POS + NEG, k=12)) for _ in range(2000)))
    tok = train_tokenizer(DataConfig(source="files", paths=[str(root / "corpus.txt")], format="text",
                                     text_split="line"), root / "tokenizer", 300)
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=300, max_seq_len=N, k=16, dropout=0.0,
                                          attention_dropout=0.0)}).model
    torch.manual_seed(0)
    save_pretrained(LinformerForMLM(cfg), root / "pretrained", tokenizer=tok)
    clf = LinformerForSequenceClassification(config_from_dict({"model": {**cfg.__dict__, "num_labels": 3}}).model)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(clf, root / "classifier", tokenizer=tok, labels=["a", "b", "c"])
    for name, count in (("train", 400), ("dev", 100)):
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                y = rng.random() < 0.5
                f.write(json.dumps({"text": long_review(rng, y), "label": "pos" if y else "neg"}) + "\n")
    return root


def text_of_tokens(tok, tokens: int, rng: random.Random) -> str:
    """Neutral words adding up to exactly ``tokens`` tokens (a word's pieces never span a space)."""
    cost = {w: len(tok.encode(w)[0]) for w in NEUTRAL}
    assert min(cost.values()) == 1
    words, total = [], 0
    while total < tokens:
        w = rng.choice([w for w in NEUTRAL if total + cost[w] <= tokens])
        words.append(w)
        total += cost[w]
    text = " ".join(words)
    assert len(tok.encode(text)[0]) == tokens
    return text


def test_predict_aggregates_window_logits_at_1x_3_5x_10x(data):
    from linformer_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "tokenizer" / "tokenizer.model")
    model = from_pretrained(data / "classifier")
    rng = random.Random(1)
    texts = [text_of_tokens(tok, k, rng) for k in (N - 2, int(3.5 * N), 10 * N, 5)]
    enc = encode(tok, Examples(texts, None, None, "test", [1, 2, 3, 4]), N, long_inputs="windows")
    assert enc.num_docs == 4 and enc.windowed == 2 and len(enc) == 1 + 7 + 20 + 1

    def alone(ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            return model(x, torch.ones_like(x))[0]

    for how in ("mean", "max"):
        got = predict_logits(model, enc, batch_size=6, aggregate=how)
        for i, text in enumerate(texts):
            ids = tok.encode(text)[0]
            per_window = torch.stack([alone([1, *ids[s:e], 2]) for s, e in window_spans(len(ids), N - 2)])
            want = per_window.mean(0) if how == "mean" else per_window.amax(0)
            assert (got[i] - want).abs().max() < 1e-5, (how, i)
    cut = predict_logits(model, encode(tok, Examples(texts, None, None, "test", [1, 2, 3, 4]), N))
    assert (cut[2] - alone([1, *tok.encode(texts[2])[0][:N - 2], 2])).abs().max() < 1e-5


def test_the_task_hides_its_label_past_the_first_window(data):
    """What makes the next test mean something: truncation to n tokens never sees the sentiment word."""
    from linformer_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "tokenizer" / "tokenizer.model")
    for line in (data / "dev.jsonl").read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"])[0]
        head, whole = set(tok.decode(ids[:N - 2]).split()), set(tok.decode(ids).split())
        assert not head & set(POS + NEG) and whole & set(POS + NEG)


def test_finetuning_on_windows_learns_what_lies_beyond_n_and_predict_follows(data, tmp_path):
    out = tmp_path / "ft"
    args = [f"model.pretrained={data / 'pretrained'}", f"task.train_file={data / 'train.jsonl'}",
            f"task.eval_file={data / 'dev.jsonl'}", "model.long_inputs=windows", "train.epochs=2",
            "train.micro_batch_size=32", "optim.lr=3e-3", "precision.dtype=fp32", "logging.log_every=20",
            "logging.tensorboard=false", f"train.output_dir={out}"]
    res = run_cli([sys.executable, "tools/finetune.py", "train", *args])
    assert res.returncode == 0, res.stderr[-2000:]
    best = json.loads((out / "seed_1234" / "results.json").read_text())["best"]
    assert best["accuracy"] >= 0.9, best
    summary = json.loads((out / "results.json").read_text())
    assert summary["num_train"] == 400 and summary["num_eval"] == 100 and summary["windows_eval"] >= 7 * 100
    model_dir = out / "seed_1234" / "best"
    task = json.loads((model_dir / "model_info.json").read_text())["task"]
    assert task["long_inputs"] == "windows"
    (tmp_path / "in.txt").write_text("\n".join(json.loads(x)["text"] for x in (data / "dev.jsonl").read_text()
                                               .splitlines()) + "\n")
    gold = [json.loads(x)["label"] for x in (data / "dev.jsonl").read_text().splitlines()]
    for extra, floor in (([], 0.9), (["--long-inputs", "truncate"], None)):
        res = run_cli([sys.executable, "tools/finetune.py", "predict", "--model", str(model_dir), "--input",
                       str(tmp_path / "in.txt"), "--output", str(tmp_path / "labels.txt"), *extra])
        assert res.returncode == 0, res.stderr
        accuracy = np.mean([a == b for a, b in zip((tmp_path / "labels.txt").read_text().split(), gold)])
        if floor:  # windows by default, as the model was fine-tuned
            assert "ran as" in res.stdout and accuracy >= floor, accuracy
        else:      # the head alone holds no evidence
            assert "were cut" in res.stdout and accuracy < 0.75, accuracy


def test_long_input_misuse_is_one_line(data, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"a": "good movie", "b": "fun", "label": i % 2}) + "\n" for i in range(8)))
    base = [f"model.pretrained={data / 'pretrained'}", f"train.output_dir={tmp_path / 'out'}"]
    single = [f"task.train_file={data / 'dev.jsonl'}", f"task.eval_file={data / 'dev.jsonl'}"]
    cases = {
        ("model.long_inputs=windows", f"task.train_file={pairs}", f"task.eval_file={pairs}", "task.text_column=a",
         "task.pair_column=b"): "sentence pairs",
        ("model.window_stride=10", *single): "applies only with model.long_inputs=windows",
        ("model.long_inputs=windows", "model.window_stride=63", *single): "skip tokens",
        ("model.long_inputs=sliding", *single): "choose one of truncate, windows",
    }
    for argv, fragment in cases.items():
        assert run_main(finetune, ["train", *base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)
    (tmp_path / "in.txt").write_text("good movie\n")
    predict = ["predict", "--model", str(data / "classifier"), "--input", str(tmp_path / "in.txt"),
               "--output", str(tmp_path / "o.txt")]
    for extra, fragment in ((["--window-stride", "5"], "applies only with --long-inputs windows"),
                            (["--long-inputs", "windows", "--window-stride", "0"], "must lie in [1, 62]")):
        assert run_main(finetune, predict + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o.txt").exists() and not (tmp_path / "out").exists()
