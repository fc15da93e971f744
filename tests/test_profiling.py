"""The profiler's own logic on tiny sizes: rows, measurements, ratios, estimates, budgets, the CLI."""

import csv
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from linformer_train import profiling as prof
from linformer_train.config import ConfigError, config_from_dict
from linformer_train.model import LinformerForMLM

ROOT = Path(__file__).resolve().parent.parent


def tiny(**kw) -> dict:
    base = prof.model_section("tiny", overrides=["model.dropout=0", "model.attention_dropout=0"])
    base.update(preset=None, vocab_size=128, **kw)
    return base


def load_cli():
    spec = importlib.util.spec_from_file_location("profile_cli", ROOT / "tools" / "profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ cases


def test_sweep_has_one_case_per_configuration_and_one_baseline_per_n():
    cases = prof.build_cases(tiny(), seq_lens=[64, 128], attentions=["linformer", "full", "naive"],
                             ks=[16, 32], sharings=["headwise", "kv"], batch_sizes=[1, 2],
                             modes=["forward", "backward"])
    # per (mode, n, batch): 2 k x 2 sharing Linformer variants + 2 baselines
    assert len(cases) == 2 * 2 * 2 * (4 + 2)
    labels = {c.label for c in cases}
    assert labels == {"linformer k=16", "linformer k=32", "linformer k=16 kv", "linformer k=32 kv",
                      "full (sdpa)", "naive"}
    assert all(c.model["max_seq_len"] == c.seq_len for c in cases)
    assert {c.target for c in cases} == {"encoder"}


def test_impossible_case_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="k must not exceed n"):
        prof.build_cases(tiny(), seq_lens=[32], attentions=["linformer"], ks=[64])
    with pytest.raises(ConfigError, match="mode"):
        prof.build_cases(tiny(), seq_lens=[32], attentions=["naive"], modes=["sideways"])
    with pytest.raises(ConfigError, match="unknown"):
        prof.model_section("huge")
    assert prof.parse_k("{first: 64, last: 16}") == {"first": 64, "last": 16}
    with pytest.raises(ConfigError):
        prof.parse_k("lots")


def test_case_flops_are_the_counts_written_out_by_hand():
    # tiny: D=64, H=4, F=128, 2 layers, vocabulary 128; n=64, k=16, batch 3 (2 FLOPs a multiply-add)
    L, D, F, k, V = 64, 64, 128, 16, 128
    layer = 2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * L * D * F + 2 * 2 * k * L * D + 2 * 2 * L * k * D
    assert 2 * layer == 9_437_184      # qkv, out, FFN, E/F projections, Q (EK)^T and P (FV)
    case = prof.build_cases(tiny(), seq_lens=[64], attentions=["linformer"], ks=[16],
                            batch_sizes=[3], modes=["backward"])[0]
    assert prof.case_flops(case) == 3 * 3 * 9_437_184                       # backward = 2 forwards
    assert prof.case_flops(dataclasses.replace(case, mode="forward")) == 3 * 9_437_184
    # MLM training: the head at the 10 positions per sequence build_step masks (15% of 64), not 9.6
    mlm = dataclasses.replace(case, mode="train", target="mlm")
    assert prof.case_flops(mlm) == 3 * (3 * 9_437_184 + 3 * 10 * (2 * D * D + 2 * D * V))
    # one attention layer (no FFN), as the layer target and the pypi comparison count it
    layer_case = dataclasses.replace(case, target="layer", batch_size=1)
    assert prof.case_flops(layer_case) == 3 * (layer - 2 * 2 * L * D * F)


# ------------------------------------------------------------------------------- measuring, ratios


def test_isolated_sweep_measures_time_memory_and_ratios():
    cases = prof.build_cases(tiny(), seq_lens=[256], attentions=["linformer", "naive"],
                             ks=[32], modes=["backward"], warmup=1, repeats=2)
    rows = prof.run_sweep(cases, peak_flops=1e11)
    assert [r["label"] for r in rows] == ["linformer k=32", "naive"]
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["time_ms"] > 0 and len(r["times_ms"]) == 2
        assert r["mem_step_mib"] > 0 and r["mem_peak_mib"] > r["mem_step_mib"]
        assert r["mem_method"] in ("rss_hwm", "rss_sampled")
        assert r["flops"] > 0 and r["mfu"] == pytest.approx(r["flops"] / (r["time_ms"] / 1e3) / 1e11)
        assert 0 < r["cpu_share"] <= 1.5
    lin, naive = rows
    assert lin["speedup_vs_naive"] == pytest.approx(naive["time_ms"] / lin["time_ms"])
    assert lin["mem_saved_vs_naive"] == pytest.approx(naive["mem_step_mib"] / lin["mem_step_mib"])
    assert naive["speedup_vs_naive"] == pytest.approx(1.0)
    # the naive baseline materialises 4 heads x 256^2 fp32 scores per layer; Linformer does not
    assert naive["mem_step_mib"] > lin["mem_step_mib"]


def _row(attention, n, time_ms, mem, **kw):
    r = {"label": attention, "attention": attention, "impl": "project", "target": "encoder",
         "mode": "backward", "dtype": "fp32", "device": "cpu", "n": n, "batch": 1, "layers": 2,
         "hidden": 64, "heads": 4, "ffn": 128, "vocab": 128, "dropout": 0.0,
         "attention_dropout": 0.0, "status": "ok", "time_ms": time_ms, "mem_step_mib": mem,
         "flops": 100.0}
    r.update(kw)
    return r


def test_ratios_match_the_baseline_of_the_same_n_and_mode():
    rows = [
        _row("linformer", 512, 10.0, 5.0, label="linformer k=64", flops=50.0),
        _row("full", 512, 20.0, 10.0),
        _row("naive", 512, 40.0, 100.0),
        _row("linformer", 1024, 12.0, 6.0, label="linformer k=64"),
        _row("naive", 1024, 120.0, 600.0),
        _row("full", 1024, 30.0, 30.0, mode="forward"),      # another mode: not a baseline here
        _row("linformer", 512, 8.0, 4.0, label="pypi linformer k=64", impl="pypi"),
    ]
    prof.add_ratios(rows)
    lin512, _, _, lin1024, _, _, pypi = rows
    assert lin512["speedup_vs_naive"] == 4.0 and lin512["mem_saved_vs_naive"] == 20.0
    assert lin512["speedup_vs_sdpa"] == 2.0 and lin512["mem_saved_vs_sdpa"] == 2.0
    assert lin512["flop_ratio_vs_sdpa"] == 2.0 and lin512["flop_efficiency_vs_sdpa"] == 1.0
    assert lin1024["speedup_vs_naive"] == 10.0 and lin1024["mem_saved_vs_naive"] == 100.0
    assert lin1024["speedup_vs_sdpa"] is None  # no SDPA run at n=1024 backward
    assert pypi["speedup_vs_naive"] == 5.0    # other implementations compare to the same baselines


def test_skipped_baseline_leaves_no_ratio_but_a_note():
    rows = [_row("linformer", 512, 10.0, 5.0, label="linformer k=64"),
            _row("naive", 512, None, None, status="over_budget")]
    prof.add_ratios(rows)
    assert rows[0]["speedup_vs_naive"] is None
    assert rows[0]["note_vs_naive"] == "naive over_budget"


# --------------------------------------------------------------------------------------- budgets


def test_max_batch_reports_the_last_size_that_fit():
    case = prof.build_cases(tiny(), seq_lens=[64], attentions=["naive"])[0]
    budget = 100 * prof.MIB
    calls = []

    def fake(c):  # 12 MiB per sequence: 8 fits (96 MiB), 9 does not
        calls.append(c.batch_size)
        peak = 12 * c.batch_size
        ok = peak * prof.MIB <= c.budget_bytes
        return {"batch": c.batch_size, "status": "ok" if ok else "over_budget", "mem_peak_mib": peak,
                "reason": "" if ok else "over"}

    res = prof.find_max_batch(case, budget, runner=fake)
    assert res["max_batch"] == 8 and res["fit"]["batch"] == 8 and res["fail"]["batch"] == 9
    assert calls == [1, 2, 4, 8, 16, 12, 10, 9]
    res = prof.find_max_batch(case, budget, runner=fake, refine=False)
    assert res["max_batch"] == 8 and res["fail"]["batch"] == 16
    res = prof.find_max_batch(case, 5 * prof.MIB, runner=fake)
    assert res["max_batch"] == 0 and res["fit"] is None


def test_max_batch_on_cpu_stops_at_a_small_real_budget():
    # In process (a subprocess per attempt would be slow): the budget leaves room for ~3.5 times what
    # one sequence's step takes (the naive baseline keeps 4 heads x 384^2 fp32 scores per layer).
    case = prof.build_cases(tiny(), seq_lens=[384], attentions=["naive"], warmup=0, repeats=1)[0]
    first = prof.measure_case(case, isolate=False)  # the process's own first-use memory settles
    assert first["status"] == "ok"
    budget = int((first["mem_baseline_mib"] + 3.5 * first["mem_step_mib"]) * prof.MIB)
    res = prof.find_max_batch(case, budget, limit=64,
                              runner=lambda c: prof.measure_case(c, isolate=False, precheck=False))
    assert 1 <= res["max_batch"] < 64
    assert res["fit"]["status"] == "ok" and res["fit"]["mem_peak_mib"] * prof.MIB <= budget
    assert res["fail"]["status"] == "over_budget" and res["fail"]["batch"] == res["max_batch"] + 1


def test_worker_over_budget_stops_cleanly():
    case = prof.build_cases(tiny(), seq_lens=[64], attentions=["linformer"], ks=[16])[0]
    case = dataclasses.replace(case, budget_bytes=64 * prof.MIB)  # below an idle torch process
    row = prof.run_case_isolated(case)
    assert row["status"] == "over_budget" and "stopped" in row["reason"]


def test_precheck_skips_a_case_far_over_budget_without_running_it():
    case = prof.build_cases(tiny(), seq_lens=[4096], attentions=["naive"])[0]
    case = dataclasses.replace(case, budget_bytes=8 * prof.MIB)
    row = prof.measure_case(case)
    assert row["status"] == "over_budget" and row["reason"].startswith("not run: estimated")


# -------------------------------------------------------------------------------------- estimates


def test_estimate_matches_a_hand_computation():
    model = tiny(max_seq_len=64, k=16, dropout=0.1, attention_dropout=0.1)
    cfg = config_from_dict({"model": model}).model
    est = prof.estimate(cfg, 64, 2, dtype="bf16", zero_stages=[0, 2, 3], num_gpus=4,
                        gpu_mem_gib=1.0, reserve_gib=0.5)
    P = sum(p.numel() for p in LinformerForMLM(cfg).parameters())
    assert est["params"] == P
    s0, s2, s3 = est["stages"]
    assert s0["model_states_bytes"] == 20 * P                   # 2 + 2 + 4 + 4 + 8 bytes each
    assert s2["model_states_bytes"] == 2 * P + 18 * P / 4       # grads and optimizer partitioned
    if importlib.util.find_spec("deepspeed") is not None:  # GPU images may lack it
        assert s2["deepspeed_model_states_bytes"] == int(2 * P + int(18 * P / 4))
    largest = 64 * 192 + 192  # the fused qkv Linear (64 -> 3 x 64, bias) beats the 128 x 64 embedding
    assert est["largest_layer_params"] == largest
    assert s3["model_states_bytes"] == 20 * P / 4 + 4 * largest  # + one gathered layer

    # activations, by hand: B=2, L=64, D=64, H=4, F=128, k=16, 2 layers, bf16 (2 B), dropout on
    B, L, D, H, Fd, k, s = 2, 64, 64, 4, 128, 16, 2
    BLD, BLF = B * L * D, B * L * Fd
    core = 2 * B * k * D * s + BLD * s + B * H * L * 4          # projected K, V; SDPA out; lse
    layer = 8 * BLD * s + 2 * BLF * s + core + 2 * B * L * 8 + 2 * BLD + BLF
    embed = BLD * s + BLD + BLD * s
    head = 0.15 * B * L * (5 * D * s + 128 * (s + 4))
    transient = (2 * BLF + 4 * BLD) * s + 2 * B * k * D * s
    assert est["activations"]["total"] == pytest.approx(2 * layer + embed + head + transient)
    assert s2["total_bytes"] == pytest.approx(s2["model_states_bytes"] + est["activations"]["total"]
                                              + 0.5 * prof.GIB)
    assert s2["fits"] is True
    per_seq = est["activation_bytes_per_sequence"]
    assert s2["max_micro_batch"] == int((0.5 * prof.GIB - s2["model_states_bytes"]) // per_seq)


def test_activation_estimate_grows_with_n_squared_only_for_full_attention_baselines():
    def act(attention, n):
        cfg = config_from_dict({"model": tiny(max_seq_len=n, attention=attention, k=32)}).model
        return prof.activation_bytes(cfg, n, 1, "fp32")["total"]
    assert act("naive", 2048) / act("naive", 1024) > 3.0
    assert act("linformer", 2048) / act("linformer", 1024) < 2.2
    assert act("full", 2048) / act("full", 1024) < 2.2  # CUDA SDPA: no n^2 buffer


def test_activation_checkpointing_keeps_less():
    cfg = config_from_dict({"model": tiny(max_seq_len=256, k=32, num_layers=8)}).model
    plain = prof.activation_bytes(cfg, 256, 4, "bf16")["total"]
    ckpt = prof.activation_bytes(cfg, 256, 4, "bf16", activation_checkpointing=True)["total"]
    assert ckpt < plain / 2


# ------------------------------------------------------------------------------------------- CLI


def test_cli_mistakes_are_one_line_and_exit_2(capsys):
    cli = load_cli()
    for argv in (["sweep", "--preset", "tiny", "-n", "64", "--k", "128"],
                 ["sweep", "--preset", "nope", "-n", "64"],
                 ["estimate", "--preset", "tiny", "-n", "64", "--zero-stage", "5"],
                 ["sweep", "--preset", "tiny"]):
        with pytest.raises(SystemExit) as exc_info:
            raise SystemExit(cli.main(argv))
        assert exc_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_sweep_writes_table_json_csv_and_plots(tmp_path, capsys):
    cli = load_cli()
    out = tmp_path / "p"
    rc = cli.main(["sweep", "--preset", "tiny", "--set", "model.dropout=0", "-n", "32", "48",
                   "--k", "16", "--attention", "linformer", "naive", "--repeats", "1",
                   "--no-isolate", "--peak-tflops", "0.1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "linformer k=16" in printed and "naive" in printed
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == 4 and payload["machine"]["cpu"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    png = out / "profile_encoder_backward_fp32_b1.png"
    assert png.stat().st_size > 5000


def test_cli_estimate_answers_whether_it_fits(tmp_path, capsys):
    cli = load_cli()
    rc = cli.main(["estimate", "--preset", "tiny", "-n", "128", "--k", "32", "--zero-stage", "2",
                   "--gpus", "8", "--gpu-mem-gib", "40", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    assert "ZeRO-2 on 8 x 40 GiB: fits" in capsys.readouterr().out
    est = json.loads((tmp_path / "e.json").read_text())["estimate"]
    assert est["stages"][0]["max_micro_batch"] > 1000


# -------------------------------------------------------------------------------- other packages


def test_pypi_linformer_layer_runs_against_the_same_baselines():
    pytest.importorskip("linformer")
    cases = prof.build_cases(tiny(), seq_lens=[128], attentions=["linformer", "full"], ks=[32],
                             impls=["project", "pypi"], target="layer", repeats=1)
    assert [c.label for c in cases] == ["linformer k=32", "pypi linformer k=32", "full (sdpa)"]
    rows = prof.run_sweep(cases, isolate=False)
    assert all(r["status"] == "ok" for r in rows)
    assert rows[1]["speedup_vs_sdpa"] is not None
    # the same layer maths, by hand: n=128, D=64, k=32, forward + backward (3 forwards)
    L, D, k = 128, 64, 32
    by_hand = 3 * (2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * k * L * D + 2 * 2 * L * k * D)
    assert by_hand == 18_874_368
    assert rows[0]["flops"] == by_hand and rows[1]["flops"] == by_hand
    with pytest.raises(ConfigError, match="--target layer"):
        prof.build_cases(tiny(), seq_lens=[128], attentions=["linformer"], ks=[32], impls=["pypi"])


# --------------------------------------------------------------------------------- step breakdown


def _ev(name, start, end, device_us=0.0):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           self_device_time_total=device_us)


def test_step_breakdown_reads_the_trainer_ranges():
    from linformer_train.profiling.steps import step_breakdown

    # two steps of 100 us (and a third that only ends the second); times in microseconds
    events = []
    for s in (0, 100, 200):
        events += [_ev("train.step", s, s + 90), _ev("train.data", s + 1, s + 6),
                   _ev("train.forward", s + 10, s + 30), _ev("train.backward", s + 30, s + 70),
                   _ev("train.optimizer", s + 75, s + 85),
                   # ops with kernels: one launched in each phase, one between phases
                   _ev("aten::mm", s + 12, s + 13, 15.0), _ev("aten::mm", s + 31, s + 32, 30.0),
                   _ev("aten::add_", s + 76, s + 77, 5.0), _ev("aten::fill_", s + 72, s + 73, 3.0)]
    cpu = step_breakdown(events)
    assert cpu["steps"] == 2 and cpu["step_ms"] == pytest.approx(0.1)
    assert [cpu[f"{p}_ms"] * 1e3 for p in ("forward", "backward", "optimizer", "data", "other")] == \
        pytest.approx([20, 40, 10, 5, 25])
    assert cpu["shares"]["backward"] == pytest.approx(0.4)
    one = step_breakdown(events, skip=1)  # the first step dropped, the last still has no end
    assert one["steps"] == 1
    cuda = step_breakdown(events, device="cuda")  # kernels by the phase they were launched in
    assert [cuda[f"{p}_ms"] * 1e3 for p in ("forward", "backward", "optimizer", "data")] == \
        pytest.approx([15, 30, 5, 0])
    assert cuda["other_ms"] * 1e3 == pytest.approx(100 - 50)  # the kernel between phases, and idle
    with pytest.raises(ValueError, match="too few"):
        step_breakdown(events, skip=2)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_case_and_oom_stop():
    """CPU siblings: test_isolated_sweep_measures_time_memory_and_ratios and
    test_max_batch_on_cpu_stops_at_a_small_real_budget."""
    cases = prof.build_cases(tiny(), seq_lens=[512], attentions=["linformer", "naive"], ks=[32],
                             device="cuda", dtype="bf16", repeats=2)
    rows = prof.run_sweep(cases)
    for r in rows:
        assert r["status"] == "ok" and r["mem_method"] == "cuda.max_memory_allocated"
        assert r["time_ms"] > 0 and r["mem_step_mib"] > 0
    naive = cases[1]
    budget = torch.cuda.memory_allocated() + 256 * prof.MIB
    res = prof.find_max_batch(naive, budget, limit=4096,
                              runner=lambda c: prof.measure_case(c, precheck=False))
    assert res["max_batch"] >= 1 and res["fail"]["status"] in ("oom", "over_budget")
    assert res["fail"]["batch"] == res["max_batch"] + 1
    assert math.isfinite(res["fit"]["time_ms"])


# ------------------------------------------------------------------ the hot-path fix it led to


def test_shared_projection_is_one_gemm_without_a_copy_of_the_keys():
    """The profiler found Linformer using more memory than SDPA on the GPU: torch.matmul(E, K)
    with K a view into the fused qkv output copied K (B*L*D) and kept the copy for backward.
    _project_shared gives the same numbers and saves nothing but E."""
    from linformer_train.model.attention import LinearProjection, _project_shared

    torch.manual_seed(0)
    B, L, H, Dh, k = 2, 48, 4, 8, 16
    qkv = torch.randn(B, L, 3 * H * Dh, dtype=torch.float64, requires_grad=True)
    keys = qkv.view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)[1]    # (B, H, L, Dh) view
    w = torch.randn(k, L, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast = _project_shared(w, keys)
    assert {t.untyped_storage().data_ptr() for t in saved} <= {
        qkv.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    ref = torch.matmul(w, keys)
    assert torch.allclose(fast, ref)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, (qkv, w), g)
    grads_ref = torch.autograd.grad(ref, (qkv, w), g)
    assert all(torch.allclose(a, b) for a, b in zip(grads_fast, grads_ref))
    # a contiguous (B, H, L, Dh) input (heads not adjacent) takes the plain path, same result
    contiguous = keys.contiguous()
    assert torch.allclose(_project_shared(w, contiguous), ref)
    # through the module, with short inputs and per-sequence lengths (scaling applied after)
    proj = LinearProjection(k, 64, None, "sqrt").double()
    lengths = torch.tensor([48, 30])
    y, _ = proj(keys, k, lengths)
    expect = torch.matmul(proj.weight[:, :L], keys) * (64 / lengths.double()).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(y, expect)
