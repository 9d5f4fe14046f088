"""HST v6 (Colab) and v6 Giga: one model with a token mode and a causal hierarchical chunk mode, speculative
decoding from its horizon heads, structurally-aware context injection, and the HierarchicalPredictiveLoss.

Design: shared/spec/variants/v6_v7.md section 8 (the corrected "HST-R" design); the shared parts are in core.py.
- Token mode: adaptive bottom blocks with per-token exit heads (dense in training, CALM-style cache-consistent
  exit at inference, exit_threshold > 1 = dense), the causal spine lattice, top blocks (core.SpineTrunk).
- Chunk mode (core.CrossAttentionChunkDecoder): chunk encoder -> causal global model over chunk slots (the same
  SpineTrunk, so the lattice runs over chunk indices) -> causal local decoder with grouped self-attention and
  cross-attention to the last `cross_window` global outputs. Decoding keeps the local self-attention K/V, the cross
  K/V projected once per global slot, and the global cache, advanced once per completed chunk.
- Horizon heads (Medusa-style, core.HorizonHeads): offset k at t predicts t+k at every position through the tied
  unembedding; they draft for lossless speculative decoding (core.speculative_decode: one cached verification
  pass, greedy acceptance equal to plain greedy, Leviathan/Chen rejection when sampling, cache rollback).
  `generate_ultra_fast` is the Giga name for it; `speculative_stats` adds acceptance per head and the speed-up.
- Context injection (chunk mode): `encode_injection(tokens)` -> a few learned-query memory slots; they join the
  global model's input through a zero-initialised tanh gate at slots >= the anchor chunk (a spine position), so
  predictions of tokens in chunks before the anchor are unchanged. Training injects the window's own first chunks
  with injection dropout (inject_train_prob).
- Objective: core.HierarchicalPredictiveLoss, next-token CE + lambda_k = beta gamma^(k-2) weighted horizon CE +
  consistency KL to the main head's later prediction (horizon_weight = beta, horizon_gamma = gamma).

What it does differently from the originals (section 7): causal everywhere (no bidirectional lattice, no chunk
vector visible to its own tokens, no decoder fed the token it must predict); correct cached masks; cross-attention
memory projected, not re-fed raw; injection appended causally instead of overwriting a chunk; drafts verified
losslessly; no untrained parameters (the exit heads are trained, the injection is exercised in training).
"""

from dataclasses import dataclass
from typing import ClassVar

import core


@dataclass
class Config(core.InjectableSpineConfig):  # SpineConfig + chunk_size, n_local_layers, cross_window, injection
    horizon_weight: float = 0.3       # beta of the HierarchicalPredictiveLoss: lambda_k = beta * gamma^(k-2)
    horizon_gamma: float = 0.8        # gamma of the HierarchicalPredictiveLoss
    consistency_weight: float = 0.1   # weight of KL(sg(p_main[t+k-1]) || q_k[t])
    modes: ClassVar[tuple] = ("token", "chunk")


class Model(core.InjectableSpineLM):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self._build(c)
        self.horizon = core.HorizonHeads(c.d_model, c.horizon) if c.horizon > 1 else None
        self.loss_fn = core.HierarchicalPredictiveLoss(c.horizon_weight, c.horizon_gamma, c.consistency_weight)
        self._init()

    def objective(self, logits, targets, horizon_hidden):
        return self.loss_fn(logits, targets, horizon_hidden, self.wte.weight)

    def generate_ultra_fast(self, idx, max_new_tokens, temperature=0.0, draft_len=4, **kw):
        """The Giga name for lossless speculative generation (drafts from the horizon heads)."""
        return self.generate(idx, max_new_tokens, temperature=temperature, speculative=True, draft_len=draft_len,
                             **kw)

    def flops_per_token(self):
        return core.spine_lm_flops(self)


if __name__ == "__main__":
    import sys
    core.spine_lm_selftest(sys.modules[__name__], "v6")
