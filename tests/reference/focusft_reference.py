"""Independent plain-PyTorch reference of FocuSFT (the method of arXiv 2605.09932 as its public reference code runs it).

This module stands alone on purpose: it imports nothing from ``megatron_focusft`` so that a
bug shared with the project's Megatron-Core implementation cannot hide. It favours clarity
over speed: every inner step recomputes the whole model, attention is an explicit softmax over
an explicit boolean mask, and everything runs on ONE unpacked sample.

Conventions
-----------
* ``s``: sequence length, ``H``: hidden size, ``V``: vocabulary, ``F``: MLP (ffn) size,
  ``nh`` / ``nkv``: query / key-value heads, ``hd``: head dim, ``r``: LoRA rank.
* Weights are a plain ``dict[str, Tensor]`` with Hugging Face Llama names and shapes (see
  :func:`init_weights`). The compute dtype follows the weights (float64 supported throughout).
* A boolean attention mask ``mask[q, k]`` is ``True`` where query ``q`` may attend to key ``k``.
* ``loss_mask[t] == 1`` marks a response (assistant) token; ``0`` a context token.
  Next-token labels are shifted: the logit at position ``t`` is scored on token ``t + 1``.
* ``valid[t] == False`` marks padding: it sees nothing, is seen by nothing, is never scored.
* Fast weights: ``dict[(layer, proj), (A, B)]`` with ``proj`` in ``{"gate", "up", "down"}``,
  ``A: [r, in]``, ``B: [out, r]``; the projection output gains ``(alpha / r) * x A^T B^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LlamaConfig",
    "FastWeights",
    "FocusftResult",
    "PROJS",
    "init_weights",
    "adapted_layers",
    "make_fast_init",
    "block_ids",
    "hybrid_mask",
    "causal_mask",
    "context_causal_mask",
    "rms_norm",
    "rope_cos_sin",
    "apply_rope",
    "forward",
    "next_token_ce",
    "response_targets",
    "context_targets",
    "inner_loss",
    "outer_loss",
    "clip_per_tensor",
    "inner_loop",
    "focusft_step",
    "sft_step",
]

PROJS: tuple[str, ...] = ("gate", "up", "down")

FastWeights = dict[tuple[int, str], tuple[Tensor, Tensor]]
"""``{(layer, proj): (A [r, in], B [out, r])}``, proj in ``PROJS``."""


# --------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    """Shape hyper-parameters of the Llama-like decoder."""

    vocab: int = 64
    hidden: int = 32
    ffn: int = 48
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads != 0:
            raise ValueError("heads must be a multiple of kv_heads")
        if self.head_dim % 2 != 0:
            raise ValueError("head_dim must be even for RoPE")


def init_weights(
    config: LlamaConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    std: float = 0.02,
    norm_jitter: float = 0.1,
) -> dict[str, Tensor]:
    """Random HF-Llama-named weights (for tests).

    Shapes: ``embed_tokens.weight`` [V, H]; per layer ``i``:
    ``layers.{i}.input_layernorm.weight`` [H],
    ``layers.{i}.self_attn.q_proj.weight`` [nh*hd, H], ``k_proj``/``v_proj`` [nkv*hd, H],
    ``o_proj`` [H, nh*hd], ``layers.{i}.post_attention_layernorm.weight`` [H],
    ``layers.{i}.mlp.gate_proj.weight`` / ``up_proj`` [F, H], ``down_proj`` [H, F];
    ``norm.weight`` [H]; ``lm_head.weight`` [V, H].

    Linear weights are N(0, std); norm weights are 1 + N(0, norm_jitter) so that a bug that
    ignores a norm weight is visible.
    """
    g = torch.Generator().manual_seed(seed)
    c = config
    H, F_, V = c.hidden, c.ffn, c.vocab
    q_out, kv_out = c.heads * c.head_dim, c.kv_heads * c.head_dim

    def lin(out_f: int, in_f: int) -> Tensor:
        return (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * std).to(dtype)

    def norm() -> Tensor:
        return (1.0 + norm_jitter * torch.randn(H, generator=g, dtype=torch.float64)).to(dtype)

    w: dict[str, Tensor] = {"embed_tokens.weight": lin(V, H)}
    for i in range(c.layers):
        p = f"layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(q_out, H)
        w[p + "self_attn.k_proj.weight"] = lin(kv_out, H)
        w[p + "self_attn.v_proj.weight"] = lin(kv_out, H)
        w[p + "self_attn.o_proj.weight"] = lin(H, q_out)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = lin(F_, H)
        w[p + "mlp.up_proj.weight"] = lin(F_, H)
        w[p + "mlp.down_proj.weight"] = lin(H, F_)
    w["norm.weight"] = norm()
    w["lm_head.weight"] = lin(V, H)
    return w


# --------------------------------------------------------------------------------------------
# Fast weights
# --------------------------------------------------------------------------------------------


def adapted_layers(num_layers: int, layer_fraction: float = 0.35) -> list[int]:
    """Indices of the layers that carry fast weights: ``int(L * (1 - f)) .. L-1``."""
    first = int(num_layers * (1 - layer_fraction))
    return list(range(first, num_layers))


def _proj_shape(config: LlamaConfig, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of the MLP projection ``proj``."""
    if proj in ("gate", "up"):
        return config.hidden, config.ffn
    if proj == "down":
        return config.ffn, config.hidden
    raise ValueError(f"unknown projection {proj!r}")


def make_fast_init(
    config: LlamaConfig,
    seed: int,
    *,
    rank: int = 32,
    layer_fraction: float = 0.35,
    dtype: torch.dtype = torch.float64,
) -> FastWeights:
    """Fresh fast weights from a seed: ``A ~ kaiming_uniform(a=sqrt(5))`` (as ``nn.Linear``
    initialises a weight of shape [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in))), ``B = 0``.

    Draw order: layers ascending, then ``gate, up, down``; one CPU generator seeded ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    fast: FastWeights = {}
    for layer in adapted_layers(config.layers, layer_fraction):
        for proj in PROJS:
            in_f, out_f = _proj_shape(config, proj)
            a = torch.empty(rank, in_f, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            fast[(layer, proj)] = (a.to(dtype), torch.zeros(out_f, rank, dtype=dtype))
    return fast


def _check_fast(
    fast: FastWeights, config: LlamaConfig, rank: int, layer_fraction: float
) -> None:
    """Raise unless ``fast`` has exactly the expected keys and shapes."""
    expected = {(l, p) for l in adapted_layers(config.layers, layer_fraction) for p in PROJS}
    if set(fast) != expected:
        raise ValueError(f"fast-weight keys {sorted(fast)} != expected {sorted(expected)}")
    for (layer, proj), (a, b) in fast.items():
        in_f, out_f = _proj_shape(config, proj)
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise ValueError(
                f"fast weight {(layer, proj)}: A {tuple(a.shape)} B {tuple(b.shape)}, "
                f"expected A {(rank, in_f)} B {(out_f, rank)}"
            )


def _detached_copy(fast: FastWeights) -> FastWeights:
    return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in fast.items()}


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _as_valid(loss_mask: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    return valid.to(torch.bool)


def block_ids(loss_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Block index [s] (long) of each token: maximal runs of equal ``loss_mask`` value over the
    valid tokens, numbered 0, 1, 2, ... in order. Padding gets -1 and does not split runs."""
    lm = loss_mask.to(torch.long)
    v = _as_valid(loss_mask, valid)
    out = torch.full(lm.shape, -1, dtype=torch.long, device=lm.device)
    idx = v.nonzero().flatten()
    if idx.numel() == 0:
        return out
    vals = lm[idx]
    change = torch.zeros_like(vals)
    change[1:] = (vals[1:] != vals[:-1]).to(torch.long)
    out[idx] = torch.cumsum(change, 0)
    return out


def hybrid_mask(loss_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """FocuSFT hybrid mask [s, s] (bool) of one sample.

    ``q`` may see ``k`` iff both are valid and: ``k``'s block is earlier than ``q``'s; or both
    are in the same context (0-run) block (bidirectional); or both are in the same response
    (1-run) block and ``k <= q`` (causal). Later blocks are never visible.
    """
    s = loss_mask.shape[0]
    v = _as_valid(loss_mask, valid)
    blk = block_ids(loss_mask, v)
    is_ctx = loss_mask.to(torch.long) == 0
    pos = torch.arange(s, device=loss_mask.device)
    bq, bk = blk[:, None], blk[None, :]
    earlier = bk < bq
    same = bk == bq
    causal = pos[None, :] <= pos[:, None]
    m = earlier | (same & (is_ctx[:, None] | causal))
    return m & v[:, None] & v[None, :]


def causal_mask(s: int, valid: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Plain causal mask [s, s] (bool): ``k <= q``, restricted to valid tokens."""
    pos = torch.arange(s, device=device)
    m = pos[None, :] <= pos[:, None]
    if valid is not None:
        v = valid.to(torch.bool)
        m = m & v[:, None] & v[None, :]
    return m


def context_causal_mask(loss_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mask [s, s] for the ``context`` inner objective: the hybrid mask with each context block
    made causal instead of bidirectional (response blocks and earlier-block visibility as in
    the hybrid mask).

    Since earlier blocks lie at earlier positions and response blocks are already causal, this
    is exactly the plain causal mask over the valid tokens; it is built from the block rule
    here (not by calling :func:`causal_mask`) so the tests can check that identity.
    """
    s = loss_mask.shape[0]
    v = _as_valid(loss_mask, valid)
    blk = block_ids(loss_mask, v)
    pos = torch.arange(s, device=loss_mask.device)
    bq, bk = blk[:, None], blk[None, :]
    m = (bk < bq) | ((bk == bq) & (pos[None, :] <= pos[:, None]))
    return m & v[:, None] & v[None, :]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * w`` computed in fp32 (fp64 for
    fp64 inputs), cast back to ``x.dtype``. x: [..., H], weight: [H]."""
    cd = _compute_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cd)
    return y.to(x.dtype)


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [s, hd] for the non-interleaved (rotate_half) RoPE.

    ``inv_freq[j] = base^(-2j/hd)`` for j < hd/2; ``angle[t, j] = pos[t] * inv_freq[j]``;
    the table is duplicated: ``cat([angle, angle], -1)``. Computed in float64, cast to dtype.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(half, dtype=torch.float64, device=positions.device) * 2 / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (first half / second half pairing)."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [n, s, hd]; cos/sin: [s, hd]. Returns ``x * cos + rotate_half(x) * sin``."""
    return x * cos[None] + _rotate_half(x) * sin[None]


def _attention(x: Tensor, w: dict[str, Tensor], prefix: str, c: LlamaConfig,
               mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GQA self-attention. x: [s, H] (already normed); mask: [s, s] bool. Returns [s, H].

    Query head ``h`` uses key/value head ``h // (nh / nkv)``. Softmax in >= fp32; a row with
    no visible key (padding) outputs zeros instead of NaN.
    """
    s = x.shape[0]
    nh, nkv, hd = c.heads, c.kv_heads, c.head_dim
    q = (x @ w[prefix + "q_proj.weight"].T).view(s, nh, hd).transpose(0, 1)    # [nh, s, hd]
    k = (x @ w[prefix + "k_proj.weight"].T).view(s, nkv, hd).transpose(0, 1)   # [nkv, s, hd]
    v = (x @ w[prefix + "v_proj.weight"].T).view(s, nkv, hd).transpose(0, 1)   # [nkv, s, hd]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = nh // nkv
    k = k.repeat_interleave(group, dim=0)                                      # [nh, s, hd]
    v = v.repeat_interleave(group, dim=0)
    cd = _compute_dtype(x.dtype)
    scores = (q.to(cd) @ k.to(cd).transpose(-1, -2)) / math.sqrt(hd)          # [nh, s, s]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1)[None, :, None], probs, torch.zeros_like(probs))
    out = (probs.to(x.dtype) @ v).transpose(0, 1).reshape(s, nh * hd)         # [s, nh*hd]
    return out @ w[prefix + "o_proj.weight"].T


def _lora_linear(x: Tensor, weight: Tensor, ab: tuple[Tensor, Tensor] | None, scale: float) -> Tensor:
    """``x W^T + scale * (x A^T) B^T``; x: [s, in], W: [out, in], A: [r, in], B: [out, r]."""
    y = x @ weight.T
    if ab is not None:
        a, b = ab
        y = y + scale * ((x @ a.T) @ b.T)
    return y


def _mlp(x: Tensor, w: dict[str, Tensor], prefix: str, layer: int,
         fast: FastWeights | None, scale: float) -> Tensor:
    """SwiGLU MLP with optional fast weights: ``down(silu(gate(x)) * up(x))``. x: [s, H]."""
    fw = fast or {}
    gate = _lora_linear(x, w[prefix + "gate_proj.weight"], fw.get((layer, "gate")), scale)
    up = _lora_linear(x, w[prefix + "up_proj.weight"], fw.get((layer, "up")), scale)
    h = F.silu(gate) * up
    return _lora_linear(h, w[prefix + "down_proj.weight"], fw.get((layer, "down")), scale)


def forward(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    mask: Tensor,
    *,
    positions: Tensor | None = None,
    fast: FastWeights | None = None,
    lora_scale: float = 2.0,
) -> Tensor:
    """Logits [s, V] (dtype of the weights) of one sequence.

    tokens: [s] long; mask: [s, s] bool (True = may attend); positions: [s] (default
    ``arange(s)``); fast: optional fast weights, applied as ``lora_scale * x A^T B^T`` on the
    MLP projections of their layers. If ``lm_head.weight`` is absent the embedding is tied.
    """
    c = config
    s = tokens.shape[0]
    if positions is None:
        positions = torch.arange(s, device=tokens.device)
    emb = weights["embed_tokens.weight"]
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base, emb.dtype)
    x = emb[tokens]                                                            # [s, H]
    for i in range(c.layers):
        p = f"layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], c.norm_eps)
        x = x + _attention(h, weights, p + "self_attn.", c, mask, cos, sin)
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], c.norm_eps)
        x = x + _mlp(h, weights, p + "mlp.", i, fast, lora_scale)
    x = rms_norm(x, weights["norm.weight"], c.norm_eps)
    head = weights.get("lm_head.weight", emb)
    return x @ head.T


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def response_targets(loss_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """[s-1] bool: position t is scored (on token t+1) iff token t+1 is a valid response token."""
    v = _as_valid(loss_mask, valid)
    return (loss_mask[1:].to(torch.long) == 1) & v[1:] & v[:-1]


def context_targets(loss_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """[s-1] bool: position t is scored (on token t+1) iff token t+1 is a valid context token
    (whatever token t is; token 0 is never a target)."""
    v = _as_valid(loss_mask, valid)
    return (loss_mask[1:].to(torch.long) == 0) & v[1:] & v[:-1]


def next_token_ce(logits: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
    """Token-mean next-token cross-entropy (0-dim, in >= fp32, cast to the logits dtype).

    logits: [s, V]; tokens: [s]; targets: [s-1] bool (``targets[t]``: score logit t on
    token t+1). ``sum / max(n, 1)``: a sample with no target gives 0 (still with a graph).
    """
    cd = _compute_dtype(logits.dtype)
    logp = torch.log_softmax(logits[:-1].to(cd), dim=-1)                      # [s-1, V]
    nll = -logp.gather(-1, tokens[1:, None]).squeeze(-1)                      # [s-1]
    w = targets.to(cd)
    loss = (nll * w).sum() / w.sum().clamp_min(1.0)
    return loss.to(logits.dtype)


def inner_loss(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    loss_mask: Tensor,
    fast: FastWeights,
    *,
    objective: str = "response",
    lora_scale: float = 2.0,
    valid: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Inner objective (0-dim).

    ``response``: CE on response targets under the hybrid mask (identical to the outer loss).
    ``context``: CE on context targets under :func:`context_causal_mask` (== plain causal).
    """
    if objective == "response":
        mask, targets = hybrid_mask(loss_mask, valid), response_targets(loss_mask, valid)
    elif objective == "context":
        mask, targets = context_causal_mask(loss_mask, valid), context_targets(loss_mask, valid)
    else:
        raise ValueError(f"unknown inner objective {objective!r}")
    logits = forward(weights, config, tokens, mask, positions=positions, fast=fast,
                     lora_scale=lora_scale)
    return next_token_ce(logits, tokens, targets)


def outer_loss(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    loss_mask: Tensor,
    fast: FastWeights | None,
    *,
    lora_scale: float = 2.0,
    valid: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Outer (SFT) loss (0-dim): response-token-mean next-token CE under the hybrid mask, with
    ``fast`` (may be None) active exactly as given (no detaching done here)."""
    logits = forward(weights, config, tokens, hybrid_mask(loss_mask, valid),
                     positions=positions, fast=fast, lora_scale=lora_scale)
    return next_token_ce(logits, tokens, response_targets(loss_mask, valid))


# --------------------------------------------------------------------------------------------
# Inner loop and the FocuSFT step
# --------------------------------------------------------------------------------------------


def clip_per_tensor(g: Tensor, clip: float | None) -> Tensor:
    """``g * clip / (||g|| + 1e-12)`` when ``||g|| > clip`` (L2 norm of the whole tensor), else
    ``g``. ``clip`` None or <= 0 disables clipping."""
    if clip is None or clip <= 0:
        return g
    n = torch.linalg.vector_norm(g)
    if n > clip:
        return g * (clip / (n + 1e-12))
    return g


@dataclass
class FocusftResult:
    """Result of :func:`focusft_step` on one sample.

    loss: outer loss (0-dim), graph to the slow weights only (fast weights are constants).
    inner_losses: inner-objective value before each inner step's update, then one more value
        after the last update (``inner_steps + 1`` floats); ``[]`` if the inner loop was
        skipped because the sample has no target token for the objective.
    skipped_steps: inner steps skipped because their loss was NaN/Inf.
    inner_skipped: True iff the inner loop was skipped (no target token for the objective).
    fast_weights: adapted fast weights (detached).
    initial_fast_weights: detached copy of the fast weights the inner loop started from.
    update_norm: global L2 norm over all A and B of (adapted - initial).
    num_outer_tokens / num_inner_tokens: scored tokens of the outer / inner objective.
    """

    loss: Tensor
    inner_losses: list[float]
    skipped_steps: int
    inner_skipped: bool
    fast_weights: FastWeights
    initial_fast_weights: FastWeights
    update_norm: float
    num_outer_tokens: int
    num_inner_tokens: int
    grad_norms: list[dict[tuple[int, str, str], float]] = field(default_factory=list)


def inner_loop(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    loss_mask: Tensor,
    fast_init: FastWeights,
    *,
    inner_steps: int = 2,
    inner_lr: float = 1.0,
    clip: float | None = 1.0,
    objective: str = "response",
    lora_scale: float = 2.0,
    valid: Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[FastWeights, list[float], int, bool, list[dict[tuple[int, str, str], float]]]:
    """Plain SGD on the fast weights; the slow weights are used detached.

    Per step: evaluate the inner loss; if NaN/Inf, count the step as skipped and leave the fast
    weights unchanged; else for every A and B: ``p <- p - lr * clip_per_tensor(grad, clip)``.
    After the last step the loss is evaluated once more (no update). If the sample has no
    target token for ``objective`` nothing runs.

    Returns (adapted fast weights [detached], inner losses, skipped-step count,
    inner-loop-skipped flag, per-step pre-clip gradient norms keyed (layer, proj, "A"|"B")).
    """
    slow = {k: v.detach() for k, v in weights.items()}
    fast = _detached_copy(fast_init)
    if objective not in ("response", "context"):
        raise ValueError(f"unknown inner objective {objective!r}")
    targets = (response_targets if objective == "response" else context_targets)(loss_mask, valid)
    if int(targets.sum()) == 0:
        return fast, [], 0, True, []

    def loss_of(fw: FastWeights) -> Tensor:
        return inner_loss(slow, config, tokens, loss_mask, fw, objective=objective,
                          lora_scale=lora_scale, valid=valid, positions=positions)

    losses: list[float] = []
    grad_norms: list[dict[tuple[int, str, str], float]] = []
    skipped = 0
    keys = list(fast)
    for _ in range(inner_steps):
        leaves = {k: (a.requires_grad_(True), b.requires_grad_(True)) for k, (a, b) in fast.items()}
        loss = loss_of(leaves)
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss.detach()):
            skipped += 1
            fast = _detached_copy(leaves)
            grad_norms.append({})
            continue
        params = [t for k in keys for t in leaves[k]]
        grads = torch.autograd.grad(loss, params)
        new: FastWeights = {}
        norms: dict[tuple[int, str, str], float] = {}
        for j, k in enumerate(keys):
            a, b = leaves[k]
            ga, gb = grads[2 * j], grads[2 * j + 1]
            norms[(k[0], k[1], "A")] = float(torch.linalg.vector_norm(ga))
            norms[(k[0], k[1], "B")] = float(torch.linalg.vector_norm(gb))
            new[k] = ((a - inner_lr * clip_per_tensor(ga, clip)).detach(),
                      (b - inner_lr * clip_per_tensor(gb, clip)).detach())
        grad_norms.append(norms)
        fast = new
    with torch.no_grad():
        losses.append(float(loss_of(fast)))
    return fast, losses, skipped, False, grad_norms


def focusft_step(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    loss_mask: Tensor,
    fast_init: FastWeights | int,
    *,
    inner_steps: int = 2,
    inner_lr: float = 1.0,
    clip: float | None = 1.0,
    objective: str = "response",
    rank: int = 32,
    alpha: float = 64,
    layer_fraction: float = 0.35,
    valid: Tensor | None = None,
    positions: Tensor | None = None,
) -> FocusftResult:
    """One FocuSFT step on ONE unpacked sample.

    tokens: [s] long; loss_mask: [s] (1 = response); fast_init: fast weights
    ``{(layer, proj): (A [r, in], B [out, r])}`` (primary path; validated against the config,
    ``rank`` and ``layer_fraction``) or an int seed for :func:`make_fast_init` (dtype of the
    weights). valid: optional [s] bool (False = padding); positions: optional [s].

    1. Inner loop (:func:`inner_loop`) on the fast weights with the slow weights detached.
    2. Outer loss (:func:`outer_loss`) with the adapted fast weights as constants: its graph
       reaches the slow weights only (full stop-gradient through the inner loop).
    """
    dtype = weights["embed_tokens.weight"].dtype
    if isinstance(fast_init, int):
        fast0 = make_fast_init(config, fast_init, rank=rank, layer_fraction=layer_fraction, dtype=dtype)
    else:
        fast0 = fast_init
    _check_fast(fast0, config, rank, layer_fraction)
    scale = alpha / rank
    fast0 = _detached_copy(fast0)
    adapted, losses, skipped, inner_skipped, gnorms = inner_loop(
        weights, config, tokens, loss_mask, fast0, inner_steps=inner_steps, inner_lr=inner_lr,
        clip=clip, objective=objective, lora_scale=scale, valid=valid, positions=positions)
    adapted = _detached_copy(adapted)
    loss = outer_loss(weights, config, tokens, loss_mask, adapted, lora_scale=scale,
                      valid=valid, positions=positions)
    sq = sum(float(((a1 - a0).pow(2).sum() + (b1 - b0).pow(2).sum()))
             for (a1, b1), (a0, b0) in zip(adapted.values(), (fast0[k] for k in adapted)))
    inner_t = (response_targets if objective == "response" else context_targets)(loss_mask, valid)
    return FocusftResult(
        loss=loss,
        inner_losses=losses,
        skipped_steps=skipped,
        inner_skipped=inner_skipped,
        fast_weights=adapted,
        initial_fast_weights=fast0,
        update_norm=math.sqrt(sq),
        num_outer_tokens=int(response_targets(loss_mask, valid).sum()),
        num_inner_tokens=int(inner_t.sum()),
        grad_norms=gnorms,
    )


def sft_step(
    weights: dict[str, Tensor],
    config: LlamaConfig,
    tokens: Tensor,
    loss_mask: Tensor,
    *,
    valid: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Plain SFT loss (0-dim) under the hybrid mask, no fast weights. Equals
    ``focusft_step(..., inner_steps=0).loss`` (B = 0 adds exactly 0)."""
    return outer_loss(weights, config, tokens, loss_mask, None, valid=valid, positions=positions)
