"""Fine-tuning: a tiny model learns a generated sentence task and a sentence-pair task on the
DeepSpeed engine (1 and 2 CPU ranks, ZeRO 0/2/3, fp32/bf16), keeps its best model, reports mean/std
over seeds, predicts one label per line; long inputs keep the model's n; every bad input is one
line, exit 2, nothing written."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from linformer_train.cli import run_main
from linformer_train.config import ConfigError, DataConfig, config_from_dict
from linformer_train.convert import from_pretrained, save_pretrained
from linformer_train.data import DataError
from linformer_train.finetune.config import load_finetune_config
from linformer_train.finetune.data import _truncate_pair, collate, encode
from linformer_train.finetune.entry import finetune
from linformer_train.finetune.metrics import classification_metrics
from linformer_train.finetune.tasks import Examples
from linformer_train.model import LinformerForMLM

NEUTRAL = "the a movie film plot actor story music scene very really quite".split()
POS, NEG = ["good", "great", "love", "fun"], ["bad", "terrible", "hate", "boring"]


def sentence(rng, label: bool) -> str:
    words = rng.choices(NEUTRAL, k=rng.randint(4, 12))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
    return " ".join(words)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tokenizer, a tiny randomly initialised 'pretrained' model (n=64) and generated tasks:
    single sentences (label = the polarity of the one sentiment word) and pairs (label = the
    polarity of the hypothesis, with a sentiment word in the premise as a distractor)."""
    from linformer_train.data.pipeline import train_tokenizer

    root = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(NEUTRAL + POS + NEG, k=12)) for _ in range(2000)))
    tok = train_tokenizer(DataConfig(source="files", paths=[str(corpus)], format="text", text_split="line"),
                          root / "tokenizer", 300)
    torch.manual_seed(0)
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=300, max_seq_len=64, k=16,
                                          dropout=0.0, attention_dropout=0.0)}).model
    save_pretrained(LinformerForMLM(cfg), root / "pretrained", tokenizer=tok)
    for name, count in (("train", 600), ("dev", 201)):
        with open(root / f"{name}.tsv", "w") as f:            # GLUE layout: header, tabs, no quoting
            f.write("sentence\tlabel\n")
            for _ in range(count):
                y = rng.random() < 0.5
                f.write(f"{sentence(rng, y)}\t{'pos' if y else 'neg'}\n")
        with open(root / f"{name}_pair.jsonl", "w") as f:
            for _ in range(count):
                y = rng.random() < 0.5
                premise = rng.choices(NEUTRAL, k=5) + [rng.choice(POS + NEG)]
                rng.shuffle(premise)
                hyp = rng.choices(NEUTRAL, k=rng.randint(2, 5))
                hyp.insert(rng.randrange(len(hyp) + 1), rng.choice(POS if y else NEG))
                f.write(json.dumps({"premise": " ".join(premise), "hypothesis": " ".join(hyp),
                                    "label": int(y)}) + "\n")
    return root


def single_task(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={data / 'pretrained'}", f"task.train_file={data / 'train.tsv'}",
            f"task.eval_file={data / 'dev.tsv'}", "task.text_column=sentence", "train.epochs=6",
            "train.micro_batch_size=32", "optim.lr=3e-3", "precision.dtype=fp32", "logging.log_every=10",
            f"train.output_dir={out}", *extra]


def pair_task(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={data / 'pretrained'}", f"task.train_file={data / 'train_pair.jsonl'}",
            f"task.eval_file={data / 'dev_pair.jsonl'}", "task.text_column=premise",
            "task.pair_column=hypothesis", "train.epochs=5", "train.micro_batch_size=32", "optim.lr=5e-3",
            "logging.log_every=10", "logging.tensorboard=false", f"train.output_dir={out}", *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------


def finetune_cli(args: list[str], ranks: int = 1):
    if ranks == 1:
        return run_cli([sys.executable, "tools/finetune.py", "train", *args])
    return run_cli([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                    "--master_port", str(_free_port()), "tools/finetune.py", "train", *args])


def test_two_ranks_zero3_learns_keeps_best_and_predicts(data, tmp_path):
    """2 CPU ranks under the deepspeed launcher, ZeRO-3 bf16. 201 eval examples split 101/100 with
    eval batches of 101, so one rank runs a dummy batch to keep ZeRO-3's collective forwards in step."""
    from linformer_train.finetune.predict import predict_file

    out = tmp_path / "run"
    res = finetune_cli(single_task(data, out, "precision.dtype=bf16", "zero.stage=3",
                                   "train.micro_batch_size=16", "train.eval_batch_size=101"), ranks=2)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads((out / "results.json").read_text())
    best = summary["per_seed"][0]
    assert summary["num_eval"] == 201 and best["accuracy"] >= 0.9, summary
    seed_dir = out / "seed_1234"
    result = json.loads((seed_dir / "results.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4, 5, 6]
    assert result["best"]["accuracy"] == max(h["accuracy"] for h in result["history"])
    assert list((seed_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["mean"]["accuracy"] == best["accuracy"] and summary["std"]["accuracy"] == 0.0

    # the kept model is the best epoch's (fp32 masters gathered from ZeRO-3 partitions): plain
    # PyTorch on the eval file reproduces its accuracy
    model_dir = seed_dir / "best"
    info = json.loads((model_dir / "model_info.json").read_text())
    assert info["architecture"] == "classification" and info["labels"] == ["neg", "pos"]
    lines = (data / "dev.tsv").read_text().splitlines()[1:]
    (tmp_path / "dev.txt").write_text("".join(line.split("\t")[0] + "\n" for line in lines))
    assert predict_file(model_dir, tmp_path / "dev.txt", tmp_path / "pred.txt") == 201
    preds = (tmp_path / "pred.txt").read_text().splitlines()
    acc = np.mean([p == line.split("\t")[1] for p, line in zip(preds, lines)])
    assert abs(acc - best["accuracy"]) <= 1 / 201, (acc, best)  # bf16 engine vs fp32 weights: a tie at most

    # prediction through the CLI: one label per input line, empty lines included
    inputs = tmp_path / "in.txt"
    inputs.write_text("the movie was great\n\nreally boring plot\n  \nquite good\n")
    res = run_cli([sys.executable, "tools/finetune.py", "predict", "--model", str(model_dir),
                   "--input", str(inputs), "--output", str(tmp_path / "labels.txt")])
    assert res.returncode == 0, res.stderr[-2000:]
    labels = (tmp_path / "labels.txt").read_text().splitlines()
    assert len(labels) == 5 and set(labels) <= {"neg", "pos"}
    assert labels[0] == "pos" and labels[2] == "neg" and labels[4] == "pos"


def test_pair_task_over_two_seeds_bf16_reports_mean_and_std(data, tmp_path):
    out = tmp_path / "pair"
    res = finetune_cli(pair_task(data, out, "precision.dtype=bf16", "zero.stage=0",
                                 "train.seeds=[1,2]"))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads((out / "results.json").read_text())
    accs = [r["accuracy"] for r in summary["per_seed"]]
    assert [r["seed"] for r in summary["per_seed"]] == [1, 2]
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert min(accs) >= 0.8, summary  # the label is the hypothesis's: the pair layout is learned
    assert summary["best_model_dir"] == str(out / f"seed_{summary['best_seed']}" / "best")
    info = json.loads((out / "seed_1" / "best" / "model_info.json").read_text())
    assert info["task"]["pair_column"] == "hypothesis" and info["labels"] == ["0", "1"]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def test_long_inputs_keep_the_models_n_and_padding_does_not_change_outputs(data, tmp_path):
    from linformer_train.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=300, max_seq_len=1024, k=32,
                                          dropout=0.0, attention_dropout=0.0, num_labels=2)}).model
    long_dir = save_pretrained(LinformerForMLM(cfg), tmp_path / "n1024",
                               tokenizer=data / "pretrained" / "tokenizer.model")
    tok = load_tokenizer(long_dir / "tokenizer.model")
    rng = random.Random(3)
    texts = [" ".join(rng.choices(NEUTRAL, k=600)), " ".join(rng.choices(NEUTRAL, k=2000)), "a good film"]
    enc = encode(tok, Examples(texts, None, ["0", "1", "0"], "mem"), 1024, [0, 1, 0])
    lengths = enc.lengths.tolist()
    assert lengths[0] > 512 and lengths[1] == 1024 and enc.truncated == 1   # nothing cut at 512
    assert enc.ids[1][0] == 1 and enc.ids[1][-1] == 2                         # <s> ... </s> kept
    model = from_pretrained(long_dir, "classification", num_labels=2)
    idx = np.arange(3)
    with torch.no_grad():
        a = model(**{k: v for k, v in collate(enc, idx).items() if k != "labels"})
        b = model(**{k: v for k, v in collate(enc, idx, pad_to=1024).items() if k != "labels"})
    assert (a - b).abs().max() < 1e-5


def test_pair_truncation_is_longest_first():
    a, b = list(range(10)), list(range(100, 104))
    a2, b2 = _truncate_pair(a, b, 8)
    assert (len(a2), len(b2)) == (4, 4) and a2 == a[:4] and b2 == b
    a2, b2 = _truncate_pair(a, b, 13)
    assert (len(a2), len(b2)) == (9, 4)
    assert _truncate_pair(a, b, 20) == (a, b)


def test_metrics_accuracy_f1_mcc():
    preds, golds = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    m = classification_metrics(preds, golds, 2)
    tp, fp, fn, tn = 2, 1, 1, 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5)
    assert classification_metrics([0, 0, 0], [0, 1, 0], 2)["mcc"] == 0.0  # undefined -> 0
    three = classification_metrics([0, 1, 2, 2], [0, 1, 2, 1], 3)
    assert three["accuracy"] == 0.75 and 0 < three["mcc"] < 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_finetune_config_loads(path):
    cfg = load_finetune_config([path])
    assert cfg.task.preset in ("sst2", "imdb", "qnli", "qqp") and cfg.model.pretrained


def test_finetune_configs_cover_the_presets():
    names = {p.name for p in (ROOT / "configs" / "finetune").glob("*.yaml")}
    assert {"sst2.yaml", "imdb-4096.yaml", "qnli.yaml", "qqp.yaml"} <= names


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------


def _train_error(argv, capsys) -> str:
    """In-process: bad input is found before any process group exists."""
    code = run_main(finetune, ["train", *argv])
    err = capsys.readouterr().err
    assert not torch.distributed.is_initialized()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_unseen_label_at_evaluation(data, tmp_path, capsys):
    dev = tmp_path / "dev.tsv"
    rows = (data / "dev.tsv").read_text().splitlines()
    rows[7] = rows[7].split("\t")[0] + "\tmaybe"
    dev.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    err = _train_error([*single_task(data, out), f"task.eval_file={dev}"], capsys)
    assert err == (f"error: {dev} line 8 has label 'maybe', which training never saw (labels: neg, pos); "
                   f"fix the file or list every label in task.labels")
    assert not out.exists()


def test_pair_task_given_one_column(data, tmp_path, capsys):
    out = tmp_path / "out"
    train = tmp_path / "train.tsv"
    train.write_text("question\tlabel\nis it good\tentailment\nis it bad\tnot_entailment\n")
    err = _train_error([f"model.pretrained={data / 'pretrained'}", "task.preset=qnli",
                        f"task.train_file={train}", f"task.eval_file={train}", f"train.output_dir={out}"],
                       capsys)
    assert err == (f"error: task qnli is a sentence-pair task (task.pair_column='sentence') but {train} has "
                   f"no column 'sentence' (columns: question, label); give both text columns, or unset "
                   f"task.pair_column for a single-sentence task")
    assert not out.exists()


def test_max_length_beyond_n_and_bad_model_dir(data, tmp_path, capsys):
    err = _train_error([*single_task(data, tmp_path / "o"), "model.max_length=128"], capsys)
    assert err.startswith("error: model.max_length=128 exceeds the model's n=64; resize the model first")
    err = _train_error([*single_task(data, tmp_path / "o"), f"model.pretrained={data}"], capsys)
    assert err.startswith(f"error: {data} is not a linformer-train model directory (no model_info.json)")
    with pytest.raises(ConfigError, match=r"task.metric='auc' is not allowed; choose one of accuracy, f1, mcc"):
        load_finetune_config([], [*single_task(data, tmp_path), "task.metric=auc"])
    assert not (tmp_path / "o").exists()


def test_predict_bad_inputs(data, tmp_path, capsys):
    torch.manual_seed(0)
    clf = from_pretrained(data / "pretrained", "classification", num_labels=2)
    pair_dir = save_pretrained(clf, tmp_path / "pair_model", tokenizer=data / "pretrained" / "tokenizer.model",
                               labels=["no", "yes"], task={"name": "custom", "text_column": "premise",
                                                           "pair_column": "hypothesis", "max_length": 64})
    one = tmp_path / "one.txt"
    one.write_text("a good film\nno tab here\n")
    out = tmp_path / "labels.txt"
    code = run_main(finetune, ["predict", "--model", str(pair_dir), "--input", str(one), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: {one} line 1 has 1 text(s) but the model classifies sentence pairs; "
                                 f"give two texts separated by one tab on every line\n")
    assert not out.exists()
    two = tmp_path / "two.txt"
    two.write_text("the plot\tgreat fun\nthe actor\tterrible\n")
    assert run_main(finetune, ["predict", "--model", str(pair_dir), "--input", str(two), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    code = run_main(finetune, ["predict", "--model", str(data / "pretrained"), "--input", str(two),
                               "--output", str(tmp_path / "x.txt")])
    assert code == 2 and "is a pretrained MLM model, not a fine-tuned classifier" in capsys.readouterr().err


def test_preset_offline_fails_with_a_hint(data, tmp_path):
    out = tmp_path / "out"
    res = run_cli([sys.executable, "tools/finetune.py", "train", f"model.pretrained={data / 'pretrained'}",
                   "task.preset=sst2", f"train.output_dir={out}"],
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load nyu-mll/glue/sst2 [train] (")
    assert last.endswith("offline? download it where the hub is reachable (datasets cache or save_to_disk) "
                         "or pass local files: task.train_file=... task.eval_file=... (CSV, GLUE TSV or JSONL)")
    assert not out.exists()


def test_examples_reader_errors(tmp_path):
    from linformer_train.finetune.tasks import ResolvedTask, read_file

    task = ResolvedTask("custom", "text", None, "label")
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\na\tpos\nb\tneg\textra\n")
    with pytest.raises(DataError, match=r"bad.tsv line 3 has 3 fields but the header has 2; fix the row or set "
                                        r"task.skip_bad_rows=true"):
        read_file(bad, task)
    assert len(read_file(bad, task, skip_bad_rows=True)) == 1
    csv_file = tmp_path / "x.csv"
    csv_file.write_text('text,label\n"a, quoted, text",1\nplain,0\n')
    ex = read_file(csv_file, task)
    assert ex.texts == ["a, quoted, text", "plain"] and ex.labels == ["1", "0"]
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 2 has no label in column 'label'"):
        read_file(jl, task)
