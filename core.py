"""Shared primitives of the HST model zoo: what more than one model uses, once.

- config base (`Config`), the model registry (`MODELS`, `build_model`) and the one-line `UsageError`;
- layers: LayerNorm, MLP, causal self-attention with a preallocated KV cache that can be rolled back, Block,
  GPT-2 initialisation; the LM base class (`LM`: generate, caches, FLOP count) and its next-token loss;
- the spine lattice (`spine_positions`, `LatticeCore`), per-token early exit (`ExitHead`, `SpineTrunk`) and its
  threshold from a held-out loss tolerance (`calibrate_exit`, `exit_profile`);
- horizon heads and their loss (`HorizonHeads`, `horizon_objective`) and prompt-lookup drafts;
- the chunk hierarchy (`ChunkEncoder`, `LocalDecoder`, `ChunkHierarchy`) of the chunk-mode variants;
- Pell-Lucas positions and block-sparse masks; checkpoints; the self-test every model file runs.

Generation lives in generate.py and the paged KV cache in paged_cache.py; a model's own modules and its
assembly live in its model_*.py file. Imports run one way: model files -> core -> nothing of theirs.
"""

import contextlib
import dataclasses
import difflib
import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(ValueError):
    """Bad input from a user: scripts print it as a single `error: ...` line naming the fix."""


# -----------------------------------------------------------------------------
# config and registry

@dataclass
class Config:
    vocab_size: int = 50304       # GPT-2's 50,257 padded to a multiple of 64
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = False
    mode: str = "token"
    modes: ClassVar[tuple] = ("token",)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             f"pick n_heads among {[h for h in range(1, 33) if self.d_model % h == 0]}")
        if self.mode not in self.modes:
            raise UsageError(f"mode={self.mode!r} is not supported by this model; use one of {self.modes}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout={self.dropout} must be in [0, 1)")


# name -> module; models are imported on first use so that each model file can import core freely
MODELS = {
    "gpt": "model_gpt",
    "v3": "model_v3",
    "v4": "model_v4",
    "v4_1": "model_v4_1",
    "v5": "model_v5",
    "v6": "model_v6",
    "v7_1_2": "model_v7_1_2",
    "v8_2": "model_v8_2",
    "chaoslogic": "model_chaoslogic",
}


def type_ok(value, expected):
    """A setting's value fits its default's type (an int passes for a float, a bool never for a number)."""
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def suggest(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_model_module(name):
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}{suggest(name, MODELS)}; registered: {', '.join(MODELS)}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(MODELS[name])


def make_config(config_cls, overrides):
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in overrides.items():
        if key not in fields:
            raise UsageError(f"{config_cls.__module__}.Config has no field {key!r}{suggest(key, fields)}")
        default = fields[key].default
        if default is not None and not type_ok(value, type(default)):
            raise UsageError(f"{key}={value!r} should be a {type(default).__name__} like its default {default!r}")
    return config_cls(**overrides)


def build_model(name, **overrides):
    """core.build_model("v6", d_model=256, mode="chunk") -> the variant's Model with its Config."""
    module = load_model_module(name)
    return module.Model(make_config(module.Config, overrides))


def model_modes():
    """Every (name, mode) pair the registry offers: what the invariant tests run over."""
    return [(name, mode) for name in MODELS for mode in load_model_module(name).Config.modes]


# -----------------------------------------------------------------------------
# layers

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 and we keep nanoGPT's shape)."""

    def __init__(self, dim, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def linear_rows(x, weight, bias=None):
    """F.linear(x, weight, bias), with a row count of 4n + 2 or 4n + 3 padded to the next multiple of 4 on CPU.
    The CPU GEMM works in blocks of 4 rows and its remainder of 2 or 3 rows was 2-3x slower than a whole block
    against a (50,304, 128) weight (2 cores: 1 row 3.4 ms, 2 rows 7.7, 3 rows 10.5, 4 rows 5.2, 5 rows 3.6, 6 rows 7.0,
    8 rows 5.3): speculative verification and draft reading call the output head with 2-5 rows. Rows do not
    interact, so the extra zero rows are dropped and change nothing else."""
    rows = x.numel() // x.size(-1)
    if x.device.type != "cpu" or rows % 4 < 2:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.size(-1))
    out = F.linear(F.pad(flat, (0, 0, 0, 4 - rows % 4)), weight, bias)[:rows]
    return out.reshape(*x.shape[:-1], out.size(-1))


class Unembedding(nn.Linear):
    """The output head: nn.Linear (its weight tied to the embedding by the model) through linear_rows. While
    `deferred` (set by LM.forward_reading_drafts only) it returns an empty (..., 0) tensor: that caller reads the
    head itself, in one product with other rows; any other use of the logits then fails loudly on the shape."""

    deferred = False

    def forward(self, x):
        if self.deferred:
            return x.new_empty(*x.shape[:-1], 0)
        return linear_rows(x, self.weight, self.bias)


class MLP(nn.Module):
    def __init__(self, d_model, hidden=None, bias=False, dropout=0.0):
        super().__init__()
        hidden = hidden or 4 * d_model
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class KVCache:
    """Preallocated keys and values of one attention layer, written by absolute position.

    `length` is how many leading positions are valid. Rollback (rejected speculative drafts) is just
    `truncate(n)`: later writes overwrite the stale entries, and attention never reads past `length`.
    """

    def __init__(self, batch_size, n_heads, max_len, head_dim, device, dtype):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self):
        return self.k.size(2)

    def update(self, start_pos, k, v):
        T = k.size(2)
        if start_pos > self.length:
            raise RuntimeError(f"cache write at {start_pos} would leave a gap after {self.length} valid positions")
        if start_pos + T > self.max_len:
            raise RuntimeError(f"cache holds {self.max_len} positions; writing {T} at {start_pos} overflows it")
        self.k[:, :, start_pos:start_pos + T] = k
        self.v[:, :, start_pos:start_pos + T] = v
        self.length = start_pos + T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def truncate(self, n):
        self.length = min(self.length, n)

    def nbytes(self):
        return self.k.nelement() * self.k.element_size() + self.v.nelement() * self.v.element_size()


class Cache:
    """A model's decoding state: one KVCache per attention layer. Variants subclass it to carry more state
    (lattice rows, chunk contexts); `truncate` must roll back all of it."""

    def __init__(self, layers):
        self.layers = layers

    @property
    def length(self):
        return self.layers[0].length if self.layers else 0

    def truncate(self, n):
        for layer in self.layers:
            layer.truncate(n)

    def nbytes(self):
        return sum(layer.nbytes() for layer in self.layers)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads, bias=False, dropout=0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def new_kv_cache(self, batch_size, max_len, device, dtype):
        return KVCache(batch_size, self.n_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x, kv_cache=None, start_pos=0):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        dropout = self.dropout if self.training else 0.0
        if torch.is_tensor(start_pos):  # a ragged batch, row b at positions start_pos[b]..: the paged cache's attend
            y = kv_cache.attend(q, k, v, start_pos.tolist())
        elif kv_cache is None or start_pos == 0:
            if kv_cache is not None:
                kv_cache.update(0, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            k, v = kv_cache.update(start_pos, k, v)  # (B, nh, start_pos + T, hd)
            # query i sits at absolute position start_pos + i and may read keys 0..start_pos + i
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2)."""

    def __init__(self, d_model, n_heads, bias=False, dropout=0.0):
        super().__init__()
        self.ln_1 = LayerNorm(d_model, bias)
        self.attn = CausalSelfAttention(d_model, n_heads, bias, dropout)
        self.ln_2 = LayerNorm(d_model, bias)
        self.mlp = MLP(d_model, bias=bias, dropout=dropout)

    def forward(self, x, kv_cache=None, start_pos=0):
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))


def init_weights(module, std=0.02):
    """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def scale_residual_projections(model, n_layers, suffixes=("attn.proj.weight", "mlp.proj.weight")):
    """GPT-2: the projections that write into the residual stream start at std 0.02 / sqrt(2 n_layers), so the
    stream's variance does not grow with depth. n_layers counts the residual layers the model stacks."""
    for name, p in model.named_parameters():
        if name.endswith(suffixes):
            nn.init.normal_(p, mean=0.0, std=0.02 / (2 * n_layers) ** 0.5)


@dataclass
class Output:
    logits: torch.Tensor                  # (B, T, V)
    loss: Optional[torch.Tensor] = None   # scalar training objective when targets were given
    hidden: Optional[torch.Tensor] = None  # (B, T, D) final hidden states, for drafters and analysis
    aux: Optional[dict] = None            # named scalar parts of the loss, for logging
    horizon_hidden: Optional[torch.Tensor] = None  # (B, T, H-1, D) states of horizon offsets 2..H (drafting)
    exit_depth: Optional[torch.Tensor] = None      # (B, T) bottom layers run per token (early exit, eval mode)
    horizon_logits: Optional[torch.Tensor] = None  # (n, H-1, V) offsets 2..H read with the main head at n positions
                                                   # of row 0 (LM.forward_reading_drafts: speculative decoding)


def check_context(config, start_pos, T):
    """Positions start_pos..start_pos+T-1 must fit the model's context: an error, never a clamp or a modulo.
    start_pos is an int, or a (B,) LongTensor of per-row starts (ragged decoding through a paged cache)."""
    if torch.is_tensor(start_pos):
        start_pos = int(start_pos.max())
    if start_pos + T > config.max_seq_len:
        raise UsageError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len={config.max_seq_len}; "
                         f"crop the input or build with a longer max_seq_len")


def positions(start_pos, T, device):
    """Absolute positions of T tokens from start_pos: (T,) for an int, (B, T) for per-row starts (B,)."""
    if torch.is_tensor(start_pos):
        return start_pos[:, None] + torch.arange(T, device=device)
    return torch.arange(start_pos, start_pos + T, device=device)


def lm_loss(logits, targets):
    """Next-token cross-entropy in fp32; targets of -1 (padding) are ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


class LM(nn.Module):
    """Base class of every model: the public API (`generate`, `new_cache`, `draft`, FLOP count)
    around a variant's `forward`.

    A variant implements `forward(idx, targets=None, cache=None, start_pos=0) -> Output`, where `start_pos`
    is the absolute position of idx[:, 0] and `cache` (from `new_cache`) is read and written in place.
    """

    config: Config
    ragged_decoding = False   # True where forward takes a (B,) tensor of per-row start positions (paged cache)

    def head_logits(self, h):
        """Logits of a hidden state through the final norm and the tied head (what early exit's targets read)."""
        return self.lm_head(self.ln_f(h))

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self, "wpe"):
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs per token: 3x the forward's (backward = 2x forward), counted with
        torch.utils.flop_counter over one forward pass of this very model at its full context, with targets:
        every matmul and attention it runs (horizon heads, lattice rows, chunk levels, routing), not a
        GPT-shaped formula. For the GPT control it equals PaLM's 6 N + 12 L D T (a test checks it)."""
        from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
        T = self.config.max_seq_len
        idx = torch.zeros(1, T, dtype=torch.long, device=next(self.parameters()).device)
        was_training = self.training
        self.train()  # the dense training graph: no early exits
        # the CPU's fused attention kernel is missing from the counter's table; its work is attention's
        cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                    lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
        with torch.random.fork_rng(), torch.no_grad(), \
                FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            self(idx, targets=idx)
        self.train(was_training)
        return 3 * counter.get_total_flops() / T

    def new_cache(self, batch_size, device=None, dtype=None):
        """The decoding cache for batch_size rows. A model whose body keeps its own cache layout (`self.chunk` in
        chunk mode, else `self.trunk`) gets that body's cache; any other model one KVCache per attention layer."""
        p = next(self.parameters())
        body = getattr(self, "chunk", None) if self.config.mode == "chunk" else getattr(self, "trunk", None)
        if body is not None:
            return body.new_cache(batch_size, device or p.device, dtype or p.dtype)
        attns = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        return Cache([a.new_kv_cache(batch_size, self.config.max_seq_len, device or p.device, dtype or p.dtype)
                      for a in attns])

    def draft(self, seq, k, prev_out, prev_index):
        """Greedy drafts (k' <= k tokens to follow seq, None) by speculative decoding's rule before any evidence:
        from the horizon offsets (draft_logits) or prompt lookup, whichever gives more expected tokens per
        verification cost, as many as pay for their verification, or none (generate.plan_drafts)."""
        import generate
        return generate.first_round_drafts(self, seq, k, prev_out, prev_index)

    def draft_logits(self, prev_out, prev_index, k):
        """(k', V) logits, k' <= k, of horizon offsets 2..k'+1 at position prev_index of prev_out's row 0 (they
        draft the k' tokens after the pending one; speculative decoding reads them), or None for a model without
        horizon states. Read already when prev_out came from forward_reading_drafts (prev_index then counts in its
        horizon_logits' positions); else the k offsets are read through the tied head now, in one product."""
        if prev_out.horizon_logits is not None:
            return prev_out.horizon_logits[prev_index, :k]
        if prev_out.horizon_hidden is None:
            return None
        return linear_rows(prev_out.horizon_hidden[0, prev_index, :k], self.lm_head.weight)

    @property
    def reads_drafts_with_head(self):
        """True where forward_reading_drafts can read the horizon offsets in the main head's product: the output
        head is the tied Unembedding applied to Output.hidden, and the drafts are this class's draft_logits."""
        return (isinstance(getattr(self, "lm_head", None), Unembedding) and getattr(self, "horizon", None) is not None
                and type(self).draft_logits is LM.draft_logits)

    def forward_reading_drafts(self, idx, cache, start_pos, draft_at=slice(None)):
        """Speculative decoding's forward of one row (1, T): the Output of forward(idx, cache=cache,
        start_pos=start_pos), whose logits and horizon_logits ((n, H-1, V): the horizon offsets at positions
        `draft_at`, a slice of 0..T-1) come from ONE product over the unembedding. At batch 1 that product costs
        about one read of the (V, D) weight whatever its row count (2 cores, 50,304 x 128: 1 row 3.2 ms, 5 rows
        2.8, 25 rows 5.3), so the next round's drafts come almost free, where reading them after verification is
        a second pass over the weight. A model that cannot (reads_drafts_with_head False) runs its plain forward."""
        if not self.reads_drafts_with_head:
            return self(idx, cache=cache, start_pos=start_pos)
        if idx.size(0) != 1:
            raise UsageError(f"forward_reading_drafts decodes one row, got a batch of {idx.size(0)}")
        self.lm_head.deferred = True
        try:
            out = self(idx, cache=cache, start_pos=start_pos)
        finally:
            self.lm_head.deferred = False
        h, z = out.hidden[0], out.horizon_hidden[0, draft_at]                              # (T, D), (n, H-1, D)
        logits = self.lm_head(torch.cat([h, z.reshape(-1, z.size(-1))]))
        out.logits = logits[:h.size(0)][None]                                              # (1, T, V)
        out.horizon_logits = logits[h.size(0):].view(*z.shape[:2], -1)                     # (n, H-1, V)
        return out

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 speculative=False, generator=None, draft_len=4, stats=None, callback=None):
        """-> (B, T + max_new_tokens) tokens: plain, cached or speculative generation (see generate.py). idx may be a
        list of 1-D prompts of different lengths: then a list of sequences, decoded as one ragged batch where the
        model's paged cache allows it."""
        import generate  # generation builds on core, so core reaches it only at call time
        return generate.generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, speculative,
                                 generator, draft_len, stats, callback)


def param_groups(model, weight_decay):
    """AdamW groups: matrices and embeddings decay, vectors (biases, norm gains) don't (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# drafting (used by speculative decoding in generate.py)

def prompt_lookup_draft(seq, k, max_ngram=3):
    """Model-free drafts (prompt lookup decoding, as vLLM's "ngram" speculator): find the latest earlier
    occurrence of the sequence's last n tokens and propose the k tokens that followed it.
    seq: (1, N) -> (drafts (k',) with k' <= k, None); None means each draft is deterministic (q one-hot)."""
    ids = seq[0].to(device="cpu", dtype=torch.int64)
    buf, N = ids.numpy().tobytes(), ids.numel()        # 8 bytes a token: bytes.rfind searches at C speed
    for n in range(min(max_ngram, N - 1), 0, -1):
        tail = buf[8 * (N - n):]
        at = buf.rfind(tail, 0, 8 * (N - 1))           # an occurrence that ends before the last token
        while at > 0 and at % 8:                       # straddles two tokens: look further back
            at = buf.rfind(tail, 0, at + 8 * n - 1)
        if at >= 0:
            start = at // 8
            return seq[0, start + n:start + n + k].clone(), None
    return seq.new_empty(0), None


def draft_costs(K, cost, overhead=0.0):
    """[K + 1] the cost of a verification pass with k = 0..K drafts in one-token steps: 1 + cost k, plus
    `overhead` steps to propose any drafts at all (reading them out of the heads)."""
    return [1.0] + [1.0 + cost * k + overhead for k in range(1, K + 1)]


def best_draft_length(accept, cost, overhead=0.0):
    """accept (K,): the probability that draft j is accepted once drafts 1..j-1 were -> the k in 0..K that maximises
    the expected tokens per unit of verification cost, (1 + sum_{j<=k} prod_{i<=j} a_i) / cost_k. A pass with k
    drafts yields the accepted ones plus one token from the model; cost_k is draft_costs(K, cost, overhead), or
    cost[k] when cost is a sequence of (>= K + 1) measured costs. The rule reads probabilities, not losses, so it
    means the same at any vocabulary size and stage of training; 0 means no draft pays for its verification.
    Plain Python: it runs once per decoding round on K <= 16 numbers, where tensor ops would cost more than it."""
    accept = accept.tolist() if torch.is_tensor(accept) else list(accept)
    costs = draft_costs(len(accept), cost, overhead) if isinstance(cost, (int, float)) else \
        (cost.tolist() if torch.is_tensor(cost) else list(cost))
    best_k, best, tokens, reach = 0, 1.0 / costs[0], 1.0, 1.0
    for k, a in enumerate(accept, 1):
        reach *= min(max(a, 0.0), 1.0)                                    # P(drafts 1..k all accepted)
        tokens += reach
        if tokens / costs[k] > best:
            best_k, best = k, tokens / costs[k]
    return best_k


# -----------------------------------------------------------------------------
# routers that stay adaptive after training (v4.1's offset routing, v5's processor gates, ChaosLogic's task
# analyzer, lattice gates and pattern selector)
#
# Trained through the language-model loss alone, a router drifts to one constant mixture for every token, or shuts
# a gate for good: a shut sigmoid gate passes (almost) no gradient to the branch it gates, so the branch never
# improves and the gate never gets a reason to reopen (the rich-get-richer collapse of mixture-of-experts routers,
# Shazeer et al. 2017). The models add the standard counter-measures as small auxiliary losses. A loss may average
# over the batch; every routing decision stays a function of its own token and earlier ones.

def routing_information(p):
    """mean_t H(p_t) - H(mean p), averaged over the routers, for routing distributions p (B, T, *routers, K), where
    the mean routing is taken over the batch's rows at each position: minus the mutual information between a
    token's content and its choice given its position, in [-ln K, 0]. Minimising it keeps each token decisive
    (low H(p_t)) while the rows at a position together use every choice (high entropy of their mean routing: the
    soft, differentiable form of Switch / GShard's balance term N sum_i f_i P_i, Fedus et al. 2021; Lepikhin et al.
    2020). A router that gives every token one mixture sits at 0, the worst value; so does one that routes by
    position alone, which the term over all B*T tokens rewarded (v5's gates learned to alternate with position).
    A batch of one row has no rows to compare, and takes the mean over its positions instead."""
    p = p.float()
    token_entropy = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
    mean = p.mean((0, 1) if p.size(0) == 1 else 0)
    return token_entropy + (mean * mean.clamp_min(1e-9).log()).sum(-1).mean()


def init_router(*layers):
    """Re-initialise a router's Linear layers (input to output) so that its logits vary with unit scale across
    tokens from the first step: N(0, 2 / fan_in) before a ReLU / GELU (He et al. 2015), N(0, 1 / fan_in) for the
    logits, for inputs of unit scale (normed). GPT's N(0, 0.02) gives logits that differ between tokens by ~0.01,
    and the routing terms cannot create a spread that is not there: a router that treats every token alike is a
    stationary point of routing_information, which only amplifies differences (symmetry breaking at init, as a
    mixture-of-experts router needs)."""
    for i, layer in enumerate(layers):
        nn.init.normal_(layer.weight, std=((2 if i < len(layers) - 1 else 1) / layer.in_features) ** 0.5)


def bernoulli(gates):
    """Sigmoid gates (...,) as two-way distributions (..., 2) [g, 1 - g], for routing_information."""
    return torch.stack([gates, 1 - gates], -1)


def router_z_loss(logits, gate=False):
    """ST-MoE's router z-loss (Zoph et al. 2022): mean of logsumexp(logits)^2 over the last axis. It keeps router
    logits small, where a softmax still responds to its input and passes gradient. gate=True reads sigmoid-gate
    logits z as the two-way softmax [z / 2, -z / 2], so both a wide-open and a shut gate pay."""
    logits = logits.float()
    if gate:
        logits = torch.stack([logits / 2, -logits / 2], -1)
    return logits.logsumexp(-1).square().mean()


# -----------------------------------------------------------------------------
# spine lattice (HST v3, v4 and the variants after them)
#
# The "harmonic spine" of the original HST scripts: positions 0, 2, 4, then s_n = 2 (s_{n-1} + s_{n-2} + s_{n-3})
# (a doubled tribonacci recurrence). Spine node s_n (n >= 3) has the parents s_{n-1}, s_{n-2}, s_{n-3}, all strictly
# earlier, so the ancestor DAG is the same for every input: it is built once, as index tables, and the lattice core
# that reads it is causal by construction. docs/v3_v4.md has the longer story.

@dataclass
class SpineConfig(Config):
    """Config fields shared by the spine-lattice variants (v3, v4)."""
    # adaptive (early-exit) layers before the lattice, each but the last with an exit head; the rest of n_layers are
    # top. 0: half the stack, at least 2 (2 of 4 at the cpu_tiny size; 8 of 16, so 7 exit points, at the T4 size).
    # Exits live only here: the lattice and the top blocks run for every token, as the lattice reads spine rows.
    n_bottom_layers: int = 0
    horizon: int = 4                # horizon offsets 1..horizon; 1 is the main head
    horizon_weight: float = 0.5     # lambda_h of the horizon term in the objective
    horizon_gamma: float = 0.95     # discount of offset k: gamma^(k-1)
    horizon_sampling: bool = True   # training reads each offset >= 2 out at a random 1/(H-1) of positions (unbiased)
    # inference: a token exits once its confidence exceeds it; > 1 never exits (the dense model). Set from a held-out
    # loss tolerance by calibrate_exit (train.py does at the end of training) and saved with the config.
    exit_threshold: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_bottom_layers == 0:
            self.n_bottom_layers = min(self.n_layers, max(2, self.n_layers // 2))
        if not 1 <= self.n_bottom_layers <= self.n_layers:
            raise UsageError(f"n_bottom_layers={self.n_bottom_layers} must lie in [1, n_layers={self.n_layers}]")
        if self.horizon < 1:
            raise UsageError(f"horizon={self.horizon} must be >= 1 (1 = the main head only)")


def spine_positions(max_len):
    """The spine below max_len: [0, 2, 4, 12, 36, 104, 304] for 512."""
    spine = [0, 2, 4]
    while 2 * sum(spine[-3:]) < max_len:
        spine.append(2 * sum(spine[-3:]))
    return [s for s in spine if s < max_len]


def _spine_parents(i):
    return [i - 1, i - 2, i - 3] if i >= 3 else []


def lattice_structure(pos, spine=None):
    """Ancestors of spine node `pos`: (levels, path_counts).

    levels[l] lists the ancestors at shortest hop distance l (nearest position first); path_counts[a] is the
    number of distinct parent chains from pos down to a (tribonacci numbers). This is the analyzer the original
    meant: its BFS overwrote each level with the last node's parents and its path-count test was reversed.
    For 304: levels {1: [104, 36, 12], 2: [4, 2, 0]}, counts {104: 1, 36: 2, 12: 4, 4: 7, 2: 6, 0: 4}."""
    spine = spine or spine_positions(pos + 1)
    if pos not in spine:
        raise ValueError(f"{pos} is not a spine position (spine: {spine})")
    index = spine.index(pos)
    seen, frontier, levels = {index}, [index], {}
    while True:  # BFS over spine indices: level l holds the nodes first reached after l hops
        frontier = sorted({p for i in frontier for p in _spine_parents(i)} - seen, reverse=True)
        if not frontier:
            break
        seen.update(frontier)
        levels[len(levels) + 1] = [spine[p] for p in frontier]
    counts = {index: 1}
    for i in range(index, -1, -1):  # descending index is a topological order: children come before parents
        for p in _spine_parents(i) if i in counts else []:
            counts[p] = counts.get(p, 0) + counts[i]
    return levels, {spine[i]: c for i, c in sorted(counts.items(), reverse=True) if i != index}


class LatticeCore(nn.Module):
    """Multi-level and path-weighted fusion over spine ancestors, for every spine row that has parents.

    Per row r (position p) with ancestors a (A at most, left-padded, ordered by position so the nearest parent
    comes last) the tables give the ancestor's position and spine index, its DAG path count, and per level
    (shortest hop distance) its share of the level's path counts. Then, vectorized over rows and ancestors:
      multi-level: pool each level with count weights -> per-level MLP -> attention from x_p over the levels
                   (empty levels masked) -> fuse with x_p;
      path-weighted: messages MLP([x_a ; x_p]) scaled by a learned weight of the path count -> GRU over the
                   ancestors -> gate against x_p;
      out_p = x_p + W_out MLP([x_p ; multi ; path]), W_out zero-initialised, so the core starts as the identity.
    Every other row passes through unchanged. Ancestors come strictly before p, so out_t depends on x_<=t only.
    In a cached call the core's input rows at spine positions are kept in `rows_cache` (B, n_spine, D): a decode
    step at a spine row reads its ancestors from there.
    """

    def __init__(self, d_model, n_heads, max_len, bias=False):
        super().__init__()
        self.spine = spine_positions(max_len)
        structures = [lattice_structure(p, self.spine) for p in self.spine[3:]]
        if not structures:
            raise ValueError(f"no spine row with parents below {max_len}: the first one is 12")
        self.n_levels = max(len(levels) for levels, _ in structures)
        self.n_ancestors = A = max(len(counts) for _, counts in structures)
        R, L, D = len(structures), self.n_levels, d_model
        anc_pos = torch.zeros(R, A, dtype=torch.long)
        anc_mask = torch.zeros(R, A, dtype=torch.bool)
        anc_count = torch.ones(R, A)
        level_weight = torch.zeros(R, L, A)
        for r, (levels, counts) in enumerate(structures):
            ordered = sorted(counts)               # ascending position: the GRU reads the nearest parent last
            first = A - len(ordered)               # left padding
            for a, pos in enumerate(ordered, start=first):
                anc_pos[r, a], anc_mask[r, a], anc_count[r, a] = pos, True, counts[pos]
            for level, members in levels.items():
                total = sum(counts[m] for m in members)
                for m in members:
                    level_weight[r, level - 1, first + ordered.index(m)] = counts[m] / total
        spine_index = {p: i for i, p in enumerate(self.spine)}
        self.register_buffer("spine_pos", torch.tensor(self.spine), persistent=False)         # (n_spine,)
        self.register_buffer("row_pos", torch.tensor(self.spine[3:]), persistent=False)       # (R,)
        self.register_buffer("anc_pos", anc_pos, persistent=False)                            # (R, A)
        anc_spine = torch.tensor([[spine_index[p] for p in row] for row in anc_pos.tolist()])
        self.register_buffer("anc_spine", anc_spine, persistent=False)                        # (R, A)
        self.register_buffer("anc_mask", anc_mask, persistent=False)                          # (R, A)
        self.register_buffer("anc_log_count", torch.log1p(anc_count), persistent=False)       # (R, A)
        self.register_buffer("level_weight", level_weight, persistent=False)                  # (R, L, A)
        self.register_buffer("level_mask", level_weight.sum(-1) > 0, persistent=False)        # (R, L)
        self.n_heads = n_heads
        # multi-level fusion: one MLP per level (stacked weights), attention over levels, fusion with x_p
        self.level_fc = nn.Parameter(torch.randn(L, D, D) * 0.02)
        self.level_ln = nn.Parameter(torch.ones(L, D))
        self.level_proj = nn.Parameter(torch.randn(L, D, D) * 0.02)
        self.level_q = nn.Linear(D, D, bias=bias)
        self.level_kv = nn.Linear(D, 2 * D, bias=bias)
        self.level_out = nn.Linear(D, D, bias=bias)
        self.multi_fuse = nn.Linear(2 * D, D, bias=bias)
        self.multi_ln = LayerNorm(D, bias)
        # path-weighted fusion
        self.count_fc = nn.Linear(1, 16)
        self.count_proj = nn.Linear(16, 1)
        self.message = nn.Linear(2 * D, D, bias=bias)
        self.message_ln = LayerNorm(D, bias)
        self.gru = nn.GRUCell(D, D, bias=True)
        self.path_gate = nn.Linear(2 * D, D, bias=bias)
        # meta-fusion, residual: the output weight is a plain zero Parameter so init_weights leaves it at zero
        self.fuse_in = nn.Linear(3 * D, 2 * D, bias=bias)
        self.fuse_ln = LayerNorm(2 * D, bias)
        self.fuse_out = nn.Parameter(torch.zeros(D, 2 * D))

    def _rows_in(self, start_pos, end):
        """Slices of spine nodes and of rows with parents whose positions fall in [start_pos, end)."""
        first, stop = sum(s < start_pos for s in self.spine), sum(s < end for s in self.spine)
        return first, stop, max(first, 3) - 3, max(stop, 3) - 3

    def row_update(self, x_row, ancestors, rows):
        """x_row (B, R, D), ancestors (B, R, A, D), rows: the slice of the tables -> the rows' update (B, R, D)."""
        B, R, A, D = ancestors.shape
        nh, hd = self.n_heads, D // self.n_heads
        # multi-level: count-weighted pooling per level, per-level MLP, attention from the row over its levels
        pooled = torch.einsum("rla,brad->brld", self.level_weight[rows], ancestors)        # (B, R, L, D)
        f = F.gelu(F.layer_norm(torch.einsum("brld,lde->brle", pooled, self.level_fc), (D,)) * self.level_ln)
        f = torch.einsum("brld,lde->brle", f, self.level_proj)                             # (B, R, L, D)
        q = self.level_q(x_row).view(B, R, nh, hd)
        k, v = self.level_kv(f).view(B, R, -1, 2, nh, hd).unbind(3)                        # (B, R, L, nh, hd)
        scores = torch.einsum("brhd,brlhd->brhl", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~self.level_mask[rows][:, None, :], float("-inf"))
        attended = torch.einsum("brhl,brlhd->brhd", scores.softmax(-1), v).reshape(B, R, D)
        multi = self.multi_ln(self.multi_fuse(torch.cat([self.level_out(attended), x_row], -1)))
        # path-weighted: count-weighted messages, a GRU over the ancestors (padding leaves the state unchanged)
        weight = F.softplus(self.count_proj(F.relu(self.count_fc(self.anc_log_count[rows][..., None]))))  # (R, A, 1)
        pair = torch.cat([ancestors, x_row[:, :, None].expand(B, R, A, D)], -1)
        messages = F.gelu(self.message_ln(self.message(pair))) * weight                    # (B, R, A, D)
        state = x_row.new_zeros(B * R, D)
        mask = self.anc_mask[rows][None].expand(B, R, A).reshape(B * R, A, 1)
        for a in range(A):
            state = torch.where(mask[:, a], self.gru(messages[:, :, a].reshape(B * R, D), state), state)
        state = state.view(B, R, D)
        gate = torch.sigmoid(self.path_gate(torch.cat([state, x_row], -1)))
        path = gate * state + (1 - gate) * x_row
        hidden = F.gelu(self.fuse_ln(self.fuse_in(torch.cat([x_row, multi, path], -1))))
        return F.linear(hidden, self.fuse_out)

    def forward(self, x, start_pos=0, rows_cache=None):
        """x (B, T, D) at absolute positions start_pos.. -> (B, T, D). rows_cache: (B, n_spine, D) or None."""
        first, stop, r0, r1 = self._rows_in(start_pos, start_pos + x.size(1))
        if rows_cache is None:
            if start_pos:
                raise UsageError(f"the lattice needs its cache for start_pos={start_pos} > 0: pass the model's cache")
            source, anc_index = x, self.anc_pos                    # ancestors read straight from x
        else:
            rows_cache[:, first:stop] = x[:, self.spine_pos[first:stop] - start_pos]
            source, anc_index = rows_cache, self.anc_spine         # ancestors read from the cached spine rows
        if r0 == r1:
            return x
        rows = slice(r0, r1)
        local = self.row_pos[rows] - start_pos                     # (R,) rows' indices in this call
        update = self.row_update(x[:, local], source[:, anc_index[rows]], rows)  # (B, R, D)
        return x.index_add(1, local, update.to(x.dtype))  # under autocast the update may be in lower precision


# -----------------------------------------------------------------------------
# early exit (per token, CALM-style state propagation)
#
# Each exit head reads one token's own state, so decisions are causal and never depend on other samples (the
# original pooled its confidence over the sequence and the batch). Training runs every layer and fits each head
# to a CALM target (Schuster et al. 2022) read through the model's own final norm and tied head: 1 where the
# layer's state already predicts the next token within EXIT_CE_MARGIN nats of the final state's cross-entropy
# (without labels, in chunk mode's global model: where it predicts the final state's top token). Unlike the old
# saturation target 1[cos(h^l, h^L) > 0.95], which was 0 or 1 for every token of a layer, it varies per token
# (easy tokens are right early). The loss target, not top-token agreement, because exits are priced in loss: on
# a trained tiny model the tokens whose top token already agrees were no cheaper to exit than the average one.
# Only inference takes hard decisions, at a threshold that calibrate_exit chooses from a held-out loss tolerance;
# an exited token's state is copied upward while every skipped layer still caches its K/V, so caches stay complete.

EXIT_LOSS_WEIGHT = 0.03   # the original's weight of its depth term
EXIT_READOUT_SHARE = 0.25  # the exit targets' readout costs this share of the LM head's forward per step
EXIT_CE_MARGIN = 0.1      # target 1: the layer's next-token CE is within this many nats of the final state's
EXIT_TOLERANCE = 0.02     # default of calibrate_exit: held-out nats/token that exiting may cost over dense


class ExitHead(nn.Module):
    """c_t = sigmoid(w . LN(h_t) + b): the confidence that token t's state no longer changes. Returns the logit."""

    def __init__(self, d_model, bias=False):
        super().__init__()
        self.ln = LayerNorm(d_model, bias)
        self.fc = nn.Linear(d_model, 1)

    def forward(self, h):
        return self.fc(self.ln(h)).squeeze(-1)  # (B, T)


def exit_head_loss(heads, states, final, readout, labels=None):
    """Sum over exit heads of BCE(c^l, target^l), target^l = 1[CE(readout(h^l), y) <= CE(readout(h^L), y) +
    EXIT_CE_MARGIN] with labels y (B, T), else 1[argmax readout(h^l) == argmax readout(h^L)]. states: the hidden
    states after bottom layers 1..len(heads) (more are ignored); final (B, T, D): the state the model's prediction
    is read from; readout: such a state -> logits (the model's final norm and tied head). Inputs and targets are
    detached, so the heads learn to read the stack without reshaping it.

    Reading a state out costs a V-wide matmul, so each step reads out a fresh uniform sample of n positions (the
    same for every layer), about EXIT_READOUT_SHARE of the LM head's forward in all, without gradient. The mean BCE
    over a uniform sample drawn without replacement is an unbiased estimate of the mean over all positions (each
    position is in the sample with the same probability n / (B T)), so the heads fit the dense objective in
    expectation. Dense: no host sync, no data-dependent branch."""
    B, T, D = final.shape
    N, L = B * T, len(heads)
    rows = sample_rows(N, max(1, math.ceil(N * EXIT_READOUT_SHARE / (L + 1))), final.device)

    def pick(t):
        t = t.detach().reshape(N, *t.shape[2:])
        return t if rows is None else t[rows]

    xs = [pick(t) for t in [final] + list(states[:L])]
    with torch.no_grad():
        logits = readout(torch.cat(xs)).float()                              # ((L + 1) n, V)
        if labels is None:
            top = logits.argmax(-1).view(L + 1, -1)                          # (L + 1, n): top token per state
            targets = (top[1:] == top[:1]).float()                           # (L, n)
        else:
            y = pick(labels).repeat(L + 1)
            ce = F.cross_entropy(logits, y, ignore_index=-1, reduction="none").view(L + 1, -1)
            targets = (ce[1:] <= ce[:1] + EXIT_CE_MARGIN).float()            # (L, n)
    total = final.new_zeros((), dtype=torch.float32)
    for head, x, target in zip(heads, xs[1:], targets):
        total = total + F.binary_cross_entropy_with_logits(head(x).float(), target)
    return total


def fill_kv(block, x, kv_cache, start_pos):
    """Write the K/V that `block` would cache for x without running it: an exited token's skipped layers."""
    attn = block.attn
    B, T, D = x.shape
    w, b = attn.qkv.weight[D:], None if attn.qkv.bias is None else attn.qkv.bias[D:]
    k, v = F.linear(block.ln_1(x), w, b).split(D, dim=2)
    k, v = (t.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (k, v))
    if torch.is_tensor(start_pos):  # a ragged batch, row b at positions start_pos[b]..: the paged cache's write
        kv_cache.write_ragged(k, v, start_pos.tolist())
    else:
        kv_cache.update(start_pos, k, v)


def spine_offsets(max_len):
    """R = {1} and the spine's nonzero positions below max_len, read as relative offsets: [1, 2, 4, 12, 36, ...]."""
    return [1] + [s for s in spine_positions(max_len)[1:]]


class MaskedSelfAttention(CausalSelfAttention):
    """Attention under a mask of absolute positions, `mask(start_pos, T, S, device)` -> bool (T, S) or (nh, T, S),
    query start_pos + i reading key j, that subclasses define. A function of positions only, so a cached call
    builds exactly the rows of the full forward's mask over the ordinary KV cache."""

    def forward(self, x, kv_cache=None, start_pos=0):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(start_pos, k, v)                                   # (B, nh, start_pos + T, hd)
        mask = self.mask(start_pos, T, k.size(2), x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_dropout(self.proj(y))


class SpineSelfAttention(MaskedSelfAttention):
    """Causal spine attention: query t reads key t - d when d < window (a local window, t itself included) or when
    d is a spine offset this head reads. Offsets are grouped by spine level (near: 1, 2, 4; mid: 12, 36; far: 104
    and beyond) and each head group reads one level (with fewer heads than levels, a head reads several), so every
    position, not only the spine rows, gets lattice context at a few fixed distances. The mask depends only on
    relative distance, so a cached decode step uses the row of the full forward's mask: same KV layout, same logits.
    """

    def __init__(self, d_model, n_heads, max_len, window=4, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, bias, dropout)
        level_of = {r: 0 if r <= 4 else 1 if r <= 36 else 2 for r in spine_offsets(max_len)}
        levels = sorted(set(level_of.values()))                                      # the levels below max_len
        L = len(levels)
        reads = (torch.arange(max_len) < window).repeat(n_heads, 1)                 # (nh, max_len) by distance
        for r, level in level_of.items():
            level = levels.index(level)
            for h in range(n_heads):  # every level gets a head, every head a level
                if (level * n_heads // L == h) if n_heads < L else (h * L // n_heads == level):
                    reads[h, r] = True
        self.register_buffer("reads", reads, persistent=False)                       # (nh, max_len)

    def mask(self, start_pos, T, S, device):
        """(nh, T, S) bool: query start_pos + i may read key j."""
        distance = torch.arange(start_pos, start_pos + T, device=device)[:, None] - torch.arange(S, device=device)
        return (distance >= 0) & self.reads[:, distance.clamp(0, self.reads.size(1) - 1)]



class SpineBlock(Block):
    """A pre-LN block whose attention is causal spine attention (SpineSelfAttention)."""

    def __init__(self, d_model, n_heads, max_len, window=4, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, bias, dropout)
        self.attn = SpineSelfAttention(d_model, n_heads, max_len, window, bias, dropout)


@contextlib.contextmanager
def spine_attention_off(model):
    """Inside the block every SpineBlock of `model` returns its input unchanged: spine attention switched off, for
    measuring what it does (bench.py's mechanisms table). Nothing is written to the weights."""
    hooks = [m.register_forward_hook(lambda mod, args, out: args[0]) for m in model.modules()
             if isinstance(m, SpineBlock)]
    try:
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()


class SpineCache(Cache):
    """The KV caches of a SpineTrunk (bottom layers, then top layers) and its lattice input rows (B, n_spine, D).

    `truncate` needs nothing more than the KV lengths: lattice rows are written by position, a call rewrites
    every spine row it covers before reading any, and it only reads rows below its own positions."""

    def __init__(self, layers, lattice_rows):
        super().__init__(layers)
        self.lattice_rows = lattice_rows

    def nbytes(self):
        rows = 0 if self.lattice_rows is None else self.lattice_rows.nelement() * self.lattice_rows.element_size()
        return super().nbytes() + rows


class SpineTrunk(nn.Module):
    """The HST v3/v4 stack over one causal axis (tokens, or chunks in chunk mode): adaptive bottom blocks with
    per-token early exit, the spine lattice core, top blocks.

    forward(x, cache, start_pos, exit_threshold, readout, labels) -> (h, exit_loss, exit_depth). Training: every
    layer runs and exit_loss is the exit heads' objective against readout(h) and the labels, when given
    (exit_head_loss; exit_depth None). Eval: token t stops after bottom layer l < n_bottom
    when its confidence exceeds exit_threshold (exit_loss None, exit_depth (B, T) = bottom layers run). A
    threshold above 1 never exits and gives exactly the dense model. The lattice is either `spine_blocks` blocks of
    causal spine attention (SpineBlock, every position) or, without them, the spine-row LatticeCore, which exists
    only when max_len reaches a spine row with parents (12)."""

    def __init__(self, d_model, n_heads, n_bottom, n_top, max_len, bias=False, dropout=0.0, spine_blocks=0,
                 spine_window=4):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.bottom = nn.ModuleList(Block(d_model, n_heads, bias, dropout) for _ in range(n_bottom))
        self.exit_heads = nn.ModuleList(ExitHead(d_model, bias) for _ in range(n_bottom - 1))
        # the lattice between bottom and top: spine_blocks > 0 blocks of causal spine attention (every position),
        # else the spine-row LatticeCore
        use_core = not spine_blocks and max_len > 12
        self.lattice = LatticeCore(d_model, n_heads, max_len, bias) if use_core else None
        self.spine = nn.ModuleList(SpineBlock(d_model, n_heads, max_len, spine_window, bias, dropout)
                                   for _ in range(spine_blocks))
        self.top = nn.ModuleList(Block(d_model, n_heads, bias, dropout) for _ in range(n_top))

    def new_cache(self, batch_size, device, dtype):
        blocks = list(self.bottom) + list(self.top) + list(self.spine)   # the spine blocks' caches come last
        layers = [b.attn.new_kv_cache(batch_size, self.max_len, device, dtype) for b in blocks]
        rows = None if self.lattice is None else torch.zeros(batch_size, len(self.lattice.spine), self.d_model,
                                                             device=device, dtype=dtype)
        return SpineCache(layers, rows)

    def forward(self, x, cache=None, start_pos=0, exit_threshold=2.0, readout=None, labels=None):
        kv = [None] * (len(self.bottom) + len(self.top)) if cache is None else cache.layers
        h, loss, depth = x, None, None
        if self.training:
            if len(self.exit_heads) and readout is None:
                raise UsageError("SpineTrunk with exit heads needs readout= (final state -> logits) in training")
            states = []
            for i, block in enumerate(self.bottom):
                h = block(h, kv[i], start_pos)
                states.append(h)
        else:
            B, T, _ = x.shape
            exited = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            depth = torch.full((B, T), len(self.bottom), dtype=torch.long, device=x.device)
            for i, block in enumerate(self.bottom):
                if i and bool(exited.all()):  # speed path: nothing left to compute but the skipped layers' K/V
                    if kv[i] is not None:
                        fill_kv(block, h, kv[i], start_pos)
                    continue
                # exited tokens keep their state; the block still reads it for their K/V (state propagation)
                h = torch.where(exited[..., None], h, block(h, kv[i], start_pos))
                if i < len(self.exit_heads):
                    leave = ~exited & (torch.sigmoid(self.exit_heads[i](h)) > exit_threshold)
                    depth = torch.where(leave, i + 1, depth)
                    exited = exited | leave
        if self.lattice is not None:
            h = self.lattice(h, start_pos, None if cache is None else cache.lattice_rows)
        for i, block in enumerate(self.spine, start=len(self.bottom) + len(self.top)):
            h = block(h, None if cache is None else cache.layers[i], start_pos)
        for i, block in enumerate(self.top, start=len(self.bottom)):
            h = block(h, kv[i], start_pos)
        if self.training and len(self.exit_heads):  # the target is the prediction read from the trunk's output
            loss = exit_head_loss(self.exit_heads, states, h, readout, labels)
        return h, loss, depth


def exit_trunks(model):
    """The model's SpineTrunks that have exit heads (one per model; in chunk mode the global model's)."""
    return [m for m in model.modules() if isinstance(m, SpineTrunk) and len(m.exit_heads)]


@torch.no_grad()
def exit_profile(model, windows, threshold, per_row=False):
    """Early exit at `threshold`, measured over held-out (x, y) windows in eval mode: (loss, depth_share,
    confidences). loss: mean next-token CE (nats/token), or with per_row=True (n_rows,) the mean CE of each row of
    every window batch; depth_share (n_bottom,): the share of trunk positions (tokens; chunk slots in chunk mode) that
    run 1..n_bottom bottom layers; confidences: every exit head's output on the positions it saw, flattened. The
    model's own threshold and train/eval mode are restored afterwards."""
    trunks = exit_trunks(model)
    if len(trunks) != 1:
        raise UsageError(f"{type(model).__module__} has no exit heads: early exit needs n_bottom_layers >= 2")
    trunk, was_training = trunks[0], model.training
    model.eval()
    seen, depths = [], []
    hooks = [head.register_forward_hook(lambda m, i, out: seen.append(torch.sigmoid(out.float()).flatten()))
             for head in trunk.exit_heads]
    hooks.append(trunk.register_forward_hook(lambda m, i, out: depths.append(out[2].flatten())))
    saved, model.config.exit_threshold = model.config.exit_threshold, threshold
    sums, counts = [], []
    try:
        for x, y in windows:
            logits = model(x).logits                  # flat rows: CE over a transposed (B, V, T) view is 3x slower
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                 reduction="none").view_as(y)
            sums.append(ce.sum(1))                                           # (B,): positions with a target
            counts.append((y >= 0).sum(1))
    finally:
        model.config.exit_threshold = saved
        model.train(was_training)
        for h in hooks:
            h.remove()
    depth = torch.cat(depths)
    share = torch.bincount(depth - 1, minlength=len(trunk.bottom)).float() / depth.numel()
    sums, counts = torch.cat(sums), torch.cat(counts)
    loss = sums / counts.clamp_min(1) if per_row else (sums.sum() / counts.sum().clamp_min(1)).item()
    return loss, share, torch.cat(seen)


def calibrate_exit(model, windows, tolerance=EXIT_TOLERANCE, n_candidates=16):
    """Set model.config.exit_threshold to the lowest threshold (the most exits) whose held-out next-token loss over
    (x, y) `windows` exceeds the dense model's by at most `tolerance` nats/token, with two standard errors of the
    paired per-window difference added to the measured cost (per window, not per token: an exit also changes the
    later tokens of its window, so tokens are not independent; and a choice among many candidates is then not an
    optimistic one), there and at every higher candidate (so a lucky dip in the loss curve is never picked). Candidates are
    quantiles of the exit heads' confidences on the windows (evenly spaced, plus the top 3%, 1.5% and 0.8%, so that a model whose exits are
    costly can still let its surest positions go); scanning stops at the first candidate over the tolerance. A model
    whose exits cost more than the tolerance everywhere gets 2.0 (never exits). The threshold is a config field, so
    checkpoints keep it. Returns {threshold, dense_loss, loss, depth_share (list), tolerance}."""
    if tolerance < 0:
        raise UsageError(f"tolerance={tolerance} must be >= 0 (nats/token of held-out loss)")
    dense, share, conf = exit_profile(model, windows, 2.0, per_row=True)
    dense_loss = dense.mean().item()
    best = dict(threshold=2.0, loss=dense_loss, depth_share=share.tolist())
    levels = torch.cat([torch.linspace(0, 1, n_candidates + 2)[1:-1], 1 - 0.5 ** torch.arange(5.0, 8.0)])
    candidates = torch.quantile(conf.double(), levels.double()).unique().flip(0).tolist()  # high to low
    for t in candidates:
        losses, share, _ = exit_profile(model, windows, t, per_row=True)
        diff = losses - dense                                                # paired: same windows, same targets
        if diff.mean() + 2 * diff.std(correction=0) / diff.numel() ** 0.5 > tolerance:
            break
        best = dict(threshold=t, loss=losses.mean().item(), depth_share=share.tolist())
    model.config.exit_threshold = best["threshold"]
    return dict(best, dense_loss=dense_loss, tolerance=tolerance)


# -----------------------------------------------------------------------------
# horizon heads (multi-token prediction)
#
# Canonical offsets: offset k = 1..H at position t predicts token t+k; offset 1 is the main head.
# Offsets 2..H are Medusa heads (Cai et al. 2024): z_k = h + SiLU(W_k h) on the final normed state, read out by
# the tied unembedding. W_k starts at zero, so every offset starts as the main head's prediction.

class HorizonHeads(nn.Module):
    """Offsets 2..horizon as residual SiLU maps of the final state; read them out with the tied unembedding."""

    def __init__(self, d_model, horizon):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(horizon - 1, d_model, d_model))  # (H-1, D, D), offsets 2..H

    def forward(self, h):
        """h (B, T, D) -> (B, T, H-1, D): the hidden state of offsets 2..H at every position."""
        return h[:, :, None] + F.silu(torch.einsum("btd,ked->btke", h, self.weight))


def horizon_targets(targets, offset):
    """The token each position's offset-k head is trained on: targets[:, t + k - 1] (targets[:, t] is token
    t+1), and -1 (ignored) where t + k runs past the window."""
    shifted = targets[:, offset - 1:]
    return F.pad(shifted, (0, targets.size(1) - shifted.size(1)), value=-1)


class _LinearLogSumExp(torch.autograd.Function):
    """See linear_lse_loss. The gradients are computed in the forward, one row chunk at a time, and only scaled by
    the upstream gradient in the backward (as Liger's fused linear cross-entropy): the loss is linear in lse, pick
    and S with weights known in advance, so d loss / d logits = a softmax - b onehot is known chunk by chunk. The
    softmax P of a chunk serves the cross-entropy and the pull term at once: S = P W is also the product that gives
    d loss / d z = a S - b W[index], and W's gradient from both terms is one product P^T (a z - pull)."""

    @staticmethod
    def forward(ctx, z, weight, index, a, b, pull, chunk, grad_enabled, keep):
        # outputs without a gradient (the logits, lse, ...) reach backward as None, not as zeros autograd would
        # fill: a (rows, V) fill of the kept logits every step (5 % of v6's step at d_model 128)
        ctx.set_materialize_grads(False)
        b = a if b is None else b
        want_z, want_w, want_pull = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 5))
        total = torch.zeros((), device=z.device, dtype=torch.float32)
        lse, pick, argmax, expected = [], [], [], []
        grad_z = torch.empty_like(z) if want_z else None
        grad_w = None  # the first chunk's product starts it: no pass to zero a (V, D) buffer
        # fp32 logits to keep are written by the product itself, straight into the caller's tensor (no copy pass)
        autocast = torch.is_autocast_enabled(z.device.type)
        direct = keep > 0 and z.dtype == weight.dtype == torch.float32 and not autocast
        out = z.new_empty(keep, weight.size(0)) if direct else None
        for lo, hi in chunk_spans(z.size(0), chunk, keep):
            zc, ic, ac, bc = z[lo:hi], index[lo:hi], a[lo:hi], b[lo:hi]
            kept_direct = direct and lo < keep
            if kept_direct:
                logits = torch.mm(zc, weight.t(), out=out[lo:hi])                    # (chunk, V), kept
            else:
                logits = F.linear(zc, weight)                                        # (chunk, V): the only one
                if lo < keep:
                    out = logits.new_empty(keep, logits.size(1)) if out is None else out
                    out[lo:hi] = logits
            logits = logits.float()
            pick_c = logits.gather(1, ic[:, None])[:, 0]
            top, top_i = row_max(logits)                         # the max for a stable lse and the argmax: one pass
            # exp(logits - max), in place unless the logits are the kept ones
            e = torch.sub(logits, top[:, None]).exp_() if kept_direct else logits.sub_(top[:, None]).exp_()
            norm = e.sum(-1)
            lse_c = top + norm.log()
            argmax.append(top_i)
            total = total + (ac * lse_c - bc * pick_c).sum()
            lse.append(lse_c)
            pick.append(pick_c)
            # softmax = e / norm: the 1 / norm goes on the D side of each product, so no pass over (chunk, V)
            # normalises e
            if want_z or pull is not None:
                s = (e.to(weight.dtype) @ weight).float() / norm[:, None]              # (chunk, D): S = P W
            if pull is not None:
                total = total - (pull[lo:hi] * s).sum()
                expected.append(s)
            if want_z:
                grad_z[lo:hi] = (ac[:, None] * s - bc[:, None] * weight[ic].float()).to(z.dtype)
            if want_w:
                zf = zc.float()
                side = zf * ac[:, None] if pull is None else zf * ac[:, None] - pull[lo:hi]
                if grad_w is None or autocast:      # fp32 under autocast too, as index_add_ needs
                    gw = (e.t() @ (side / norm[:, None])).float()
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
                else:                               # accumulated in place: no fresh (V, D) product per chunk
                    grad_w.addmm_(e.t(), side / norm[:, None])
                grad_w.index_add_(0, ic, -bc[:, None] * zf)
        expected = torch.cat(expected) if pull is not None else None
        ctx.save_for_backward(grad_z, grad_w, -expected if want_pull else None)
        ctx.weight_dtype = weight.dtype
        lse, pick, argmax = torch.cat(lse), torch.cat(pick), torch.cat(argmax)
        ctx.mark_non_differentiable(lse, pick, argmax, *(t for t in (out, expected) if t is not None))
        return total, lse, pick, argmax, out, expected

    @staticmethod
    def backward(ctx, g_total, *_):
        grad_z, grad_w, grad_pull = ctx.saved_tensors
        if g_total is None:
            return (None,) * 9
        return (None if grad_z is None else grad_z * g_total.to(grad_z.dtype),
                None if grad_w is None else (grad_w * g_total).to(ctx.weight_dtype),
                None, None, None,
                None if grad_pull is None else grad_pull * g_total,
                None, None, None)


def row_max(x, block=64):
    """(values, indices) of the max over x's last axis (n, V), as x.max(-1), first index on ties. When V is a
    multiple of `block`: the blocks' maxima by amax (vectorised), the best block's argmax, and the argmax inside
    it, which read x once at amax's speed (5x faster than max with indices on a CPU at V = 50,304)."""
    n, V = x.shape
    if V % block:
        return x.max(-1)
    blocks = x.reshape(n, V // block, block)
    top, j = blocks.amax(-1).max(-1)
    return top, j * block + blocks[torch.arange(n, device=x.device), j].argmax(-1)


def chunk_spans(n_rows, chunk, keep=0):
    """(lo, hi) row ranges of at most `chunk` rows covering n_rows, none straddling row `keep`: a chunked pass
    writes the logits of its first keep rows for the caller and only works on the others' (a main head's rows
    and the horizon offsets' rows in one pass). Each side is cut into equal spans, in multiples of 8 rows where
    the chunk allows, rather than full chunks and a remainder: 525 rows by 512 are 264 + 261, not 512 + 13 (a
    CPU GEMM runs a few rows at half its speed)."""
    spans = []
    for start, end in ((0, keep), (keep, n_rows)):
        n = end - start
        if n <= 0:
            continue
        pieces = -(-n // chunk)
        size = min(chunk, (-(-n // pieces) + 7) // 8 * 8)      # ceil(n / pieces), up to a multiple of 8
        spans += [(lo, min(lo + size, end)) for lo in range(start, end, size)]
    return spans


def lse_chunk_rows(vocab_size):
    """Rows per chunk of a chunked pass over the vocabulary: about 8M logits (a chunk's (rows, V) tensors stay
    small), in whole blocks of 8 rows, so the CPU GEMM never runs a slow 2- or 3-row remainder (linear_rows)."""
    return max(16, (1 << 23) // vocab_size // 8 * 8)


def linear_lse_loss(z, weight, index, a, b=None, chunk=None, keep_logits=False, pull=None):
    """sum_r a_r logsumexp(z_r W^T) - b_r (z_r W^T)[index_r], in fp32, for rows z (N, D), weight W (V, D), per-row
    coefficients a, b (N,) (no gradient; b None: b = a, the a-weighted sum of cross-entropies). The (N, V)
    logits are never materialised: rows go through in chunks of about 8M logits, each chunk's gradient is taken
    at once, and nothing of size V is kept for the backward (3 matmuls, no recomputation, one pass over the
    logits held in cache). -> (total, lse (N,), pick (N,), argmax (N,)); only total carries a gradient.
    keep_logits adds the logits (N, V), written once chunk by chunk, without a graph (a main head's loss through
    this pass still hands its logits to the caller); an int n keeps the first n rows' logits (n, V) only.
    pull (N, D) adds - sum_r pull_r . S_r to the total, S_r = sg(softmax(z_r W^T)) W the expected unembedding row
    (W's gradient through S included, the softmax's stopped; pull's gradient is -S), and S (N, D) to the outputs:
    a KL(sg(p) || q_k) toward another head's rows z_k (v6's consistency term) has its p-side terms from this pass
    with pull_r = sum_k w_k z_k, and S gives sum p log p = z . S - lse without a second pass over V."""
    chunk = chunk or lse_chunk_rows(weight.size(0))
    # grad mode is off inside a Function's forward, so whether a backward can come is read here
    out = _LinearLogSumExp.apply(z, weight, index, a.float(), None if b is None else b.float(),
                                 None if pull is None else pull.float(), chunk, torch.is_grad_enabled(),
                                 z.size(0) if keep_logits is True else int(keep_logits))
    return out[:4] + ((out[4],) if keep_logits else ()) + ((out[5],) if pull is not None else ())


def offset_rows(n_rows, n_offsets, device, share=None):
    """(n_offsets, n) row indices at which each horizon offset is scored: every row (share None: n = n_rows), or
    n = ceil(share * n_rows / n_offsets) rows drawn uniformly without replacement, fresh per offset and per call,
    so all offsets together read about `share` heads' worth of rows whatever their number. A row is drawn with
    probability n / n_rows, so (n_rows / n) * (sum over drawn rows) is an unbiased estimate of the full sum."""
    if share is None:
        return torch.arange(n_rows, device=device).expand(n_offsets, n_rows)
    n = min(n_rows, max(1, math.ceil(share * n_rows / n_offsets)))
    return torch.rand(n_offsets, n_rows, device=device).argsort(-1)[:, :n]


def offset_targets(targets, n_offsets, first=2):
    """targets (B, T) -> (B T, n_offsets): column j is horizon_targets(targets, first + j), flattened."""
    return torch.stack([horizon_targets(targets, first + j) for j in range(n_offsets)], -1).flatten(0, 1)


def sample_rows(n_rows, n, device):
    """n distinct row indices of n_rows, uniformly at random (fresh each call), or None when n >= n_rows."""
    return None if n >= n_rows else torch.randperm(n_rows, device=device)[:n]


def horizon_loss(horizon_hidden, unembed, targets, gamma=0.95, sample=False, readout=False):
    """sum_k gamma^(k-1) CE_k / sum_k gamma^(k-1) over offsets k = 2..H, CE_k the mean over positions with a
    target. horizon_hidden (B, T, H-1, D), unembed (V, D), targets (B, T). Through linear_lse_loss, so no
    [B, T, V] logits tensor is ever alive, let alone [B, T, H, V].

    sample=True (training) scores each offset at n = ceil(B T / (H-1)) positions drawn uniformly without
    replacement, fresh per offset and per step (offset_rows), all offsets' rows in one pass over the unembedding:
    about the cost of one extra head whatever H is. The estimate (B T / n) * sum_{sampled} ce / #targets is
    unbiased: each position is drawn with probability n / (B T), so the expected sum over the sample is n / (B T)
    times the sum over all positions, and #targets (the positions that have a target) is counted on the full
    window, without touching V. readout=True also returns the rows scored ((n_off, n), offset_rows) and each
    scored row's argmax ((n_off, n), no gradient), from the same pass: what a draft-acceptance target reads."""
    B, T, n_off, D = horizon_hidden.shape
    N = B * T
    rows = offset_rows(N, n_off, horizon_hidden.device, 1.0 if sample else None)     # (n_off, n)
    k = torch.arange(n_off, device=rows.device)[:, None]
    target_all = offset_targets(targets, n_off)                                        # (N, n_off)
    target = target_all[rows, k]                                                       # (n_off, n)
    z = horizon_hidden.reshape(N, n_off, D)[rows, k]                                   # (n_off, n, D)
    w = gamma ** torch.arange(1, n_off + 1, device=rows.device, dtype=torch.float32)  # gamma^(k-1), k = j + 2
    per_target = w / w.sum() * (N / rows.size(1)) / (target_all >= 0).sum(0).clamp_min(1)  # 0, not nan, if none
    coef = (per_target[:, None] * (target >= 0)).reshape(-1)
    total, _, _, argmax = linear_lse_loss(z.reshape(-1, D), unembed, target.clamp_min(0).reshape(-1), coef)
    return (total, rows, argmax.view_as(rows)) if readout else total


def horizon_objective(logits, targets, horizon_hidden=None, unembed=None, exit_loss=None, horizon_weight=0.5,
                      gamma=0.95, sample=False, readout=False):
    """The spine variants' objective and its named parts: (CE_main + horizon_weight * CE_horizon) /
    (1 + horizon_weight) + EXIT_LOSS_WEIGHT * exit_loss. A weighted mean of cross-entropies, so it stays on the
    scale of next-token CE (about ln V at initialisation) whatever the horizon weight. readout=True (with horizon
    states) adds horizon_loss's (rows, argmax) as a third result."""
    aux = {"lm": lm_loss(logits, targets)}
    loss, scored = aux["lm"], None
    if horizon_hidden is not None:
        aux["horizon"] = horizon_loss(horizon_hidden, unembed, targets, gamma, sample, readout)
        if readout:
            aux["horizon"], *scored = aux["horizon"]
        loss = (loss + horizon_weight * aux["horizon"]) / (1 + horizon_weight)
    if exit_loss is not None:
        aux["exit"] = exit_loss
        loss = loss + EXIT_LOSS_WEIGHT * exit_loss
    return (loss, aux, scored) if readout else (loss, aux)


# -----------------------------------------------------------------------------
# chunk mode (MEGABYTE, Yu et al. 2023; Block Transformer, Ho et al. 2024)
#
# Token t's logits predict token t+1, which sits in group g = (t+1) // C, slot (t+1) % C of the "stream"
# [BOS, x_0, x_1, ...] (stream slot u holds token u-1). Chunk j is the tokens jC..jC+C-1; its encoding e_j feeds
# global slot j+1 only, so global output g_c summarises chunks < c (slot 0 reads a learned start vector). The local
# decoder runs causally inside each group of C stream slots, conditioned on its g. Token t therefore reads chunks
# < (t+1) // C, all of whose tokens are <= t, and the earlier slots of its own group: causal, for any length.

class GroupedCausalSelfAttention(CausalSelfAttention):
    """Causal self-attention inside fixed groups of `group_size` consecutive positions: u reads its group's
    positions up to u. Without a cache the input is whole groups (the caller pads), attended as a batch axis."""

    def __init__(self, d_model, n_heads, group_size, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, bias, dropout)
        self.group_size = group_size

    def forward(self, x, kv_cache=None, start_pos=0):
        B, T, D = x.shape
        G = self.group_size
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None:
            if start_pos % G or T % G:
                raise ValueError(f"uncached grouped attention needs whole groups of {G}, got {T} at {start_pos}")
            groups = (B, self.n_heads, T // G, G, self.head_dim)
            y = F.scaled_dot_product_attention(q.view(groups), k.view(groups), v.view(groups), dropout_p=dropout,
                                               is_causal=True).view(B, self.n_heads, T, self.head_dim)
        else:
            first = start_pos // G * G  # keys before the first query's group are never read
            k, v = (t[:, :, first:] for t in kv_cache.update(start_pos, k, v))
            q_pos = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
            k_pos = torch.arange(first, start_pos + T, device=x.device)[None]
            mask = (k_pos <= q_pos) & (k_pos // G == q_pos // G)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_dropout(self.proj(y))


class GroupedBlock(Block):
    """A pre-LN block whose attention stays inside groups (it replaces Block's causal attention)."""

    def __init__(self, d_model, n_heads, group_size, bias=False, dropout=0.0):
        super().__init__(d_model, n_heads, bias, dropout)
        self.attn = GroupedCausalSelfAttention(d_model, n_heads, group_size, bias, dropout)


class ChunkEncoder(nn.Module):
    """e_c from the C token embeddings of chunk c, normed and concatenated (MEGABYTE's patch embedder). It sees the
    whole chunk at once; that is causal-safe because e_c only feeds global slots after chunk c."""

    def __init__(self, d_model, chunk_size, bias=False):
        super().__init__()
        self.ln = LayerNorm(d_model, bias)
        self.proj = nn.Linear(chunk_size * d_model, d_model, bias=bias)

    def forward(self, chunk_emb):
        return self.proj(self.ln(chunk_emb).flatten(2))  # (B, N, C, D) -> (B, N, D)


class LocalDecoder(nn.Module):
    """Causal transformer over the C slots of each group, conditioned by adding a projection of the group's global
    context to every slot; slot positions are 0..C-1 and attention never leaves the group."""

    def __init__(self, d_model, n_heads, n_layers, chunk_size, bias=False, dropout=0.0):
        super().__init__()
        self.chunk_size = chunk_size
        self.wpe = nn.Embedding(chunk_size, d_model)
        self.cond = nn.Linear(d_model, d_model, bias=bias)
        self.blocks = nn.ModuleList(GroupedBlock(d_model, n_heads, chunk_size, bias, dropout)
                                    for _ in range(n_layers))

    def forward(self, x, context, caches=None, start=0):
        """x (B, U, D) slot inputs from stream slot `start` on; context (B, U, D) each slot's global context."""
        slot = torch.arange(start, start + x.size(1), device=x.device) % self.chunk_size
        h = x + self.wpe(slot) + self.cond(context)
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i], start)
        return h


class ChunkCache(Cache):
    """Decoding state of chunk mode: the local decoder's K/V for every stream slot (so rollback can cross a chunk
    boundary), the global model's cache over chunk slots, the tokens seen (chunks are encoded from them once
    complete) and the normed global outputs g (B, n_slots, D)."""

    def __init__(self, local_layers, global_cache, tokens, context, chunk_size):
        super().__init__(local_layers)
        self.global_cache, self.tokens, self.context, self.chunk_size = global_cache, tokens, context, chunk_size
        self.n_tokens = 0

    @property
    def length(self):
        return self.n_tokens

    def truncate(self, n):
        self.n_tokens = min(self.n_tokens, n)
        super().truncate(n + 1)                              # stream slots 0..n: BOS and tokens 0..n-1
        self.global_cache.truncate(n // self.chunk_size + 1)  # global slot c needs tokens < cC only

    def nbytes(self):
        extra = sum(t.nelement() * t.element_size() for t in (self.tokens, self.context))
        return super().nbytes() + self.global_cache.nbytes() + extra


class ChunkHierarchy(nn.Module):
    """Chunk mode around any causal global model: chunk encoder -> global model over chunk slots (shifted by one
    slot) -> local decoder over token slots. forward(idx, embed, cache, start_pos, **global_kwargs) ->
    (hidden (B, T, D), the rest of the global model's output tuple, or None when the call computed no global
    slot: a decode step inside a chunk reads the cached context). The global model is called as
    global_model(x, cache, start_pos, **global_kwargs) and returns (h, ...); it provides new_cache(B, device, dtype)
    over max_seq_len // chunk_size + 1 slots."""

    def __init__(self, global_model, d_model, n_heads, n_local_layers, chunk_size, max_seq_len, bias=False,
                 dropout=0.0):
        super().__init__()
        self.chunk_size, self.max_seq_len = chunk_size, max_seq_len
        self.n_slots = max_seq_len // chunk_size + 1     # groups of the stream [BOS, x_0 .. x_{max_seq_len-1}]
        self.encoder = ChunkEncoder(d_model, chunk_size, bias)
        self.start = nn.Parameter(torch.randn(d_model) * 0.02)   # global slot 0: no chunk before it
        self.bos = nn.Parameter(torch.randn(d_model) * 0.02)     # stream slot 0: no token before it
        self.slot_pe = nn.Embedding(self.n_slots, d_model)        # global positions are chunk slots
        self.global_model = global_model
        self.ln_g = LayerNorm(d_model, bias)
        self.local = LocalDecoder(d_model, n_heads, n_local_layers, chunk_size, bias, dropout)

    def new_cache(self, batch_size, device, dtype):
        D = self.bos.numel()
        local = [b.attn.new_kv_cache(batch_size, self.max_seq_len + 1, device, dtype) for b in self.local.blocks]
        return ChunkCache(local, self.global_model.new_cache(batch_size, device, dtype),
                          torch.zeros(batch_size, self.max_seq_len, dtype=torch.long, device=device),
                          torch.zeros(batch_size, self.n_slots, D, device=device, dtype=dtype), self.chunk_size)

    def _global(self, embed, chunks, first_slot, cache, global_kwargs, injections=None):
        """chunks (B, N, C) for slots first_slot+1.. (plus the start vector when first_slot is 0) -> normed g."""
        B = chunks.size(0)
        x = self.encoder(embed(chunks))                                          # (B, N, D)
        if first_slot == 0:
            x = torch.cat([self.start.expand(B, 1, -1).to(x.dtype), x], 1)
        slots = torch.arange(first_slot, first_slot + x.size(1), device=x.device)
        x = self._inject(x + self.slot_pe(slots), slots, injections)
        out = self.global_model(x, cache, first_slot, **global_kwargs)
        return self.ln_g(out[0]), out[1:]

    # what a subclass changes: how memory enters the global model and how the local decoder reads g
    def _inject(self, x, slots, injections):
        if injections is not None:
            raise UsageError("this model's chunk mode takes no context injection (v6 and v7_1_2 do)")
        return x

    def _local_full(self, stream, g, injections=None):
        return self.local(stream, g.repeat_interleave(self.chunk_size, 1))

    def _store_context(self, cache, lo, hi, g):
        cache.context[:, lo:hi] = g

    def _local_cached(self, stream, cache, first, end, injections=None):
        slot = torch.arange(first, end, device=stream.device)
        return self.local(stream, cache.context[:, slot // self.chunk_size], cache.layers, first)

    def forward(self, idx, embed, cache=None, start_pos=0, injections=None, **global_kwargs):
        B, T = idx.shape
        C = self.chunk_size
        tokens = embed(idx)                                                      # (B, T, D)
        bos = self.bos.expand(B, 1, -1).to(tokens.dtype)
        if cache is None:
            if start_pos:
                raise UsageError(f"chunk mode needs the cache for start_pos={start_pos} > 0: pass the model's cache")
            n_groups = T // C + 1                                                # groups of the stream of T+1 slots
            g, rest = self._global(embed, idx[:, :(n_groups - 1) * C].view(B, n_groups - 1, C), 0, None,
                                   global_kwargs, injections)                    # (B, n_groups, D)
            stream = F.pad(torch.cat([bos, tokens], 1), (0, 0, 0, n_groups * C - T - 1))  # (B, n_groups * C, D)
            return self._local_full(stream, g, injections)[:, 1:T + 1], rest
        cache.tokens[:, start_pos:start_pos + T] = idx
        last_group = (start_pos + T) // C
        done = cache.global_cache.length                                         # global slots already computed
        rest = None
        if done <= last_group:  # new global slots: chunks that completed since, read back from the cache
            chunks = cache.tokens[:, max(done - 1, 0) * C:last_group * C].view(B, -1, C)
            g, rest = self._global(embed, chunks, done, cache.global_cache, global_kwargs, injections)
            self._store_context(cache, done, last_group + 1, g)
        first = 0 if start_pos == 0 else start_pos + 1                          # stream slot of this call's first input
        stream = torch.cat([bos, tokens], 1) if start_pos == 0 else tokens
        h = self._local_cached(stream, cache, first, start_pos + T + 1, injections)
        cache.n_tokens = start_pos + T
        return h[:, -T:], rest


def lm_selftest(name, build, modes=("token",), T=29, prompt_len=11, steps=80, overfit_below=0.5, V=512,
                extra=None):
    """`python model_X.py`: per mode, shapes, loss ~ ln V at init, overfitting one batch, greedy cached ==
    uncached == speculative; then `extra(model, mode, idx, cached)` for the variant's own checks, and the
    parameter counts at the default size. build(**config) makes the model (before or without registration)."""
    for mode in modes:
        torch.manual_seed(0)
        model = build(mode=mode, vocab_size=V, d_model=64, n_layers=4, n_heads=4, max_seq_len=64)
        if hasattr(model.config, "horizon_sampling"):  # overfit one batch with the full (not sampled) objective
            model.config.horizon_sampling = False
        if hasattr(model.config, "horizon_sample"):    # (v8.2, ChaosLogic: every row of every offset)
            model.config.horizon_sample = float(max(1, model.config.horizon - 1))
        print(f"{name} {mode} self-test: {model.num_params():,} parameters at d_model=64, n_layers=4")
        idx = torch.randint(0, V, (2, T + 1))
        x, y = idx[:, :-1], idx[:, 1:]
        out = model(x, targets=y)
        assert out.logits.shape == (2, T, V)
        if out.horizon_hidden is not None:
            assert out.horizon_hidden.shape == (2, T, model.config.horizon - 1, 64)
        print(f"  loss at init {out.loss.item():.3f} (ln V = {math.log(V):.3f}); parts "
              + ", ".join(f"{k} {v.item():.3f}" for k, v in (out.aux or {}).items()))
        assert abs(out.loss.item() - math.log(V)) < 0.5
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(steps):
            loss = model(x, targets=y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  loss after {steps} steps on one batch {loss.item():.3f}")
        assert loss.item() < overfit_below, "the model failed to overfit one batch"
        model.eval()
        prompt = idx[:1, :prompt_len]
        cached = model.generate(prompt, 24, temperature=0)
        uncached = model.generate(prompt, 24, temperature=0, use_cache=False)
        stats = {}
        speculative = model.generate(prompt, 24, temperature=0, speculative=True, stats=stats)
        assert torch.equal(cached, uncached) and torch.equal(cached, speculative)
        print(f"  greedy cached == uncached == speculative: ok ({24 / stats['model_calls']:.2f} tokens per call)")
        if extra is not None:
            extra(model, mode, idx, cached)
    for mode in modes:
        print(f"default config, {mode} mode: {build(mode=mode).num_params():,} parameters")
    print(f"gpt at the same size: {build_model('gpt').num_params():,} parameters")


# -----------------------------------------------------------------------------
# Pell-Lucas positions and block-sparse masks (HST v8.2 and ChaosLogic)
#
# The true Pell-Lucas (companion Pell) numbers Q_0 = Q_1 = 2, Q_n = 2 Q_{n-1} + Q_{n-2}: 2, 6, 14, 34, 82, 198, ...
# grow by 1 + sqrt(2) per step, so {0} U {Q_n} is a log-spaced grid of positions (the originals used doubled Pell or
# doubled tribonacci numbers under that name). Everything below depends on positions only, never on tokens, so it
# is causal by construction and identical in training and decoding.

PELL_LUCAS_LEVELS = 32  # spine points 0, 2, 6, ..., Q_31 ~ 1.5e12: enough for any position an int64 run reaches


def pell_lucas_numbers(n=PELL_LUCAS_LEVELS):
    """The first n distinct Pell-Lucas numbers: [2, 6, 14, 34, 82, 198, 478, 1154, ...]."""
    q = [2, 6]
    while len(q) < n:
        q.append(2 * q[-1] + q[-2])
    return q[:n]


def _sinusoid(x, width, base):
    """[sin(x w_i); cos(x w_i)] with w_i = base^(-2i/width): (...,) float -> (..., width), width even."""
    freqs = base ** (-torch.arange(0, width, 2, dtype=torch.float32, device=x.device) / width)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class PellLucasPE(nn.Module):
    """PE(p) = [sinusoid(p); Fourier features of the phase rho; LevelEmb[l]], where l = #{spine points <= p},
    a = p - (largest spine point <= p), b = (next spine point) - p and rho = a / (a + b). A function of p alone,
    vectorized with one searchsorted, defined for every position (no clamp); the level table is learned."""

    def __init__(self, d_model):
        super().__init__()
        self.w_pos = 2 * (d_model // 4)
        self.w_phase = 2 * (d_model // 8)
        self.level = nn.Embedding(PELL_LUCAS_LEVELS + 1, d_model - self.w_pos - self.w_phase)
        self.register_buffer("spine", torch.tensor([0] + pell_lucas_numbers()), persistent=False)

    def forward(self, pos):
        """pos (T,) LongTensor of absolute positions -> (T, D)."""
        level = torch.searchsorted(self.spine, pos, right=True)                        # >= 1, since spine[0] = 0
        below = self.spine[level - 1]
        above = self.spine[level.clamp(max=self.spine.numel() - 1)]
        rho = (pos - below).float() / (above - below).clamp_min(1).float()
        # phase Fourier features at frequencies pi * 2^i: rho in [0, 1) is resolved down to 2^-(w_phase/2)
        freqs = math.pi * 2.0 ** torch.arange(self.w_phase // 2, dtype=torch.float32, device=pos.device)
        phase = torch.cat([(rho[:, None] * freqs).sin(), (rho[:, None] * freqs).cos()], -1)
        return torch.cat([_sinusoid(pos, self.w_pos, 10000.0), phase, self.level(level)], -1)


def pell_lucas_block_mask(q_pos, k_pos, block):
    """Causal Pell-Lucas block-sparse pattern: query block i reads key block j <= i iff
    i - j in {0, 1} U {Q_n} or j = 0 (the sink block); inside an allowed tile the token-level causal mask holds.
    q_pos (Tq,), k_pos (Tk,) absolute positions -> bool (Tq, Tk), True = may attend. Every query sees itself."""
    i, j = q_pos[:, None] // block, k_pos[None, :] // block
    gaps = torch.tensor([0, 1] + pell_lucas_numbers(), device=q_pos.device)
    return (k_pos[None, :] <= q_pos[:, None]) & ((j == 0) | torch.isin(i - j, gaps))


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a torn checkpoint under the real name


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True; `path` may be a run directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: train one with train.py (--out_dir) or check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["model_name"], state["model_config"], state["model"]
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}): it is truncated or not a "
                         f"checkpoint of this project; restore it or train again") from None
    return state


def model_from_checkpoint(state):
    model = build_model(state["model_name"], **state["model_config"])
    model.load_state_dict(state["model"])
    return model
