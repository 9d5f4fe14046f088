"""Generation for every model, after gpt-fast's generate.py (pytorch-labs/gpt-fast).

A handful of small named functions over a cache written by absolute position: `sample` (temperature, top-k,
nucleus), `prefill`, `decode_one_token`, `generate` (uncached, cached, speculative) and `speculative_decode`.
Speculative acceptance is the rule of Leviathan et al. 2023 / Chen et al. 2023, which keeps the output
distribution equal to the model's; with temperature 0 it returns exactly the tokens of greedy decoding.
Models call it through `model.generate(...)` (core.LM); drafts come from `model.draft(...)`.
"""

import time

import torch
import torch.nn.functional as F

import core


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
        raise core.UsageError(f"idx must be a non-empty (B, T) LongTensor, got shape {tuple(idx.shape)}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise core.UsageError(f"token ids must lie in [0, {model.config.vocab_size}), got [{lo}, {hi}]; "
                         f"encode prompts with the GPT-2 tokenizer (prepare_data.get_tokenizer)")


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


def acceptance_per_head(accepted_hist):
    """speculative_decode's histogram (hist[n] = verification passes that accepted n drafts) -> the acceptance
    rate of draft j (1-based) given that drafts 1..j-1 were accepted, for j = 1..len(hist)-1."""
    rates = []
    for j in range(1, len(accepted_hist)):
        reached = sum(accepted_hist[j - 1:])
        rates.append(sum(accepted_hist[j:]) / reached if reached else float("nan"))
    return rates


def speculative_stats(model, idx, max_new_tokens, temperature=0.0, draft_len=4, **kw):
    """Speculative generation with its statistics: tokens per model call, acceptance per draft head, and the
    wall-clock speed-up over plain cached generation of the same length (which it also runs)."""
    stats = {}
    out = model.generate(idx, max_new_tokens, temperature=temperature, speculative=True, draft_len=draft_len,
                         stats=stats, **kw)
    t0 = time.perf_counter()
    model.generate(idx, max_new_tokens, temperature=temperature, **kw)
    plain = time.perf_counter() - t0
    stats["tokens_per_call"] = stats["new_tokens"] / max(1, stats["model_calls"])
    n_heads = max(0, getattr(model.config, "horizon", 1) - 1)
    stats["acceptance_per_head"] = acceptance_per_head(stats["accepted_hist"])[:n_heads]
    stats["plain_seconds"] = plain
    stats["speedup"] = plain / max(stats["seconds"], 1e-9)
    return out, stats
