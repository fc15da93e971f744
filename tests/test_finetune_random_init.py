"""Fine-tuning from a random init on the command line (model.pretrained=none): the baseline a
pretrained model is measured against, with its own seed per run, and its bad inputs as one line."""

import json
import sys

from conftest import run_cli
from linformer_train.cli import run_main
from linformer_train.convert import from_pretrained
from linformer_train.finetune.entry import finetune
from test_finetune import data, single_task  # noqa: F401  (data is a fixture)

SHAPE = "model.random_init={preset: tiny, max_seq_len: 64, k: 16, dropout: 0.0, attention_dropout: 0.0}"


def scratch_task(data, out, *extra):
    args = [a for a in single_task(data, out) if not a.startswith("model.pretrained=")]
    return [*args, "model.pretrained=none", f"model.tokenizer={data / 'pretrained'}", SHAPE,
            "logging.tensorboard=false", *extra]


def test_random_init_learns_and_keeps_a_model_that_predicts(data, tmp_path):
    out = tmp_path / "scratch"
    res = run_cli([sys.executable, "tools/finetune.py", "train", *scratch_task(data, out, "train.seeds=[1,2]")])
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads((out / "results.json").read_text())
    assert summary["pretrained"] == "none" and summary["max_length"] == 64
    assert min(r["accuracy"] for r in summary["per_seed"]) >= 0.9, summary
    best = out / "seed_1" / "best"
    info = json.loads((best / "model_info.json").read_text())
    assert info["source"]["from"] == "random init" and info["labels"] == ["neg", "pos"]
    model = from_pretrained(best)
    assert (model.cfg.max_seq_len, model.cfg.k, model.cfg.vocab_size) == (64, 16, 300)  # tokenizer's size
    assert (best / "tokenizer.model").read_bytes() == (data / "pretrained" / "tokenizer.model").read_bytes()


def test_random_init_shape_and_tokenizer_come_from_the_config(data, tmp_path):
    from linformer_train.finetune.config import load_finetune_config
    from linformer_train.finetune.loop import prepare_task

    prep = prepare_task(load_finetune_config([], scratch_task(data, tmp_path / "o", "model.random_init.k=8")))
    assert prep.pretrained is None and prep.model_info["source"] == {"kind": "random-init"}
    assert (prep.model_cfg.vocab_size, prep.model_cfg.k, prep.model_cfg.max_seq_len) == (300, 8, 64)
    assert prep.tokenizer_path == data / "pretrained" / "tokenizer.model" and prep.max_length == 64
    assert len(prep.train) == 600 and prep.train.ids[0][0] == 1


def _one_line(argv, capsys) -> str:
    code = run_main(finetune, ["train", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_random_init_bad_inputs_are_one_line(data, tmp_path, capsys):
    out = tmp_path / "o"
    no_tok = [a for a in scratch_task(data, out) if not a.startswith("model.tokenizer=")]
    assert _one_line(no_tok, capsys) == ("error: model.pretrained=none needs model.tokenizer (a tokenizer.model "
                                         "or its directory) to encode the texts")
    bad_k = [*scratch_task(data, out), "model.random_init.k=128"]
    assert _one_line(bad_k, capsys) == ("error: model.random_init.k for layer 0 is 128 > "
                                        "model.random_init.max_seq_len=64; k must not exceed n")
    typo = [*scratch_task(data, out), "model.random_init.hiden_size=32"]
    assert _one_line(typo, capsys).startswith("error: model.random_init.hiden_size: unknown key")
    with_dir = [*single_task(data, out), SHAPE]
    assert _one_line(with_dir, capsys) == (f"error: model.random_init applies only with model.pretrained=none; "
                                           f"the model at {data / 'pretrained'} has its own shape (drop "
                                           f"model.random_init)")
    small_vocab = [*scratch_task(data, out), "model.random_init.vocab_size=100"]
    assert _one_line(small_vocab, capsys) == (
        f"error: {data / 'pretrained' / 'tokenizer.model'} has 300 pieces but model.random_init has 100 "
        f"embedding rows; raise model.random_init.vocab_size or leave it unset")
    long = [*scratch_task(data, out), "model.max_length=128"]
    assert _one_line(long, capsys) == ("error: model.max_length=128 exceeds the model's n=64; set "
                                       "model.random_init.max_seq_len=128")
    assert not out.exists()
