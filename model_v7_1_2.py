"""HST v7.1.2 Agile: v6's model (model_v6.py: adaptive-depth bottom stack with per-token early exit, spine
lattice, top blocks; a chunk mode with a cross-attending local decoder and context injection) with a recursive
horizon predictor in place of v6's independent horizon heads, and the plain discounted horizon objective in place of
v6's HierarchicalPredictiveLoss.

What it adds to v6:
- Recursive horizon predictor (RecursiveHorizon): offsets are predicted far to near; offset k reads the final
  state h plus a learned offset embedding, mixed with a projection of offset k+1's hidden state by a weight in
  [0, 1]. Every offset 2..horizon predicts token t+k at every position through the tied unembedding, and the
  offsets draft for lossless speculative decoding (Leviathan et al. 2023, Chen et al. 2023): the target model
  verifies the drafts in one cached pass, so greedy output equals plain greedy.
- Objective: core.horizon_objective (next-token CE and normalized, discounted horizon CE) plus the exit heads' BCE.
- Adaptive depth as in v6: each bottom layer's exit head predicts from the token's own state whether it may stop
  (CALM, Schuster et al. 2022); skipped layers still cache K/V, so caches stay consistent.

What it does differently from the original v7.1.2 script, and why: the original mixed raw V-dim logits with
weights outside [0, 1] and left most offsets as zero logits (so most drafts were noise); its separate speculative
verifier network was never called or trained (verification here is the target model itself, which is what makes
speculation lossless); and its chunk mode emitted one row of logits per chunk and crashed in its loss (chunk mode
here is v6's, predicting every token).
Longer notes: docs/v6_v7.md.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import core
import model_v6


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
class Config(model_v6.ChunkInjectionConfig):  # SpineConfig + chunk mode + injection (model_v6.ChunkInjectionConfig)
    horizon: int = 6                  # offsets 1..6: five recursive horizon offsets draft for speculation
    modes: ClassVar[tuple] = ("token", "chunk")


class Model(model_v6.Model):
    """v6's body and forward (model_v6.Model.forward) with the recursive horizon and the discounted horizon loss."""

    def build_horizon(self, c):
        return RecursiveHorizon(c.d_model, c.horizon) if c.horizon > 1 else None

    def objective(self, h, targets, horizon_hidden):
        c = self.config
        logits = self.lm_head(h)                                                      # (B, T, V)
        loss, aux = core.horizon_objective(logits, targets, horizon_hidden, self.wte.weight, None, c.horizon_weight,
                                           c.horizon_gamma, sample=self.training and c.horizon_sampling)
        return loss, aux, logits


if __name__ == "__main__":
    import sys
    model_v6.selftest(sys.modules[__name__], "v7_1_2")
