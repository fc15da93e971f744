"""Linformer maths: equivalence with full attention, sharing counts, padding, slicing, init scale."""

import math

import pytest
import torch

from linformer_train.config import ConfigError, config_from_dict
from linformer_train.model import (
    LinformerForMLM,
    LinformerForSequenceClassification,
    SequenceTooLongError,
    apply_activation_checkpointing,
    count_projection_matrices,
    encoder_flops,
)
from linformer_train.model.attention import FullSelfAttention, LinformerSelfAttention, NaiveSelfAttention
from linformer_train.model.encoder import LinformerEncoder


def model_cfg(**kw):
    base = dict(preset="tiny", vocab_size=97, max_seq_len=64, k=16, dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return config_from_dict({"model": base}).model


def test_identity_projection_equals_full_attention():
    torch.manual_seed(0)
    n, D, H = 32, 64, 4
    lin = LinformerSelfAttention(D, H, 0.0, k=n, max_seq_len=n, projection="linear",
                                 sharing="headwise", short_input_scaling="sqrt")
    full = FullSelfAttention(D, H, 0.0)
    naive = NaiveSelfAttention(D, H, 0.0)
    full.load_state_dict(lin.state_dict(), strict=False)
    naive.load_state_dict(lin.state_dict(), strict=False)
    with torch.no_grad():
        lin.proj_k.weight.copy_(torch.eye(n))
        lin.proj_v.weight.copy_(torch.eye(n))
    x = torch.randn(3, n, D)
    out_lin, out_full, out_naive = lin(x), full(x), naive(x)
    assert (out_lin - out_full).abs().max() < 1e-5
    assert (out_naive - out_full).abs().max() < 1e-5


@pytest.mark.parametrize("sharing,expected", [("none", 288), ("headwise", 24), ("kv", 12), ("layerwise", 1)])
def test_projection_count_per_sharing_mode(sharing, expected):
    cfg = model_cfg(num_layers=12, num_heads=12, hidden_size=96, ffn_size=32, max_seq_len=32, k=8,
                    sharing=sharing, preset=None)
    model = LinformerForMLM(cfg)
    assert count_projection_matrices(model) == expected
    # parameters per E/F: k x n each, so the projection parameter total follows the same formula
    proj_params = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    assert proj_params == expected * 8 * 32


def test_layerwise_state_dict_stores_shared_matrix_once():
    model = LinformerForMLM(model_cfg(sharing="layerwise", k=[16, 8]))
    keys = [k for k in model.state_dict() if "proj" in k]
    assert keys == ["encoder.shared_projection.weight"]


@pytest.mark.parametrize("projection,sharing", [
    ("linear", "none"), ("linear", "headwise"), ("linear", "kv"), ("linear", "layerwise"),
    ("mean", "headwise"), ("conv", "headwise"), ("conv", "kv"),
])
def test_padding_invariance(projection, sharing):
    torch.manual_seed(1)
    model = LinformerForMLM(model_cfg(projection=projection, sharing=sharing)).eval()
    ids = torch.randint(5, 97, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[0, 40:] = 0
    mask[1, 13:] = 0
    other = ids.clone()
    other[mask == 0] = torch.randint(5, 97, (int((mask == 0).sum()),))
    a, b = model(ids, mask), model(other, mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < 1e-5
    # the amount of padding must not matter either: cut the batch at the longest real length
    c = model(ids[1:, :13], mask[1:, :13])
    assert (a[1, :13] - c[0]).abs().max() < 1e-4


def test_naive_attention_matches_sdpa_with_padding_dropout_and_bf16():
    """The written-out baseline is softmax attention as SDPA computes it: with a padding mask, in
    eval mode even with attention dropout set (none is applied), in its input's dtype; in training
    mode both drop."""
    torch.manual_seed(2)
    full = FullSelfAttention(64, 4, 0.5).eval()
    naive = NaiveSelfAttention(64, 4, 0.5).eval()
    naive.load_state_dict(full.state_dict())
    x = torch.randn(2, 12, 64)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0
    assert torch.allclose(naive(x, mask), full(x, mask), atol=1e-5)
    assert torch.allclose(naive(x), full(x), atol=1e-5)
    assert not torch.allclose(naive(x, mask)[1], naive(x)[1], atol=1e-3)  # the mask does something
    out = naive.to(torch.bfloat16)(x.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    for attn in (full.float().train(), naive.float().train()):
        torch.manual_seed(3)
        first = attn(x, mask)
        torch.manual_seed(4)
        assert not torch.allclose(attn(x, mask), first, atol=1e-3)


def test_mean_pooling_keeps_the_input_dtype():
    from linformer_train.model.attention import MeanPoolProjection

    x = torch.randn(2, 3, 16, 8, dtype=torch.bfloat16)
    mask = torch.ones(2, 16, dtype=torch.long)
    pooled, _ = MeanPoolProjection(4, 16)(x, mask)
    assert pooled.dtype == torch.bfloat16
    assert torch.allclose(pooled.float(), x.float().view(2, 3, 4, 4, 8).mean(3), atol=1e-2)


def test_full_attention_padding_invariance():
    model = LinformerForMLM(model_cfg(attention="full")).eval()
    ids = torch.randint(5, 97, (1, 64))
    mask = torch.ones(1, 64, dtype=torch.long)
    mask[0, 30:] = 0
    other = ids.clone()
    other[0, 30:] = 7
    assert (model(ids, mask)[0, :30] - model(other, mask)[0, :30]).abs().max() < 1e-5


def test_shorter_input_slices_projection_and_scales():
    torch.manual_seed(2)
    for scaling, factor in [("none", 1.0), ("sqrt", math.sqrt(64 / 16)), ("length", 64 / 16)]:
        attn = LinformerSelfAttention(64, 4, 0.0, k=8, max_seq_len=64, projection="linear",
                                      sharing="headwise", short_input_scaling=scaling)
        x = torch.randn(1, 4, 16, 16)  # (B, H, L, Dh) with L = 16 < n = 64
        y, _ = attn.proj_k(x, 8, None)
        expected = torch.matmul(attn.proj_k.weight[:, :16], x) * factor
        assert torch.allclose(y, expected, atol=1e-6)
    model = LinformerForMLM(model_cfg())
    assert model(torch.randint(5, 97, (2, 10))).shape == (2, 10, 97)


def test_longer_input_is_refused_with_both_lengths():
    model = LinformerForMLM(model_cfg())
    with pytest.raises(SequenceTooLongError, match=r"input length 65 exceeds model.max_seq_len=64"):
        model(torch.randint(5, 97, (1, 65)))


def test_nested_k_layerwise_shares_first_rows_and_gets_gradient():
    cfg = model_cfg(sharing="layerwise", k=[16, 4])
    model = LinformerForMLM(cfg)
    shared = model.encoder.shared_projection.weight
    assert shared.shape == (16, 64)  # only k_max rows exist
    assert [layer.attn.k for layer in model.encoder.layers] == [16, 4]
    ids = torch.randint(5, 97, (2, 64))
    labels = ids.clone()
    model(ids, labels=labels).loss_sum.backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    # rows 4..15 only feed layer 0; rows 0..3 feed both layers
    assert shared.grad[:4].abs().sum() > 0 and shared.grad[4:].abs().sum() > 0


def test_nested_k_layer_reads_exactly_the_first_rows():
    """Layer 1 (k=4) depends on rows 0..3 of the shared matrix and on nothing past them: changing
    rows 4..15 leaves its output bit-identical, changing rows 0..3 does not."""
    torch.manual_seed(0)
    model = LinformerForMLM(model_cfg(sharing="layerwise", k=[16, 4])).eval()
    shared = model.encoder.shared_projection
    attn = model.encoder.layers[1].attn
    x = torch.randn(2, 64, 64)
    with torch.no_grad():
        before = attn(x, shared=shared)
        shared.weight[4:] += 1.0
        assert torch.equal(attn(x, shared=shared), before)
        shared.weight[:4] += 1.0
        assert not torch.allclose(attn(x, shared=shared), before, atol=1e-3)


def test_k_schedule_forms():
    assert LinformerEncoder(model_cfg(k=[32, 8])).k_schedule == [32, 8]
    cfg = model_cfg(num_layers=4, k={"first": 64, "last": 16, "multiple_of": 16})
    assert LinformerEncoder(cfg).k_schedule == [64, 48, 32, 16]


def test_init_keeps_projection_scale_stable_at_long_n():
    torch.manual_seed(3)
    stds = []
    for n in (512, 8192):
        attn = LinformerSelfAttention(64, 1, 0.0, k=128, max_seq_len=n, projection="linear",
                                      sharing="headwise", short_input_scaling="sqrt", projection_init="normal")
        x = torch.randn(1, 1, n, 64)
        stds.append(attn.proj_k(x, 128, None)[0].std().item())
    assert 0.8 < stds[0] < 1.2 and 0.8 < stds[1] < 1.2, stds


def test_tiny_forward_backward_at_8192_bf16_is_finite():
    cfg = model_cfg(max_seq_len=8192, k=64, sharing="layerwise")
    model = LinformerForMLM(cfg).to(torch.bfloat16)
    ids = torch.randint(5, 97, (1, 8192))
    labels = torch.full_like(ids, -100)
    labels[0, ::7] = ids[0, ::7]
    out = model(ids, labels=labels)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_activation_checkpointing_matches_plain_gradients():
    torch.manual_seed(4)
    cfg = model_cfg(sharing="layerwise", k=[16, 8])
    plain = LinformerForMLM(cfg)
    ckpt = LinformerForMLM(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(5, 97, (2, 64))
    for m in (plain, ckpt):
        m(ids, labels=ids).loss_sum.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_block_normalises_where_the_config_says(norm):
    """pre: x + attn(LN(x)), then + ffn(LN(.)); post: LN(x + attn(x)), then LN(. + ffn(.)); an
    encoder with pre-norm ends in a final LayerNorm, one with post-norm needs none."""
    torch.manual_seed(0)
    encoder = LinformerEncoder(model_cfg(norm=norm, num_layers=1)).eval()
    block = encoder.layers[0]
    x = torch.randn(2, 64, 64) * 3 + 1                           # far from normalised

    def attn(h):
        return block.attn(h)

    def ffn(h):
        return block.ffn_out(torch.nn.functional.gelu(block.ffn_in(h)))

    with torch.no_grad():
        if norm == "pre":
            h = x + attn(block.attn_norm(x))
            want = h + ffn(block.ffn_norm(h))
        else:
            h = block.attn_norm(x + attn(x))
            want = block.ffn_norm(h + ffn(h))
        assert torch.allclose(block(x), want, atol=1e-5)
        out = encoder(torch.randint(5, 97, (2, 64)))
    assert (encoder.final_norm is not None) == (norm == "pre")
    last = encoder.final_norm if norm == "pre" else block.ffn_norm  # the output is some LayerNorm's
    centred = (out - out.mean(-1, keepdim=True)) / (out.var(-1, unbiased=False, keepdim=True) + last.eps).sqrt()
    assert torch.allclose(out, centred * last.weight + last.bias, atol=1e-4)


def test_pre_norm_classification_head():
    cfg = model_cfg(norm="pre", num_labels=3)
    clf = LinformerForSequenceClassification(cfg)
    logits = clf(torch.randint(5, 97, (4, 20)), torch.ones(4, 20, dtype=torch.long))
    assert logits.shape == (4, 3)


def test_flops_linformer_is_linear_in_n():
    a = encoder_flops(model_cfg(max_seq_len=1024, k=64), 1024)
    b = encoder_flops(model_cfg(max_seq_len=2048, k=64), 2048)
    full_a = encoder_flops(model_cfg(max_seq_len=1024, attention="full"), 1024)
    full_b = encoder_flops(model_cfg(max_seq_len=2048, attention="full"), 2048)
    assert b == 2 * a
    assert full_b > 2 * full_a


def test_mean_projection_rejects_indivisible_n():
    with pytest.raises(ConfigError, match="needs n divisible by k"):
        model_cfg(projection="mean", k=24)


def test_compiled_blocks_match_eager():
    torch.manual_seed(5)
    cfg = model_cfg(num_layers=1, sharing="layerwise", k=8)
    eager = LinformerForMLM(cfg).eval()
    compiled = LinformerForMLM(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    from linformer_train.model import apply_compile

    apply_compile(compiled)
    ids = torch.randint(5, 97, (2, 64))
    assert (eager(ids) - compiled(ids)).abs().max() < 1e-4


# ---------------------------------------------------------------- what mutation testing found unguarded


@pytest.mark.parametrize("k,n", [(4, 16), (3, 10), (7, 64), (16, 64)])
def test_slots_reached_counts_the_windows_a_length_reaches(k, n):
    from linformer_train.model.attention import slots_reached

    starts = [s * n // k for s in range(k)]                      # window s begins at floor(s n / k)
    lengths = torch.arange(1, n + 1)
    assert slots_reached(lengths, k, n).tolist() == [sum(st < L for st in starts) for L in range(1, n + 1)]


def test_mean_pooling_averages_the_real_tokens_of_each_window():
    from linformer_train.model.attention import MeanPoolProjection

    x = torch.randn(3, 2, 16, 8)                                 # windows of 4 positions
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5] = True                                           # window 1 holds one real token
    mask[1, :16] = True
    mask[2, :1] = True
    pooled, slots = MeanPoolProjection(4, 16)(x * mask[:, None, :, None], mask)  # padding zeroed, as attention does
    assert slots[:, 0, 0].tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert torch.allclose(pooled[0, :, 0], x[0, :, :4].mean(1)) and torch.allclose(pooled[0, :, 1], x[0, :, 4])
    assert torch.allclose(pooled[2, :, 0], x[2, :, 0])
    unmasked, none = MeanPoolProjection(4, 16)(x)                # no mask: every window whole, any batch
    assert none is None and torch.allclose(unmasked, x.view(3, 2, 4, 4, 8).mean(3))


def test_conv_projection_has_no_bias_and_a_fan_in_init():
    torch.manual_seed(0)
    attn = LinformerSelfAttention(256, 4, 0.0, k=8, max_seq_len=64, projection="conv", sharing="headwise",
                                  short_input_scaling="none")
    conv = attn.proj_k.conv
    assert [name for name, _ in attn.proj_k.named_parameters()] == ["conv.weight"]
    fan_in = 64 * 8                                              # Dh inputs x a window of n / k = 8
    assert abs(conv.weight.std().item() * math.sqrt(fan_in) - 1) < 0.05


def test_flops_of_a_short_input_count_only_the_windows_it_reaches():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)}
    for projection, scaling in [("mean", None), ("conv", None), ("linear", "window"), ("linear", "sqrt")]:
        cfg = model_cfg(projection=projection, short_input_scaling=scaling)  # n=64, k=16: windows of 4
        model = LinformerEncoder(cfg).eval()
        with FlopCounterMode(display=False, custom_mapping=sdpa) as counter, torch.no_grad():
            model(torch.randint(5, 97, (1, 21)))                 # 21 tokens reach 6 windows
        assert counter.get_total_flops() == encoder_flops(cfg, 21), (projection, scaling)


@pytest.mark.parametrize("predict_index", [False, True])
def test_mlm_loss_is_the_summed_cross_entropy_at_the_predicted_positions(predict_index):
    torch.manual_seed(0)
    model = LinformerForMLM(model_cfg()).eval()
    ids = torch.randint(5, 97, (2, 64))
    labels = torch.full_like(ids, -100)
    labels[0, [3, 9]] = ids[0, [3, 9]]
    labels[1, [0, 40, 63]] = torch.tensor([7, 8, 9])
    with torch.no_grad():
        logits = model(ids)                                      # (B, L, V)
        index = (labels.reshape(-1) != -100).nonzero().squeeze(1) if predict_index else None
        out = model(ids, labels=labels, **({"predict_index": index} if predict_index else {}))
    sel = labels != -100
    want = torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum")
    assert torch.allclose(out.loss_sum, want, atol=1e-4)
    assert int(out.num_predicted) == 5
    assert int(out.num_correct) == int((logits[sel].argmax(-1) == labels[sel]).sum())
    labels[sel] = logits[sel].argmax(-1)                         # every guess right
    with torch.no_grad():
        assert int(model(ids, labels=labels).num_correct) == 5


def test_classifier_pools_the_first_token_of_the_masked_encoding():
    torch.manual_seed(0)
    cfg = model_cfg(num_labels=3)
    clf = LinformerForSequenceClassification(cfg).eval()
    assert clf.cfg is cfg
    ids = torch.randint(5, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        first = clf.encoder(ids, mask)[:, 0]
        want = clf.classifier(torch.tanh(clf.pool_dense(first)))
        assert torch.allclose(clf(ids, mask), want, atol=1e-6)
        other = ids.clone()
        other[1, 7:] = 5                                         # padding content does not matter
        assert torch.allclose(clf(other, mask)[1], want[1], atol=1e-5)


def test_activation_checkpointing_recomputes_each_block_in_backward():
    model = LinformerForMLM(model_cfg(num_layers=1))
    calls = []
    model.encoder.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))  # a recompute may stop early
    ids = torch.randint(5, 97, (2, 64))
    model(ids, labels=ids).loss_sum.backward()
    assert len(calls) == 1
    apply_activation_checkpointing(model)
    calls.clear()
    model(ids, labels=ids).loss_sum.backward()
    assert len(calls) == 2                                       # the forward, and its recompute


@pytest.mark.parametrize("k,n", [(3, 10), (160, 512), (16, 64)])
def test_window_init_rows_are_the_windows_slots_reached_counts(k, n):
    """Row s averages [floor(s n/k), floor((s+1) n/k)); so every slot a short input reaches holds
    one of its tokens and no other slot does, also when k does not divide n."""
    from linformer_train.model.attention import LinearProjection, slots_reached

    weight = LinearProjection(k, n).weight.detach()
    for s in range(k):
        start, end = s * n // k, (s + 1) * n // k
        assert weight[s].nonzero().squeeze(1).tolist() == list(range(start, end))
        assert torch.allclose(weight[s, start:end], torch.full((end - start,), 1.0 / (end - start)))
    for L in range(1, n + 1):
        reached = int(slots_reached(torch.tensor(L), k, n))
        holds_a_token = (weight[:, :L] != 0).any(1)
        assert holds_a_token[:reached].all() and not holds_a_token[reached:].any(), L
