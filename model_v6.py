"""HST v6: a spine-lattice language model with a token mode and a causal hierarchical chunk mode, horizon heads
that draft for lossless speculative decoding, context injection, and the HierarchicalPredictiveLoss.

Token mode: embed -> adaptive bottom blocks with a per-token exit head after each (CALM, Schuster et al. 2022: dense
in training with a CALM target, a token stops at inference once its confidence passes exit_threshold, calibrated
from a held-out loss tolerance by core.calibrate_exit, and its skipped layers still cache K/V) -> causal spine
attention (core.SpineBlock: every position reads itself, a local window and its spine-offset predecessors t - 1, 2,
4, 12, 36, ..., heads grouped by spine level) -> top blocks -> tied unembedding (core.SpineTrunk).

Chunk mode (MEGABYTE, Yu et al. 2023; Block Transformer, Ho et al. 2024): a chunk encoder turns each chunk of
`chunk_size` tokens into one vector; a global model (the same SpineTrunk, over chunk slots, fed shifted so slot c
summarises chunks < c) runs over them; a local decoder predicts every token of chunk c with grouped causal
self-attention and cross-attention to the last `cross_window` global outputs. The cross-attention K/V of a global
slot are projected once, when the slot is computed, and cached beside it.

Horizon heads (Medusa, Cai et al. 2024): offset k at position t predicts token t+k through the tied unembedding.
They draft for speculative decoding, verified by the model in one cached pass (Leviathan et al. 2023, Chen et al.
2023), so greedy output equals plain greedy and sampled output has the model's distribution.

Context injection (chunk mode): `with model.inject([(tokens, anchor)]): model.generate(...)` encodes a token block
into one memory slot per token and reads it through zero-initialised tanh-gated cross-attention (Flamingo) at the
global model's input at chunk slots >= anchor (a spine position) and in every local decoder layer for the tokens of
chunks >= anchor, and through an induction read on the output (InductionRead: what followed the current token in the
passage), so predictions of tokens in chunks before the anchor never see it. Training injects the passage just
before each window (information the window lacks) into half the rows.

Objective, the HierarchicalPredictiveLoss: next-token CE and lambda_k = beta gamma^(k-2) weighted horizon CE as a
weighted mean (so it starts near ln V), plus a consistency KL that pulls offset k at t toward the main head's own
later prediction of the same token; plus the exit heads' BCE.

What it does differently from the original HST v6 scripts, and why:
- Causal everywhere: the originals' lattice and chunk encoders were bidirectional, chunk vectors were visible to
  their own tokens and the local decoder was fed the token it had to predict, so their training loss measured
  copying. Here every output at position t depends on tokens <= t only (a test perturbs the future).
- Cached decoding uses the same masks as the full forward; the cross-attention memory is projected, not re-fed raw.
- Injection is added causally at its anchor instead of overwriting a chunk.
- Drafts are verified losslessly; no parameter is left untrained (the exit heads are fitted, the injection trains
  on the passage before each window, with injection dropout).
Longer notes: docs/v6_v7.md.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import core
import generate


# -----------------------------------------------------------------------------
# chunk mode: a local decoder that cross-attends to the global outputs, and context injection
#
# The local decoder of chunk c cross-attends to a window of the global outputs g_{c-w+1..c}; each summarises chunks
# before its slot, so the window is causal. Context injection encodes an external token block into a few memory
# slots and adds it, through a zero-initialised gate, to the global model's input at slots >= its anchor.

class WindowCrossAttention(nn.Module):
    """Each query attends to its own few memory slots: x (B, U, D), kv (B, U, S, 2D) projected by `project`, mask
    (U, S) or (B, U, S) of readable slots. A query with no readable slot gets exactly zero."""

    def __init__(self, d_model, n_heads, bias=False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def project(self, memory):
        return self.kv(memory)  # (..., S, D) -> (..., S, 2D)

    def forward(self, x, kv, mask):
        B, U, D = x.shape
        nh, hd = self.n_heads, self.head_dim
        q = self.q(x).view(B, U, nh, hd)
        k, v = kv.view(B, U, kv.size(2), 2, nh, hd).unbind(3)                       # (B, U, S, nh, hd)
        scores = torch.einsum("buhd,bushd->buhs", q, k).float() / math.sqrt(hd)     # fp32: -1e9 fits
        mask = mask[..., None, :]                                                    # (.., U, 1, S)
        # a finite fill keeps the softmax and its gradient nan-free when nothing is readable; those rows are zeroed
        probs = scores.masked_fill(~mask, -1e9).softmax(-1) * mask.any(-1, keepdim=True)
        return self.proj(torch.einsum("buhs,bushd->buhd", probs.to(v.dtype), v).reshape(B, U, D))


class CrossBlock(core.GroupedBlock):
    """Grouped causal self-attention, then cross-attention to the group's window of global outputs, then (when a
    context is injected) gated cross-attention to the injected memory slots its group may read, then the MLP."""

    def __init__(self, d_model, n_heads, group_size, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, group_size, bias, dropout)
        self.ln_x = core.LayerNorm(d_model, bias)
        self.xattn = WindowCrossAttention(d_model, n_heads, bias)
        self.inject_ln = core.LayerNorm(d_model, bias)
        self.inject_xattn = WindowCrossAttention(d_model, n_heads, bias)
        self.inject_gate = nn.Parameter(torch.zeros(()))   # tanh(0) = 0: an untrained injection changes nothing

    def forward(self, x, kv_mem, mem_mask, kv_cache=None, start_pos=0, inject_kv=None, inject_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        x = x + self.xattn(self.ln_x(x), kv_mem, mem_mask)
        if inject_kv is not None:  # (B, S, 2D) projected once per injection, read by every query
            kv = inject_kv[:, None].expand(x.size(0), x.size(1), -1, -1)
            x = x + torch.tanh(self.inject_gate) * self.inject_xattn(self.inject_ln(x), kv, inject_mask)
        return x + self.mlp(self.ln_2(x))


class InductionRead(nn.Module):
    """The output read of an injected passage, an induction head over it (Olsson et al. 2022): position t matches its
    own token x_t against each memory slot's predecessor and reads the slot, i.e. what followed x_t in the passage.
    Query and key share one projection, and it and the value start as the identity (plain Parameters, which the
    model's N(0, 0.02) init skips): at init a query already puts most of its weight on the slots that follow its own
    token (score sqrt(head_dim) for an equal token against ~N(0, 1) for another; a N(0, 0.02) projection gave every
    score ~0.3, uniform attention, and the read learned only a passage-wide average on real text), and the value
    is the slot itself, which the tied unembedding reads as its token. So the gate's first gradient already says
    whether copying helps. The result is normed and added through a zero-initialised gate to the final normed
    hidden state, right before the tied unembedding: there its scale does not compete with the residual stream's
    (the cross-attention reads inside the network, diluted by a residual dominated by position and global-context
    terms, learned no key -> value recall at the tiny sizes). x (B, T, D) token embeddings, kv (B|1, S, 2D) from
    `project`, mask (T, S) or (B, T, S)."""

    def __init__(self, d_model, n_heads, bias=False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.ln = core.LayerNorm(d_model, bias)
        self.match = nn.Parameter(torch.eye(d_model))           # query and key projection, identity at init
        self.value = nn.Parameter(torch.eye(d_model))
        self.out_ln = core.LayerNorm(d_model, bias)
        self.gate = nn.Parameter(torch.zeros(()))               # tanh(0) = 0: an untrained read changes nothing

    def project(self, memory, first):
        """memory (B|1, S, D), first (S,) or (B, S): slots that start a block (no predecessor) -> K/V (B|1, S, 2D)."""
        prev = F.pad(memory[:, :-1], (0, 0, 1, 0)).masked_fill(first[..., None], 0.0)
        return torch.cat([F.linear(self.ln(prev), self.match), F.linear(memory, self.value)], -1)

    def forward(self, x, kv, mask):
        B, T, D = x.shape
        nh, hd = self.n_heads, self.head_dim
        q = F.linear(self.ln(x), self.match).view(B, T, nh, hd)
        k, v = kv.view(kv.size(0), kv.size(1), 2, nh, hd).unbind(2)                 # (B|1, S, nh, hd)
        scores = torch.einsum("bthd,bshd->bhts", q, k.expand(B, -1, -1, -1)).float() / math.sqrt(hd)
        probs = scores.masked_fill(~mask.unsqueeze(-3), -1e9).softmax(-1)            # finite fill: no nan
        read = torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v.expand(B, -1, -1, -1)).reshape(B, T, D)
        readable = mask.any(-1, keepdim=True)                                        # (T, 1) or (B, T, 1)
        return torch.tanh(self.gate) * self.out_ln(read) * readable   # rows that read nothing stay exactly zero


class CrossLocalDecoder(core.LocalDecoder):
    """A local decoder whose blocks also cross-attend to the last `window` global outputs g_{c-window+1..c} of their
    group c (the additive conditioning on g_c stays)."""

    def __init__(self, d_model, n_heads, n_layers, chunk_size, window, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, n_layers, chunk_size, bias, dropout)
        self.window = window
        self.blocks = nn.ModuleList(CrossBlock(d_model, n_heads, chunk_size, bias, dropout) for _ in range(n_layers))

    def project_memory(self, g):
        """g (B, S, D) -> (B, n_layers, S, 2D): every layer's cross K/V of these global slots, computed once."""
        return torch.stack([b.xattn.project(g) for b in self.blocks], 1)

    def forward(self, x, g, memory, caches=None, start=0, injection=None):
        """x (B, U, D) slot inputs from stream slot `start`; g (B, n, D) global outputs and memory their projected
        K/V (B, n_layers, n, 2D), indexed by global slot; injection None or a ProjectedInjection, whose slot s
        group c reads when c >= its anchor (group c predicts the tokens of chunk c)."""
        slot = torch.arange(start, start + x.size(1), device=x.device)               # (U,) stream slots
        group = slot // self.chunk_size
        window = group[:, None] - torch.arange(self.window, device=x.device)         # (U, w) own slot first
        mask = window >= 0
        window = window.clamp_min(0)
        inject_mask = None if injection is None else injection.visible(group)        # (U, S) or (B, U, S)
        h = x + self.wpe(slot % self.chunk_size) + self.cond(g[:, group])
        for i, block in enumerate(self.blocks):
            inject_kv = None if injection is None else injection.local_kv[:, i].expand(x.size(0), -1, -1)
            h = block(h, memory[:, i][:, window], mask, None if caches is None else caches[i], start, inject_kv,
                      inject_mask)
        return h


class CrossChunkCache(core.ChunkCache):
    """core.ChunkCache plus the local decoder's cross K/V per global slot (B, n_layers, n_slots, 2D). Like the global
    outputs they are written by slot index when the slot is (re)computed, so rollback needs no more than
    core.ChunkCache's pointers. `injection` keeps the injected memory's K/V (a ProjectedInjection), projected once
    by the call that starts the cache and read by every later call (decode steps, speculative verification)."""

    def __init__(self, local_layers, global_cache, tokens, context, cross_kv, chunk_size):
        super().__init__(local_layers, global_cache, tokens, context, chunk_size)
        self.cross_kv = cross_kv
        self.injection = None

    def nbytes(self):
        extra = 0 if self.injection is None else self.injection.nbytes()
        return super().nbytes() + self.cross_kv.nelement() * self.cross_kv.element_size() + extra


@dataclass
class ProjectedInjection:
    """Injected memory, projected once: anchors (S,) or per row (B, S) chunk indices, the global model's K/V
    global_kv (B|1, S, 2D) and every local decoder layer's K/V local_kv (B|1, n_local_layers, S, 2D)."""
    anchors: torch.Tensor
    global_kv: torch.Tensor
    local_kv: torch.Tensor
    read_kv: torch.Tensor

    def visible(self, group):
        """group (U,) chunk indices -> (U, S), or (B, U, S) for per-row anchors: which memory slots each may read."""
        if self.anchors.dim() == 1:
            return group[:, None] >= self.anchors[None]
        return group[None, :, None] >= self.anchors[:, None]

    def nbytes(self):
        return sum(t.nelement() * t.element_size() for t in (self.global_kv, self.local_kv, self.read_kv))


class CrossAttentionChunkDecoder(core.ChunkHierarchy):
    """Chunk mode of v6 / v7.1.2: core.ChunkHierarchy with the cross-attending local decoder and context injection.

    Incremental generation keeps three caches in a CrossChunkCache: the local decoder's self-attention K/V, the
    cross-attention K/V projected once per global slot, and the global model's cache, advanced once per completed
    chunk. forward(idx, embed, cache, start_pos, injections, **global_kwargs) -> (hidden (B, T, D), rest) as
    core.ChunkHierarchy; `injections` is None or (memory (B|1, S, D), anchors (S,) or (B, S) long): memory slot s is
    visible to global slots >= anchors[s] and to the local decoder's tokens of chunks >= anchors[s], i.e. to the
    predictions of tokens in chunks >= anchors[s] (logits at positions >= anchor * C - 1). Its K/V are projected once
    per forward without a cache, or once per cache (`projected`, kept in CrossChunkCache.injection); the model adds
    the output read (`read_injection`) after its final norm."""

    def __init__(self, global_model, d_model, n_heads, n_local_layers, chunk_size, max_seq_len, window=4,
                 bias=False, dropout=0.0):
        super().__init__(global_model, d_model, n_heads, n_local_layers, chunk_size, max_seq_len, bias, dropout)
        self.local = CrossLocalDecoder(d_model, n_heads, n_local_layers, chunk_size, window, bias, dropout)
        # injection: the block's token embeddings + their distance from the block's end, normed -> memory slots,
        # read by gated cross-attention in the global model (slots >= anchor) and in every local decoder layer
        self.inject_pos = nn.Embedding(max_seq_len, d_model)
        self.inject_norm = core.LayerNorm(d_model, bias)
        self.inject_ln = core.LayerNorm(d_model, bias)
        self.inject_xattn = WindowCrossAttention(d_model, n_heads, bias)
        self.inject_gate = nn.Parameter(torch.zeros(()))   # tanh(0) = 0: an untrained injection changes nothing
        self.inject_read = InductionRead(d_model, n_heads, bias)   # the output read: copies what followed

    def new_cache(self, batch_size, device, dtype):
        base = super().new_cache(batch_size, device, dtype)
        D = self.bos.numel()
        cross = torch.zeros(batch_size, len(self.local.blocks), self.n_slots, 2 * D, device=device, dtype=dtype)
        return CrossChunkCache(base.layers, base.global_cache, base.tokens, base.context, cross, self.chunk_size)

    def encode_injection(self, embed, tokens):
        """tokens (B, L), L <= max_seq_len -> memory (B, L, D): one slot per token of the block, its embedding plus
        an embedding of its distance from the block's end, normed. Per-token slots let the readers copy and match
        exact tokens (a pooled summary could not); the cross-attention K/V are projected from them once."""
        from_end = torch.arange(tokens.size(1) - 1, -1, -1, device=tokens.device)
        return self.inject_norm(embed(tokens) + self.inject_pos(from_end))

    def project_injection(self, memory, anchors):
        """memory (B|1, S, D), anchors (S,) or (B, S) -> ProjectedInjection: the K/V of the global model's and of
        every local layer's injection cross-attention, computed once per injection."""
        local_kv = torch.stack([b.inject_xattn.project(memory) for b in self.local.blocks], 1)
        first = torch.ones_like(anchors, dtype=torch.bool)                    # slots that start a block
        first[..., 1:] = anchors[..., 1:] != anchors[..., :-1]
        return ProjectedInjection(anchors, self.inject_xattn.project(memory), local_kv,
                                  self.inject_read.project(memory, first))

    def projected(self, injections, cache=None, start_pos=0):
        """injections None or (memory, anchors) -> ProjectedInjection or None: projected once per forward without a
        cache, once per cache with one (kept in CrossChunkCache.injection and read by every later call)."""
        if injections is None:
            if cache is not None and start_pos == 0:
                cache.injection = None
            return None
        if cache is None:
            return self.project_injection(*injections)
        if start_pos == 0 or cache.injection is None:
            cache.injection = self.project_injection(*injections)
        return cache.injection

    def read_injection(self, h, x, start_pos, injection):
        """The induction read on the output: h (B, T, D) final normed states, x (B, T, D) the input tokens'
        embeddings from position start_pos; output t predicts token start_pos + t + 1, of chunk
        (start_pos + t + 1) // chunk_size, and reads the slots that chunk may read."""
        group = torch.arange(start_pos + 1, start_pos + h.size(1) + 1, device=h.device) // self.chunk_size
        return h + self.inject_read(x, injection.read_kv, injection.visible(group))

    def _inject(self, x, slots, injection):
        if injection is None:
            return x
        B = x.size(0)
        kv = injection.global_kv.expand(B, -1, -1)                                # (B, S, 2D)
        mask = injection.visible(slots)                                           # (N, S) or (B, N, S)
        update = self.inject_xattn(self.inject_ln(x), kv[:, None].expand(B, x.size(1), -1, -1), mask)
        return x + torch.tanh(self.inject_gate) * update

    def _local_full(self, stream, g, injection=None):
        return self.local(stream, g, self.local.project_memory(g), injection=injection)

    def _store_context(self, cache, lo, hi, g):
        super()._store_context(cache, lo, hi, g)
        cache.cross_kv[:, :, lo:hi] = self.local.project_memory(g)     # projected once per global slot

    def _local_cached(self, stream, cache, first, end, injection=None):
        return self.local(stream, cache.context, cache.cross_kv, cache.layers, first, injection)


def check_anchor(anchor, max_seq_len, chunk_size, spine_only=True):
    """An injection anchor is a chunk index below max_seq_len // chunk_size and, when spine_only, on the spine."""
    n_chunks = max_seq_len // chunk_size
    if not isinstance(anchor, int) or not 0 <= anchor < n_chunks:
        raise core.UsageError(f"injection anchor {anchor!r} is out of range: chunk indices run 0..{n_chunks - 1} "
                         f"(max_seq_len={max_seq_len} // chunk_size={chunk_size})")
    spine = core.spine_positions(n_chunks)
    if spine_only and anchor not in spine:
        raise core.UsageError(f"injection anchor {anchor} is not a spine position; use one of {spine}")


def hierarchical_predictive_loss(h, unembed, targets, horizon_hidden, beta=0.3, gamma=0.8, consistency=0.1,
                                 sample=False):
    """v6's training objective, the HierarchicalPredictiveLoss, for final hidden states h (B, T, D) read through
    the tied unembedding (V, D):
    (CE_main + sum_k lambda_k CE_k) / (1 + sum_k lambda_k) + consistency * mean_k KL(sg(p_main[t+k-1]) || q_k[t]),
    lambda_k = beta * gamma^(k-2) for offsets k = 2..H. The CE part is a weighted mean, so the objective starts near
    ln V; the consistency term pulls offset k at t toward the main head's own later prediction of the same token.
    Targets of -1 are ignored everywhere. With p the main head and q_k = softmax(z W^T) offset k's,
    KL = sum p log p - z . (p W) + lse(z W^T): its first two terms come from the main head's pass
    (core.linear_lse_loss with pull, which returns S = p W and so sum p log p = h . S - lse), the last from the
    offsets' pass (core.linear_lse_loss),
    so no (B, T, V) tensor is materialised beyond the logits handed back, and none of (B, T, H, V). sample=True
    (training) reads each offset out at a random 1/(H-1) of the positions, all offsets in one pass over the
    unembedding: the unbiased estimate of core.horizon_loss, for the CE and the KL alike. aux's parts are values
    (no gradient). -> (loss, {"lm", "horizon", "consistency"}, logits (B, T, V) without a graph)."""
    B, T, D = h.shape
    N, V = B * T, unembed.size(0)
    flat_targets = targets.reshape(-1)
    n_main = (flat_targets >= 0).sum().clamp_min(1)
    if horizon_hidden is None:
        a = (flat_targets >= 0) / n_main
        total, lse, pick, _, logits = core.linear_lse_loss(h.reshape(N, D), unembed, flat_targets.clamp_min(0), a,
                                                           keep_logits=True)
        return total, {"lm": total.detach()}, logits.view(B, T, V)
    n_off = horizon_hidden.size(2)
    lams = beta * gamma ** torch.arange(n_off, device=h.device, dtype=torch.float32)   # lambda_k, k = j + 2
    lam_sum = lams.sum()
    rows = core.offset_rows(N, n_off, h.device, 1.0 if sample else None)               # (n_off, n)
    k = torch.arange(n_off, device=h.device)[:, None]
    target_all = core.offset_targets(targets, n_off)                                   # (N, n_off)
    target = target_all[rows, k]                                                       # (n_off, n)
    z = horizon_hidden.reshape(N, n_off, D)[rows, k]                                   # (n_off, n, D)
    # per row: 1 / #targets of its offset (counted on the full window), times N / n for a sampled row: unbiased
    w = ((N / rows.size(1)) / (target_all >= 0).sum(0).clamp_min(1))[:, None] * (target >= 0)   # (n_off, n)
    # the main head at t+k-1 predicts the same token as offset k at t: flattened row r + k - 1, in the same
    # window wherever w > 0 (offset k at t has a target only if t + k - 1 < T); the others carry weight 0
    main_row = (rows + k + 1).clamp_max(N - 1).reshape(-1)
    kl_w = (consistency / n_off) * w.reshape(-1)
    zsum = torch.zeros(N, D, device=h.device).index_add_(0, main_row, kl_w[:, None] * z.reshape(-1, D).float())
    a_main = (flat_targets >= 0) / (n_main * (1 + lam_sum))
    total_main, lse_m, pick_m, _, logits, expected = core.linear_lse_loss(
        h.reshape(N, D), unembed, flat_targets.clamp_min(0), a_main, keep_logits=True, pull=zsum)
    # offsets: CE_k = lse - pick, and the KL's lse(z W^T), share one pass over V
    a = (lams[:, None] * w / (1 + lam_sum)).reshape(-1) + kl_w
    b = (lams[:, None] * w / (1 + lam_sum)).reshape(-1)
    total_h, lse, pick, _ = core.linear_lse_loss(z.reshape(-1, D), unembed, target.clamp_min(0).reshape(-1), a, b)
    with torch.no_grad():
        neg_entropy = (h.reshape(N, D).float() * expected).sum(-1) - lse_m                    # sum p log p, (N,)
        kl_const = (kl_w * neg_entropy[main_row]).sum()    # the KL's sum p log p: a constant (p is stop-grad)
        lse, pick = lse.view(n_off, -1), pick.view(n_off, -1)
        zs_dot = (z.reshape(-1, D).float() * expected[main_row]).sum(-1)                     # z . (p W)
        aux = {"lm": ((lse_m - pick_m) * (flat_targets >= 0)).sum() / n_main,
               "horizon": (lams[:, None] * w * (lse - pick)).sum() / lam_sum,
               "consistency": (w.reshape(-1) * (neg_entropy[main_row] - zs_dot + lse.reshape(-1))).sum() / n_off}
    return total_main + total_h + kl_const, aux, logits.view(B, T, V)


# -----------------------------------------------------------------------------
# the model

@dataclass
class ChunkInjectionConfig(core.SpineConfig):
    """The spine-lattice fields (core.SpineConfig) plus chunk mode and context injection: v6 and v7.1.2."""
    chunk_size: int = 8               # chunk mode: tokens per chunk
    n_local_layers: int = 2           # chunk mode: local decoder layers (n_layers is the global model)
    cross_window: int = 4             # chunk mode: global outputs g_{c-w+1..c} the local decoder cross-attends to
    inject_train_prob: float = 0.5    # chunk mode training: share of rows given their preceding passage (0: none)
    inject_spine_only: bool = True    # injection anchors must be spine positions
    spine_attention_blocks: int = 1   # blocks of causal spine attention between bottom and top (0: none)
    spine_window: int = 4             # every spine-attention head also reads the keys at distance < spine_window
    modes: ClassVar[tuple] = ("token", "chunk")

    def __post_init__(self):
        super().__post_init__()
        if min(self.chunk_size, self.n_local_layers, self.cross_window, self.spine_window) < 1:
            raise core.UsageError("chunk_size, n_local_layers, cross_window and spine_window must be positive")
        if self.spine_attention_blocks < 0:
            raise core.UsageError(f"spine_attention_blocks={self.spine_attention_blocks} must be >= 0")
        if not 0.0 <= self.inject_train_prob <= 1.0:
            raise core.UsageError(f"inject_train_prob={self.inject_train_prob} must lie in [0, 1]")


@dataclass
class Config(ChunkInjectionConfig):
    horizon_weight: float = 0.3       # beta of the HierarchicalPredictiveLoss: lambda_k = beta * gamma^(k-2)
    horizon_gamma: float = 0.8        # gamma of the HierarchicalPredictiveLoss
    consistency_weight: float = 0.1   # weight of KL(sg(p_main[t+k-1]) || q_k[t])


class Model(core.LM):
    """Token mode: wte + wpe -> SpineTrunk -> ln_f -> tied head (+ horizon). Chunk mode: wte -> chunk encoder ->
    global SpineTrunk over chunk slots (+ injection) -> cross-attending local decoder -> ln_f -> tied head
    (+ horizon). A variant that builds on v6 (v7.1.2) replaces `build_horizon` and `objective`."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n_top = c.n_layers - c.n_bottom_layers
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        spine = dict(spine_blocks=c.spine_attention_blocks, spine_window=c.spine_window)
        if c.mode == "token":
            self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
            self.trunk = core.SpineTrunk(c.d_model, c.n_heads, c.n_bottom_layers, n_top, c.max_seq_len, c.bias,
                                         c.dropout, **spine)
        else:
            n_slots = c.max_seq_len // c.chunk_size + 1
            trunk = core.SpineTrunk(c.d_model, c.n_heads, c.n_bottom_layers, n_top, n_slots, c.bias, c.dropout,
                                    **spine)
            self.chunk = CrossAttentionChunkDecoder(trunk, c.d_model, c.n_heads, c.n_local_layers, c.chunk_size,
                                                    c.max_seq_len, c.cross_window, c.bias,
                                                    c.dropout)
        self.ln_f = core.LayerNorm(c.d_model, c.bias)
        self.lm_head = core.Unembedding(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017); the horizon heads read it too
        self.horizon = self.build_horizon(c)
        self._injections = None
        self.apply(core.init_weights)  # zero-initialised gates and heads are plain Parameters: init_weights skips them
        core.scale_residual_projections(self, c.n_layers + c.spine_attention_blocks)

    def build_horizon(self, c):
        """Offsets 2..horizon: h (B, T, D) -> (B, T, H-1, D), read through the tied unembedding."""
        return core.HorizonHeads(c.d_model, c.horizon) if c.horizon > 1 else None

    def objective(self, h, targets, horizon_hidden):
        """-> (loss, aux, logits): the loss reads the logits in the same pass that writes them."""
        c = self.config
        return hierarchical_predictive_loss(h, self.wte.weight, targets, horizon_hidden, c.horizon_weight,
                                            c.horizon_gamma, c.consistency_weight,
                                            sample=self.training and c.horizon_sampling)

    def forward(self, idx, targets=None, cache=None, start_pos=0, injections=None, context=None):
        """context (B, L): training only, a neighbouring passage of each window (train.py hands the max_seq_len
        tokens before it); a random share inject_train_prob of the rows gets it injected (_training_injection)."""
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        if context is not None and not self.training:
            raise core.UsageError("context= is the training signal of injection; at inference inject with "
                                  "injections=[(model.encode_injection(tokens), anchor)] or `with model.inject(...)`")
        if c.mode == "token":
            if injections or context is not None:
                raise core.UsageError("context injection needs mode='chunk' (it anchors at chunk indices)")
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))                              # (B, T, D)
            h, exit_loss, exit_depth = self.trunk(x, cache, start_pos, c.exit_threshold, self.head_logits,
                                                  targets)                                    # (B, T, D)
        else:
            inj = self._stack_injections(injections) if injections else self._injections
            if inj is None and context is not None:
                inj = self._training_injection(context, T)
            # chunk encoder -> global trunk over slots (+ injection) -> local decoder; exits are per global slot
            inj = self.chunk.projected(inj, cache, start_pos)           # K/V once per forward or per cache
            h, rest = self.chunk(idx, lambda ids: self.drop(self.wte(ids)), cache, start_pos, inj,
                                 exit_threshold=c.exit_threshold, readout=self.head_logits)  # (B, T, D)
            exit_loss, exit_depth = None if rest is None else rest[0], None
        h = self.ln_f(h)
        if c.mode == "chunk" and inj is not None:                                     # the injection's output read
            h = self.chunk.read_injection(h, self.wte(idx), start_pos, inj)
        horizon_hidden = None if self.horizon is None else self.horizon(h)            # (B, T, H-1, D)
        loss = aux = None
        if targets is None:
            logits = self.lm_head(h)                                                  # (B, T, V)
        else:  # the objective's pass over the unembedding writes the logits (without a graph: the loss has it)
            loss, aux, logits = self.objective(h, targets, horizon_hidden)
            if exit_loss is not None:
                aux["exit"] = exit_loss
                loss = loss + core.EXIT_LOSS_WEIGHT * exit_loss
        return core.Output(logits=logits, loss=loss, hidden=h, aux=aux, horizon_hidden=horizon_hidden,
                           exit_depth=exit_depth)

    # ---- context injection (chunk mode)
    def encode_injection(self, tokens):
        """tokens (L,) or (B, L), 1 <= L <= max_seq_len -> memory (B, ceil(L / chunk_size), D)."""
        c = self.config
        if c.mode != "chunk":
            raise core.UsageError("context injection needs mode='chunk' (it anchors at chunk indices)")
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        if not 1 <= tokens.size(1) <= c.max_seq_len:
            raise core.UsageError(f"an injected block holds {tokens.size(1)} tokens; it needs 1 to max_seq_len="
                                  f"{c.max_seq_len} (split a longer text into several blocks at several anchors)")
        return self.chunk.encode_injection(self.wte, tokens)

    def _stack_injections(self, injections):
        """[(memory (m, D) | (B, m, D), anchor), ...] -> (memory (B|1, S, D), anchors (S,)) after checking anchors."""
        c = self.config
        memories, anchors = [], []
        for memory, anchor in injections:
            check_anchor(anchor, c.max_seq_len, c.chunk_size, c.inject_spine_only)
            memory = memory[None] if memory.dim() == 2 else memory
            memories.append(memory)
            anchors.append(torch.full((memory.size(1),), anchor, dtype=torch.long, device=memory.device))
        return torch.cat(memories, 1), torch.cat(anchors)

    @contextlib.contextmanager
    def inject(self, blocks):
        """Within the block every forward (and so generate, cached, uncached or speculative) sees the injected
        context: blocks = [(tokens (L,), anchor), ...], anchors being chunk indices on the spine."""
        with torch.no_grad():
            memories = [(self.encode_injection(tokens), anchor) for tokens, anchor in blocks]
            stacked = self._stack_injections(memories)
        previous, self._injections = self._injections, stacked
        try:
            yield self
        finally:
            self._injections = previous

    @property
    def train_context_len(self):
        """Tokens of neighbouring passage each training window wants (train.py's loader hands them): max_seq_len in
        chunk mode with inject_train_prob > 0, else 0."""
        c = self.config
        return c.max_seq_len if c.mode == "chunk" and c.inject_train_prob > 0 else 0

    def _training_injection(self, context, T):
        """context (B, L): a passage from outside each window (the tokens before it), i.e. information the window
        lacks, encoded as a block and injected at a random spine anchor in the window's first half, for a random
        share inject_train_prob of the rows (injection dropout keeps the unconditioned model intact); the other
        rows get an anchor past the last slot, so they see nothing."""
        c = self.config
        B = context.size(0)
        memory = self.chunk.encode_injection(self.wte, context)                     # (B, m, D)
        spine = torch.tensor(core.spine_positions(T // c.chunk_size // 2 + 1), device=context.device)
        anchor = spine[torch.randint(len(spine), (B, 1), device=context.device)]     # (B, 1)
        keep = torch.rand(B, 1, device=context.device) < c.inject_train_prob
        anchors = torch.where(keep, anchor, self.chunk.n_slots).expand(B, memory.size(1))  # (B, m)
        return memory, anchors

    # ---- decoding
    def speculative_stats(self, idx, max_new_tokens, temperature=0.0, draft_len=4, **kw):
        """Tokens per model call, acceptance per draft head, and the speed-up over plain cached decoding."""
        return generate.speculative_stats(self, idx, max_new_tokens, temperature, draft_len, **kw)

    def generate_ultra_fast(self, idx, max_new_tokens, temperature=0.0, draft_len=4, **kw):
        """The original v6 name for lossless speculative generation (drafts from the horizon heads)."""
        return self.generate(idx, max_new_tokens, temperature=temperature, speculative=True, draft_len=draft_len,
                             **kw)


def selftest(module, name):
    """core.lm_selftest for v6 and the variants built on it (v7.1.2), both modes, plus speculative statistics
    and (chunk mode) an injection that leaves predictions before its anchor unchanged."""
    def extra(model, mode, idx, cached):
        speculative, stats = model.speculative_stats(idx[:1, :11], 24)
        assert torch.equal(cached, speculative)
        print(f"  speculative statistics: {stats['tokens_per_call']:.2f} tokens per model call, acceptance per "
              f"head " + ", ".join(f"{a:.2f}" for a in stats["acceptance_per_head"])
              + f", speed-up {stats['speedup']:.2f}x")
        if mode == "chunk":
            C, anchor, x = model.config.chunk_size, 2, idx[:, :-1]
            # plumbing check: an untrained gate is exactly zero, so open it by hand to show the anchor mask
            with torch.no_grad():
                model.chunk.inject_gate.fill_(0.5)
            with model.inject([(idx[1], anchor)]):
                injected = model(x).logits
            plain = model(x).logits
            assert torch.equal(injected[:, :anchor * C - 1], plain[:, :anchor * C - 1])
            print(f"  injection at chunk {anchor}: predictions before it unchanged, after it max change "
                  f"{(injected - plain).abs().max().item():.2e} (gate tanh({model.chunk.inject_gate.item():.3f}))")

    core.lm_selftest(name, lambda **kw: module.Model(core.make_config(module.Config, kw)), ("token", "chunk"),
                overfit_below=0.8, extra=extra)


if __name__ == "__main__":
    import sys
    selftest(sys.modules[__name__], "v6")
