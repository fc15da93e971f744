"""The shipped SST-2 recipes (configs/finetune/sst2*.yaml): they load, carry the settings
docs/QUALITY.md measured, and read the real GLUE files where the shared data folder exists."""

from collections import Counter
from pathlib import Path

import pytest

from linformer_train.finetune.config import load_finetune_config, random_init_config
from linformer_train.finetune.tasks import build_label_list, load_split, resolve_task

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "finetune"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def test_tiny_recipe_is_the_measured_one():
    cfg = load_finetune_config([RECIPES / "sst2-tiny.yaml"])
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.train.epochs) == (1e-3, 0.06, 3)
    assert (cfg.model.max_length, cfg.train.micro_batch_size, cfg.train.seeds) == (128, 32, [1, 2, 3])
    assert (cfg.precision.dtype, cfg.task.preset) == ("fp32", "sst2")


def test_tiny_recipe_from_a_random_init_builds_a_window_init_linformer():
    """The command in the recipe's comment: the Linformer it builds starts with the E/F init the
    study found to fine-tune like full attention."""
    cfg = load_finetune_config([RECIPES / "sst2-tiny.yaml"], [
        "model.pretrained=none", "model.tokenizer=tokenizer.model",
        "model.random_init={preset: tiny, max_seq_len: 512, k: 64, sharing: headwise}"])
    model = random_init_config(cfg.model, vocab_size=4096, pad_token_id=0)
    assert (model.attention, model.k, model.max_seq_len) == ("linformer", 64, 512)
    assert (model.projection_init, model.short_input_scaling) == ("window", "window")


def test_warm_start_recipe_is_the_measured_one():
    cfg = load_finetune_config([RECIPES / "sst2-warm-start.yaml"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.model.max_length) == (1e-4, 3, 64)
    assert (cfg.precision.dtype, cfg.task.preset) == ("fp32", "sst2")


@pytest.mark.skipif(not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file(),
                    reason=f"needs GLUE SST-2 in {SST2} (the shared data folder beside the checkout, "
                           f"see its README); a clone without it has no real data to read")
@pytest.mark.parametrize("recipe", ["sst2.yaml", "sst2-tiny.yaml", "sst2-warm-start.yaml"])
def test_recipe_reads_the_real_glue_files(recipe):
    """Offline use as the recipes say: the preset's columns fit GLUE's TSV files."""
    cfg = load_finetune_config([RECIPES / recipe],
                               [f"task.train_file={SST2 / 'train.tsv'}", f"task.eval_file={SST2 / 'dev.tsv'}"])
    task = resolve_task(cfg.task)
    train, dev = load_split(cfg.task, task, "train"), load_split(cfg.task, task, "eval")
    assert (len(train), len(dev)) == (67349, 872)
    assert build_label_list(train, cfg.task.labels) == ["0", "1"]
    majority = Counter(dev.labels).most_common(1)[0][1] / len(dev)
    assert round(100 * majority, 1) == 50.9  # the chance level docs/QUALITY.md quotes
