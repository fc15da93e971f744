"""Attention spectra: known ranks are found, P is the model's own, schedules load, files and errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from linformer_train.config import config_from_dict, load_config
from linformer_train.model import LinformerForMLM
from linformer_train.model.attention import FullSelfAttention
from linformer_train.spectrum import (
    SpectrumError,
    SpectrumResult,
    attention_probabilities,
    check_schedule_yaml,
    measure_spectrum,
    normalised_cumulative,
    packed_blocks,
    plot_cumulative,
    plot_loss_curves,
    plot_rank_heatmap,
    rank_needed,
    recommend_k,
    reservoir,
    schedule_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("spectrum_tool", ROOT / "tools" / "spectrum.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model_cfg(**kw):
    base = dict(preset="tiny", vocab_size=97, max_seq_len=64, k=16, dropout=0.0,
                attention_dropout=0.0, attention="full", num_layers=3)
    base.update(kw)
    return config_from_dict({"model": base}).model


def _samples(count: int, n: int, vocab: int = 97, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, n) for _ in range(count)]


def _sharpen(model: nn.Module, factor: float) -> None:
    """Scale every Q/K weight so attention is peaked (an init-scale model attends almost uniformly,
    i.e. is near rank one, which would make every recommendation the minimum)."""
    with torch.no_grad():
        for block in model.encoder.layers:
            D = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * D].mul_(factor)


# --------------------------------------------------------------------------------------------------
# The maths on constructed matrices
# --------------------------------------------------------------------------------------------------


def _block_attention(sizes: list[int]) -> torch.Tensor:
    """Row-stochastic block-diagonal averaging matrix: rank len(sizes), every singular value 1."""
    n = sum(sizes)
    p = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for s in sizes:
        p[start:start + s, start:start + s] = 1.0 / s
        start += s
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return p[perm][:, perm]  # the same permutation of rows and columns: still rank len(sizes)


def test_block_attention_of_known_rank():
    p = _block_attention([7, 13, 20, 3, 21])                      # rank 5, singular values all 1
    cum = normalised_cumulative(torch.linalg.svdvals(p))
    got = rank_needed(cum, [0.5, 0.9, 0.999]).tolist()
    assert got == [3, 5, 5]                                         # c_r = r / 5


def test_random_low_rank_stochastic_matrix_reports_its_rank():
    gen = torch.Generator().manual_seed(1)
    n, r = 128, 9
    a = torch.rand(n, r, generator=gen, dtype=torch.float64).softmax(-1)
    b = torch.rand(r, n, generator=gen, dtype=torch.float64).mul(8).softmax(-1)
    p = a @ b                                                       # row-stochastic, rank r
    assert torch.allclose(p.sum(-1), torch.ones(n, dtype=torch.float64))
    cum = normalised_cumulative(torch.linalg.svdvals(p))
    assert int(rank_needed(cum, [0.99999])[0]) == r
    # full-rank attention (a sharp softmax of random scores) needs far more
    full = torch.randn(n, n, generator=gen, dtype=torch.float64).mul(4).softmax(-1)
    assert int(rank_needed(normalised_cumulative(torch.linalg.svdvals(full)), [0.9])[0]) > 4 * r


def test_probabilities_are_the_ones_the_model_uses():
    """P recomputed from the module's qkv reproduces its SDPA output: P V through `out`."""
    torch.manual_seed(0)
    attn = FullSelfAttention(32, 4, 0.0).eval()
    x = torch.randn(2, 24, 32)
    q, k, v = attn.split_heads(x)
    p = attention_probabilities(q, k)                               # (2, 4, 24, 24)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 24), atol=1e-6)
    y = torch.matmul(p, v)                                          # (2, 4, 24, 8)
    merged = attn.out(y.transpose(1, 2).reshape(2, 24, 32))
    assert torch.allclose(merged, attn(x), atol=1e-5)


class _GroupEncoder(nn.Module):
    """Tokens 0..r-1 embed as one-hot groups; every head's Q = K = c * one-hot, so attention is
    (to exp(-c^2)) the block averaging matrix of the groups: rank r in every layer and head."""

    def __init__(self, groups: int, heads: int = 2, head_dim: int = 4, layers: int = 2, c: float = 8.0):
        super().__init__()
        D = heads * head_dim
        self.embed = nn.Embedding(groups, D)
        self.layers = nn.ModuleList()
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, :groups] = torch.eye(groups)
            for _ in range(layers):
                attn = FullSelfAttention(D, heads, 0.0)
                w = torch.zeros(3 * D, D)
                for h in range(heads):
                    for g in range(groups):
                        w[h * head_dim + g, g] = c                 # Q of head h
                        w[D + h * head_dim + g, g] = c             # K of head h
                w[2 * D:] = torch.eye(D)                           # V = x
                attn.qkv.weight.copy_(w)
                attn.qkv.bias.zero_()
                block = nn.Module()
                block.attn = attn
                self.layers.append(block)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            block.attn(x)                                          # each layer sees the groups
        return x


def test_measure_reports_known_rank_through_the_hooks():
    groups = 3
    enc = _GroupEncoder(groups)
    rng = np.random.default_rng(0)
    samples = [rng.permutation(np.repeat(np.arange(groups), [10, 14, 8])) for _ in range(3)]
    res = measure_spectrum(enc, samples, shares=[0.5, 0.9, 0.999])
    assert res.ranks.shape == (3, 2, 2, 3)                         # samples, layers, heads, shares
    assert (res.ranks_at(0.999) == groups).all()
    assert (res.ranks_at(0.5) == 2).all()                          # c_r = r / 3
    assert np.allclose(res.effective_ranks, groups, atol=1e-3)     # a flat spectrum of 3 values


# --------------------------------------------------------------------------------------------------
# Recommendations
# --------------------------------------------------------------------------------------------------


def _synthetic_result(per_layer_ranks: list[int], n: int = 128, heads: int = 2, samples: int = 4):
    shares = np.array([0.9])
    ranks = np.zeros((samples, len(per_layer_ranks), heads, 1), dtype=np.int32)
    for layer, r in enumerate(per_layer_ranks):
        ranks[:, layer, 0, 0] = r
        ranks[:, layer, 1, 0] = max(1, r // 2)                       # the other head needs less
    R = np.arange(1, n + 1)
    curve = np.zeros((len(per_layer_ranks), heads, n), dtype=np.float32)
    return SpectrumResult(seq_len=n, num_layers=len(per_layer_ranks), num_heads=heads,
                          attention="full", model_k=[n] * len(per_layer_ranks), shares=shares,
                          ranks=ranks, effective_ranks=np.ones((samples, len(per_layer_ranks), heads)),
                          curve_ranks=R, cumulative_mean=curve, cumulative_min=curve,
                          cumulative_max=curve)


def test_recommendation_rounds_caps_and_orders():
    res = _synthetic_result([10, 40, 20, 3])
    mono = recommend_k(res, 0.9, quantile=0.9, multiple_of=16, monotone=True)
    assert mono.raw == [10, 40, 20, 3]                              # the hardest head per layer
    assert mono.k == [48, 48, 32, 16]                               # suffix max, rounded up
    free = recommend_k(res, 0.9, quantile=0.9, multiple_of=16, monotone=False)
    assert free.k == [16, 48, 32, 16]
    capped = recommend_k(_synthetic_result([300, 10], n=128), 0.9, multiple_of=64)
    assert capped.k == [128, 64]                                    # never above n


def test_equal_budget_rescaling_keeps_total_and_order():
    res = _synthetic_result([60, 40, 20, 10])
    sched = recommend_k(res, 0.9, multiple_of=16, total=4 * 32)     # budget of uniform k=32
    assert sum(sched.k) == 128
    assert all(v % 16 == 0 and 16 <= v <= 128 for v in sched.k)
    assert sched.k == sorted(sched.k, reverse=True)
    assert sched.k[0] > sched.k[-1]
    with pytest.raises(SpectrumError, match="multiple"):
        recommend_k(res, 0.9, multiple_of=16, total=100)
    with pytest.raises(SpectrumError, match="cannot be split"):
        recommend_k(res, 0.9, multiple_of=16, total=32)             # 4 layers need at least 64


def test_tiny_model_recommendation_is_a_schedule_the_loader_accepts(tmp_path):
    torch.manual_seed(0)
    cfg = _model_cfg()
    model = LinformerForMLM(cfg)
    _sharpen(model, 30.0)
    res = measure_spectrum(model, _samples(4, 64))
    assert res.ranks.shape[:3] == (4, 3, 4)
    sched = recommend_k(res, 0.9, multiple_of=16)
    assert len(sched.k) == cfg.num_layers
    assert all(v % 16 == 0 and 16 <= v <= 64 for v in sched.k)
    assert sched.k == sorted(sched.k, reverse=True)
    assert max(sched.raw) > 1                                       # sharpened: not rank one
    text = schedule_yaml(sched, cfg.num_layers)
    path = tmp_path / "k.yaml"
    path.write_text(text)
    alone = load_config([path])
    assert alone.model.k == sched.k and alone.model.attention == "linformer"
    layered = check_schedule_yaml(text, dataclasses.asdict(cfg))
    assert layered.model.k == sched.k and layered.model.hidden_size == cfg.hidden_size
    LinformerForMLM(layered.model)                                  # and it builds


def test_linformer_with_identity_projections_matches_full_attention():
    torch.manual_seed(0)
    n = 32
    model = LinformerForMLM(_model_cfg(attention="linformer", k=n, max_seq_len=n, num_layers=2))
    with torch.no_grad():
        for block in model.encoder.layers:
            block.attn.proj_k.weight.copy_(torch.eye(n))
            block.attn.proj_v.weight.copy_(torch.eye(n))
    res = measure_spectrum(model, _samples(2, n))
    assert res.attention == "linformer" and res.model_k == [n, n]
    assert np.all(res.linformer_rel_error < 1e-5)
    assert np.all(res.linformer_cosine > 0.99999)
    # a random (k < n) projection is far from it
    model = LinformerForMLM(_model_cfg(attention="linformer", k=8, max_seq_len=n, num_layers=2))
    _sharpen(model, 30.0)
    res = measure_spectrum(model, _samples(2, n))
    assert np.all(res.linformer_rel_error > 0.05)
    # a bf16 model is measured in fp32 maths and left in bf16
    model = model.to(torch.bfloat16)
    res16 = measure_spectrum(model, _samples(2, n))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert np.abs(np.median(res16.ranks_at(0.9)) - np.median(res.ranks_at(0.9))) <= 2


# --------------------------------------------------------------------------------------------------
# Files: JSON, NPZ, plots
# --------------------------------------------------------------------------------------------------


def test_json_npz_and_plots_are_written_and_reload(tmp_path):
    torch.manual_seed(0)
    model = LinformerForMLM(_model_cfg(num_layers=2))
    _sharpen(model, 30.0)
    res = measure_spectrum(model, _samples(3, 64), info={"data": "random tokens"})
    js, npz = res.save(tmp_path, 0.9)
    meta = json.loads(js.read_text())
    assert meta["num_samples"] == 3 and len(meta["layers"]) == 2
    assert len(meta["layers"][0]["rank_needed_median_per_head"]) == 4
    assert len(meta["layer_mean_curve"]["cumulative"][0]) == 64
    back = SpectrumResult.load(tmp_path)
    assert np.array_equal(back.ranks, res.ranks) and back.model_k == res.model_k
    for path in (plot_cumulative(res, tmp_path / "c.png", 0.9),
                 plot_rank_heatmap(res, tmp_path / "h.png", 0.9)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    with pytest.raises(SpectrumError, match="not measured"):
        res.ranks_at(0.123)


def test_recommend_and_compare_subcommands(tmp_path, capsys):
    torch.manual_seed(0)
    model = LinformerForMLM(_model_cfg(num_layers=2))
    _sharpen(model, 30.0)
    measure_spectrum(model, _samples(2, 64)).save(tmp_path / "spec", 0.9)
    tool = _tool()
    assert tool.main(["recommend", str(tmp_path / "spec"), "--share", "0.95", "--multiple-of", "32",
                      "--total", "96"]) == 0
    cfg = load_config([tmp_path / "spec" / "k_schedule.yaml"])
    assert (tmp_path / "spec" / "spectrum_rank_heatmap_0.95.png").is_file()
    assert sum(cfg.model.k) == 96 and all(v % 32 == 0 for v in cfg.model.k)
    assert "k: [" in capsys.readouterr().out

    for name, losses in (("a", [5.0, 4.0, 3.5]), ("b", [5.0, 4.2, 3.9])):
        run = tmp_path / name
        run.mkdir()
        lines = [{"split": "train", "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]
        lines.append({"split": "eval", "step": 30, "loss": losses[-1] + 0.1, "accuracy": 0.3})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "loss.png"
    assert tool.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B",
                      "--out", str(out), "--last", "1"]) == 0
    text = capsys.readouterr().out
    assert "3.5000" in text and "3.9000" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    # two seeds of one setting: one colour, and a mean row
    assert tool.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "S", "S",
                      "--last", "1"]) == 0
    mean_rows = capsys.readouterr().out.split("mean over runs")[1]
    assert "3.7000" in mean_rows                                    # (3.5 + 3.9) / 2
    # paired with a baseline of the same seed: b - a = +0.4 at the last evaluation
    out3 = tmp_path / "paired.png"
    assert tool.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B",
                      "--baseline", "A", "--last", "1", "--out", str(out3)]) == 0
    paired = capsys.readouterr().out.split("of the same seed")[1]
    assert "+0.4000" in paired and out3.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


def test_packing_matches_the_data_pipeline_layout():
    blocks = list(packed_blocks([[10, 11, 12], [], [20, 21], [30, 31, 32, 33]], 4, bos=1, eos=2))
    # stream: 10 11 12 </s> 20 21 </s> 30 31 32 33 </s>, rows of n - 1 = 3, each behind <s>
    assert [b.tolist() for b in blocks] == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31],
                                            [1, 32, 33, 2]]
    picked = reservoir(iter(np.arange(100)[:, None]), 10, seed=0)
    assert len(picked) == 10 and [int(p[0]) for p in picked] == sorted(int(p[0]) for p in picked)


# --------------------------------------------------------------------------------------------------
# The command line end to end: a model directory, prepared blocks and text files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A sentencepiece tokenizer trained on this repository's config module, blocks prepared with
    it (n=32), and a full-attention model directory carrying it."""
    import linformer_train.config as config_module
    from linformer_train.config import DataConfig
    from linformer_train.convert.model_dir import save_pretrained
    from linformer_train.data.pipeline import ensure_prepared, train_tokenizer

    root = tmp_path_factory.mktemp("spectrum_e2e")
    corpus = root / "corpus.txt"
    corpus.write_text(Path(config_module.__file__).read_text())
    tok = train_tokenizer(DataConfig(source="files", paths=[str(corpus)]), root / "tok", 400)
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]", f"data.tokenizer={tok}",
                           "data.num_proc=1", f"data.prepared_dir={root / 'prep'}",
                           "data.validation_fraction=0.1", "model.vocab_size=400",
                           "model.max_seq_len=32", "model.k=16"])
    prepared = ensure_prepared(cfg.data, 32, root, 400)
    torch.manual_seed(0)
    model = LinformerForMLM(_model_cfg(vocab_size=400, max_seq_len=32, num_layers=2))
    _sharpen(model, 30.0)
    model_dir = save_pretrained(model, root / "model", tokenizer=tok)
    return model_dir, Path(prepared), corpus


@pytest.mark.parametrize("data", ["prepared", "text"])
def test_cli_measure_on_a_model_directory(model_and_data, tmp_path, capsys, data):
    model_dir, prepared, corpus = model_and_data
    src = str(prepared) if data == "prepared" else str(corpus)
    out = tmp_path / "out"
    assert _tool().main(["measure", str(model_dir), "--data", src, "-n", "32", "--samples", "3",
                         "--multiple-of", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked with load_config" in printed
    names = {p.name for p in out.iterdir()}
    assert {"spectrum.json", "spectrum.npz", "spectrum_cumulative.png", "spectrum_rank_heatmap.png",
            "k_schedule.yaml", "k_schedule.json"} <= names
    meta = json.loads((out / "spectrum.json").read_text())
    assert meta["num_samples"] == 3 and meta["seq_len"] == 32
    assert ("prepared" in meta["info"]["data"]) == (data == "prepared")
    cfg = load_config([out / "k_schedule.yaml"])
    assert len(cfg.model.k) == 2 and all(v % 8 == 0 and v <= 32 for v in cfg.model.k)
    layered = load_config([model_dir / "config.yaml", out / "k_schedule.yaml"])
    assert layered.model.k == cfg.model.k and layered.model.vocab_size == 400


def test_cli_measure_refuses_n_beyond_the_model_or_the_blocks(model_and_data, tmp_path, capsys):
    from linformer_train.cli import run_main

    model_dir, prepared, _ = model_and_data
    assert run_main(_tool().main, ["measure", str(model_dir), "--data", str(prepared), "-n", "64",
                                   "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_seq_len=32" in err


# --------------------------------------------------------------------------------------------------
# The command line: one line, exit 2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["measure", "{missing}", "--data", "builtin"], "does not exist"),
    (["measure", "{empty}", "--data", "builtin"], "neither a model directory"),
    (["measure", "{empty}", "--data", "builtin", "--share", "1.5"], "--share 1.5"),
    (["measure", "{empty}", "--data", "builtin", "--share", "x"], "not a number"),
    (["recommend", "{empty}"], "no spectrum.json"),
    (["compare", "{empty}"], "metrics.jsonl does not exist"),
    (["compare", "{empty}", "--labels", "A", "B"], "2 names for 1 runs"),
    (["measure", "{empty}"], "required: --data"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    from linformer_train.cli import run_main

    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty") for a in argv]
    assert run_main(_tool().main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
