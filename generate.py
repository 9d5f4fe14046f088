"""Generation for every model, after gpt-fast's generate.py (pytorch-labs/gpt-fast).

A handful of small named functions over a cache written by absolute position: `sample` (temperature, top-k,
nucleus), `prefill`, `decode_one_token`, `generate` (uncached, cached, speculative) and `speculative_decode`.
Speculative acceptance is the rule of Leviathan et al. 2023 / Chen et al. 2023, which keeps the output
distribution equal to the model's; with temperature 0 it returns exactly the tokens of greedy decoding.
Models call it through `model.generate(...)` (core.LM); drafts come from the model's horizon offsets
(`model.draft_logits`, with `model.draft_acceptance` where the model predicts its drafts' acceptance) or from prompt
lookup, as many per round as pay for their verification.
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
    callback(new_tokens (B, n)) sees tokens as they are accepted, for streaming.
    idx may also be a list of 1-D prompts of different lengths: the result is then a list of 1-D sequences,
    decoded as one ragged batch through a paged cache (generate_ragged)."""
    if isinstance(idx, (list, tuple)):
        return generate_ragged(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, speculative,
                               generator, draft_len, stats, callback)
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


def generate_ragged(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                    speculative=False, generator=None, draft_len=4, stats=None, callback=None):
    """Prompts of different lengths (a list of 1-D LongTensors) -> their continuations, a list of 1-D tensors.

    A model that decodes ragged batches (`ragged_decoding`: its cache is paged and its forward takes one start
    position per row) runs them as one batch: one right-padded prefill that writes only each row's real tokens
    into the paged cache, then one forward per new token with row b at its own position, so each row holds just
    the blocks its own length needs. Greedy rows equal those of generating each prompt alone. Other models,
    speculative or uncached decoding, and batches that would run past the context generate each prompt alone."""
    prompts = [torch.as_tensor(p).reshape(-1) for p in prompts]
    if not prompts or min(p.numel() for p in prompts) == 0:
        raise core.UsageError("generate takes a (B, T) tensor or a non-empty list of non-empty 1-D prompts")
    lens = [p.numel() for p in prompts]
    if (not getattr(model, "ragged_decoding", False) or speculative or not use_cache
            or max(lens) + max_new_tokens > model.config.max_seq_len):
        return [generate(model, p[None], max_new_tokens, temperature, top_k, top_p, use_cache, speculative,
                         generator, draft_len, stats, callback)[0] for p in prompts]
    callback = callback or (lambda new: None)
    B, device = len(prompts), prompts[0].device
    padded = torch.zeros(B, max(lens), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, :lens[b]] = p
    _check_tokens(model, padded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = model.new_cache(B)
            starts = torch.tensor(lens, device=device)
            cache.real_tokens = lens                       # the prefill writes row b's first lens[b] tokens only
            logits = model(padded, cache=cache, start_pos=torch.zeros_like(starts)).logits
            cache.real_tokens = None
            logits = logits[torch.arange(B, device=device), starts - 1]            # (B, V) at each row's end
            new = []
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                new.append(token)
                callback(token[:, None])
                if i < max_new_tokens - 1:
                    logits = model(token[:, None], cache=cache, start_pos=starts).logits[:, -1]
                    starts = starts + 1
            new = torch.stack(new, 1) if new else padded.new_empty(B, 0)
            return [torch.cat([p, new[b]]) for b, p in enumerate(prompts)]
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# speculative decoding
#
# Two draft sources: the model's horizon offsets (model.draft_logits, greedy argmax or, when sampling, a draw from
# the offset's own distribution under the same temperature / top-k / top-p, which the rejection rule then corrects)
# and prompt lookup (core.prompt_lookup_draft). Each round drafts from the source, and as many tokens, that
# maximise the expected tokens per unit of verification cost (core.best_draft_length), or drafts nothing, so a
# round costs what a plain decoding step costs when no draft is likely to pass. The acceptance of draft j is
# estimated as the model's calibrated prediction for this position (model.draft_acceptance, where the model has
# acceptance heads; else PRIOR_ACCEPTANCE) times the ratio of realised to predicted acceptance of that source's
# draft j so far in this generation, with EVIDENCE rounds of prior at ratio 1. That ratio is what moves the estimate
# from greedy acceptance (what the heads are trained on) to sampled acceptance; so that a pessimistic prediction
# can be corrected too, the first PROBES rounds draft at least one token from the heads. None of it can change the output:
# verification keeps greedy decoding exact and sampling distributed as the model's.

DRAFT_COST = 0.05       # verifying k drafts costs ~ 1 + DRAFT_COST * k one-token steps (batch 1, d_model 128, CPU)
PRIOR_ACCEPTANCE = 0.5  # acceptance of a draft before any evidence, for sources without a calibrated prediction
EVIDENCE = 1.0          # rounds' worth of prior (realised = predicted) against this generation's evidence
PROBES = 3              # the first rounds draft at least one token from the heads, to measure their acceptance


class DraftSource:
    """Predicted and realised acceptance of one source's draft j (1-based) in this generation, counted over the
    rounds that reached it (drafts 1..j-1 accepted)."""

    def __init__(self, n):
        self.predicted, self.realised = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)

    def estimate(self, predicted):
        """predicted (k,) acceptance of this round's drafts -> times the realised / predicted ratio of this
        source's drafts so far, with EVIDENCE rounds of prior at ratio 1 (k,); a draft with no evidence yet takes
        the ratio of the draft before it."""
        k = predicted.numel()
        predicted = predicted.double().cpu()
        prior = EVIDENCE * torch.where(self.count[:k] > 0, self.predicted[:k] / self.count[:k].clamp_min(1), predicted)
        ratio = (self.realised[:k] + prior) / (self.predicted[:k] + prior).clamp_min(1e-12)
        for j in range(1, k):  # a draft never reached yet takes the correction of the one before it
            if self.count[j] == 0:
                ratio[j] = ratio[j - 1]
        return (predicted * ratio).clamp(0, 1)

    def record(self, predicted, realised):
        """predicted, realised (n,) for the drafts this round reached."""
        n = realised.numel()
        self.predicted[:n] += predicted[:n].double().cpu()
        self.realised[:n] += realised.double().cpu()
        self.count[:n] += 1


def expected_tokens_per_cost(accept, k, cost):
    """The value best_draft_length maximises, at k drafts."""
    reach = accept[:k].double().clamp(0, 1).cumprod(0)
    return (1 + reach.sum().item()) / (1 + cost * k)


def plan_drafts(model, seq, room, prev_out, prev_index, sources, cost, probes=PROBES):
    """-> (source name, k, predicted (k,)) for this round: the source and draft count with the most expected tokens
    per verification cost, or (None, 0, None) when drafting nothing is best; while the heads have fewer than
    `probes` rounds of evidence, at least one draft from the heads."""
    best, plan = 1.0, (None, 0, None)   # value of drafting nothing: one token per one-token step
    if room <= 0:
        return plan
    heads = 0 if prev_out is None or prev_out.horizon_hidden is None else min(room, prev_out.horizon_hidden.size(2))
    candidates = []
    if heads:
        accept = getattr(model, "draft_acceptance", None)
        predicted = accept(prev_out)[0, prev_index, :heads].detach() if accept else \
            torch.full((heads,), PRIOR_ACCEPTANCE)
        candidates.append(("heads", predicted))
    lookup, _ = core.prompt_lookup_draft(seq, room)
    if lookup.numel():
        candidates.append(("lookup", torch.full((lookup.numel(),), PRIOR_ACCEPTANCE)))
    for name, predicted in candidates:
        estimate = sources[name].estimate(predicted)
        k = core.best_draft_length(estimate, cost)
        value = expected_tokens_per_cost(estimate, k, cost)
        if name == "heads" and sources[name].count[0] < probes:   # measure the heads whatever they predict
            return name, max(k, 1), predicted[:max(k, 1)]
        if k and value > best:
            best, plan = value, (name, k, predicted[:k])
    return plan


def propose(model, seq, plan, prev_out, prev_index, temperature=0.0, top_k=None, top_p=None, generator=None):
    """plan_drafts' plan -> (drafts (k,), q (k, V) or None): the heads' argmax (greedy) or draws from their
    distribution after temperature / top-k / top-p (sampling, q returned), prompt lookup's tokens, or nothing."""
    source, k, _ = plan
    if source == "heads":
        logits = model.draft_logits(prev_out, prev_index, k)
        if temperature == 0:
            return logits.argmax(-1), None
        q = logits_to_probs(logits, temperature, top_k, top_p)                          # (k, V)
        return torch.multinomial(q, 1, generator=generator).squeeze(-1), q
    if source == "lookup":
        return core.prompt_lookup_draft(seq, k)[0], None
    return seq.new_empty(0), None


def first_round_drafts(model, seq, k, prev_out, prev_index):
    """model.draft: the greedy drafts that plan_drafts' rule proposes before any evidence (no probe rounds)."""
    sources = {"heads": DraftSource(k), "lookup": DraftSource(k)}
    cost = getattr(model.config, "draft_cost", DRAFT_COST)
    plan = plan_drafts(model, seq, k, prev_out, prev_index, sources, cost, probes=0)
    return propose(model, seq, plan, prev_out, prev_index)


def speculative_decode(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                       draft_len=4, stats=None, callback=None):
    """Draft-and-verify decoding of one sequence (1, T), at most draft_len drafts per round (see plan_drafts; a
    model whose `draft` method is overridden, or set on the instance, proposes its own drafts every round instead).

    Invariant of the loop: the cache holds every token of seq but the last one, which is fed together with
    the drafts in a single verification pass. Drafts come with their proposal distributions q (None =
    deterministic). Greedy: accept while a draft equals the model's argmax. Sampling: accept d with probability
    min(1, p(d)/q(d)), else draw from normalize(max(0, p - q)) and stop; if every draft is accepted, draw a bonus
    token from p. Rejected positions are truncated from the cache.
    """
    callback = callback or (lambda new: None)
    L = model.config.max_seq_len
    device = idx.device
    seq = idx
    target_len = idx.size(1) + max_new_tokens
    cost = getattr(model.config, "draft_cost", DRAFT_COST)
    sources = {"heads": DraftSource(draft_len), "lookup": DraftSource(draft_len)}
    custom_drafter = "draft" in vars(model) or type(model).draft is not core.LM.draft
    cache = model.new_cache(1)
    t0 = time.perf_counter()
    calls, accepted_hist, rounds = 0, [0] * (draft_len + 1), []
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
        if custom_drafter:  # a drafter set on the model proposes up to `room` drafts every round, unplanned
            source, predicted = "custom", None
            drafts, q = model.draft(seq, room, prev_out, prev_index) if room > 0 else (seq.new_empty(0), None)
            k = drafts.numel()
        else:
            plan = plan_drafts(model, seq, room, prev_out, prev_index, sources, cost)
            source, k, predicted = plan
            drafts, q = propose(model, seq, plan, prev_out, prev_index, temperature, top_k, top_p, generator)
        rounds.append((source, k))
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
            realised = torch.ones(min(n_acc + 1, k))                     # reached drafts: accepted, then one miss
            if n_acc < k:
                realised[n_acc] = 0.0
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
            # the acceptance probability of each reached draft, sum min(p, q): less noisy than accept / reject
            reached = min(n_acc + 1, k)
            realised = torch.minimum(p[:reached], q_full[:reached]).sum(-1)
        if source in sources:
            sources[source].record(predicted, realised)
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
        stats.setdefault("rounds", []).extend(rounds)  # (source: "heads", "lookup", "custom", None; drafts)
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
