"""Self-tests of the independent FocuSFT reference (tests/reference/focusft_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference.focusft_reference import (
    LlamaConfig,
    adapted_layers,
    apply_rope,
    causal_mask,
    clip_per_tensor,
    context_causal_mask,
    context_targets,
    focusft_step,
    forward,
    hybrid_mask,
    init_weights,
    inner_loss,
    make_fast_init,
    next_token_ce,
    outer_loss,
    response_targets,
    rope_cos_sin,
    sft_step,
)

CFG = LlamaConfig(vocab=64, hidden=32, ffn=48, layers=3, heads=4, kv_heads=2, head_dim=8)
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
KW = dict(rank=RANK, alpha=ALPHA)

# context (5) | response (4) | context (3) | response (4)
LOSS_MASK = torch.tensor([0] * 5 + [1] * 4 + [0] * 3 + [1] * 4)
S = LOSS_MASK.numel()


def _tokens(seed: int = 1, s: int = S) -> torch.Tensor:
    return torch.randint(0, CFG.vocab, (s,), generator=torch.Generator().manual_seed(seed))


def _weights(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    w = init_weights(CFG, seed=0, dtype=torch.float64, std=0.2)
    if requires_grad:
        for t in w.values():
            t.requires_grad_(True)
    return w


def _fast(seed: int = 3):
    return make_fast_init(CFG, seed, rank=RANK, dtype=torch.float64)


def _m(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


# ------------------------------------------------------------------------------------- masks


def test_hybrid_mask_hand_case_1():
    # blocks: C{0,1} R{2,3} C{4} R{5}
    lm = torch.tensor([0, 0, 1, 1, 0, 1])
    expected = _m([
        "110000",
        "110000",
        "111000",
        "111100",
        "111110",
        "111111",
    ])
    assert torch.equal(hybrid_mask(lm), expected)


def test_hybrid_mask_hand_case_2():
    # blocks: C{0,1,2} R{3,4} C{5,6} R{7}
    lm = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1])
    expected = _m([
        "11100000",
        "11100000",
        "11100000",
        "11110000",
        "11111000",
        "11111110",
        "11111110",
        "11111111",
    ])
    assert torch.equal(hybrid_mask(lm), expected)


def test_hybrid_mask_hand_case_3_response_first_and_padding():
    # blocks: R{0,1} C{2,3} R{4}, token 5 is padding
    lm = torch.tensor([1, 1, 0, 0, 1, 0])
    valid = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    expected = _m([
        "100000",
        "110000",
        "111100",
        "111100",
        "111110",
        "000000",
    ])
    assert torch.equal(hybrid_mask(lm, valid), expected)


def test_causal_and_context_causal_masks():
    lm = torch.tensor([0, 0, 1, 1, 0, 1])
    valid = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    expected = _m([
        "100000",
        "110000",
        "111000",
        "111100",
        "111110",
        "000000",
    ])
    assert torch.equal(causal_mask(6, valid), expected)
    assert torch.equal(context_causal_mask(lm, valid), expected)
    # the hybrid mask with causal context blocks is exactly the causal mask, for any loss mask
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lm = torch.randint(0, 2, (11,), generator=g)
        assert torch.equal(context_causal_mask(lm), causal_mask(11))
        # and the hybrid mask only adds bidirectional context on top of causal
        hm = hybrid_mask(lm)
        assert torch.equal(hm & causal_mask(11), causal_mask(11))


def test_targets():
    lm = torch.tensor([1, 0, 1, 1, 0, 0])
    # logit t scored on token t+1
    assert response_targets(lm).tolist() == [False, True, True, False, False]
    assert context_targets(lm).tolist() == [True, False, False, True, True]


# ------------------------------------------------------------------------------------- model


def test_rope_rotate_half_pairing():
    # head_dim 4: dims (0, 2) rotate by angle pos*1, dims (1, 3) by pos*base^(-1/2)
    base = 100.0
    cos, sin = rope_cos_sin(torch.tensor([3]), 4, base, torch.float64)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    y = apply_rope(x, cos, sin)[0, 0]
    a0, a1 = 3 * 1.0, 3 * base ** -0.5
    exp = torch.tensor([
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ], dtype=torch.float64)
    torch.testing.assert_close(y, exp, rtol=1e-14, atol=1e-14)


def test_rope_relative_position_invariance():
    w, tok = _weights(), _tokens()
    m = hybrid_mask(LOSS_MASK)
    a = forward(w, CFG, tok, m, positions=torch.arange(S))
    b = forward(w, CFG, tok, m, positions=torch.arange(S) + 37)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gqa_grouping_matches_expanded_mha():
    w, tok = _weights(), _tokens()
    mha = LlamaConfig(**{**CFG.__dict__, "kv_heads": CFG.heads})
    group, hd = CFG.heads // CFG.kv_heads, CFG.head_dim
    w2 = dict(w)
    for i in range(CFG.layers):
        for n in ("k_proj", "v_proj"):
            k = f"layers.{i}.self_attn.{n}.weight"
            w2[k] = w[k].view(CFG.kv_heads, hd, -1).repeat_interleave(group, 0).reshape(-1, CFG.hidden)
    m = hybrid_mask(LOSS_MASK)
    torch.testing.assert_close(forward(w, CFG, tok, m), forward(w2, mha, tok, m), rtol=1e-12, atol=1e-12)


def test_padding_is_inert():
    w, tok, fast = _weights(), _tokens(), _fast()
    pad = 5
    tok_p = torch.cat([tok, torch.zeros(pad, dtype=torch.long)])
    lm_p = torch.cat([LOSS_MASK, torch.zeros(pad, dtype=torch.long)])
    valid = torch.arange(S + pad) < S
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, **KW)
    rp = focusft_step(w, CFG, tok_p, lm_p, fast, valid=valid, **KW)
    assert torch.isfinite(rp.loss)
    torch.testing.assert_close(r.loss, rp.loss, rtol=1e-12, atol=1e-12)
    for k in r.fast_weights:
        torch.testing.assert_close(r.fast_weights[k][1], rp.fast_weights[k][1], rtol=1e-10, atol=1e-12)
    lp = forward(w, CFG, tok_p, hybrid_mask(lm_p, valid))
    assert torch.isfinite(lp).all()


# ------------------------------------------------------------------------------ fast weights


def test_seed_init():
    f = _fast(seed=7)
    assert adapted_layers(3) == [1, 2] and adapted_layers(40) == list(range(26, 40))
    assert set(f) == {(l, p) for l in (1, 2) for p in ("gate", "up", "down")}
    for (l, p), (a, b) in f.items():
        fan_in = CFG.ffn if p == "down" else CFG.hidden
        assert a.shape == (RANK, fan_in) and not torch.all(a == 0)
        assert a.abs().max() <= 1 / math.sqrt(fan_in)
        assert torch.count_nonzero(b) == 0
    g = _fast(seed=7)
    assert all(torch.equal(f[k][0], g[k][0]) for k in f)
    # gate and up get different A
    assert not torch.equal(f[(1, "gate")][0], f[(1, "up")][0])


def test_zero_B_gives_exact_base_output():
    w, tok, fast = _weights(), _tokens(), _fast()
    m = hybrid_mask(LOSS_MASK)
    assert torch.equal(forward(w, CFG, tok, m, fast=fast, lora_scale=SCALE), forward(w, CFG, tok, m))


def test_inner_steps_zero_equals_sft():
    w, tok, fast = _weights(), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=0, **KW)
    assert torch.equal(r.loss, sft_step(w, CFG, tok, LOSS_MASK))
    assert r.update_norm == 0.0 and r.skipped_steps == 0
    assert len(r.inner_losses) == 1 and r.inner_losses[0] == pytest.approx(float(r.loss), rel=1e-12)


def test_first_step_moves_only_B():
    w, tok, fast = _weights(), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=1, **KW)
    for k, (a0, b0) in fast.items():
        a1, b1 = r.fast_weights[k]
        assert torch.equal(a1, a0)
        assert torch.count_nonzero(b1) > 0
    assert r.update_norm > 0
    # the second step moves A as well
    r2 = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=2, **KW)
    assert any(not torch.equal(r2.fast_weights[k][0], fast[k][0]) for k in fast)


def test_clip_per_tensor_unit():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(clip_per_tensor(g, 1.0), g * (1.0 / (5.0 + 1e-12)))
    assert torch.equal(clip_per_tensor(g, 5.0), g)           # ||g|| == clip: not clipped
    assert torch.equal(clip_per_tensor(g, 10.0), g)
    assert torch.equal(clip_per_tensor(g, None), g)


def test_clipping_in_inner_step():
    w, tok, fast = _weights(), _tokens(), _fast()
    lr = 0.5
    # reference gradients at the initial fast weights, computed independently
    leaves = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in fast.items()}
    loss = inner_loss(w, CFG, tok, LOSS_MASK, leaves, lora_scale=SCALE)
    keys = list(leaves)
    grads_b = torch.autograd.grad(loss, [leaves[k][1] for k in keys])
    norms = [float(torch.linalg.vector_norm(g)) for g in grads_b]
    clip = sorted(norms)[len(norms) // 2]  # some tensors above the clip, some at/below
    assert max(norms) > clip and min(norms) < clip
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=1, inner_lr=lr, clip=clip, **KW)
    n_clipped = 0
    for k, g, n in zip(keys, grads_b, norms):
        b1 = r.fast_weights[k][1]  # B0 = 0, so b1 = -lr * clipped grad
        if n > clip:
            n_clipped += 1
            assert float(torch.linalg.vector_norm(b1)) == pytest.approx(lr * clip, rel=1e-10)
            torch.testing.assert_close(b1, -lr * g * clip / n, rtol=1e-9, atol=1e-14)
        else:
            torch.testing.assert_close(b1, -lr * g, rtol=1e-9, atol=1e-14)
        assert r.grad_norms[0][(k[0], k[1], "B")] == pytest.approx(n, rel=1e-9)
    assert n_clipped > 0


def test_nan_step_is_skipped_and_counted():
    w, tok, fast = _weights(), _tokens(), _fast()
    lr = 1e200  # step 1 is finite, but its update makes step 2's loss overflow
    r1 = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=1, inner_lr=lr, **KW)
    r3 = focusft_step(w, CFG, tok, LOSS_MASK, fast, inner_steps=3, inner_lr=lr, **KW)
    assert math.isfinite(r3.inner_losses[0])
    assert not math.isfinite(r3.inner_losses[1]) and not math.isfinite(r3.inner_losses[2])
    assert r3.skipped_steps == 2 and r1.skipped_steps == 0
    assert len(r3.inner_losses) == 4
    for k in fast:  # the skipped steps did not touch the fast weights
        assert torch.equal(r3.fast_weights[k][0], r1.fast_weights[k][0])
        assert torch.equal(r3.fast_weights[k][1], r1.fast_weights[k][1])


def test_no_target_token_skips_inner_loop():
    w, tok, fast = _weights(), _tokens(), _fast()
    lm = torch.zeros(S, dtype=torch.long)
    r = focusft_step(w, CFG, tok, lm, fast, **KW)
    assert r.inner_skipped and r.inner_losses == [] and r.skipped_steps == 0
    assert r.update_norm == 0.0 and float(r.loss) == 0.0 and r.num_outer_tokens == 0
    # context objective with no context target: only token 0 is context
    lm = torch.tensor([0] + [1] * (S - 1))
    r = focusft_step(w, CFG, tok, lm, fast, objective="context", **KW)
    assert r.inner_skipped and r.inner_losses == [] and r.num_inner_tokens == 0
    assert r.num_outer_tokens == S - 1


# ------------------------------------------------------------------------------- objectives


def test_response_inner_loss_equals_outer_at_init():
    w, tok, fast = _weights(), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, **KW)
    assert r.inner_losses[0] == pytest.approx(float(sft_step(w, CFG, tok, LOSS_MASK)), rel=1e-12)
    # the last inner loss is the outer loss (same objective, same mask, same fast weights)
    assert r.inner_losses[-1] == pytest.approx(float(r.loss), rel=1e-12)
    assert len(r.inner_losses) == 3


def test_context_objective_is_causal_lm_on_context_tokens():
    w, tok, fast = _weights(), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, objective="context", **KW)
    # manual: causal mask, score logit t on token t+1 for every context token t+1 >= 1
    logits = forward(w, CFG, tok, causal_mask(S))
    logp = torch.log_softmax(logits, -1)
    ts = [t for t in range(S - 1) if LOSS_MASK[t + 1] == 0]
    assert ts == [0, 1, 2, 3, 8, 9, 10]  # t=8 is the last response token predicting context
    manual = -sum(float(logp[t, tok[t + 1]]) for t in ts) / len(ts)
    assert r.inner_losses[0] == pytest.approx(manual, rel=1e-12)
    assert r.num_inner_tokens == len(ts) and r.num_outer_tokens == 8
    # the outer loss keeps the hybrid mask
    torch.testing.assert_close(
        r.loss, outer_loss(w, CFG, tok, LOSS_MASK, r.fast_weights, lora_scale=SCALE), rtol=0, atol=0)
    # and the context objective differs from the same CE under the hybrid mask
    hyb = next_token_ce(forward(w, CFG, tok, hybrid_mask(LOSS_MASK)), tok, context_targets(LOSS_MASK))
    assert abs(float(hyb) - manual) > 1e-6


# ------------------------------------------------------------------------------ outer gradient


def test_outer_gradient_treats_fast_weights_as_constants():
    w, tok, fast = _weights(requires_grad=True), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, **KW)
    assert all(not a.requires_grad and not b.requires_grad for a, b in r.fast_weights.values())
    names = list(w)
    g = torch.autograd.grad(r.loss, [w[n] for n in names])
    fixed = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in r.fast_weights.items()}
    ref = outer_loss(w, CFG, tok, LOSS_MASK, fixed, lora_scale=SCALE)
    torch.testing.assert_close(r.loss, ref, rtol=0, atol=0)
    g_ref = torch.autograd.grad(ref, [w[n] for n in names])
    for n, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=n)
    # non-vacuous: the adapted fast weights change the gradient versus plain SFT
    g_sft = torch.autograd.grad(sft_step(w, CFG, tok, LOSS_MASK), [w[n] for n in names])
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(g, g_sft))


def test_outer_gradient_finite_difference_float64():
    w, tok, fast = _weights(requires_grad=True), _tokens(), _fast()
    r = focusft_step(w, CFG, tok, LOSS_MASK, fast, **KW)
    fixed = r.fast_weights
    checks = [
        ("embed_tokens.weight", (int(tok[3]), 5)),
        ("layers.0.self_attn.q_proj.weight", (6, 7)),
        ("layers.1.self_attn.k_proj.weight", (2, 3)),
        ("layers.2.mlp.gate_proj.weight", (4, 9)),
        ("layers.2.mlp.down_proj.weight", (10, 11)),
        ("layers.1.post_attention_layernorm.weight", (12,)),
        ("lm_head.weight", (int(tok[7]), 1)),
    ]
    grads = torch.autograd.grad(r.loss, [w[n] for n, _ in checks])
    eps = 1e-6
    base = {k: v.detach().clone() for k, v in w.items()}
    for (name, idx), g in zip(checks, grads):
        vals = []
        for sgn in (1.0, -1.0):
            wp = dict(base)
            t = base[name].clone()
            t[idx] += sgn * eps
            wp[name] = t
            vals.append(float(outer_loss(wp, CFG, tok, LOSS_MASK, fixed, lora_scale=SCALE)))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert float(g[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9), name
        assert abs(fd) > 1e-8, name  # the check is not vacuous
