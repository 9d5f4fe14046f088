"""HST v8.2 Crystalline: Poincare embeddings, exact Diamond coupling, causal Hebbian fast weights, a routed path
lattice and a feedback loop, all strictly causal and with decoding equal to the full forward.

What it combines, bottom to top:
- Poincare token embedding (Nickel & Kiela 2017; maps of Ganea et al. 2018): the table holds tangent vectors at
  the origin; exp_0 makes each row a point of the ball (fp32, safe clamps, the same numbers under autocast). The
  ball does its work in the tied output head, on by default (`hyperbolic_head`): token v scores
  b_v - d_c(exp_0(W_p LN_f h), exp_0(e_v)) / T, minus a Poincare distance, from one matmul over augmented rows
  (ball_rows / ball_cols). `readout(z, flat=True)` scores the same weights by the flat distance the formula tends
  to as the curvature goes to 0, to measure what the ball does. The input is x_0 = sqrt(d) log_0(exp_0(e_id)) +
  PLPE(pos), which is the tangent vector itself inside radius ~6 and a smooth norm clip beyond.
- Pell-Lucas positional encoding (core.PellLucasPE) and, with `sparse_attention=True`, the causal Pell-Lucas
  block-sparse mask (core.pell_lucas_block_mask; block-sparse attention as in Child et al. 2019), used
  identically by training and cached decoding.
- n_layers // 2 bottom blocks [pre-norm attention -> Diamond coupling -> causal Hebbian fast weights], then the
  Hyper-Lattice (routed linear paths), the feedback loop, the remaining top blocks, LN_f and the tied head
  (Press & Wolf 2017).
- Diamond Mixer as an exact additive coupling (NICE / RevNet, Dinh et al. 2015, Gomez et al. 2017): split,
  orthogonal butterfly, w' = w + F(z), z' = z + G(w'), inverse butterfly. A bijection with unit Jacobian
  determinant and an `inverse`; F and G end in zero-initialised layers, so it starts as the identity.
- Hebbian fast weights: the fast weights of Ba et al. 2016 as the fast-weight programmer / linear attention of
  Schlag et al. 2021 (phi = elu + 1, Katharopoulos et al. 2020) with a per-head decay and a normaliser, so o_t is
  a convex combination of past values. Training uses the exact chunked-parallel form; decoding carries the (M, z)
  state, so the layer keeps learning inside a context.
- Hyper-Lattice: y = x + W_o sum_{j in top-k} p_j (LN(x) W_j) over P routed d x d paths, computed as one
  grouped GEMM over (token, path) pairs sorted by path (torch._grouped_mm behind a custom op with its own
  autograd, so it compiles), never a d x d matrix per token; Switch load-balance (Fedus et al. 2021) and router
  z-loss (ST-MoE, Zoph et al. 2022) auxiliaries.
- Feedback loop: two fixed GRU refinement steps per token, input anchored to LN(x_t), zero-initialised
  output, so it starts as the identity and never mixes positions.
- Horizon head: offsets k = 2..H as rank-r adapters h + U_k V_k^T LN(h) (LoRA-style, Hu et al. 2021) read by the
  tied head, at every position (in training, offsets >= 2 are scored at fresh random positions, about
  `horizon_sample` heads' worth of rows for all offsets together, in one readout call); an uncertainty u_{t,k} = softplus(MLP(LN h_t)) regresses the
  realised loss of offset k, and Output.acceptance = sigmoid(a_k + logit(exp(-s_k u_k))) turns it into the
  probability that offset k's draft passes greedy verification (a_k, s_k fitted by BCE: Platt scaling that starts
  at exp(-u)). Speculative decoding (generate.plan_drafts) reads that acceptance, corrected by the acceptance its
  drafts realise in the same generation, to draft the length that maximises the expected tokens per verification
  cost (best_draft_length), from the heads or prompt lookup, or nothing; drafts are verified losslessly
  (Leviathan et al. 2023; Chen et al. 2023).

What it does differently from the original, and why:
- Everything is causal (the original Hebbian layer summed over future tokens), training = decoding (the Hebbian
  state is carried and rolled back exactly; the original kept none, so decoding differed from the full forward),
  no clamped positions (the original clamped at 511).
- The mixer is really invertible (the original was a GELU FFN with a post-LN), the embedding really uses the
  ball (the original L2-normalised to 0.999), the lattice fits in memory (the original gathered [B,S,4,d,d]),
  the horizon head is about 1.5 M parameters at d = 768 instead of the original's 787 M Linear(2d, V*H), and is
  trained at every position on aligned targets (the original trained offsets 1..4 from the last position on
  tokens it had already seen, and its loss pushed the uncertainty to zero whatever the error).
- Small liberties, each for a stated reason: the Hebbian write strength beta reads LN(x) like q, k, v (pre-norm
  everywhere); the uncertainty probe reads a detached h, so predicting the loss never reshapes the trunk.
- No document-id masking: this repo trains every model on nanoGPT-style windows without document
  ids, so attention, fast weights and horizon targets run across <|endoftext|> like every other model here.

Longer notes: docs/v8_chaoslogic.md
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

import core

POINCARE_EPS = 1e-5       # points stay at sqrt(c) |p| <= 1 - eps: strictly inside the ball in fp32
UNCERTAINTY_HIDDEN = 64   # width of the uncertainty MLP d -> 64 -> H
GROUP_SENTINELS = 3       # zero rows per lattice path, so no group of the grouped GEMM has 1 to 3 rows


# -----------------------------------------------------------------------------
# Poincare ball, all in fp32 (near the boundary lower precisions round points onto it). Every map upcasts its
# inputs and turns autocast off for its matmul, so it gives the same fp32 result inside bf16 / fp16 autocast.

def _safe_norm(x):
    """|x| with a floor of 1e-15 applied before the square root, so the gradient at x = 0 is finite (zero)."""
    return (x * x).sum(-1, keepdim=True).clamp_min(1e-30).sqrt()


def exp0(e, c=1.0):
    """Tangent vector at the origin -> point of the ball: tanh(sqrt(c)|e|) e / (sqrt(c)|e|), fp32. The tanh is
    capped at 1 - eps, which rescales any point past norm (1 - eps)/sqrt(c) back to it, written without a second
    norm."""
    e = e.float()
    sc, n = math.sqrt(c), _safe_norm(e)
    return torch.tanh(sc * n).clamp(max=1 - POINCARE_EPS) / (sc * n) * e


def exp0_gap(e, c=1.0):
    """1 - c|exp0(e)|^2 (..., 1), from the tangent norm: sech^2(sqrt(c)|e|) = 4 sigmoid(2a) sigmoid(-2a), floored
    at the cap's 1 - (1 - eps)^2. Near the boundary 1 - c|p|^2 computed from p's coordinates loses most of its
    digits (1 - 0.99999^2 in fp32); this keeps them, so the distance head is as accurate there as inside."""
    a = 2 * math.sqrt(c) * _safe_norm(e.float())
    return (4 * torch.sigmoid(a) * torch.sigmoid(-a)).clamp_min(POINCARE_EPS * (2 - POINCARE_EPS))


def log0(p, c=1.0):
    """Point of the ball -> tangent vector at the origin: artanh(min(sqrt(c)|p|, 1 - eps)) p / (sqrt(c)|p|), fp32."""
    p = p.float()
    sc, n = math.sqrt(c), _safe_norm(p)
    return torch.atanh((sc * n).clamp(max=1 - POINCARE_EPS)) / (sc * n) * p


def poincare_distance(x, y, c=1.0):
    """d_c(x, y) = (2/sqrt(c)) artanh(sqrt(c)|x - y| / sqrt(1 - 2c<x,y> + c^2 |x|^2 |y|^2)), element-wise over the
    broadcast leading axes, fp32. The difference is formed directly, so d(x, x) is exactly 0 (the acosh form is
    not)."""
    x, y = x.float(), y.float()
    sc = math.sqrt(c)
    diff = ((x - y) ** 2).sum(-1).sqrt()
    denom = (1 - 2 * c * (x * y).sum(-1) + c * c * (x * x).sum(-1) * (y * y).sum(-1)).clamp_min(1e-30).sqrt()
    return 2 / sc * torch.atanh((sc * diff / denom).clamp(max=1 - POINCARE_EPS))


BALL_ALIGN = 8   # ball rows and columns are zero-padded to a multiple of 8 wide: the CPU GEMM ran the head's products
                 # 7-17 % slower at widths 130 and 386 than at 136 and 392 (fwd + both backward products, 2 cores)


def ball_width(d):
    """Width of the augmented rows and columns for points of dimension d: d + 2, rounded up to BALL_ALIGN."""
    return -(-(d + 2) // BALL_ALIGN) * BALL_ALIGN


def _ball_augment(x, a, b):
    """[x, a, b, 0...] (N, ball_width(D)) from x (N, D) and the columns a, b (N, 1): the augmented layout of the
    head's rows and columns, zero-padded to BALL_ALIGN."""
    return torch.cat([x, a, b, a.new_zeros(x.size(0), ball_width(x.size(-1)) - x.size(-1) - 2)], -1)


def ball_rows(x, c=1.0, gap=None):
    """Points x (N, D) of the ball -> (N, ball_width(D)) rows c [x, |x|^2, 1, 0...] / (1 - c|x|^2), fp32 (see
    poincare_distance_matrix). gap (N, 1): 1 - c|x|^2 from exp0_gap where the points came from exp0 (more accurate
    near the boundary)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        xx = (x * x).sum(-1, keepdim=True)
        gap = 1 - c * xx if gap is None else gap.float()
        return _ball_augment(x, xx, torch.ones_like(xx)) * (c / gap)


def ball_cols(y, c=1.0, gap=None):
    """Points y (V, D) of the ball -> (V, ball_width(D)) columns [-2y, 1, |y|^2, 0...] / (1 - c|y|^2), fp32."""
    with torch.autocast(y.device.type, enabled=False):
        y = y.float()
        yy = (y * y).sum(-1, keepdim=True)
        gap = 1 - c * yy if gap is None else gap.float()
        return _ball_augment(-2 * y, torch.ones_like(yy), yy) / gap


def _table_scalars(sq_norm, c):
    """|e|^2 (V, 1) of tangent vectors e -> ((f, g, h), their derivatives d/d|e|^2), each (V, 1), with
    ball_cols(exp0(e), c, exp0_gap(e)) = [f e, g, h, 0...]: the map depends on e only through its norm, so every
    column but e's scale is a function of one number per row. Same clamps as exp0 and exp0_gap (the norm floored
    at 1e-15, the tanh capped at 1 - eps, the gap floored), and zero derivatives where they hold, as autograd
    through those maps gives. With x = sqrt(c) |e|: f = -2 tanh(x) / (x gap), g = 1 / gap, h = tanh(x)^2 / (c gap),
    gap = sech(x)^2; d tanh / dx = sech^2, d (1 / gap) / dx = 2 tanh / gap."""
    sc, floor = math.sqrt(c), POINCARE_EPS * (2 - POINCARE_EPS)
    n = sq_norm.clamp_min(1e-30).sqrt()
    x = sc * n
    th = torch.tanh(x)
    t = th.clamp(max=1 - POINCARE_EPS)                                  # sqrt(c) |exp0(e)|
    sech2 = 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x)
    inv_gap = 1 / sech2.clamp_min(floor)
    d_inv = torch.where(sech2 >= floor, 2 * th * inv_gap, 0.0)          # d / dx, zero where the floor holds
    d_t = torch.where(th <= 1 - POINCARE_EPS, sech2, 0.0)               # zero where the cap holds
    dx = torch.where(sq_norm >= 1e-30, sc / (2 * n), 0.0)               # dx / d|e|^2
    values = (-2 * t / x * inv_gap, inv_gap, t * t / c * inv_gap)
    derivs = (-2 * ((d_t * x - t) / (x * x) * inv_gap + t / x * d_inv) * dx, d_inv * dx,
              (2 * t * d_t * inv_gap + t * t * d_inv) / c * dx)
    return values, derivs


class BallTable(torch.autograd.Function):
    """(tangent table W (V, D), c) -> ball_cols(exp0(W), c, exp0_gap(W)) (V, ball_width(D)), fp32: the head's
    right operand from the tied table, every step. Composed from those maps, autograd keeps and revisits about
    twenty (V, D) tensors (490 ms forward + backward at V = 50,304, D = 384 on 2 cores, the largest cost after
    the head's products). Every column is e's own scale f(|e|) e or a function of |e| (_table_scalars), so here
    the forward is three (V, D) passes (the norms, the copy, its scaling) and the backward three (G_e . e,
    f G_e + 2 (dL/d|e|^2) e) in one (V, D) buffer; everything else is on (V, 1) tensors."""

    @staticmethod
    def forward(ctx, weight, c):
        e = weight.float()
        sq_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True).square_()
        (f, g, h), _ = _table_scalars(sq_norm, c)
        out = _ball_augment(e, g, h)
        out[:, :e.size(1)] *= f
        ctx.save_for_backward(weight, sq_norm)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, sq_norm = ctx.saved_tensors
        e, D = weight.float(), weight.size(1)
        grad_e = grad[:, :D]
        (f, _, _), (df, dg, dh) = _table_scalars(sq_norm, ctx.c)
        out = torch.mul(grad_e, e)                   # G_e * e, then the result in the same (V, D) buffer
        dot = out.sum(-1, keepdim=True)                                           # G_e . e (V, 1)
        d_sq = dot * df + grad[:, D:D + 1] * dg + grad[:, D + 1:D + 2] * dh       # dL / d|e|^2
        return torch.mul(grad_e, f, out=out).addcmul_(e, 2 * d_sq).to(weight.dtype), None


HALF_Q_FLOOR = 1e-12      # q/2 at or below this is taken as 0 (coincident points, where rounding can make |x - y|^2
                          # <= 0), and the distance's derivative there as 0, as the subgradient of |x - y| at 0


def floor_half_q_(half_q):
    """The product's q/2 (N, V), in place, with everything at or below HALF_Q_FLOOR set to 0. No ceiling is
    needed: for points of the ball (1 - c|x|^2 floored at 2e-5 by exp0_gap and the cap) q/2 <= 4 / (2e-5)^2 = 1e10,
    far below where twice_asinh_sqrt_'s h (1 + h) overflows fp32 (1.8e19)."""
    return torch.threshold_(half_q, HALF_Q_FLOOR, 0.0)


def twice_asinh_sqrt_(half_q, P=None, out=None):
    """half_q = h >= 0 -> (2 asinh(sqrt(h)), P): 2 asinh(sqrt(h)) = log1p(2 (h + P)) with
    P = sqrt(h (1 + h)), which is asinh(s) = log(s + sqrt(1 + s^2)) squared inside the log:
    (sqrt(h) + sqrt(1 + h))^2 = 1 + 2h + 2P. Every term is positive, so the result keeps its relative accuracy near
    0 (fp32 error as torch.asinh's, 2e-7 relative against float64), and P is the derivative's own:
    d asinh(sqrt(h)) / dh = 1 / (2P). Five vectorised passes, about 4x faster on a CPU than torch.asinh, which the
    distance head calls on every (row, token) pair. The result goes to out, or over half_q; P to the buffer P when
    given (a chunked caller reuses its buffers rather than allocating, and page-faulting, each time)."""
    P = torch.addcmul(half_q, half_q, half_q, out=P).sqrt_()                    # out=None: a fresh tensor
    return torch.add(half_q, P, out=half_q if out is None else out).mul_(2).log1p_(), P


def asinh_sqrt_(half_q):
    """half_q >= 0 -> asinh(sqrt(half_q)), over half_q (twice_asinh_sqrt_'s, halved)."""
    return twice_asinh_sqrt_(half_q)[0].mul_(0.5)


def ball_chunk_rows(vocab_size):
    """Rows per chunk of BallLogSumExp: about 32M logits (664 rows at V = 50,304), four times core's chunked
    passes, because its element-wise work goes by blocks (below) and only its products see the chunk, which run
    at 108 GFLOP/s with 160 rows and 171 with 512 (2 CPU cores, width 136)."""
    return max(16, (1 << 25) // vocab_size // 8 * 8)


def ball_block_rows(vocab_size):
    """Rows per block of BallLogSumExp's element-wise work on a CPU: about 1M logits (4 MB), so a block's three
    (rows, V) tensors stay in the last-level cache, in whole blocks of 8 rows."""
    return max(8, (1 << 20) // vocab_size // 8 * 8)


def ball_distances(rows, cols, c=1.0):
    """ball_rows (N, W), ball_cols (V, W) -> (N, V) Poincare distances, fp32: the product is q/2, and
    d = acosh(1 + q) / sqrt(c) = (2 / sqrt(c)) asinh(sqrt(q/2))."""
    with torch.autocast(rows.device.type, enabled=False):
        return twice_asinh_sqrt_(floor_half_q_(rows.float() @ cols.float().t()))[0].mul_(1 / math.sqrt(c))


class BallLogits(torch.autograd.Function):
    """(half_q (N, V), bias (V,), k ()) -> bias - k asinh(sqrt(half_q)) (half_q at the floor taken as 0): the
    distance head's element-wise part, with k = 2 / (sqrt(c) T). In-place passes, and the backward keeps only
    a = asinh(sqrt(q/2)) (da/dh = 1 / sinh(2a), zero where the floor holds) instead of autograd's four (N, V)
    tensors: on CPU the head's element-wise work is most of its cost, and (N, V) tensors most of its memory."""

    @staticmethod
    def forward(ctx, half_q, bias, k):
        a = asinh_sqrt_(floor_half_q_(half_q.clone()))
        ctx.save_for_backward(a, k)
        return torch.addcmul(bias, a, -k)

    @staticmethod
    def backward(ctx, grad):
        a, k = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.needs_input_grad[1] else None
        grad_k = -(grad * a).sum() if ctx.needs_input_grad[2] else None
        grad_half_q = None
        if ctx.needs_input_grad[0]:
            grad_half_q = (2 * a).sinh_()
            torch.div(grad, grad_half_q, out=grad_half_q)
            grad_half_q = grad_half_q.masked_fill_(a <= 0, 0.0).mul_(-k)
        return grad_half_q, grad_bias, grad_k


class BallLogSumExp(torch.autograd.Function):
    """(rows (N, W), cols (V, W), bias (V,), k ()) with logits = bias - k asinh(sqrt(rows cols^T)), as BallLogits,
    -> (sum_r a_r lse_r - b_r logits[r, index_r], lse, pick, argmax, logits or None), a chunk of rows at a time
    with each chunk's gradients taken at once (core.linear_lse_loss's scheme for the distance head): no (N, V)
    tensor is kept for the backward. With keep > 0 the logits of the first keep rows are also written out, once,
    without a graph (the main head's, for the caller to read, when its rows and the offsets' share the pass).

    Each chunk's products run over all its rows (the CPU GEMM is fastest with many), and its element-wise work a
    block of `block` rows at a time, so a block's three (rows, V) buffers stay in the CPU's cache through the
    dozen passes over them instead of each pass streaming a chunk from memory (1.2x faster at V = 50,304, 2 cores).
    On a GPU a block is the chunk. Per block, after the floor: P = sqrt(h (1 + h)) and the distance from it
    (twice_asinh_sqrt_), the logits, torch's fused softmax, the blocked max (lse = max - log p_max), and for the
    gradients a_r p, its column sums and its dot with the logits (the bias's and k's gradients), and a_r p / P,
    zero where the floor made P = 0 (nan_to_num): d dist / d(q/2) = 1 / (2P). The constant -k/2 and the
    one-hot's -b_r are applied to the (rows, W) side of the products, not to (rows, V)."""

    @staticmethod
    def forward(ctx, rows, cols, bias, k, index, a, b, chunk, grad_enabled, keep=0, block=None):
        ctx.set_materialize_grads(False)   # no (N, V) zeros for the kept logits' absent gradient (core's pass too)
        b = a if b is None else b
        N, V = rows.size(0), cols.size(0)
        block = block or (ball_block_rows(V) if rows.device.type == "cpu" else chunk)
        need = [grad_enabled and ctx.needs_input_grad[i] for i in range(4)]
        lse, pick, argmax = rows.new_empty(N), rows.new_empty(N), index.new_empty(N)
        out = rows.new_empty(keep, V) if keep else None
        g_rows = torch.empty_like(rows) if need[0] else None
        g_cols = None   # the first chunk's product starts it: no pass to zero a (V, W) buffer
        g_bias = None
        # sum_r a_r p_r . logits_r and sum_r a_r p_r: with dist = (bias - logits) / k, they give k's gradient, so
        # the logits can overwrite the distances
        p_sum, p_logits = torch.zeros_like(bias), torch.zeros((), device=rows.device)
        P_pick = rows.new_empty(N)                                  # P at each row's target, for the one-hot
        neg_half_k = -k / 2                                         # logits = bias - k/2 (2 asinh(sqrt(h)))
        grads = need[0] or need[1]
        # one (chunk, V) buffer serves every chunk (fresh ones per chunk cost more in page faults than the
        # element-wise passes that fill them): the product of a chunk not kept, and each chunk's a_r p / P for
        # the gradients' products, written over the logits once they are read. A kept chunk's product goes
        # straight to out, where its logits end. P and p live one block. Chunks never straddle the kept rows' end
        work = rows.new_empty(min(chunk, max(N - keep, keep if grads else 0)), V)
        buf_P, buf_p = (rows.new_empty(min(block, chunk, N), V) for _ in range(2))
        for lo, hi in core.chunk_spans(N, chunk, keep):
            rc = rows[lo:hi]
            q = torch.mm(rc, cols.t(), out=out[lo:hi] if lo < keep else work[:hi - lo])
            for j, je in core.chunk_spans(hi - lo, block):
                r = slice(lo + j, lo + je)
                logits, P, p = q[j:je], buf_P[:je - j], buf_p[:je - j]
                twice_asinh_sqrt_(floor_half_q_(logits), P)                    # 2 dist, P = sqrt(h (1 + h))
                torch.addcmul(bias, logits, neg_half_k, out=logits)
                torch.ops.aten._softmax.out(logits, -1, False, out=p)
                top, top_i = core.row_max(logits)                              # for the lse and the argmax
                lse[r] = top - p.gather(1, top_i[:, None])[:, 0].log()         # p_max = exp(max - lse)
                pick[r] = logits.gather(1, index[r, None])[:, 0]
                argmax[r] = top_i
                if not any(need):
                    continue
                p.mul_(a[r, None])                                             # d total / d logits, less the one-hot
                if need[2] or need[3]:
                    p_sum += p.sum(0)
                if need[3]:
                    p_logits += torch.dot(p.view(-1), logits.reshape(-1))
                if grads:
                    P_pick[r] = P.gather(1, index[r, None])[:, 0]
                    torch.div(p, P, out=work[j:je]).nan_to_num_(0.0, 0.0, 0.0)  # a_r p / P, 0 where P = 0
            if grads:
                g, ic, P_i = work[:hi - lo], index[lo:hi], P_pick[lo:hi]
                one_hot = torch.where(P_i > 0, b[lo:hi] / P_i, 0.0)[:, None]  # the target's -b_r, over its P
                if need[0]:
                    torch.mm(g, cols, out=g_rows[lo:hi]).sub_(one_hot * cols[ic])
                if need[1]:
                    g_cols = g.t() @ rc if g_cols is None else g_cols.addmm_(g.t(), rc)
                    g_cols.index_add_(0, ic, one_hot * rc, alpha=-1.0)
        g_k = None
        if need[2] or need[3]:
            g_bias = p_sum.index_add_(0, index, -b)                     # sum over rows of d total / d logits
            # d total / dk = -sum g_logits dist, and dist = (bias - logits) / k
            g_k = (p_logits - b @ pick - bias @ g_bias) / k if need[3] else None
        total = (a * lse - b * pick).sum()
        # the gradients are this pass's own tensors, scaled in place by the incoming gradient in backward (a
        # fresh (V, W) product there costs a page-faulted allocation per step); so backward runs once
        ctx.save_for_backward(None if g_rows is None else g_rows.mul_(neg_half_k),
                              None if g_cols is None else g_cols.mul_(neg_half_k), g_bias if need[2] else None, g_k)
        ctx.backpropagated = False
        ctx.mark_non_differentiable(lse, pick, argmax, *([out] if keep else []))
        return total, lse, pick, argmax, out

    @staticmethod
    def backward(ctx, g_total, *_):
        if g_total is None:
            return (None,) * 11
        if ctx.backpropagated:
            raise RuntimeError("the distance head's chunked pass was already backpropagated: retain_graph is not "
                               "supported through it, run the forward again")
        ctx.backpropagated = True
        return tuple(None if g is None else g.mul_(g_total) for g in ctx.saved_tensors) + (None,) * 7


def poincare_distance_matrix(x, y, c=1.0, gap_x=None, gap_y=None):
    """x (N, D), y (V, D) -> (N, V) distances, fp32, from ONE (N, D+2) x (D+2, V) matmul and three element-wise
    passes. With q = 2c|x - y|^2 / ((1 - c|x|^2)(1 - c|y|^2)), d = acosh(1 + q) / sqrt(c), and q/2 is the product of
    the augmented rows c [x, |x|^2, 1] / (1 - c|x|^2) and [-2y, 1, |y|^2] / (1 - c|y|^2). For distant points (the
    bulk of a vocabulary) this is far better conditioned than the artanh form, whose argument sits next to 1: the
    matmul's rounding, which differs between a batch and a single row, stays ~1e-7 relative. gap_x (N, 1),
    gap_y (V, 1): 1 - c|.|^2 from exp0_gap where the points came from exp0."""
    return ball_distances(ball_rows(x, c, gap_x), ball_cols(y, c, gap_y), c)


# -----------------------------------------------------------------------------
# attention: core's dense causal attention, or the causal Pell-Lucas block-sparse pattern

class PellLucasSelfAttention(core.MaskedSelfAttention):
    """Query block i reads key block j iff i - j in {0, 1} U {Q_n} or j = 0, inside the token-level causal mask.
    The mask is a function of absolute positions only, so a decoding call builds exactly the training rows."""

    def __init__(self, d_model, n_heads, block, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, bias, dropout)
        self.block = block

    def mask(self, start_pos, T, S, device):
        return core.pell_lucas_block_mask(torch.arange(start_pos, start_pos + T, device=device),
                                          torch.arange(S, device=device), self.block)


# -----------------------------------------------------------------------------
# Diamond Mixer as an exact additive coupling

class CouplingMLP(nn.Module):
    """LN(d/2) -> Linear(d/2 -> 2d) -> GELU -> Linear(2d -> d/2); the last layer starts at zero."""

    def __init__(self, d_model, bias=False):
        super().__init__()
        half = d_model // 2
        self.ln = core.LayerNorm(half, bias)
        self.fc = nn.Linear(half, 2 * d_model, bias=bias)
        self.proj = nn.Linear(2 * d_model, half, bias=bias)
        nn.init.zeros_(self.proj.weight)   # the coupling starts as the identity (Model re-zeros it after init)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class DiamondCoupling(nn.Module):
    """u = [a; b] -> butterfly z = (a+b)/sqrt2, w = (b-a)/sqrt2 ("synthesis / analysis") -> w' = w + F(z),
    z' = z + G(w') -> [(z'-w')/sqrt2; (z'+w')/sqrt2]. Each coupling adds a function of the other half only, so the
    Jacobian is unit-triangular in the butterfly basis and the butterfly is orthogonal: det J = 1 exactly."""

    def __init__(self, d_model, bias=False):
        super().__init__()
        self.F = CouplingMLP(d_model, bias)
        self.G = CouplingMLP(d_model, bias)

    @staticmethod
    def _butterfly(a, b):
        return (a + b) / math.sqrt(2), (b - a) / math.sqrt(2)

    def forward(self, u):
        z, w = self._butterfly(*u.chunk(2, -1))
        w = w + self.F(z)
        z = z + self.G(w)
        return torch.cat([(z - w) / math.sqrt(2), (z + w) / math.sqrt(2)], -1)

    def inverse(self, y):
        z, w = self._butterfly(*y.chunk(2, -1))
        z = z - self.G(w)
        w = w - self.F(z)
        return torch.cat([(z - w) / math.sqrt(2), (z + w) / math.sqrt(2)], -1)


# -----------------------------------------------------------------------------
# causal Hebbian fast weights
#
# M_t = lam M_{t-1} + beta_t phi(k_t) v_t^T, z_t = lam z_{t-1} + beta_t phi(k_t), o_t = M_t^T phi(q_t) / (z_t^T phi(q_t)
# + 1e-6): every weight beta_s lam^(t-s) phi(q_t).phi(k_s) is >= 0, so o_t is a (sub-)convex combination of v_{<=t}.
# Decay powers are formed as exp(n log lam) with n >= 0 only: no lam^(-s) that could overflow.

def fast_weight_state(phi_k, v, beta, log_decay, state=None):
    """The state after the given tokens, directly: M = lam^T M_0 + sum_s lam^(T-1-s) beta_s phi(k_s) v_s^T.
    phi_k, v (B, H, T, F), beta (B, H, T), log_decay (H,), state (M (B, H, F, F), z (B, H, F)) or None."""
    T = phi_k.size(2)
    steps = torch.arange(T - 1, -1, -1, device=phi_k.device, dtype=phi_k.dtype)            # T-1-s
    weight = torch.exp(steps * log_decay[:, None])[None] * beta                             # (B, H, T)
    M = torch.einsum("bhs,bhsf,bhsg->bhfg", weight, phi_k, v)
    z = torch.einsum("bhs,bhsf->bhf", weight, phi_k)
    if state is not None:
        carry = torch.exp(T * log_decay)[None, :, None]
        M, z = M + carry[..., None] * state[0], z + carry * state[1]
    return M, z


def fast_weight_scan(phi_q, phi_k, v, beta, log_decay, state=None, chunk=64):
    """Exact chunked-parallel form of the recurrence: inside a chunk of C tokens the kernel
    (phi(Q) phi(K)^T * D) V with D_ts = beta_s lam^(t-s) [s <= t]; between chunks the (M, z) at each chunk start,
    from a decayed sum over earlier chunks (one small (n x n) matrix, no loop). T need not be a multiple of C: the
    tail is padded with beta = 0, which writes nothing. Returns o (B, H, T, F) and the state after the T tokens."""
    B, H, T, Fd = phi_q.shape
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    # contiguous first: a zero pad of a strided input keeps its strides in eager but not in the compiler's
    # fake tensors, and the reshape below would then be traced as an invalid view
    q, k, vv = (F.pad(t.contiguous(), (0, 0, 0, pad)).reshape(B, H, n, C, Fd) for t in (phi_q, phi_k, v))
    b = F.pad(beta.contiguous(), (0, pad)).reshape(B, H, n, C)
    ld = log_decay.to(phi_q.dtype)
    i = torch.arange(C, device=phi_q.device)
    rel = (i[:, None] - i[None, :]).to(phi_q.dtype)                                         # t - s inside a chunk
    intra = torch.where(rel >= 0, torch.exp(rel.clamp_min(0) * ld[:, None, None]), 0.0)     # (H, C, C)
    A = (q @ k.transpose(-1, -2)) * intra[None, :, None] * b[:, :, :, None, :]              # (B, H, n, C, C)
    num, den = A @ vv, A.sum(-1)                                                            # (B, H, n, C, F), (.., C)
    # chunk summaries: what chunk c adds to the state at its end
    to_end = torch.exp((C - 1 - i).to(phi_q.dtype) * ld[:, None])[None, :, None] * b       # (B, H, n, C)
    dM = torch.einsum("bhnc,bhncf,bhncg->bhnfg", to_end, k, vv)
    dz = torch.einsum("bhnc,bhncf->bhnf", to_end, k)
    c = torch.arange(n, device=phi_q.device)
    gap = (c[:, None] - 1 - c[None, :]).to(phi_q.dtype)                                     # chunks between c' and c
    across = torch.where(gap >= 0, torch.exp(gap.clamp_min(0) * C * ld[:, None, None]), 0.0)  # (H, n, n)
    M_start = torch.einsum("hnm,bhmfg->bhnfg", across, dM)
    z_start = torch.einsum("hnm,bhmf->bhnf", across, dz)
    if state is not None:
        carry = torch.exp(c.to(phi_q.dtype) * C * ld[:, None])[None]                        # (1, H, n)
        M_start = M_start + carry[..., None, None] * state[0][:, :, None]
        z_start = z_start + carry[..., None] * state[1][:, :, None]
    q_decayed = q * torch.exp((i + 1).to(phi_q.dtype) * ld[:, None])[None, :, None, :, None]
    num = num + q_decayed @ M_start
    den = den + (q_decayed * z_start[:, :, :, None]).sum(-1)
    o = (num / (den[..., None] + 1e-6)).reshape(B, H, n * C, Fd)[:, :, :T]
    return o, fast_weight_state(phi_k, v, beta, ld, state)


def fast_weight_recurrent(phi_q, phi_k, v, beta, log_decay, state=None):
    """The recurrence one token at a time: the reference the chunked form is tested against."""
    B, H, T, Fd = phi_q.shape
    lam = torch.exp(log_decay.to(phi_q.dtype))[None, :, None]
    M, z = state if state is not None else (phi_q.new_zeros(B, H, Fd, Fd), phi_q.new_zeros(B, H, Fd))
    out = []
    for t in range(T):
        kt = beta[:, :, t, None] * phi_k[:, :, t]
        M = lam[..., None] * M + kt[..., None] * v[:, :, t, None, :]
        z = lam * z + kt
        qt = phi_q[:, :, t]
        out.append((qt[..., None] * M).sum(-2) / ((qt * z).sum(-1, keepdim=True) + 1e-6))
    return torch.stack(out, 2), (M, z)


class HebbianCache:
    """Decoding state of one Hebbian layer, rolled back exactly and cheaply. By absolute position, like a KV
    cache: phi(k), v and beta of every token (so truncate(n) only moves `length`), plus ONE checkpoint (M, z) of the
    state before position `checkpoint_pos`. A call at start_pos s advances the checkpoint to s from the logged
    tokens and then moves it to s, the START of the call: speculative decoding truncates to at least s + 1
    afterwards, so the checkpoint stays valid. A truncate below it resets it to position 0 with a zero state."""

    def __init__(self, batch_size, n_heads, max_len, head_dim, device):
        f32 = dict(device=device, dtype=torch.float32)
        self.phi_k = torch.zeros(batch_size, n_heads, max_len, head_dim, **f32)
        self.v = torch.zeros(batch_size, n_heads, max_len, head_dim, **f32)
        self.beta = torch.zeros(batch_size, n_heads, max_len, **f32)
        self.M = torch.zeros(batch_size, n_heads, head_dim, head_dim, **f32)
        self.z = torch.zeros(batch_size, n_heads, head_dim, **f32)
        self.checkpoint_pos = 0
        self.length = 0

    def state_at(self, s, log_decay):
        """(M, z) after tokens 0..s-1, from the checkpoint and the logged tokens between it and s."""
        if s > self.length:
            raise RuntimeError(f"Hebbian state requested at {s}, but only {self.length} positions are logged")
        if s < self.checkpoint_pos:
            self.reset_checkpoint()
        P = self.checkpoint_pos
        if s == P:
            return self.M, self.z
        return fast_weight_state(self.phi_k[:, :, P:s], self.v[:, :, P:s], self.beta[:, :, P:s], log_decay,
                                 (self.M, self.z))

    def write(self, start_pos, phi_k, v, beta, state):
        T = phi_k.size(2)
        if start_pos + T > self.phi_k.size(2):
            raise RuntimeError(f"Hebbian cache holds {self.phi_k.size(2)} positions; writing {T} at {start_pos} "
                               f"overflows it")
        self.phi_k[:, :, start_pos:start_pos + T] = phi_k
        self.v[:, :, start_pos:start_pos + T] = v
        self.beta[:, :, start_pos:start_pos + T] = beta
        self.length = start_pos + T
        self.M, self.z, self.checkpoint_pos = state[0], state[1], start_pos

    def reset_checkpoint(self):
        self.M, self.z, self.checkpoint_pos = torch.zeros_like(self.M), torch.zeros_like(self.z), 0

    def truncate(self, n):
        self.length = min(self.length, n)
        if n < self.checkpoint_pos:
            self.reset_checkpoint()

    def nbytes(self):
        return sum(t.nelement() * t.element_size() for t in (self.phi_k, self.v, self.beta, self.M, self.z))


class HebbianFastWeights(nn.Module):
    """y_t = x_t + W_o(sigmoid(W_g h_t) * o_t), h = LN(x); heads = n_heads with d_f = head_dim; q, k, v = W h;
    phi = elu + 1 on q/sqrt(d_f), k/sqrt(d_f); write strength beta_t = sigmoid(w_beta h_t + b) per head; decay
    lam_h = sigmoid(theta_h), log-spaced in [0.9, 0.999] at init (time constants 10..1000 tokens)."""

    def __init__(self, d_model, n_heads, chunk, bias=False):
        super().__init__()
        self.n_heads, self.head_dim, self.chunk = n_heads, d_model // n_heads, chunk
        self.ln = core.LayerNorm(d_model, bias)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.write_strength = nn.Linear(d_model, n_heads)
        lam = torch.logspace(math.log10(0.9), math.log10(0.999), n_heads) if n_heads > 1 else torch.tensor([0.99])
        self.decay_logit = nn.Parameter(torch.log(lam / (1 - lam)))
        self.gate = nn.Linear(d_model, d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def features(self, x):
        """x (B, T, D) -> h, phi(q), phi(k), v (B, H, T, F) and beta (B, H, T), fp32 (fast-weight states)."""
        B, T, D = x.shape
        h = self.ln(x)
        q, k, v = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2).float().contiguous()
                   for t in self.qkv(h).split(D, dim=2))
        scale = self.head_dim ** -0.5
        beta = torch.sigmoid(self.write_strength(h).float()).transpose(1, 2)
        return h, F.elu(q * scale) + 1, F.elu(k * scale) + 1, v, beta

    def log_decay(self):
        return F.logsigmoid(self.decay_logit.float())

    def forward(self, x, cache=None, start_pos=0):
        B, T, D = x.shape
        h, phi_q, phi_k, v, beta = self.features(x)
        with torch.autocast(x.device.type, enabled=False):   # fp32: long sums, and decay powers underflow in fp16
            log_decay = self.log_decay()
            state = None if cache is None else cache.state_at(start_pos, log_decay)
            o, _ = fast_weight_scan(phi_q, phi_k, v, beta, log_decay, state, self.chunk)  # (B, H, T, F)
        if cache is not None:
            cache.write(start_pos, phi_k, v, beta, state)
        o = o.transpose(1, 2).reshape(B, T, D).to(x.dtype)
        return x + self.proj(torch.sigmoid(self.gate(h)) * o)


# -----------------------------------------------------------------------------
# Hyper-Lattice: routed linear paths as one grouped GEMM
#
# torch._grouped_mm multiplies row segment j of `rows` by weight[j]; it has no fp32 meta kernel for torch.compile
# and its autograd fails on expanded gradients, so it sits behind a custom op with its own fake and backward. On
# inputs it does not support (fp64, CUDA before sm90) the op runs the same segments one matmul at a time.

def _native_grouped_ok(x):
    return x.dtype in (torch.float32, torch.bfloat16) and (
        x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16
                                   and torch.cuda.get_device_capability(x.device)[0] >= 9))


def _segments(offs):
    ends = offs.tolist()
    return zip([0] + ends[:-1], ends)


@torch.library.custom_op("hst_v8_2::grouped_mm", mutates_args=())
def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows (N, Din) sorted by group, weight (G, Din, Dout), offs (G,) int32 cumulative counts -> (N, Dout)."""
    weight = weight.to(rows.dtype)
    if _native_grouped_ok(rows):
        return torch._grouped_mm(rows.contiguous(), weight.contiguous(), offs=offs)
    out = rows.new_zeros(rows.size(0), weight.size(-1))
    for j, (s, e) in enumerate(_segments(offs)):
        out[s:e] = rows[s:e] @ weight[j]
    return out


@torch.library.custom_op("hst_v8_2::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """d loss / d weight[j] = rows_j^T grad_j for each segment j -> (G, Din, Dout)."""
    if _native_grouped_ok(rows):
        return torch._grouped_mm(rows.t(), grad.contiguous(), offs=offs)
    out = rows.new_zeros(offs.numel(), rows.size(1), grad.size(1))
    for j, (s, e) in enumerate(_segments(offs)):
        out[j] = rows[s:e].t() @ grad[s:e]
    return out



@grouped_mm.register_fake
def _(rows, weight, offs):
    return rows.new_empty(rows.size(0), weight.size(-1))


@grouped_mm_weight_grad.register_fake
def _(rows, grad, offs):
    return rows.new_empty(offs.size(0), rows.size(1), grad.size(1))


def _grouped_mm_setup(ctx, inputs, output):
    rows, weight, offs = inputs
    ctx.save_for_backward(rows, weight, offs)


def _grouped_mm_backward(ctx, grad):
    rows, weight, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_rows = grouped_mm(grad, weight.transpose(-1, -2).contiguous(), offs)
    grad_weight = grouped_mm_weight_grad(rows, grad, offs).to(weight.dtype)
    return grad_rows, grad_weight, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


@register_flop_formula(torch.ops.hst_v8_2.grouped_mm)
def _grouped_mm_flops(rows_shape, weight_shape, *args, out_shape=None, **kwargs):
    return 2 * rows_shape[0] * rows_shape[1] * weight_shape[-1]


class TopKPathLattice(nn.Module):
    """y = x + W_o sum_{j in top-k(t)} p_{t,j} (LN(x_t) W_j), router logits W_r LN(x_t) in fp32, p = softmax over the
    k selected logits. Per token, hence causal and identical in decoding. forward -> (y, load_balance, z_loss)."""

    def __init__(self, d_model, paths, top_k, bias=False):
        super().__init__()
        self.paths, self.top_k = paths, top_k
        self.ln = core.LayerNorm(d_model, bias)
        self.router = nn.Linear(d_model, paths, bias=False)
        self.path_weight = nn.Parameter(torch.randn(paths, d_model, d_model) * 0.02)   # W_j (P, D, D)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def route(self, h):
        """h (N, D) -> router logits (N, P) fp32, chosen paths (N, k), their probabilities (N, k)."""
        logits = self.router(h).float()
        top_logits, top_paths = logits.topk(self.top_k, dim=-1)
        return logits, top_paths, top_logits.softmax(-1)

    def mix(self, h, top_paths, top_probs):
        """sum_j p_j h W_j for every token, as a grouped GEMM over the N*k (token, path) pairs sorted by path.
        Each path also gets GROUP_SENTINELS zero sentinel rows (token N, weight 0): the CPU grouped GEMM computes a
        group of fewer than 4 rows with another kernel, which rounds differently, and then whether a later token
        picked path j would change the last bits of earlier tokens' outputs. With the sentinels every group that
        holds a real row has at least 4, every real row goes through the same kernel and the sorted order of
        earlier rows never changes: causality holds bit for bit."""
        N, D = h.shape
        device = h.device
        sentinels = torch.arange(self.paths, device=device).repeat(GROUP_SENTINELS)
        pair_path = torch.cat([top_paths.reshape(-1), sentinels])                           # (N*k + 3P,)
        pair_token = torch.cat([torch.arange(N, device=device).repeat_interleave(self.top_k),
                                torch.full_like(sentinels, N)])
        pair_prob = torch.cat([top_probs.reshape(-1), torch.zeros(sentinels.numel(), device=device)])
        order = torch.argsort(pair_path, stable=True)      # by path, then by token: earlier tokens come first
        counts = torch.zeros(self.paths, device=device, dtype=torch.long).scatter_add_(
            0, pair_path, torch.ones_like(pair_path))
        offs = counts.cumsum(0).to(torch.int32)
        h_padded = torch.cat([h, h.new_zeros(1, D)])
        rows, weight = h_padded[pair_token[order]], self.path_weight
        if h.is_cuda and torch.is_autocast_enabled("cuda"):  # custom ops see no autocast: cast as it would
            dtype = torch.get_autocast_dtype("cuda")
            rows, weight = rows.to(dtype), weight.to(dtype)
        rows = grouped_mm(rows, weight, offs).to(h.dtype)                                    # (N*k + 3P, D)
        rows = rows * pair_prob[order, None].to(rows.dtype)
        return torch.zeros_like(h_padded).index_add(0, pair_token[order], rows)[:N]

    def dense_mix(self, h, top_paths, top_probs):
        """The reference: every path on every token, weighted by the (N, P) routing matrix (zeros off the top-k)."""
        weights = torch.zeros(h.size(0), self.paths, device=h.device).scatter(1, top_paths, top_probs)
        return torch.einsum("np,nd,pde->ne", weights.to(h.dtype), h, self.path_weight)

    def forward(self, x):
        B, T, D = x.shape
        h = self.ln(x).reshape(B * T, D)
        logits, top_paths, top_probs = self.route(h)
        y = x + self.proj(self.mix(h, top_paths, top_probs).reshape(B, T, D))
        # Switch Transformer load balance P * sum_j f_j Pbar_j (f: share of pairs sent to j, Pbar: mean router
        # probability; 1 when both are uniform) and ST-MoE's router z-loss mean(logsumexp(logits)^2)
        dispatch = F.one_hot(top_paths, self.paths).float().sum(1).mean(0) / self.top_k
        balance = self.paths * (dispatch * logits.softmax(-1).mean(0)).sum()
        z_loss = torch.logsumexp(logits, -1).pow(2).mean()
        return y, balance, z_loss


# -----------------------------------------------------------------------------
# feedback loop

class FeedbackLoop(nn.Module):
    """s_0 = LN(x_t); `iters` times: e = sigmoid(w_e s + b_e), s <- (1 - e) s + e GRUCell(input=s_0, hidden=s);
    y = x + W_o (s - s_0). Rows are tokens, so nothing crosses positions; W_o = 0 makes it the identity at init."""

    def __init__(self, d_model, iters, bias=False):
        super().__init__()
        self.iters = iters
        self.ln = core.LayerNorm(d_model, bias)
        self.error_gate = nn.Linear(d_model, 1)
        self.gru = nn.GRUCell(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        nn.init.zeros_(self.proj.weight)   # identity at init (Model re-zeros it after its own init)

    def forward(self, x):
        B, T, D = x.shape
        s0 = self.ln(x).reshape(B * T, D)
        s = s0
        for _ in range(self.iters):  # a fixed count: the graph is static
            e = torch.sigmoid(self.error_gate(s))
            s = (1 - e) * s + e * self.gru(s0, s)
        return x + self.proj((s - s0).reshape(B, T, D))


# -----------------------------------------------------------------------------
# draft length

# -----------------------------------------------------------------------------
# assembly

class CrystallineBlock(nn.Module):
    """x <- x + Attn(LN x); x <- Diamond(x) (its own residual); x <- Hebbian(x) (pre-norm residual)."""

    def __init__(self, c):
        super().__init__()
        self.ln_1 = core.LayerNorm(c.d_model, c.bias)
        self.attn = (PellLucasSelfAttention(c.d_model, c.n_heads, c.sparse_block, c.bias, c.dropout)
                     if c.sparse_attention else core.CausalSelfAttention(c.d_model, c.n_heads, c.bias, c.dropout))
        self.diamond = DiamondCoupling(c.d_model, c.bias)
        self.hebbian = HebbianFastWeights(c.d_model, c.n_heads, c.hebbian_chunk, c.bias)

    def forward(self, x, kv_cache=None, hebbian_cache=None, start_pos=0):
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return self.hebbian(self.diamond(x), hebbian_cache, start_pos)


class CrystallineCache(core.Cache):
    """One KVCache per attention layer plus one HebbianCache per fast-weight layer; truncate rolls back both."""

    def __init__(self, layers, hebbian):
        super().__init__(layers)
        self.hebbian = hebbian

    def truncate(self, n):
        super().truncate(n)
        for layer in self.hebbian:
            layer.truncate(n)

    def nbytes(self):
        return super().nbytes() + sum(layer.nbytes() for layer in self.hebbian)


@dataclass
class Output(core.Output):
    uncertainty: Optional[torch.Tensor] = None   # (B, T, H): predicted CE of offsets 1..H at every position
    acceptance: Optional[torch.Tensor] = None    # (B, T, H): P(offset k's draft passes greedy verification)


@dataclass
class Config(core.Config):
    curvature: float = 1.0            # c of the Poincare ball
    hyperbolic_head: bool = True      # score tokens by Poincare distance (False: a dot product, no ball)
    sparse_attention: bool = False    # causal Pell-Lucas block-sparse attention
    sparse_block: int = 64            # its block size
    hebbian_chunk: int = 64           # chunk of the exact chunked-parallel fast-weight form
    lattice_paths: int = 48           # P routed d x d paths
    lattice_top_k: int = 4            # paths per token
    feedback_iters: int = 2
    horizon: int = 16                 # offsets 1..H; offset 1 is the main head
    horizon_rank: int = 64            # rank of the per-offset adapters U_k V_k^T (capped at d_model)
    horizon_weight: float = 0.5       # lambda_h
    horizon_gamma: float = 0.95       # w_k proportional to gamma^k
    horizon_sample: float = 1.0       # training rows of offsets >= 2, all together, in heads' worth (1: one head's)
    draft_cost: float = 0.05          # verifying k drafts costs ~ 1 + draft_cost * k one-token steps (CPU, d 128)

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % 2:
            raise core.UsageError(f"d_model={self.d_model} must be even: the Diamond coupling splits it in halves")
        for name in ("sparse_block", "hebbian_chunk", "lattice_paths", "lattice_top_k", "feedback_iters",
                     "horizon", "horizon_rank"):
            if getattr(self, name) < 1:
                raise core.UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lattice_top_k > self.lattice_paths:
            raise core.UsageError(f"lattice_top_k={self.lattice_top_k} exceeds lattice_paths={self.lattice_paths}")
        if not 0.0 < self.horizon_sample <= max(1, self.horizon - 1):
            raise core.UsageError(f"horizon_sample={self.horizon_sample} must lie in (0, horizon - 1]: the heads' "
                                  f"worth of rows shared by offsets 2..horizon (horizon - 1 reads every row)")
        if self.curvature <= 0:
            raise core.UsageError(f"curvature={self.curvature} must be positive")
        if self.draft_cost < 0:
            raise core.UsageError(f"draft_cost={self.draft_cost} must be >= 0")


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        D, H = c.d_model, c.horizon
        self.wte = nn.Embedding(c.vocab_size, D)   # tangent vectors at the origin of the ball
        self.plpe = core.PellLucasPE(D)
        self.drop = nn.Dropout(c.dropout)
        n_bottom = c.n_layers // 2
        self.bottom = nn.ModuleList(CrystallineBlock(c) for _ in range(n_bottom))
        self.lattice = TopKPathLattice(D, c.lattice_paths, c.lattice_top_k, c.bias)
        self.feedback = FeedbackLoop(D, c.feedback_iters, c.bias)
        self.top = nn.ModuleList(CrystallineBlock(c) for _ in range(c.n_layers - n_bottom))
        self.ln_f = core.LayerNorm(D, c.bias)
        if c.hyperbolic_head:
            self.hyper_proj = nn.Linear(D, D, bias=False)
            # 1/T starts at sqrt(d)/3: distances between random points concentrate like 1/sqrt(d), and this scale
            # makes the logits spread about as much as the dot-product head's at init (std ~0.5)
            self.hyper_log_inv_temp = nn.Parameter(torch.tensor(math.log(math.sqrt(D) / 3)))
            self.hyper_bias = nn.Parameter(torch.zeros(c.vocab_size))
        if H > 1:
            r = min(c.horizon_rank, D)
            self.horizon_ln = core.LayerNorm(D, c.bias)
            self.horizon_down = nn.Parameter(torch.randn(H - 1, D, r) * D ** -0.5)   # V_k
            self.horizon_up = nn.Parameter(torch.zeros(H - 1, r, D))                 # U_k: offsets start as offset 1
        self.uncertainty_ln = core.LayerNorm(D, c.bias)
        self.uncertainty = core.MLP(D, UNCERTAINTY_HIDDEN, bias=True)
        self.uncertainty.proj = nn.Linear(UNCERTAINTY_HIDDEN, H)
        # u -> the probability that a draft passes greedy verification, per offset (see acceptance_logits);
        # a = 0 and softplus(b) = 1 at init, where it is exp(-u). Vectors, so AdamW does not decay them
        self.acceptance_shift = nn.Parameter(torch.zeros(H))                             # a_k
        self.acceptance_scale = nn.Parameter(torch.full((H,), math.log(math.e - 1)))     # b_k
        self.apply(core.init_weights)
        # e ~ N(0, 1/d): |e| ~ 1, so sqrt(d) log0(exp0(e)) has unit-scale coordinates, like the PE beside it
        nn.init.normal_(self.wte.weight, std=D ** -0.5)
        core.scale_residual_projections(self, c.n_layers, ("attn.proj.weight", "hebbian.proj.weight",
                                                          "lattice.proj.weight"))
        for name, p in self.named_parameters():
            if name.endswith(("F.proj.weight", "G.proj.weight")) or name == "feedback.proj.weight":
                nn.init.zeros_(p)                                           # coupling and feedback: identity at init
        if c.hyperbolic_head:
            nn.init.normal_(self.hyper_proj.weight, std=1.0 / D)           # |W_p LN h| ~ 1: points mid-ball
        with torch.no_grad():   # the uncertainty starts at ln V, the CE of a uniform prediction: calibrated at init
            self.uncertainty.proj.weight.mul_(0.1)
            self.uncertainty.proj.bias.fill_(math.log(math.expm1(math.log(c.vocab_size))))
        # LN_f(h) . e has unit variance at init (|e| ~ 1); halving it keeps the loss at init within ~0.1 of ln V
        # while the head still learns at about GPT's pace (a 1/sqrt(d) scale made it ~8x slower at d = 64)
        self.logit_scale = 0.5

    # -- pieces --------------------------------------------------------------------------------------------------

    def embed(self, idx, pos):
        e = self.wte(idx).float()
        x = math.sqrt(self.config.d_model) * log0(exp0(e, self.config.curvature), self.config.curvature)
        return self.drop((x + self.plpe(pos)).to(self.wte.weight.dtype))

    def head_table(self):
        """The readout's right operand, computed once per forward: the tied table itself (dot-product head), or
        the tokens' points exp0(e_v) of the ball as ball_cols (V, D+2) in fp32. In inference (no autograd, eval
        mode) it is kept until the table changes, so decoding does not redo V x D work at every step."""
        weight = self.wte.weight
        if not self.config.hyperbolic_head:
            return weight
        if torch.is_grad_enabled() or self.training:
            return self._ball_table(weight)
        key = (weight.data_ptr(), weight._version, weight.device, self.config.curvature)
        memo = getattr(self, "_head_memo", None)
        if memo is None or memo[0] != key:
            memo = self._head_memo = (key, self._ball_table(weight))
        return memo[1]

    def _ball_table(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            return BallTable.apply(weight, self.config.curvature)   # ball_cols(exp0(W), c, exp0_gap(W)), fused

    def readout(self, z, table=None, flat=False):
        """Normed states (..., D) -> logits (..., V) through the tied table (head_table(), computed here when not
        given). With hyperbolic_head (the default): b_v - d_c(exp0(W_p z), exp0(e_v)) / T, minus the Poincare
        distance between the state's point and token v's point of the ball, over a learned temperature, plus a
        bias, in fp32; without it a dot product with the table. flat=True scores the same weights by
        2 |W_p z - e_v| / T instead: the distance the ball's formula tends to as the curvature goes to 0 (exp0 and
        the metric's conformal factor 2 / (1 - c|x|^2) both become flat), i.e. the model with the ball taken out."""
        if not self.config.hyperbolic_head:
            return core.linear_rows(z, self.wte.weight if table is None else table) * self.logit_scale
        c = self.config.curvature
        with torch.autocast(z.device.type, enabled=False):   # hyperbolic maps and distances in fp32: see exp0_gap
            tangent = self.hyper_proj(z.float()).reshape(-1, z.size(-1))
            inv_temp = self.hyper_log_inv_temp.float().exp()
            if flat:
                dist = 2 * torch.cdist(tangent, self.wte.weight.float())
                logits = torch.addcmul(self.hyper_bias.float(), dist, -inv_temp)
            else:
                table = self.head_table() if table is None else table
                half_q = core.linear_rows(ball_rows(exp0(tangent, c), c, exp0_gap(tangent, c)), table)  # (N, V)
                logits = BallLogits.apply(half_q, self.hyper_bias.float(), inv_temp * (2 / math.sqrt(c)))
        return logits.reshape(*z.shape[:-1], -1)

    def readout_lse(self, z, index, a, table=None, keep=0):
        """Normed states z (N, D) -> (sum_r a_r CE(readout(z_r), index_r), lse, pick, argmax), the readout's logits
        taken a chunk of rows at a time (never (N, V) at once): core.linear_lse_loss for the dot-product head,
        BallLogSumExp for the distance head. keep > 0: a fifth element, the logits (keep, V) of the first keep
        rows, without a graph."""
        if not self.config.hyperbolic_head:
            return core.linear_lse_loss(z * self.logit_scale, self.wte.weight if table is None else table, index, a,
                                        keep_logits=keep)
        c = self.config.curvature
        with torch.autocast(z.device.type, enabled=False):
            tangent = self.hyper_proj(z.float())
            rows = ball_rows(exp0(tangent, c), c, exp0_gap(tangent, c))                      # (N, W) fp32
            k = self.hyper_log_inv_temp.float().exp() * (2 / math.sqrt(c))
            cols = self.head_table() if table is None else table
            out = BallLogSumExp.apply(rows, cols, self.hyper_bias.float(), k, index, a.float(), None,
                                      ball_chunk_rows(cols.size(0)), torch.is_grad_enabled(), keep)
            return out if keep else out[:4]

    def horizon_states(self, h):
        """h (B, T, D) pre-LN_f -> LN_f(h + U_k V_k^T LN(h)) for offsets 2..H: (B, T, H-1, D)."""
        low = torch.einsum("btd,kdr->btkr", self.horizon_ln(h), self.horizon_down)
        return self.ln_f(h[:, :, None] + torch.einsum("btkr,krd->btkd", low, self.horizon_up))

    def offset_states(self, h):
        """h (H-1, n, D) pre-LN_f, offset k's rows in row k - 2 -> their states (H-1, n, D), as horizon_states."""
        low = torch.einsum("knd,kdr->knr", self.horizon_ln(h), self.horizon_down)
        return self.ln_f(h + torch.einsum("knr,krd->knd", low, self.horizon_up))

    def predicted_loss(self, h):
        """u (B, T, H) = softplus(MLP(LN h)) in fp32. It reads a detached h: the probe learns to predict the
        loss without reshaping the trunk to make its own loss easier to predict."""
        return F.softplus(self.uncertainty(self.uncertainty_ln(h.detach())).float())

    def acceptance_logits(self, u):
        """u (..., H) -> (..., H) logits of the probability that offset k's greedy draft passes greedy
        verification (for offset 1: that the main head's argmax is the next token): a_k + logit(exp(-s_k u_k)),
        s_k = softplus(b_k). exp(-u) is the probability a calibrated head gives the token that comes when its
        expected loss is u; the shift a_k and the scale s_k are fitted by BCE in training against what greedy
        verification checks (Platt scaling on that prior), and start at exp(-u) itself (a = 0, s = 1)."""
        su = (F.softplus(self.acceptance_scale.float()) * u.float()).clamp_min(1e-6)
        return self.acceptance_shift.float() - su - torch.log(-torch.expm1(-su))

    def _offset_ce(self, z, target, table=None, agree=None):
        """Per-row CE (target's shape) of states z (*target.shape, D); 0 where the target is -1. With agree: also
        1[argmax == agree] (no gradient). Checkpointed by the caller, so only one call's logits live at a time
        (never [B, T, H, V])."""
        logits = self.readout(z, table).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-1,
                             reduction="none").reshape(target.shape)
        if agree is None:
            return ce
        return ce, (logits.argmax(-1) == agree).float()

    def new_cache(self, batch_size, device=None, dtype=None):
        c, p = self.config, next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        blocks = list(self.bottom) + list(self.top)
        return CrystallineCache([b.attn.new_kv_cache(batch_size, c.max_seq_len, device, dtype) for b in blocks],
                                [HebbianCache(batch_size, c.n_heads, c.max_seq_len, c.d_model // c.n_heads, device)
                                 for _ in blocks])

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.embed(idx, pos)                                                  # (B, T, D) fp32
        n_bottom = len(self.bottom)
        kv = [None] * c.n_layers if cache is None else cache.layers
        heb = [None] * c.n_layers if cache is None else cache.hebbian
        for i, block in enumerate(self.bottom):
            x = block(x, kv[i], heb[i], start_pos)
        x, balance, z_loss = self.lattice(x)
        x = self.feedback(x)
        for i, block in enumerate(self.top):
            x = block(x, kv[n_bottom + i], heb[n_bottom + i], start_pos)
        h = x
        hn = self.ln_f(h)
        table = self.head_table()
        u = self.predicted_loss(h)                                                # (B, T, H)
        acc_logits = self.acceptance_logits(u.detach())                           # (B, T, H)
        if targets is None:
            logits = self.readout(hn, table)                                      # (B, T, V)
            states = self.horizon_states(h) if c.horizon > 1 else None
            return Output(logits=logits, hidden=hn, horizon_hidden=states, uncertainty=u,
                          acceptance=torch.sigmoid(acc_logits))
        loss, aux, states, logits = self.objective(hn, h, u, acc_logits, targets, balance, z_loss, table)
        return Output(logits=logits, loss=loss, hidden=hn, aux=aux, horizon_hidden=states, uncertainty=u,
                      acceptance=torch.sigmoid(acc_logits))

    def objective(self, hn, h, u, acc_logits, targets, balance, z_loss, table=None):
        """(CE_1 + lambda_h sum_k w_k CE_k) / (1 + lambda_h) + 0.1 L_unc + 0.1 L_acc + 0.01 L_balance + 1e-3 L_z,
        with w_k = gamma^k / sum gamma^k over k = 2..H: a weighted mean of CEs, so it stays on the ln V scale.
        Offset 1 uses every position; offsets >= 2 use a random subset of a static size in training (all of them
        in eval). L_unc = Huber(u - CE.detach()) over every (position, offset) that has a target. L_acc = BCE of
        the acceptance against what greedy verification checks: for offset k >= 2 at t, whether its argmax equals
        the main head's argmax at t + k - 1 (for offset 1, whether the main argmax is the next token); it trains
        only the calibration (u is detached). The main head's CE goes through readout_lse's chunked pass too, which
        writes its logits for the caller: -> (loss, aux, states, logits (B, T, V) without a graph)."""
        c = self.config
        B, T, _ = hn.shape
        N, n_off = B * T, c.horizon - 1
        valid1 = targets >= 0
        n_valid = valid1.sum().clamp_min(1)
        hw = c.horizon_weight if n_off else 0.0
        # one chunked pass over V scores the main head's rows and the offsets' (below), its total the weighted CE
        # sum (CE_1 + lambda_h sum_k w_k CE_k) / (1 + lambda_h); the main rows' logits are written for the caller
        z, index = [hn.reshape(N, -1)], [targets.clamp_min(0).reshape(-1)]
        coef = [(valid1 / n_valid / (1 + hw)).reshape(-1)]
        states = None
        if n_off:
            # offsets 2..H are scored at rows (n_off, n) of the B*T positions: in training a fresh random subset
            # per offset, about horizon_sample heads' worth of rows in all (every row in eval). Sums over drawn
            # rows are scaled by N / n and divided by counts over the full window: unbiased estimates of the full
            # sums.
            rows = core.offset_rows(N, n_off, hn.device, c.horizon_sample if self.training else None)
            n = rows.size(1)
            k = torch.arange(n_off, device=hn.device)[:, None]
            target_all = core.offset_targets(targets, n_off)                       # (N, n_off)
            target = target_all[rows, k]                                           # (n_off, n)
            states = self.offset_states(h.reshape(N, -1)[rows])                    # (n_off, n, D)
            valid = target >= 0
            scale = N / n
            counts = (target_all >= 0).sum(0).clamp_min(1)                          # (n_off,) on the full window
            weight = c.horizon_gamma ** torch.arange(2, c.horizon + 1, device=hn.device, dtype=torch.float32)
            z.append(states.reshape(-1, states.size(-1)))
            index.append(target.clamp_min(0).reshape(-1))
            coef.append(((hw / (1 + hw) * weight / weight.sum() * scale / counts)[:, None] * valid).reshape(-1))
        loss, lse, pick, argmax, logits = self.readout_lse(torch.cat(z), torch.cat(index), torch.cat(coef), table,
                                                           keep=N)
        ce1 = ((lse[:N] - pick[:N]) * valid1.reshape(-1)).view(B, T)             # no gradient: loss has it
        main_pred = argmax[:N].view(B, T)                                         # (B, T): what greedy picks
        aux = {"lm": ce1.sum() / n_valid}
        unc_sum = F.huber_loss(u[..., 0], ce1, reduction="none").mul(valid1).sum()
        unc_count = valid1.sum()
        bce = lambda z, hit: F.binary_cross_entropy_with_logits(z, hit, reduction="none")  # noqa: E731
        acc_sum = bce(acc_logits[..., 0], (main_pred == targets).float()).mul(valid1).sum()
        if n_off:
            ce = ((lse[N:] - pick[N:]).view(n_off, n) * valid).detach()             # (n_off, n)
            hit = (argmax[N:].view(n_off, n) == core.offset_targets(main_pred, n_off)[rows, k]).float()
            aux["horizon"] = (weight * scale * ce.sum(1) / counts).sum() / weight.sum()
            u_k = u.reshape(N, -1)[:, 1:][rows, k]
            a_k = acc_logits.reshape(N, -1)[:, 1:][rows, k]
            unc_sum = unc_sum + scale * F.huber_loss(u_k, ce, reduction="none").mul(valid).sum()
            acc_sum = acc_sum + scale * bce(a_k, hit).mul(valid).sum()
            unc_count = unc_count + (target_all >= 0).sum()
            # drafting reads every position's states; a training subset is none
            states = None if self.training else states.reshape(n_off, B, T, -1).permute(1, 2, 0, 3)
        aux["uncertainty"] = unc_sum / unc_count.clamp_min(1)
        aux["acceptance"] = acc_sum / unc_count.clamp_min(1)
        aux["balance"], aux["router_z"] = balance, z_loss
        loss = loss + 0.1 * aux["uncertainty"] + 0.1 * aux["acceptance"] + 0.01 * balance + 1e-3 * z_loss
        return loss, aux, states, logits.view(B, T, -1)

    # -- decoding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def offset_cross_entropies(self, idx, targets):
        """Mean CE of every offset 1..H on (idx, targets), all positions: (H,) tensor, for evaluation."""
        out = self(idx)
        ces = [core.lm_loss(out.logits, targets)]
        for j in range(self.config.horizon - 1):
            target = core.horizon_targets(targets, j + 2)
            ce = self._offset_ce(out.horizon_hidden[:, :, j], target)
            ces.append(ce.sum() / (target >= 0).sum().clamp_min(1))
        return torch.stack(ces)

    @staticmethod
    def draft_acceptance(out):
        """(B, T, H-1): the probability that offset k = 2..H's draft passes greedy verification (Output.acceptance,
        the Platt-scaled predicted loss)."""
        return out.acceptance[..., 1:]

    def draft_logits(self, prev_out, prev_index, k):
        """(k', V) logits of offsets 2..k'+1 at prev_index, through the model's own readout (the distance head)."""
        if prev_out.horizon_hidden is None:
            return None
        return self.readout(prev_out.horizon_hidden[0, prev_index, :k])  # the distance head's cost grows with rows


if __name__ == "__main__":
    def extra(model, mode, idx, cached):
        c = model.config
        counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
                  for name in ("wte", "bottom", "lattice", "feedback", "top")}
        if c.hyperbolic_head:
            counts["distance head"] = model.hyper_proj.weight.numel() + model.hyper_bias.numel() + 1
        counts["horizon+uncertainty"] = model.num_params() - sum(counts.values()) - model.plpe.level.weight.numel() \
            - model.ln_f.weight.numel()
        print("  parameters by part: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        stats = {}
        speculative = model.generate(idx[:1, :8], 24, temperature=0, speculative=True, draft_len=6, stats=stats)
        assert torch.equal(cached, speculative)
        print(f"  speculative (draft_len 6, draft cost {c.draft_cost}): "
              f"{24 / stats['model_calls']:.2f} tokens per call, accepted per pass {stats['accepted_hist']}")
        u = model(idx[:1, :-1]).uncertainty[0]
        print("  predicted loss per offset (mean over positions): "
              + ", ".join(f"{v:.2f}" for v in u.mean(0).tolist()))
        block = model.bottom[0]
        x = torch.randn(2, 16, c.d_model)
        inv = (block.diamond.inverse(block.diamond(x)) - x).abs().max().item()
        print(f"  Diamond inverse(forward(u)) max error {inv:.1e}")
        cache = model.new_cache(1)
        model(idx[:1, :32], cache=cache)
        print(f"  cache after 32 tokens: {cache.nbytes() / 1024:.0f} KiB (KV + Hebbian log + state checkpoint)")

    core.lm_selftest("v8_2", lambda **kw: Model(core.make_config(Config, kw)), T=40, prompt_len=8, extra=extra)
    print(f"default config with the dot-product head instead: "
          f"{Model(Config(hyperbolic_head=False)).num_params():,} parameters")
