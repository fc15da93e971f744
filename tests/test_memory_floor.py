"""The training-memory floor behind the trainer's up-front refusal: its parameter count is the real
model's largest matrices, and each term of the bytes, worked out by hand for one configuration."""

from __future__ import annotations

import pytest

from linformer_train.config import config_from_dict
from linformer_train.model import LinformerForMLM
from linformer_train.model.memory import MemoryFloor, min_parameters, training_memory_floor


def cfg(**kw):
    model = dict(preset=None, vocab_size=100, hidden_size=4, num_heads=2, ffn_size=8, num_layers=2,
                 max_seq_len=8, k=4)
    model.update(kw)
    return config_from_dict({"model": model}).model


@pytest.mark.parametrize("kw", [{}, dict(sharing="none", num_layers=3), dict(vocab_size=257, max_seq_len=16)])
def test_min_parameters_are_the_models_embeddings_and_dense_matrices(kw):
    c = cfg(**kw)
    model = LinformerForMLM(c)
    enc = model.encoder
    matrices = [enc.tokens.weight, enc.positions.weight, model.head_dense.weight]
    for layer in enc.layers:
        matrices += [layer.attn.qkv.weight, layer.attn.out.weight, layer.ffn_in.weight, layer.ffn_out.weight]
    assert min_parameters(c) == sum(m.numel() for m in matrices)
    assert min_parameters(c) < sum(p.numel() for p in model.parameters())  # biases, norms, E/F left out


# vocab 100, D=4, F=8, 2 layers, n=8: P = 100*4 + 8*4 + 2*(4*16 + 2*4*8) + 16 = 704 parameters
P = 704


def test_bf16_zero2_on_four_ranks_by_hand():
    floor = training_memory_floor(cfg(), micro_batch=2, dtype="bf16", zero_stage=2, ranks=4)
    assert floor.params == P
    # 2 B weights (whole below stage 3), 2 B gradients / 4 ranks, 16 B fp32 copy and moments / 4 ranks
    assert floor.device_states == P * 2 + P * 2 / 4 + P * 16 / 4 == 4576
    assert floor.host_states == 0
    # 2 x 8 tokens x D=4 x 2 B x 6 states x 2 layers, and the fp32 logits of 15% of the tokens
    assert floor.activations == 16 * 4 * 2 * 6 * 2 + 0.15 * 16 * 100 * 4 == 2496
    assert floor.device_total == 4576 + 2496


@pytest.mark.parametrize("stage,weights,grads,optim", [(0, 4, 4, 8), (1, 4, 4, 2), (2, 4, 1, 2), (3, 1, 1, 2)])
def test_fp32_bytes_per_parameter_by_zero_stage(stage, weights, grads, optim):
    floor = training_memory_floor(cfg(), 1, "fp32", stage, ranks=4)
    assert floor.device_states == P * (weights + grads + optim)


def test_offload_moves_states_to_the_host_and_checkpointing_keeps_one_state_a_layer():
    both = training_memory_floor(cfg(), 2, "bf16", 3, ranks=2, offload_optimizer=True, offload_params=True)
    assert both.host_states == P * 16 / 2 + P * 2 / 2
    assert both.device_states == P * 2 / 2                      # the gradients alone stay
    optim_only = training_memory_floor(cfg(), 2, "bf16", 1, ranks=2, offload_optimizer=True)
    assert (optim_only.host_states, optim_only.device_states) == (P * 16 / 2, P * 2 + P * 2)
    plain = training_memory_floor(cfg(), 2, "fp16", 0, 1, mask_prob=0.5)
    ckpt = training_memory_floor(cfg(), 2, "fp16", 0, 1, activation_checkpointing=True, mask_prob=0.5)
    logits = 0.5 * 16 * 100 * 4
    assert plain.activations - logits == 6 * (ckpt.activations - logits) == 6 * 16 * 4 * 2 * 2
    assert isinstance(plain, MemoryFloor)
