"""HST v4.1 HyperLattice: a GPT whose middle is a causal hyper-lattice block, decoded through a paged KV cache.

What it computes: embeddings -> n_bottom_layers blocks -> OffsetRoutingLattice -> the remaining blocks -> LN_f ->
tied LM head (Press & Wolf 2017), plus horizon heads. What it combines:
- Paged KV cache (vLLM's PagedAttention, Kwon et al. 2023), in paged_cache.py: fixed 16-token blocks from a
  pool that grows on demand, one block table per sequence shared by every layer, a free list, reference counts
  with copy-on-write for shared prefixes (fork also copies the lattice's node rows), and truncation for
  speculative rollback. `new_cache` returns one, so `generate(use_cache=True)` and speculative decoding attend
  through block tables; forward takes per-row start positions, so `generate` runs prompts of different lengths
  as one ragged batch.
- Causal hyper-lattice block (the original's HyperLatticeBlock): node features n_t = GELU(LN(W_n x_t)) are mixed
  over a window of W earlier positions with weights a_{t,o} = softmax_o(w_o + r_{t,o}), where w are learnable
  lattice weights per *relative* offset o = t - j and r_t = W_r LN(x_t) is per-token content routing, much like a
  dynamic lightweight convolution (Wu et al. 2019). W_r starts random with unit-scale logits, and the objective adds
  0.2 * core.routing_information (minus the information between a token's content and its offsets) and 1e-3 *
  core.router_z_loss (ST-MoE): started at zero and trained by the language-model loss alone, every token kept
  nearly the same mixture of its window (TV 0.003 from the mean routing). At weight 0.01 the routing still
  collapsed onto one static mixture in 2 of 3 seeds (TV 0.006-0.009 after 80 steps on bytes); at 0.2 every seed
  routed per token (TV 0.71-0.75) and held-out loss was lower on 4 of 4 seeds (250 steps: 2.58-2.69 against
  2.70-3.10).
  The mix is one banded lower-triangular matrix product; an edge MLP and a gate fold the message back into the
  stream. Decoding keeps every position's node features.
- Horizon heads at every position (Medusa-style, Cai et al. 2024): offset k = 2..horizon at t predicts token t+k
  through LN(h + U_k h) and the tied unembedding, trained with core.horizon_objective and drafting for lossless
  speculative decoding (Leviathan et al. 2023; Chen et al. 2023). Draft confidence heads (a linear map of the
  detached final state, trained by BCE on whether offset k's argmax equals the main head's at t + k - 1) give
  Output.acceptance, from which speculative decoding chooses each round's draft length.

What it does differently from the original script, and why:
- Every layer is causal (the original's bottom stack was a bidirectional nn.TransformerEncoderLayer) and cached
  (the original decoded its bottom stack on the new token alone).
- The lattice weights are per relative offset and receive gradients (the original indexed a 48x48 table by
  absolute position, past and future alike, and rebuilt it with torch.tensor, which detached it); routing is
  content-based, vectorized, and applies at every position instead of the first 48.
- The "paged cache" is a real one (the original concatenated a growing Python list of ragged pages on every read
  and evicted pages without fixing its length counter).
- Horizon heads forecast from every position (the original trained the last position on past tokens 1..4), one
  tied vocabulary matrix instead of three, no clamped positions (the original clamped at 511).

Longer notes: docs/v4_1_v5.md
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import core
import paged_cache


class OffsetRoutingLattice(nn.Module):
    """out_t = g_t * W_o e_t + (1 - g_t) * x_t, with e_t = EdgeMLP([n_t ; m_t]), g_t = sigmoid(W_g [x_t ; e_t]) and
    m_t = sum_{o < min(W, t + 1)} a_{t,o} n_{t-o}: offsets past the sequence start get probability exactly 0, so
    out_t depends on x_{<=t} only. forward(x, start_pos, nodes) -> (out, routing logits z (B, T, W)), with nodes
    (B, max_len, D) the cached node features (written by position, so truncation needs no bookkeeping) or None for
    an uncached call from 0."""

    def __init__(self, d_model, window, bias=False):
        super().__init__()
        self.window = window
        self.offset_logits = nn.Parameter(torch.zeros(window))           # w_o: the learnable lattice weights
        self.route_ln = core.LayerNorm(d_model, bias)
        # W_r starts random with logits of unit scale (LN(x) has unit RMS), so tokens route differently from step 0;
        # a zero W_r started every token on the same static mixture, and 100-300 steps left it there (TV 0.003)
        self.route_weight = nn.Parameter(torch.randn(window, d_model) / d_model ** 0.5)
        self.node = nn.Linear(d_model, d_model, bias=bias)
        self.node_ln = core.LayerNorm(d_model, bias)
        self.edge_in = nn.Linear(2 * d_model, d_model, bias=bias)
        self.edge_out = nn.Linear(d_model, d_model, bias=bias)
        self.gate = nn.Linear(2 * d_model, d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def routing_logits(self, x, start_pos=0):
        """x (B, T, D) at positions start_pos.. -> z (B, T, W): w_o + r_{t,o}, -inf at offsets before the start."""
        T = x.size(1)
        t_pos = core.positions(start_pos, T, x.device)                                  # (T,), or (B, T) per row
        z = self.offset_logits + F.linear(self.route_ln(x), self.route_weight)          # (B, T, W)
        beyond_start = torch.arange(self.window, device=x.device) > t_pos[..., None]     # (T, W): j = t - o < 0
        return z.masked_fill(beyond_start, float("-inf"))

    def routing(self, x, start_pos=0):
        """x (B, T, D) at positions start_pos.. -> a (B, T, W): each token's weights over offsets 0..W-1."""
        return self.routing_logits(x, start_pos).softmax(-1)

    def forward(self, x, start_pos=0, nodes=None):
        B, T, D = x.shape
        n = F.gelu(self.node_ln(self.node(x)))                                           # (B, T, D)
        t_pos = core.positions(start_pos, T, x.device)       # (T,), or (B, T) for a ragged batch's per-row starts
        if nodes is None:
            if torch.is_tensor(start_pos) or start_pos:
                raise core.UsageError(f"the lattice needs its cache for start_pos={start_pos} > 0")
            first, keys = 0, n
        else:
            if torch.is_tensor(start_pos):
                nodes[torch.arange(B, device=x.device)[:, None], t_pos] = n
                lo, hi = int(start_pos.min()), int(start_pos.max())
            else:
                nodes[:, start_pos:start_pos + T] = n
                lo = hi = start_pos
            first = max(0, lo - self.window + 1)                 # older nodes are outside every query's window
            keys = nodes[:, first:hi + T]                                                # (B, L, D)
        z = self.routing_logits(x, start_pos)
        a = z.softmax(-1)                                                                # (B, T, W)
        j_pos = torch.arange(first, first + keys.size(1), device=x.device)
        rel = t_pos[..., None] - j_pos                                                   # (T, L) or (B, T, L): t - j
        band = (rel >= 0) & (rel < self.window)
        mix = torch.gather(a, 2, rel.clamp(0, self.window - 1).expand(B, T, -1)) * band  # (B, T, L) banded, lower
        m = mix.to(keys.dtype) @ keys                                                    # (B, T, D)
        e = self.edge_out(F.gelu(self.edge_in(torch.cat([n, m], -1))))
        g = torch.sigmoid(self.gate(torch.cat([x, e], -1)))
        return g * self.out(e) + (1 - g) * x, z


class OffsetLatticeCache(paged_cache.PagedKVCache):
    """Paged K/V of every block plus the lattice's node features (B, max_len, D) by position."""

    def __init__(self, nodes, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nodes = nodes

    def row_state(self):
        return [self.nodes]

    def nbytes(self):
        return super().nbytes() + self.nodes.nelement() * self.nodes.element_size()


@dataclass
class Output(core.Output):
    routing: Optional[torch.Tensor] = None   # (B, T, W) each token's lattice weights over offsets 0..W-1
    acceptance: Optional[torch.Tensor] = None  # (B, T, H-1) P(offset k = 2..H's greedy draft passes verification)


@dataclass
class Config(core.Config):
    n_bottom_layers: int = 2        # blocks before the hyper-lattice; the rest of n_layers come after it
    lattice_window: int = 48        # W: offsets 0..W-1 a token's lattice mixes (the original's lattice_depth)
    horizon: int = 9                # offsets 1..horizon (the original's 8 horizon heads + the main head)
    horizon_sampling: bool = True   # training reads each offset >= 2 out at a random 1/(H-1) of positions (unbiased)
    horizon_weight: float = 0.5     # lambda_h of the horizon term in the objective
    horizon_gamma: float = 0.95     # discount of offset k: gamma^(k-1)
    block_size: int = 16            # paged cache: tokens per block
    kv_blocks: int = 0              # paged cache: blocks in the pool; 0 = enough for every row to reach max_seq_len
    routing_weight: float = 0.2     # weight of -I(token; offset), core.routing_information (see the docstring)
    router_z_weight: float = 1e-3   # weight of the router z-loss, core.router_z_loss (ST-MoE's)
    acceptance_weight: float = 0.1  # weight of the draft-acceptance heads' BCE (they read a detached state)
    modes: ClassVar[tuple] = ("token",)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.n_bottom_layers <= self.n_layers:
            raise core.UsageError(f"n_bottom_layers={self.n_bottom_layers} must lie in [0, n_layers={self.n_layers}]")
        for name in ("lattice_window", "horizon", "block_size"):
            if getattr(self, name) < 1:
                raise core.UsageError(f"{name}={getattr(self, name)} must be >= 1")


class Model(core.LM):
    ragged_decoding = True   # forward takes per-row start positions (B,): generate batches prompts of any lengths

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(core.Block(c.d_model, c.n_heads, c.bias, c.dropout) for _ in range(c.n_layers))
        self.lattice = OffsetRoutingLattice(c.d_model, c.lattice_window, c.bias)
        self.ln_f = core.LayerNorm(c.d_model, c.bias)
        self.lm_head = core.Unembedding(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017); the horizon heads read it too
        # horizon offsets 2..H: LN(h + U_k h), a residual so every offset starts near the main head's prediction
        self.horizon = nn.Linear(c.d_model, (c.horizon - 1) * c.d_model, bias=False) if c.horizon > 1 else None
        self.horizon_ln = core.LayerNorm(c.d_model, c.bias) if c.horizon > 1 else None
        # draft confidence: P(offset k's greedy draft passes greedy verification) from the final state, k = 2..H
        self.acceptance = nn.Linear(c.d_model, c.horizon - 1) if c.horizon > 1 else None
        self.apply(core.init_weights)
        core.scale_residual_projections(self, c.n_layers)

    def new_cache(self, batch_size, device=None, dtype=None):
        c, p = self.config, next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        nodes = torch.zeros(batch_size, c.max_seq_len, c.d_model, device=device, dtype=dtype)
        return OffsetLatticeCache(nodes, c.n_layers, batch_size, c.n_heads, c.d_model // c.n_heads, c.max_seq_len,
                                 device, dtype, c.block_size, c.kv_blocks)

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        pos = core.positions(start_pos, T, idx.device)                            # (T,), or (B, T) per row
        h = self.drop(self.wte(idx) + self.wpe(pos))                              # (B, T, D)
        kv = [None] * c.n_layers if cache is None else cache.layers
        for i, block in enumerate(self.blocks):
            if i == c.n_bottom_layers:
                h, route_logits = self.lattice(h, start_pos, None if cache is None else cache.nodes)
            h = block(h, kv[i], start_pos)
        if c.n_bottom_layers == c.n_layers:
            h, route_logits = self.lattice(h, start_pos, None if cache is None else cache.nodes)
        routing = route_logits.softmax(-1)                                        # (B, T, W)
        h = self.ln_f(h)
        logits = self.lm_head(h)                                                  # (B, T, V)
        horizon_hidden = acc_logits = None
        if self.horizon is not None:
            u = self.horizon(h).view(B, T, c.horizon - 1, c.d_model)              # (B, T, H-1, D)
            horizon_hidden = self.horizon_ln(h[:, :, None] + u)
            acc_logits = self.acceptance(h.detach()).float()    # detached: predicting acceptance never reshapes h
        loss = aux = None
        if targets is not None:
            loss, aux, scored = core.horizon_objective(logits, targets, horizon_hidden, self.wte.weight, None,
                                                       c.horizon_weight, c.horizon_gamma,
                                                       sample=self.training and c.horizon_sampling, readout=True)
            # the routing terms (core.routing_information, core.router_z_loss): without them the content router
            # stays where it starts, so every token mixes its window the same way
            aux["routing"] = core.routing_information(routing)
            aux["router_z"] = core.router_z_loss(route_logits)
            loss = loss + c.routing_weight * aux["routing"] + c.router_z_weight * aux["router_z"]
            if acc_logits is not None:
                aux["acceptance"] = self.acceptance_loss(acc_logits, logits, *scored)
                loss = loss + c.acceptance_weight * aux["acceptance"]
        return Output(logits=logits, loss=loss, hidden=h, aux=aux, horizon_hidden=horizon_hidden, routing=routing,
                      acceptance=None if acc_logits is None else torch.sigmoid(acc_logits))

    def acceptance_loss(self, acc_logits, logits, rows, argmax):
        """BCE of the acceptance heads against what greedy verification checks: whether offset k's argmax at t
        equals the main head's argmax at t + k - 1, at the rows (n_off, n) where the horizon loss scored offset k
        and with the argmax that pass took (core.horizon_objective(readout=True)): no readout of its own."""
        n_off = rows.size(0)
        main = logits.detach().argmax(-1)                                         # (B, T): what greedy picks
        k = torch.arange(n_off, device=rows.device)[:, None]
        agree = core.offset_targets(main, n_off)[rows, k]                         # main argmax at t + k - 1
        hit = (argmax == agree).float()
        z = acc_logits.reshape(-1, n_off)[rows, k]                                # (n_off, n)
        valid = (agree >= 0).float()
        bce = F.binary_cross_entropy_with_logits(z, hit, reduction="none")
        return (bce * valid).sum() / valid.sum().clamp_min(1)

    @staticmethod
    def draft_acceptance(out):
        """(B, T, H-1): the probability that offset k = 2..H's greedy draft passes greedy verification."""
        return out.acceptance


@torch.no_grad()
def ragged_kv_memory(model, prompt_lens, seed=0):
    """KV memory of a batch of prompts of different lengths, paged against contiguous, from the caches themselves.

    Both caches are filled by the model's own prefill of the padded batch; each paged row is then truncated to
    its prompt's length (causal attention makes the padding's K/V irrelevant to the real tokens), which frees its
    tail blocks. The contiguous cache is core.LM's: one KVCache per layer, every row preallocated to max_seq_len.
    Bytes count K/V only. Returns paged_cache.kv_memory_comparison(...) plus the contiguous cost of rows padded
    only to the longest prompt."""
    B, L = len(prompt_lens), max(prompt_lens)
    idx = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    paged, contiguous = model.new_cache(B), core.LM.new_cache(model, B)
    contiguous.nodes = paged.nodes.clone()    # the lattice's node features are the same in both; KV is compared
    model.eval()
    model(idx, cache=paged)
    paged.truncate(list(prompt_lens))
    model(idx, cache=contiguous)
    report = paged_cache.kv_memory_comparison(paged, contiguous)
    per_slot = contiguous.nbytes() / (B * model.config.max_seq_len)
    report["contiguous_padded_to_longest"] = dict(allocated_slots=B * L, used_slots=sum(prompt_lens),
                                                  waste=1 - sum(prompt_lens) / (B * L), bytes_in_use=B * L * per_slot)
    return report


if __name__ == "__main__":
    def paged_memory(model, mode, idx, cached):
        cache = model.new_cache(2)
        model(idx[:, :37], cache=cache)
        print(f"  paged cache after 37 tokens x 2 rows: {cache.memory_stats()}")
        report = ragged_kv_memory(model, [5, 9, 16, 17, 23, 33, 40, 64])
        print("  KV memory, 8 prompts of 5..64 tokens: "
              + "; ".join(f"{k}: {v['allocated_slots']} slots for {v['used_slots']} tokens ({v['waste']:.1%} waste, "
                          f"{v['bytes_in_use'] / 1024:.0f} KiB)" for k, v in report.items()))

    core.lm_selftest("v4_1", lambda **kw: core.build_model("v4_1", **kw), T=40, prompt_len=8, extra=paged_memory)
