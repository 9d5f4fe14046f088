"""HST v7.1.2 Agile: adaptive-depth bottom stack, spine lattice, recursive horizon predictor with lattice (offset)
embeddings, lossless speculative verification by the target model, and a chunk mode with context injection.

Design: shared/spec/variants/v6_v7.md section 8; the body is shared with v6 (core.InjectableSpineLM).
- Adaptive bottom transformer: per-token dynamic depth, predicted by an exit head after each bottom layer from the
  token's own state (core.SpineTrunk): every layer runs in training, where the heads are fitted to a detached
  saturation target; at inference a token stops once its confidence passes exit_threshold, and its skipped layers
  still cache K/V (CALM), so caches stay consistent; exit_threshold > 1 is the dense model.
- Recursive horizon predictor (RecursiveHorizon): offsets are predicted far to near; offset k reads the final
  state h plus its lattice (offset) embedding, mixed with a projection of offset k+1's hidden state by a weight in
  [0, 1] (the original mixed raw V-dim logits with weights outside [0, 1] and left most offsets as zero logits).
  Every offset 2..horizon predicts t+k at every position through the tied unembedding.
- Speculative verifier: no separate network (the original's was never called and never trained). The horizon
  offsets draft and the target model verifies in one cached pass (core.speculative_decode): greedy output equals
  plain greedy, sampling uses the Leviathan/Chen rejection rule.
- Chunk mode with context injection: core.CrossAttentionChunkDecoder, exactly as v6 (the original v7.1.2 chunk mode
  emitted one row of logits per chunk and crashed in its loss).
- Objective: core.horizon_objective (normalized, discounted horizon CE) plus the exit heads' BCE.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import core


class RecursiveHorizon(nn.Module):
    """Offsets 2..H, far to near: z_H = h + SiLU(W_H (h + E_H)); for k < H,
    s_k = (1 - a_k) h + a_k P z_{k+1} with a_k = sigmoid(m_k) in [0, 1], z_k = h + SiLU(W_k (s_k + E_k)).
    W starts at zero, so every offset starts as the main head's prediction. h (B, T, D) -> (B, T, H-1, D)."""

    def __init__(self, d_model, horizon):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(horizon - 1, d_model, d_model))       # (H-1, D, D) offsets 2..H
        self.offset_emb = nn.Parameter(torch.randn(horizon - 1, d_model) * 0.02)     # lattice (offset) embeddings
        if horizon > 2:
            self.carry = nn.Linear(d_model, d_model, bias=False)                     # P: far state -> near input
            self.mix = nn.Parameter(torch.zeros(horizon - 2))                         # m_k, offsets 2..H-1

    def forward(self, h):
        n = self.weight.size(0)
        z = [None] * n
        for j in range(n - 1, -1, -1):  # far offsets first: nearer ones read their hidden state
            s = h
            if j < n - 1:
                a = torch.sigmoid(self.mix[j])
                s = (1 - a) * h + a * self.carry(z[j + 1])
            z[j] = h + F.silu((s + self.offset_emb[j]) @ self.weight[j])
        return torch.stack(z, 2)


@dataclass
class Config(core.InjectableSpineConfig):  # SpineConfig + chunk_size, n_local_layers, cross_window, injection
    horizon: int = 6                  # offsets 1..6: five recursive horizon offsets draft for speculation
    modes: ClassVar[tuple] = ("token", "chunk")


class Model(core.InjectableSpineLM):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self._build(c)
        self.horizon = RecursiveHorizon(c.d_model, c.horizon) if c.horizon > 1 else None
        self._init()

    def objective(self, logits, targets, horizon_hidden):
        return core.horizon_objective(logits, targets, horizon_hidden, self.wte.weight, None,
                                      self.config.horizon_weight, self.config.horizon_gamma)

    def flops_per_token(self):
        return core.spine_lm_flops(self)


if __name__ == "__main__":
    import sys
    core.spine_lm_selftest(sys.modules[__name__], "v7_1_2")
