"""HST v4 Unified: one model with a token mode and a hierarchical chunk mode, behind the same forward API.

Token mode is the v3 design: adaptive bottom blocks with per-token early exit (CALM-style K/V filling, Schuster
et al. 2022), the spine lattice core (core.LatticeCore), top blocks, a KV cache that also keeps the lattice's
spine rows, and Medusa-style horizon heads (Cai et al. 2024) read through the tied unembedding (Press & Wolf 2017)
that draft for lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

Chunk mode (MEGABYTE, Yu et al. 2023; Block Transformer, Ho et al. 2024), in core.ChunkHierarchy:
- chunk encoder: e_c from the concatenated, normed embeddings of chunk c's C tokens;
- global model: the same trunk (adaptive bottom -> lattice over chunk slots -> top), causal over chunk slots and
  fed shifted, [start, e_0, e_1, ...], so its output g_c summarises chunks < c only;
- local decoder: a small causal transformer inside each group of C slots of the stream [BOS, x_0, x_1, ...],
  conditioned on g_c, predicting every token; the horizon heads read its output as in token mode.
Any length works (the last group is padded; the causal masks keep padding unread), and decoding keeps caches at
both levels: a step that completes a chunk encodes it and advances the global model by one slot.

What it does differently from the original script, and why:
- Causal everywhere: explicit causal SDPA masks with and without a cache (the original's MHA ignored is_causal and
  was bidirectional at inference); no chunk vector is visible to its own tokens (the original decoded chunk c
  from e_c, a copy task); the horizon heads predict the future from every position instead of recalling tokens
  1..4 from the last one.
- Early exit is per token and keeps every layer's cache complete (the original dropped cache entries on exit and
  indexed the wrong layers afterwards); positions are absolute and past max_seq_len an error.
- The lattice is cached by absolute position, so decoding a spine row equals the full forward (the original ran
  it on each call's new tokens with positions relative to the call).
- One tied vocabulary matrix (the original had three), no flatten-MLP chunk decoder, no 65,536-row position table.

Longer notes: docs/v3_v4.md
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import core


@dataclass
class Config(core.SpineConfig):  # n_bottom_layers, horizon, horizon_weight, horizon_gamma, exit_threshold
    chunk_size: int = 8             # chunk mode: tokens per chunk
    n_local_layers: int = 2         # chunk mode: layers of the local decoder (n_layers is the global model)
    modes: ClassVar[tuple] = ("token", "chunk")

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size < 1 or self.n_local_layers < 1:
            raise core.UsageError(f"chunk_size={self.chunk_size} and n_local_layers={self.n_local_layers} "
                                  f"must be positive")


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        n_top = c.n_layers - c.n_bottom_layers
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        if c.mode == "token":
            self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
            self.trunk = core.SpineTrunk(c.d_model, c.n_heads, c.n_bottom_layers, n_top, c.max_seq_len, c.bias,
                                         c.dropout)
        else:
            n_slots = c.max_seq_len // c.chunk_size + 1
            trunk = core.SpineTrunk(c.d_model, c.n_heads, c.n_bottom_layers, n_top, n_slots, c.bias, c.dropout)
            self.chunk = core.ChunkHierarchy(trunk, c.d_model, c.n_heads, c.n_local_layers, c.chunk_size,
                                             c.max_seq_len, c.bias, c.dropout)
        self.ln_f = core.LayerNorm(c.d_model, c.bias)
        self.lm_head = core.Unembedding(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017); the horizon heads read it too
        self.horizon = core.HorizonHeads(c.d_model, c.horizon) if c.horizon > 1 else None
        self.apply(core.init_weights)
        core.scale_residual_projections(self, c.n_layers)

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        c = self.config
        B, T = idx.shape
        core.check_context(c, start_pos, T)
        if c.mode == "token":
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))                          # (B, T, D)
            h, exit_loss, exit_depth = self.trunk(x, cache, start_pos, c.exit_threshold, self.head_logits,
                                                  targets)
        else:
            # exits are decided per chunk slot in the global model, so there is no per-token exit depth
            h, global_rest = self.chunk(idx, lambda ids: self.drop(self.wte(ids)), cache, start_pos,
                                        exit_threshold=c.exit_threshold, readout=self.head_logits)  # (B, T, D)
            exit_loss, exit_depth = None if global_rest is None else global_rest[0], None
        h = self.ln_f(h)
        logits = self.lm_head(h)                                                  # (B, T, V)
        horizon_hidden = None if self.horizon is None else self.horizon(h)        # (B, T, H-1, D)
        loss = aux = None
        if targets is not None:
            loss, aux = core.horizon_objective(logits, targets, horizon_hidden, self.wte.weight, exit_loss,
                                               c.horizon_weight, c.horizon_gamma,
                                               sample=self.training and c.horizon_sampling)
        return core.Output(logits=logits, loss=loss, hidden=h, aux=aux, horizon_hidden=horizon_hidden,
                           exit_depth=exit_depth)


if __name__ == "__main__":
    # the default 29 positions are not a multiple of chunk_size; chunk mode, whose horizon offsets train on a random
    # share of positions each step, overfits one batch more slowly: the same bound as v6's chunk mode
    core.lm_selftest("v4", lambda **kw: core.build_model("v4", **kw), ("token", "chunk"), overfit_below=0.8)
