"""HST ChaosLogic: latent-KV attention with per-token sparse patterns, a causal task analyzer that sets each
token's bottom depth, a gated causal lattice, and a recursive multi-scale horizon head with calibrated confidence.

The original ChaosLogicAI had a compressed cache, a Gumbel pattern selector, a task analyzer with a depth
predictor, a gated lattice processor and a recursive horizon predictor; this is each of them made causal,
cached and trainable. What it combines, top to bottom:
- Embedding: tied token embedding (Press & Wolf 2017) plus PE_SCALE (0.02, the std of GPT's learned position
  table) times the Pell-Lucas positional encoding core.PellLucasPE. The sinusoids are O(1) per dimension; unscaled
  they drown the token (a tiny model could not learn a bigram in 60 steps). Additive, so every key is a pure
  function of the cached latent.
- Latent KV attention (DeepSeek-V2's multi-head latent attention, DeepSeek-AI 2024): c_t = W_dkv LN(x_t) in
  R^{d_c}, K = W_uk c, V = W_uv c, q = W_q LN(x). Only c is cached (LatentKVCache), d_c = round(0.1 * 2d) by
  default, so the cache holds about 10x fewer bytes than a K/V cache of the same width (2d / d_c = 9.97x at
  d = 768). Training uses the same bottleneck, so decoding from the latent cache is the full forward. K and V are
  re-expanded from the cached latents on every call (absorbing W_uk into W_q and W_uv into W_o would avoid that;
  not done here).
- Sparse patterns and the Gumbel selector: P0 dense causal, P1 sliding window (Beltagy et al. 2020), P2
  Pell-Lucas blocks (core.pell_lucas_block_mask), P3 window + the first n_sink tokens (attention sinks, Xiao et
  al. 2023). Masks are functions of absolute positions only. Each attention layer l picks a pattern per query
  token from pi_{t,l} = W_l tau_t + b_l: a hard straight-through Gumbel-softmax sample (Jang et al. 2017) in
  training (noise in fp32), a noise-free argmax in eval, assembled into one mask whose row t is pattern p*_t's
  row t. Keys are shared, so per-token choices never conflict with the cache. Training computes all 4 masked
  attentions and sums them with the one-hot weights so that the selector gets a gradient: 4x the attention-score
  cost of a dense layer in training (projections are shared, so a layer costs well under 4x). The sizes scale with
  the context: window = max_seq_len // 4 and block = max_seq_len // 8 unless set (128 and 64 at 512 tokens), with
  4 sink tokens, so no two of the four masks are equal at any max_seq_len >= 16 and the choice always matters (with
  fixed sizes of 128 and 64 the four were one mask up to 128 tokens, and P2 was dense up to 256).
- Task analyzer, depth predictor, adaptive bottom: m_t = (1/(t+1)) sum_{s<=t} W_e LN(x_s) (a prefix mean by
  cumsum, fp32), tau_t = softmax(W_c [m_t ; e_t]) over 4 tasks with e_t = W_e LN(x_t) the token's own summand
  (the prefix mean alone moves by O(1/t) per token: every token of a window got one task), depth
  D_t = lo + (hi - lo) sigmoid(MLP(tau_t)) in
  [lo, hi]. Bottom layer l applies x <- x + g_{t,l} f_l(x) with g = 1[D_t >= l - 1/2], straight-through gradient
  of sigmoid((D_t - l + 1/2) / 0.5); compute penalty 0.01 * mean_t (D_t - lo) / (hi - lo). A skipped token's
  latent is still computed and cached. In eval, a layer that every token of every row skips is really skipped
  (its latent is still written); that is exactly x + 0 * f(x), the hard-gated forward.
- Causal lattice: n_lattice_layers pre-norm latent-KV layers (FF width 8d/3, the original's 2048 at d = 768)
  with soft gates G_{t,l} = sigmoid(MLP([m_t ; e_t])), starting open at sigmoid(2).
- Routers that stay adaptive: the task analyzer, depth MLP, lattice gates and pattern selector start with logits
  that vary with unit scale across tokens (core.init_router); the objective adds 0.01 * routing_information
  (minus the information between a token's content and its choice: task, each layer's pattern, each lattice gate,
  shallow vs deep) and 1e-3 * router z-loss (ST-MoE); the Gumbel temperature anneals from 1 to gumbel_tau_min over
  gumbel_anneal_steps training passes (Jang et al. 2017). Without them, after 200 steps on real text tau was
  one-hot on one task for every token, each layer picked one pattern for all tokens, every token had the same
  depth and the lattice gates were shut (~4e-5) or wide open.
- Recursive multi-scale horizon, in hidden space, at every position (Medusa-style heads, Cai et al. 2024). With
  h~ = LN(h_t): coarse c_o = MLP_c(h~ + E_o) (o = 4, 8); medium m_2 = MLP_m([h~; (h~ + c_4)/2]),
  m_6 = MLP_m([h~; (c_4 + c_8)/2]); fine f_3, f_5, f_7 = MLP_f([h~; midpoint]) of (m_2, c_4), (c_4, m_6),
  (m_6, c_8). Every state is anchored as h~ + MLP(...) so each offset starts from the current state's
  prediction. Offsets are canonical (offset k at t predicts token t+k): offset 1 is the main head (so a fine
  state for offset 1, the midpoint of (h~, m_2), which would predict the same token t+1 again, is not built);
  offsets 2..8 are m_2, f_3, c_4, f_5, m_6, f_7, c_8, normed and read out through the tied head
  (Output.horizon_hidden, (B, T, H-1, D)). Confidence kappa_{t,k} = sigmoid(MLP(LN h_t))_k for k = 1..H, trained
  by BCE against what greedy verification checks: for k >= 2 whether offset k's argmax at t equals the main
  head's argmax at t + k - 1 (for k = 1 whether the main argmax is the next token), so kappa_k is the
  probability that offset k's draft is accepted. Speculative decoding (generate.plan_drafts) drafts the k that
  maximises the expected tokens per verification cost, (1 + sum_{j<=k} prod_{i<=j} kappa_i) / (1 + draft_cost k)
  (best_draft_length), with kappa corrected by the acceptance the drafts realise in the same generation, from the
  heads or prompt lookup, or nothing. Drafts are verified losslessly (Leviathan et al. 2023; Chen et al. 2023).
- Objective, on the ln V scale: (CE_next + lambda_h sum_k w_k CE_k) / (1 + lambda_h), w_k = gamma^k / sum
  gamma^k over k = 2..H, + 0.1 BCE_kappa + 0.01 L_depth + 0.01 L_routing + 1e-3 L_z (the routing terms above).
  Never holds [B, T, H, V]: in
  training each offset k >= 2 is scored at fresh random positions, about `horizon_sample` heads' worth of rows for
  all offsets together in one chunked pass over the unembedding, core.linear_lse_loss (an unbiased estimate of
  every CE_k, about one extra head's cost whatever H is); in eval, every position.

Depth mapping (bench.py compares models at equal n_layers): bottom = max(1, n_layers // 2) layers, of which the
first max(1, bottom // 2) are always on and the rest adaptive; top = n_layers - bottom; plus n_lattice_layers (2)
lattice layers. The original's 8 / 10 / 8 stacks at d = 768 are n_layers=16, n_lattice_layers=10 (and
vocab/d_model/n_heads overrides). When no bottom layer is adaptive (n_layers <= 3) the depth is fixed and the
penalty alone trains the depth head (as mean sigmoid(MLP(tau)), the same expression as above when hi > lo).

What it does differently from the original, and why: every layer is causal and cached (the original lattice was
bidirectional and uncached, so decoding differed from the full forward); the depth comes from a causal prefix
summary, per token, with a gradient, instead of a no_grad whole-batch mean turned into a Python int (through
which future tokens and other samples set every token's depth; here no .item(), no host sync in training, and
no (None, None) cache holes that crash the next step); the compressed cache and the pattern selector are real
and used (the originals were never called); the horizon head forecasts from every position with aligned targets
through the tied head (no logits projected back to d, no uniform offset 7); confidence is calibrated by a real
objective (the original's was the constant 1); positions are never clamped.
Not built: document-id masking (this repo trains every model on plain windows), a lossy long-context mode that
pools old latents.

Longer notes: docs/v8_chaoslogic.md
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import core

N_PATTERNS = 4   # P0 dense, P1 window, P2 Pell-Lucas blocks, P3 window + sink
N_TASKS = 4
PE_SCALE = 0.02  # position vs token size at init, as in GPT (wte and wpe both N(0, 0.02))


def pattern_masks(q_pos, k_pos, window, block, n_sink):
    """The 4 causal patterns over absolute positions: (4, Tq, Tk) bool, True = may attend. Each includes the
    diagonal and is a function of positions only, so cached decoding reads the same rows as the full forward."""
    causal = k_pos[None, :] <= q_pos[:, None]
    near = causal & (q_pos[:, None] - k_pos[None, :] < window)
    blocks = core.pell_lucas_block_mask(q_pos, k_pos, block)
    sink = near | (causal & (k_pos[None, :] < n_sink))
    return torch.stack([causal, near, blocks, sink])


class LatentKVCache:
    """One attention layer's cached latents c (B, max_len, d_c), written by absolute position; truncate = set
    length. K and V are functions of c alone, so this is the layer's whole decoding state."""

    def __init__(self, batch_size, max_len, latent_dim, device, dtype):
        self.c = torch.zeros(batch_size, max_len, latent_dim, device=device, dtype=dtype)
        self.length = 0

    def update(self, start_pos, c):
        T = c.size(1)
        if start_pos > self.length:
            raise RuntimeError(f"cache write at {start_pos} would leave a gap after {self.length} valid positions")
        if start_pos + T > self.c.size(1):
            raise RuntimeError(f"cache holds {self.c.size(1)} positions; writing {T} at {start_pos} overflows it")
        self.c[:, start_pos:start_pos + T] = c
        self.length = start_pos + T
        return self.c[:, :self.length]

    def truncate(self, n):
        self.length = min(self.length, n)

    def nbytes(self):
        return self.c.nelement() * self.c.element_size()


class ChaosCache(core.Cache):
    """Latent caches of every attention layer (bottom, lattice, top), plus what the task analyzer needs to
    continue its prefix sum: the token ids by absolute position and one checkpoint, the fp32 sum
    sum_{s<P} W_e LN(x_s) (B, D) at position P. The analyzer's input is the embedding, a function of the token
    and its position, so the checkpoint is advanced by re-embedding the few tokens since P; P is the start of the
    last call, which speculative rollback never truncates below (truncating below it resets the sum to P = 0,
    recomputed from the ids). nbytes() counts all of it: the decoding state is the latents plus 8 bytes a token."""

    def __init__(self, layers, tokens, prefix_sum):
        super().__init__(layers)
        self.tokens = tokens                    # (B, max_len) int64
        self.prefix_sum = prefix_sum            # (B, D) fp32: the sum over positions < sum_pos
        self.sum_pos = 0

    def truncate(self, n):
        super().truncate(n)
        if n < self.sum_pos:
            self.prefix_sum.zero_()
            self.sum_pos = 0

    def nbytes(self):
        return (super().nbytes() + self.tokens.nelement() * self.tokens.element_size()
                + self.prefix_sum.nelement() * self.prefix_sum.element_size())


class LatentAttention(nn.Module):
    """Multi-head attention whose K and V are up-projections of a cached latent c = W_dkv u (u = LN x), with a
    per-query-token pattern mask. forward(u, sel, masks, kv_cache, start_pos): masks (4, T, S) from
    pattern_masks; sel (B, T, 4) is a straight-through one-hot (training) or the pattern index (B, T) (eval)."""

    def __init__(self, d_model, n_heads, latent_dim, bias=False, dropout=0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.down_kv = nn.Linear(d_model, latent_dim, bias=bias)
        self.up_k = nn.Linear(latent_dim, d_model, bias=bias)
        self.up_v = nn.Linear(latent_dim, d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def latent(self, u, kv_cache=None, start_pos=0):
        """Latents of the new tokens, appended to the cache: (B, S, d_c) for every key position 0..S-1."""
        c = self.down_kv(u)
        return c if kv_cache is None else kv_cache.update(start_pos, c)

    def forward(self, u, sel, masks, kv_cache=None, start_pos=0):
        B, T, D = u.shape
        c = self.latent(u, kv_cache, start_pos)                                           # (B, S, d_c)
        S = c.size(1)
        q = self.q(u).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)             # (B, nh, T, hd)
        k = self.up_k(c).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)          # (B, nh, S, hd)
        v = self.up_v(c).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if sel.dim() == 3:
            # all 4 patterns, mixed by the straight-through one-hot: the forward is exactly the chosen pattern,
            # the backward reaches the selector through the soft Gumbel probabilities
            y = sum(sel[:, None, :, p, None].to(q.dtype)
                    * F.scaled_dot_product_attention(q, k, v, attn_mask=masks[p], dropout_p=dropout)
                    for p in range(N_PATTERNS))
        else:
            # eval: one mask whose row t is the chosen pattern's row t
            rows = torch.arange(T, device=u.device)
            mask = masks[sel, rows]                                                       # (B, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, D))


class ChaosBlock(nn.Module):
    """Pre-norm block with latent-KV patterned attention. Returns the residual branch f(x) = attn + MLP (the
    caller applies x + g f(x)); skip_latent only writes the latent of a layer whose branch is skipped."""

    def __init__(self, d_model, n_heads, latent_dim, ff_hidden, bias=False, dropout=0.0):
        super().__init__()
        self.ln_1 = core.LayerNorm(d_model, bias)
        self.attn = LatentAttention(d_model, n_heads, latent_dim, bias, dropout)
        self.ln_2 = core.LayerNorm(d_model, bias)
        self.mlp = core.MLP(d_model, ff_hidden, bias, dropout)

    def forward(self, x, sel, masks, kv_cache=None, start_pos=0):
        a = self.attn(self.ln_1(x), sel, masks, kv_cache, start_pos)
        return a + self.mlp(self.ln_2(x + a))

    def skip_latent(self, x, kv_cache, start_pos):
        self.attn.latent(self.ln_1(x), kv_cache, start_pos)


class TaskAnalyzer(nn.Module):
    """m_t = prefix mean of e_s = W_e LN(x_s) over s <= t (fp32 cumsum; decoding continues the cached running sum),
    tau_t = softmax(W_c [m_t ; e_t]), depth fraction phi_t = sigmoid(MLP_{4->8->1}(tau_t))."""

    def __init__(self, d_model, bias=False):
        super().__init__()
        self.ln = core.LayerNorm(d_model, bias)
        self.embed = nn.Linear(d_model, d_model, bias=True)
        self.classify = nn.Linear(2 * d_model, N_TASKS, bias=True)
        self.depth_fc = nn.Linear(N_TASKS, 8, bias=True)
        self.depth_out = nn.Linear(8, 1, bias=True)

    def summand(self, x):
        return self.embed(self.ln(x)).float()

    def forward(self, x, start_pos=0, prefix_sum=None):
        """prefix_sum (B, D): the sum of the summands of positions < start_pos (decoding), or None (from 0). Returns
        (router input r_t = [m_t ; e_t] (B, T, 2D) fp32, task logits (B, T, 4) fp32, depth fraction phi_t (B, T))."""
        T = x.size(1)
        e = self.summand(x)                                                               # (B, T, D) fp32
        s = e.cumsum(1)
        if prefix_sum is not None:
            s = s + prefix_sum[:, None]
        count = torch.arange(start_pos + 1, start_pos + T + 1, device=x.device, dtype=torch.float32)
        # the prefix mean m_t moves by O(1/t) per token, so routers that read it alone gave every token of a window
        # one task, one depth and one pattern; the token's own summand e_t lets them tell tokens apart
        r = torch.cat([s / count[:, None], e], -1)                                        # (B, T, 2D)
        task_logits = F.linear(r, self.classify.weight.float(), self.classify.bias.float())
        tau = task_logits.softmax(-1)
        z = self.depth_out(F.gelu(self.depth_fc(tau.to(x.dtype)))).float().squeeze(-1)
        return r, task_logits, torch.sigmoid(z)


class CoarseToFineHorizon(nn.Module):
    """The hidden states of offsets 2..H (coarse to fine, see the module docstring) and the confidence logits of
    offsets 1..H."""

    def __init__(self, d_model, horizon, bias=False):
        super().__init__()
        self.horizon = horizon
        self.ln = core.LayerNorm(d_model, bias)
        self.offset_emb = nn.Embedding(2, d_model)            # E_4, E_8
        self.coarse = nn.Sequential(nn.Linear(d_model, d_model, bias=bias), nn.GELU(),
                                    nn.Linear(d_model, d_model, bias=bias))
        self.medium = nn.Sequential(nn.Linear(2 * d_model, d_model, bias=bias), nn.GELU(),
                                    nn.Linear(d_model, d_model, bias=bias))
        self.fine = nn.Sequential(nn.Linear(2 * d_model, d_model, bias=bias), nn.GELU(),
                                  nn.Linear(d_model, d_model, bias=bias)) if horizon >= 3 else None
        self.out_ln = core.LayerNorm(d_model, bias)
        self.confidence = nn.Sequential(nn.Linear(d_model, 64, bias=True), nn.GELU(),
                                        nn.Linear(64, horizon, bias=True))

    def forward(self, h):
        """h (B, T, D) -> (horizon_hidden (B, T, H-1, D) or None, confidence logits (B, T, H))."""
        a = self.ln(h)
        kappa_logits = self.confidence(a)
        if self.horizon == 1:
            return None, kappa_logits
        c4 = a + self.coarse(a + self.offset_emb.weight[0])
        c8 = a + self.coarse(a + self.offset_emb.weight[1])
        m2 = a + self.medium(torch.cat([a, (a + c4) / 2], -1))
        m6 = a + self.medium(torch.cat([a, (c4 + c8) / 2], -1))
        states = [m2]
        if self.fine is not None:
            f3, f5, f7 = (a + self.fine(torch.cat([a, (lo + hi) / 2], -1)) for lo, hi in ((m2, c4), (c4, m6), (m6, c8)))
            states = [m2, f3, c4, f5, m6, f7, c8]
        return self.out_ln(torch.stack(states[:self.horizon - 1], 2)), kappa_logits


@dataclass
class Output(core.Output):
    confidence: Optional[torch.Tensor] = None      # (B, T, H) kappa of offsets 1..H
    patterns: Optional[torch.Tensor] = None        # (B, T, n_attn, 4) one-hot pattern choice per attention layer
    depth: Optional[torch.Tensor] = None           # (B, T) continuous depth D_t
    lattice_gates: Optional[torch.Tensor] = None   # (B, T, n_lattice_layers) (None without a lattice)


@dataclass
class Config(core.Config):
    kv_latent: int = 0               # d_c; 0 = round(0.1 * 2 * d_model) (154 at d768, 51 at d256, 26 at d128)
    window: int = 0                  # P1 / P3 sliding window; 0 = max_seq_len // 4 (128 at 512 tokens)
    sparse_block: int = 0            # P2 Pell-Lucas block size; 0 = max_seq_len // 8 (64 at 512 tokens)
    n_sink: int = 4                  # P3 global sink tokens
    n_lattice_layers: int = 2        # causal lattice layers between the bottom and top stacks
    lattice_gate_hidden: int = 256   # MLP_{d -> 256 -> n_lattice} of the lattice gates
    horizon: int = 8                 # offsets 1..H (1 = the main head); at most 8
    horizon_weight: float = 0.5      # lambda_h
    horizon_gamma: float = 0.95      # w_k proportional to gamma^k
    horizon_sample: float = 1.0      # training rows of offsets >= 2, all together, in heads' worth (see objective)
    confidence_weight: float = 0.1
    depth_weight: float = 0.01
    routing_weight: float = 0.01     # weight of -I(token; choice) of every router, core.routing_information
    router_z_weight: float = 1e-3    # weight of the routers' z-loss, core.router_z_loss (ST-MoE's)
    gumbel_tau_min: float = 0.5      # the pattern selector's Gumbel temperature anneals from 1 to this ...
    gumbel_anneal_steps: int = 1000  # ... over this many training forward passes
    draft_cost: float = 0.05         # verifying k drafts costs ~ 1 + draft_cost * k one-token steps (CPU, d 128)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.horizon <= 8:
            raise core.UsageError(f"horizon={self.horizon} must lie in [1, 8] (the recursive head's offsets)")
        if self.lattice_gate_hidden < 1:
            raise core.UsageError(f"lattice_gate_hidden={self.lattice_gate_hidden} must be >= 1")
        if min(self.kv_latent, self.window, self.sparse_block, self.n_sink, self.n_lattice_layers) < 0:
            raise core.UsageError("kv_latent, window, sparse_block, n_sink and n_lattice_layers must be >= 0")
        if self.draft_cost < 0:
            raise core.UsageError(f"draft_cost={self.draft_cost} must be >= 0")
        if not 0.0 < self.horizon_sample <= max(1, self.horizon - 1):
            raise core.UsageError(f"horizon_sample={self.horizon_sample} must lie in (0, horizon - 1]: the heads' "
                                  f"worth of rows shared by offsets 2..horizon (horizon - 1 reads every row)")

    @property
    def latent_dim(self):
        return self.kv_latent or max(1, round(0.2 * self.d_model))

    @property
    def attn_window(self):
        """P1 / P3's window: `window`, or a quarter of the context."""
        return self.window or max(1, self.max_seq_len // 4)

    @property
    def attn_block(self):
        """P2's block size: `sparse_block`, or an eighth of the context (8 blocks, so gaps 3, 4, 5 and 7 are cut)."""
        return self.sparse_block or max(1, self.max_seq_len // 8)


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.n_bottom = max(1, c.n_layers // 2)
        self.n_always = max(1, self.n_bottom // 2)          # bottom layers every token runs
        n_top = c.n_layers - self.n_bottom
        d_c = c.latent_dim
        # training forward passes so far: the Gumbel temperature anneals with them (select_patterns)
        self.register_buffer("gumbel_steps", torch.zeros(()))
        self.skipped_layer_calls = 0                        # eval calls that really skipped a bottom layer
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.pe = core.PellLucasPE(c.d_model)
        self.drop = nn.Dropout(c.dropout)
        block = lambda ff: ChaosBlock(c.d_model, c.n_heads, d_c, ff, c.bias, c.dropout)  # noqa: E731
        self.bottom = nn.ModuleList(block(4 * c.d_model) for _ in range(self.n_bottom))
        self.lattice = nn.ModuleList(block(round(8 * c.d_model / 3)) for _ in range(c.n_lattice_layers))
        self.top = nn.ModuleList(block(4 * c.d_model) for _ in range(n_top))
        self.n_attn = self.n_bottom + c.n_lattice_layers + n_top
        self.task = TaskAnalyzer(c.d_model, c.bias)
        self.lattice_gate = nn.Sequential(nn.Linear(2 * c.d_model, c.lattice_gate_hidden), nn.GELU(),
                                          nn.Linear(c.lattice_gate_hidden, c.n_lattice_layers)) \
            if c.n_lattice_layers else None
        self.selector_weight = nn.Parameter(torch.zeros(self.n_attn, N_PATTERNS, N_TASKS))  # W_l
        self.selector_bias = nn.Parameter(torch.zeros(self.n_attn, N_PATTERNS))             # b_l
        self.horizon = CoarseToFineHorizon(c.d_model, c.horizon, c.bias)
        self.ln_f = core.LayerNorm(c.d_model, c.bias)
        self.lm_head = core.Unembedding(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(core.init_weights)
        # routers start with per-token spread (core.init_router): the task analyzer's summand and classifier, the
        # depth MLP, the lattice gates; pattern logits move by O(1) across the simplex of task mixtures
        core.init_router(self.task.embed, self.task.classify)
        core.init_router(self.task.depth_fc, self.task.depth_out)
        nn.init.normal_(self.selector_weight, std=1.0)
        if self.lattice_gate is not None:
            core.init_router(self.lattice_gate[0], self.lattice_gate[2])
            # lattice gates start at sigmoid(2) = 0.88: open enough that the lattice layers learn from the first step
            # (from 0.5 they lost the race against their own init noise and shut for good, ~4e-5), short of
            # saturation so the gate still has a gradient
            nn.init.constant_(self.lattice_gate[-1].bias, 2.0)
        core.scale_residual_projections(self, self.n_attn)
        # start deep: the depth fraction's centre a quarter step above the last threshold, so most tokens run every
        # adaptive layer (the depth MLP's unit-scale init spreads tokens around that centre)
        n_adapt = max(1, self.n_bottom - self.n_always)
        frac = 1 - 1 / (4 * n_adapt)
        nn.init.constant_(self.task.depth_out.bias, math.log(frac / (1 - frac)))

    # -- decoding state

    def new_cache(self, batch_size, device=None, dtype=None):
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        c = self.config
        layers = [LatentKVCache(batch_size, c.max_seq_len, c.latent_dim, device, dtype) for _ in range(self.n_attn)]
        tokens = torch.zeros(batch_size, c.max_seq_len, dtype=torch.long, device=device)
        prefix_sum = torch.zeros(batch_size, c.d_model, device=device, dtype=torch.float32)
        return ChaosCache(layers, tokens, prefix_sum)

    def embed(self, idx, pos):
        return self.drop(self.wte(idx) + PE_SCALE * self.pe(pos))

    def readout(self, z):
        """Normed states (..., D) -> logits (..., V) through the tied table (the main head and every offset)."""
        return self.lm_head(z)

    def advance_prefix_sum(self, cache, start_pos):
        """Bring the cache's prefix-sum checkpoint to start_pos by re-embedding the cached tokens since it."""
        if cache.sum_pos > start_pos:
            cache.prefix_sum.zero_()
            cache.sum_pos = 0
        if cache.sum_pos < start_pos:
            pos = torch.arange(cache.sum_pos, start_pos, device=cache.tokens.device)
            cache.prefix_sum += self.task.summand(self.embed(cache.tokens[:, cache.sum_pos:start_pos], pos)).sum(1)
            cache.sum_pos = start_pos

    # -- routing

    def depth_range(self):
        return self.n_always, self.n_bottom

    def pattern_masks(self, q_pos, k_pos):
        """The model's 4 masks (4, Tq, Tk) at its window, block and sink sizes."""
        c = self.config
        return pattern_masks(q_pos, k_pos, c.attn_window, c.attn_block, c.n_sink)

    def gumbel_temperature(self):
        """tau_min ** (steps / anneal_steps), floored at tau_min: 1 at the first training step, tau_min after
        gumbel_anneal_steps (an exponential schedule, as Jang et al. 2017). The hard sample's law is softmax(pi) at
        any temperature; a lower one makes the straight-through gradient that of the chosen pattern rather than of
        a blend, once the selector has explored at 1."""
        c = self.config
        return (c.gumbel_tau_min ** (self.gumbel_steps / c.gumbel_anneal_steps)).clamp_min(c.gumbel_tau_min)

    def select_patterns(self, tau):
        """tau (B, T, 4) -> (one-hot choices (B, T, n_attn, 4), pattern logits pi (B, T, n_attn, 4), fp32)."""
        pi = torch.einsum("btj,lpj->btlp", tau, self.selector_weight.float()) + self.selector_bias.float()
        if self.training:
            # Gumbel-softmax with a straight-through one-hot (Jang et al. 2017), noise in fp32; hard + (soft -
            # soft.detach()) keeps the forward value exactly one-hot
            gumbel = -torch.empty_like(pi).exponential_().log()
            soft = ((pi + gumbel) / self.gumbel_temperature()).softmax(-1)
            with torch.no_grad():
                self.gumbel_steps += 1
            hard = F.one_hot(soft.argmax(-1), N_PATTERNS).to(soft.dtype)
            return hard + (soft - soft.detach()), pi
        return F.one_hot(pi.argmax(-1), N_PATTERNS).to(pi.dtype), pi

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        q_pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        k_pos = torch.arange(0, start_pos + T, device=idx.device) if cache is not None else q_pos
        x = self.embed(idx, q_pos)                                                        # (B, T, D)
        kv = [None] * self.n_attn if cache is None else cache.layers
        if cache is not None:
            cache.tokens[:, start_pos:start_pos + T] = idx
            self.advance_prefix_sum(cache, start_pos)

        r, task_logits, depth_frac = self.task(x, start_pos, None if cache is None else cache.prefix_sum)
        tau = task_logits.softmax(-1)                                                     # (B, T, 4) fp32
        lo, hi = self.depth_range()
        depth = lo + (hi - lo) * depth_frac                                               # (B, T) fp32
        sel, pi = self.select_patterns(tau)                                               # (B, T, n_attn, 4)
        masks = self.pattern_masks(q_pos, k_pos)                                          # (4, T, S)
        layer_sel = sel if self.training else sel.argmax(-1)                             # eval: indices (B, T, L)

        # adaptive bottom: hard gates in the forward pass, sigmoid((D - l + 1/2) / 0.5) in the backward pass
        runs = torch.full_like(depth, float(lo))
        for i, block in enumerate(self.bottom):
            layer = i + 1
            if layer <= lo:
                x = x + block(x, layer_sel[:, :, i], masks, kv[i], start_pos)
                continue
            soft = torch.sigmoid((depth - layer + 0.5) / 0.5)
            hard = (depth >= layer - 0.5).to(soft.dtype)
            gate = hard + (soft - soft.detach())
            runs = runs + hard
            if not self.training and not bool(hard.any()):
                if kv[i] is not None:                      # every token skips: the latent is still cached
                    block.skip_latent(x, kv[i], start_pos)
                self.skipped_layer_calls += 1
                continue
            x = x + gate[..., None].to(x.dtype) * block(x, layer_sel[:, :, i], masks, kv[i], start_pos)

        lattice_logits = None if self.lattice_gate is None else self.lattice_gate(r.to(x.dtype))  # (B, T, n_lat)
        lattice_gates = None if lattice_logits is None else torch.sigmoid(lattice_logits)
        for j, block in enumerate(self.lattice):
            i = self.n_bottom + j
            x = x + lattice_gates[..., j:j + 1] * block(x, layer_sel[:, :, i], masks, kv[i], start_pos)
        for j, block in enumerate(self.top):
            i = self.n_bottom + c.n_lattice_layers + j
            x = x + block(x, layer_sel[:, :, i], masks, kv[i], start_pos)

        h = self.ln_f(x)
        logits = self.lm_head(h)                                                          # (B, T, V)
        horizon_hidden, kappa_logits = self.horizon(x)
        loss = aux = None
        if targets is not None:
            routers = dict(task=task_logits, patterns=pi, lattice=lattice_logits, depth=depth_frac)
            loss, aux = self.objective(logits, targets, horizon_hidden, kappa_logits, depth_frac, routers)
        return Output(logits=logits, loss=loss, hidden=h, aux=aux, horizon_hidden=horizon_hidden,
                      exit_depth=runs, confidence=torch.sigmoid(kappa_logits), patterns=sel, depth=depth,
                      lattice_gates=lattice_gates)

    def objective(self, logits, targets, horizon_hidden, kappa_logits, depth_frac, routers):
        c = self.config
        aux = {"lm": core.lm_loss(logits, targets)}
        main_pred = logits.detach().argmax(-1)                                            # what greedy picks
        valid1 = targets >= 0
        bce = lambda z, hit: F.binary_cross_entropy_with_logits(z.float(), hit, reduction="none")  # noqa: E731
        conf_sum = bce(kappa_logits[..., 0], (main_pred == targets).float()).mul(valid1).sum()
        conf_count = valid1.sum()
        loss = aux["lm"]
        if horizon_hidden is not None:
            # offsets 2..H are scored at rows (n_off, n) of the B*T positions: in training a fresh random subset
            # per offset, about horizon_sample heads' worth in all, through one unembedding matmul (each matmul
            # re-reads the V x D table); in eval every row, one offset's (B*T, V) logits at a time. Sums over drawn
            # rows are scaled by N / n and divided by counts over the full window: unbiased (core.offset_rows)
            B, T, n_off, D = horizon_hidden.shape
            N = B * T
            rows = core.offset_rows(N, n_off, logits.device, c.horizon_sample if self.training else None)
            n = rows.size(1)
            k = torch.arange(n_off, device=logits.device)[:, None]
            target_all = core.offset_targets(targets, n_off)                               # (N, n_off)
            target, agree = target_all[rows, k], core.offset_targets(main_pred, n_off)[rows, k]  # (n_off, n)
            z = horizon_hidden.reshape(N, n_off, D)[rows, k]                               # (n_off, n, D)
            valid = target >= 0
            scale = N / n
            counts = (target_all >= 0).sum(0).clamp_min(1)                                 # (n_off,)
            weight = c.horizon_gamma ** torch.arange(2, n_off + 2, device=logits.device, dtype=torch.float32)
            # loss = (CE_next + lambda_h sum_k w_k CE_k) / (1 + lambda_h), CE_k = scale sum_rows ce / count_k: the
            # offsets' part is one weighted sum of row CEs, taken in one pass over V (core.linear_lse_loss)
            coef = (c.horizon_weight / (1 + c.horizon_weight) * weight / weight.sum() * scale / counts)[:, None] * valid
            total, lse, pick, argmax = core.linear_lse_loss(z.reshape(-1, D), self.wte.weight,
                                                            target.clamp_min(0).reshape(-1), coef.reshape(-1))
            with torch.no_grad():
                ce_k = scale * ((lse - pick).view(n_off, n) * valid).sum(1) / counts          # (n_off,)
                for j in range(n_off):
                    aux[f"ce_{j + 2}"] = ce_k[j]
                aux["horizon"] = (weight * ce_k).sum() / weight.sum()
            loss = loss / (1 + c.horizon_weight) + total
            hit = (argmax.view(n_off, n) == agree).float()
            kappa_k = kappa_logits.reshape(N, -1)[:, 1:][rows, k]
            conf_sum = conf_sum + scale * bce(kappa_k, hit).mul(target >= 0).sum()
            conf_count = conf_count + (target_all >= 0).sum()
        aux["confidence"] = conf_sum / conf_count.clamp_min(1)
        aux["depth"] = depth_frac.mean()
        # routers that stay adaptive (see core.routing_information and core.router_z_loss): -I(token; choice) of
        # the task mixture, of each layer's pattern choice, of each lattice gate and of shallow vs deep (the
        # depth fraction phi_t as a two-way distribution: one adaptive layer runs exactly when phi_t >= 1/2),
        # and the z-loss on the task, pattern and lattice-gate logits (the depth gate's logit is bounded by
        # construction). Without them tau ended one-hot on one task for every token, so every token of a window got
        # the same depth and pattern, and the lattice gates shut (~4e-5)
        gates = [core.bernoulli(g) for g in (torch.sigmoid(routers["lattice"].float()) if routers["lattice"]
                                             is not None else None, routers["depth"]) if g is not None]
        aux["routing"] = (core.routing_information(routers["task"].softmax(-1))
                          + core.routing_information(routers["patterns"].softmax(-1))
                          + sum(core.routing_information(g) for g in gates))
        aux["router_z"] = core.router_z_loss(routers["task"]) + core.router_z_loss(routers["patterns"])
        if routers["lattice"] is not None:
            aux["router_z"] = aux["router_z"] + core.router_z_loss(routers["lattice"], gate=True)
        loss = (loss + c.confidence_weight * aux["confidence"] + c.depth_weight * aux["depth"]
                + c.routing_weight * aux["routing"] + c.router_z_weight * aux["router_z"])
        return loss, aux

    @staticmethod
    def draft_acceptance(out):
        """(B, T, H-1): the probability that offset k = 2..H's draft passes greedy verification, kappa_k (trained
        by BCE on whether offset k's argmax equals the main head's argmax at t + k - 1)."""
        return out.confidence[..., 1:]


def expected_calibration_error(confidence, correct, bins=10):
    """ECE: sum over equal-width bins of |mean confidence - accuracy| weighted by the bin's share of samples."""
    confidence, correct = confidence.flatten().float(), correct.flatten().float()
    which = (confidence * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.float().mean().item() * abs(confidence[inside].mean().item() - correct[inside].mean().item())
    return ece


@torch.no_grad()
def cache_bytes_against_gpt(d_model, prompt_len=64, n_layers=1, n_heads=None, vocab_size=512, **overrides):
    """Cache bytes after prefilling the same prompt into untrained chaoslogic and gpt models of the same width and
    n_layers (fp32, max_seq_len = prompt_len): {name: (bytes of the attention layers' caches, bytes of the whole
    decoding state, attention layers)}. ChaosLogic has n_lattice_layers more attention layers than gpt at equal
    n_layers, and its whole state adds the token ids and the prefix-sum checkpoint."""
    n_heads = n_heads or max(1, d_model // 64)
    kw = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=prompt_len)
    prompt = torch.randint(0, vocab_size, (1, prompt_len))
    sizes = {}
    for name, extra in (("chaoslogic", overrides), ("gpt", {})):
        model = core.build_model(name, **kw, **extra).eval()
        cache = model.new_cache(1)
        model(prompt, cache=cache)
        sizes[name] = (sum(layer.nbytes() for layer in cache.layers), cache.nbytes(), len(cache.layers))
    return sizes


if __name__ == "__main__":
    def extra(model, mode, idx, cached):
        out = model(idx[:, :-1], targets=idx[:, 1:])
        k = model.config.horizon
        main = out.logits.argmax(-1)
        # what kappa estimates: offset 1, the main argmax is the next token; offset k >= 2, its argmax is the main
        # head's argmax at t + k - 1 (what greedy verification checks)
        hits = torch.stack([(main == idx[:, 1:])] + [
            (model.readout(out.horizon_hidden[:, :, j]).argmax(-1) == core.horizon_targets(main, j + 2))
            for j in range(k - 1)], -1)
        valid = torch.stack([core.horizon_targets(idx[:, 1:], j + 1) >= 0 for j in range(k)], -1)
        ece = expected_calibration_error(out.confidence[valid], hits[valid])
        print(f"  confidence on the overfit batch: ECE {ece:.3f}; per-offset hit rate "
              + ", ".join(f"{a:.2f}" for a in (hits & valid).float().sum((0, 1)).div(valid.sum((0, 1))).tolist()))
        print(f"  patterns chosen (eval): {out.patterns.sum((0, 1, 2)).tolist()} of P0..P3; bottom depth "
              f"{out.exit_depth.mean().item():.2f} of {model.n_bottom}; lattice gates "
              f"{out.lattice_gates.mean().item():.2f}")
        for d, L in ((128, 4), (256, 4), (768, 16)):
            sizes = cache_bytes_against_gpt(d, n_layers=L)
            (cl, cl_all, cl_layers), (gpt, _, gpt_layers) = sizes["chaoslogic"], sizes["gpt"]
            print(f"  cache after a 64-token prompt, d_model={d}, n_layers={L}: chaoslogic {cl:,} B of latents in "
                  f"{cl_layers} attention layers ({cl_all:,} B with the task analyzer's state) vs gpt {gpt:,} B "
                  f"in {gpt_layers}: {gpt / cl_all:.2f}x smaller in all, {(gpt / gpt_layers) / (cl / cl_layers):.2f}x"
                  f" per layer")

    core.lm_selftest("chaoslogic", lambda **kw: Model(core.make_config(Config, kw)), T=40, prompt_len=8,
                     extra=extra)
    m = Model(Config())
    groups = {"embedding": m.wte.weight.numel() + sum(p.numel() for p in m.pe.parameters()),
              "bottom": sum(p.numel() for p in m.bottom.parameters()),
              "lattice": sum(p.numel() for p in m.lattice.parameters()) + sum(p.numel() for p in m.lattice_gate.parameters()),
              "top": sum(p.numel() for p in m.top.parameters()),
              "horizon + confidence": sum(p.numel() for p in m.horizon.parameters()),
              "task / depth / selector": sum(p.numel() for p in m.task.parameters()) + m.selector_weight.numel()
              + m.selector_bias.numel()}
    print("default config parameters by part: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()))
