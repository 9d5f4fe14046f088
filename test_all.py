"""The test suite: `python -m pytest -q test_all.py`, or `python test_all.py`. CPU only, no data beside the repo.

Layout: the helpers (one tiny-model builder `tiny`, one training loop `fit`, the token streams it trains on); the
invariants every registered model keeps, parametrized over every (model, mode) in core.MODELS, so a variant is
held to them the moment it is registered; the core primitives; one section per model in registry order; the
pipeline scripts.
"""

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configurator
import core
import generate
import model_chaoslogic
import model_v4_1
import model_v5
import model_v6
import model_v8_2
import paged_cache
import prepare_data

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# helpers: one tiny-model builder, one training loop, the token streams they train on

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=48)    # the default test model
SMALL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=48)   # the spine-lattice tests' model
LONG = 320     # reaches spine rows 12, 36, 104, 304 (and chunk slots 12, 36 in chunk mode with C = 8)
C = 8          # chunk_size of the chunk-mode tests
CHAOS = dict(TINY, n_layers=4)   # ChaosLogic's test model: 4 layers (adaptive bottom + lattice)
MODEL_MODES = core.model_modes()
IDS = [f"{name}-{mode}" for name, mode in MODEL_MODES]


def tiny(name, mode="token", seed=0, size=TINY, **overrides):
    """A small registered model in eval mode, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return core.build_model(name, mode=mode, **{**size, **overrides}).eval()


@torch.enable_grad()
def fit(model, steps, data=None, lr=1e-2, batch=8, seed=1, flush_denormal=False):
    """AdamW steps on windows of model.config.max_seq_len + 1 tokens from `data`: a function
    (generator, batch, length) -> tokens, one fixed (B, T + 1) batch, or None for uniform random tokens. Returns the
    model in eval mode. flush_denormal: confident softmaxes underflow into denormals, which slow some tiny CPU runs
    several-fold."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = uniform(model.config.vocab_size) if data is None else data
    model.train()
    torch.set_flush_denormal(flush_denormal)
    try:
        for _ in range(steps):
            x = data if torch.is_tensor(data) else data(g, batch, model.config.max_seq_len + 1)
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    return model.eval()


def uniform(V):
    """Uniform random tokens: nothing to learn, so held-out loss can't go below ln V."""
    return lambda g, B, T: torch.randint(0, V, (B, T), generator=g)


def counting(V):
    """x_(t+1) = x_t + 1 mod V: every future token is determined by the current one."""
    return lambda g, B, T: (torch.randint(0, V, (B, 1), generator=g) + torch.arange(T)) % V


def periodic(V, period=5):
    """Repeats of one fixed random motif of `period` distinct tokens from a random phase: every future token is
    predictable, but only from the motif's context (unlike counting)."""
    motif = torch.randperm(V, generator=torch.Generator().manual_seed(11))[:period]
    return lambda g, B, T: motif[(torch.randint(0, period, (B, 1), generator=g) + torch.arange(T)) % period]


def shakespeare_bytes(held_out=False):
    """Real text: the bytes of assets/tinyshakespeare.txt (ASCII, so ids < 128), the first 90% for training and
    the last 10% held out."""
    data = open(os.path.join(HERE, "assets", "tinyshakespeare.txt"), "rb").read()
    text = torch.tensor(list(data), dtype=torch.long)
    cut = int(0.9 * text.numel())
    return text[cut:] if held_out else text[:cut]


def text_windows(text):
    """Random windows of a 1-D token tensor, for fit()."""
    return lambda g, B, T: text[torch.randint(0, text.numel() - T, (B, 1), generator=g) + torch.arange(T)]


def tokens(shape, seed, vocab=SMALL["vocab_size"]):
    """A fixed tensor of uniform random tokens."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def decode_in_pieces(model, idx, cuts):
    """Cached forward over idx split at `cuts` (absolute positions): the outputs of every call, and the cache."""
    cache = model.new_cache(idx.size(0))
    outs, bounds = [], [0] + list(cuts) + [idx.size(1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(model(idx[:, a:b], cache=cache, start_pos=a))
    return outs, cache


def cat(outs, field):
    return torch.cat([getattr(o, field) for o in outs], 1)


def run(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=kw.pop("cwd", HERE), capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


@contextlib.contextmanager
def single_thread():
    """Tiny models train several times faster on one thread than on two busy ones (the hand-offs between threads
    cost more than the arithmetic); the previous count comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test in this file runs its tiny models on one thread."""
    with single_thread():
        yield


# -----------------------------------------------------------------------------
# invariants of every registered model

@pytest.fixture(scope="module", params=MODEL_MODES, ids=IDS)
def trained(request):
    """A tiny model of each (name, mode) after a few steps, so every branch is active."""
    name, mode = request.param
    return fit(tiny(name, mode), 5, batch=4, seed=0)


@torch.no_grad()
def test_outputs_at_t_depend_only_on_tokens_up_to_t(trained):
    T = trained.config.max_seq_len
    idx = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    ref = trained(idx)
    for t in sorted({0, 1, T // 4, T // 2 - 1, T // 2, T - 2}):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 7) % TINY["vocab_size"]
        out = trained(perturbed)
        for field in ("logits", "hidden"):
            a, b = getattr(ref, field), getattr(out, field)
            if a is not None:
                assert max_diff(a[:, :t + 1], b[:, :t + 1]) <= 1e-6, f"{field} at <= {t} saw the future"


@torch.no_grad()
def test_samples_in_a_batch_do_not_influence_each_other(trained):
    T = trained.config.max_seq_len
    idx = torch.randint(0, TINY["vocab_size"], (3, T), generator=torch.Generator().manual_seed(2))
    ref = trained(idx)
    other = idx.clone()
    other[1:] = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(3))
    out = trained(other)
    assert max_diff(ref.logits[0], out.logits[0]) <= 1e-6
    alone = trained(idx[:1])
    assert max_diff(ref.logits[0], alone.logits[0]) <= 1e-5


@torch.no_grad()
def test_prefill_plus_cached_decoding_equals_the_full_forward(trained):
    T = trained.config.max_seq_len
    idx = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(4))
    full = trained(idx).logits
    for prompt_len in (1, 5, T // 2):
        cache = trained.new_cache(2)
        logits = [trained(idx[:, :prompt_len], cache=cache, start_pos=0).logits]
        for pos in range(prompt_len, T):
            logits.append(trained(idx[:, pos:pos + 1], cache=cache, start_pos=pos).logits)
        assert max_diff(torch.cat(logits, 1), full) <= 1e-4, f"prompt length {prompt_len}"


@torch.no_grad()
def test_truncating_the_cache_and_decoding_again_is_exact(trained):
    T = trained.config.max_seq_len
    idx = torch.randint(0, TINY["vocab_size"], (1, T), generator=torch.Generator().manual_seed(5))
    full = trained(idx).logits
    cache = trained.new_cache(1)
    trained(idx[:, :T // 2], cache=cache, start_pos=0)
    wrong = (idx[:, T // 2:T // 2 + 4] + 1) % TINY["vocab_size"]
    trained(wrong, cache=cache, start_pos=T // 2)  # a rejected draft
    cache.truncate(T // 2)
    assert cache.length == T // 2
    again = trained(idx[:, T // 2:], cache=cache, start_pos=T // 2).logits
    assert max_diff(again, full[:, T // 2:]) <= 1e-4


@torch.no_grad()
def test_greedy_generation_is_the_same_with_and_without_the_cache(trained):
    L = trained.config.max_seq_len
    prompt = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(6))
    # runs past max_seq_len, where both keep the last L tokens
    cached = trained.generate(prompt, L + 10, temperature=0)
    uncached = trained.generate(prompt, L + 10, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_greedy_speculative_decoding_returns_exactly_greedys_tokens(trained):
    L = trained.config.max_seq_len
    g = torch.Generator().manual_seed(7)
    stats = {}
    for prompt_len, draft_len, new in ((1, 1, 20), (6, 2, 30), (12, 4, 40), (L - 4, 3, 12), (3, 5, L)):
        # repeated content gives the drafter something that gets accepted
        half = torch.randint(0, TINY["vocab_size"], (1, (prompt_len + 1) // 2), generator=g)
        prompt = torch.cat([half, half], 1)[:, :prompt_len]
        plain = trained.generate(prompt, new, temperature=0)
        speculative = trained.generate(prompt, new, temperature=0, speculative=True, draft_len=draft_len, stats=stats)
        assert torch.equal(plain, speculative), f"prompt {prompt_len}, draft_len {draft_len}"
    assert sum(n * c for n, c in enumerate(stats["accepted_hist"])) > 0, "no draft was ever accepted"


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_every_parameter_receives_a_gradient_after_a_few_steps(name, mode):
    model = fit(tiny(name, mode), 3, batch=4, seed=0).train()
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["max_seq_len"] + 1))
    model.zero_grad()
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    # ordinary windows carry no injected passage; the injection's parameters are checked under injection training
    # (test_every_parameter_including_the_injections_gets_a_gradient_under_injection_training)
    dead = [n for n, p in model.named_parameters()
            if "inject" not in n and (p.grad is None or p.grad.abs().max().item() == 0)]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_a_training_step_runs_under_bf16_and_fp16_autocast_with_finite_gradients(name, mode):
    """What train.py does on a GPU (bf16 autocast where supported, else fp16), on the CPU's autocast: the loss and
    every gradient are finite and the loss is the fp32 loss within the low precision's error. The chunked
    vocabulary passes once mixed a low-precision product into an fp32 accumulator here and failed."""
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["max_seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    model = tiny(name, mode).train()
    with torch.random.fork_rng():
        torch.manual_seed(1)                       # sampled horizon rows and Gumbel noise: the same in every pass
        ref = model(x[:, :-1], targets=x[:, 1:]).loss.item()
    for dtype in (torch.bfloat16, torch.float16):
        if not autocast_works(dtype):
            continue
        model = tiny(name, mode).train()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=dtype):
                loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        assert math.isfinite(loss.item()) and abs(loss.item() - ref) <= 0.05, (dtype, loss.item(), ref)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, (dtype, bad)


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_loss_at_initialisation_is_close_to_uniform(name, mode):
    model = tiny(name, mode).train()
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["max_seq_len"] + 1))
    loss = model(x[:, :-1], targets=x[:, 1:]).loss.item()
    assert abs(loss - math.log(TINY["vocab_size"])) < 0.5


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_training_forward_traces_without_graph_breaks(name, mode):
    """No .item(), no data-dependent Python branches: the training forward is one graph for torch.compile."""
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny(name, mode).train()
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["max_seq_len"] + 1))
    explanation = torch._dynamo.explain(model)(x[:, :-1], targets=x[:, 1:])
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", ["v3", "v4_1", "v5", "v6", "v7_1_2"])
def test_counted_flops_follow_horizon_sampling_one_head_for_all_offsets(name):
    """flops_per_token counts the training forward that runs: with horizon sampling the offsets 2..H read about
    one head's rows through the unembedding in all, so the count is about (H - 2) unembeddings below the full
    computation's (2 D V forward FLOPs each, x3 for training)."""
    sampled, full = (tiny(name, max_seq_len=12, horizon=5, horizon_sampling=s).flops_per_token() for s in (True, False))
    unembedding = 3 * 2 * TINY["d_model"] * TINY["vocab_size"]
    assert (full - sampled) / unembedding == pytest.approx(5 - 2, abs=0.35)


def test_counted_flops_of_the_gpt_control_equal_the_palm_formula():
    model = tiny("gpt", "token")
    c = model.config
    formula = 6 * model.num_params(non_embedding=True) + 12 * c.n_layers * c.d_model * c.max_seq_len
    assert model.flops_per_token() == pytest.approx(formula, rel=0.01)


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_counted_flops_cover_more_than_the_parameters_and_leave_the_rng_alone(name, mode):
    model = tiny(name, mode)
    state = torch.get_rng_state()
    flops = model.flops_per_token()
    assert torch.equal(state, torch.get_rng_state())
    assert flops > 2 * model.num_params(non_embedding=True)  # at least one multiply-add per weight, forward only


@pytest.mark.parametrize("name,mode", MODEL_MODES, ids=IDS)
def test_positions_past_the_context_are_an_error_not_a_clamp(name, mode):
    model = tiny(name, mode)
    with pytest.raises(core.UsageError, match="max_seq_len"):
        model(torch.zeros(1, TINY["max_seq_len"] + 1, dtype=torch.long))


# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------
# core primitives: configuration, the spine lattice, early exit, horizon heads, generation, paged cache


# -----------------------------------------------------------------------------
# configuration and training objective

def test_objective_is_next_token_ce_on_the_ln_v_scale_with_named_parts():
    model = tiny("v4", "token", size=SMALL).train()
    x = tokens((2, 49), 18)
    out = model(x[:, :-1], targets=x[:, 1:])
    assert set(out.aux) == {"lm", "horizon", "exit"}
    c = model.config
    mixed = (out.aux["lm"] + c.horizon_weight * out.aux["horizon"]) / (1 + c.horizon_weight)
    assert torch.allclose(out.loss, mixed + core.EXIT_LOSS_WEIGHT * out.aux["exit"])
    assert abs(out.aux["lm"].item() - math.log(SMALL["vocab_size"])) < 0.5


def test_configs_reject_impossible_layer_splits_and_chunk_sizes():
    with pytest.raises(core.UsageError, match="n_bottom_layers"):
        core.build_model("v3", n_layers=2, n_bottom_layers=3)
    with pytest.raises(core.UsageError, match="chunk_size"):
        core.build_model("v4", mode="chunk", chunk_size=0)
    with pytest.raises(core.UsageError, match="mode"):
        core.build_model("v3", mode="chunk")


def test_models_without_lattice_rows_or_horizon_heads_build_no_such_parameters():
    model = tiny("v3", size=SMALL, max_seq_len=12, horizon=1).train()
    assert model.trunk.lattice is None and model.horizon is None
    names = [n for n, _ in model.named_parameters()]
    assert not any("lattice" in n or "horizon" in n for n in names)
    out = model.train()(tokens((1, 12), 19), targets=tokens((1, 12), 20))
    assert set(out.aux) == {"lm", "exit"}


# -----------------------------------------------------------------------------
# spine and analyzer tables

def test_spine_is_the_doubled_tribonacci_sequence_below_max_len():
    assert core.spine_positions(512) == [0, 2, 4, 12, 36, 104, 304]
    assert core.spine_positions(8192) == [0, 2, 4, 12, 36, 104, 304, 888, 2592, 7568]
    assert core.spine_positions(304) == [0, 2, 4, 12, 36, 104]


def test_analyzer_levels_are_shortest_hops_and_counts_are_dag_paths():
    assert core.lattice_structure(304) == ({1: [104, 36, 12], 2: [4, 2, 0]},
                                           {104: 1, 36: 2, 12: 4, 4: 7, 2: 6, 0: 4})
    assert core.lattice_structure(104) == ({1: [36, 12, 4], 2: [2, 0]}, {36: 1, 12: 2, 4: 4, 2: 3, 0: 2})
    assert core.lattice_structure(36) == ({1: [12, 4, 2], 2: [0]}, {12: 1, 4: 2, 2: 2, 0: 1})
    assert core.lattice_structure(12) == ({1: [4, 2, 0]}, {4: 1, 2: 1, 0: 1})
    assert core.lattice_structure(4) == ({}, {})
    with pytest.raises(ValueError):
        core.lattice_structure(13)


def test_lattice_tables_hold_the_analyzer_as_padded_buffers():
    lattice = core.LatticeCore(8, 2, 512)
    assert lattice.row_pos.tolist() == [12, 36, 104, 304] and lattice.n_levels == 2 and lattice.n_ancestors == 6
    r = 3  # row 304: six ancestors ascending (the nearest parent is read last), no padding
    assert lattice.anc_pos[r].tolist() == [0, 2, 4, 12, 36, 104] and lattice.anc_mask[r].all()
    assert torch.allclose(lattice.level_weight[r, 0], torch.tensor([0, 0, 0, 4, 2, 1]) / 7)
    assert torch.allclose(lattice.level_weight[r, 1], torch.tensor([4, 6, 7, 0, 0, 0]) / 17)
    r = 0  # row 12: three ancestors, left-padded, one level only
    assert lattice.anc_mask[r].tolist() == [False] * 3 + [True] * 3 and lattice.level_mask[r].tolist() == [True, False]
    assert (lattice.anc_pos < lattice.row_pos[:, None]).all()  # causal by construction


# -----------------------------------------------------------------------------
# lattice core

def lattice_reference(lattice, x):
    """The lattice written row by row and ancestor by ancestor from the analyzer's dicts."""
    B, T, D = x.shape
    nh, hd = lattice.n_heads, D // lattice.n_heads
    out = x.clone()
    for p in lattice.spine[3:]:
        if p >= T:
            break
        levels, counts = core.lattice_structure(p, lattice.spine)
        xp = x[:, p]
        features = []
        for level in sorted(levels):
            total = sum(counts[m] for m in levels[level])
            pooled = sum(counts[m] / total * x[:, m] for m in levels[level])
            f = F.layer_norm(pooled @ lattice.level_fc[level - 1], (D,)) * lattice.level_ln[level - 1]
            features.append(F.gelu(f) @ lattice.level_proj[level - 1])
        f = torch.stack(features, 1)                                          # (B, levels, D)
        q = lattice.level_q(xp).view(B, nh, hd)
        k, v = lattice.level_kv(f).view(B, len(features), 2, nh, hd).unbind(2)
        weights = (torch.einsum("bhd,blhd->bhl", q, k) / math.sqrt(hd)).softmax(-1)
        attended = torch.einsum("bhl,blhd->bhd", weights, v).reshape(B, D)
        multi = lattice.multi_ln(lattice.multi_fuse(torch.cat([lattice.level_out(attended), xp], -1)))
        state = torch.zeros(B, D)
        for a in sorted(counts):
            w = F.softplus(lattice.count_proj(F.relu(lattice.count_fc(torch.tensor([math.log1p(counts[a])])))))
            message = F.gelu(lattice.message_ln(lattice.message(torch.cat([x[:, a], xp], -1)))) * w
            state = lattice.gru(message, state)
        gate = torch.sigmoid(lattice.path_gate(torch.cat([state, xp], -1)))
        path = gate * state + (1 - gate) * xp
        hidden = F.gelu(lattice.fuse_ln(lattice.fuse_in(torch.cat([xp, multi, path], -1))))
        out[:, p] = xp + hidden @ lattice.fuse_out.T
    return out


def live_lattice(d_model=8, max_len=LONG, seed=0):
    torch.manual_seed(seed)
    lattice = core.LatticeCore(d_model, 2, max_len)
    with torch.no_grad():
        lattice.fuse_out.normal_()  # as after training: the zero-initialised output would hide every path
    return lattice


@torch.no_grad()
def test_vectorized_lattice_equals_the_per_row_loop_reference():
    lattice = live_lattice()
    x = torch.randn(2, LONG, 8)
    out = lattice(x)
    assert max_diff(out, lattice_reference(lattice, x)) <= 1e-5
    spine_rows = [12, 36, 104, 304]
    assert max_diff(out[:, spine_rows], x[:, spine_rows]) > 1e-2
    off_spine = [t for t in range(LONG) if t not in spine_rows]
    assert torch.equal(out[:, off_spine], x[:, off_spine])


@torch.no_grad()
def test_zero_initialised_lattice_is_the_identity():
    x = torch.randn(2, LONG, 8)
    assert torch.equal(core.LatticeCore(8, 2, LONG)(x), x)


def test_lattice_jacobian_is_zero_from_every_later_position_and_every_non_ancestor():
    lattice = live_lattice(d_model=4, max_len=40)
    x = torch.randn(1, 40, 4)
    jac = torch.autograd.functional.jacobian(lambda v: lattice(v)[0], x)[:, :, 0]  # (T, D, T, D)
    reads = jac.abs().sum((1, 3)) > 0                                              # reads[t, s]: out_t depends on x_s
    assert not reads.triu(1).any(), "an output depends on a later position"
    assert reads[36].nonzero().flatten().tolist() == [0, 2, 4, 12, 36]
    assert reads[12].nonzero().flatten().tolist() == [0, 2, 4, 12]
    assert reads[20].nonzero().flatten().tolist() == [20]


@torch.no_grad()
def test_lattice_with_its_row_cache_equals_the_full_pass_in_any_pieces():
    lattice = live_lattice()
    x = torch.randn(2, LONG, 8)
    full = lattice(x)
    for cuts in ([1, 5, 12, 13, 36, 37, 100, 110, 304, 305], list(range(1, LONG))):
        rows = torch.zeros(2, len(lattice.spine), 8)
        bounds = [0] + cuts + [LONG]
        pieces = [lattice(x[:, a:b], a, rows) for a, b in zip(bounds[:-1], bounds[1:])]
        assert max_diff(torch.cat(pieces, 1), full) <= 1e-5


# -----------------------------------------------------------------------------
# early exit

def confidences(model, idx):
    """The first exit head's confidence at every position (captured during an eval forward that never exits)."""
    trunk = model.trunk if model.config.mode == "token" else model.chunk.global_model
    trunk = trunk if hasattr(trunk, "exit_heads") else trunk.bottom      # v5 keeps its exit heads in the bottom
    seen = []
    handle = trunk.exit_heads[0].register_forward_hook(lambda m, i, out: seen.append(torch.sigmoid(out)))
    threshold, model.config.exit_threshold = model.config.exit_threshold, 2.0
    was_training = model.training
    try:
        model.eval()(idx)
    finally:
        handle.remove()
        model.config.exit_threshold = threshold
        model.train(was_training)
    return seen[0]


def split_threshold(model, idx):
    """Plumbing only (a threshold placed by hand, nearly untrained heads): a threshold in the widest gap between
    middle confidences, so some positions exit, others not, and no confidence sits close enough to it for rounding
    to flip a decision between two equivalent passes. What trained, calibrated exits do is tested below."""
    c = confidences(model, idx).flatten().sort().values
    n = c.numel()
    i = max(range(n // 4 + 1, 3 * n // 4 + 1), key=lambda i: c[i] - c[i - 1])
    assert c[i] - c[i - 1] > 1e-5
    return ((c[i - 1] + c[i]) / 2).item()


@pytest.mark.parametrize("name,mode", [("v3", "token"), ("v4", "token"), ("v4", "chunk")])
@torch.no_grad()
def test_exit_plumbing_threshold_above_one_is_exactly_the_dense_model(name, mode):
    model = fit(tiny(name, mode, size=SMALL, n_layers=4, n_bottom_layers=3), 3, batch=2, seed=0)
    idx = tokens((2, 40), 8)
    model.config.exit_threshold = 1.01
    eval_logits = model(idx).logits
    dense = model.train()(idx).logits  # training runs every layer (dropout is 0)
    assert torch.equal(eval_logits, dense)
    model.eval().config.exit_threshold = split_threshold(model, idx)
    assert max_diff(model(idx).logits, dense) > 1e-4  # exits happen and change the output


@pytest.mark.parametrize("name", ["v3", "v4"])
@torch.no_grad()
def test_exit_plumbing_cached_decoding_equals_the_teacher_forced_pass_with_the_same_decisions(name):
    model = fit(tiny(name, size=SMALL, n_layers=4, n_bottom_layers=3), 3, batch=2, seed=0)
    idx = tokens((2, 48), 9)
    model.config.exit_threshold = split_threshold(model, idx)
    full = model(idx)
    depth = full.exit_depth
    assert (depth < 3).any() and (depth == 3).any(), "the threshold should let some tokens exit and keep others"
    for cuts in ([5, 12, 13, 36, 37], list(range(1, 48))):
        outs, cache = decode_in_pieces(model, idx, cuts)
        assert torch.equal(cat(outs, "exit_depth"), depth)
        assert max_diff(cat(outs, "logits"), full.logits) <= 1e-4
        assert all(layer.length == 48 for layer in cache.layers), "a skipped layer left a hole in its cache"
    # one sequence alone: a decode step whose token exits skips its blocks and only fills their K/V
    outs, _ = decode_in_pieces(model, idx[:1], range(1, 48))
    assert max_diff(cat(outs, "logits"), full.logits[:1]) <= 1e-4


@torch.no_grad()
def test_exit_plumbing_chunk_mode_cached_decoding_with_global_exits_equals_the_full_forward():
    model = fit(tiny("v4", "chunk", size=SMALL, n_layers=4, n_bottom_layers=3, chunk_size=C), 3, batch=2, seed=0)
    idx = tokens((2, 48), 10)
    model.config.exit_threshold = split_threshold(model, idx)
    full = model(idx).logits
    outs, _ = decode_in_pieces(model, idx, range(3, 48))
    assert max_diff(cat(outs, "logits"), full) <= 1e-4


@torch.no_grad()
def test_exit_plumbing_decisions_depend_only_on_earlier_tokens_and_on_their_own_sample():
    model = fit(tiny("v3", size=SMALL, n_layers=4, n_bottom_layers=3), 3, batch=2, seed=0)
    idx = tokens((3, 48), 11)
    model.config.exit_threshold = split_threshold(model, idx)
    depth = model(idx).exit_depth
    for t in (0, 10, 30, 46):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 5) % SMALL["vocab_size"]
        assert torch.equal(model(perturbed).exit_depth[:, :t + 1], depth[:, :t + 1])
    others = idx.clone()
    others[1:] = tokens((2, 48), 12)
    assert torch.equal(model(others).exit_depth[0], depth[0])
    assert torch.equal(model(idx[:1]).exit_depth[0], depth[0])


# early exit after ordinary training on real text: heads fitted to their CALM target (core.exit_head_loss), the
# threshold calibrated from a held-out loss tolerance (core.calibrate_exit); no weight or threshold is set by hand.
# Three bottom layers (two exit points) of four; horizon 1 (v5's minimum, 2) and chunk_size 4, because at this budget
# the horizon offsets and long chunks slow the main head, and a model still predicting unigram frequencies predicts
# every token equally well at every layer, so there is nothing per token to exit on.
EXITING = [("v3", "token"), ("v4", "token"), ("v4", "chunk"), ("v5", "token"), ("v5", "chunk"), ("v6", "token"), ("v6", "chunk"), ("v7_1_2", "token"),
           ("v7_1_2", "chunk")]
EXITING_IDS = [f"{n}-{m}" for n, m in EXITING]
EXIT_SIZE = dict(vocab_size=128, d_model=32, n_layers=4, n_heads=2, max_seq_len=32, n_bottom_layers=3)


@pytest.fixture(scope="session")
def calibrated():
    """(name, mode) -> (model, calibrate_exit's report on 8 held-out batches, exit_profile dense and at the calibrated
    threshold on 8 other held-out batches, bottom depth per position on those), each model trained once per session:
    240 AdamW steps (v5 and chunk mode: 360) on the bytes of tinyshakespeare."""
    runs = {}

    def run(name, mode):
        if (name, mode) not in runs:
            extra = dict(horizon=2 if name == "v5" else 1, **(dict(chunk_size=4) if mode == "chunk" else {}))
            with single_thread():
                # v5 (its processor and router) and the chunk models (their global model sees one slot per 4 bytes)
                # leave the unigram plateau later: more steps, not a different test. At 240 steps v7.1.2 chunk was
                # still mid-way down on one model seed of four (dense 3.20), where no exit threshold met the tolerance
                steps = 360 if name == "v5" or mode == "chunk" else 240
                model = fit(tiny(name, mode, size=EXIT_SIZE, **extra), steps, text_windows(shakespeare_bytes()),
                            lr=4e-3, batch=16, seed=0)
                held_out = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(7), 256, 33)
                batches = [(w[:, :-1], w[:, 1:]) for w in held_out.split(16)]
                report = core.calibrate_exit(model, batches[:8])
                dense = core.exit_profile(model, batches[8:], 2.0)
                exiting = core.exit_profile(model, batches[8:], model.config.exit_threshold)
                depths = []
                hook = core.exit_trunks(model)[0].register_forward_hook(lambda m, i, out: depths.append(out[2]))
                with torch.no_grad():
                    model(held_out[128:, :-1])
                hook.remove()
            runs[name, mode] = model, report, dense, exiting, depths[0]
        return runs[name, mode]
    return run


@pytest.mark.parametrize("name,mode", [("v6", "token"), ("v7_1_2", "token")])
def test_switching_the_trained_spine_attention_off_raises_held_out_loss_over_all_positions(calibrated, name, mode):
    """The spine-attention block of a model trained on real text (the `calibrated` fixture: bytes of
    tinyshakespeare) carries context the other layers do not: with it switched off (each block returns its input),
    the next-token loss averaged over every position of held-out windows rises by > 0.05 nats (measured: +0.21 for
    both). In chunk mode the global model is still near its unigram plateau at this budget, so its spine block
    changes little (bench.py's mechanisms table reports it)."""
    model = calibrated(name, mode)[0]
    held_out = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(11), 128, 33)
    with torch.no_grad():
        on = core.lm_loss(model(held_out[:, :-1]).logits, held_out[:, 1:]).item()
        with core.spine_attention_off(model) as n_blocks:
            off = core.lm_loss(model(held_out[:, :-1]).logits, held_out[:, 1:]).item()
    print(f"\nheld-out loss: spine attention on {on:.4f}, off {off:.4f}")
    assert n_blocks == model.config.spine_attention_blocks >= 1
    assert off > on + 0.05


@pytest.mark.parametrize("name,mode", EXITING, ids=EXITING_IDS)
def test_trained_exit_depth_varies_across_tokens_at_the_calibrated_threshold(calibrated, name, mode):
    """Positions (tokens; chunk slots in chunk mode) stop at different depths, each depth class holding >= 1% of
    them, and the depth is not a function of the position alone: at the same position, different held-out windows
    get different depths. A collapsed head (all exit at one depth, or none) fails."""
    model, report, _, (_, share, _), depth = calibrated(name, mode)
    assert 0 < report["threshold"] < 1, report
    assert share[:-1].sum() >= 0.01 and (share >= 0.01).sum() >= 2, f"share stopping at depths 1, 2, 3: {share}"
    differs = (depth.min(0).values != depth.max(0).values).float().mean().item()   # per position, across windows
    assert differs >= 0.25, f"depth differs across windows at only {differs:.0%} of positions"


@pytest.mark.parametrize("name,mode", [p for p in EXITING if p[1] == "token"])
def test_trained_token_mode_exits_stop_some_tokens_early_and_run_others_through_every_layer(calibrated, name, mode):
    """Token mode: the exit heads' confidence spreads over tokens (std > 0.05), and at the calibrated threshold some
    tokens stop early while >= 1% run every bottom layer. (Chunk mode's global model is held only to the test above:
    at this size and budget its later bottom layers are worth less than the tolerance on held-out text, so every
    slot may stop early; bench.py --what=mechanisms reports it.)"""
    _, _, _, (_, share, confidences), _ = calibrated(name, mode)
    assert confidences.std() > 0.05, "the exit heads' confidence is (nearly) the same for every token"
    assert share[:-1].sum() >= 0.01 and share[-1] >= 0.01, f"share stopping at depths 1, 2, 3: {share}"


@pytest.mark.parametrize("name,mode", EXITING, ids=EXITING_IDS)
def test_exiting_at_the_calibrated_threshold_costs_about_the_tolerance_on_other_held_out_text(calibrated, name, mode):
    """Calibration keeps the cost within the tolerance on its own windows; on 8 other held-out batches (4,096
    tokens) the cost stays within twice the tolerance (the paired difference of two held-out estimates is noisy)."""
    _, report, (dense, _, _), (loss, _, _), _ = calibrated(name, mode)
    assert report["loss"] - report["dense_loss"] <= report["tolerance"] == core.EXIT_TOLERANCE
    assert loss - dense <= 2 * core.EXIT_TOLERANCE, f"exits cost {loss - dense:.4f} nats/token over dense {dense:.4f}"


@pytest.mark.parametrize("name,mode", [("v3", "token"), ("v4", "chunk")])
def test_bench_early_exit_rows_and_depth_strip_report_the_calibrated_model(calibrated, name, mode):
    """bench.py's early-exit rows on a calibrated model report its threshold, depth shares that add up to 1 and
    equal core.exit_profile's, the loss cost as exit_profile's difference (ablation Δloss its negative) and a
    FLOPs saving in (0, 1) when positions stop early; exit_depths (the plot's strip) is the trunk's own depth."""
    import bench
    model, *_, depth = calibrated(name, mode)
    held_out = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(7), 256, 33)
    windows = [(w[:, :-1], w[:, 1:]) for w in held_out[128:].split(16)]
    rows = {r["measure"]: r for r in bench.early_exit_rows("m", model, windows)}
    dense, _, _ = core.exit_profile(model, windows, 2.0)
    loss, share, _ = core.exit_profile(model, windows, model.config.exit_threshold)
    assert rows["threshold (calibrated)"]["value"] == model.config.exit_threshold
    shares = [rows[f"share stopping after bottom layer {l + 1} of {share.numel()}"]["value"] for l in range(share.numel())]
    assert shares == share.tolist() and abs(sum(shares) - 1) <= 1e-6
    cost = rows["held-out loss cost vs dense (nats/token)"]
    assert cost["value"] == loss - dense == -cost["ablation_dloss"]
    if share[:-1].sum() > 0:
        assert 0 < rows["forward FLOPs saved (share)"]["value"] < 1
    assert torch.equal(bench.exit_depths(model, held_out[128:129, :-1]), depth[0])


def test_bench_mechanisms_table_and_exit_depth_plot_from_its_own_training_runs(tmp_path):
    result = run(["bench.py", "--fast", "--what=mechanisms", "--models=v3", f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "mechanisms.md").read_text()
    assert "| v3 | early exit | threshold" in text and "| v3 | early exit | share stopping after bottom layer 1" in text
    assert (tmp_path / "exit_depth.png").stat().st_size > 1000


# -----------------------------------------------------------------------------
# horizon heads

def test_horizon_offset_k_at_t_is_trained_on_the_token_at_t_plus_k():
    """The one label rule of every horizon model: offset k at t reads targets[:, t + k - 1], i.e. token t + k, and
    -1 (ignored) past the window; offsets 1..16 cover the longest default horizon (v8.2)."""
    T = 39
    seq = torch.arange(T + 1)[None]                 # the token at position p is p
    targets = seq[:, 1:]                             # targets[:, t] = token t+1
    for k in range(1, 17):
        expected = [t + k if t + k <= T else -1 for t in range(T)]
        assert core.horizon_targets(targets, k)[0].tolist() == expected, k


def test_horizon_loss_is_zero_only_for_heads_that_copy_the_future_under_the_right_shift():
    V = D = 16
    T, H = 12, 4
    seq = tokens((3, T + 1), 13, vocab=V)
    targets = seq[:, 1:]
    unembed = torch.eye(V)                           # logits = hidden, so a hidden one-hot is a sure prediction

    def heads_reading(shift):
        hidden = torch.zeros(3, T, H - 1, D)
        for j in range(H - 1):
            for t in range(T):
                if t + j + 2 + shift <= T:
                    hidden[:, t, j] = 50 * F.one_hot(seq[:, t + j + 2 + shift], V)
        return hidden
    assert core.horizon_loss(heads_reading(0), unembed, targets) < 1e-6
    assert core.horizon_loss(heads_reading(-1), unembed, targets) > 10
    assert core.horizon_loss(heads_reading(1), unembed, targets) > 10


def test_horizon_loss_gradient_reaches_every_offset_and_no_position_without_a_target():
    T, H, D, V = 6, 4, 8, 20
    hidden = torch.randn(2, T, H - 1, D, requires_grad=True)
    core.horizon_loss(hidden, torch.randn(V, D), tokens((2, T), 14, vocab=V)).backward()
    has_grad = hidden.grad.abs().sum((0, 3)) > 0     # (T, H-1)
    for j in range(H - 1):                          # offset j+2 at t has a target iff t + j + 2 <= T
        assert has_grad[:, j].tolist() == [t + j + 2 <= T for t in range(T)]


@pytest.mark.parametrize("name,mode", [("v3", "token"), ("v4", "token"), ("v4", "chunk")])
@torch.no_grad()
def test_horizon_outputs_at_t_are_invariant_to_later_tokens(name, mode):
    model = fit(tiny(name, mode, size=SMALL), 3, batch=2, seed=0)
    idx = tokens((2, 48), 15)
    ref = model(idx).horizon_hidden
    for t in (0, 7, 8, 20, 46):
        perturbed = idx.clone()
        perturbed[:, t + 1] = (perturbed[:, t + 1] + 1) % SMALL["vocab_size"]
        assert max_diff(model(perturbed).horizon_hidden[:, :t + 1], ref[:, :t + 1]) <= 1e-6


# -----------------------------------------------------------------------------
# sampling and speculative decoding

def test_temperature_zero_is_greedy_and_top_k_top_p_mask_the_tail():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    assert generate.sample(logits, temperature=0).item() == 0
    probs = generate.logits_to_probs(logits, top_k=2)
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum().item() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]
    probs = generate.logits_to_probs(logits, top_p=0.7)  # the first token alone (0.61) falls short of 0.7
    kept = (probs[0] > 0).nonzero().flatten().tolist()
    assert kept == [0, 1] and full[0] < 0.7 <= full[0] + full[1]
    assert generate.logits_to_probs(logits, top_p=0.5)[0, 0].item() == pytest.approx(1.0)


def test_seeded_sampling_repeats_and_different_seeds_differ():
    model = tiny("gpt", "token")
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def draw(seed):
        return model.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_speculative_sampling_has_the_models_distribution():
    """Chi-squared test on a 6-token vocabulary: the joint law of the first two sampled tokens under
    speculative decoding with a deliberately wrong proposal q equals the exact law of the model."""
    V, n_runs = 6, 3000
    model = tiny("gpt", "token", vocab_size=V, max_seq_len=8)
    prompt = torch.tensor([[1, 2]])
    temperature, top_k = 0.9, 5
    with torch.no_grad():
        p1 = generate.logits_to_probs(model(prompt).logits[0, -1], temperature, top_k)
        exact = torch.stack([p1[a] * generate.logits_to_probs(model(torch.tensor([[1, 2, a]])).logits[0, -1],
                                                          temperature, top_k) for a in range(V)]).flatten()
    q = torch.tensor([0.4, 0.05, 0.05, 0.3, 0.1, 0.1])
    g = torch.Generator().manual_seed(0)

    def draft(seq, k, prev_out, prev_index):  # drafts drawn from q: the rejection rule must correct them
        return torch.multinomial(q, k, replacement=True, generator=g), q.expand(k, V)
    model.draft = draft
    counts = torch.zeros(V * V)
    for _ in range(n_runs):
        out = model.generate(prompt, 2, temperature=temperature, top_k=top_k, speculative=True, draft_len=2,
                             generator=g)
        counts[out[0, 2] * V + out[0, 3]] += 1
    expected = exact * n_runs
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    df = int(keep.sum()) - 1
    # 99.9% quantile of chi2(df) (Wilson-Hilferty)
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {df} degrees of freedom"
    assert counts[~keep].sum() <= 3 * max(1.0, expected[~keep].sum().item()) + 5


@torch.no_grad()
def test_speculative_decoding_stops_drafting_once_its_drafts_are_not_accepted():
    """Sampling from an untrained model: prompt lookup's drafts (acceptance ~ 1 / V) are tried, fail, and the
    realised acceptance brings the estimate toward the draft cost, so drafting fades out: the verification spent
    on drafts stays under 5% of the plain decoding steps (drafting 3-4 at every lookup match would spend ~9%)."""
    model = tiny("gpt", "token", max_seq_len=160)
    stats, g = {}, torch.Generator().manual_seed(0)
    prompt = torch.randperm(96, generator=g)[None]      # every token occurs in it: prompt lookup has drafts each round
    out = model.generate(prompt, 40, temperature=1.0, speculative=True, draft_len=4, generator=g, stats=stats)
    assert out.shape == (1, 136) and stats["model_calls"] <= 40
    drafted = [k for _, k in stats["rounds"]]
    assert sum(drafted) * generate.DRAFT_COST <= 0.05 * 40, stats["rounds"]
    assert max(drafted[20:]) < max(drafted[:20]), stats["rounds"]        # and shorter as evidence accumulates


def test_out_of_range_tokens_are_rejected_before_generation():
    model = tiny("gpt", "token")
    with pytest.raises(core.UsageError, match="token ids must lie"):
        model.generate(torch.tensor([[TINY["vocab_size"]]]), 3)


# -----------------------------------------------------------------------------
# paged KV cache

@torch.no_grad()
def test_paged_attention_equals_the_contiguous_cache_across_block_boundaries():
    attn = attention_pair()
    x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(1))
    contiguous = attn.new_kv_cache(3, 48, "cpu", torch.float32)
    paged = paged_cache.PagedKVCache(1, 3, 2, 16, 48, "cpu", torch.float32, block_size=4)
    for a, b in ((0, 5), (5, 8), (8, 9), (9, 17), (17, 40)):  # pieces ending inside, on and across block edges
        want = attn(x[:, a:b], contiguous, a)
        got = attn(x[:, a:b], paged.layers[0], a)
        assert max_diff(got, want) <= 1e-6, (a, b)
    assert len(paged.block_tables[0]) == 10


@torch.no_grad()
def test_paged_ragged_batch_attention_equals_each_row_alone():
    lens = [3, 7, 12, 17]
    B, T, nh, hd = len(lens), max(lens), 2, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, nh, T + 1, hd, generator=g) for _ in range(3))
    paged = paged_cache.PagedKVCache(1, B, nh, hd, 32, "cpu", torch.float32, block_size=4)
    prefill = paged.attend(0, q[:, :, :T], k[:, :, :T], v[:, :, :T], [0] * B, lens)
    # one decode step per row, each at its own position: row b's token lens[b] (stored at index T here)
    step = paged.attend(0, q[:, :, T:], k[:, :, T:], v[:, :, T:], lens, [1] * B)
    for b, n in enumerate(lens):
        keys = torch.cat([k[b:b + 1, :, :n], k[b:b + 1, :, T:]], 2)
        values = torch.cat([v[b:b + 1, :, :n], v[b:b + 1, :, T:]], 2)
        alone = F.scaled_dot_product_attention(q[b:b + 1, :, :n], keys[:, :, :n], values[:, :, :n], is_causal=True)
        assert max_diff(prefill[b:b + 1, :, :n], alone) <= 1e-6
        last = F.scaled_dot_product_attention(q[b:b + 1, :, T:], keys, values)
        assert max_diff(step[b:b + 1], last) <= 1e-6
        assert len(paged.block_tables[b]) == math.ceil((n + 1) / 4)


@torch.no_grad()
def test_fork_shares_blocks_and_a_write_copies_the_shared_block_leaving_the_parent_unchanged():
    attn = attention_pair()
    x = torch.randn(2, 14, 32, generator=torch.Generator().manual_seed(3))
    paged = paged_cache.PagedKVCache(1, 2, 2, 16, 32, "cpu", torch.float32, block_size=4)
    layer = paged.layers[0]
    layer.write(*_kv(attn, x[:1, :10]), [0], [10])                                  # row 0: 10 tokens
    before = [t.clone() for t in layer.read([10, 0])]
    paged.fork(0, 1)
    assert paged.block_tables[1] == paged.block_tables[0]
    assert all(paged.allocator.ref[b] == 2 for b in paged.block_tables[0])
    k, v = _kv(attn, x[1:2, 10:14])
    layer.write(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), [0, 10], [0, 4])   # row 1 appends 4 tokens
    assert paged.block_tables[1][:2] == paged.block_tables[0][:2]                    # full blocks stay shared
    assert paged.block_tables[1][2] != paged.block_tables[0][2]                      # the partial one was copied
    after = layer.read([10, 0])
    assert torch.equal(after[0][:1], before[0][:1]) and torch.equal(after[1][:1], before[1][:1])
    child = layer.read([10, 14])
    assert torch.equal(child[0][1, :, :10], before[0][0]) and torch.equal(child[0][1, :, 10:], k[0])


def _kv(attn, x):
    B, T, D = x.shape
    _, k, v = attn.qkv(x).split(D, 2)
    return (t.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (k, v))


def test_block_count_is_ceil_len_over_block_size_and_freeing_everything_empties_the_pool():
    paged = paged_cache.PagedKVCache(2, 3, 2, 8, 64, "cpu", torch.float32, block_size=16)
    lens = [1, 16, 17]
    for i, layer in enumerate(paged.layers):
        k = torch.randn(3, 2, 17, 8)
        layer.write(k, k, [0] * 3, lens)
    assert [len(t) for t in paged.block_tables] == [math.ceil(n / 16) for n in lens]
    stats = paged.memory_stats()
    assert stats["allocated_slots"] == 16 * 4 and stats["used_slots"] == 34
    paged.fork(2, 0)
    for b in range(3):
        paged.free(b)
    assert paged.allocator.n_free == len(paged.allocator.ref) and paged.memory_stats()["blocks_in_use"] == 0


def test_truncation_releases_the_blocks_past_the_kept_length():
    paged = paged_cache.PagedKVCache(1, 1, 2, 8, 64, "cpu", torch.float32, block_size=16)
    k = torch.randn(1, 2, 40, 8)
    paged.layers[0].update(0, k, k)
    assert len(paged.block_tables[0]) == 3
    paged.truncate(16)
    assert len(paged.block_tables[0]) == 1 and paged.length == 16 and paged.allocator.n_free == 2


def test_the_pool_grows_on_demand_and_reuses_freed_blocks_before_growing_again():
    paged = paged_cache.PagedKVCache(1, 2, 2, 8, 256, "cpu", torch.float32, block_size=16)
    assert paged.nbytes() == 0                                       # nothing is allocated before the first write
    k = torch.randn(2, 2, 40, 8)
    paged.layers[0].write(k, k, [0, 0], [40, 9])                     # 3 + 1 blocks: exactly what the rows need
    assert len(paged.allocator.ref) == 4 and paged.memory_stats()["bytes_in_use"] == paged.nbytes()
    paged.truncate([8, 9])                                            # row 0 returns 2 blocks to the free list
    paged.layers[0].write(k, k, [8, 9], [30, 0])                      # and takes them back: no growth
    assert len(paged.allocator.ref) == 4
    paged.layers[0].write(k, k, [38, 9], [20, 0])                     # a 5th block grows the pool by >= a quarter
    assert len(paged.allocator.ref) == 5 and paged.nbytes() == 5 * 2 * 16 * 2 * 8 * 4


@torch.no_grad()
def test_a_single_sequence_reads_its_keys_as_a_view_of_the_pool_equal_to_the_gathered_copy():
    paged = paged_cache.PagedKVCache(1, 1, 2, 8, 64, "cpu", torch.float32, block_size=4)
    k = torch.randn(1, 2, 23, 8, generator=torch.Generator().manual_seed(4))
    keys, _ = paged.layers[0].update(0, k, k)
    assert keys.untyped_storage().data_ptr() == paged.k_pool[0].untyped_storage().data_ptr()   # no copy
    assert torch.equal(keys, k)
    paged.truncate(10)
    keys, values = paged.layers[0].update(10, k[:, :, 10:17], k[:, :, 10:17])
    assert torch.equal(keys, k[:, :, :17]) and torch.equal(values, k[:, :, :17])


def test_an_exhausted_pool_is_an_error_not_an_eviction():
    paged = paged_cache.PagedKVCache(1, 2, 2, 8, 64, "cpu", torch.float32, block_size=16, n_blocks=2)
    k = torch.randn(2, 2, 17, 8)
    with pytest.raises(RuntimeError, match="blocks are all in use"):
        paged.layers[0].update(0, k, k)


@torch.no_grad()
def test_v4_1_and_v5_generation_attends_through_the_paged_cache():
    for name, mode in (("v4_1", "token"), ("v5", "token"), ("v5", "chunk")):
        model = tiny(name, mode, size=SMALL, block_size=4).eval()
        cache = model.new_cache(2)
        paged = cache if mode == "token" else cache.global_cache
        assert isinstance(paged, paged_cache.PagedKVCache)
        model(tokens((2, 21), 4), cache=cache)
        assert all(len(t) == math.ceil(paged.length / 4) for t in paged.block_tables)


@torch.no_grad()
@pytest.mark.parametrize("name", ["v4_1", "v5"])
def test_a_forked_row_decodes_bit_identically_to_its_source_row(name):
    """fork copies the block table and the model's per-row state (v4.1's lattice nodes, v5's prefix sums): row 1,
    which held another prompt, then decodes exactly as row 0 does, step after step, with copy-on-write blocks."""
    model = tiny(name, size=SMALL, block_size=4).eval()
    cache = model.new_cache(2)
    model(tokens((2, 13), 5), cache=cache)                       # two different prompts
    cache.fork(0, 1)
    steps = tokens((1, 4), 6)
    for i in range(steps.size(1)):
        logits = model(steps[:, i:i + 1].expand(2, 1), cache=cache, start_pos=13 + i).logits
        assert torch.equal(logits[0], logits[1]), i
    assert cache.block_tables[0][:3] == cache.block_tables[1][:3] and cache.block_tables[0][3] != cache.block_tables[1][3]


RAGGED = [("v4_1", {}), ("v5", {}), ("v5", {"exit_threshold": 0.0}), ("v5", {"exit_threshold": 0.5})]


@pytest.mark.parametrize("name,extra", RAGGED, ids=["v4_1", "v5", "v5-every-token-exits", "v5-some-exit"])
@torch.no_grad()
def test_paged_models_generate_ragged_prompts_as_one_paged_batch_equal_to_each_prompt_alone(name, extra, monkeypatch):
    """v4.1 and v5 (token mode) decode prompts of 3..30 tokens as one batch through their paged cache, each row at
    its own positions (v5's router prefix sums too; with exits, an exited token's skipped layers write their K/V
    at the row's own positions), and each row's greedy tokens equal generating that prompt alone."""
    layers = dict(n_layers=4, n_bottom_layers=2) if name == "v5" else {}
    model = tiny(name, size=SMALL, block_size=4, max_seq_len=64, **layers, **extra)
    assert model.ragged_decoding
    prompts = [tokens((n,), n) for n in (3, 9, 17, 30)]
    caches, new_cache = [], model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda B, *a, **kw: caches.append(new_cache(B, *a, **kw)) or caches[-1])
    batched = model.generate(prompts, 12, temperature=0)
    assert len(caches) == 1 and caches[0].batch_size == 4                     # one batch, one paged cache
    # each row holds the blocks of its own length (the last sampled token is never fed back), no more
    assert [len(t) for t in caches[0].block_tables] == [math.ceil((len(p) + 11) / 4) for p in prompts]
    assert len(caches[0].allocator.ref) < 4 * 64 // 4
    for p, out in zip(prompts, batched):
        assert torch.equal(out, model.generate(p[None], 12, temperature=0)[0])


@pytest.fixture(scope="module")
def v4_1_drafter():
    """A tiny v4.1 after 300 AdamW steps on `cyclic` windows (see the drafts section below), nothing set by hand."""
    with single_thread():
        return fit(tiny("v4_1", **DRAFT_TINY), 300, cyclic(DRAFT_TINY["vocab_size"]), lr=1e-2, seed=0)


def test_v4_1_draft_acceptance_heads_are_calibrated_against_greedy_verification_on_held_out_windows(v4_1_drafter):
    check_acceptance_is_calibrated(v4_1_drafter, "v4.1")


def test_trained_v4_1_drafts_from_its_horizon_heads_and_beats_prompt_lookup(v4_1_drafter):
    check_drafts_get_used(v4_1_drafter, "v4.1")


@torch.no_grad()
def test_v4_1_ragged_batch_kv_memory_paged_against_contiguous():
    """The measurement: 8 prompts of different lengths; paged holds ceil(len/16) blocks per row."""
    model = tiny("v4_1", size=SMALL, max_seq_len=256, d_model=32, n_layers=2, n_heads=2).eval()
    lens = [7, 19, 33, 50, 64, 90, 128, 200]
    report = model_v4_1.ragged_kv_memory(model, lens)
    paged, contiguous = report["paged"], report["contiguous"]
    assert paged["blocks_in_use"] == sum(math.ceil(n / 16) for n in lens)
    assert paged["used_slots"] == contiguous["used_slots"] == sum(lens)
    assert contiguous["allocated_slots"] == 8 * 256
    assert paged["waste"] < 16 * len(lens) / sum(lens)         # at most one partial block per row
    assert paged["bytes_in_use"] < report["contiguous_padded_to_longest"]["bytes_in_use"] < contiguous["bytes_in_use"]
    print(report)


# -----------------------------------------------------------------------------
# Pell-Lucas positions (core.PellLucasPE) and block-sparse attention

def test_pell_lucas_spine_satisfies_the_recurrence():
    q = [2] + core.pell_lucas_numbers()          # Q_0 = Q_1 = 2 (the helper lists distinct values)
    assert q[:8] == [2, 2, 6, 14, 34, 82, 198, 478]
    assert all(q[n] == 2 * q[n - 1] + q[n - 2] for n in range(2, len(q)))


def test_plpe_of_a_batch_of_positions_equals_one_position_at_a_time():
    pe = core.PellLucasPE(32)
    for offset in (0, 5, 197, 1153, 10 ** 6):
        pos = torch.arange(offset, offset + 40)
        batched = pe(pos)
        single = torch.cat([pe(pos[i:i + 1]) for i in range(40)])
        assert torch.equal(batched, single)


def test_plpe_gives_every_position_below_2_pow_20_its_own_code_at_d_model_16():
    pe = core.PellLucasPE(16)
    with torch.no_grad():
        codes = pe(torch.arange(2 ** 20))
    assert torch.unique(codes, dim=0).size(0) == 2 ** 20


def test_block_sparse_mask_is_causal_and_every_query_sees_itself():
    pos = torch.arange(512)
    mask = core.pell_lucas_block_mask(pos, pos, 16)
    assert not (mask & ~torch.ones(512, 512, dtype=torch.bool).tril()).any()
    assert mask.diagonal().all()
    assert mask.sum() < torch.ones(512, 512).tril().sum()          # it is sparse


def test_block_sparse_with_one_huge_block_is_dense_causal():
    pos = torch.arange(200)
    assert torch.equal(core.pell_lucas_block_mask(pos, pos, 10 ** 6), torch.ones(200, 200, dtype=torch.bool).tril())


def test_block_sparse_decode_rows_equal_training_rows_and_cached_decoding_is_exact():
    block, T = 2, 48
    pos = torch.arange(T)
    train_mask = core.pell_lucas_block_mask(pos, pos, block)
    for t in range(T):
        row = core.pell_lucas_block_mask(torch.tensor([t]), torch.arange(t + 1), block)[0]
        assert torch.equal(row, train_mask[t, :t + 1])
    assert not torch.equal(train_mask, torch.ones(T, T, dtype=torch.bool).tril())   # differs from dense at T = 48
    sparse = fit(tiny("v8_2", sparse_attention=True, sparse_block=block, horizon=2), 3, uniform(96), lr=1e-2, seed=0, flush_denormal=True)
    dense = tiny("v8_2", sparse_attention=False, horizon=2)
    dense.load_state_dict(sparse.state_dict())
    idx = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = sparse(idx).logits
        assert (full - dense(idx).logits).abs().max().item() > 1e-4       # the pattern is really applied
        cache = sparse.new_cache(2)
        pieces = [sparse(idx[:, :5], cache=cache).logits]
        for t in range(5, T):
            pieces.append(sparse(idx[:, t:t + 1], cache=cache, start_pos=t).logits)
        assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4


# -----------------------------------------------------------------------------
# v3 and v4: spine lattice, early exit, horizon heads, chunk mode


@pytest.fixture(scope="module", params=["v3", "v4"])
def spine_long(request):
    """v3 / v4 token mode over 320 positions, trained a few steps so the lattice's zero-initialised output is live."""
    return fit(tiny(request.param, size=SMALL, max_seq_len=LONG), 4, batch=2, seed=0)


@pytest.fixture(scope="module")
def v4_chunk_long():
    """v4 chunk mode over 320 positions = 41 chunk slots, so the global lattice updates slots 12 and 36."""
    return fit(tiny("v4", "chunk", size=SMALL, max_seq_len=LONG, chunk_size=C), 4, batch=2, seed=0)


# -----------------------------------------------------------------------------
# whole models: causality and caches at spine rows and chunk boundaries

@torch.no_grad()
def test_token_mode_outputs_at_spine_rows_depend_only_on_earlier_tokens(spine_long):
    idx = tokens((2, LONG), 1)
    ref = spine_long(idx)
    for t in (11, 12, 35, 36, 103, 104, 303, 304):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 5) % SMALL["vocab_size"]
        out = spine_long(perturbed)
        for field in ("logits", "hidden", "horizon_hidden"):
            assert max_diff(getattr(ref, field)[:, :t + 1], getattr(out, field)[:, :t + 1]) <= 1e-6, (field, t)


@torch.no_grad()
def test_token_mode_cached_decoding_equals_the_full_forward_across_spine_rows(spine_long):
    assert spine_long.trunk.lattice.fuse_out.abs().sum() > 0, "the lattice is still the identity"
    idx = tokens((2, LONG), 2)
    full = spine_long(idx)
    for cuts in ([12, 13, 36, 37, 104, 105, 304, 305], [30, 40, 300, 310], list(range(290, LONG))):
        outs, cache = decode_in_pieces(spine_long, idx, cuts)
        assert max_diff(cat(outs, "logits"), full.logits) <= 1e-4, cuts
        assert max_diff(cat(outs, "horizon_hidden"), full.horizon_hidden) <= 1e-4, cuts


@torch.no_grad()
def test_token_mode_truncating_over_a_spine_row_and_decoding_again_is_exact(spine_long):
    idx = tokens((1, LONG), 3)
    full = spine_long(idx).logits
    cache = spine_long.new_cache(1)
    spine_long(idx[:, :300], cache=cache, start_pos=0)
    spine_long((idx[:, 300:310] + 1) % SMALL["vocab_size"], cache=cache, start_pos=300)  # rejected drafts over 304
    cache.truncate(300)
    again = [spine_long(idx[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(300, LONG)]
    assert max_diff(torch.cat(again, 1), full[:, 300:]) <= 1e-4


@pytest.mark.parametrize("S", [1, C - 1, C, C + 5, 3 * C + 2])
@torch.no_grad()
def test_v4_chunk_mode_runs_and_is_causal_for_any_length(S):
    model = fit(tiny("v4", "chunk", size=SMALL, chunk_size=C), 3, batch=2, seed=0)
    idx = tokens((2, S), 4)
    ref = model(idx)
    assert ref.logits.shape == (2, S, SMALL["vocab_size"]) and torch.isfinite(ref.logits).all()
    for t in range(S - 1):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 5) % SMALL["vocab_size"]
        out = model(perturbed)
        assert max_diff(ref.logits[:, :t + 1], out.logits[:, :t + 1]) <= 1e-6, t
        assert max_diff(ref.horizon_hidden[:, :t + 1], out.horizon_hidden[:, :t + 1]) <= 1e-6, t
    assert torch.isfinite(model.train()(idx, targets=idx.roll(-1, 1)).loss)


@pytest.mark.parametrize("prompt_len", [1, C - 1, C, C + 5])
@torch.no_grad()
def test_v4_chunk_prefill_and_decode_equal_the_full_forward_across_chunk_boundaries(prompt_len):
    model = fit(tiny("v4", "chunk", size=SMALL, chunk_size=C), 3, batch=2, seed=0)
    S = 3 * C + 5
    idx = tokens((2, S), 5)
    full = model(idx).logits
    outs, cache = decode_in_pieces(model, idx, range(prompt_len, S))
    assert max_diff(cat(outs, "logits"), full) <= 1e-4
    assert cache.length == S and cache.global_cache.length == S // C + 1
    outs, _ = decode_in_pieces(model, idx, [prompt_len, prompt_len + 3, 2 * C + 1])  # multi-token blocks
    assert max_diff(cat(outs, "logits"), full) <= 1e-4


@torch.no_grad()
def test_v4_chunk_decode_step_that_completes_a_chunk_advances_the_global_cache():
    model = tiny("v4", "chunk", size=SMALL, chunk_size=C).eval()
    idx = tokens((1, 2 * C), 6)
    cache = model.new_cache(1)
    model(idx[:, :C - 1], cache=cache, start_pos=0)
    assert cache.global_cache.length == 1  # only the start slot: chunk 0 is incomplete
    model(idx[:, C - 1:C], cache=cache, start_pos=C - 1)
    assert cache.global_cache.length == 2  # chunk 0 completed: slot 1 (reading e_0) is computed
    cache.truncate(C - 1)
    assert cache.global_cache.length == 1 and cache.length == C - 1


@torch.no_grad()
def test_v4_chunk_mode_is_causal_and_cached_at_global_spine_slots(v4_chunk_long):
    assert v4_chunk_long.chunk.global_model.lattice.row_pos.tolist() == [12, 36]
    idx = tokens((1, LONG), 7)
    ref = v4_chunk_long(idx).logits
    for t in (12 * C - 2, 12 * C - 1, 12 * C, 36 * C - 1, 36 * C + 3):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 5) % SMALL["vocab_size"]
        assert max_diff(ref[:, :t + 1], v4_chunk_long(perturbed).logits[:, :t + 1]) <= 1e-6, t
    outs, _ = decode_in_pieces(v4_chunk_long, idx, [90, 95, 96, 97, 100, 287, 288] + list(range(289, 300)))
    assert max_diff(cat(outs, "logits"), ref) <= 1e-4


# -----------------------------------------------------------------------------
# speculative decoding with horizon drafts

@pytest.mark.parametrize("name,mode", [("v3", "token"), ("v4", "token"), ("v4", "chunk")])
def test_horizon_drafts_get_accepted_and_speculative_greedy_equals_greedy(name, mode, monkeypatch):
    """After brief training on a repeating pattern, drafts from the horizon heads alone (prompt lookup disabled)
    are accepted, and greedy speculative decoding still returns exactly greedy's tokens."""
    pattern = torch.tensor([3, 17, 42, 8, 25, 61, 12])
    batch = torch.stack([pattern.roll(-s).repeat(8)[:49] for s in range(7)])  # every phase of the cycle
    # chunk mode must learn the cycle from weights (a group of C = 8 slots holds no earlier period to copy
    # from), which takes it longer past the unigram plateau
    steps = 200 if mode == "chunk" else 60
    model = fit(tiny(name, mode, size=SMALL, **{"chunk_size": C} if mode == "chunk" else {}), steps, batch, seed=0)
    monkeypatch.setattr(core, "prompt_lookup_draft", lambda seq, k: (seq.new_empty(0), None))
    stats = {}
    for prompt_len, draft_len, new in ((2, 3, 20), (9, 1, 15), (5, 2, 30), (20, 3, 25)):
        prompt = batch[prompt_len % 7:prompt_len % 7 + 1, :prompt_len]
        plain = model.generate(prompt, new, temperature=0)
        speculative = model.generate(prompt, new, temperature=0, speculative=True, draft_len=draft_len, stats=stats)
        assert torch.equal(plain, speculative), (prompt_len, draft_len)
    accepted = sum(n * count for n, count in enumerate(stats["accepted_hist"]))
    assert accepted >= 20, f"only {accepted} horizon drafts accepted"
    # and on random prompts, where drafts are mostly wrong, the output is still exactly greedy
    for seed, draft_len in ((16, 2), (17, 3)):
        prompt = tokens((1, 6), seed)
        assert torch.equal(model.generate(prompt, 20, temperature=0),
                           model.generate(prompt, 20, temperature=0, speculative=True, draft_len=draft_len))


# -----------------------------------------------------------------------------
# v4.1 and v5: paged KV cache, hyper-lattice, router, predictive field

def attention_pair(seed=0, d_model=32, n_heads=2):
    torch.manual_seed(seed)
    return core.CausalSelfAttention(d_model, n_heads).eval()


# -----------------------------------------------------------------------------
# v4.1 hyper-lattice

def test_v4_1_lattice_weights_and_routing_receive_gradients_after_one_backward():
    model = tiny("v4_1", size=SMALL).train()
    x = tokens((2, 49), 5)
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    assert model.lattice.offset_logits.grad.abs().max() > 0
    assert model.lattice.route_weight.grad.abs().max() > 0


@torch.no_grad()
def test_v4_1_routing_sums_to_one_per_token_and_is_zero_before_the_sequence_start():
    model = fit(tiny("v4_1", size=SMALL, lattice_window=12), 3, batch=2, seed=0)
    x = torch.randn(2, 30, SMALL["d_model"])
    a = model.lattice.routing(x)
    assert max_diff(a.sum(-1), torch.ones(2, 30)) <= 1e-6
    t = torch.arange(30)[:, None]
    assert torch.all(a.masked_select((torch.arange(12) > t).expand(2, -1, -1)) == 0)


@torch.no_grad()
def test_v4_1_lattice_output_at_t_is_exactly_invariant_to_later_inputs():
    model = fit(tiny("v4_1", size=SMALL, lattice_window=8), 3, batch=2, seed=0)
    x = torch.randn(1, 30, SMALL["d_model"], generator=torch.Generator().manual_seed(6))
    ref, ref_logits = model.lattice(x)
    for t in (0, 7, 8, 20):
        y = x.clone()
        y[:, t + 1:] += 1.0
        out, logits = model.lattice(y)
        assert torch.equal(out[:, :t + 1], ref[:, :t + 1]) and torch.equal(logits[:, :t + 1], ref_logits[:, :t + 1])


@torch.no_grad()
def test_v4_1_cached_decoding_with_small_blocks_and_window_equals_the_full_forward():
    model = fit(tiny("v4_1", size=SMALL, lattice_window=5, block_size=4), 3, batch=2, seed=0)
    idx = tokens((2, 48), 7)
    full = model(idx).logits
    for cuts in ([3, 4, 9, 16, 30], list(range(1, 48))):
        outs, cache = decode_in_pieces(model, idx, cuts)
        assert max_diff(cat(outs, "logits"), full) <= 1e-4


# -----------------------------------------------------------------------------
# v5

@torch.no_grad()
def test_v5_router_gates_at_t_ignore_later_tokens_and_other_samples():
    model = fit(tiny("v5", size=SMALL), 3, batch=2, seed=0)
    processor = model.trunk.processor
    x = torch.randn(3, 40, SMALL["d_model"], generator=torch.Generator().manual_seed(8))
    g = processor.gates(x)
    for t in (0, 13, 38):
        y = x.clone()
        y[:, t + 1:] += 1.0
        assert torch.equal(processor.gates(y)[:, :t + 1], g[:, :t + 1])
    assert max_diff(processor.gates(x[:1]), g[:1]) <= 1e-6


def test_v5_predictive_field_is_the_template_times_sigmoid_lambda_and_lambda_trains():
    model = tiny("v5", size=SMALL, n_lattice_layers=4).train()
    field = model.field
    assert torch.equal(field.field(), field.templates * torch.sigmoid(field.layer_weights))
    assert (field.field().sum(-1) > 0).all()
    far, medium, near = field.templates
    assert far.argmax() < medium.argmax() < near.argmax()  # far targets read shallow layers, near ones deep
    x = tokens((2, 49), 9)
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    assert field.layer_weights.grad.abs().max() > 0


def test_v5_multiscale_plan_covers_every_offset_with_the_nearest_coarser_anchors():
    plan = model_v5.multiscale_plan(8)
    assert [[j for j, *_ in level] for level in plan] == [[4, 8], [2, 6], [1, 3, 5, 7]]
    anchors = {j: (a, b, alpha) for level in plan[1:] for j, a, b, alpha in level}
    assert anchors == {2: (0, 4, 0.5), 6: (4, 8, 0.5), 1: (0, 2, 0.5), 3: (2, 4, 0.5), 5: (4, 6, 0.5),
                       7: (6, 8, 0.5)}
    for Hz in (1, 2, 3, 5, 12):
        offsets = sorted(j for level in model_v5.multiscale_plan(Hz) for j, *_ in level)
        assert offsets == list(range(1, Hz + 1))
        assert all(0 <= alpha <= 1 for level in model_v5.multiscale_plan(Hz) for *_, alpha in level)


def test_v5_interpolation_returns_alpha_between_anchors_zero_and_one():
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(model_v5.interpolate_anchors(torch.zeros(4), torch.ones(4), alpha), alpha)


@pytest.mark.parametrize("name,mode", [("v4_1", "token"), ("v5", "token"), ("v5", "chunk")])
@torch.no_grad()
def test_no_two_horizon_offsets_give_identical_outputs_after_a_few_steps(name, mode):
    model = fit(tiny(name, mode, size=SMALL), 3, batch=2, seed=0)
    out = model(tokens((2, 48), 10))
    hidden = out.horizon_hidden                                              # (B, T, H-1, D), before the unembedding
    n = hidden.size(2)
    assert min(max_diff(hidden[:, :, i], hidden[:, :, j]) for i in range(n) for j in range(i + 1, n)) > 1e-3
    assert min(max_diff(hidden[:, :, i], out.hidden) for i in range(n)) > 1e-3   # nor the main head's state


@pytest.mark.parametrize("mode", ["token", "chunk"])
@torch.no_grad()
def test_v5_exit_plumbing_threshold_above_one_is_exactly_the_dense_model(mode):
    model = fit(tiny("v5", mode, size=SMALL, n_layers=4, n_bottom_layers=3), 3, batch=2, seed=0)
    idx = tokens((2, 40), 11)
    model.config.exit_threshold = 1.01
    eval_logits = model(idx).logits
    dense = model.train()(idx).logits
    assert torch.equal(eval_logits, dense)
    model.eval().config.exit_threshold = split_threshold(model, idx)
    assert max_diff(model(idx).logits, dense) > 1e-4


@torch.no_grad()
def test_v5_exit_plumbing_cached_decoding_equals_the_full_pass_and_fills_every_layer():
    model = fit(tiny("v5", size=SMALL, n_layers=4, n_bottom_layers=3, block_size=4), 3, batch=2, seed=0)
    idx = tokens((2, 48), 12)
    model.config.exit_threshold = split_threshold(model, idx)
    full = model(idx)
    assert (full.exit_depth < 3).any() and (full.exit_depth == 3).any()
    outs, cache = decode_in_pieces(model, idx, list(range(5, 48)))
    assert torch.equal(cat(outs, "exit_depth"), full.exit_depth)
    assert max_diff(cat(outs, "logits"), full.logits) <= 1e-4
    assert all(layer.lengths == [48, 48] for layer in cache.layers), "a skipped layer left a hole in its cache"


@pytest.mark.parametrize("name", ["v4_1", "v5"])
def test_v4_1_and_v5_horizon_drafts_get_accepted_and_speculative_greedy_equals_greedy(name, monkeypatch):
    pattern = torch.tensor([3, 17, 42, 8, 25, 61, 12])
    batch = torch.stack([pattern.roll(-s).repeat(8)[:49] for s in range(7)])
    # v5's processor gates start open and its router is trained to tell tokens apart: at this toy size it needs
    # about 100 steps to learn the cycle (60 leave it repeating one token)
    model = fit(tiny(name, size=SMALL), 60 if name == "v4_1" else 120, batch, seed=0)
    monkeypatch.setattr(core, "prompt_lookup_draft", lambda seq, k: (seq.new_empty(0), None))
    stats = {}
    for prompt_len, draft_len, new in ((2, 3, 20), (9, 1, 15), (20, 4, 25)):
        prompt = batch[prompt_len % 7:prompt_len % 7 + 1, :prompt_len]
        plain = model.generate(prompt, new, temperature=0)
        speculative = model.generate(prompt, new, temperature=0, speculative=True, draft_len=draft_len, stats=stats)
        assert torch.equal(plain, speculative), (prompt_len, draft_len)
    assert sum(n * count for n, count in enumerate(stats["accepted_hist"])) >= 20


# -----------------------------------------------------------------------------
# routers after training (v4.1's offset routing, v5's processor gates in both modes, ChaosLogic's task analyzer,
# pattern selector, lattice gates and depth): each model trains once on real text through its ordinary objective,
# then the tests look at what its routers do on held-out text. No weight, gate or threshold is set by hand.

ROUTED = dict(vocab_size=128, d_model=32, n_layers=4, n_heads=2, max_seq_len=32)
ROUTED_MODELS = [("v4_1", "token"), ("v5", "token"), ("v5", "chunk"), ("chaoslogic", "token")]
ROUTING_SPREAD = 0.02   # mean TV of a token's routing from the mean routing: collapsed routers measured 0.003
DEPTH_SPREAD = 0.02     # mean |D_t - mean D at t| in layers, ChaosLogic's depth prediction


def tv_from_mean(p):
    """Mean total variation of routing distributions p (N, T, K) from the mean routing over the N rows at the same
    position: 0 when every token routes alike."""
    return (0.5 * (p - p.mean(0, keepdim=True)).abs().sum(-1)).mean().item()


@torch.no_grad()
def routing_readout(model, x):
    """What the routers do on windows x: `routes`, routing distributions (N, T, K) (v5's gates as two-way
    distributions [g, 1 - g], one per layer), and `gates`, sigmoid gates (N, T, n) or None."""
    name = type(model).__module__
    if name == "model_chaoslogic":
        seen = []
        handle = model.task.register_forward_hook(lambda mod, args, out: seen.append(out))
        out = model(x)
        handle.remove()
        pattern_probs = model.select_patterns(seen[0][1].softmax(-1))[1].softmax(-1)         # (N, T, L, 4)
        routes = [seen[0][1].softmax(-1)] + list(pattern_probs.unbind(2))
        return dict(routes=routes, gates=out.lattice_gates, out=out)
    out = model(x)
    if name == "model_v4_1":
        return dict(routes=[out.routing], gates=None, out=out)
    return dict(routes=list(core.bernoulli(out.gates).unbind(2)), gates=out.gates, out=out)


@pytest.fixture(scope="session", params=ROUTED_MODELS, ids=[f"{n}-{m}" for n, m in ROUTED_MODELS])
def routed(request):
    """(model, routing_readout on 16 held-out windows) after 80 AdamW steps on the bytes of tinyshakespeare, at
    the learning rate of the cpu_tiny preset's scale (at 1e-2 v5's 256-wide router overshoots every step)."""
    name, mode = request.param
    with single_thread():
        model = fit(tiny(name, mode, size=ROUTED), 80, text_windows(shakespeare_bytes()), lr=3e-3, seed=0)
        held_out = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(5), 16, 32)
        return model, routing_readout(model, held_out)


def test_trained_routers_route_each_token_its_own_way_and_use_more_than_one_path(routed):
    model, seen = routed
    for i, p in enumerate(seen["routes"]):
        spread = tv_from_mean(p)
        assert spread > ROUTING_SPREAD, f"router {i}: tokens route alike (mean TV {spread:.4f})"
    choices = [p.argmax(-1).unique().numel() for p in seen["routes"]]
    assert max(choices) > 1, f"every token takes the same path: {choices}"
    if type(model).__module__ == "model_chaoslogic":                 # and the pattern choice that eval really uses
        picked = seen["out"].patterns.argmax(-1)                     # (N, T, layers)
        assert any(picked[..., l].unique().numel() > 1 for l in range(picked.size(-1)))


def test_trained_gates_are_neither_all_shut_nor_all_open(routed):
    model, seen = routed
    if seen["gates"] is None:
        pytest.skip("v4.1's router is a distribution over offsets (the test above)")
    mean = seen["gates"].mean((0, 1))                                             # one gate per layer
    assert ((mean > 0.05) & (mean < 0.95)).all(), f"gates shut or wide open: {mean.tolist()}"


def test_trained_chaoslogic_depth_prediction_varies_across_tokens(routed):
    """The predicted depth D_t differs between the rows at a position by more than DEPTH_SPREAD layers on average
    (the collapsed predictor's whole range was 0.007-0.012). Whether a token then skips the adaptive layer is the
    compute penalty's trade: bench.py's mechanisms table reports the share."""
    model, seen = routed
    if type(model).__module__ != "model_chaoslogic":
        pytest.skip("ChaosLogic only")
    depth = seen["out"].depth                                                      # (N, T)
    spread = (depth - depth.mean(0, keepdim=True)).abs().mean().item()
    print(f"\ndepth {depth.mean().item():.3f}, spread {spread:.4f}, tokens that skip "
          f"{(seen['out'].exit_depth < model.n_bottom).float().mean().item():.2f}")
    assert spread > DEPTH_SPREAD


def test_bench_mechanism_rows_of_a_trained_router_describe_it_and_leave_the_model_as_it_was(routed):
    """bench.py's mechanisms table, run on the routed fixture's trained model: the per-token spread it reports is the
    one computed here from the model's own routing on the same windows (1e-6), switching v4.1's or ChaosLogic's
    lattice off raises the held-out loss (measured +0.072 and +0.32), and every override the ablations install is
    gone afterwards: the logits are bit-identical before and after. v5's processor is worth almost nothing at this
    size and budget (switching it off: +0.0004 token mode, -0.0001 chunk mode), so it is not held to a gain here;
    the table reports what it is worth."""
    import bench
    model, _ = routed
    name = type(model).__module__
    w = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(9), 16, 33)
    x, windows = w[:, :-1], [(w[:, :-1], w[:, 1:])]
    with torch.no_grad():
        before = model(x)
    rows = [row for fn in bench.MECHANISMS for row in fn("m", model, windows)]
    with torch.no_grad():
        assert torch.equal(model(x).logits, before.logits)
    measure = {row["measure"].split(" (")[0]: row for row in rows}
    if name == "model_v4_1":
        p, off = before.routing, measure["lattice gate, mean"]["ablation_dloss"]
        spread = measure["per-token spread: mean TV from the mean routing"]["value"]
    else:
        g = before.gates if name == "model_v5" else before.lattice_gates
        p = torch.stack([g, 1 - g], -1)                   # a gate's TV from its mean is |g - mean g|
        off = measure["mean gate per layer"]["ablation_dloss"]
        spread = measure["per-token spread: mean |g - mean g|"]["value"]
    tv = tv_from_mean(p)
    assert abs(spread - tv) <= 1e-6, (spread, tv)
    if name != "model_v5":
        assert off > 0.01, f"switching the trained lattice off changes held-out loss by {off:+.5f}"


def test_bench_v8_2_rows_of_a_trained_model_switch_each_part_off_and_leave_the_model_as_it_was():
    """bench.py's v8.2 rows on a v8.2 trained on real text (the bytes of tinyshakespeare, 150 AdamW steps, nothing
    set by hand): the path lattice's per-token spread is the one computed here from its router's input on the same
    windows (1e-6); switching each part off raises the held-out loss, the lattice's and the fast weights' by more
    than 0.01 nats (measured, model seeds 0 / 1: lattice +0.10 / +0.086, fast weights +0.063 / +0.106, coupling
    +0.017 / +0.018, feedback +0.002 / +0.013); and the logits are bit-identical before and after."""
    import bench
    with single_thread():
        model = fit(tiny("v8_2", size=ROUTED), 150, text_windows(shakespeare_bytes()), lr=3e-3, seed=0)
    w = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(9), 16, 33)
    x, windows = w[:, :-1], [(w[:, :-1], w[:, 1:])]
    seen = []
    handle = model.lattice.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        before = model(x).logits
        p = model.lattice.router(model.lattice.ln(seen[0])).float().softmax(-1)            # (N, T, paths)
    handle.remove()
    rows = bench.v8_2_rows("v8_2", model, windows)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    measure = {(r["mechanism"], r["measure"].split(" (")[0]): r for r in rows}
    spread = measure["path lattice (top-k routing)", "per-token spread: mean TV from the mean routing"]["value"]
    assert abs(spread - tv_from_mean(p)) <= 1e-6
    gain = {r["mechanism"]: r["ablation_dloss"] for r in rows if r.get("ablation_dloss") is not None}
    assert gain["path lattice (top-k routing)"] > 0.01 and gain["Hebbian fast weights"] > 0.01, gain
    assert gain["diamond coupling"] > 0 and gain["feedback loop"] > 0, gain


PATTERN_GAIN = 0.002    # nats: forcing ChaosLogic's trained pattern choice dense cost 0.0072-0.0100 (data seeds 0-2)


@pytest.fixture(scope="session")
def chaos_trained():
    """ChaosLogic after 200 AdamW steps on the bytes of tinyshakespeare (the routed fixture's size; at its 80 steps
    the pattern choice is still worth < 1e-4 nats), with a held-out loss function taking the routers' overrides."""
    import bench
    with single_thread():
        model = fit(tiny("chaoslogic", size=ROUTED), 200, text_windows(shakespeare_bytes()), lr=3e-3, seed=0)
    w = text_windows(shakespeare_bytes(held_out=True))(torch.Generator().manual_seed(5), 64, 33)

    @torch.no_grad()
    def held_out(dense=False, full_depth=False):
        """Held-out loss and the model output; dense: every layer attends with P0 (dense causal) for every token;
        full_depth: every token runs every bottom layer (bench.py's ablations of the mechanisms table)."""
        with contextlib.ExitStack() as overrides:
            if dense:
                overrides.enter_context(bench.chaoslogic_dense_patterns(model))
            if full_depth:
                overrides.enter_context(bench.chaoslogic_full_depth(model))
            out = model(w[:, :-1])
            return core.lm_loss(out.logits, w[:, 1:]).item(), out

    return model, held_out


def test_trained_chaoslogic_pattern_choice_matters_forcing_every_layer_dense_raises_held_out_loss(chaos_trained):
    """The Gumbel selector's per-token choice among dense / window / Pell-Lucas blocks / window + sinks is used
    after ordinary training: the trained model does worse when every token attends densely instead."""
    model, held_out = chaos_trained
    base, out = held_out()
    dense, _ = held_out(dense=True)
    picked = out.patterns.argmax(-1)                                               # (N, T, layers)
    print(f"\nheld-out {base:.4f}, every pattern dense {dense:.4f} ({dense - base:+.4f}); pattern shares "
          f"{[round((picked == k).float().mean().item(), 2) for k in range(4)]}")
    assert dense - base > PATTERN_GAIN


def test_trained_chaoslogic_depth_predictor_skips_bottom_layers_at_no_cost_in_held_out_loss(chaos_trained):
    """The depth predictor saves compute after training: a share of tokens skips an adaptive bottom layer
    (measured 0.71-1.0 over data seeds 0-2), and the held-out loss at the predicted depths is no worse than with every
    token at full depth, within core.EXIT_TOLERANCE (full depth measured 0.02-0.12 nats worse: the layers above
    trained on the predicted depths)."""
    model, held_out = chaos_trained
    base, out = held_out()
    full, full_out = held_out(full_depth=True)
    skipped = (out.exit_depth < model.n_bottom).float().mean().item()
    print(f"\nshare of tokens that skip a bottom layer {skipped:.2f}; held-out {base:.4f}, full depth {full:.4f}")
    assert (full_out.exit_depth == model.n_bottom).all()                            # the override took effect
    assert skipped > 0.25
    assert base <= full + core.EXIT_TOLERANCE


def test_v5_far_medium_and_near_fields_read_different_layers_at_the_default_depth():
    field = tiny("v5", size=SMALL).field
    assert field.templates.size(1) == model_v5.Config().n_lattice_layers == 2
    weights = field.templates / field.templates.sum(-1, keepdim=True)                     # (far, medium, near)
    for a in range(3):
        for b in range(a + 1, 3):
            assert 0.5 * (weights[a] - weights[b]).abs().sum() > 0.2, (a, b, weights.tolist())


# -----------------------------------------------------------------------------
# v6 and v7.1.2: chunk decoder with cross-attention, injection,
# speculative decoding, hierarchical predictive loss

V6_V7 = [("v6", "token"), ("v6", "chunk"), ("v7_1_2", "token"), ("v7_1_2", "chunk")]
CHUNKED = ["v6", "v7_1_2"]


@torch.enable_grad()
def fit_injected(model, steps, data, lr=1e-2, batch=8, seed=1):
    """fit() through the injection training path: data is train.py's ShardLoader built with
    context_len=model.train_context_len (its batches carry the passage before each window), or a function
    data(generator, batch, L + T + 1) -> streams whose first L = max_seq_len tokens are the passage before each
    window; the passage is handed to the model as `context`, as train.py does."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    L = model.config.max_seq_len
    model.train()
    for _ in range(steps):
        if hasattr(data, "next_batch"):
            x, y, context = data.next_batch()
        else:
            w = data(g, batch, 2 * L + 1)
            x, y, context = w[:, L:-1], w[:, L + 1:], w[:, :L]
        loss = model(x, targets=y, context=context).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def open_gate(model, value=0.7):
    """Plumbing tests only: open every injection gate (global, local and the output read) by hand."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("inject_gate") or name.endswith("inject_read.gate"):
                p.fill_(value)
    return model


def offset_cross_entropies(model, x, y):
    """Held-out CE (H,) of the next-token head and of every horizon offset 2..H, read through the model's output."""
    if hasattr(model, "offset_cross_entropies"):
        return model.offset_cross_entropies(x, y)
    with torch.no_grad():
        out = model(x)
        ces = [core.lm_loss(out.logits, y)]
        for j in range(out.horizon_hidden.size(2)):
            logits = F.linear(out.horizon_hidden[:, :, j], model.wte.weight)
            ces.append(core.lm_loss(logits, core.horizon_targets(y, j + 2)))
    return torch.stack(ces)


@pytest.mark.parametrize("name,mode", [("v6", "token"), ("v6", "chunk"), ("v7_1_2", "token"), ("v7_1_2", "chunk"),
                                       ("v8_2", "token"), ("chaoslogic", "token")])
def test_training_on_uniform_random_tokens_never_gets_any_offset_below_ln_V_on_fresh_data(name, mode):
    """Nothing in random tokens is learnable: no head may look better than chance on fresh data, which a leak of
    future tokens into training (or a label off by one) would allow."""
    size = CHAOS if name == "chaoslogic" else TINY
    model = fit(tiny(name, mode, size=size), 40, uniform(96), lr=3e-3, seed=0, flush_denormal=True)
    held_out = torch.randint(0, 96, (32, 49), generator=torch.Generator().manual_seed(99))
    ces = offset_cross_entropies(model, held_out[:, :-1], held_out[:, 1:])
    assert ces.numel() == model.config.horizon
    assert (ces >= math.log(96) - 0.05).all(), ces


@pytest.mark.parametrize("name", CHUNKED)
def test_streaming_chunk_generation_equals_teacher_forced_logits_across_chunk_boundaries(name):
    model = fit(tiny(name, "chunk"), 3, uniform(96))
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    full = model(idx).logits
    cache = model.new_cache(2)
    with torch.no_grad():
        streamed = [model(idx[:, :1], cache=cache, start_pos=0).logits]
        for t in range(1, 40):  # one token per call: crosses the boundaries at 7, 15, 23, 31, 39
            streamed.append(model(idx[:, t:t + 1], cache=cache, start_pos=t).logits)
    assert (torch.cat(streamed, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", CHUNKED)
def test_plumbing_logits_of_chunks_before_an_injection_anchor_are_identical_with_and_without_it(name):
    model = open_gate(fit(tiny(name, "chunk"), 3, uniform(96)))
    C = model.config.chunk_size
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(4))
    block = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(5))
    plain = model(idx).logits
    for anchor in (2, 4):
        with model.inject([(block, anchor)]):
            injected = model(idx).logits
        first = anchor * C - 1   # logits at t predict token t+1, which is in chunk anchor from here on
        assert torch.equal(injected[:, :first], plain[:, :first])
        assert (injected[:, first:] - plain[:, first:]).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", CHUNKED)
def test_plumbing_injection_with_closed_gates_is_identical_to_no_injection(name):
    model = tiny(name, "chunk")
    idx = torch.randint(0, 96, (1, 40))
    with model.inject([(torch.randint(0, 96, (20,)), 2)]):
        injected = model(idx).logits
    assert torch.equal(injected, model(idx).logits)


def test_plumbing_injected_cached_decoding_and_speculation_equal_the_injected_full_forward():
    model = open_gate(fit(tiny("v6", "chunk"), 3, uniform(96)))
    idx = torch.randint(0, 96, (1, 37), generator=torch.Generator().manual_seed(6))
    with model.inject([(torch.randint(0, 96, (25,)), 2), (torch.randint(0, 96, (9,)), 4)]):
        full = model(idx).logits
        cache = model.new_cache(1)
        with torch.no_grad():
            part = [model(idx[:, :13], cache=cache, start_pos=0).logits]
            part += [model(idx[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(13, 37)]
        assert (torch.cat(part, 1) - full).abs().max().item() <= 1e-5
        greedy = model.generate(idx[:, :5], 30, temperature=0)
        assert torch.equal(greedy, model.generate(idx[:, :5], 30, temperature=0, speculative=True))
        assert torch.equal(greedy, model.generate(idx[:, :5], 30, temperature=0, use_cache=False))


def test_plumbing_gradient_reaches_the_injected_memory_only_from_chunks_at_or_after_the_anchor():
    model = open_gate(tiny("v6", "chunk"))
    C, anchor = model.config.chunk_size, 2
    memory = model.encode_injection(torch.randint(0, 96, (20,))).detach().requires_grad_(True)
    logits = model(torch.randint(0, 96, (1, 40)), injections=[(memory, anchor)]).logits
    before, = torch.autograd.grad(logits[:, :anchor * C - 1].sum(), memory, retain_graph=True, allow_unused=True)
    after, = torch.autograd.grad(logits[:, anchor * C - 1:].sum(), memory)
    assert before is None or before.abs().max().item() == 0
    assert after.abs().max().item() > 0


def test_injection_rejects_off_spine_and_out_of_range_anchors_empty_and_over_long_blocks_and_token_mode():
    model = tiny("v6", "chunk")                         # 48 // 8 = 6 chunks: spine 0, 2, 4
    block = torch.randint(0, 96, (10,))
    for anchor, words in ((3, "not a spine position"), (6, "out of range"), (-2, "out of range")):
        with pytest.raises(core.UsageError, match=words):
            with model.inject([(block, anchor)]):
                pass
    for bad in (block[:0], torch.randint(0, 96, (49,))):
        with pytest.raises(core.UsageError, match="1 to max_seq_len=48") as e:
            with model.inject([(bad, 2)]):
                pass
        assert "\n" not in str(e.value)
    token = tiny("v6", "token")
    with pytest.raises(core.UsageError, match="mode='chunk'"):
        token.encode_injection(block)
    with pytest.raises(core.UsageError, match="mode='chunk'"):
        token.train()(block[None], targets=block[None], context=block[None])
    with pytest.raises(core.UsageError, match="training signal"):   # context= is training's, not inference's
        model(block[None], context=block[None])


def test_chunk_training_injects_the_passage_before_the_window_at_spine_anchors_with_dropout():
    model = tiny("v6", "chunk", inject_train_prob=0.5).train()
    assert model.train_context_len == 48 and tiny("v6", "chunk", inject_train_prob=0.0).train_context_len == 0
    assert tiny("v6", "token").train_context_len == 0
    torch.manual_seed(0)
    context = torch.randint(0, 96, (64, 48))
    memory, anchors = model._training_injection(context, 48)
    assert memory.shape == (64, 48, 32) and (anchors == anchors[:, :1]).all()
    dropped = anchors[:, 0] == model.chunk.n_slots                  # rows that see nothing: injection dropout
    assert 0.3 < dropped.float().mean().item() < 0.7
    assert set(anchors[~dropped, 0].tolist()) <= {0, 2}               # spine anchors in the window's first half


def test_spine_attention_reads_itself_a_local_window_and_spine_offsets_by_head_level_never_the_future():
    attn = core.SpineSelfAttention(16, 4, 400, window=4)
    mask = attn.mask(0, 400, 400, "cpu")                                       # (heads, query, key)
    assert not (mask & ~torch.ones(400, 400, dtype=torch.bool).tril()).any()    # causal
    distance = torch.arange(400)
    read = [set(distance[attn.reads[h] & (distance >= 4)].tolist()) for h in range(4)]
    assert read == [{4}, {4}, {12, 36}, {104, 304}]              # heads by level: near (1, 2 in the window), mid, far
    assert attn.reads[:, :4].all()                               # the local window (and t itself) for every head
    t = torch.arange(1, 400)
    assert mask[:, t, t - 1].all() and mask[:, 399, 399 - 304].any()                # every t >= 1 has a neighbour
    # a decode step at position p uses row p of the full mask: the same keys as the full forward
    assert torch.equal(attn.mask(250, 1, 251, "cpu")[:, 0], mask[:, 250, :251])


@pytest.mark.parametrize("name", CHUNKED)
def test_every_parameter_including_the_injections_gets_a_gradient_under_injection_training(name):
    torch.manual_seed(0)
    model = fit_injected(tiny(name, "chunk"), 3, uniform(96), batch=4, seed=0).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (8, 49), generator=g)
    context = torch.randint(0, 96, (8, 48), generator=g)
    torch.manual_seed(2)                                               # injection dropout keeps some rows
    model(x[:, :-1], targets=x[:, 1:], context=context).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max().item() == 0]
    assert not dead, f"parameters without gradient: {dead}"


TOPICS = torch.stack([torch.randperm(96, generator=torch.Generator().manual_seed(100 + k))[:8] for k in range(16)])


def topical(g, B, n):
    """Streams of n tokens, each drawn i.i.d. from one of 16 topics of 8 tokens: the passage before a window
    tells its topic, which the window's first tokens cannot."""
    topic = torch.randint(0, len(TOPICS), (B,), generator=g)
    return TOPICS[topic][torch.arange(B)[:, None], torch.randint(0, TOPICS.size(1), (B, n), generator=g)]


@pytest.fixture(scope="session")
def topic_injected():
    """A tiny v6 chunk model after 120 AdamW steps of injection training (the passage before each window injected
    into half the rows), nothing set by hand; with held-out windows and their passages."""
    with single_thread():
        torch.manual_seed(0)
        model = fit_injected(tiny("v6", "chunk"), 120, topical, lr=1e-2, batch=8, seed=0)
    held_out = topical(torch.Generator().manual_seed(5), 64, 2 * 48 + 1)
    return model, held_out[:, :48], held_out[:, 48:]


def injected_loss(model, context, window, anchor=0):
    with torch.no_grad():
        injections = None if context is None else [(model.encode_injection(context), anchor)]
        return core.lm_loss(model(window[:, :-1], injections=injections).logits, window[:, 1:]).item()


def test_trained_injection_of_the_true_passage_lowers_held_out_loss_and_a_wrong_one_raises_it(topic_injected):
    model, context, window = topic_injected
    none, true = injected_loss(model, None, window), injected_loss(model, context, window)
    wrong = injected_loss(model, context.roll(1, 0), window)                  # another window's passage
    print(f"\nheld-out loss: no injection {none:.3f}, true passage {true:.3f}, another passage {wrong:.3f}")
    assert true < none - 0.1 and wrong > none + 0.5


def test_trained_injection_steers_greedy_continuations_toward_the_injected_topic(topic_injected):
    model, _, _ = topic_injected
    g = torch.Generator().manual_seed(8)
    prompt = TOPICS[1][torch.randint(0, 8, (1, 3), generator=g)]       # topic 1; the passages are of others
    in_topic, outs = {}, {}
    for k in (3, 11):
        passage = TOPICS[k][torch.randint(0, 8, (48,), generator=g)]
        with model.inject([(passage, 0)]):
            outs[k] = model.generate(prompt, 24, temperature=0)[0, 3:]
        in_topic[k] = torch.isin(outs[k], TOPICS[k]).float().mean().item()
    assert min(in_topic.values()) > 0.5, in_topic        # each continuation follows its own injected topic
    assert not torch.equal(outs[3], outs[11])


def key_value(g, B, n):
    """Recall streams of n = 2 * 48 + 1 tokens: a passage of 24 (key, value) pairs (keys 0..47 drawn without
    replacement, values 48..95), then every key of the passage once in a random order, each followed by its value.
    A value is predictable only from the passage, which the window never contains."""
    keys = torch.stack([torch.randperm(48, generator=g)[:24] for _ in range(B)])              # (B, 24)
    values = 48 + torch.randint(0, 48, (B, 24), generator=g)
    order = torch.stack([torch.randperm(24, generator=g) for _ in range(B)])
    asked = torch.stack([keys.gather(1, order), values.gather(1, order)], 2).flatten(1)      # (B, 48)
    stream = torch.cat([torch.stack([keys, values], 2).flatten(1), asked, asked[:, :1]], 1)
    return stream[:, :n]


@pytest.fixture(scope="session")
def recall_injected():
    """A tiny v6 chunk model after 500 AdamW steps of injection training on key_value streams (the passage injected
    into every row: inject_train_prob=1, a training setting), nothing set by hand; with held-out streams."""
    with single_thread():
        torch.manual_seed(0)
        model = fit_injected(tiny("v6", "chunk", inject_train_prob=1.0), 500, key_value, lr=3e-3, batch=8, seed=1)
    return model, key_value(torch.Generator().manual_seed(9), 64, 2 * 48 + 1)


def test_trained_injection_recalls_values_only_the_injected_passage_holds(recall_injected):
    model, held_out = recall_injected
    passage, window = held_out[:, :48], held_out[:, 48:]
    none, true = injected_loss(model, None, window), injected_loss(model, passage, window)
    wrong = injected_loss(model, passage.roll(1, 0), window)                  # another stream's pairs
    print(f"\nkey -> value recall, held-out loss: no injection {none:.3f}, true passage {true:.3f}, another {wrong:.3f}")
    assert true < none - 1.0 and wrong > none


def test_trained_injection_greedy_continuation_writes_the_injected_values(recall_injected):
    model, held_out = recall_injected
    correct = {True: [], False: []}
    for row in held_out[:16]:
        passage, value_of = row[:48], dict(zip(row[0:48:2].tolist(), row[1:48:2].tolist()))
        for inject in (True, False):
            with model.inject([(passage, 0)]) if inject else contextlib.nullcontext():
                out = model.generate(row[48:49][None], 31, temperature=0)[0].tolist()   # a key, then 31 tokens
            correct[inject] += [value_of[k] == v for k, v in zip(out[0::2], out[1::2]) if k in value_of]
    with_passage, without = (sum(c) / len(c) for c in (correct[True], correct[False]))
    print(f"\ngreedy values after the passage's keys equal to its values: {with_passage:.2f} of "
          f"{len(correct[True])} injected, {without:.2f} of {len(correct[False])} without")
    assert len(correct[True]) >= 64 and with_passage > 0.9 and without < 0.2


@pytest.fixture(scope="session")
def stdlib_injected(tmp_path_factory):
    """A v6 chunk model (d_model 64, 2 layers, 48-token windows) after 300 AdamW steps through train.py's loader,
    which hands it the 48 tokens before each window (injected into half the rows, the default), on GPT-2 tokens of
    Python standard-library files, remapped to the training files' 1,023 most frequent tokens (+ one for the rest)
    so that the model trains in a minute; nothing set by hand. With held-out windows of 27 other files: each with
    the passage before it and a passage from another file."""
    import train
    docs = []
    for path in prepare_data.stdlib_paths()[::4][:300]:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens = prepare_data.tokenize(f.read()).astype(np.int64)
        if len(tokens) > 2 * 48 + 2:
            docs.append(tokens)
    held, fit_docs = docs[::10], [d for i, d in enumerate(docs) if i % 10]
    counts = collections.Counter(np.concatenate(fit_docs).tolist())
    remap = np.full(1 << 16, 1023, dtype=np.int64)
    remap[[token for token, _ in counts.most_common(1023)]] = np.arange(1023)
    shard = str(tmp_path_factory.mktemp("stdlib") / "stdlib_train_000000.bin")
    prepare_data.write_shard(shard, remap[np.concatenate(fit_docs)])
    with single_thread():
        torch.manual_seed(0)
        model = core.build_model("v6", mode="chunk", vocab_size=1024, d_model=64, n_layers=2, n_heads=4,
                                 max_seq_len=48)
        loader = train.ShardLoader([shard], 16, 48, 1024, "random", seed=0, context_len=model.train_context_len)
        fit_injected(model, 300, loader, lr=3e-3)
    g = torch.Generator().manual_seed(3)
    which = torch.randint(0, len(held), (256,), generator=g)
    streams = torch.stack([torch.from_numpy(remap[held[i][s:s + 2 * 48 + 1]]) for i in which.tolist()
                           for s in torch.randint(0, len(held[i]) - 2 * 48 - 1, (1,), generator=g).tolist()])
    other = [next(j for j in range(i + 1, i + 256) if which[j % 256] != which[i]) % 256 for i in range(256)]
    return model.eval(), streams[:, :48], streams[:, 48:], streams[other, :48]


PASSAGE_SPECIFIC_GAIN = 0.1   # nats: the true preceding passage against another file's, stdlib test below


def test_trained_injection_of_the_passage_before_a_real_text_window_lowers_its_loss_more_than_another_files(
        stdlib_injected):
    model, passage, window, other = stdlib_injected
    none, true, wrong = (injected_loss(model, p, window) for p in (None, passage, other))
    print(f"\nstdlib held-out loss: no injection {none:.4f}, the passage before {true:.4f}, another file's {wrong:.4f}")
    # the read copies from the passage, not only its kind of text: 0.197 nats below another file's passage (the
    # read's projections at a N(0, 0.02) start, uniform attention at first, reached 0.038 in the same run)
    assert true < none - 0.1 and true < wrong - PASSAGE_SPECIFIC_GAIN


def test_injected_memory_is_projected_once_per_generation_not_once_per_chunk(monkeypatch):
    model = open_gate(tiny("v6", "chunk"))
    calls = []
    project = model.chunk.project_injection
    monkeypatch.setattr(model.chunk, "project_injection", lambda *a: calls.append(1) or project(*a))
    with model.inject([(torch.randint(0, 96, (20,)), 2)]):
        model.generate(torch.randint(0, 96, (1, 3)), 40, temperature=0)      # crosses 5 chunk boundaries
        assert len(calls) == 1
        model.generate(torch.randint(0, 96, (1, 3)), 30, temperature=0, speculative=True, draft_len=3)
        assert len(calls) == 2


@pytest.mark.parametrize("name,mode", V6_V7)
def test_greedy_speculative_output_equals_plain_greedy_for_many_prompts_and_draft_lengths(name, mode):
    model = fit(tiny(name, mode), 30, counting(96), lr=3e-3)  # predictable data: drafts get accepted
    g = torch.Generator().manual_seed(7)
    accepted = 0
    for i in range(8):
        prompt = torch.randint(0, 96, (1, 1 + i * 3), generator=g)
        greedy = model.generate(prompt, 20, temperature=0)
        for k in (1, 2, 3, 5):
            stats = {}
            speculative = model.generate(prompt, 20, temperature=0, speculative=True, draft_len=k, stats=stats)
            assert torch.equal(speculative, greedy), (i, k)
            accepted += sum(n * c for n, c in enumerate(stats["accepted_hist"]))
    assert accepted > 0


def chi_square_pvalue(observed, expected):
    """Pearson's chi-square test of counts against expected counts (the same totals): the p-value is the
    upper regularized incomplete gamma Q((k - 1) / 2, chi2 / 2), as scipy.stats.chisquare computes it."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)).item()


def test_speculative_sampling_matches_the_exact_distribution_of_the_first_tokens_chi_square():
    model = fit(tiny("v6", "token", vocab_size=8, max_seq_len=16), 10, counting(8), lr=3e-3)
    prompt = torch.tensor([[3, 4]])
    with torch.no_grad():  # exact joint of the first two new tokens by enumeration
        p1 = model(prompt).logits[0, -1].softmax(-1)
        seqs = torch.cat([prompt.expand(8, 2), torch.arange(8)[:, None]], 1)
        p2 = model(seqs).logits[:, -1].softmax(-1)
        exact = (p1[:, None] * p2).flatten().double().numpy()
    exact = exact / exact.sum()              # float32 softmax sums to 1 only up to rounding
    g = torch.Generator().manual_seed(0)
    runs = 3000
    counts = np.zeros(64)
    accepted = 0
    for _ in range(runs):
        stats = {}
        out = model.generate(prompt, 3, temperature=1.0, speculative=True, draft_len=3, generator=g, stats=stats)
        counts[out[0, 2].item() * 8 + out[0, 3].item()] += 1
        accepted += sum(n * c for n, c in enumerate(stats["accepted_hist"]))
    keep = exact * runs >= 5        # pool the rare outcomes so the chi-square approximation holds
    observed, expected = counts[keep], exact[keep] * runs
    if (~keep).any():
        observed, expected = np.append(observed, counts[~keep].sum()), np.append(expected, exact[~keep].sum() * runs)
    assert accepted > 0
    assert chi_square_pvalue(observed, expected) > 0.01


def test_speculative_statistics_report_calls_acceptance_per_head_and_speedup():
    model = fit(tiny("v6", "token"), 30, counting(96), lr=3e-3)
    out, stats = model.speculative_stats(torch.tensor([[5, 6, 7]]), 20)
    assert torch.equal(out, model.generate_ultra_fast(torch.tensor([[5, 6, 7]]), 20))
    assert stats["tokens_per_call"] == 20 / stats["model_calls"] and stats["speedup"] > 0
    assert len(stats["acceptance_per_head"]) == model.config.horizon - 1
    assert all(0 <= a <= 1 for a in stats["acceptance_per_head"] if a == a)


def test_speculative_bookkeeping_emits_exactly_max_new_tokens():
    model = fit(tiny("v6", "chunk"), 20, counting(96), lr=3e-3)
    for n in (1, 2, 7, 9, 30):
        for temperature in (0, 1.0):
            out = model.generate(torch.tensor([[1, 2, 3]]), n, temperature=temperature, speculative=True)
            assert out.shape == (1, 3 + n)


def _hpl_hand(h, targets, zs, unembed, beta, gamma, consistency):
    """The HierarchicalPredictiveLoss written out position by position (the main head is the KL's stop-grad target)."""
    logits = h @ unembed.T
    B, T, V = logits.shape
    main = F.log_softmax(logits, -1).detach()
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    weighted, lam_sum, kls = 0.0, 0.0, []
    for j in range(zs.size(2)):
        k = j + 2
        lam = beta * gamma ** (k - 2)
        q = F.log_softmax(zs[:, :, j] @ unembed.T, -1)
        terms, kl = [], []
        for b in range(B):
            for t in range(T - k + 1):
                if targets[b, t + k - 1] >= 0:
                    terms.append(-q[b, t, targets[b, t + k - 1]])
                    p = main[b, t + k - 1]
                    kl.append((p.exp() * (p - q[b, t])).sum())
        weighted, lam_sum = weighted + lam * torch.stack(terms).mean(), lam_sum + lam
        kls.append(torch.stack(kl).mean())
    return (ce + weighted) / (1 + lam_sum) + consistency * torch.stack(kls).mean()


def _sampled_mean(fn, draws, seed=0):
    """Mean and standard error over `draws` calls of fn() (a scalar tensor), with the global RNG seeded."""
    torch.manual_seed(seed)
    values = torch.stack([fn().detach() for _ in range(draws)])
    return values.mean().item(), (values.std() / draws ** 0.5).item()


def test_sampled_horizon_loss_is_an_unbiased_estimate_of_the_full_loss_at_one_heads_cost():
    g = torch.Generator().manual_seed(0)
    B, T, D, V, H = 2, 12, 8, 40, 5
    unembed = torch.randn(V, D, generator=g)
    zs = torch.randn(B, T, H - 1, D, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 9:] = -1                                             # padding is ignored by both
    full = core.horizon_loss(zs, unembed, targets, 0.9)
    mean, se = _sampled_mean(lambda: core.horizon_loss(zs, unembed, targets, 0.9, sample=True), 1500)
    assert abs(mean - full.item()) < 4 * se + 1e-6, (mean, full.item(), se)
    # and the gradient: its expectation is the full gradient
    torch.manual_seed(1)
    grads = torch.stack([torch.autograd.grad(core.horizon_loss(zs, unembed, targets, 0.9, sample=True), zs)[0]
                         for _ in range(800)])
    want = torch.autograd.grad(full, zs)[0]
    err = (grads.mean(0) - want).abs().max().item()
    assert err < 5 * (grads.std(0) / 800 ** 0.5).max().item(), err
    # each offset reads ceil(B T / (H - 1)) distinct rows, so all offsets together cost one extra head; fresh
    # every call; share None reads every row
    torch.manual_seed(2)
    rows = core.offset_rows(B * T, H - 1, "cpu", 1.0)
    assert rows.shape == (H - 1, 6) and all(len(set(r.tolist())) == 6 for r in rows)
    assert not torch.equal(rows, core.offset_rows(B * T, H - 1, "cpu", 1.0))
    assert torch.equal(core.offset_rows(B * T, H - 1, "cpu")[2], torch.arange(B * T))


def test_linear_rows_is_f_linear_for_every_row_count_and_every_model_unembeds_through_it():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 8, generator=g), torch.randn(37, generator=g)
    for shape in [(1, 8), (2, 8), (3, 8), (6, 8), (7, 8), (1, 3, 8), (2, 3, 8), (9, 8)]:
        x = torch.randn(*shape, generator=g)
        for bias in (None, b):
            got = core.linear_rows(x, w, bias)
            assert got.shape == shape[:-1] + (37,) and max_diff(got, F.linear(x, w, bias)) <= 1e-6, shape
    for name in core.MODELS:
        if name != "v8_2":   # v8.2 reads out through its distance head (readout), which calls linear_rows itself
            assert isinstance(tiny(name).lm_head, core.Unembedding), name


def test_linear_lse_loss_equals_autograd_on_the_full_logits_in_value_gradient_and_argmax():
    """The chunked pass (gradients taken in the forward) is the formula sum a lse - b pick on the full logits."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 37, 16, 101
    z = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    index, a, b = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g), torch.rand(N, generator=g)
    for b_ in (b, None):
        total, lse, pick, argmax = core.linear_lse_loss(z, w, index, a, b_, chunk=8)  # 5 chunks, the last short
        logits = z @ w.t()
        total_kept, _, _, _, kept = core.linear_lse_loss(z, w, index, a, b_, chunk=8, keep_logits=True)
        assert max_diff(kept, logits) <= 1e-5 and not kept.requires_grad
        assert total_kept.item() == total.item()       # the kept logits are written by the product, not altered
        first = core.linear_lse_loss(z, w, index, a, b_, chunk=8, keep_logits=13)   # the first 13 rows' only
        assert max_diff(first[4], logits[:13]) <= 1e-5 and torch.equal(first[3], argmax)
        assert abs(first[0].item() - total.item()) <= 1e-6 * abs(total.item())
        assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(total_kept, (z, w)),
                                                     torch.autograd.grad(total, (z, w), retain_graph=True)))
        if autocast_works(torch.bfloat16):              # low-precision logits are copied out, the pass stays fp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = core.linear_lse_loss(z, w, index, a, b_, chunk=8, keep_logits=True)
            assert low[4].dtype == torch.bfloat16 and max_diff(low[4].float(), logits) <= 0.1
            assert abs(low[0].item() - total.item()) <= 0.05 * abs(total.item())
        want = (a * logits.logsumexp(-1) - (a if b_ is None else b_) * logits.gather(1, index[:, None])[:, 0]).sum()
        assert abs(total.item() - want.item()) < 1e-4 * abs(want.item())
        assert torch.allclose(lse, logits.logsumexp(-1), atol=1e-5) and torch.equal(argmax, logits.argmax(-1))
        got, ref = torch.autograd.grad(3 * total, (z, w)), torch.autograd.grad(3 * want, (z, w))
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got, ref))
    # pull: minus sum pull . S with S = sg(softmax) W, the softmax's gradient stopped and W's kept; S handed back
    pull = torch.randn(N, D, generator=g, requires_grad=True)
    total, lse, pick, argmax, S = core.linear_lse_loss(z, w, index, a, b, chunk=8, pull=pull)
    logits = z @ w.t()
    expected = logits.softmax(-1).detach() @ w
    want = (a * logits.logsumexp(-1) - b * logits.gather(1, index[:, None])[:, 0]).sum() - (pull * expected).sum()
    assert abs(total.item() - want.item()) < 1e-4 * abs(want.item()) and max_diff(S, expected) < 1e-5
    got, ref = torch.autograd.grad(2 * total, (z, w, pull)), torch.autograd.grad(2 * want, (z, w, pull))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got, ref))
    # without autograd (eval, FLOP counting) it runs the forward matmul only
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        core.linear_lse_loss(z, w, index, a)
    assert counter.get_total_flops() == 2 * N * D * V


@pytest.mark.parametrize("name,size", [("v8_2", TINY), ("chaoslogic", CHAOS)])
def test_sampled_horizon_of_v8_2_and_chaoslogic_is_unbiased_at_one_heads_cost(name, size):
    """Training scores offsets >= 2 at about one head's rows in all (horizon_sample=1), an unbiased estimate of
    the loss over every row (horizon_sample = horizon - 1). ChaosLogic's training forward also draws its Gumbel
    patterns, so both sides are means over many draws."""
    x = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    means = []
    for share in (1.0, 4.0):
        model = tiny(name, size=size, max_seq_len=12, horizon=5, horizon_sample=share).train()
        with torch.no_grad():
            means.append(_sampled_mean(lambda: model(x[:, :-1], targets=x[:, 1:]).aux["horizon"], 120))
    (sampled, se_s), (full, se_f) = means
    assert abs(sampled - full) < 4 * (se_s ** 2 + se_f ** 2) ** 0.5 + 1e-6, (sampled, full, se_s, se_f)
    rows = tiny(name, size=size, max_seq_len=12, horizon=5).config.horizon_sample
    assert rows == 1.0                                              # the default: one head's worth of rows


def test_sampled_hierarchical_predictive_loss_is_unbiased_for_its_ce_and_its_kl():
    g = torch.Generator().manual_seed(3)
    B, T, V, D, H = 2, 10, 13, 6, 4
    unembed = torch.randn(V, D, generator=g)
    zs = torch.randn(B, T, H - 1, D, generator=g)
    h = torch.randn(B, T, D, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    full = model_v6.hierarchical_predictive_loss(h, unembed, targets, zs)[1]
    for part in ("horizon", "consistency"):
        mean, se = _sampled_mean(
            lambda: model_v6.hierarchical_predictive_loss(h, unembed, targets, zs, sample=True)[1][part], 1200)
        assert abs(mean - full[part].item()) < 4 * se + 1e-6, (part, mean, full[part].item(), se)


@pytest.mark.parametrize("name", ["v3", "v4_1", "v6", "v7_1_2"])
def test_horizon_sampling_is_on_in_training_and_off_in_eval(name):
    """Training reads offsets at a random share of positions (two calls differ); eval reads all (calls agree)."""
    model = tiny(name, "token")
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["max_seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()
        assert model(x[:, :-1], targets=x[:, 1:]).aux["horizon"] != model(x[:, :-1], targets=x[:, 1:]).aux["horizon"]
        model.eval()
        assert model(x[:, :-1], targets=x[:, 1:]).aux["horizon"] == model(x[:, :-1], targets=x[:, 1:]).aux["horizon"]


def test_hierarchical_predictive_loss_matches_its_formula_and_ignores_pads():
    torch.manual_seed(0)
    B, T, V, D, H = 2, 9, 11, 6, 4
    unembed = torch.randn(V, D, requires_grad=True)
    zs = torch.randn(B, T, H - 1, D, requires_grad=True)
    h = torch.randn(B, T, D, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[1, 6:] = -1                                    # right padding of row 1
    def loss_fn(h, targets, zs, unembed):
        return model_v6.hierarchical_predictive_loss(h, unembed, targets, zs, beta=0.3, gamma=0.8, consistency=0.1)
    loss, aux, logits = loss_fn(h, targets, zs, unembed)
    assert set(aux) == {"lm", "horizon", "consistency"}
    assert max_diff(logits, h @ unembed.T) <= 1e-6 and not logits.requires_grad    # handed back, no graph
    hand = _hpl_hand(h, targets, zs, unembed, 0.3, 0.8, 0.1)
    assert abs(loss.item() - hand.item()) < 1e-5
    # the parts: aux["lm"] is the main CE, and the total is their weighted sum
    lams = 0.3 * 0.8 ** torch.arange(H - 1)
    ce = F.cross_entropy((h @ unembed.T).reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    assert abs(aux["lm"].item() - ce.item()) < 1e-5
    parts = (aux["lm"] + lams.sum() * aux["horizon"]) / (1 + lams.sum()) + 0.1 * aux["consistency"]
    assert abs(parts.item() - hand.item()) < 1e-5
    # same gradients as the formula, for the hidden states, the offsets and the unembedding (one fused pass over
    # V for the main head), the KL's stop-grad respected
    want = torch.autograd.grad(hand, (h, zs, unembed), retain_graph=True)
    got = torch.autograd.grad(loss, (h, zs, unembed), retain_graph=True)
    assert all(max_diff(g, w) < 1e-5 for g, w in zip(got, want))
    # the fused main pass gives the same total and gradients whatever its row chunk
    a, zsum = torch.rand(B * T), torch.randn(B * T, D, requires_grad=True)
    fused = [core.linear_lse_loss(h.reshape(-1, D), unembed, targets.reshape(-1).clamp_min(0), a, chunk=chunk,
                                  pull=zsum)[0] for chunk in (None, 5)]
    grads = [torch.autograd.grad(f, (h, unembed, zsum)) for f in fused]
    assert abs(fused[0].item() - fused[1].item()) < 1e-5
    assert all(max_diff(g, w) < 1e-5 for g, w in zip(*grads))
    loss.backward()
    assert h.grad[1, 6:].abs().max() == 0                  # pads: no loss, no gradient (the main head is detached
    assert zs.grad[1, 5:].abs().max() == 0                 # in the consistency term; offsets >= 2 from t=5 on)
    # the loss of row 1 alone equals that of its unpadded prefix
    one = loss_fn(h[1:, :6], targets[1:, :6], zs[1:, :6], unembed)[0]
    padded = loss_fn(h[1:], targets[1:], zs[1:], unembed)[0]
    assert abs(one.item() - padded.item()) < 1e-5


def test_recursive_horizon_starts_as_the_main_head_and_mixes_with_weights_in_the_unit_interval():
    model = tiny("v7_1_2", "token")
    h = torch.randn(2, 5, 32)
    assert torch.equal(model.horizon(h), h[:, :, None].expand(2, 5, model.config.horizon - 1, 32))
    fit(model, 3, uniform(96))
    a = torch.sigmoid(model.horizon.mix)
    assert ((a >= 0) & (a <= 1)).all() and model.horizon.carry.weight.grad is not None


@pytest.mark.parametrize("name", CHUNKED)
def test_every_horizon_offset_learns_a_deterministic_stream(name):
    model = fit(tiny(name, "token", horizon=4), 200, counting(96), lr=5e-3)
    x = counting(96)(torch.Generator().manual_seed(8), 4, 48)
    out = model(x)
    for j in range(3):
        k = j + 2
        pred = (out.horizon_hidden[:, :48 - k, j] @ model.wte.weight.T).argmax(-1)
        assert (pred == x[:, k:]).float().mean().item() >= 0.99, k


def test_exit_heads_of_the_adaptive_bottom_receive_gradients_and_threshold_above_one_is_dense():
    model = tiny("v7_1_2", "token", n_layers=3, n_bottom_layers=2).train()
    x = torch.randint(0, 96, (2, 20))
    model(x, targets=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.exit_heads.parameters()
               if p.dim() > 1)
    model.eval()
    assert (model(x).exit_depth == 2).all()   # default threshold 2.0 until calibrated: nothing exits
    dense = core.build_model("v7_1_2", mode="token", exit_threshold=1.5, **{**TINY, "n_layers": 3})
    dense.load_state_dict(model.state_dict())
    assert (dense.eval()(x).exit_depth == 2).all()


def test_sample_py_injects_context_on_a_v6_checkpoint_and_rejects_bad_anchors(tmp_path):
    model = core.build_model("v6", mode="chunk", d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    config = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)}
    core.save_checkpoint(str(tmp_path / "ckpt.pt"), {"model_name": "v6", "model_config": config,
                                                     "model": model.state_dict(), "iter_num": 0})
    (tmp_path / "doc.txt").write_text("def main():\n    return 0\n")
    doc = tmp_path / "doc.txt"

    def sample(*args):
        return subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path}", "--max_new_tokens=12",
                               "--temperature=0", *args], cwd=HERE, capture_output=True, text=True, timeout=120)

    ok = sample(f"--inject={doc}@2,{doc}@4", "--speculative")
    assert ok.returncode == 0, ok.stderr
    assert "injecting 2 block(s)" in ok.stderr and "speed-up" in ok.stderr and "acceptance per draft" in ok.stderr
    bad = sample(f"--inject={doc}@3")
    assert bad.returncode != 0 and "not a spine position" in bad.stderr
    far = sample(f"--inject={doc}@8")
    assert far.returncode != 0 and "out of range" in far.stderr


# -----------------------------------------------------------------------------
# v8.2 Crystalline: one test per property of each part, then the whole model


def randomize(module, std=0.3, seed=0):
    """Give zero-initialised layers random values, so identity-at-init does not make a property trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def hebbian_inputs(B=2, H=3, T=37, Fd=4, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    phi_q = F.elu(torch.randn(B, H, T, Fd, generator=g, dtype=dtype)) + 1
    phi_k = F.elu(torch.randn(B, H, T, Fd, generator=g, dtype=dtype)) + 1
    v = torch.randn(B, H, T, Fd, generator=g, dtype=dtype) * scale
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    log_decay = torch.log(torch.tensor([0.5, 0.9, 0.999], dtype=dtype)[:H])
    return phi_q, phi_k, v, beta, log_decay


# -----------------------------------------------------------------------------
# Diamond coupling: inverse(forward(u)) = u; log det J = 0; identity at init

def test_diamond_coupling_inverse_recovers_the_input():
    mixer = randomize(model_v8_2.DiamondCoupling(64))
    u = torch.randn(3, 10, 64)
    y = mixer(u)
    assert (y - u).abs().max().item() > 1e-2          # the couplings really act
    assert (mixer.inverse(y) - u).abs().max().item() <= 1e-4


def test_diamond_coupling_has_zero_log_det_jacobian():
    mixer = randomize(model_v8_2.DiamondCoupling(8)).double()
    u = torch.randn(8, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(mixer, u)
    sign, logdet = torch.linalg.slogdet(J)
    assert sign.item() == 1.0 and abs(logdet.item()) < 1e-4
    assert (J - torch.eye(8, dtype=torch.float64)).abs().max().item() > 1e-2   # not trivially the identity


def test_diamond_coupling_is_the_identity_at_initialisation():
    mixer = model_v8_2.DiamondCoupling(32)
    u = torch.randn(2, 5, 32)
    assert (mixer(u) - u).abs().max().item() <= 1e-6


# -----------------------------------------------------------------------------
# Hebbian fast weights

@pytest.mark.parametrize("T,chunk", [(32, 8), (37, 8), (5, 8), (37, 64)])
def test_hebbian_chunked_parallel_form_equals_the_recurrence_in_fp64(T, chunk):
    phi_q, phi_k, v, beta, log_decay = hebbian_inputs(T=T)
    g = torch.Generator().manual_seed(1)
    state = (torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64),
             torch.rand(2, 3, 4, generator=g, dtype=torch.float64))
    for init in (None, state):
        o_ref, (M_ref, z_ref) = model_v8_2.fast_weight_recurrent(phi_q, phi_k, v, beta, log_decay, init)
        o, (M, z) = model_v8_2.fast_weight_scan(phi_q, phi_k, v, beta, log_decay, init, chunk)
        assert (o - o_ref).abs().max().item() <= 1e-12
        assert (M - M_ref).abs().max().item() <= 1e-12 and (z - z_ref).abs().max().item() <= 1e-12


def test_hebbian_carried_state_over_arbitrary_pieces_equals_the_full_forward():
    torch.manual_seed(0)
    layer = randomize(model_v8_2.HebbianFastWeights(24, 3, chunk=8), std=0.1).eval()
    x = torch.randn(2, 45, 24)
    full = layer(x)
    cache = model_v8_2.HebbianCache(2, 3, 64, 8, "cpu")
    pieces, start = [], 0
    for size in (7, 1, 1, 13, 2, 1, 20):          # prefill, single steps, chunks crossing chunk boundaries
        pieces.append(layer(x[:, start:start + size], cache, start))
        start += size
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5
    assert (full - x).abs().max().item() > 1e-3


def test_hebbian_rollback_by_truncate_then_redecode_is_exact():
    torch.manual_seed(0)
    layer = randomize(model_v8_2.HebbianFastWeights(24, 3, chunk=8), std=0.1).eval()
    x = torch.randn(1, 40, 24)
    full = layer(x)
    cache = model_v8_2.HebbianCache(1, 3, 64, 8, "cpu")
    layer(x[:, :20], cache, 0)
    layer(x[:, 20:25] + 1.0, cache, 20)            # rejected drafts: checkpoint moves to 20
    cache.truncate(21)                             # keep one of them, as speculative decoding does
    again = [layer(x[:, 20:21], cache, 20)]        # rewrite position 20 with the real token
    layer(torch.randn(1, 6, 24), cache, 21)        # more rejected drafts...
    cache.truncate(12)                             # ... and a rollback below the checkpoint
    assert cache.checkpoint_pos == 0 and cache.length == 12
    redo = layer(x[:, 12:], cache, 12)
    assert (again[0] - full[:, 20:21]).abs().max().item() <= 1e-5
    assert (redo - full[:, 12:]).abs().max().item() <= 1e-5


def test_hebbian_readout_never_exceeds_the_largest_value_written():
    phi_q, phi_k, v, beta, log_decay = hebbian_inputs(T=300, scale=100.0, dtype=torch.float32)
    o, _ = model_v8_2.fast_weight_scan(phi_q, phi_k, v, beta, log_decay, None, 64)
    assert o.abs().max().item() <= v.abs().max().item()


def test_hebbian_perturbing_token_t_leaves_outputs_before_t_bit_identical():
    torch.manual_seed(0)
    layer = randomize(model_v8_2.HebbianFastWeights(24, 3, chunk=8), std=0.1).eval()
    x = torch.randn(2, 40, 24)
    ref = layer(x)
    for t in (0, 7, 8, 21, 39):
        y = x.clone()
        y[:, t] += 3.0
        out = layer(y)
        assert torch.equal(out[:, :t], ref[:, :t])
        assert (out[:, t] - ref[:, t]).abs().max().item() > 0


def test_cache_bytes_count_the_hebbian_log_and_state():
    model = tiny("v8_2")
    cache = model.new_cache(1)
    kv_only = core.Cache.nbytes(cache)
    heb = sum(h.phi_k.nbytes + h.v.nbytes + h.beta.nbytes + h.M.nbytes + h.z.nbytes for h in cache.hebbian)
    assert heb > 0 and cache.nbytes() == kv_only + heb


# -----------------------------------------------------------------------------
# Poincare embedding and distance head

NORMS = torch.logspace(-12, 4, 33)


def test_poincare_points_stay_strictly_inside_the_ball_for_norms_1e_minus_12_to_1e4():
    for c in (1.0, 0.5, 2.0):
        e = F.normalize(torch.randn(33, 16), dim=-1) * NORMS[:, None]
        p = model_v8_2.exp0(e, c)
        assert torch.isfinite(p).all()
        assert (math.sqrt(c) * p.norm(dim=-1) < 1).all()


def test_poincare_log_of_exp_is_the_identity_inside_radius_3():
    e = F.normalize(torch.randn(2000, 32), dim=-1) * torch.linspace(1e-6, 5, 2000)[:, None]
    for c in (1.0, 2.0):
        back = model_v8_2.log0(model_v8_2.exp0(e, c), c)
        rel = (back - e).norm(dim=-1) / e.norm(dim=-1)
        r = math.sqrt(c) * e.norm(dim=-1)
        assert rel[r < 3].max().item() < 1e-5
        assert rel[r < 5].max().item() < 1e-3


def test_poincare_maps_have_finite_gradients_at_zero_and_at_1e4():
    for norm in (0.0, 1e-12, 1e4):
        e = (F.normalize(torch.randn(4, 16), dim=-1) * norm).requires_grad_()
        x = model_v8_2.log0(model_v8_2.exp0(e))
        (x * torch.randn_like(x)).sum().backward()
        assert torch.isfinite(x).all() and torch.isfinite(e.grad).all()


def test_asinh_sqrt_is_as_accurate_as_torch_asinh_from_the_floor_to_far_past_the_heads_range():
    """The distance head's asinh(sqrt(q/2)) (and its P = sqrt(h (1 + h)), the derivative's) against float64 from
    the floor to 1e18. The head's q/2 never passes 1e10: two opposite points at the ball's cap, the farthest apart
    its points can be, give about that, and a finite distance."""
    q = torch.cat([torch.tensor([model_v8_2.HALF_Q_FLOOR, 1e-9, 1e-6, 1e-3, 1.0]), torch.logspace(-12, 18, 3001)])
    ref = q.double().sqrt().asinh()
    twice, P = model_v8_2.twice_asinh_sqrt_(q.clone(), torch.empty_like(q))
    for got in (model_v8_2.asinh_sqrt_(q.clone()), twice / 2):
        assert ((got.double() - ref).abs() / ref).max().item() <= 1e-6          # torch.asinh's own: ~2e-7
    assert ((P.double() - (q.double() * (1 + q.double())).sqrt()).abs() / P.double()).max().item() <= 1e-6
    e = torch.zeros(2, 8)
    e[0, 0], e[1, 0] = 1e4, -1e4                                                # both far past the cap
    rows = model_v8_2.ball_rows(model_v8_2.exp0(e[:1]), 1.0, model_v8_2.exp0_gap(e[:1]))
    half_q = rows @ model_v8_2.BallTable.apply(e[1:], 1.0).t()
    assert 1e9 < half_q.item() <= 1e10
    assert torch.isfinite(model_v8_2.asinh_sqrt_(half_q)).all()


def test_poincare_distance_is_zero_on_the_diagonal_and_symmetric():
    x = model_v8_2.exp0(torch.randn(20, 16) * 0.25)    # |e| ~ 1, like the head's points at init
    y = model_v8_2.exp0(torch.randn(20, 16) * 0.5)
    assert torch.equal(model_v8_2.poincare_distance(x, x), torch.zeros(20))
    assert torch.equal(model_v8_2.poincare_distance(x, y), model_v8_2.poincare_distance(y, x))
    assert (model_v8_2.poincare_distance(x, y) > 0).all()
    D = model_v8_2.poincare_distance_matrix(x, y)   # the head's matmul form agrees with the direct one
    assert (D - model_v8_2.poincare_distance(x[:, None], y[None])).abs().max().item() <= 1e-3
    Dxx = model_v8_2.poincare_distance_matrix(x, x)   # its floor of 1e-12 under the root keeps gradients finite
    assert (Dxx - Dxx.t()).abs().max().item() <= 1e-4 and Dxx.diagonal().abs().max().item() <= 1e-2
    boundary = model_v8_2.exp0(torch.randn(20, 16) * 100)   # the direct form stays exact at the boundary too
    assert torch.equal(model_v8_2.poincare_distance(boundary, boundary), torch.zeros(20))


def test_hyperbolic_head_is_a_causal_cached_trainable_path():
    model = tiny("v8_2", horizon=4)
    assert model.config.hyperbolic_head                                 # the default
    x = torch.randint(0, 96, (4, 49))
    init_loss = model.train()(x[:, :-1], targets=x[:, 1:]).loss.item()
    assert abs(init_loss - math.log(96)) < 0.5
    with single_thread():
        model = fit(model, 30, periodic(96), lr=1e-2, batch=4, seed=0, flush_denormal=True)
    assert model.hyper_log_inv_temp.grad is not None and model.hyper_bias.grad.abs().max() > 0
    idx = periodic(96)(torch.Generator().manual_seed(5), 2, 48)
    with torch.no_grad():
        full = model(idx)
        loss = F.cross_entropy(full.logits[:, 8:-1].reshape(-1, 96), idx[:, 9:].reshape(-1)).item()
        assert loss < 1.0, f"the distance head did not learn a periodic sequence (CE {loss:.2f})"
        cache = model.new_cache(2)
        pieces = [model(idx[:, :10], cache=cache).logits]
        for t in range(10, 48):
            pieces.append(model(idx[:, t:t + 1], cache=cache, start_pos=t).logits)
        assert (torch.cat(pieces, 1) - full.logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :7]
    assert torch.equal(model.generate(prompt, 20, temperature=0),
                       model.generate(prompt, 20, temperature=0, speculative=True))


def autocast_works(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_poincare_maps_stay_fp32_finite_and_accurate_under_autocast_for_norms_1e_minus_12_to_1e4(dtype):
    if not autocast_works(dtype):
        pytest.skip(f"this CPU build has no {dtype} autocast")
    e = F.normalize(torch.randn(33, 16, generator=torch.Generator().manual_seed(0)), dim=-1) * NORMS[:, None]
    for tangent in (e, e.to(dtype)):                    # fp32 tangents, and tangents already in the low precision
        exact = tangent.float()
        with torch.autocast("cpu", dtype=dtype):
            p = model_v8_2.exp0(tangent)
            back = model_v8_2.log0(p)
            gap = model_v8_2.exp0_gap(tangent)
            D = model_v8_2.poincare_distance_matrix(p, p[::4], gap_x=gap, gap_y=gap[::4])
        for x in (p, back, gap, D):
            assert x.dtype == torch.float32 and torch.isfinite(x).all()
        assert (p.norm(dim=-1) < 1).all()
        # the same numbers as without autocast, from the same (upcast) input
        assert torch.equal(p, model_v8_2.exp0(exact)) and torch.equal(back, model_v8_2.log0(model_v8_2.exp0(exact)))
        assert torch.equal(D, model_v8_2.poincare_distance_matrix(model_v8_2.exp0(exact), model_v8_2.exp0(exact)[::4],
                                                                  gap_x=gap, gap_y=gap[::4]))
        r = exact.norm(dim=-1)
        inside = (r > 0) & (r < 3)                          # fp16 rounds the smallest tangents to 0 (mapped to 0)
        rel = (back - exact).norm(dim=-1)[inside] / r[inside]
        assert rel.max().item() < 1e-5                      # log0(exp0(e)) = e inside radius 3, as in fp32
        assert torch.equal(p[r == 0], torch.zeros_like(p[r == 0]))
        # d(p, p) ~ 0 inside radius 3; nearer the boundary the matmul form's cancellation grows like 1/(1 - |p|^2)^2
        # in fp32 with or without autocast (the direct form poincare_distance stays exact there)
        self_distance = D[torch.arange(0, 33, 4), torch.arange(9)]
        assert self_distance[r[::4] < 3].max().item() <= 1e-2 and (D >= 0).all()
    # the whole model: embedding rows of norm 1e-12 .. 1e4, low-precision trunk, fp32 maps and distance head
    model = tiny("v8_2", horizon=4)
    with torch.no_grad():
        model.wte.weight[:33] = F.normalize(model.wte.weight[:33], dim=-1) * NORMS[:, None]
    idx = torch.arange(33).repeat(2, 1)
    ref = model(idx)
    with torch.autocast("cpu", dtype=dtype):
        out = model(idx)
        same_states = model.readout(ref.hidden)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.acceptance).all() and torch.isfinite(out.horizon_hidden.float()).all()
    assert max_diff(same_states, ref.logits) <= 1e-6    # the head is fp32 whatever autocast says
    assert max_diff(out.logits, ref.logits) <= 0.5      # only the low-precision trunk moves the logits


@torch.no_grad()
def test_default_model_scores_by_ball_distance_not_by_the_flat_distance_of_the_same_weights(v8_drafter):
    """The ball is not the identity: the same weights scored by the flat (curvature -> 0) distance give other
    next-token distributions, at init and more so after training, where taking the ball out costs held-out loss."""
    def kl_and_ce(model, idx):
        out = model(idx)
        ball = out.logits[:, :-1].log_softmax(-1)
        flat = model.readout(out.hidden, flat=True)[:, :-1].log_softmax(-1)
        kl = (ball.exp() * (ball - flat)).sum(-1).mean().item()
        ce = [F.nll_loss(x.flatten(0, 1), idx[:, 1:].flatten()).item() for x in (ball, flat)]
        return kl, ce
    V = v8_drafter.config.vocab_size
    untrained = tiny("v8_2", **DRAFT_TINY)
    assert untrained.config.hyperbolic_head
    idx = cyclic(V)(torch.Generator().manual_seed(99), 32, DRAFT_TINY["max_seq_len"])
    kl0, _ = kl_and_ce(untrained, idx)
    kl, (ce_ball, ce_flat) = kl_and_ce(v8_drafter, idx)
    print(f"\nKL(ball || flat) per position: {kl0:.4f} at init, {kl:.3f} after training; held-out CE "
          f"{ce_ball:.3f} with the ball, {ce_flat:.3f} with the same weights scored flat")
    assert kl0 >= 0.005 and kl >= 0.05
    assert ce_flat - ce_ball >= 0.05


# -----------------------------------------------------------------------------
# Hyper-Lattice

def test_lattice_grouped_gemm_equals_the_dense_reference_in_values_and_gradients():
    torch.manual_seed(0)
    lattice = model_v8_2.TopKPathLattice(32, 12, 3)
    h = torch.randn(50, 32, requires_grad=True)
    _, paths, probs = lattice.route(h)
    grouped = lattice.mix(h, paths, probs)
    dense = lattice.dense_mix(h, paths, probs)
    assert (grouped - dense).abs().max().item() <= 1e-5
    w = torch.randn_like(grouped)
    g_grouped = torch.autograd.grad((grouped * w).sum(), (h, lattice.path_weight), retain_graph=True)
    g_dense = torch.autograd.grad((dense * w).sum(), (h, lattice.path_weight))
    for a, b in zip(g_grouped, g_dense):
        assert (a - b).abs().max().item() <= 1e-5


def test_lattice_activation_memory_at_512_tokens_and_d_768_is_under_100_MB():
    torch.manual_seed(0)
    lattice = model_v8_2.TopKPathLattice(768, 48, 4)
    params = {p.data_ptr() for p in lattice.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, 512, 768, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, balance, z = lattice(x)
        (y.sum() + balance + z).backward()
    total = sum(saved.values())
    per_token_matrices = 512 * 4 * 768 * 768 * 4                  # the original's [S, 4, d, d] gather
    assert total < 100 * 2 ** 20, f"{total / 2 ** 20:.1f} MB saved for backward"
    assert total < per_token_matrices / 100
    assert lattice.path_weight.grad.abs().max() > 0


def test_lattice_auxiliary_losses_are_in_the_objective():
    model = tiny("v8_2").train()
    x = torch.randint(0, 96, (2, 49))
    out = model(x[:, :-1], targets=x[:, 1:])
    assert {"balance", "router_z", "uncertainty", "horizon", "lm"} <= set(out.aux)
    assert out.aux["balance"].item() >= 1.0 - 1e-4            # P sum f_j Pbar_j is >= 1 ... at balance exactly 1
    grad = torch.autograd.grad(out.aux["balance"] + out.aux["router_z"], model.lattice.router.weight)[0]
    assert grad.abs().max() > 0


# -----------------------------------------------------------------------------
# feedback loop

def test_feedback_has_zero_jacobian_across_positions():
    torch.manual_seed(0)
    loop = randomize(model_v8_2.FeedbackLoop(16, 2), std=0.2)
    x = torch.randn(1, 6, 16)
    J = torch.autograd.functional.jacobian(loop, x)[0, :, :, 0]      # (T, D, T, D)
    for t in range(6):
        for s in range(6):
            block = J[t, :, s]
            assert (block.abs().max().item() == 0) == (s != t)


def test_feedback_is_the_identity_at_initialisation():
    loop = model_v8_2.FeedbackLoop(16, 2)
    x = torch.randn(2, 5, 16)
    assert torch.equal(loop(x), x)


# -----------------------------------------------------------------------------
# horizon head, uncertainty and drafts



@pytest.fixture(scope="module")
def noisy():
    """A tiny model after a few steps on random tokens, so zero-initialised branches are active."""
    return fit(tiny("v8_2"), 5, uniform(96), lr=1e-2, seed=0, flush_denormal=True)


@pytest.fixture(scope="module")
def rhythmic():
    """A tiny model trained on periodic sequences: its horizon offsets become accurate and confident."""
    with single_thread():
        return fit(tiny("v8_2", horizon=8), 80, periodic(96), lr=1e-2, batch=4, seed=0, flush_denormal=True)


@torch.no_grad()
def test_perturbing_token_t_plus_k_leaves_every_output_at_t_unchanged(noisy):
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = noisy(idx)
    for t in (0, 9, 23, 40):
        for k in (1, 2, 15):
            if t + k >= 48:
                continue
            other = idx.clone()
            other[:, t + k] = (other[:, t + k] + 5) % 96
            out = noisy(other)
            for field in ("logits", "horizon_hidden", "uncertainty", "acceptance"):
                # bitwise: the lattice's zero sentinel rows keep every grouped-GEMM group on one kernel
                assert torch.equal(getattr(out, field)[:, :t + 1], getattr(ref, field)[:, :t + 1]), (t, k, field)


def pairs(V):
    """Even positions: a random token from the first half; odd positions: that token + V/2. Offset 1 from an
    even position is certain, every other (position, offset) is a coin flip over V/2 tokens."""
    def data(g, B, T):
        first = torch.randint(0, V // 2, (B, (T + 1) // 2), generator=g)
        return torch.stack([first, first + V // 2], -1).view(B, -1)[:, :T]
    return data


def spearman(a, b):
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


@pytest.mark.parametrize("hyperbolic", [True, False])
def test_v8_2_chunked_readout_loss_equals_the_readouts_cross_entropy_in_value_gradient_and_argmax(hyperbolic):
    """readout_lse (the horizon loss's chunked pass: BallLogSumExp for the distance head) is the a-weighted CE of
    readout's logits, with the same gradients for the states and every parameter."""
    model = tiny("v8_2", hyperbolic_head=hyperbolic, max_seq_len=16, horizon=4)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(11, TINY["d_model"], generator=g, requires_grad=True)
    index, a = torch.randint(0, TINY["vocab_size"], (11,), generator=g), torch.rand(11, generator=g)
    total, _, _, argmax = model.readout_lse(z, index, a)
    logits = model.readout(z)
    want = (a * F.cross_entropy(logits, index, reduction="none")).sum()
    assert abs(total.item() - want.item()) < 1e-4 and torch.equal(argmax, logits.argmax(-1))
    # the logits the main head hands back: its rows come first in a pass shared with the offsets' rows
    with_kept = model.readout_lse(z, index, a, keep=5)
    assert max_diff(with_kept[4], logits[:5]) <= 1e-5 and not with_kept[4].requires_grad
    assert abs(with_kept[0].item() - total.item()) <= 1e-5 and torch.equal(with_kept[3], argmax)
    assert torch.equal(model.readout_lse(z, index, a, keep=11)[3], argmax)
    params = [z] + list(model.parameters())
    got, ref = (torch.autograd.grad(t, params, allow_unused=True) for t in (total, want))
    for x, y in zip(got, ref):
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5)), (x, y)


def test_ball_table_equals_exp0_then_ball_cols_in_value_and_gradient_for_norms_0_to_1e4():
    """BallTable, the head's fused map of the whole table into the ball, is ball_cols(exp0(W), c, exp0_gap(W)):
    same columns (zero-padded to a multiple of 8 wide) and the same gradient, against the composed maps in float64,
    from the zero vector through the tanh's cap to 1e4, at two curvatures."""
    g = torch.Generator().manual_seed(0)
    norms = torch.cat([torch.tensor([0.0, 1e-12, 1e-6, 1e-3, 0.1, 1.0, 3.0, 6.0, 6.2, 10.0, 1e4]),
                       torch.rand(64, generator=g) * 8])
    for c, D in ((1.0, 16), (0.5, 13)):
        w = (F.normalize(torch.randn(len(norms), D, generator=g), dim=-1) * norms[:, None]).requires_grad_()
        grad = torch.randn(len(norms), model_v8_2.ball_width(D), generator=g)
        got = model_v8_2.BallTable.apply(w, c)
        got_grad, = torch.autograd.grad(got, w, grad)
        w64 = w.detach().double().requires_grad_()
        want = model_v8_2.ball_cols(model_v8_2.exp0(w64, c), c, model_v8_2.exp0_gap(w64, c))
        want_grad, = torch.autograd.grad(want, w64, grad.double())
        assert got.shape == want.shape and got.size(1) % 8 == 0 and (got[:, D + 2:] == 0).all()
        scale = want.abs().amax(-1, keepdim=True)
        assert ((got.double() - want).abs() / scale).max().item() <= 1e-5
        scale = want_grad.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        assert ((got_grad.double() - want_grad).abs() / scale).max().item() <= 1e-5


def test_chunk_spans_cover_the_rows_in_order_in_even_spans_that_never_straddle_the_kept_rows():
    for n, chunk, keep in ((1037, 160, 512), (1037, 664, 512), (525, 512, 0), (11, 4, 6), (20, 7, 3), (5, 16, 5)):
        spans = core.chunk_spans(n, chunk, keep)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(0 < hi - lo <= chunk and not lo < keep < hi for lo, hi in spans)
    assert core.chunk_spans(525, 512) == [(0, 264), (264, 525)]      # not 512 + a 13-row remainder
    assert core.chunk_spans(0, 4) == []


def test_row_max_is_max_with_the_first_index_on_ties():
    g = torch.Generator().manual_seed(0)
    for V in (128, 100):                                # blocked (a multiple of 64), and torch.max's fallback
        x = torch.randint(0, 5, (7, V), generator=g).float()  # many ties
        x[0] = 3.0                                            # a row that is all one value
        x[1, [5, 70 % V, V - 1]] = 9.0                        # the first of three maxima, in different blocks
        top, index = core.row_max(x)
        assert torch.equal(top, x.max(-1).values) and torch.equal(index, x.argmax(-1))
        assert index[0] == 0 and index[1] == 5


@pytest.mark.parametrize("block", [None, 3])
def test_ball_chunked_pass_matches_the_readout_over_chunks_at_coincident_points_and_the_floor(block):
    """BallLogSumExp over chunks of 4 rows (split at the 6 kept rows' end: 0-3, 4-5, 6-9, 10), their element-wise
    work in one block per chunk or in blocks of 3 rows (0-2, 3; 4-5; ...), gives BallLogits' a-
    and b-weighted loss, lse, pick and argmax, and the same gradients for the rows, the table, the bias and the
    scale. Row 4 is exactly token 5's point (distance ~0 up to the product's rounding); row 3 is zero, so its every
    product is 0, under the floor: distances 0, logits = bias, no gradient from that row. Every gradient is
    finite."""
    g = torch.Generator().manual_seed(0)
    N, D, V, c = 11, 16, 37, 1.0
    tangent = torch.randn(N, D, generator=g) * 0.5
    table = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    tangent[4] = table.detach()[5]
    rows = model_v8_2.ball_rows(model_v8_2.exp0(tangent, c), c, model_v8_2.exp0_gap(tangent, c))
    rows[3] = 0.0
    rows.requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    k = torch.tensor(1.7, requires_grad=True)
    index = torch.randint(0, V, (N,), generator=g)
    index[4] = 5
    a, b = torch.rand(N, generator=g), torch.rand(N, generator=g)
    cols = model_v8_2.BallTable.apply(table, c)
    total, lse, pick, argmax, kept = model_v8_2.BallLogSumExp.apply(rows, cols, bias, k, index, a, b, 4, True, 6, block)
    logits = model_v8_2.BallLogits.apply(rows @ cols.t(), bias, k)
    want = (a * logits.logsumexp(-1) - b * logits.gather(1, index[:, None])[:, 0]).sum()
    assert abs(total.item() - want.item()) <= 1e-5 * abs(want.item())
    off_cusp = torch.ones_like(kept, dtype=torch.bool)
    off_cusp[4, 5] = False                              # sqrt magnifies the product's rounding at the cusp
    assert max_diff(kept[off_cusp], logits[:6][off_cusp]) <= 1e-5 and max_diff(kept[4, 5], logits[4, 5]) <= 1e-3
    other = torch.arange(N) != 4
    assert max_diff(lse[other], logits.logsumexp(-1)[other]) <= 1e-5 and max_diff(lse, logits.logsumexp(-1)) <= 1e-3
    assert torch.equal(argmax, logits.argmax(-1)) and torch.equal(pick[:6], kept.gather(1, index[:6, None])[:, 0])
    assert torch.equal(kept[3], bias.detach()) and abs(kept[4, 5].item() - bias[5].item()) <= 1e-2
    params = (rows, table, bias, k)
    # at row 4's cusp d dist / dq = 1 / (2 sqrt(q)) magnifies the product's rounding (which differs between a
    # chunk and the whole matrix): its gradient is only required finite, the rest to equal the readout's
    assert all(torch.isfinite(x).all() for x in torch.autograd.grad(total, params, retain_graph=True))
    a[4] = b[4] = 0.0
    total = model_v8_2.BallLogSumExp.apply(rows, cols, bias, k, index, a, b, 4, True, 0, block)[0]
    want = (a * logits.logsumexp(-1) - b * logits.gather(1, index[:, None])[:, 0]).sum()
    got = torch.autograd.grad(2 * total, params, retain_graph=True)
    ref = torch.autograd.grad(2 * want, params)
    for x, y in zip(got, ref):
        assert max_diff(x, y) <= 1e-5 * y.abs().max().item() + 1e-7
    assert (got[0][3] == 0).all()
    total = model_v8_2.BallLogSumExp.apply(rows, cols.detach(), bias, k, index, a, b, 4, True, 0, block)[0]
    torch.autograd.grad(total, (rows, bias), retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):   # its gradients were scaled in place, once
        torch.autograd.grad(total, (rows, bias))


def test_predicted_uncertainty_correlates_with_the_realised_loss_on_held_out_data():
    model = fit(tiny("v8_2", horizon=4, max_seq_len=16), 60, pairs(64), lr=1e-2, batch=16, seed=0, flush_denormal=True)
    idx = pairs(64)(torch.Generator().manual_seed(9), 32, 17)
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        out = model(x)
        u, ce = [], []
        for k in range(1, 5):
            target = core.horizon_targets(y, k)
            z = out.hidden if k == 1 else out.horizon_hidden[:, :, k - 2]
            loss = model._offset_ce(z, target)
            valid = target >= 0
            u.append(out.uncertainty[..., k - 1][valid])
            ce.append(loss[valid])
    rho = spearman(torch.cat(u), torch.cat(ce))
    assert rho > 0.3, f"Spearman(u, CE) = {rho:.3f}"




@pytest.mark.parametrize("name,overrides", [("v8_2", dict(horizon=4, max_seq_len=24)),
                                            ("chaoslogic", dict(size=CHAOS, n_layers=2, max_seq_len=32))])
def test_training_step_compiles_with_fullgraph_and_matches_eager(name, overrides):
    """The models with custom ops (v8.2's grouped GEMM) and straight-through sampling (ChaosLogic's Gumbel
    selector): one compiled graph, the same loss and gradients as eager (the same random draws in both runs)."""
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny(name, **overrides).train()
    T = model.config.max_seq_len
    idx = torch.randint(0, 96, (2, T + 1), generator=torch.Generator().manual_seed(6))

    def loss_and_grads(fn):
        model.zero_grad()
        torch.manual_seed(7)
        loss = fn(idx[:, :-1], targets=idx[:, 1:]).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert abs(loss.item() - eager_loss.item()) <= 1e-5
    assert max(max_diff(a, b) for a, b in zip(grads, eager_grads)) <= 1e-5


def test_greedy_speculative_decoding_with_trained_horizon_heads_equals_greedy_and_accepts_drafts(rhythmic):
    model = rhythmic
    g = torch.Generator().manual_seed(4)
    stats = {}
    for prompt_len, draft_len in ((3, 2), (9, 4), (14, 7), (20, 12)):
        prompt = periodic(96)(g, 1, prompt_len)
        plain = model.generate(prompt, 25, temperature=0)
        speculative = model.generate(prompt, 25, temperature=0, speculative=True, draft_len=draft_len, stats=stats)
        assert torch.equal(plain, speculative), (prompt_len, draft_len)
    hist = stats["accepted_hist"]
    assert sum(hist[3:]) > 0, f"no pass accepted 3 or more drafts: {hist}"


def test_draw_samples_each_token_with_its_weight_and_never_a_zero_weight_token():
    """generate.draw (inverse-CDF sampling) against the exact law: a chi-square test on 6 weights with two zeros,
    unnormalised, for 2 rows at once; a zero-weight token is never drawn."""
    w = torch.tensor([[0.0, 3.0, 1.0, 0.0, 4.0, 2.0], [5.0, 0.0, 0.0, 1.0, 1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([generate.draw(w, g) for _ in range(6000)])                     # (6000, 2)
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=6).double()
        assert (counts[w[row] == 0] == 0).all(), counts
        keep = w[row] > 0
        expected = (w[row] / w[row].sum() * 6000).double()[keep]
        assert chi_square_pvalue(counts[keep].numpy(), expected.numpy()) > 0.001, counts


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_tail():
    """core.prompt_lookup_draft (a byte search over the ids) against the rule written as a plain loop, on short
    sequences over tiny vocabularies (many matches) whose ids span several bytes (a byte match that straddles two
    ids must not count)."""
    def rule(tokens, k, max_ngram=3):
        N = len(tokens)
        for n in range(min(max_ngram, N - 1), 0, -1):
            for start in range(N - n - 1, -1, -1):
                if tokens[start:start + n] == tokens[N - n:]:
                    return tokens[start + n:start + n + k]
        return []
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        N, V, k = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((1, 30), (1, 5), (1, 6)))
        scale = (1, 257, 65793, 50_000)[int(torch.randint(0, 4, (), generator=g))]
        seq = torch.randint(0, V, (1, N), generator=g) * scale
        drafts, q = core.prompt_lookup_draft(seq, k)
        assert drafts.tolist() == rule(seq[0].tolist(), k) and q is None, (seq, k)
    assert core.prompt_lookup_draft(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 2, 1]]), 2)[0].tolist() == [0, 0]


HEAD_READERS = [(n, m) for n, m in MODEL_MODES if n not in ("gpt", "v8_2")]   # drafts read in the head's product


@pytest.mark.parametrize("name,mode", HEAD_READERS, ids=[f"{n}-{m}" for n, m in HEAD_READERS])
@torch.no_grad()
def test_drafts_read_in_the_main_heads_product_equal_the_plain_forward_and_the_separate_read(name, mode, monkeypatch):
    """forward_reading_drafts (speculative decoding's pass) returns the plain forward's logits, and horizon
    logits equal to reading the offsets through the tied head afterwards (draft_logits on the plain output), on
    a prompt pass (drafts at the last position) and on a cached verification pass of 4 tokens (drafts at each),
    within 1e-5 (the same products over other row counts); the head is left in its normal state."""
    model = tiny(name, mode, **{"chunk_size": 4} if mode == "chunk" else {})
    assert model.reads_drafts_with_head
    seq = tokens((1, 23), 3, TINY["vocab_size"])
    for at, pieces in ((slice(-1, None), [(0, 19)]), (slice(None), [(0, 19), (19, 23)])):
        cache_a, cache_b = model.new_cache(1), model.new_cache(1)
        for lo, hi in pieces:
            plain = model(seq[:, lo:hi], cache=cache_a, start_pos=lo)
            read = model.forward_reading_drafts(seq[:, lo:hi], cache_b, lo, draft_at=at)
        assert max_diff(read.logits, plain.logits) <= 1e-5
        n, H1 = read.horizon_logits.shape[:2]
        assert n == (1 if at.start == -1 else hi - lo) and H1 == plain.horizon_hidden.size(2)
        for i in range(-n, 0):
            assert max_diff(model.draft_logits(read, i, H1), model.draft_logits(plain, i, H1)) <= 1e-5
    assert not model.lm_head.deferred and model(seq).logits.size(-1) == TINY["vocab_size"]
    # in speculative decoding, each model call passes over the unembedding once: no separate read for the drafts
    reads, linear_rows = [], core.linear_rows
    monkeypatch.setattr(core, "linear_rows", lambda x, w, b=None: reads.append(x.shape) or linear_rows(x, w, b))
    stats = {}
    model.generate(seq[:, :6], 30, temperature=0, speculative=True, stats=stats)
    rounds = collections.Counter(source for source, _ in stats["rounds"])
    assert rounds["heads"] >= 1 and len(reads) == stats["model_calls"], (rounds, reads)


def test_planner_weighs_drafts_by_their_measured_cost_and_drafts_nothing_when_they_cost_more_than_they_bring():
    """plan_drafts with RoundCosts: before any timing the prior 1 + cost k (+ read_cost for the heads) decides;
    rounds 2 and 3 draft nothing to time the base step; once drafting from the heads has been timed at 3x a
    plain step, drafts accepted half the time no longer pay (4 drafts bring at most 1.94 tokens for 3 steps), and
    untimed draft counts are scaled by the same measured / prior ratio; timed at 1.1 steps, drafting pays again."""
    model = tiny("v6", "token")
    seq = torch.randperm(90, generator=torch.Generator().manual_seed(1))[None, :20] + 1   # no repeats: no lookup
    with torch.no_grad():
        out = model(seq[:, :-1])
    read = generate.read_cost(model)
    assert model.reads_drafts_with_head and read == 0.0     # the drafts come in the verification's head product
    v8 = tiny("v8_2")                                       # reads its drafts through its own head: a second pass
    assert generate.read_cost(v8) == v8.wte.weight.numel() / sum(p.numel() for p in v8.parameters())
    read = generate.read_cost(v8)                           # a source with a read price, for the plans below
    sources = {"heads": generate.DraftSource(4), "lookup": generate.DraftSource(4)}
    for _ in range(generate.PROBES):                       # past the probes: the plan follows value alone
        sources["heads"].record([0.5] * 4, torch.ones(4) * 0.5)
    costs = generate.RoundCosts(4, 0.05, {"heads": read, "lookup": 0.0})
    plan = lambda: generate.plan_drafts(model, seq, 4, out, 18, sources, 0.05, round_costs=costs)
    want = core.best_draft_length([0.5] * 4, 0.05, read)
    assert want > 0 and plan()[:2] == ("heads", want)     # prior costs: drafting pays
    costs.record("heads", want, 0.001)                  # the first round pays one-off costs: not timed
    assert costs.untimed() and plan() == (None, 0, None)   # rounds 2 and 3 time a plain step
    costs.record(None, 0, 0.001)
    costs.record(None, 0, 0.001)
    assert not costs.untimed() and plan()[:2] == ("heads", want)   # heads not timed yet: still the prior
    costs.record("heads", want, 0.003)
    prior = core.draft_costs(4, 0.05, read)
    scaled = [1.0] + [3.0 if k == want else prior[k] * 3.0 / prior[want] for k in range(1, 5)]
    assert costs.costs("heads") == pytest.approx(scaled, rel=1e-12)  # untimed k: scaled
    assert plan() == (None, 0, None)                      # timed at 3 steps, and the rest scaled alike: none pays
    for k in range(1, 5):
        costs.record("heads", k, 0.0011)
    assert costs.costs("heads") == pytest.approx([1.0, 1.1, 1.1, 1.1, 1.1], rel=1e-12)
    source, k, _ = plan()
    assert source == "heads" and k > 0                    # cheap again: drafting pays


def test_best_draft_length_maximises_expected_tokens_per_verification_cost():
    best = core.best_draft_length
    assert best(torch.tensor([]), 0.05) == 0
    assert best(torch.ones(7), 0.05) == 7 and best(torch.full((7,), 0.01), 0.05) == 0
    # a = (0.9, 0.9, 0.05), cost 0.1: tokens 1, 1.9, 2.71, 2.7505 over costs 1, 1.1, 1.2, 1.3 -> k = 2
    assert best(torch.tensor([0.9, 0.9, 0.05]), 0.1) == 2
    # a draft pays iff its acceptance exceeds the cost of verifying it (one draft: (1 + a) / (1 + c) > 1)
    assert best(torch.tensor([0.2]), 0.1) == 1 and best(torch.tensor([0.05]), 0.1) == 0
    assert best(torch.tensor([0.3, 0.99]), 0.0) == 2 and best(torch.tensor([0.3, 0.99]), 1.0) == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):                                 # against the rule written out for every k
        a, c = torch.rand(7, generator=g).double(), torch.rand((), generator=g).item() / 4
        value = [(1 + sum(a[:j + 1].prod().item() for j in range(k))) / (1 + c * k) for k in range(8)]
        assert best(a, c) == max(range(8), key=lambda k: value[k])


@torch.no_grad()
def test_plumbing_draft_length_follows_the_acceptance_of_the_trained_heads_at_set_draft_costs(rhythmic):
    """Plumbing (draft_cost set by hand): the drafts are the heads' argmax, as many as best_draft_length picks
    from the acceptance of the last cached position; nothing is drafted when no draft pays (a prompt without
    repeats, so prompt lookup has nothing to offer either)."""
    model = rhythmic
    default = model.config.draft_cost
    seq = periodic(96)(torch.Generator().manual_seed(2), 1, 20)
    out = model(seq[:, :-1])
    accept = model.draft_acceptance(out)[0, -1, :7]
    assert torch.equal(accept, torch.sigmoid(model.acceptance_logits(out.uncertainty))[0, -1, 1:8])
    no_repeats = torch.randperm(96, generator=torch.Generator().manual_seed(3))[None, :20]
    try:
        for cost in (0.0, 0.05, 0.5, 10.0):
            model.config.draft_cost = cost
            n = core.best_draft_length(accept, cost)
            drafts, q = model.draft(no_repeats, 7, out, seq.size(1) - 2)
            want = model.readout(out.horizon_hidden[0, -1, :n]).argmax(-1) if n else drafts.new_empty(0)
            assert q is None and torch.equal(drafts, want), cost
    finally:
        model.config.draft_cost = default
    assert core.best_draft_length(accept, default) == 7, accept   # trained on a periodic sequence


def test_whole_model_prefill_then_chunks_then_single_steps_equals_the_full_forward():
    model = fit(tiny("v8_2", hebbian_chunk=8), 3, uniform(96), lr=1e-2, seed=0, flush_denormal=True)   # chunks of 8: every call crosses some
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(idx)
        for pieces in ((11, 7, 1, 1, 13, 1, 9, 5), (1, 1, 30, 16)):
            cache, start, logits, horizon = model.new_cache(2), 0, [], []
            for size in pieces:
                out = model(idx[:, start:start + size], cache=cache, start_pos=start)
                logits.append(out.logits)
                horizon.append(out.horizon_hidden)
                start += size
            assert (torch.cat(logits, 1) - full.logits).abs().max().item() <= 1e-5, pieces
            assert (torch.cat(horizon, 1) - full.horizon_hidden).abs().max().item() <= 1e-5, pieces


def test_every_horizon_offset_learns_a_periodic_sequence(rhythmic):
    idx = periodic(96)(torch.Generator().manual_seed(11), 8, 49)
    ces = rhythmic.offset_cross_entropies(idx[:, :-1], idx[:, 1:])
    assert ces.max().item() < 0.1, ces


@torch.no_grad()
def test_whole_model_perturbing_token_t_leaves_outputs_before_t_bit_identical(noisy):
    model = noisy
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(8))
    ref = model(idx)
    for t in range(1, 48, 2):
        other = idx.clone()
        other[:, t] = (other[:, t] + 1) % 96
        out = model(other)
        assert torch.equal(out.logits[:, :t], ref.logits[:, :t]), t


# -----------------------------------------------------------------------------
# drafts that get used (helpers shared with the ChaosLogic section)

DRAFT_TINY = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=2, max_seq_len=24, horizon=6)


def cyclic(V, jump=0.1, seed=11):
    """Windows that follow one fixed random order of all V tokens from a random start; each step jumps to a random
    token instead with probability `jump`, and the order goes on from there. Nothing repeats within V tokens
    unless it jumps, so prompt lookup finds little, while the k-th next token is the k-th successor with
    probability about (1 - jump)^k: learnable, with drafts that pass at different rates per offset."""
    order = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    successor = torch.empty(V, dtype=torch.long)
    successor[order] = order.roll(-1)

    def data(g, B, T):
        x = torch.empty(B, T, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (B,), generator=g)
        jumps = torch.rand(B, T, generator=g) < jump
        anywhere = torch.randint(0, V, (B, T), generator=g)
        for t in range(1, T):
            x[:, t] = torch.where(jumps[:, t], anywhere[:, t], successor[x[:, t - 1]])
        return x
    return data


def drafting_against_prompt_lookup(model, n_prompts=6, prompt_len=6, new=16):
    """Greedy speculative decoding from held-out prompts, once drafting as generation plans it and once by prompt
    lookup alone; both must return plain greedy's tokens. -> {"model": stats, "lookup": stats}, plus the number of
    drafts the heads proposed per round in stats["proposed"]."""
    V, k = model.config.vocab_size, model.config.horizon - 1
    prompts = cyclic(V)(torch.Generator().manual_seed(5), n_prompts, prompt_len)
    plain = [model.generate(prompts[b:b + 1], new, temperature=0) for b in range(n_prompts)]
    result = {}
    for name in ("model", "lookup"):
        stats = {}
        if name == "lookup":
            model.draft = lambda seq, n, *_: core.prompt_lookup_draft(seq, n)
        try:
            for b in range(n_prompts):
                speculative = model.generate(prompts[b:b + 1], new, temperature=0, speculative=True, draft_len=k,
                                      stats=stats)
                assert torch.equal(speculative, plain[b]), (name, b)
        finally:
            vars(model).pop("draft", None)                # back to planned drafting
        stats["tokens_per_call"] = stats["new_tokens"] / stats["model_calls"]
        result[name] = stats
    result["model"]["proposed"] = [n if source == "heads" else 0 for source, n in result["model"]["rounds"]]
    result["model"]["generations"] = n_prompts
    return result


@torch.no_grad()
def greedy_acceptance_on_held_out_windows(model, windows):
    """For every position t of held-out windows and offset k >= 2 with t + k - 1 inside the window: the model's
    acceptance probability of offset k's draft at t, and whether greedy verification accepts it there, i.e.
    whether offset k's argmax at t equals the main head's argmax at t + k - 1 (the window's tokens before it in
    the context). -> (confidence (n,), accepted (n,) bool, per-offset mean confidence and acceptance)."""
    out = model(windows)
    main = out.logits.argmax(-1)                                          # (B, T)
    readout = getattr(model, "readout", lambda z: F.linear(z, model.lm_head.weight))
    heads = readout(out.horizon_hidden).argmax(-1)                       # (B, T, H-1)
    accept = model.draft_acceptance(out)                                 # (B, T, H-1)
    conf, hit, per_offset = [], [], []
    for j in range(heads.size(-1)):
        greedy = core.horizon_targets(main, j + 2)                       # main argmax at t + k - 1
        valid = greedy >= 0
        conf.append(accept[..., j][valid])
        hit.append((heads[..., j] == greedy)[valid])
        per_offset.append((round(conf[-1].mean().item(), 3), round(hit[-1].float().mean().item(), 3)))
    return torch.cat(conf), torch.cat(hit), per_offset


def check_drafts_get_used(model, name):
    with single_thread():
        runs = drafting_against_prompt_lookup(model)
    mine, lookup = runs["model"], runs["lookup"]
    accepted = sum(n * c for n, c in enumerate(mine["accepted_hist"]))
    print(f"\n{name}: {mine['tokens_per_call']:.2f} tokens per model call drafting from the heads "
          f"({sum(mine['proposed'])} drafts proposed, {accepted} accepted; acceptance per draft "
          f"{[round(a, 2) for a in generate.acceptance_per_head(mine['accepted_hist'])]}) vs "
          f"{lookup['tokens_per_call']:.2f} by prompt lookup on the same prompts")
    # every round drafts from the heads but RoundCosts' two timing rounds per generation (they time a plain step)
    # and a generation's last round when it has one token left to make, with no room for a draft
    declined = sum(1 for n in mine["proposed"] if n == 0)
    assert declined <= 3 * mine["generations"], str(mine["rounds"])
    assert accepted >= 20, mine
    assert mine["tokens_per_call"] > lookup["tokens_per_call"] + 1.0


def check_acceptance_is_calibrated(model, name):
    ece_of = core.load_model_module("chaoslogic").expected_calibration_error
    windows = cyclic(model.config.vocab_size)(torch.Generator().manual_seed(99), 32, model.config.max_seq_len)
    conf, hit, per_offset = greedy_acceptance_on_held_out_windows(model, windows)
    ece = ece_of(conf, hit)
    print(f"\n{name}: ECE of the draft acceptance against greedy verification on held-out windows {ece:.3f} "
          f"over {conf.numel()} drafts; (mean acceptance, realised) per offset 2..: {per_offset}")
    assert ece < 0.15                                   # a constant confidence of 1 would score ~0.25 here
    assert 0.3 < hit.float().mean().item() < 0.95, "the test needs drafts that pass at different rates"


@pytest.fixture(scope="module")
def v8_drafter():
    """A tiny v8.2 after 300 AdamW steps on `cyclic` windows, nothing set by hand."""
    with single_thread():
        return fit(tiny("v8_2", **DRAFT_TINY), 300, cyclic(DRAFT_TINY["vocab_size"]), lr=1e-2, seed=0, flush_denormal=True)


def test_trained_v8_2_drafts_from_its_horizon_heads_and_beats_prompt_lookup(v8_drafter):
    check_drafts_get_used(v8_drafter, "v8.2")


def test_v8_2_draft_acceptance_is_calibrated_against_greedy_verification_on_held_out_windows(v8_drafter):
    check_acceptance_is_calibrated(v8_drafter, "v8.2")


# -----------------------------------------------------------------------------
# ChaosLogic: one test per property of each part, plus decoding with patterns, depth and real layer skipping
# active


@torch.no_grad()
def diversify(model, seed=0):
    """Plumbing tests only (named test_plumbing_...): spread the task mixture and the pattern logits by hand so that
    tokens and layers pick different patterns, and put the depth threshold among the tokens' depths so that some
    tokens run the adaptive layer and some skip it, whatever training would do. What training does is tested in
    the section "routers after training"."""
    g = torch.Generator().manual_seed(seed)
    model.task.classify.weight.mul_(300)
    model.selector_weight.copy_(3 * torch.randn(model.selector_weight.shape, generator=g))
    model.selector_bias.copy_(torch.randn(model.selector_bias.shape, generator=g))
    model.task.depth_fc.weight.mul_(100)
    model.task.depth_out.weight.mul_(100)
    return model


@torch.no_grad()
def center_depth(model, idx):
    """Move the depth bias so the adaptive layer's threshold falls in the widest gap between the tokens' depth
    logits near the median: about half the tokens skip, and no token sits near the threshold."""
    lo, hi = model.depth_range()
    frac = model(idx).depth.sub(lo).div(hi - lo).clamp(1e-6, 1 - 1e-6)
    z = torch.logit(frac.double()).flatten().sort().values
    n = z.numel()
    window = z[n // 4: 3 * n // 4 + 1]
    gaps = window[1:] - window[:-1]
    i = int(gaps.argmax())
    cut = (window[i] + window[i + 1]) / 2
    # threshold of adaptive layer lo + 1 in fraction space is 1 / (2 (hi - lo)) -> logit
    thr = math.log(1 / (2 * (hi - lo)) / (1 - 1 / (2 * (hi - lo))))
    model.task.depth_out.bias.add_(thr - float(cut))
    return model


# -----------------------------------------------------------------------------
# latent KV cache: byte ratio; decode = full

def test_chaoslogic_latent_cache_is_at_least_9_9x_smaller_than_gpts_kv_cache_at_d768():
    sizes = model_chaoslogic.cache_bytes_against_gpt(768, prompt_len=16, n_layers=1, n_heads=12,
                                                      n_lattice_layers=0)
    (latent, state, latent_layers), (full, full_state, full_layers) = sizes["chaoslogic"], sizes["gpt"]
    assert latent_layers == full_layers == 1 and full_state == full
    assert latent == 16 * 154 * 4                     # only c: 16 positions x d_c = 154 x fp32
    assert full / latent >= 9.9
    assert state == latent + 16 * 8 + 768 * 4         # + token ids (int64) + the prefix-sum checkpoint (fp32)
    small = model_chaoslogic.cache_bytes_against_gpt(128, prompt_len=16, n_layers=1, n_heads=2, n_lattice_layers=0)
    print(f"\nlatent cache ratio: {full / latent:.2f}x at d768, "
          f"{small['gpt'][0] / small['chaoslogic'][0]:.2f}x at d128 (d_c = 26)")


@torch.no_grad()
def test_plumbing_chaoslogic_prefill_chunk_and_single_steps_equal_the_full_forward_with_set_patterns_and_skips():
    model = tiny("chaoslogic", size=CHAOS)
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    center_depth(diversify(model), idx)
    full = model(idx)
    used = full.patterns.sum((0, 1, 2))
    assert (used > 0).sum() >= 3, f"patterns in use {used.tolist()}: the test would not exercise them"
    assert 0 < (full.exit_depth < model.n_bottom).float().mean() < 1, "want both skipping and running tokens"
    cache = model.new_cache(2)
    parts = [model(idx[:, :10], cache=cache, start_pos=0).logits,
             model(idx[:, 10:17], cache=cache, start_pos=10).logits]
    model(idx[:, 17:21].flip(1), cache=cache, start_pos=17)          # a rejected draft, then rolled back
    cache.truncate(17)
    parts += [model(idx[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(17, 48)]
    assert max_diff(torch.cat(parts, 1), full.logits) <= 1e-5


# -----------------------------------------------------------------------------
# patterns

def test_every_pattern_mask_is_causal_includes_the_diagonal_and_decoding_reads_the_same_rows():
    pos = torch.arange(200)
    masks = model_chaoslogic.pattern_masks(pos, pos, window=8, block=4, n_sink=2)    # (4, 200, 200)
    causal = torch.ones(200, 200, dtype=torch.bool).tril()
    assert not (masks & ~causal).any()
    assert masks[:, pos, pos].all()
    assert torch.equal(masks[0], causal)
    assert len({m.sum().item() for m in masks}) == 4                    # four different patterns
    rows = model_chaoslogic.pattern_masks(torch.arange(120, 131), torch.arange(131), 8, 4, 2)
    assert torch.equal(rows, masks[:, 120:131, :131])


@torch.no_grad()
def test_eval_attention_row_t_uses_exactly_the_chosen_patterns_row_t():
    model = tiny("chaoslogic", size=CHAOS)
    attn = model.bottom[0].attn
    u = torch.randn(2, 40, 32)
    pos = torch.arange(40)
    masks = model_chaoslogic.pattern_masks(pos, pos, 8, 4, 2)
    choice = torch.randint(0, 4, (2, 40), generator=torch.Generator().manual_seed(0))
    built = masks[choice, pos]                                           # the eval path's mask
    for b in range(2):
        for t in range(40):
            assert torch.equal(built[b, t], masks[choice[b, t], t])
    mixed = attn(u, choice, masks)                                       # eval: one SDPA with the built mask
    per_pattern = [attn(u, F.one_hot(torch.full((2, 40), p), 4).float(), masks) for p in range(4)]
    expected = torch.stack(per_pattern, 2).gather(2, choice[:, :, None, None].expand(-1, -1, 1, 32))[:, :, 0]
    assert max_diff(mixed, expected) <= 1e-6


def test_plumbing_gumbel_selector_is_exactly_one_hot_in_training_with_gradient_and_deterministic_in_eval():
    model = diversify(tiny("chaoslogic", size=CHAOS)).train()
    idx = torch.randint(0, 96, (2, 49), generator=torch.Generator().manual_seed(2))
    out = model(idx[:, :-1], targets=idx[:, 1:])
    rows = out.patterns
    assert torch.equal(rows.sum(-1), torch.ones_like(rows.sum(-1)))
    assert torch.equal(rows, (rows == 1).float())                        # exactly 0 / 1, no rounding residue
    out.aux["lm"].backward()                                             # next-token CE alone
    assert model.selector_weight.grad.abs().max() > 0 and model.selector_bias.grad.abs().max() > 0
    model.eval()
    with torch.no_grad():
        first, second = model(idx[:, :-1]), model(idx[:, :-1])
    assert torch.equal(first.logits, second.logits) and torch.equal(first.patterns, second.patterns)


# -----------------------------------------------------------------------------
# task analyzer, depth, lattice gates

@torch.no_grad()
def test_plumbing_pattern_choice_depth_and_gates_at_t_are_unchanged_when_later_tokens_change():
    model = tiny("chaoslogic", size=CHAOS)
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(3))
    center_depth(diversify(model), idx)
    ref = model(idx)
    for t in (0, 5, 17, 30, 46):
        perturbed = idx.clone()
        perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 7) % 96
        out = model(perturbed)
        for field in ("patterns", "depth", "exit_depth", "lattice_gates", "confidence", "logits", "horizon_hidden"):
            assert torch.equal(getattr(ref, field)[:, :t + 1], getattr(out, field)[:, :t + 1]), field


def test_the_next_token_loss_alone_sends_a_gradient_to_the_depth_head():
    model = tiny("chaoslogic", size=CHAOS).train()
    assert model.n_bottom - model.n_always >= 1
    idx = torch.randint(0, 96, (2, 49), generator=torch.Generator().manual_seed(4))
    model(idx[:, :-1], targets=idx[:, 1:]).aux["lm"].backward()
    for p in model.task.parameters():
        assert p.grad is not None and p.grad.abs().max() > 0


@torch.no_grad()
def test_plumbing_real_layer_skipping_in_decoding_equals_the_hard_gated_full_forward():
    model = tiny("chaoslogic", size=CHAOS)
    idx = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(5))
    center_depth(diversify(model), idx)
    model.skipped_layer_calls = 0
    full = model(idx)
    assert model.skipped_layer_calls == 0          # mixed depths: the full forward runs the layer, gated by 0/1
    skips = (full.exit_depth[0] < model.n_bottom).nonzero().flatten()
    assert 0 < skips.numel() < 48
    cache = model.new_cache(1)
    steps = [model(idx[:, :1], cache=cache, start_pos=0).logits]
    steps += [model(idx[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(1, 48)]
    assert model.skipped_layer_calls == skips.numel()  # each skipping token really skipped the layer's branch
    assert max_diff(torch.cat(steps, 1), full.logits) <= 1e-5


# -----------------------------------------------------------------------------
# whole model: random tokens, compile

def test_chaoslogic_confidence_learns_that_random_next_tokens_are_unpredictable():
    """kappa_1 learns that the next token is not predictable in random tokens (accuracy ~ 1/96); kappa_k for k >= 2
    estimates whether offset k agrees with the main head, which is another question."""
    model = fit(tiny("chaoslogic", size=CHAOS), 40, uniform(96), lr=3e-3, seed=0)
    held_out = torch.randint(0, 96, (8, 49), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        kappa = model(held_out[:, :-1]).confidence[:, :-8]
    assert kappa[..., 0].mean() < 0.3




# -----------------------------------------------------------------------------
# horizon and speculative decoding



@torch.no_grad()
def test_perturbing_token_t_plus_k_leaves_every_head_at_t_unchanged():
    model = fit(tiny("chaoslogic", size=CHAOS), 5, uniform(96), lr=1e-2, seed=0)
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(8))
    ref = model(idx)
    for t in (3, 20):
        for k in range(1, 9):
            perturbed = idx.clone()
            perturbed[:, t + k] = (perturbed[:, t + k] + 1) % 96
            out = model(perturbed)
            assert torch.equal(out.logits[:, t], ref.logits[:, t])
            assert torch.equal(out.horizon_hidden[:, t], ref.horizon_hidden[:, t])
            assert torch.equal(out.confidence[:, t], ref.confidence[:, t])


def test_periodic_training_gives_confident_accepted_head_drafts_and_speculative_equals_greedy():
    with single_thread():
        model = fit(tiny("chaoslogic", size=CHAOS), 150, periodic(96), lr=1e-2, seed=0)
    data = periodic(96)(torch.Generator().manual_seed(123), 4, 49)
    with torch.no_grad():
        out = model(data[:, :-1], targets=data[:, 1:])
    assert all(v.item() < 0.1 for k, v in out.aux.items() if k == "lm" or k.startswith("ce_")), out.aux
    # drafts come from the horizon heads (not the prompt-lookup fallback) and are confident
    prompt = data[:1, :12]
    prev = model(prompt[:, :-1])
    drafts, q = model.draft(prompt, 6, prev, prompt.size(1) - 2)
    heads = F.linear(prev.horizon_hidden[0, -1, :6], model.wte.weight).argmax(-1)
    assert q is None and drafts.numel() == 6 and torch.equal(drafts, heads)
    stats = {}
    plain = model.generate(prompt, 30, temperature=0)
    speculative = model.generate(prompt, 30, temperature=0, speculative=True, draft_len=6, stats=stats)
    assert torch.equal(plain, speculative)
    accepted = sum(n * c for n, c in enumerate(stats["accepted_hist"]))
    assert accepted >= 20, stats
    # calibration of kappa on held-out windows of the same process and on random tokens
    hits, valid = [], []
    y = data[:, 1:]
    hits.append(out.logits.argmax(-1) == y)
    for j in range(out.horizon_hidden.size(2)):
        hits.append(F.linear(out.horizon_hidden[:, :, j], model.wte.weight).argmax(-1) == core.horizon_targets(y, j + 2))
    hits = torch.stack(hits, -1)
    valid = torch.stack([core.horizon_targets(y, k) >= 0 for k in range(1, 9)], -1)
    ece = model_chaoslogic.expected_calibration_error(out.confidence[valid], hits[valid])
    print(f"\nperiodic task: {accepted} drafts accepted in {stats['model_calls']} calls; ECE of kappa {ece:.3f}; "
          f"mean kappa {out.confidence[valid].mean().item():.3f} vs accuracy {hits[valid].float().mean().item():.3f}")
    assert ece < 0.1


@torch.no_grad()
def test_plumbing_draft_length_maximises_expected_tokens_per_cost_at_set_confidences_else_prompt_lookup():
    """Plumbing (confidences set by hand): the drafts are the heads' argmax, as many as best_draft_length picks
    at draft_cost 0.05, unless prompt lookup (acceptance PRIOR_ACCEPTANCE before any evidence) is worth more;
    nothing pays -> no drafts."""
    model = fit(tiny("chaoslogic", size=CHAOS), 5, uniform(96), lr=1e-2, seed=0)
    assert model.config.draft_cost == 0.05 and generate.PRIOR_ACCEPTANCE == 0.5
    fresh = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])      # no repeats: prompt lookup has nothing
    repeats = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])    # lookup offers 4, 1, 2, 3: best 3 of them at 0.5 each
    prev = model(fresh[:, :-1])
    heads = model.readout(prev.horizon_hidden[0, -1, :4]).argmax(-1)
    # offsets 2..5 at 0.9, 0.9, 0.02, 0.9: tokens per cost for k = 0..4 are 1, 1.81, 2.46, 2.37, 2.28 -> 2
    prev.confidence[0, -1, 1:5] = torch.tensor([0.9, 0.9, 0.02, 0.9])
    for prompt in (fresh, repeats):                    # 2.46 beats lookup's best, 1.875 / 1.15 = 1.63
        drafts, q = model.draft(prompt, 4, prev, prompt.size(1) - 2)
        assert q is None and torch.equal(drafts, heads[:2])
    prev.confidence[0, -1, 1:5] = torch.tensor([0.14, 0.14, 0.14, 0.14])   # weak, but worth one draft
    assert torch.equal(model.draft(fresh, 4, prev, fresh.size(1) - 2)[0], heads[:1])
    assert torch.equal(model.draft(repeats, 4, prev, repeats.size(1) - 2)[0], torch.tensor([4, 1, 2]))
    prev.confidence[0, -1, 1:5] = 0.02                                      # no draft pays
    assert model.draft(fresh, 4, prev, fresh.size(1) - 2)[0].numel() == 0


@torch.no_grad()
def test_plumbing_truncating_below_the_prefix_sum_checkpoint_recomputes_it_from_the_cached_tokens():
    model = center_depth(diversify(tiny("chaoslogic", size=CHAOS)), torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(3)))
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(4))
    full = model(idx)
    cache = model.new_cache(2)
    model(idx[:, :30], cache=cache)
    model(idx[:, 30:34], cache=cache, start_pos=30)         # the checkpoint moves to 30
    cache.truncate(12)                                        # below it: the sum restarts from the token ids
    assert cache.sum_pos == 0 and cache.length == 12
    again = torch.cat([model(idx[:, 12:20], cache=cache, start_pos=12).logits]
                      + [model(idx[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(20, 48)], 1)
    assert max_diff(again, full.logits[:, 12:]) <= 1e-5
    assert cache.sum_pos == 47


# -----------------------------------------------------------------------------
# patterns that differ at every trained length, and drafts that get used

def test_no_two_pattern_masks_are_equal_at_64_128_256_and_512_tokens_or_any_length_from_16():
    for T in list(range(16, 300)) + [64, 128, 256, 512, 1024]:
        c = model_chaoslogic.Config(vocab_size=96, d_model=32, n_heads=2, max_seq_len=T)
        pos = torch.arange(T)
        masks = model_chaoslogic.pattern_masks(pos, pos, c.attn_window, c.attn_block, c.n_sink)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(masks[a], masks[b]), (T, a, b)
        assert not (masks & ~torch.ones(T, T, dtype=torch.bool).tril()).any()    # causal
        assert masks[:, pos, pos].all()
    # what the presets train: the contexts of config/cpu_tiny.py (128 tokens) and config/t4.py (512), read from
    # the files, at the model's default sizes
    for preset, window, block in (("cpu_tiny", 32, 16), ("t4", 128, 64)):
        settings = {}
        exec(open(os.path.join(HERE, "config", f"{preset}.py")).read(), settings)
        T = settings["max_seq_len"]
        model = tiny("chaoslogic", size=CHAOS, max_seq_len=T, n_layers=2)
        assert (model.config.attn_window, model.config.attn_block, model.config.n_sink) == (window, block, 4)
        pos = torch.arange(T)
        masks = model.pattern_masks(pos, pos)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(masks[a], masks[b]), (preset, a, b)
        kept = [round(m.sum().item() / masks[0].sum().item(), 2) for m in masks]
        print(f"\nmax_seq_len {T}: share of the causal pairs each pattern keeps {kept}")
        assert len(set(kept)) == 4


@pytest.fixture(scope="module")
def cl_drafter():
    """A tiny ChaosLogic after 300 AdamW steps on `cyclic` windows, nothing set by hand."""
    with single_thread():
        return fit(tiny("chaoslogic", size=CHAOS, **DRAFT_TINY), 300, cyclic(DRAFT_TINY["vocab_size"]), lr=1e-2, seed=0)


def test_trained_chaoslogic_drafts_from_its_horizon_heads_and_beats_prompt_lookup(cl_drafter):
    check_drafts_get_used(cl_drafter, "ChaosLogic")


def test_chaoslogic_confidence_is_calibrated_against_greedy_verification_on_held_out_windows(cl_drafter):
    check_acceptance_is_calibrated(cl_drafter, "ChaosLogic")

# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------
# the pipeline scripts: configurator, prepare_data.py, train.py, sample.py, export_colab.py, bench.py


# -----------------------------------------------------------------------------
# registry, overrides, tokenizer

def test_build_model_rejects_unknown_names_fields_and_modes_with_suggestions():
    with pytest.raises(core.UsageError, match="did you mean gpt"):
        core.build_model("gtp")
    with pytest.raises(core.UsageError, match="did you mean d_model"):
        core.build_model("gpt", d_modle=64)
    with pytest.raises(core.UsageError, match="mode='chunk' is not supported"):
        core.build_model("gpt", mode="chunk")
    with pytest.raises(core.UsageError, match="not divisible"):
        core.build_model("gpt", d_model=30, n_heads=4)


def test_overrides_accept_both_forms_config_files_and_check_types(tmp_path):
    defaults = {"batch_size": 8, "learning_rate": 6e-4, "compile": False, "model": "gpt", "out_dir": "out"}
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 2\nlearning_rate = 1e-3\n")
    got = configurator.parse_overrides([str(cfg_file), "--batch_size=4", "--learning_rate", "1", "--compile",
                                "--out_dir", "123"], defaults)
    assert got == {"batch_size": 4, "learning_rate": 1.0, "compile": True, "model": "gpt", "out_dir": "123"}
    assert isinstance(got["learning_rate"], float)
    with pytest.raises(core.UsageError, match="did you mean batch_size"):
        configurator.parse_overrides(["--batch_sise=4"], defaults)
    with pytest.raises(core.UsageError, match="should be a int"):
        configurator.parse_overrides(["--batch_size=4.5"], defaults)
    with pytest.raises(core.UsageError, match="should be a bool"):
        configurator.parse_overrides(["--compile=yes"], defaults)
    with pytest.raises(core.UsageError, match="not found"):
        configurator.parse_overrides(["missing.py"], defaults)


def test_tokenizer_gives_the_known_gpt2_ids():
    enc = prepare_data.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("The quick brown fox") == [464, 2068, 7586, 21831]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [prepare_data.EOT_TOKEN]
    text = "Ünïcödé, numbers 12345 and  spaces\n\ttabs."
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_offline_tokenizer_is_built_from_the_verified_package_files(monkeypatch):
    import tiktoken
    monkeypatch.setattr(prepare_data, "_TOKENIZER", None)

    def no_network(name):
        raise ConnectionError("offline")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    enc = prepare_data.get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == prepare_data.EOT_TOKEN


# -----------------------------------------------------------------------------
# prepare_data.py: shards, inputs, errors

SAMPLE_TEXT = os.path.join(HERE, "assets", "tinyshakespeare.txt")  # shipped with the repository: no download
DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "def f(x):\n    return x * 2\n",
        "All:\nSpeak, speak. ünïcödé ✓",
        "You are all resolved rather to die than to famish?"]


def expected_stream(docs):
    enc = prepare_data.get_tokenizer()
    return [t for d in docs if d.strip() for t in [prepare_data.EOT_TOKEN] + enc.encode_ordinary(d)]


def read_all(out_dir):
    val, train = prepare_data.list_shards(str(out_dir))
    return [int(t) for p in val + train for t in prepare_data.load_shard(p)]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), *args], capture_output=True,
                          text=True, cwd=HERE, env=env, timeout=120)


# -----------------------------------------------------------------------------
# shard files


def test_shard_round_trip_keeps_tokens_and_writes_the_llmc_header(tmp_path):
    path = str(tmp_path / "x_val_000000.bin")
    tokens = np.array([50256, 0, 1, 65535, 42], dtype=np.int64)
    prepare_data.write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert os.path.getsize(path) == 1024 + 2 * 5
    shard = prepare_data.load_shard(path)
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    assert shard.tolist() == tokens.tolist()


def test_write_shard_rejects_tokens_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError):
        prepare_data.write_shard(str(tmp_path / "s.bin"), [1, 2**16])
    with pytest.raises(ValueError):
        prepare_data.write_shard(str(tmp_path / "s.bin"), [-1])
    assert os.listdir(tmp_path) == []


def _corrupt_magic(path):
    with open(path, "r+b") as f:
        f.write(np.array([12345], dtype="<i4").tobytes())


def _corrupt_version(path):
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(np.array([7], dtype="<i4").tobytes())


def _truncate_header(path):
    os.truncate(path, 100)


def _truncate_tokens(path):
    os.truncate(path, os.path.getsize(path) - 2)


@pytest.mark.parametrize("corrupt, problem", [(_corrupt_magic, "magic"), (_corrupt_version, "version"),
                                              (_truncate_header, "header"), (_truncate_tokens, "truncated")])
def test_load_shard_rejects_a_damaged_file_naming_it_and_the_fix(tmp_path, corrupt, problem):
    path = str(tmp_path / "d_train_000001.bin")
    prepare_data.write_shard(path, np.arange(10))
    corrupt(path)
    with pytest.raises(core.UsageError) as e:
        prepare_data.load_shard(path)
    message = str(e.value)
    assert path in message and problem in message and "prepare_data.py" in message and "\n" not in message


def test_load_shard_of_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(core.UsageError, match="not found"):
        prepare_data.load_shard(str(tmp_path / "nope_val_000000.bin"))


def test_write_shard_leaves_no_tmp_file_after_success(tmp_path):
    prepare_data.write_shard(str(tmp_path / "a_val_000000.bin"), [1, 2, 3])
    assert os.listdir(tmp_path) == ["a_val_000000.bin"]


def test_an_interrupted_write_keeps_the_previous_shard_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "a_train_000001.bin")
    prepare_data.write_shard(path, [7, 8, 9])

    class FailingFile:  # writes the header, then dies as a killed process would
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                raise OSError("disk full")
            return self.f.write(data)

    monkeypatch.setattr(prepare_data, "open", lambda p, mode: FailingFile(open(p, mode)), raising=False)
    with pytest.raises(OSError, match="disk full"):
        prepare_data.write_shard(path, np.arange(1000))
    assert prepare_data.load_shard(path).tolist() == [7, 8, 9]
    assert os.listdir(tmp_path) == ["a_train_000001.bin"]


def test_list_shards_returns_sorted_val_and_train_paths(tmp_path):
    names = ["c_train_000002.bin", "c_val_000000.bin", "c_train_000001.bin", "notes.txt", "c_train_000003.bin.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    val, train = prepare_data.list_shards(str(tmp_path))
    assert [os.path.basename(p) for p in val] == ["c_val_000000.bin"]
    assert [os.path.basename(p) for p in train] == ["c_train_000001.bin", "c_train_000002.bin"]


def test_list_shards_of_a_missing_or_empty_dir_says_how_to_make_them(tmp_path):
    for data_dir in [tmp_path / "missing", tmp_path]:
        with pytest.raises(core.UsageError, match="prepare_data.py --corpus=stdlib"):
            prepare_data.list_shards(str(data_dir))


# -----------------------------------------------------------------------------
# tokenizing into shards


def test_prepare_writes_eot_then_each_document_in_order_with_shard_0_as_val(tmp_path):
    stats = prepare_data.prepare(DOCS, str(tmp_path), "t", shard_size=20, num_proc=1)
    names = sorted(os.listdir(tmp_path))
    assert names[-1] == "t_val_000000.bin" and all(n.startswith("t_train_") for n in names[:-1])
    assert read_all(tmp_path) == expected_stream(DOCS)
    assert stats["documents"] == len(DOCS) and stats["tokens"] == len(expected_stream(DOCS))


def test_shards_hold_shard_size_tokens_except_the_last(tmp_path):
    stats = prepare_data.prepare(DOCS, str(tmp_path), "t", shard_size=7, num_proc=1)
    sizes = [len(prepare_data.load_shard(p)) for p in stats["shards"]]
    total = len(expected_stream(DOCS))
    assert sizes == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    assert [os.path.basename(p) for p in stats["shards"]][:3] == ["t_val_000000.bin", "t_train_000001.bin",
                                                                   "t_train_000002.bin"]


def test_max_tokens_stops_the_stream_mid_document(tmp_path):
    stats = prepare_data.prepare(DOCS * 5, str(tmp_path), "t", shard_size=10, max_tokens=33, num_proc=1)
    assert stats["tokens"] == 33 and read_all(tmp_path) == expected_stream(DOCS * 5)[:33]


def test_empty_and_whitespace_documents_are_skipped(tmp_path):
    docs = ["", DOCS[0], "  \n\t ", DOCS[1]]
    stats = prepare_data.prepare(docs, str(tmp_path), "t", shard_size=10, num_proc=1)
    assert stats["documents"] == 2 and read_all(tmp_path) == expected_stream([DOCS[0], DOCS[1]])


def test_two_worker_processes_give_the_same_shards_as_one(tmp_path):
    docs = [f"document {i}: " + DOCS[i % 4] * (i % 3 + 1) for i in range(60)]
    one = prepare_data.prepare(docs, str(tmp_path / "one"), "t", shard_size=100, num_proc=1)
    two = prepare_data.prepare(docs, str(tmp_path / "two"), "t", shard_size=100, num_proc=2, chunksize=4)
    assert [os.path.basename(p) for p in one["shards"]] == [os.path.basename(p) for p in two["shards"]]
    for a, b in zip(one["shards"], two["shards"]):  # the same bytes but for the run id in the header
        ha, hb = prepare_data.read_header(a), prepare_data.read_header(b)
        assert ha[:3] + ha[4:] == hb[:3] + hb[4:] and ha[3] != hb[3]
        assert open(a, "rb").read()[1024:] == open(b, "rb").read()[1024:]


def test_a_rerun_removes_stale_shards_of_a_bigger_earlier_run(tmp_path):
    prepare_data.prepare(DOCS * 4, str(tmp_path), "t", shard_size=10, num_proc=1)
    (tmp_path / "old_train_000009.bin").write_bytes(b"x")  # another name, same pattern: would be read too
    (tmp_path / "t_train_000003.bin.tmp").write_bytes(b"x")  # left by an interrupted run
    (tmp_path / "notes.txt").write_text("mine")
    stats = prepare_data.prepare(DOCS, str(tmp_path), "t", shard_size=10, num_proc=1, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt"] + [os.path.basename(p) for p in stats["shards"]])
    assert read_all(tmp_path) == expected_stream(DOCS)


def test_a_corpus_under_two_shards_is_split_90_10_with_a_log_line(tmp_path):
    docs = [f"line {i}: " + DOCS[i % 4] for i in range(2000)]
    stream = expected_stream(docs)
    n_val = math.ceil(len(stream) / 10)
    lines = []
    # under two shards of 20k tokens: the last 10% validate, the first 90% train, in shards of 20k
    stats = prepare_data.prepare(docs, str(tmp_path), "t", shard_size=20_000, num_proc=1, log=lines.append)
    assert 20_000 < len(stream) < 40_000 and stats["split"] == (len(stream) - n_val, n_val)
    val, train = prepare_data.list_shards(str(tmp_path))
    assert [os.path.basename(p) for p in val + train] == ["t_val_000000.bin", "t_train_000001.bin",
                                                          "t_train_000002.bin"]
    assert prepare_data.load_shard(val[0]).tolist() == stream[-n_val:]
    assert [len(prepare_data.load_shard(p)) for p in train] == [20_000, len(stream) - n_val - 20_000]
    assert [t for p in train for t in prepare_data.load_shard(p).tolist()] == stream[:-n_val]
    assert len(lines) == 1 and "split" in lines[0] and f"{n_val:,}" in lines[0] and "validation" in lines[0]
    # a text of a few dozen tokens still gives both splits: at least a 1024-token window, at most half
    stats = prepare_data.prepare(DOCS, str(tmp_path / "tiny"), "t", shard_size=10_000, num_proc=1, log=print)
    total = len(expected_stream(DOCS))
    val, train = prepare_data.list_shards(str(tmp_path / "tiny"))
    assert stats["split"] == (total - total // 2, total // 2)
    assert prepare_data.load_shard(train[0]).tolist() + prepare_data.load_shard(val[0]).tolist() == expected_stream(DOCS)


def test_all_empty_documents_is_an_error_naming_the_source(tmp_path):
    with pytest.raises(core.UsageError, match="no text found in blanks"):
        prepare_data.prepare(["", " ", "\n"], str(tmp_path / "out"), "t", shard_size=10, source="blanks")
    assert not (tmp_path / "out").exists()


def test_tinyshakespeare_is_one_document_of_about_338k_tokens(tmp_path):
    docs = list(prepare_data.input_documents(prepare_data.find_inputs(SAMPLE_TEXT)))
    stats = prepare_data.prepare(docs, str(tmp_path), "tinyshakespeare", shard_size=100_000, num_proc=1)
    assert stats["documents"] == 1 and 330_000 < stats["tokens"] < 345_000
    assert read_all(tmp_path) == expected_stream(docs)


# -----------------------------------------------------------------------------
# inputs


def test_input_directory_and_recursive_glob_find_supported_files_sorted(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ["a.txt", "b/z.md", "b/c/y.py", "b/c/skip.csv", "b/c/x.jsonl"]:
        (tmp_path / name).write_text("hi")
    want = [str(tmp_path / n) for n in ["a.txt", "b/c/x.jsonl", "b/c/y.py", "b/z.md"]]
    assert prepare_data.find_inputs(str(tmp_path)) == want
    assert prepare_data.find_inputs(str(tmp_path / "**" / "*.py")) == [str(tmp_path / "b/c/y.py")]


def test_an_input_matching_nothing_names_the_pattern_and_the_extensions(tmp_path):
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(core.UsageError) as e:
        prepare_data.find_inputs(pattern)
    assert pattern in str(e.value) and ".jsonl" in str(e.value) and ".parquet" in str(e.value)


def test_jsonl_and_parquet_stream_through_datasets_and_match_direct_encoding(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    with open(tmp_path / "a.jsonl", "w") as f:
        for i, d in enumerate(DOCS[:2]):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    pq.write_table(pa.table({"text": DOCS[2:], "n": [1, 2]}), tmp_path / "b.parquet")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    docs = prepare_data.input_documents(prepare_data.find_inputs(str(tmp_path)))
    prepare_data.prepare(docs, str(tmp_path / "out"), "t", shard_size=20, num_proc=1)
    assert [(a[0], k["streaming"]) for a, k in calls] == [("json", True), ("parquet", True)]
    assert read_all(tmp_path / "out") == expected_stream(DOCS)


def test_jsonl_without_a_text_field_is_an_error_naming_its_fields(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "hello", "id": 1}) + "\n")
    docs = prepare_data.input_documents([str(tmp_path / "c.jsonl")])
    with pytest.raises(core.UsageError) as e:
        prepare_data.prepare(docs, str(tmp_path / "out"), "c", shard_size=10)
    assert "c.jsonl" in str(e.value) and "'text'" in str(e.value) and "content, id" in str(e.value)


def test_stdlib_corpus_is_the_sorted_python_sources_of_the_standard_library():
    paths = prepare_data.stdlib_paths()
    assert len(paths) > 500 and paths == sorted(paths)
    assert all(p.endswith(".py") and "site-packages" not in p and "dist-packages" not in p for p in paths)
    docs = prepare_data.text_files(paths[:3])
    assert all(isinstance(d, str) for d in docs)


def test_an_unreachable_hub_fails_fast_pointing_at_local_and_offline_inputs(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    t0 = time.time()
    with pytest.raises(core.UsageError) as e:
        next(prepare_data.fineweb_documents())
    assert time.time() - t0 < 10
    assert "--input=PATH" in str(e.value) and "--corpus=stdlib" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# command line


def test_cli_turns_a_text_file_into_shards(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(" ".join(DOCS * 3))
    result = run_cli(f"--input={text}", f"--out_dir={tmp_path / 'out'}", "--shard_size=20", "--num_proc=1")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and str(tmp_path / "out") in result.stderr
    assert read_all(tmp_path / "out") == expected_stream([text.read_text()])
    assert os.path.exists(tmp_path / "out" / "story_val_000000.bin")


def test_cli_bad_flag_exits_2_with_one_error_line():
    result = run_cli("--shard_sise=5")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "shard_size" in result.stderr


def test_cli_unknown_corpus_lists_the_choices(tmp_path):
    result = run_cli("--corpus=wiki", f"--out_dir={tmp_path}")
    assert result.returncode == 2 and "fineweb-edu" in result.stderr and "stdlib" in result.stderr


def test_cli_hub_failure_in_offline_mode_is_one_error_line(tmp_path):
    result = run_cli(f"--out_dir={tmp_path / 'out'}", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stderr.startswith("error: could not stream")
    assert "--input=PATH" in result.stderr and "--corpus=stdlib" in result.stderr


# -----------------------------------------------------------------------------
# train.py and sample.py

TRAIN_TINY = ["--d_model=32", "--n_layers=2", "--n_heads=2", "--max_seq_len=32", "--batch_size=4",
              "--device=cpu", "--eval_iters=2", "--warmup_iters=5"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """About 150k tokens of real text (Python sources of the standard library) in 30k-token shards."""
    out = tmp_path_factory.mktemp("shards")
    paths = prepare_data.stdlib_paths()[:60]
    prepare_data.prepare(prepare_data.text_files(paths), str(out), "stdlib", shard_size=30_000,
                         max_tokens=150_000)
    return str(out)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_ctrl_c_saves_and_resume_continues_the_same_loss_trajectory(shard_dir, tmp_path, optimizer):
    args = ["train.py", f"--data_dir={shard_dir}", "--max_iters=60", "--log_interval=1", "--eval_interval=0",
            f"--optimizer={optimizer}", "--save_interval=1000"] + TRAIN_TINY
    straight = str(tmp_path / "straight")
    result = run(args + [f"--out_dir={straight}"])
    assert result.returncode == 0, result.stderr
    interrupted = str(tmp_path / "interrupted")
    proc = subprocess.Popen([sys.executable] + args + [f"--out_dir={interrupted}"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = os.path.join(interrupted, "log.jsonl")
        if os.path.exists(log) and len(open(log).readlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)["iter_num"]
    assert 3 <= stopped_at < 60, "the run was not interrupted mid-way"
    assert "Ctrl+C" in out
    result = run(args + [f"--out_dir={interrupted}", "--init_from=resume"])
    assert result.returncode == 0, result.stderr
    a, b = train_losses(interrupted), train_losses(straight)
    # two processes agree to ~1e-6, not bitwise (multi-threaded CPU kernels); a skipped or repeated batch
    # would move the losses by ~1e-2
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 for k in a), (a, b)
    assert max(b) == 60


def test_checkpoint_holds_plain_types_and_loads_with_weights_only(shard_dir, tmp_path):
    out_dir = str(tmp_path / "run")
    result = run(["train.py", f"--data_dir={shard_dir}", f"--out_dir={out_dir}", "--max_iters=2",
                  "--eval_interval=1", "--optimizer=adamw"] + TRAIN_TINY)
    assert result.returncode == 0, result.stderr
    state = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    assert state["model_name"] == "gpt" and state["model_config"]["d_model"] == 32
    assert state["iter_num"] == 2 and math.isfinite(state["best_val_loss"])
    assert {"optimizer", "scaler", "rng_cpu", "loader", "train_config"} <= set(state)
    model = core.model_from_checkpoint(state)
    assert model.num_params() > 0
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]
    vals = [r["val_loss"] for r in read_log(out_dir) if "val_loss" in r]
    assert len(vals) == 3  # steps 0, 1 and 2


def test_quickstart_pipeline_prepare_train_sample_from_the_command_line(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(open(SAMPLE_TEXT, encoding="utf-8").read()[:300_000])
    data_dir, out_dir = str(tmp_path / "data"), str(tmp_path / "out")
    result = run(["prepare_data.py", f"--input={text}", f"--out_dir={data_dir}"])  # default shard size: split
    assert result.returncode == 0, result.stderr
    result = run(["train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=40",
                  "--eval_interval=40", "--learning_rate=3e-3", "--optimizer=adamw"] + TRAIN_TINY)
    assert result.returncode == 0, result.stderr
    vals = [r["val_loss"] for r in read_log(out_dir) if "val_loss" in r]
    assert vals[-1] < vals[0] - 2.0, f"val loss did not fall: {vals}"
    result = run(["sample.py", "--ckpt", out_dir, "--prompt=The", "--max_new_tokens=20", "--seed=3",
                  "--num_samples=2"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The") and result.stdout.count("---------------") == 2
    assert "tok/s" in result.stderr and "prompt 1 tokens" in result.stderr
    again = run(["sample.py", f"--ckpt={out_dir}", "--prompt=The", "--max_new_tokens=20", "--seed=3",
                 "--num_samples=2"])
    assert again.stdout == result.stdout, "the same seed must give the same samples"
    speculative = run(["sample.py", f"--ckpt={out_dir}", "--prompt=The", "--max_new_tokens=20", "--temperature=0",
                "--speculative"])
    greedy = run(["sample.py", f"--ckpt={out_dir}", "--prompt=The", "--max_new_tokens=20", "--temperature=0"])
    assert speculative.returncode == 0 and speculative.stdout == greedy.stdout
    assert "tokens per model call" in speculative.stderr


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_bad_input_gets_one_error_line_and_leaves_files_untouched(shard_dir, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run(["sample.py", f"--ckpt={bad}"])
    assert one_error_line(result) and "unreadable" in result.stderr
    assert bad.read_bytes() == b"not a checkpoint"
    result = run(["train.py", f"--out_dir={tmp_path}", "--init_from=resume", f"--data_dir={shard_dir}"])
    assert one_error_line(result) and "unreadable" in result.stderr
    assert bad.read_bytes() == b"not a checkpoint"
    result = run(["train.py", "--learning_rat=1e-3"])
    assert one_error_line(result) and "did you mean learning_rate" in result.stderr
    result = run(["train.py", "--model=gtp"])
    assert one_error_line(result) and "did you mean gpt" in result.stderr
    result = run(["train.py", f"--data_dir={tmp_path / 'nothing'}"])
    assert one_error_line(result) and "prepare_data.py" in result.stderr
    result = run(["sample.py", f"--ckpt={tmp_path / 'missing'}"])
    assert one_error_line(result) and "no checkpoint" in result.stderr


def test_train_accepts_the_chosen_models_own_config_fields_and_only_those(shard_dir, tmp_path):
    out_dir = str(tmp_path / "run")
    result = run(["train.py", "--model=v3", "--horizon=2", "--exit_threshold=2.0", f"--data_dir={shard_dir}",
                  f"--out_dir={out_dir}", "--max_iters=1", "--eval_interval=0", "--optimizer=adamw"] + TRAIN_TINY)
    assert result.returncode == 0, result.stderr
    config = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model_config"]
    assert config["horizon"] == 2 and config["exit_threshold"] == 2.0
    result = run(["train.py", "--model=gpt", "--horizon=2", f"--data_dir={shard_dir}"])
    assert one_error_line(result) and "unknown setting 'horizon'" in result.stderr


def test_sample_rejects_a_prompt_longer_than_the_context(shard_dir, tmp_path):
    out_dir = str(tmp_path / "run")
    assert run(["train.py", f"--data_dir={shard_dir}", f"--out_dir={out_dir}", "--max_iters=1",
                "--eval_interval=0", "--optimizer=adamw"] + TRAIN_TINY).returncode == 0
    result = run(["sample.py", f"--ckpt={out_dir}", "--prompt=" + "word " * 40])
    assert one_error_line(result) and "shorten the prompt to at most 32 tokens" in result.stderr


def test_ddp_two_ranks_match_one_process_and_resume_under_torchrun(shard_dir, tmp_path):
    """2 ranks x accumulation 2 (gloo) follow 1 process x accumulation 4 over the same data; a torchrun
    run stopped at step 3 and resumed continues the same trajectory."""
    args = ["train.py", f"--data_dir={shard_dir}", "--data_order=sequential", "--gradient_accumulation_steps=4",
            "--log_interval=1", "--eval_interval=3", "--optimizer=adamw", "--lr_decay_iters=6"] + TRAIN_TINY
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    result = run(args + ["--max_iters=6", f"--out_dir={single}"])
    assert result.returncode == 0, result.stderr
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run(torchrun + args + ["--max_iters=3", f"--out_dir={ddp}"], env=env)
    assert result.returncode == 0, result.stderr
    result = run(torchrun + args + ["--max_iters=6", f"--out_dir={ddp}", "--init_from=resume"], env=env)
    assert result.returncode == 0, result.stderr
    a, b = read_log(single), read_log(ddp)
    for key in ("loss", "val_loss"):
        sa = {r["step"]: r[key] for r in a if key in r}
        sb = {r["step"]: r[key] for r in b if key in r}
        assert sa.keys() == sb.keys() and all(abs(sa[k] - sb[k]) <= 1e-5 for k in sa), (key, sa, sb)
    wa = torch.load(os.path.join(single, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(ddp, "ckpt.pt"), weights_only=True)["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_ctrl_c_under_torchrun_saves_and_resume_continues_the_single_process_trajectory(shard_dir, tmp_path):
    args = ["train.py", f"--data_dir={shard_dir}", "--data_order=sequential", "--gradient_accumulation_steps=2",
            "--log_interval=1", "--eval_interval=0", "--optimizer=adamw", "--max_iters=60"] + TRAIN_TINY
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    assert run(args + [f"--out_dir={single}"]).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a terminal's Ctrl+C signals the whole foreground process group: the agent and both workers
    proc = subprocess.Popen(torchrun + args + [f"--out_dir={ddp}"], cwd=HERE, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = os.path.join(ddp, "log.jsonl"), time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(log) and len(open(log).readlines()) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    stopped_at = torch.load(os.path.join(ddp, "ckpt.pt"), weights_only=True)["iter_num"]
    assert 3 <= stopped_at < 60 and "Ctrl+C" in out, out[-2000:]
    result = run(torchrun[1:] + args + [f"--out_dir={ddp}", "--init_from=resume"], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    a, b = train_losses(single), train_losses(ddp)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)


# -----------------------------------------------------------------------------
# export_colab.py

@pytest.mark.parametrize("name", list(core.MODELS))
def test_exported_colab_script_trains_and_resumes_alone_in_an_empty_directory(name, tmp_path):
    import export_colab
    script = export_colab.export(name, str(tmp_path))
    assert os.listdir(tmp_path) == [export_colab.SCRIPT_NAMES[name]]
    (tmp_path / "text.txt").write_text(open(SAMPLE_TEXT, encoding="utf-8").read()[:100_000])
    args = ["--input=text.txt", "--d_model=32", "--n_layers=2", "--n_heads=2",
            "--max_seq_len=32", "--batch_size=2", "--gradient_accumulation_steps=1", "--device=cpu",
            "--eval_iters=1", "--eval_interval=2", "--warmup_iters=1", "--optimizer=adamw"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run([script] + args + ["--max_iters=2"], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "saved out-" in result.stdout and f"model {name}" in result.stdout
    result = run([script] + args + ["--max_iters=3"], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and "step 3/3" in result.stdout
    assert not (tmp_path / "core.py").exists() and not (tmp_path / "__pycache__").exists()


# -----------------------------------------------------------------------------
# bench.py

def test_bench_fast_path_prints_every_table_with_gpt_as_the_control(tmp_path):
    result = run(["bench.py", "--fast", "--models=gpt", f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr
    for title in ("Training throughput", "Quality at equal budget", "Generation", "Memory", "Data preparation"):
        assert f"### {title}" in result.stdout
    for name in ("throughput", "quality", "generation", "memory", "data"):
        text = (tmp_path / f"{name}.md").read_text()
        row = [line for line in text.splitlines() if line.startswith("| gpt")
               or line.startswith("| 100 stdlib")][0]
        assert row.count("|") >= 5
    generation = (tmp_path / "generation.md").read_text()
    assert generation.strip().endswith("| yes |"), "greedy uncached, cached and speculative outputs differ"
    assert "| gpt | " in (tmp_path / "throughput.md").read_text() and "| 1.00 |" in (tmp_path / "throughput.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "throughput.png").exists()


# -----------------------------------------------------------------------------
# a newcomer's first hour: any text trains, the tests pass on a bare clone, nothing on disk is lost
# any text trains, the tests pass on a bare clone, nothing on disk is lost, every script explains itself


def shard_bytes(folder):
    """{file: bytes} of every entry in a folder (hidden ones too), to show that nothing changed."""
    return {f: (folder / f).read_bytes() if (folder / f).is_file() else None for f in sorted(os.listdir(folder))}


def script(name):
    return os.path.join(HERE, name)


def test_the_shipped_sample_text_is_tinyshakespeare_and_no_test_needs_anything_beside_the_repository():
    import hashlib
    assert hashlib.sha256(open(SAMPLE_TEXT, "rb").read()).hexdigest() == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    for name in ("requirements.txt", ".ci/run"):
        assert "shared" not in open(os.path.join(HERE, name)).read()
    assert "scipy" not in open(os.path.join(HERE, "requirements.txt")).read()  # the chi-square test uses torch
    assert "colab/" in open(os.path.join(HERE, ".gitignore")).read().split()


def test_chi_square_pvalue_matches_the_tabulated_quantiles():
    for dof, quantile in ((1, 3.841459), (2, 5.991465), (10, 18.307038)):  # the 5% critical values
        expected = np.full(dof + 1, 100.0)
        observed = expected.copy()
        observed[0] += math.sqrt(quantile * 100 * dof / (dof + 1))   # chi2 = d^2/100 * (1 + 1/dof) = quantile
        observed[1:] -= (observed[0] - 100) / dof
        assert abs(chi_square_pvalue(observed, expected) - 0.05) < 1e-5, dof
    assert chi_square_pvalue(np.array([50.0, 50.0]), np.array([50.0, 50.0])) == 1.0


def test_a_100kb_text_prepares_with_default_flags_and_trains(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(open(SAMPLE_TEXT, encoding="utf-8").read()[:100_000])
    result = run([script("prepare_data.py"), f"--input={text}"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "split as nanoGPT splits a small text" in result.stderr and "2 shards (1 val + 1 train)" in result.stderr
    assert "100k/100k" in result.stderr and "200M" not in result.stderr   # the bar counts this input's bytes
    val, train = prepare_data.list_shards(str(tmp_path / "data" / "story"))
    n_val, n_train = len(prepare_data.load_shard(val[0])), len(prepare_data.load_shard(train[0]))
    assert n_val == math.ceil((n_val + n_train) / 10) and 25_000 < n_train + n_val < 35_000
    result = run([script("train.py"), "--data_dir=data/story", "--max_iters=2", "--eval_interval=2",
                  "--optimizer=adamw", "--warmup_iters=1"] + TRAIN_TINY, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"{n_train:,} training tokens" in result.stdout and "step 2/2" in result.stdout


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_loader_hands_an_injection_model_the_passage_before_each_window_and_resumes_it(tmp_path, order):
    import train
    path = str(tmp_path / "t_train_000000.bin")
    prepare_data.write_shard(path, np.arange(5000) % 60000)
    loader = train.ShardLoader([path], 4, 32, 50304, order, seed=0, context_len=32)
    for _ in range(3):
        x, y, context = loader.next_batch()
        assert context.shape == (4, 32) and (y == x + 1).all()
        assert (context == x - 32).all()                     # the 32 tokens just before the window, none inside it
    state = loader.state_dict()
    ahead = [t.clone() for t in loader.next_batch()]
    again = train.ShardLoader([path], 4, 32, 50304, order, seed=0, context_len=32)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, again.next_batch()))
    assert len(train.ShardLoader([path], 4, 32, 50304, order, seed=0).next_batch()) == 2   # no injection: (x, y)
    with pytest.raises(core.UsageError, match="plus the 4990 injected"):
        train.ShardLoader([path], 4, 32, 50304, order, seed=0, context_len=4990)


def test_validation_smaller_than_a_batch_gives_one_batch_of_the_windows_it_holds(tmp_path):
    import train
    path = str(tmp_path / "v_val_000000.bin")
    prepare_data.write_shard(path, np.arange(100))
    batches = list(train.val_batches([path], 8, 32, 20, 0, 1))   # 8 x 32 needs 257 tokens: 3 windows fit
    assert len(batches) == 1 and batches[0][0].shape == (3, 32)
    assert batches[0][1][0].tolist() == list(range(1, 33))
    with pytest.raises(core.UsageError, match="fewer than one window"):
        list(train.val_batches([path], 8, 128, 20, 0, 1))


def test_a_failed_or_interrupted_prepare_leaves_the_previous_set_untouched(tmp_path):
    out = tmp_path / "data"
    prepare_data.prepare(DOCS * 4, str(out), "t", shard_size=10, num_proc=1)
    before = shard_bytes(out)

    def failing():  # a source that dies half-way, as a dropped connection or a bad file would
        yield from DOCS * 3
        raise core.UsageError("the source broke")
    with pytest.raises(core.UsageError, match="the source broke"):
        prepare_data.prepare(failing(), str(out), "t", shard_size=10, num_proc=1)
    assert shard_bytes(out) == before

    def interrupted():
        yield from DOCS * 3
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare(interrupted(), str(out), "t", shard_size=10, num_proc=1)
    assert shard_bytes(out) == before and read_all(out) == expected_stream(DOCS * 4)
    with pytest.raises(core.UsageError):  # a new folder that fails is not left behind, empty
        prepare_data.prepare(failing(), str(tmp_path / "new"), "t", shard_size=10, num_proc=1)
    assert not (tmp_path / "new").exists()


def test_ctrl_c_during_prepare_prints_one_line_and_keeps_the_previous_set(tmp_path):
    out = tmp_path / "data"
    prepare_data.prepare(DOCS * 4, str(out), "stdlib", shard_size=10, num_proc=1)
    for attempt in range(3):  # the signal must land while the run tokenizes: a run that ended first is retried
        before = shard_bytes(out)
        # as a terminal's Ctrl+C does, the signal goes to the whole process group: the script and its workers. The
        # child starts with SIGINT at its default, as from a shell: a disposition of "ignore" inherited from this
        # process would keep Python from ever raising KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, script("prepare_data.py"), "--corpus=stdlib", f"--out_dir={out}",
                                 "--num_proc=2"], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while (time.time() < deadline and proc.poll() is None
               and not any(f.endswith(".partial") for f in os.listdir(out))):
            time.sleep(0.01)
        time.sleep(0.5)  # tokenizing
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            break
        proc.communicate()
    else:
        pytest.fail("prepare_data.py finished 3 times before it could be interrupted")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == f"interrupted: {out} is as it was before this run"
    assert shard_bytes(out) == before


def test_readers_refuse_a_folder_that_mixes_runs_or_misses_shards_of_its_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_data.prepare(DOCS * 4, str(a), "t", shard_size=10, num_proc=1)
    prepare_data.prepare(DOCS * 4, str(b), "t", shard_size=10, num_proc=1)
    assert prepare_data.read_header(str(a / "t_val_000000.bin"))[4] == len(os.listdir(a))
    # a swap killed half-way: some shards of the new run, the rest of the old one
    (a / "t_train_000002.bin").write_bytes((b / "t_train_000002.bin").read_bytes())
    with pytest.raises(core.UsageError, match="mixes shards of 2 different prepare_data.py runs"):
        prepare_data.list_shards(str(a))
    os.remove(b / "t_train_000003.bin")
    with pytest.raises(core.UsageError, match=r"holds \d+ of the \d+ shards"):
        prepare_data.list_shards(str(b))
    c = tmp_path / "c"  # two corpora in one folder
    prepare_data.prepare(DOCS * 4, str(c), "t", shard_size=10, num_proc=1)
    prepare_data.write_shard(str(c / "u_train_000009.bin"), [1, 2, 3])
    with pytest.raises(core.UsageError, match="mixes the shards of 2 corpora"):
        prepare_data.list_shards(str(c))
    result = run(["train.py", f"--data_dir={a}", "--max_iters=1"] + TRAIN_TINY)
    assert one_error_line(result) and "different prepare_data.py runs" in result.stderr


def test_another_corpus_needs_overwrite_and_then_replaces_the_whole_set(tmp_path):
    out = tmp_path / "data"
    prepare_data.prepare(DOCS * 4, str(out), "old", shard_size=10, num_proc=1)
    before = shard_bytes(out)
    text = tmp_path / "new.txt"
    text.write_text(" ".join(DOCS * 3))
    result = run_cli(f"--input={text}", f"--out_dir={out}", "--shard_size=20", "--num_proc=1")
    assert one_error_line(result) and "--overwrite" in result.stderr and "old" in result.stderr
    assert shard_bytes(out) == before
    result = run_cli(f"--input={text}", f"--out_dir={out}", "--shard_size=20", "--num_proc=1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert all(f.startswith("new_") for f in os.listdir(out)) and read_all(out) == expected_stream([text.read_text()])


def test_a_killed_runs_hidden_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "data"
    prepare_data.prepare(DOCS * 4, str(out), "t", shard_size=10, num_proc=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".prepare-{int(dead.stdout)}.partial"
    stale.mkdir()
    (stale / "t_train_000007.bin").write_bytes(b"half a shard")
    prepare_data.prepare(DOCS * 4, str(out), "t", shard_size=10, num_proc=1)
    assert not stale.exists() and not [f for f in os.listdir(out) if f.startswith(".")]


def test_a_file_that_is_not_text_is_refused_alone_and_skipped_among_others(tmp_path):
    binary = tmp_path / "photo.txt"
    binary.write_bytes(bytes(range(256)) * 40)          # a binary file renamed .txt
    result = run_cli(f"--input={binary}", f"--out_dir={tmp_path / 'out'}")
    assert one_error_line(result) and "is not UTF-8 text" in result.stderr and "NUL" in result.stderr
    assert not (tmp_path / "out").exists()
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)   # another encoding
    with pytest.raises(core.UsageError, match="are not UTF-8"):
        prepare_data.read_text(str(latin))
    (tmp_path / "story.txt").write_text(" ".join(DOCS * 3))
    result = run_cli(f"--input={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--shard_size=20", "--num_proc=1")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 file(s) that are not UTF-8 text" in result.stderr
    assert read_all(tmp_path / "out") == expected_stream([(tmp_path / "story.txt").read_text()])


@pytest.mark.parametrize("name", ["train.py", "prepare_data.py", "sample.py", "bench.py", "export_colab.py"])
def test_every_script_has_help_listing_each_setting_with_its_default_and_one_line(name):
    result = run([name, "--help"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    settings = [line for line in result.stdout.splitlines() if line.startswith("  --")]
    assert len(settings) >= 3
    assert all("=" in line for line in settings)
    undescribed = [line for line in settings if len(line.split(None, 1)) < 2]
    assert not undescribed, undescribed
    if name == "train.py":
        assert "--max_iters=5000" in result.stdout and "--warmup_iters=100" in result.stdout


def test_train_help_lists_the_chosen_models_own_fields_with_their_comments():
    import re
    result = run(["train.py", "--model=v6", "--help"])
    assert result.returncode == 0
    assert re.search(r"--chunk_size=8 +chunk mode: tokens per chunk", result.stdout)


def test_help_text_reads_the_comment_on_each_settings_line(tmp_path):
    import re
    source = tmp_path / "s.py"
    source.write_text('alpha = 3          # the first\nbeta = "x # not a comment"\n'
                      'CFG = dict(\n    gamma=1.5,   # the third\n)\n'
                      'class C:\n    delta: int = 2   # the fourth\n    def f(self):\n        alpha = 9  # no\n')
    text = configurator.help_text({"alpha": 3, "beta": "x # not a comment", "gamma": 1.5, "delta": 2},
                                  [str(source)], "A script.", {"beta": "fallback"})
    assert text.startswith("A script.")
    assert re.search(r"--alpha=3 +the first", text) and re.search(r"--gamma=1.5 +the third", text)
    assert re.search(r"--delta=2 +the fourth", text) and re.search(r"--beta='x # not a comment' +fallback", text)


def test_ctrl_c_and_usage_errors_under_main_guard_are_one_line(tmp_path):
    code = ("import configurator, core\n"
            "def boom():\n    raise KeyboardInterrupt\n"
            "configurator.main_guard(boom)\n")
    result = run(["-c", code])
    assert result.returncode == 130 and result.stderr == "interrupted (Ctrl+C)\n"
    code = "import configurator, core\ndef bad():\n    raise core.UsageError('x')\nconfigurator.main_guard(bad)\n"
    assert run(["-c", code], env={**os.environ, "RANK": "1"}).stderr == ""     # other ranks stay quiet
    assert run(["-c", code]).stderr == "error: x\n"


def test_headline_command_without_fineweb_says_the_one_command_then_uses_the_offline_corpus(tmp_path):
    result = run([script("train.py"), "--model=v6", "--mode=chunk"], cwd=str(tmp_path))
    assert one_error_line(result) and "`python prepare_data.py --corpus=stdlib" in result.stderr
    assert "data/fineweb-edu" in result.stderr and "--out_dir=data/fineweb-edu" not in result.stderr
    paths = prepare_data.stdlib_paths()[:20]
    prepare_data.prepare(prepare_data.text_files(paths), str(tmp_path / "data" / "stdlib"), "stdlib",
                         shard_size=1_000_000, num_proc=1, log=print)
    result = run([script("train.py"), "--model=v6", "--mode=chunk", "--max_iters=1", "--eval_interval=0",
                  "--optimizer=adamw", "--warmup_iters=0"] + TRAIN_TINY, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "note: no fineweb-edu shards in data/fineweb-edu: training on the offline corpus in data/stdlib" \
        in result.stdout and "step 1/1" in result.stdout


def test_resume_keeps_the_checkpoints_model_and_data_and_names_the_flags_it_ignores(shard_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--max_iters=2", "--eval_interval=0", "--optimizer=adamw", "--warmup_iters=1"]
    assert run(["train.py", "--model=v3", f"--data_dir={shard_dir}", f"--out_dir={out}"] + args + TRAIN_TINY,
               ).returncode == 0
    # no --model, no --data_dir, another width and context: the checkpoint's win, and the line says so
    result = run([script("train.py"), f"--out_dir={out}", "--init_from=resume", "--max_iters=3"]
                 + TRAIN_TINY + ["--d_model=64", "--max_seq_len=16"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ignored --d_model=64 (checkpoint: 32), --max_seq_len=16 (checkpoint: 32)" in result.stdout
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["model_name"] == "v3" and state["iter_num"] == 3
    assert state["model_config"]["d_model"] == 32 and state["train_config"]["data_dir"] == shard_dir
    result = run(["train.py", f"--out_dir={out}", "--init_from=resume", "--model=gpt"])
    assert one_error_line(result) and "holds model 'v3'" in result.stderr


def test_resume_after_a_kill_cleans_the_temporary_and_logs_each_step_once(shard_dir, tmp_path):
    args = ["train.py", f"--data_dir={shard_dir}", "--log_interval=1", "--eval_interval=2", "--optimizer=adamw",
            "--warmup_iters=5"] + TRAIN_TINY
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    result = run(args + ["--max_iters=4", f"--out_dir={straight}"])
    assert result.returncode == 0, result.stderr
    assert "warning: warmup_iters=5 is not shorter than max_iters=4" in result.stdout
    assert run(args + ["--max_iters=2", f"--out_dir={killed}"]).returncode == 0
    # what a kill -9 after the step-2 checkpoint leaves: log lines past it, a torn line, a half-written save
    with open(os.path.join(killed, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "val_loss": 9.0}\n{"step": 5, "lo')
    with open(os.path.join(killed, "ckpt.pt.tmp"), "wb") as f:
        f.write(b"half a checkpoint")
    result = run(args + ["--max_iters=4", f"--out_dir={killed}", "--init_from=resume"])
    assert result.returncode == 0, result.stderr
    assert "removed ckpt.pt.tmp" in result.stdout and "dropped 4 line(s) of log.jsonl" in result.stdout
    assert not os.path.exists(os.path.join(killed, "ckpt.pt.tmp"))
    steps = [(r["step"], "val_loss" in r) for r in read_log(killed)]
    assert steps == [(r["step"], "val_loss" in r) for r in read_log(straight)]
    assert len(steps) == len(set(steps)) and (2, True) in steps and (4, True) in steps


def test_torchrun_with_an_indivisible_accumulation_errors_once_naming_the_flag(shard_dir, tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run(torchrun + ["train.py", f"--data_dir={shard_dir}", f"--out_dir={tmp_path}"] + TRAIN_TINY,
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--gradient_accumulation_steps=2" in errors[0], output[-3000:]


def run_colab_driver(script_path, cwd, argv, cuda):
    """Run an exported script's settings logic with train.main replaced by a print of its argv (and, for
    `cuda`, torch.cuda.is_available() answering True), in a fresh process: no training, no GPU needed."""
    driver = (
        "import json, runpy, sys, torch\n"
        f"torch.cuda.is_available = lambda: {cuda}\n"
        f"sys.argv = {[script_path] + argv!r}\n"
        f"g = runpy.run_path({script_path!r}, run_name='colab')\n"
        "g['train'].main = lambda: print('TRAIN_ARGV ' + json.dumps(sys.argv))\n"
        "g['configurator'].main_guard(g['_colab_main'])\n")
    result = run(["-c", driver], cwd=cwd, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stdout.splitlines() if x.startswith("TRAIN_ARGV ")][0]
    return result, json.loads(line[len("TRAIN_ARGV "):])


def test_colab_script_picks_t4_settings_on_a_gpu_and_small_ones_on_a_cpu_and_scales_warmup(tmp_path):
    import export_colab
    path = export_colab.export("gpt", str(tmp_path))
    (tmp_path / "my text.txt").write_text(open(SAMPLE_TEXT, encoding="utf-8").read()[:50_000])
    result, argv = run_colab_driver(path, str(tmp_path), ["--input=my text.txt"], cuda=True)
    assert "preset t4 (PRESET = 'auto' found a CUDA GPU)" in result.stdout
    assert "--d_model=768" in argv and "--gradient_accumulation_steps=16" in argv and "--warmup_iters=2000" in argv
    assert f"--data_dir={os.path.join('data', 'my text')}" in argv
    result, argv = run_colab_driver(path, str(tmp_path), ["--input=my text.txt", "--max_iters=5"], cuda=True)
    assert "warming up for 0 steps instead" in result.stdout
    assert argv.index("--warmup_iters=0") > argv.index("--warmup_iters=2000")   # the later flag wins
    result, argv = run_colab_driver(path, str(tmp_path), ["--input=my text.txt"], cuda=False)
    assert "preset cpu (PRESET = 'auto' found no CUDA GPU)" in result.stdout
    assert "--d_model=128" in argv and "--d_model=768" not in argv and "--eval_iters=5" in argv
    _, argv = run_colab_driver(path, str(tmp_path), ["--input=my text.txt", "--preset=t4"], cuda=False)
    assert "--d_model=768" in argv
    assert 'PRESET = "auto"' in open(path).read()


def test_colab_script_trains_a_100kb_text_on_a_cpu_with_its_default_settings(tmp_path):
    import export_colab
    path = export_colab.export("gpt", str(tmp_path))
    (tmp_path / "novel.txt").write_text(open(SAMPLE_TEXT, encoding="utf-8").read()[:100_000])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the defaults but for the run's length: the CPU preset's 150 steps take a minute or more here
    result = run([path, "--input=novel.txt", "--max_iters=3"], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "split as nanoGPT splits a small text" in result.stderr and "100k/100k" in result.stderr
    assert "200M" not in result.stderr
    assert "preset cpu" in result.stdout and "step 3/3" in result.stdout and "warning" not in result.stdout
    assert "d_model" not in result.stderr and "model gpt (token): 7," in result.stdout  # cpu_tiny's 7.2M
    help_out = run([path, "--help"], cwd=str(tmp_path), env=env)
    assert help_out.returncode == 0 and "--preset=auto" in help_out.stdout and "--max_iters=5000" in help_out.stdout


def test_bench_fast_is_the_control_and_the_flagship_at_tiny_sizes_and_labels_its_memory_size():
    import bench
    assert bench.FAST["models"] == "gpt,v6" and bench.FAST["d_model"] <= 32
    result = run(["bench.py", "--fast", "--what=memory", "--models=gpt"])
    assert result.returncode == 0, result.stderr
    title = [line for line in result.stdout.splitlines() if line.startswith("### Memory")][0]
    assert "T4-size" not in title and "d_model 64" in title and "not the T4 size" in title


if __name__ == "__main__":
    class Count:
        def __init__(self):
            self.passed = self.failed = self.skipped = 0

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                if report.outcome == "passed":
                    self.passed += 1
                elif report.outcome == "skipped":
                    self.skipped += 1
                else:
                    self.failed += 1

    count = Count()
    code = pytest.main([__file__, "-q"] + sys.argv[1:], plugins=[count])
    print(f"{count.passed} passed, {count.failed} failed, {count.skipped} skipped")
    sys.exit(code)
