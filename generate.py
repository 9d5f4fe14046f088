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


def draw(probs, generator=None):
    """One token per row of probs (..., V) (non-negative weights, any positive total): the first token whose
    cumulative weight exceeds u * total, u uniform on [0, 1) (inverse-CDF sampling). The distribution of
    torch.multinomial(probs, 1), whose CPU kernel draws V exponentials per row, about half a decode step at
    V = 50,304; this is one cumsum and one binary search. The cumsum is float64 and a token of weight 0 owns an
    empty interval, so it is never drawn."""
    cdf = probs.double().cumsum(-1)                                                     # (..., V)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    last = (cdf < total).sum(-1)     # the last token of positive weight, should u * total round up to the total
    return torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) tokens. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(logits_to_probs(logits, temperature, top_k, top_p), generator)


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
# can be corrected too, the first PROBES rounds draft at least one token from the heads (fewer, once the heads have
# realised under half their prediction). None of it can change the output: verification keeps greedy decoding exact
# and sampling distributed as the model's. Where the model allows, every pass reads the next round's head drafts in
# the main head's product over the unembedding (model.forward_reading_drafts), which at batch 1 costs about the
# same for 1 or 25 rows; elsewhere drafting from the heads has a price of its own whatever k is, one more pass over
# the unembedding (read_cost), so weak heads draft nothing.

DRAFT_COST = 0.05       # verifying k drafts costs ~ 1 + DRAFT_COST * k one-token steps (batch 1, d_model 128, CPU)
PRIOR_ACCEPTANCE = 0.5  # acceptance of a draft before any evidence, for sources without a calibrated prediction
EVIDENCE = 1.0          # rounds' worth of prior (realised = predicted) against this generation's evidence
PROBES = 3              # the first rounds draft at least one token from the heads, to measure their acceptance


class DraftSource:
    """Predicted and realised acceptance of one source's draft j (1-based) in this generation, counted over the
    rounds that reached it (drafts 1..j-1 accepted). Plain Python floats: planning runs every round on a few
    numbers, where tensor ops would cost a share of the decoding step."""

    def __init__(self, n):
        self.predicted, self.realised, self.count = [0.0] * n, [0.0] * n, [0] * n

    def estimate(self, predicted):
        """predicted [k] acceptance of this round's drafts -> times the realised / predicted ratio of this
        source's drafts so far, with EVIDENCE rounds of prior at ratio 1 [k]; a draft with no evidence yet takes
        the ratio of the draft before it."""
        out, ratio = [], 1.0
        for j, p in enumerate(predicted):
            if self.count[j]:
                prior = EVIDENCE * self.predicted[j] / self.count[j]
                ratio = (self.realised[j] + prior) / max(self.predicted[j] + prior, 1e-12)
            out.append(min(max(p * ratio, 0.0), 1.0))
        return out

    def record(self, predicted, realised):
        """predicted [>= n], realised (n,) for the drafts this round reached."""
        for j, r in enumerate(realised.tolist()):
            self.predicted[j] += predicted[j]
            self.realised[j] += r
            self.count[j] += 1


def read_cost(model):
    """The cost, in one-token decoding steps, of reading drafts out of the horizon heads: nothing where the
    verification pass reads them with the main head (model.forward_reading_drafts), else one more pass over the
    unembedding, whose weights are this share of those a decoding step reads (at batch 1 a step streams every
    weight once, so it costs about its weights' share; 0.88 at the cpu_tiny size, 0.25 at the T4 size)."""
    if model.reads_drafts_with_head:
        return 0.0
    return model.wte.weight.numel() / sum(p.numel() for p in model.parameters())    # the tied unembedding


def expected_tokens_per_cost(accept, k, costs):
    """The value best_draft_length maximises, at k drafts; costs [K + 1] as core.draft_costs."""
    tokens, reach = 1.0, 1.0
    for a in accept[:k]:
        reach *= min(max(a, 0.0), 1.0)
        tokens += reach
    return tokens / costs[k]


class RoundCosts:
    """Wall time of this generation's rounds by (source, drafts), relative to rounds that draft nothing: the cost
    vectors plan_drafts weighs drafts with, so speculation pays on the hardware it runs on. core.draft_costs
    (1 + cost k, plus read_cost for the heads), scaled to the hardware by the nearest timed pair, stands in for a pair
    not timed yet; rounds 2 and 3 draft nothing, to time the step that costs are relative to, and
    the lower median of a pair's last 8 rounds keeps one slow round (a page fault, another process) from ruling it
    out. The linear model alone is far off on a CPU: at d_model 128 on 2 cores, the unembedding of 2 or 3 rows took
    1.5x and 2.3x the time of 1 row, and 5 rows about 1x. Since the plan follows timings, sampled tokens under a
    fixed generator can differ between runs; their distribution cannot, nor can greedy output."""

    def __init__(self, K, cost, overhead):
        self.prior = {name: core.draft_costs(K, cost, extra) for name, extra in overhead.items()}
        self.times, self.rounds = {}, 0

    def record(self, source, k, seconds):
        self.rounds += 1
        if self.rounds == 1:   # the first round pays one-off costs (buffers allocated, caches cold): not timed
            return
        times = self.times.setdefault((source, k), [])
        times.append(seconds)
        del times[:-8]

    def untimed(self, rounds=2):
        """True after the first round and until `rounds` rounds without drafts were timed (the first round drafts on
        the prior, so that a short generation is not left without drafts)."""
        return self.rounds > 0 and len(self.times.get((None, 0), ())) < rounds

    def _median(self, key):
        t = self.times.get(key)
        return sorted(t)[(len(t) - 1) // 2] if t else None

    def costs(self, source):
        """[K + 1] cost of k = 0..K drafts from `source`, in rounds without drafts. A draft count not timed yet
        takes the prior scaled by measured / prior of the nearest timed count from the same source, so one slow
        round at k = 2 is not followed by trying k = 3, 4, ... at the prior, one after another."""
        prior, base = self.prior[source], self._median((None, 0))
        if base is None:
            return list(prior)
        timed = {k: self._median((source, k)) / base for k in range(1, len(prior)) if (source, k) in self.times}
        if not timed:
            return list(prior)
        out = [prior[0]]
        for k in range(1, len(prior)):
            near = min(timed, key=lambda j: (abs(j - k), -j))
            out.append(timed[k] if k in timed else prior[k] * timed[near] / prior[near])
        return out


def plan_drafts(model, seq, room, prev_out, prev_index, sources, cost, probes=PROBES, round_costs=None):
    """-> (source name, k, predicted [k]) for this round: the source and draft count with the most expected tokens
    per verification cost, or (None, 0, None) when drafting nothing is best; while the heads have fewer than
    `probes` rounds of evidence, at least one draft from the heads. Costs are round_costs' measured ones (a
    RoundCosts), else core.draft_costs at `cost` with read_cost(model) for the heads."""
    best, plan = 1.0, (None, 0, None)   # value of drafting nothing: one token per one-token step
    if room <= 0:
        return plan
    heads = 0 if prev_out is None or prev_out.horizon_hidden is None else min(room, prev_out.horizon_hidden.size(2))
    if round_costs is None:
        round_costs = RoundCosts(room, cost, {"heads": read_cost(model), "lookup": 0.0})
    elif round_costs.untimed():   # rounds 2 and 3 draft nothing: they time the step all costs are relative to
        return plan
    candidates = []
    if heads:
        accept = getattr(model, "draft_acceptance", None)
        predicted = accept(prev_out)[0, prev_index, :heads].tolist() if accept else [PRIOR_ACCEPTANCE] * heads
        candidates.append(("heads", predicted))
    lookup, _ = core.prompt_lookup_draft(seq, room)
    if lookup.numel():
        candidates.append(("lookup", [PRIOR_ACCEPTANCE] * lookup.numel()))
    for name, predicted in candidates:
        estimate = sources[name].estimate(predicted)
        costs = round_costs.costs(name)
        k = core.best_draft_length(estimate, costs)
        value = expected_tokens_per_cost(estimate, k, costs)
        src = sources[name]
        if name == "heads" and src.count[0] < probes and src.realised[0] >= 0.5 * src.predicted[0]:
            # measure the heads whatever they predict, so a pessimistic prediction gets corrected; once the heads
            # have delivered under half of what they predicted, the estimate already falls and probing stops
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
        return draw(q, generator), q
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
    round_costs = RoundCosts(draft_len, cost, {"heads": read_cost(model), "lookup": 0.0})
    custom_drafter = "draft" in vars(model) or type(model).draft is not core.LM.draft
    cache = model.new_cache(1)
    t0 = time.perf_counter()
    calls, accepted_hist, rounds = 0, [0] * (draft_len + 1), []
    prev_out, prev_index = None, None
    if seq.size(1) <= L and max_new_tokens > 0:
        # the prompt's pass gives the first token, as plain decoding's prefill does, and the heads' drafts after it
        prev_out = model.forward_reading_drafts(seq, cache, 0, draft_at=slice(-1, None))
        prev_index, calls = -1, calls + 1    # the last position (of the hidden states and of the drafts read)
        token = sample(prev_out.logits[:, -1], temperature, top_k, top_p, generator)[:, None]
        seq = torch.cat([seq, token], 1)
        callback(token)
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
        t_round = time.perf_counter()
        if custom_drafter:  # a drafter set on the model proposes up to `room` drafts every round, unplanned
            source, predicted = "custom", None
            drafts, q = model.draft(seq, room, prev_out, prev_index) if room > 0 else (seq.new_empty(0), None)
            k = drafts.numel()
        else:
            plan = plan_drafts(model, seq, room, prev_out, prev_index, sources, cost, round_costs=round_costs)
            source, k, predicted = plan
            drafts, q = propose(model, seq, plan, prev_out, prev_index, temperature, top_k, top_p, generator)
        rounds.append((source, k))
        verify_in = torch.cat([seq[:, -1:], drafts[None]], 1) if k else seq[:, -1:]          # (1, 1 + k)
        out = model.forward_reading_drafts(verify_in, cache, N - 1)     # logits for positions N .. N + k, + drafts
        calls += 1
        logits = out.logits[0]
        n_acc = 0
        if k == 0:  # nothing to verify: the round is a plain decoding step
            next_token = sample(logits, temperature, top_k, top_p, generator)[0]
        elif temperature == 0:
            target = logits.argmax(-1)                                   # (1 + k,)
            while n_acc < k and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            next_token = target[n_acc]
            realised = torch.ones(min(n_acc + 1, k))                     # reached drafts: accepted, then one miss
            if n_acc < k:
                realised[n_acc] = 0.0
        else:
            p = logits_to_probs(logits, temperature, top_k, top_p)     # (1 + k, V)
            next_token = None
            for i in range(k):
                d = drafts[i]
                q_d = 1.0 if q is None else q[i, d].clamp_min(1e-20)                   # q None: one-hot at d
                if torch.rand((), generator=generator, device=device) < (p[i, d] / q_d).clamp(max=1.0):
                    n_acc += 1
                    continue
                if q is None:                             # max(0, p - onehot(d)) is p with d taken out
                    residual = p[i].clone()
                    residual[d] = 0.0
                else:
                    residual = (p[i] - q[i]).clamp_min(0)
                next_token = draw(residual if residual.sum() > 0 else p[i], generator)   # draw normalises
                break
            if next_token is None:
                next_token = draw(p[k], generator)
            # the acceptance probability of each reached draft, sum min(p, q): less noisy than accept / reject
            reached = min(n_acc + 1, k)
            realised = (p[torch.arange(reached, device=device), drafts[:reached]] if q is None
                        else torch.minimum(p[:reached], q[:reached]).sum(-1))
        if k and source in sources:
            sources[source].record(predicted, realised)
        accepted_hist[n_acc] += 1
        new = torch.cat([drafts[:n_acc], next_token[None]])[None, :target_len - N]
        seq = torch.cat([seq, new], 1)
        callback(new)
        cache.truncate(N + n_acc)  # keeps seq[:-1]: the prompt, the accepted drafts; the new token is pending
        prev_out, prev_index = out, n_acc
        if not custom_drafter:
            round_costs.record(source, k, time.perf_counter() - t_round)
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
