"""HST v5: adaptive bottom with per-token early exit, a task-routed lattice processor, layer-aware predictive
fields and a multi-scale recursive horizon predictor, in token mode and in hierarchical chunk mode.

What it computes: embeddings -> TaskRoutedTrunk (adaptive bottom -> gated lattice processor -> top blocks) -> LN_f
-> tied LM head (Press & Wolf 2017), plus the horizon predictor fed by the predictive fields. What it combines:
- Adaptive bottom stack with per-token early exit (core.SpineTrunk without top blocks or spine lattice): exit heads
  read each token's own state; at inference an exited token's state is frozen and its skipped layers still cache
  K/V (CALM, Schuster et al. 2022); a threshold above 1 is exactly the dense model.
- Adaptive lattice processor (the original's task routing): causal, cached blocks, each gated per token by
  G_t = sigmoid(MLP(LN[x_t ; u_t])), where x_t is the token's state and u_t the causal prefix mean of the
  processor's input (decode keeps prefix sums). The router starts with unit-scale logits and open gates, and the
  objective adds 0.005 * core.routing_information and 1e-3 * core.router_z_loss per gate: without them the gates
  shut for good (<= 1e-4) or settled on one value for every token.
  h <- h + G_{t,i} (Block_i(h) - h), a highway-style gate (Srivastava et al. 2015). Soft gates, no Python branch
  on a tensor value.
- Layer-aware predictive fields (the original's RecursiveDescentLatticeAnalyzer.compute_predictive_field):
  templates over processor depth (far targets weigh shallow layers, near targets deep ones) times sigmoid(lambda)
  give, per horizon level, a weighted mean of the processor's per-layer states z^(i); the readout
  h^(level) = h + W_f LN(f) feeds the horizon predictor. Causal because every z^(i) is.
- Multi-scale recursive horizon predictor: offsets j = 1..Hz (canonical offset j + 1, token t+1+j) split into
  coarse {Hz/2, Hz}, medium {Hz/4, 3Hz/4} and fine (the rest) levels; each finer offset interpolates, in hidden
  space, the two nearest coarser anchors (anchor 0 is the main head's state) with alpha = (j - a) / (b - a), and
  every offset has its own embedding, so all Hz outputs are distinct and trained at every position. Its drafts are
  verified losslessly (Leviathan et al. 2023; Chen et al. 2023).
- Chunk mode (MEGABYTE, Yu et al. 2023; Block Transformer, Ho et al. 2024): core.ChunkHierarchy with this trunk
  (bottom -> lattice processor -> top) as the global model over chunk slots; the horizon predictor reads the local
  decoder's states.
- Every block of the trunk caches its K/V in a paged_cache.PagedKVCache (16-token blocks from a pool; vLLM's
  PagedAttention, Kwon et al. 2023); in chunk mode that is the global model, and the local decoder keeps an
  ordinary contiguous cache. Token mode decodes a ragged batch (one start position per row), so
  `model.generate([prompt, ...])` runs prompts of different lengths as one batch.

What it does differently from the original script, and why:
- Causal everywhere: the router reads a prefix mean, not the whole sequence's mean; the processor's layers are
  causal and cached (the original's were unmasked, and decoding showed them only the new token); chunk c's vector
  is read only by later chunks (the original used it as memory for its own chunk's unshifted decoder).
- No batch-mean or `.item()` decisions: gates and exits are per token; caches keep every layer at every position
  (after an exit the original's shorter cache list made later layers read other layers' caches).
- The analyzer's field is used (the original never called it), defined for every offset (no spine lookup that
  raises); the horizon predictor covers all offsets with correct, non-extrapolating interpolation weights (the
  original's had duplicates, an all-zero offset and reversed alpha) and predicts from every position.
- One tied vocabulary matrix (the original spent 147.6 M parameters on untied vocab-sized horizon layers).

Longer notes: docs/v4_1_v5.md
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

import core
import paged_cache

# the original's field templates over its 10 lattice layers put far targets on the shallow layers, medium ones on
# the lower middle and near ones on the upper middle. Here they are smooth bumps over the processor's relative depth
# 0..1, centred across its whole depth, at least half a layer spacing wide, so every depth gets templates with no
# zero rows and three different fields from 2 layers up: at 2 layers far reads layer 0 (98%), near layer 1 (98%),
# medium both (60/40). (The original's centres 0, 0.25 and 0.55 of width 0.25 made far and medium both read layer
# 0 at the default 2 layers.)
FIELD_CENTRES = {"far": 0.0, "medium": 0.45, "near": 1.0}
FIELD_WIDTH = 0.25
# the processor's gates start at sigmoid(2) = 0.88: open enough that its blocks learn from the first step like any
# other block (gates that start half shut lost the race against blocks still noisy at init and closed for good),
# short of saturation so the router still has a gradient
GATE_INIT_LOGIT = 2.0


def multiscale_plan(n_offsets):
    """Levels of the horizon predictor over offsets j = 1..n_offsets (offset j predicts token t+1+j): a list of
    levels (coarse, medium, fine), each a list of (j, a, b, alpha) with a < j <= b the nearest anchors among the
    coarser levels and 0, and alpha = (j - a) / (b - a). Coarse offsets have no anchors (a = b = j, alpha 0)."""
    Hz = n_offsets
    coarse = sorted({max(1, round(Hz / 2)), Hz})
    medium = sorted({max(1, round(Hz / 4)), max(1, round(3 * Hz / 4))} - set(coarse))
    fine = sorted(set(range(1, Hz + 1)) - set(coarse) - set(medium))
    plan, known = [[(j, j, j, 0.0) for j in coarse]], [0] + coarse
    for level in (medium, fine):
        if not level:
            continue
        rows = []
        for j in level:
            a, b = max(k for k in known if k < j), min(k for k in known if k > j)
            rows.append((j, a, b, (j - a) / (b - a)))
        plan.append(rows)
        known = sorted(known + level)
    return plan


def interpolate_anchors(z_a, z_b, alpha):
    """(1 - alpha) z_a + alpha z_b: alpha = 0 is anchor a; the nearer anchor always weighs more."""
    return torch.lerp(z_a, z_b, alpha)


class AdaptiveLatticeProcessor(nn.Module):
    """Causal, cached blocks gated per token by a router over the token's own state x_t and the prefix mean
    u_t = sum_{s<=t} x_s / (t + 1): G_t = sigmoid(MLP(LN[x_t ; u_t])). forward(x, kv, start_pos, prefix_sums) ->
    (h, states (B, T, n, D), gate logits (B, T, n)); prefix_sums (B, max_len, D) holds the running sums by position
    in a cached call (so truncation needs nothing). The prefix mean alone (the original's input, there over the
    whole sequence) moves by O(1/t) per token, so its gates were one value per window after the first few tokens;
    the token's own state lets the router tell tokens apart (as a mixture-of-experts router reads its token)."""

    def __init__(self, d_model, n_heads, n_layers, router_hidden, bias=False, dropout=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(core.Block(d_model, n_heads, bias, dropout) for _ in range(n_layers))
        self.router_ln = core.LayerNorm(2 * d_model, bias)
        # the output bias exists whatever `bias` says: Model starts it at GATE_INIT_LOGIT, gates open
        self.router = nn.Sequential(nn.Linear(2 * d_model, router_hidden, bias=bias), nn.ReLU(),
                                    nn.Linear(router_hidden, n_layers, bias=True))

    def gates(self, x, start_pos=0, prefix_sums=None):
        return torch.sigmoid(self.gate_logits(x, start_pos, prefix_sums))          # (B, T, n)

    def gate_logits(self, x, start_pos=0, prefix_sums=None):
        """start_pos: an int, or (B,) per-row starts of a ragged batch (each row's sums read and written at its own
        positions)."""
        B, T, _ = x.shape
        sums = x.float().cumsum(1)                                                # (B, T, D)
        pos = core.positions(start_pos, T, x.device)                              # (T,), or (B, T) per row
        if prefix_sums is not None:  # one path for an int start and per-row starts: each row at its own positions
            rows = torch.arange(B, device=x.device)[:, None]                      # (B, 1)
            first = pos[..., :1].expand(B, 1)                                     # (B, 1): each row's first position
            before = prefix_sums[rows, (first - 1).clamp_min(0)].float()          # (B, 1, D): the sum before it
            sums = sums + before * (first > 0)[..., None]
            prefix_sums[rows, pos.expand(B, T)] = sums.to(prefix_sums.dtype)
        u = (sums / (pos + 1).to(sums.dtype)[..., None]).to(x.dtype)               # causal prefix mean
        return self.router(self.router_ln(torch.cat([x, u], -1)))                 # (B, T, n)

    def forward(self, x, kv, start_pos=0, prefix_sums=None):
        z = self.gate_logits(x, start_pos, prefix_sums)
        g = torch.sigmoid(z)
        h, states = x, []
        for i, block in enumerate(self.blocks):
            h = h + g[..., i:i + 1] * (block(h, kv[i], start_pos) - h)
            states.append(h)
        return h, torch.stack(states, 2), z


class PredictiveField(nn.Module):
    """field_level = template_level * sigmoid(lambda) over processor layers; readout per horizon level:
    h + W_f LN(sum_i field[i] z^(i) / sum_i field[i]). forward(h (B, T, D), states (B, T, n, D)) -> (B, T, 3, D)."""

    def __init__(self, d_model, n_layers, bias=False):
        super().__init__()
        depth = torch.linspace(0, 1, n_layers) if n_layers > 1 else torch.zeros(1)
        width = max(FIELD_WIDTH, 0.5 / max(1, n_layers - 1))
        templates = torch.stack([torch.exp(-((depth - c) / width) ** 2) for c in FIELD_CENTRES.values()])
        self.register_buffer("templates", templates, persistent=False)           # (3, n): far, medium, near
        self.layer_weights = nn.Parameter(torch.ones(n_layers))                   # lambda, init 1 as the original
        self.ln = core.LayerNorm(d_model, bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def field(self):
        return self.templates * torch.sigmoid(self.layer_weights)                # (3, n)

    def forward(self, h, states):
        field = self.field()
        f = torch.einsum("ln,btnd->btld", field / field.sum(-1, keepdim=True), states)  # (B, T, 3, D)
        return h[:, :, None] + self.proj(self.ln(f))


class MultiScaleHorizon(nn.Module):
    """Hidden states of offsets j = 1..Hz (canonical offsets 2..Hz+1) from coarse to fine: coarse
    z_j = base + MLP_c(base + E_j); finer z_j = base + MLP([base + E_j ; lerp(z_a, z_b, alpha)]), with z_0 = h.
    `base` is the level's field readout (or h). Returns LN(z) (B, T, Hz, D) for the tied unembedding."""

    def __init__(self, d_model, n_offsets, bias=False):
        super().__init__()
        self.plan = multiscale_plan(n_offsets)
        # E_j, one per offset, on the scale of the normed state it is added to, so offsets differ from the start
        self.offset_emb = nn.Parameter(torch.randn(n_offsets, d_model))
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model * (1 if i == 0 else 2), d_model, bias=bias), nn.GELU(),
                          nn.Linear(d_model, d_model, bias=bias)) for i in range(len(self.plan)))
        self.ln = core.LayerNorm(d_model, bias)

    def forward(self, h, bases=None):
        """h (B, T, D) the final normed state; bases (B, T, n_levels, D) per-level readouts, or None (= h)."""
        z = {0: h}
        for i, (rows, mlp) in enumerate(zip(self.plan, self.levels)):
            base = h if bases is None else bases[:, :, min(i, bases.size(2) - 1)]
            offsets = [j for j, _, _, _ in rows]
            inp = base[:, :, None] + self.offset_emb[[j - 1 for j in offsets]]       # (B, T, n_level, D)
            if i:
                z_a = torch.stack([z[a] for _, a, _, _ in rows], 2)
                z_b = torch.stack([z[b] for _, _, b, _ in rows], 2)
                alpha = torch.tensor([al for _, _, _, al in rows], dtype=h.dtype, device=h.device)[:, None]
                inp = torch.cat([inp, interpolate_anchors(z_a, z_b, alpha)], -1)
            out = base[:, :, None] + mlp(inp)
            for k, j in enumerate(offsets):
                z[j] = out[:, :, k]
        return self.ln(torch.stack([z[j] for j in range(1, len(z))], 2))         # (B, T, Hz, D)


class TaskRoutedCache(paged_cache.PagedKVCache):
    """Paged K/V of every block (bottom, processor, top) and the router's prefix sums (B, max_len, D)."""

    def __init__(self, prefix_sums, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_sums = prefix_sums

    def row_state(self):
        return [self.prefix_sums]

    def nbytes(self):
        return super().nbytes() + self.prefix_sums.nelement() * self.prefix_sums.element_size()


class TaskRoutedTrunk(nn.Module):
    """Adaptive bottom (early exit) -> adaptive lattice processor -> top blocks over one causal axis.
    forward(x, cache, start_pos, exit_threshold, readout, labels) -> (h, exit_loss, exit_depth,
    states (B, T, n_lattice, D), processor gate logits (B, T, n_lattice)), exit_loss as core.SpineTrunk's, against
    readout of this trunk's output (not of the bottom's)."""

    def __init__(self, d_model, n_heads, n_bottom, n_lattice, n_top, router_hidden, max_len, block_size, kv_blocks,
                 bias=False, dropout=0.0):
        super().__init__()
        self.d_model, self.n_heads, self.max_len = d_model, n_heads, max_len
        self.block_size, self.kv_blocks = block_size, kv_blocks
        self.n_bottom, self.n_lattice = n_bottom, n_lattice
        # max_len=0 builds no spine lattice and n_top=0 no top blocks: what is left is the adaptive bottom stack
        self.bottom = core.SpineTrunk(d_model, n_heads, n_bottom, 0, 0, bias, dropout)
        self.processor = AdaptiveLatticeProcessor(d_model, n_heads, n_lattice, router_hidden, bias, dropout)
        self.top = nn.ModuleList(core.Block(d_model, n_heads, bias, dropout) for _ in range(n_top))

    def new_cache(self, batch_size, device, dtype):
        n_blocks = self.n_bottom + self.n_lattice + len(self.top)
        sums = torch.zeros(batch_size, self.max_len, self.d_model, device=device, dtype=torch.float32)
        return TaskRoutedCache(sums, n_blocks, batch_size, self.n_heads, self.d_model // self.n_heads, self.max_len, device,
                       dtype, self.block_size, self.kv_blocks)

    def forward(self, x, cache=None, start_pos=0, exit_threshold=2.0, readout=None, labels=None):
        nb, nl = self.n_bottom, self.n_lattice
        kv = [None] * (nb + nl + len(self.top)) if cache is None else cache.layers
        exit_loss = depth = None
        if self.training:  # every bottom layer runs; the exit heads' target is the prediction after the top blocks
            h, bottom_states = x, []
            for i, block in enumerate(self.bottom.bottom):
                h = block(h, kv[i], start_pos)
                bottom_states.append(h)
        else:
            h, _, depth = self.bottom(x, None if cache is None else core.Cache(kv[:nb]), start_pos, exit_threshold)
        h, states, gate_logits = self.processor(h, kv[nb:nb + nl], start_pos,
                                                None if cache is None else cache.prefix_sums)
        for i, block in enumerate(self.top, start=nb + nl):
            h = block(h, kv[i], start_pos)
        if self.training and len(self.bottom.exit_heads):
            exit_loss = core.exit_head_loss(self.bottom.exit_heads, bottom_states, h, readout, labels)
        return h, exit_loss, depth, states, gate_logits


@dataclass
class Output(core.Output):
    gates: Optional[torch.Tensor] = None   # (B, T, n_lattice_layers) processor gates (chunk mode: per chunk slot)


@dataclass
class Config(core.SpineConfig):  # n_bottom_layers, horizon, horizon_weight, horizon_gamma, exit_threshold
    horizon: int = 9                # offsets 1..horizon: the main head and the original's 8 horizon offsets
    n_lattice_layers: int = 2       # blocks of the adaptive lattice processor (the original had 10 at d_model 768)
    router_hidden: int = 256        # task router MLP width
    block_size: int = 16            # paged cache: tokens per block
    kv_blocks: int = 0              # paged cache: blocks in the pool; 0 = enough for every row to reach the context
    chunk_size: int = 8             # chunk mode: tokens per chunk
    n_local_layers: int = 2         # chunk mode: layers of the local decoder
    routing_weight: float = 0.005   # weight of -I(token; gate) per processor layer, core.routing_information
                                    # (bytes, d32, 240 steps, 2 seeds: 0.01 gave held-out 3.06 / 3.39, 0.005 2.74 / 3.39,
                                    # 0.003 2.96 / 2.70 with routing too uniform per token, none 2.87 / 3.04)
    router_z_weight: float = 1e-3   # weight of the gates' z-loss, core.router_z_loss (ST-MoE's)
    modes: ClassVar[tuple] = ("token", "chunk")

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_lattice_layers", "router_hidden", "block_size", "chunk_size", "n_local_layers"):
            if getattr(self, name) < 1:
                raise core.UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.horizon < 2:
            raise core.UsageError(f"horizon={self.horizon}: the multi-scale predictor needs at least offset 2")


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        # token mode decodes ragged batches: forward takes per-row start positions (B,) through the paged cache, so
        # generate runs prompts of any lengths as one batch; chunk mode's local decoder keeps a contiguous cache
        self.ragged_decoding = c.mode == "token"
        n_top = c.n_layers - c.n_bottom_layers
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        if c.mode == "token":
            self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
            self.trunk = TaskRoutedTrunk(c.d_model, c.n_heads, c.n_bottom_layers, c.n_lattice_layers, n_top, c.router_hidden,
                                 c.max_seq_len, c.block_size, c.kv_blocks, c.bias, c.dropout)
            self.field = PredictiveField(c.d_model, c.n_lattice_layers, c.bias)
        else:
            # the per-layer processor states exist per chunk slot only, so the token-level field has no input here:
            # chunk mode builds none and its horizon predictor reads the local decoder's state directly
            n_slots = c.max_seq_len // c.chunk_size + 1
            trunk = TaskRoutedTrunk(c.d_model, c.n_heads, c.n_bottom_layers, c.n_lattice_layers, n_top, c.router_hidden,
                            n_slots, c.block_size, c.kv_blocks, c.bias, c.dropout)
            self.chunk = core.ChunkHierarchy(trunk, c.d_model, c.n_heads, c.n_local_layers, c.chunk_size,
                                             c.max_seq_len, c.bias, c.dropout)
        self.ln_f = core.LayerNorm(c.d_model, c.bias)
        self.lm_head = core.Unembedding(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017); the horizon predictor reads it too
        self.horizon = MultiScaleHorizon(c.d_model, c.horizon - 1, c.bias)
        self.apply(core.init_weights)
        core.scale_residual_projections(self, c.n_layers + c.n_lattice_layers)
        processor = (self.trunk if c.mode == "token" else self.chunk.global_model).processor
        core.init_router(processor.router[0], processor.router[2])
        nn.init.constant_(processor.router[-1].bias, GATE_INIT_LOGIT)

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        if c.mode == "token":
            pos = core.positions(start_pos, T, idx.device)                        # (T,), or (B, T) per row
            x = self.drop(self.wte(idx) + self.wpe(pos))                          # (B, T, D)
            h, exit_loss, exit_depth, states, gate_logits = self.trunk(x, cache, start_pos, c.exit_threshold,
                                                                       self.head_logits, targets)
            h = self.ln_f(h)
            bases = self.field(h, states)                                         # (B, T, 3, D)
        else:
            h, rest = self.chunk(idx, lambda ids: self.drop(self.wte(ids)), cache, start_pos,
                                 exit_threshold=c.exit_threshold, readout=self.head_logits)  # (B, T, D)
            exit_loss, exit_depth = None if rest is None else rest[0], None
            gate_logits = None if rest is None else rest[3]                       # (B, chunk slots, n)
            h, bases = self.ln_f(h), None
        logits = self.lm_head(h)                                                  # (B, T, V)
        horizon_hidden = self.horizon(h, bases)                                   # (B, T, H-1, D)
        loss = aux = None
        if targets is not None:
            loss, aux = core.horizon_objective(logits, targets, horizon_hidden, self.wte.weight, exit_loss,
                                               c.horizon_weight, c.horizon_gamma,
                                               sample=self.training and c.horizon_sampling)
            if gate_logits is not None:
                # keep the processor's gates trainable and per token: core.routing_information on the two-way
                # distributions [g, 1 - g] (each layer's gate decisive per token, its mean over the batch away
                # from 0 and 1) and the z-loss that keeps gate logits out of sigmoid saturation, where a gate
                # stops learning: unregularised, the gates shut for good (<= 1e-4) within 200 steps
                aux["routing"] = core.routing_information(core.bernoulli(torch.sigmoid(gate_logits.float())))
                aux["router_z"] = core.router_z_loss(gate_logits, gate=True)
                loss = loss + c.routing_weight * aux["routing"] + c.router_z_weight * aux["router_z"]
        gates = None if gate_logits is None else torch.sigmoid(gate_logits)
        return Output(logits=logits, loss=loss, hidden=h, aux=aux, horizon_hidden=horizon_hidden,
                      exit_depth=exit_depth, gates=gates)


if __name__ == "__main__":
    core.lm_selftest("v5", lambda **kw: core.build_model("v5", **kw), ("token", "chunk"), steps=150)
