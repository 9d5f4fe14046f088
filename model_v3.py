"""HST v3 Ultra: a GPT with per-token early exit, the spine lattice core, and horizon heads.

What it computes: token and position embeddings -> core.SpineTrunk (adaptive bottom blocks -> spine lattice core ->
top blocks) -> LN_f -> tied LM head, plus horizon heads for offsets 2..horizon. What it combines:
- Adaptive bottom stack (the original's AdaptiveBlock): pre-LN blocks, each but the last followed by an exit head
  c_t = sigmoid(w . LN(h_t) + b) read from the token's own state. Training runs every layer and fits the heads to
  a CALM target: the layer's state, read through the tied head, already predicts the next token about as well as
  the final state (core.exit_head_loss); at inference a token stops once its confidence passes exit_threshold,
  calibrated from a held-out loss tolerance (core.calibrate_exit), and its skipped layers still cache K/V from the
  copied state (CALM, Schuster et al. 2022).
- Complete lattice core (the original's MultiLevelLatticeProcessor + PathWeightedLatticeCore + meta-fusion):
  spine rows 12, 36, 104, 304, ... fuse their spine ancestors by level and by DAG path count
  (core.LatticeCore), between the bottom and the top stack; cached, so decoding a spine row reads its ancestors.
- Harmonic horizon predictor: Medusa-style heads (Cai et al. 2024) at every position, offset k = 2..horizon
  predicting token t+k through the tied unembedding (Press & Wolf 2017), trained with the discounted, normalized
  loss (gamma = 0.95), and drafting for lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

What it does differently from the original script, and why:
- Confidence per token, never pooled over the sequence or the batch, and no `.item()`: in the original, one
  sample's last token could change the depth, hence the logits, of every position of every sample. Here exit
  decisions are causal and batch-independent, and the training forward is one graph.
- The lattice runs on the bottom stack's output, not on raw embeddings (where its edits were the same for every
  context); it is a residual with a zero-initialised output (the original replaced every row with an MLP), and
  its level and path-count tables are the corrected ones (the original's search overwrote levels and its
  reversed path-count test left most ancestors at weight 0), with no dead level modules.
- Horizon heads share the tied unembedding (no untied vocab matrix) and never materialize [B, T, H, V];
  the horizon weight is normalized, so next-token CE is not drowned by 6.4x of horizon loss.
- The objective is a weighted mean, (CE_main + horizon_weight * CE_horizon) / (1 + horizon_weight), plus
  0.03 * the exit heads' BCE: it stays on the scale of next-token CE (about ln V at initialisation).

Longer notes: docs/v3_v4.md
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import core


@dataclass
class Config(core.SpineConfig):  # n_bottom_layers, horizon, horizon_weight, horizon_gamma, exit_threshold
    modes: ClassVar[tuple] = ("token",)


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.trunk = core.SpineTrunk(c.d_model, c.n_heads, c.n_bottom_layers, c.n_layers - c.n_bottom_layers,
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
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                              # (B, T, D)
        h, exit_loss, exit_depth = self.trunk(x, cache, start_pos, c.exit_threshold, self.head_logits, targets)
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
    def exit_depth(model, mode, idx, cached):
        depth = model(idx[:, :-1]).exit_depth
        print(f"  eval bottom depth per token: mean {depth.float().mean().item():.2f} of "
              f"{model.config.n_bottom_layers} at exit_threshold {model.config.exit_threshold}")

    core.lm_selftest("v3", lambda **kw: core.build_model("v3", **kw), T=32, prompt_len=8, extra=exit_depth)
