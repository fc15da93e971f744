"""Bad input, generated: config mutations through launch/pretrain.py's main and the tools, broken YAML
files, bad command lines of every tool. Each must end in one line `error: ...` naming what is wrong,
exit code 2: no traceback, no hang, no silently used default.

The bulk runs in-process (a config is rejected in milliseconds; the expensive work that would follow
an accepted one is replaced by a stub that records "accepted", which fails the case); a seeded
sample runs as real subprocesses to prove the command-line path. docs/RELIABILITY.md has the counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import typing
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import proc
from helpers.inprocess import accept, call, load_tool
from linformer_train.config import CHOICES, Config

SEED = 20261122

# ------------------------------------------------------------------------------------ generator

WRONG_TYPE = {
    int: ["abc", "1.5", "[1,2]", "{a: 1}", "true"],
    float: ["abc", "[1]", "{a: 1}", "true", "nan", "inf", "-inf"],
    bool: ["maybe", "2", "0.5", "[true]", "{a: 1}"],
    str: ["[a,b]", "{a: 1}"],
    list: ["5", "abc", "{a: 1}"],
    dict: ["5", "[1]", "abc"],
    typing.Any: ["abc", "1.5", "true", "[a]", "{first: a, last: 1}"],  # model.k
}
# Any-typed keys whose valid values differ from model.k's
WRONG_FOR_KEY = {"train.compile": ["abc", "1.5", "2", "[a]", "{a: 1}", "null"]}

# values out of range for one key (each a separate case); the message must name the key
OUT_OF_RANGE = {
    "model.vocab_size": ["0", "-1"], "model.hidden_size": ["0", "-64"], "model.num_layers": ["0", "-1"],
    "model.num_heads": ["0", "-4"], "model.ffn_size": ["0"], "model.max_seq_len": ["0", "-64"],
    "model.dropout": ["-0.1", "1.0"], "model.attention_dropout": ["1.5"], "model.layer_norm_eps": ["0", "-1e-5"],
    "model.init_std": ["0", "-0.02"], "model.num_labels": ["1", "0"], "model.pad_token_id": ["-1", "8192"],
    "model.k": ["0", "-1", "[]", "{first: 0, last: 8}", "{first: 16}", "{first: 16, last: 8, step: 2}",
                "{first: 16, last: 8, multiple_of: 0}"],
    "model.preset": ["huge", "[tiny]", "{a: 1}"],
    "data.validation_fraction": ["0", "0.5", "-0.1"], "data.mask_prob": ["0", "1"],
    "data.mask_replace_prob": ["-0.1", "1.5"], "data.mask_random_prob": ["-0.1"], "data.num_proc": ["0"],
    "data.prefetch_batches": ["-1"], "data.max_documents": ["0", "-5"],
    "data.tokenizer_character_coverage": ["0", "1.5"], "data.tokenizer_sample_sentences": ["0"],
    "data.tokenizer_vocab_size": ["0", "-5", "100", "9000"], "data.paths": ["[1,2]", "['']", "[[a]]"],
    "data.text_column": ["''"], "data.hf_split": ["''"],
    "optim.lr": ["0", "-1"], "optim.betas": ["[1.0,0.9]", "[0.9]", "[-0.1,0.9]", "[a,b]", "[0.9,0.98,0.5]", "[]"],
    "optim.eps": ["0"], "optim.weight_decay": ["-1"], "optim.warmup_steps": ["-1"],
    "optim.min_lr_ratio": ["-0.1", "1.1"], "optim.grad_clip": ["-1"],
    "train.max_steps": ["0", "-1"], "train.stop_after": ["0", "2000"], "train.micro_batch_size": ["0"],
    "train.grad_accum_steps": ["0"], "train.global_batch_size": ["0", "-8"], "train.eval_every": ["-1"],
    "train.eval_batches": ["0"], "train.max_consecutive_skips": ["0"], "train.run_dir": ["''"],
    "train.peak_tflops": ["0", "-1"], "train.seed": ["-1", "4294967296"],
    "zero.stage": ["4", "-1"], "precision.dtype": ["fp8"], "precision.min_loss_scale": ["0"],
    "precision.initial_scale_power": ["-1", "1000"], "precision.loss_scale_window": ["0"],
    "precision.hysteresis": ["0"],
    "logging.log_every": ["0", "-1"], "checkpoint.save_every": ["-1"], "checkpoint.keep_last": ["0"],
    "checkpoint.resume": ["''"],
}

# rules across keys: (overrides, names the one line must mention one of)
CONTRADICTIONS = [
    (["model.k=4096"], ["model.k"]),
    (["model.k=[16]"], ["model.k"]),
    (["model.num_layers=2", "model.k=[16,16,16]"], ["model.k"]),
    (["model.max_seq_len=64", "model.k={first: 100, last: 16}"], ["model.k"]),
    (["model.hidden_size=65"], ["model.hidden_size"]),
    (["model.preset=tiny", "model.num_heads=3"], ["model.hidden_size", "model.num_heads"]),
    (["model.projection=conv", "model.k=24", "model.max_seq_len=64"], ["model.projection"]),
    (["model.projection=mean", "model.k=[16,24]", "model.num_layers=2", "model.max_seq_len=64"], ["model.projection"]),
    (["model.projection=conv", "model.sharing=layerwise", "model.k=16", "model.max_seq_len=64"], ["model.sharing"]),
    (["model.projection=conv", "model.sharing=none", "model.k=16", "model.max_seq_len=64"], ["model.sharing"]),
    (["model.vocab_size=100", "model.pad_token_id=100"], ["model.pad_token_id"]),
    (["train.max_steps=10", "train.stop_after=20"], ["train.stop_after"]),
    (["model.vocab_size=512", "data.tokenizer_vocab_size=1024"], ["data.tokenizer_vocab_size"]),
    (["data.source=files"], ["data.paths"]),
    (["data.source=hf"], ["data.hf_name"]),
    (["zero.offload_params=true"], ["zero.offload_params"]),
    (["zero.offload_params=true", "zero.stage=2"], ["zero.offload_params"]),
    (["zero.offload_optimizer=true"], ["zero.offload_optimizer"]),
    (["data.mask_replace_prob=0.8", "data.mask_random_prob=0.3"], ["data.mask_replace_prob"]),
    (["model.preset=tiny", "model.num_layers=3", "model.k=[16,8]"], ["model.k"]),
]

UNKNOWN = [
    ("model.bogus=1", "model.bogus"), ("model.hiden_size=64", "model.hiden_size"), ("bogus.key=1", "bogus"),
    ("modell.k=8", "modell"), ("train.max_step=5", "train.max_step"), ("optim.learning_rate=1e-3", "optim.learning_rate"),
    ("precision.stage=2", "precision.stage"), ("checkpoint.every=5", "checkpoint.every"), ("logging.wandb=true", "logging.wandb"),
    ("data.tokenizer_path=x", "data.tokenizer_path"), ("train.max_steps.x=1", "train.max_steps"), ("model=5", "model"),
    ("data=[1]", "data"),
]

SYNTAX = [
    (["model.k"], "model.k"), (["=5"], "=5"), (["model..k=5"], "model..k"), (["model.k=[1,2"], "model.k"),
    (["model.k={first: 1, last:"], "model.k"), (["model.k=}"], "model.k"), (["model.k=1", "optim.lr"], "optim.lr"),
    (["--bogus"], "--bogus"), (["--config"], "--config"), (["--resume=yes"], "--resume"), (["--local_rank=x"], "--local_rank"),
    (["-x"], "-x"), (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
]

# what the YAML of a --config may get wrong: file name -> (text, a word of the expected line)
YAML_FILES = {
    "invalid.yaml": ("model: [1, 2\n", "not valid YAML"), "list.yaml": ("- 1\n- 2\n", "mapping"),
    "scalar.yaml": ("42\n", "scalar.yaml"), "loop_a.yaml": ("base: loop_b.yaml\n", "loop"),
    "loop_b.yaml": ("base: loop_a.yaml\n", "loop"), "self.yaml": ("base: self.yaml\n", "loop"),
    "base_missing.yaml": ("base: nope.yaml\n", "nope.yaml"), "base_int.yaml": ("base: 5\n", "base"),
    "base_map.yaml": ("base: {a: 1}\n", "base"), "unknown.yaml": ("model:\n  bogus: 1\n", "model.bogus"),
    "wrong_type.yaml": ("train:\n  max_steps: many\n", "train.max_steps"),
    "section_scalar.yaml": ("model: 5\n", "model"), "section_list.yaml": ("train: [1, 2]\n", "train"),
    "tabs.yaml": ("model:\n\tk: 4\n", "not valid YAML"), "duplicate.yaml": ("model:\n  k: 4\n  k: 8\n", "not valid YAML"),
    "binary.yaml": ("\x00\x01\x02", "not valid YAML"), "k_over_n.yaml": ("model:\n  max_seq_len: 64\n  k: 128\n", "model.k"),
    "int_bool.yaml": ("train:\n  compile: 1\n", "train.compile"), "null_section.yaml": ("model: null\n", "model"),
    "missing_ref.yaml": ("optim:\n  lr: ${optim.nope}\n", "optim.lr"), "missing_env.yaml": ("optim:\n  lr: ${oc.env:NO_SUCH_VAR_X}\n", "optim.lr"),
    "anchor.yaml": ("a: &x {k: 1}\nmodel: *x\n", "a"),
}


def _kind(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = args[0] if optional else hint
    return base, optional


def type_mutations(schema: type, choices: dict) -> list[tuple[list[str], list[str]]]:
    """A wrong-typed value (and null for a required field, an unknown choice) for every field."""
    cases = []
    for section in dataclasses.fields(schema):
        cls = section.default_factory
        if not dataclasses.is_dataclass(cls):
            continue  # the stages list: tests/test_stages.py covers its keys
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            base, optional = _kind(hints[f.name])
            values = list(WRONG_FOR_KEY.get(key, WRONG_TYPE.get(base, [])))
            if not optional and base is not typing.Any:
                values.append("null")
            if key in choices:
                values.append("bogus_choice")
            cases += [([f"{key}={v}"], [key]) for v in values]
    return cases


def pretrain_mutations() -> list[tuple[list[str], list[str]]]:
    cases = type_mutations(Config, CHOICES)
    cases += [([f"{key}={v}"], [key]) for key, values in OUT_OF_RANGE.items() for v in values]
    cases += CONTRADICTIONS
    cases += [([o], [name]) for o, name in UNKNOWN]
    cases += [(argv, [name]) for argv, name in SYNTAX]
    return cases


NOISE = ["optim.lr=1e-3", "optim.warmup_steps=10", "train.seed=7", "logging.log_every=5", "data.mask_prob=0.2",
         "checkpoint.keep_last=2", "train.eval_every=50", "precision.dtype=fp32", "data.num_proc=1",
         "optim.decay=cosine", "train.max_steps=500", "--resume"]


def with_noise(cases, count: int, seed: int = SEED):
    """``count`` cases drawn with a seed, each with 1-3 valid overrides spread around it: the one
    bad key must still be the one named."""
    rng = random.Random(seed)
    out = []
    for argv, names in rng.sample(cases, count):
        keys = {a.split("=", 1)[0] for a in argv}
        pool = [n for n in NOISE if n.split("=", 1)[0] not in keys]
        if any(a.startswith("-") for a in argv):
            pool = [n for n in pool if not n.startswith("-")]
        mixed = list(argv)
        for extra in rng.sample(pool, rng.randint(1, 3)):
            mixed.insert(rng.randint(0, len(mixed)), extra)
        out.append((mixed, names))
    return out


# ------------------------------------------------------------------------------------ running


@pytest.fixture
def stubs(monkeypatch):
    """What an accepted input would start (a process group, a data preparation, a tokenizer
    training, a fine-tuning task, an estimate, a resize) becomes `accepted`: a failed case."""
    import linformer_train.convert.resize as resize
    import linformer_train.data.pipeline as pipeline
    import linformer_train.finetune.loop as loop
    import linformer_train.profiling as profiling
    import linformer_train.train.distributed as distributed

    for module, name in [(distributed, "init_distributed"), (pipeline, "ensure_prepared"),
                         (pipeline, "train_tokenizer"), (loop, "prepare_task"),
                         (profiling, "estimate"), (resize, "resize_model_dir")]:
        monkeypatch.setattr(module, name, accept)


def failures(main, cases, prefix=(), wrap=True):
    bad = []
    for argv, names in cases:
        out = call(main, [*prefix, *argv], wrap=wrap)
        if not out.one_line_error(*names):
            bad.append(f"{argv}: exit {out.code}, stderr {out.lines[-3:]}")
    return bad


def test_pretrain_config_mutations(stubs):
    from linformer_train.train.entry import pretrain

    cases = pretrain_mutations()
    noisy = with_noise(cases, 100)
    assert len(cases) >= 300 and len(noisy) == 100
    bad = failures(pretrain, cases + noisy)
    assert not bad, f"{len(bad)} of {len(cases) + len(noisy)} mutations misbehaved:\n" + "\n".join(bad)


def test_the_same_mutations_through_prepare_data_and_train_tokenizer(stubs):
    cases = [c for c in pretrain_mutations() if not any(a.startswith("-") for a in c[0])]
    bad = failures(load_tool("prepare_data").main, cases)
    bad += failures(load_tool("train_tokenizer").main, cases[::3])
    assert not bad, "\n".join(bad)


def test_yaml_files(stubs, tmp_path):
    from linformer_train.train.entry import pretrain

    for name, (text, _) in YAML_FILES.items():
        (tmp_path / name).write_bytes(text.encode("utf-8"))
    (tmp_path / "utf16.yaml").write_bytes("model:\n  k: 4\n".encode("utf-16"))
    cases = [(["--config", str(tmp_path / name)], [word]) for name, (_, word) in YAML_FILES.items()]
    cases += [(["--config", str(tmp_path / "utf16.yaml")], ["utf16.yaml"]),
              (["--config", str(tmp_path)], [str(tmp_path)]),
              (["--config", str(tmp_path / "k_over_n.yaml"), "--config", str(tmp_path / "unknown.yaml")], ["model"])]
    bad = failures(pretrain, cases)
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------ fine-tuning


FINETUNE_BASE = ["model.pretrained=models/m", "task.preset=sst2"]
FINETUNE_RANGE = {
    "model.max_length": ["4", "-1"], "model.dropout": ["-0.1", "1.0"], "model.padding": ["shortest"],
    "task.preset": ["mnli"], "task.labels": ["[a]", "[a,a]"], "task.max_train_examples": ["0"],
    "task.metric": ["auc"], "task.format": ["xml"], "optim.lr": ["0", "-1e-5"], "optim.betas": ["[1,0]", "[0.9]"],
    "optim.eps": ["0"], "optim.weight_decay": ["-1"], "optim.warmup_ratio": ["1.0", "-0.1"],
    "optim.min_lr_ratio": ["2"], "optim.grad_clip": ["-1"], "train.epochs": ["0"], "train.micro_batch_size": ["0"],
    "train.grad_accum_steps": ["0"], "train.eval_batch_size": ["0"], "train.max_steps": ["0"], "train.eval_every": ["-1"],
    "train.seeds": ["[]", "[1,1]", "[a]"], "train.output_dir": ["''"], "zero.stage": ["5"],
    "logging.log_every": ["0"],
}


def finetune_mutations():
    from linformer_train.finetune.config import CHOICES as FT_CHOICES, FinetuneConfig

    cases = type_mutations(FinetuneConfig, FT_CHOICES)
    cases += [([f"{key}={v}"], [key]) for key, values in FINETUNE_RANGE.items() for v in values]
    cases += [(["task.preset=null", "task.train_file=a.csv"], ["task.train_file", "task.eval_file"]),
              (["task.preset=null"], ["task.preset"]), (["zero.offload_params=true"], ["zero.offload_params"]),
              (["bogus.key=1"], ["bogus"]), (["task.bogus=1"], ["task.bogus"])]
    # the base keys are set first, so a mutation of the same key wins
    return [([*FINETUNE_BASE, *argv], names) for argv, names in cases]


def test_finetune_config_mutations(stubs):
    from linformer_train.finetune.entry import finetune

    cases = finetune_mutations()
    assert len(cases) >= 150
    bad = failures(finetune, cases, prefix=["train"])
    assert not bad, f"{len(bad)} of {len(cases)} misbehaved:\n" + "\n".join(bad)


# --------------------------------------------------------------------- every tool's command line


def tool_cases(tmp: Path) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Unknown flags, missing files and wrong types for every tool (and its subcommands)."""
    nope = str(tmp / "missing")
    return {
        "pretrain": [(["--bogus"], ["--bogus"]), (["--config", nope], [nope]), (["--resume", "extra"], ["extra"])],
        "prepare_data": [(["--bogus"], ["--bogus"]), (["--seq-len", "abc"], ["--seq-len"]), (["--num-proc", "x"], ["--num-proc"]),
                         (["--config", nope], [nope]), (["--seq-len", "-5"], ["max_seq_len"]), (["--num-proc", "0"], ["num_proc"]),
                         (["--source", "web"], ["data.source"]), (["--out"], ["--out"]),
                         (["--source", "files", "--paths", nope], [nope])],
        "train_tokenizer": [(["--bogus"], ["--bogus"]), (["--vocab-size", "abc"], ["--vocab-size"]),
                            (["--type", "wordpiece"], ["--type"]), (["--character-coverage", "x"], ["--character-coverage"]),
                            (["--character-coverage", "2"], ["coverage"]), (["--sample-sentences", "0"], ["sample_sentences"]),
                            (["--vocab-size", "10"], ["vocab_size"]), (["--config", nope], [nope]),
                            (["--source", "files", "--paths", nope], [nope])],
        "convert": [([], ["export"]), (["bogus"], ["bogus"]), (["export"], ["checkpoint"]), (["export", nope, str(tmp / "o")], [nope]),
                    (["export", str(tmp), str(tmp / "o")], [str(tmp)]), (["export", "a", "b", "--dtype", "fp8"], ["--dtype"]),
                    (["export", "a", "b", "--bogus"], ["--bogus"]), (["resize", nope, str(tmp / "o")], ["max_seq_len"]),
                    (["resize", nope, str(tmp / "o"), "model.max_seq_len=128"], [nope]),
                    (["resize", "a", "b", "model.foo=1"], ["model.foo"]), (["resize", "a", "b", "--seed", "x"], ["--seed"]),
                    (["resize", "a", "b", "model.max_seq_len"], ["model.max_seq_len"]),
                    (["warm-start", nope, str(tmp / "o")], [nope]),
                    (["warm-start", nope, str(tmp / "o"), "--tokenizer", nope], [nope]),
                    (["warm-start", "a", "b", "--tokenizer", "t", "--min-vocab-coverage", "x"], ["--min-vocab-coverage"]),
                    (["warm-start", "a", "b", "--tokenizer", "t", "model.hidden_size=8"], ["model.hidden_size"]),
                    (["inspect"], ["model"]), (["inspect", nope], [nope]), (["inspect", str(tmp)], [str(tmp)])],
        "finetune": [([], ["train"]), (["bogus"], ["bogus"]), (["train", "--bogus"], ["--bogus"]), (["train"], ["model.pretrained"]),
                     (["train", "--config", nope], [nope]), (["predict"], ["--model"]),
                     (["predict", "--model", nope, "--input", nope, "--output", str(tmp / "p.txt")], [nope]),
                     (["predict", "--model", "m", "--input", "x", "--output", "y", "--batch-size", "x"], ["--batch-size"]),
                     (["predict", "--model", "m", "--input", "x", "--output", "y", "--format", "xml"], ["--format"])],
        "spectrum": [([], ["command"]), (["measure"], ["model"]), (["measure", nope, "--data", "builtin"], [nope]),
                     (["measure", str(tmp), "--data", "builtin"], [str(tmp)]), (["measure", "m", "--data", "d", "--samples", "x"], ["--samples"]),
                     (["measure", "m", "--data", "d", "--svd-dtype", "f16"], ["--svd-dtype"]), (["recommend", nope], [nope]),
                     (["compare", nope], [nope]), (["bogus"], ["bogus"])],
        "bench_pretrain": [(["--bogus"], ["--bogus"]), (["--n", "abc"], ["--n"]), (["--steps", "x"], ["--steps"]),
                           (["--config", nope], [nope]), (["--steps", "1"], ["--steps"]), (["--ranks", "0"], ["--ranks"]),
                           (["--preset", "huge"], ["model.preset"]), (["--micro-batch", "0"], ["micro_batch_size"])],
        "profile": [([], ["command"]), (["bogus"], ["bogus"]), (["sweep"], ["--seq-len"]), (["sweep", "-n", "abc"], ["--seq-len"]),
                    (["estimate", "-n", "x"], ["--seq-len"]), (["estimate", "-n", "512", "--dtype", "fp8"], ["fp8"]),
                    (["estimate", "-n", "512", "--k", "abc"], ["--k"]), (["estimate", "-n", "64", "--k", "128"], ["model.k"]),
                    (["estimate", "-n", "512", "--zero-stage", "7"], ["7"]), (["estimate", "-n", "512", "--gpus", "0"], ["GPU count"]),
                    (["estimate", "-n", "64", "--config", nope], [nope]), (["estimate", "-n", "64", "--set", "model.bogus=1"], ["model.bogus"]),
                    (["peak", "--dtype", "fp8"], ["--dtype"]), (["max-batch", "-n", "64", "--budget-gib", "x"], ["--budget-gib"])],
    }


def tool_mains() -> dict:
    from linformer_train.convert.entry import convert
    from linformer_train.finetune.entry import finetune
    from linformer_train.train.entry import pretrain

    return {"pretrain": (pretrain, True), "prepare_data": (load_tool("prepare_data").main, True),
            "train_tokenizer": (load_tool("train_tokenizer").main, True), "convert": (convert, True),
            "finetune": (finetune, True), "spectrum": (load_tool("spectrum").main, True),
            "bench_pretrain": (load_tool("bench_pretrain").main, True),
            "profile": (load_tool("profile").main, False)}  # profile has its own one-line handler


def test_every_tools_command_line(tmp_path, monkeypatch):
    import linformer_train.train.distributed as distributed

    # nothing real may start; missing files must be found by the real code (and profile's estimate,
    # which runs nothing, checks its own flags), so only the process group is stubbed
    monkeypatch.setattr(distributed, "init_distributed", accept)
    mains = tool_mains()
    cases = tool_cases(tmp_path)
    bad = []
    for tool, tool_argv in cases.items():
        main, wrap = mains[tool]
        bad += [f"{tool} {b}" for b in failures(main, tool_argv, wrap=wrap)]
    assert sum(map(len, cases.values())) >= 70
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------- a sample as real subprocesses


def subprocess_sample() -> list[tuple[list[str], list[str]]]:
    """About ten command lines, drawn with the seed from the in-process cases above, plus two
    pretraining mistakes that only show after the process group exists."""
    rng = random.Random(SEED)
    pool = [c for c in pretrain_mutations() if not any(a.startswith("-") for a in c[0])]
    sample = [(["launch/pretrain.py", *argv], names) for argv, names in rng.sample(pool, 3)]
    sample += [(["tools/prepare_data.py", *rng.choice(pool)[0]], []), (["tools/train_tokenizer.py", "--vocab-size", "10"], ["vocab_size"])]
    sample += [(["tools/convert.py", "resize", "a", "b", "model.k=4"], ["max_seq_len"]),
               (["tools/finetune.py", "train", *rng.choice(finetune_mutations())[0]], []),
               (["tools/profile.py", "estimate", "-n", "64", "--set", "model.bogus=1"], ["model.bogus"]),
               (["tools/spectrum.py", "measure", "/nonexistent", "--data", "builtin"], ["/nonexistent"]),
               (["tools/bench_pretrain.py", "--preset", "huge"], ["model.preset"])]
    # detected after init_distributed, in the Trainer, before any data or model work
    sample += [(["launch/pretrain.py", "precision.deepspeed.train_batch_size=64"], ["precision.deepspeed.train_batch_size"]),
               (["launch/pretrain.py", "precision.dtype=fp16"], ["precision.dtype=fp16"])]
    return sample


def test_a_sample_through_the_real_command_line(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    sample = subprocess_sample()
    procs = []
    bad = []
    with contextlib.ExitStack() as running:  # a failure in one leaves none of the others running
        for argv, names in sample:  # two at a time: the machine has two cores
            if len(procs) >= 2:
                procs[-2][2].wait()
            # first, so that a mutation of the same key wins; nothing may be written into the checkout
            # each its own run folder: two at once on one folder would meet the other's run lock
            run_dir = [f"train.run_dir={tmp_path / f'run{len(procs)}'}"] if argv[0] == "launch/pretrain.py" else []
            child = running.enter_context(
                proc.start([sys.executable, argv[0], *run_dir, *argv[1:]], cwd=ROOT, env=env))
            procs.append((argv, names, child))
        for argv, names, child in procs:
            res = child.wait()
            err = res.stderr
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            ok = (res.returncode == 2 and "Traceback" not in err and len(lines) == 1
                  and (not names or any(n in lines[0] for n in names)))
            if not ok:
                bad.append(f"{argv}: exit {res.returncode}, {err.strip().splitlines()[-3:]}")
    assert len(sample) >= 10
    assert not bad, "\n".join(bad)
