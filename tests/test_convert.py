"""Conversion: DeepSpeed checkpoints (ZeRO 0/2/3, 2 CPU ranks) -> model directories with identical
logits; from_pretrained without DeepSpeed; resize of n and k; RoBERTa/BERT warm start matching the
HF model; every bad input is one line, exit 2, nothing written."""

import json
import random
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, deepspeed_run, run_cli
from linformer_train.cli import run_main
from linformer_train.config import DataConfig, config_from_dict
from linformer_train.convert import ConversionError, from_pretrained, save_pretrained
from linformer_train.convert.entry import convert
from linformer_train.convert.export import export_checkpoint
from linformer_train.convert.resize import extend_positions, resize_model, resize_model_dir
from linformer_train.model import LinformerForMLM
from linformer_train.train.checkpoint import CheckpointError

WORDS = ("the a good bad movie film great terrible plot actor story boring fun love hate music scene "
         "not very really quite was is and but").split()
VOCAB = 300
N = 32


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    from linformer_train.data.pipeline import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(2000)))
    return train_tokenizer(DataConfig(source="files", paths=[str(corpus)], format="text", text_split="line"),
                           root / "tokenizer", VOCAB)


def tiny_cfg(**kw):
    base = dict(preset="tiny", vocab_size=VOCAB, max_seq_len=N, k=[8, 4], sharing="layerwise",
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return config_from_dict({"model": base}).model


def inputs(n=N, batch=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, n // 2:] = 0          # padded rows: the mask path is part of the comparison
    ids[1, n // 2:] = 0
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Export from DeepSpeed checkpoints written by 2 CPU ranks
# --------------------------------------------------------------------------------------------------

MAKE_CHECKPOINTS = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import torch, torch.nn.functional as F
    import deepspeed
    from linformer_train.config import config_from_dict, to_dict
    from linformer_train.model import LinformerForMLM
    from linformer_train.train.checkpoint import CheckpointManager
    from linformer_train.train.distributed import init_distributed
    from linformer_train.train.ds_config import build_ds_config
    from linformer_train.train.trainer import param_groups

    out = Path(sys.argv[-1])
    rank, world = init_distributed()
    for name, stage, dtype in [("zero2", 2, "fp32"), ("zero3", 3, "fp32"), ("zero0_bf16", 0, "bf16")]:
        cfg = config_from_dict({{
            "model": dict(preset="tiny", vocab_size={vocab}, max_seq_len={n}, k=[8, 4], sharing="layerwise",
                          dropout=0.0, attention_dropout=0.0),
            "train": dict(micro_batch_size=2, run_dir=str(out / name)),
            "precision": dict(dtype=dtype), "zero": dict(stage=stage)}})
        torch.manual_seed(0)
        model = LinformerForMLM(cfg.model)
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                 config=build_ds_config(cfg, world), dist_init_required=False)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):  # move every weight away from its init, E/F included
            ids = torch.randint(5, {vocab}, (2, {n}), generator=g)
            out_ = engine(ids, labels=ids)
            engine.backward(out_.loss_sum / out_.num_predicted)
            engine.step()
        client = {{"config": to_dict(cfg), "step": 2, "consumed_samples": 4 * world}}
        CheckpointManager(out / name / "checkpoints", 2, rank).save(engine, 2, client, {{"rank": rank}})
        engine.eval()
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(5, {vocab}, (3, {n}), generator=g)
        mask = torch.ones_like(ids); mask[1, {n} // 2:] = 0; ids[1, {n} // 2:] = 0
        with torch.no_grad():
            logits = engine(ids, mask).float()           # every rank: a ZeRO-3 forward is collective
        if rank == 0:
            torch.save({{"logits": logits, "module": {{k: v.clone() for k, v in engine.module.state_dict().items()}}}},
                       out / name / "reference.pt")
        engine.destroy()

    # a directory resized from n=32, k=[8,4] to n=128, k=[16,8] loads and continues pretraining
    # (ZeRO-2, bf16, 2 ranks); rank 0 writes it, every rank loads it
    import json
    import torch.distributed as dist
    from linformer_train.convert import from_pretrained, save_pretrained
    from linformer_train.convert.resize import resize_model_dir
    if rank == 0:
        torch.manual_seed(0)
        small = config_from_dict({{"model": dict(preset="tiny", vocab_size={vocab}, max_seq_len={n}, k=[8, 4],
                                                 sharing="layerwise", dropout=0.0, attention_dropout=0.0)}})
        save_pretrained(LinformerForMLM(small.model), out / "n32", tokenizer=sys.argv[-2])
        resize_model_dir(out / "n32", out / "n128", 128, k=[16, 8])
    dist.barrier()
    model = from_pretrained(out / "n128").train()
    import dataclasses
    cfg = config_from_dict({{"model": {{**dataclasses.asdict(model.cfg), "preset": None}},
                            "train": dict(micro_batch_size=2), "precision": dict(dtype="bf16"), "zero": dict(stage=2)}})
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, world),
                                           dist_init_required=False)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(5, {vocab}, (2, 128), generator=g)
    mask = torch.ones_like(ids); mask[0, 90:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    losses = []
    for _ in range(4):
        res = engine(ids, mask, labels=labels)
        loss = res.loss_sum / res.num_predicted
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        (out / "n128_losses.json").write_text(json.dumps(losses))
    engine.destroy()
""")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("ds")
    script = root / "make_checkpoints.py"
    script.write_text(MAKE_CHECKPOINTS.format(root=str(ROOT), vocab=VOCAB, n=N))
    res = deepspeed_run(str(script), [str(tokenizer_path), str(root)], ranks=2)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return root


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_export_zero_checkpoint_gives_identical_logits(checkpoints, tokenizer_path, tmp_path, name):
    step = checkpoints / name / "checkpoints" / "step_00000002"
    assert len(list(step.glob("*optim_states.pt"))) == 2  # really partitioned over 2 ranks
    out = export_checkpoint(step, tmp_path / "model", tokenizer=tokenizer_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "model_info.json",
                                                     "tokenizer.json", "tokenizer.model"]
    model = from_pretrained(out)
    assert isinstance(model, LinformerForMLM) and not model.training
    # the layerwise projection is stored once and every layer reads that one tensor
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "proj" in k] == ["encoder.shared_projection.weight"]
    assert "decoder" not in " ".join(keys)  # the MLM decoder is the embedding matrix, not a copy
    assert model.encoder.shared_projection.weight.shape == (8, N)
    ids, mask = inputs()
    ref = torch.load(checkpoints / name / "reference.pt")["logits"]
    with torch.no_grad():
        diff = (model(ids, mask) - ref).abs()
    assert diff[0].max() == 0 and diff[1, : N // 2].max() == 0, diff.max()
    info = json.loads((out / "model_info.json").read_text())
    assert info["source"]["zero_stage"] == int(name[-1]) and info["source"]["step"] == 2


def test_export_bf16_stage0_recovers_fp32_masters(checkpoints, tokenizer_path, tmp_path):
    step = checkpoints / "zero0_bf16" / "checkpoints" / "step_00000002"
    module = torch.load(checkpoints / "zero0_bf16" / "reference.pt")["module"]
    fp32 = from_pretrained(export_checkpoint(step, tmp_path / "fp32", tokenizer=tokenizer_path)).state_dict()
    assert all(v.dtype == torch.bfloat16 for v in module.values())
    # masters are finer than the bf16 module weights, and round to exactly them
    assert any(not torch.equal(fp32[k], module[k].float()) for k in module)
    assert all(torch.equal(fp32[k].bfloat16(), module[k]) for k in module)
    bf16_dir = export_checkpoint(step, tmp_path / "bf16", dtype="bf16", tokenizer=tokenizer_path)
    assert json.loads((bf16_dir / "model_info.json").read_text())["dtype"] == "bf16"
    assert (bf16_dir / "model.safetensors").stat().st_size < (tmp_path / "fp32" / "model.safetensors").stat().st_size
    bf16 = from_pretrained(bf16_dir).state_dict()
    assert all(torch.equal(bf16[k], module[k].float()) for k in module)


def test_export_cli_follows_latest_and_refuses_partial_and_foreign(checkpoints, tokenizer_path, tmp_path):
    run = checkpoints / "zero2"
    res = run_cli([sys.executable, "tools/convert.py", "export", str(run), str(tmp_path / "m"),
                   "--tokenizer", str(tokenizer_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step_00000002" in json.loads((tmp_path / "m" / "model_info.json").read_text())["source"]["checkpoint"]

    partial = tmp_path / "partial" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", partial)
    (partial / "complete.json").unlink()
    res = run_cli([sys.executable, "tools/convert.py", "export", str(partial), str(tmp_path / "p"),
                   "--tokenizer", str(tokenizer_path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {partial} is incomplete (no complete.json: its save never finished); "
        f"export an earlier checkpoint")
    assert not (tmp_path / "p").exists()

    # a file of the complete checkpoint truncated after the save: the size record catches it
    damaged = tmp_path / "damaged" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", damaged)
    victim = next(damaged.glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="has 100 bytes"):
        export_checkpoint(damaged, tmp_path / "d", tokenizer=tokenizer_path)
    assert not (tmp_path / "d").exists()


def test_export_of_a_real_training_run_finds_its_tokenizer(prepared_data, tmp_path):
    """launch/pretrain.py writes the checkpoint; export finds the tokenizer through the run's data."""
    from conftest import pretrain, tiny_overrides

    run = tmp_path / "run"
    res = pretrain(tiny_overrides(prepared_data, run, "train.max_steps=2", "train.eval_every=0",
                                  "checkpoint.save_every=0", "model.sharing=kv"))
    assert res.returncode == 0, res.stderr[-2000:]
    out = export_checkpoint(run, tmp_path / "model")
    model = from_pretrained(out)
    assert model.cfg.sharing == "kv" and model.cfg.vocab_size == 512
    assert (out / "tokenizer.model").read_bytes() == next(Path(prepared_data).rglob("tokenizer.model")).read_bytes()


# --------------------------------------------------------------------------------------------------
# Model directories without DeepSpeed
# --------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_strict_keys_and_classifier_from_mlm(tokenizer_path, tmp_path):
    torch.manual_seed(0)
    model = LinformerForMLM(tiny_cfg()).eval()
    out = save_pretrained(model, tmp_path / "m", tokenizer=tokenizer_path)
    again = from_pretrained(out)
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(again(ids, mask), model(ids, mask))
        # tied decoder comes back tied: changing the embeddings changes the logits' decoder
        again.encoder.tokens.weight[7].add_(1.0)
        assert not torch.equal(again(ids, mask), model(ids, mask))

    clf = from_pretrained(out, "classification", num_labels=3)
    assert clf.classifier.out_features == 3
    assert torch.equal(clf.encoder.tokens.weight, model.encoder.tokens.weight)

    # an extra tensor (e.g. another model's weights) is an error, never ignored
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    save_file({**state, "encoder.extra.weight": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"1 unexpected key\(s\) \(encoder.extra.weight\)"):
        from_pretrained(out)
    del state["encoder.layers.1.ffn_in.bias"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"1 missing key\(s\) \(encoder.layers.1.ffn_in.bias\)"):
        from_pretrained(out)


def test_loading_another_models_directory_is_one_line(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ConversionError, match=r"is not a linformer-train model directory .* looks like a "
                                              r"Hugging Face roberta model; convert it with"):
        from_pretrained(hf)
    code = run_main(convert, ["export", str(hf), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {hf} is not a linformer-train checkpoint")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------------


def test_extend_positions_interpolates_or_copies():
    w = torch.stack([torch.arange(4.0), 10 * torch.arange(4.0)], 1)  # (4, 2)
    interp = extend_positions(w, 7)
    assert torch.allclose(interp[:, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3]))
    assert torch.equal(extend_positions(w, 10, "copy")[4:8], w)
    assert torch.equal(extend_positions(w, 3), w[:3])


def test_resize_longer_n_and_new_k_forwards_and_trains(checkpoints, tokenizer_path, tmp_path):
    torch.manual_seed(0)
    src = save_pretrained(LinformerForMLM(tiny_cfg(k=[8, 4])), tmp_path / "n32", tokenizer=tokenizer_path)
    out = resize_model_dir(src, tmp_path / "n128", 128, k=[16, 8])
    old, new = from_pretrained(src), from_pretrained(out)
    assert new.cfg.max_seq_len == 128 and new.cfg.k == [16, 8]
    E, E2 = old.encoder.shared_projection.weight, new.encoder.shared_projection.weight   # (8, 32), (16, 128)
    assert E2.shape == (16, 128)
    # first k rows: the old rows interpolated along n (ends kept), each rescaled to its old norm,
    # which keeps E·K's variance for uncorrelated keys; at init that is a fresh N(0, 1/n') row
    scale = E.norm(dim=-1) / torch.nn.functional.interpolate(E[:, None], size=128, mode="linear",
                                                             align_corners=True)[:, 0].norm(dim=-1)
    assert torch.allclose(E2[:8, 0], E[:, 0] * scale) and torch.allclose(E2[:8, -1], E[:, -1] * scale)
    assert torch.allclose(E2[:8].norm(dim=-1), E.norm(dim=-1))
    keys = torch.randn(4000, 128)
    ratio = (keys @ E2[:8].t()).std() / (keys[:, :32] @ E.t()).std()
    assert abs(ratio - 1) < 0.05, ratio
    assert abs(E2[:8].std().item() * 128 ** 0.5 - 1.0) < 0.15
    assert abs(E2[8:].std().item() * 128 ** 0.5 - 1.0) < 0.15  # new rows: fresh init at n'
    assert torch.allclose(new.encoder.positions.weight[0], old.encoder.positions.weight[0])
    assert torch.allclose(new.encoder.positions.weight[-1], old.encoder.positions.weight[-1])
    assert torch.equal(new.encoder.tokens.weight, old.encoder.tokens.weight)

    ids, mask = inputs(n=128, batch=2)
    with torch.no_grad():
        logits = new(ids, mask)
    assert logits.shape == (2, 128, VOCAB) and torch.isfinite(logits).all()

    # the same resize, done by the 2-rank script, continued pretraining under ZeRO-2 + bf16
    losses = json.loads((checkpoints / "n128_losses.json").read_text())
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses


def test_resize_to_shorter_n_is_exact_on_short_inputs(tokenizer_path, tmp_path):
    torch.manual_seed(1)
    model = LinformerForMLM(tiny_cfg(sharing="none", k=8, max_seq_len=64)).eval()
    short = resize_model(model, 32).eval()
    ids, mask = inputs(n=24)
    with torch.no_grad():
        assert (short(ids, mask) - model(ids, mask)).abs().max() < 1e-5


def test_resize_refuses_conv_kernel_change_and_bad_k(tokenizer_path, tmp_path):
    model = LinformerForMLM(tiny_cfg(projection="conv", sharing="headwise", k=8))
    with pytest.raises(ConversionError, match=r"kernel = stride = n / k = \[4, 4\]; the new n and k give "
                                              r"\[8, 8\]. Keep n / k per layer \(e.g. k=\[16, 16\]\)"):
        resize_model(model, 64)
    assert resize_model(model, 64, k=16).encoder.cfg.max_seq_len == 64  # same kernel: weights carry over
    with pytest.raises(ConversionError, match=r"resize: model.k for layer 0 is 80 > model.max_seq_len=64"):
        resize_model(LinformerForMLM(tiny_cfg()), 64, k=80)


# --------------------------------------------------------------------------------------------------
# Warm start from RoBERTa / BERT
# --------------------------------------------------------------------------------------------------


def _hf_vocab_from_tokenizer(tokenizer_path, family: str, drop: int = 0) -> dict:
    """An HF vocabulary holding the tokenizer's pieces in the HF model's spelling, shuffled, with
    the family's specials at their usual ids (RoBERTa: <s>=0 <pad>=1; BERT: [PAD]=0 ... [CLS]=101)."""
    from linformer_train.convert.hf import _bytes_to_unicode
    from linformer_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    enc = _bytes_to_unicode()
    pieces = [tok.sp.IdToPiece(i) for i in range(5, tok.vocab_size)]
    rng = random.Random(0)
    rng.shuffle(pieces)
    pieces = pieces[drop:]
    if family == "roberta":
        def spell(p):
            data = bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("\u2581", " ").encode()
            return "".join(enc[b] for b in data)
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for p in pieces:
            vocab.setdefault(spell(p), len(vocab))
        vocab["<mask>"] = len(vocab)
        return vocab
    vocab = {"[PAD]": 0, **{f"[unused{i}]": i + 1 for i in range(4)}, "[UNK]": 5, "[CLS]": 6, "[SEP]": 7,
             "[MASK]": 8}
    for p in pieces:
        if p.startswith("<0x"):
            b = int(p[3:5], 16)
            key = chr(b) if 33 <= b < 127 else ""   # WordPiece has no byte alphabet
        else:
            key = p[1:] if p.startswith("\u2581") else "##" + p
        if key:
            vocab.setdefault(key, len(vocab))
    return vocab


def _make_hf(tmp_path, tokenizer_path, family: str, drop: int = 0):
    transformers = pytest.importorskip("transformers")
    vocab = _hf_vocab_from_tokenizer(tokenizer_path, family, drop)
    hf_dir = tmp_path / f"hf-{family}"
    torch.manual_seed(0)
    common = dict(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "roberta":
        cfg = transformers.RobertaConfig(max_position_embeddings=N + 2, layer_norm_eps=1e-5, type_vocab_size=1,
                                         pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
        model = transformers.RobertaForMaskedLM(cfg)
    else:
        cfg = transformers.BertConfig(max_position_embeddings=N, type_vocab_size=2, pad_token_id=0, **common)
        model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # move LayerNorms and biases off their init so every mapping matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(hf_dir)
    if family == "roberta":
        (hf_dir / "vocab.json").write_text(json.dumps(vocab))
        (hf_dir / "merges.txt").write_text("#version: 0.2\n")
    else:
        inv = sorted(vocab, key=vocab.get)
        (hf_dir / "vocab.txt").write_text("\n".join(inv) + "\n")
    return hf_dir, model, vocab


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_warm_start_with_full_attention_matches_the_hf_model(tokenizer_path, tmp_path, family):
    from linformer_train.convert.hf import build_vocab_map, warm_start
    from linformer_train.data.tokenizer import load_tokenizer

    hf_dir, hf_model, _ = _make_hf(tmp_path, tokenizer_path, family)
    out = warm_start(hf_dir, tmp_path / "lin", tokenizer_path, {"attention": "full"})
    ours = from_pretrained(out)
    tok = load_tokenizer(tokenizer_path)
    vmap = build_vocab_map(hf_dir, tok)
    assert vmap["matched"] == vmap["total"]
    ids, mask = inputs()
    ids[:, 0] = 1                                                   # <s> first, as the tokenizer lays out
    hf_ids = torch.tensor(vmap["ids"])[ids]
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf_model(input_ids=hf_ids, attention_mask=mask).logits[..., torch.tensor(vmap["ids"])]
    real = mask.bool()
    diff = (a - b).abs()[real].max().item()
    assert diff < 1e-4, diff
    assert ours.cfg.layer_norm_eps == (1e-5 if family == "roberta" else 1e-12)


def test_warm_start_linformer_longer_n_trains(tokenizer_path, tmp_path):
    from linformer_train.convert.hf import warm_start

    hf_dir, hf_model, _ = _make_hf(tmp_path, tokenizer_path, "roberta")
    out = warm_start(hf_dir, tmp_path / "lin", tokenizer_path,
                     {"attention": "linformer", "max_seq_len": 4 * N, "k": 16, "sharing": "kv"})
    model = from_pretrained(out).train()
    hf_pos = hf_model.roberta.embeddings.position_embeddings.weight.detach()
    # RoBERTa's offset: our position i is HF row i + padding_idx + 1; copy-extended past n_hf
    assert torch.allclose(model.encoder.positions.weight[:N], hf_pos[2:] + hf_model.roberta.embeddings
                          .token_type_embeddings.weight[0].detach())
    assert torch.equal(model.encoder.positions.weight[N:2 * N], model.encoder.positions.weight[:N])
    info = json.loads((out / "model_info.json").read_text())
    assert info["source"]["position_offset"] == 2 and "encoder.layers.0.attn.proj_k.weight" in info["source"]["initialised"]
    ids, mask = inputs(n=4 * N, batch=4)
    labels = torch.where(mask.bool(), ids, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        res = model(ids, mask, labels=labels)
        loss = res.loss_sum / res.num_predicted
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_warm_start_vocab_mismatch_is_refused_in_one_line(tokenizer_path, tmp_path, capsys):
    import re

    hf_dir, _, _ = _make_hf(tmp_path, tokenizer_path, "roberta", drop=40)
    capsys.readouterr()
    out = tmp_path / "lin"
    code = run_main(convert, ["warm-start", str(hf_dir), str(out), "--tokenizer", str(tokenizer_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    m = re.match(rf"error: vocabulary mismatch: (\d+) of 295 pieces of tokenizer {re.escape(str(tokenizer_path))} "
                 rf"are not in {re.escape(str(hf_dir))}'s roberta vocabulary \(e.g. '.+'\); use the tokenizer "
                 rf"that matches the model, or allow it with --min-vocab-coverage (0\.\d\d) ", err)
    assert m, err
    missing = int(m.group(1))  # 40 dropped, fewer missing: some pieces share a spelling (▁ and <0x20>)
    assert 20 < missing <= 40 and float(m.group(2)) == int((295 - missing) / 295 * 100) / 100
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".lin")]
    # allowed explicitly: the missing rows start from their characters' rows
    assert run_main(convert, ["warm-start", str(hf_dir), str(out), "--tokenizer", str(tokenizer_path),
                              "--min-vocab-coverage", "0.8"]) == 0
    assert json.loads((out / "model_info.json").read_text())["source"]["vocab_matched"] == 295 - missing


def test_warm_start_bad_inputs(tokenizer_path, tmp_path, capsys):
    hf_dir, _, _ = _make_hf(tmp_path, tokenizer_path, "roberta")
    capsys.readouterr()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cases = [
        (["model.hidden_size=32"], "model.hidden_size cannot be set here (it comes from the Hugging Face model)"),
        (["model.k=64"], "warm start: model.k for layer 0 is 64 > model.max_seq_len=32"),
    ]
    for extra, message in cases:
        code = run_main(convert, ["warm-start", str(hf_dir), str(tmp_path / "o"), "--tokenizer",
                                  str(tokenizer_path), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(ConversionError, match="hidden_act='gelu_new', but Linformer blocks use the exact"):
        from linformer_train.convert.hf import warm_start

        warm_start(hf_dir, tmp_path / "o", tokenizer_path)
    assert not (tmp_path / "o").exists()
