"""Embeddings (tools/embed.py) and documents longer than n: windows cover every token, a long
document's vector is the mean of its windows' vectors (1x, 3.5x and 10x n, mean and first-token
pooling, padding from batching by length), text / JSONL / Parquet in and .npy / Parquet out give
the same vectors, sentence-transformers wrapping the to-hf export gives the same vectors, and bad
input is one line, exit 2."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_env
from linformer_train.cli import run_main
from linformer_train.config import DataConfig, config_from_dict
from linformer_train.convert import from_pretrained, save_pretrained
from linformer_train.convert.entry import convert
from linformer_train.data.windows import aggregate, layout_windows, window_spans
from linformer_train.embed import Embedder, embed_main
from linformer_train.model import LinformerForMLM

N = 64
SIZE = N - 2  # content tokens per window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is as fast, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    from linformer_train.data.pipeline import train_tokenizer

    root = tmp_path_factory.mktemp("embed")
    tok = train_tokenizer(DataConfig(source="files", paths=[str(corpus)], format="text"), root / "tok", 600)
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=600, max_seq_len=N, k=16, dropout=0.0,
                                          attention_dropout=0.0)}).model
    torch.manual_seed(0)
    model = LinformerForMLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_pretrained(model, root / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def one_token_words(model_dir):
    """Words that are one token each, so a text of T of them is exactly T tokens."""
    from linformer_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir / "tokenizer.model")
    words = [w for w in "the a is of and to in for list value object name class function return if else "
             "statement module error type not with from as import def".split() if len(tok.encode(w)[0]) == 1]
    assert len(words) >= 8
    return words


def document(words, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choices(words, k=tokens))


def test_windows_cover_every_token_stride_apart():
    for length in (1, SIZE, SIZE + 1, int(3.5 * N), 10 * N):
        for stride in (None, 1, 10, SIZE):
            spans = window_spans(length, SIZE, stride)
            covered = np.zeros(length, bool)
            for s, e in spans:
                covered[s:e] = True
                assert e - s == min(SIZE, length)
            assert covered.all() and spans[0][0] == 0 and spans[-1][1] == length
            starts = [s for s, _ in spans]
            assert all(b - a == (stride or SIZE // 2) for a, b in zip(starts[:-2], starts[1:-1]))
            assert 0 < starts[-1] - starts[-2] <= (stride or SIZE // 2) if len(starts) > 1 else True
    assert len(window_spans(10 * N, SIZE)) == -(-(10 * N - SIZE) // (SIZE // 2)) + 1
    with pytest.raises(ValueError, match="skip tokens"):
        window_spans(200, SIZE, SIZE + 1)
    rows = layout_windows(list(range(5, 5 + 100)), N, 1, 2, stride=40)
    assert [len(r) for r in rows] == [N, N] and rows[1][1] == 5 + 38 and rows[0][0] == 1 and rows[1][-1] == 2


def test_aggregate_mean_and_max_per_document():
    values = torch.tensor([[1.0, 5.0], [3.0, -1.0], [7.0, 0.0], [-2.0, 2.0]])
    doc = np.array([0, 0, 1, 2])
    assert torch.equal(aggregate(values, doc, 3), torch.tensor([[2.0, 2.0], [7.0, 0.0], [-2.0, 2.0]]))
    assert torch.equal(aggregate(values, doc, 3, "max"), torch.tensor([[3.0, 5.0], [7.0, 0.0], [-2.0, 2.0]]))


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_a_long_document_is_the_mean_of_its_windows(model_dir, one_token_words, pooling):
    """1x n (one window, the same as truncation), 3.5x n and 10x n, with short texts in the same
    batches (so every row is padded differently than when it runs alone)."""
    embedder = Embedder(model_dir)
    encoder = from_pretrained(model_dir).encoder
    lengths = {"1x": SIZE, "3.5x": int(3.5 * N), "10x": 10 * N}
    texts = [document(one_token_words, t, seed=i) for i, t in enumerate(lengths.values())] + ["short text", "a"]
    got, stats = embedder.embed(texts, pooling, batch_size=5)
    assert stats["documents"] == 5 and stats["windowed"] == 2 and stats["truncated"] == 0

    def alone(ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        with torch.no_grad():
            h = encoder(x, torch.ones_like(x))[0]
        return h.mean(0) if pooling == "mean" else h[0]

    for i, (name, tokens) in enumerate(lengths.items()):
        ids = embedder.tokenizer.encode(texts[i])[0]
        assert len(ids) == tokens
        spans = window_spans(tokens, SIZE)
        assert len(spans) == {"1x": 1, "3.5x": 7, "10x": 20}[name]
        want = torch.stack([alone([1, *ids[s:e], 2]) for s, e in spans]).mean(0)
        assert np.abs(got[i] - want.numpy()).max() < 1e-5, name
    truncated, stats = embedder.embed(texts, pooling, long_inputs="truncate", batch_size=5)
    assert stats["truncated"] == 2 and np.abs(truncated[0] - got[0]).max() < 1e-6  # 1x: one window either way
    first = embedder.tokenizer.encode(texts[2])[0][:SIZE]
    assert np.abs(truncated[2] - alone([1, *first, 2]).numpy()).max() < 1e-5


def test_bf16_autocast_gives_close_vectors(model_dir, one_token_words):
    """The GPU default (bf16 autocast), run on the CPU: vectors stay fp32 and close to fp32's."""
    texts = [document(one_token_words, t, seed=t) for t in (10, 300)]
    full, _ = Embedder(model_dir).embed(texts)
    half, stats = Embedder(model_dir, dtype="bf16").embed(texts)
    assert stats["dtype"] == "bfloat16" and half.dtype == np.float32
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() > 0.99 and np.abs(full - half).max() > 0  # it did run in bf16


def test_embed_cli_reads_text_jsonl_parquet_and_writes_npy_parquet(model_dir, one_token_words, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [document(one_token_words, t, seed=t) for t in (5, 40, 200, 700)] + ["", "café ①"]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "body": t}) + "\n"
                                                 for i, t in enumerate(texts)))
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "body": texts}), tmp_path / "docs.parquet")
    res = subprocess.run([sys.executable, "tools/embed.py", "--model", str(model_dir), "--input",
                          str(tmp_path / "docs.txt"), "--output", str(tmp_path / "a.npy"), "--batch-size", "3"],
                         cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote 6 vectors" in res.stdout and "documents/s" in res.stdout and "tokens/s" in res.stdout
    assert "embedding" in res.stderr  # the progress bar
    want = np.load(tmp_path / "a.npy")
    assert want.shape == (6, 64) and want.dtype == np.float32
    got, _ = Embedder(model_dir).embed(texts)
    assert np.abs(want - got).max() < 1e-5
    for name in ("docs.jsonl", "docs.parquet"):
        out = tmp_path / f"{name}.parquet"
        assert run_main(embed_main, ["--model", str(model_dir), "--input", str(tmp_path / name), "--output",
                                     str(out), "--text-column", "body", "--id-column", "id", "--no-progress"]) == 0
        table = pq.read_table(out)
        assert table.column_names == ["id", "embedding"] and table.column("id").to_pylist()[-1] == "d5"
        assert np.abs(np.array(table.column("embedding").to_pylist()) - want).max() < 1e-5


def test_sentence_transformers_wraps_the_export_with_the_same_vectors(model_dir, one_token_words, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    import linformer_train.hf  # noqa: F401  (registers the model type with transformers)

    texts = [document(one_token_words, t, seed=t) for t in (3, 20, SIZE)] + ["The assert statement.", "x"]
    for pooling in ("mean", "first"):
        out = tmp_path / f"hf-{pooling}"
        assert run_main(convert, ["to-hf", str(model_dir), str(out), "--pooling", pooling]) == 0
        model = st.SentenceTransformer(str(out), device="cpu")
        assert model.max_seq_length == N
        got = model.encode(texts, batch_size=2, convert_to_numpy=True)
        want, _ = Embedder(model_dir).embed(texts, pooling, batch_size=2)
        assert np.abs(got - want).max() < 1e-5, pooling


def test_embed_bad_inputs_are_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("a\nb\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n')
    base = ["--model", str(model_dir), "--no-progress"]
    cases = {
        ("--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o.npy")): "does not exist",
        ("--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.csv")): "must end in .npy or .parquet",
        ("--input", str(tmp_path / "in.txt"), "--output", str(model_dir / "o.npy")): "inside the model",
        ("--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.npy")): "line 2 has no text",
        ("--input", str(tmp_path / "broken.jsonl"), "--output", str(tmp_path / "o.npy")): "line 2 is not valid JSON",
        ("--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy"), "--window-stride", "63"):
            "skip tokens",
        ("--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy"), "--id-column", "id"):
            "needs a .parquet output",
        ("--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy"), "--device", "cuda:7"):
            "no CUDA device",
    }
    if torch.cuda.is_available():
        cases.pop(next(k for k in cases if "cuda:7" in k))
    for argv, fragment in cases.items():
        assert run_main(embed_main, base + list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)
    assert not (tmp_path / "o.npy").exists() and not (model_dir / "o.npy").exists()
