"""ONNX export (tools/convert.py to-onnx): onnxruntime gives torch's outputs within fp32 tolerance
at every batch size and length up to n, padded rows included (a longer input fails), for the
Linformer variants whose length-dependent shapes differ (window slots, dense rows with per-layer
k and layerwise sharing, mean pooling) and for a classifier; bad input is one line, exit 2."""

import numpy as np
import pytest
import torch

from linformer_train.cli import run_main
from linformer_train.config import DataConfig, config_from_dict
from linformer_train.convert import save_pretrained
from linformer_train.convert.entry import convert
from linformer_train.convert.onnx_export import exportable, sample_inputs
from linformer_train.model import LinformerForMLM, LinformerForSequenceClassification

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

N = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is as fast, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    from linformer_train.data.pipeline import train_tokenizer

    return train_tokenizer(DataConfig(source="files", paths=[str(corpus)], format="text"),
                           tmp_path_factory.mktemp("tok"), 400)


VARIANTS = {
    "mlm-headwise-window": ("mlm", dict(sharing="headwise", k=12)),
    "mlm-layerwise-per-layer-k-normal": ("mlm", dict(sharing="layerwise", k=[12, 6], norm="pre")),
    "classifier-mean-projection": ("classification", dict(projection="mean", k=12)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnxruntime_matches_torch_at_every_length(tok, tmp_path, capsys, name):
    arch, kw = VARIANTS[name]
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=400, max_seq_len=N, dropout=0.0,
                                          attention_dropout=0.0, **kw)}).model
    torch.manual_seed(0)
    model = (LinformerForMLM if arch == "mlm" else LinformerForSequenceClassification)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    assert run_main(convert, ["to-onnx", str(tmp_path / "m"), str(tmp_path / "model.onnx")]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    module, output, n, vocab = exportable(tmp_path / "m")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [output]
    for batch, length in ((1, 2), (2, 5), (3, 17), (1, 24), (5, 31), (2, N)):
        ids, mask = sample_inputs(batch, length, vocab, seed=length)
        with torch.no_grad():
            want = module(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == want.shape
        real = mask.bool().numpy() if want.ndim == 3 else np.ones(batch, bool)
        assert np.abs(got - want)[real].max() < 1e-5, (batch, length)
    ids, mask = sample_inputs(1, N + 1, vocab)
    with pytest.raises(Exception, match="broadcast|shape|dimension"):  # longer than n: refused, not computed
        session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})


def test_to_onnx_refuses_to_overwrite(tok, tmp_path, capsys):
    cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=400, max_seq_len=N, k=12)}).model
    save_pretrained(LinformerForMLM(cfg), tmp_path / "m", tokenizer=tok)
    (tmp_path / "x.onnx").write_text("keep")
    assert run_main(convert, ["to-onnx", str(tmp_path / "m"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and (tmp_path / "x.onnx").read_text() == "keep"
    assert run_main(convert, ["to-onnx", str(tmp_path / "nothing"), str(tmp_path / "y.onnx")]) == 2
    assert run_main(convert, ["to-onnx", str(tmp_path / "m"), str(tmp_path / "m" / "y.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "inside the model directory" in err[1]
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "m" / "y.onnx").exists()
