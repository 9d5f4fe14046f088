"""
Benchmarks of every registered model against the gpt control, measured side by side in one process and run.
$ python bench.py                                  # everything at the cpu_tiny size (about 10 minutes on 2 cores)
$ python bench.py --what=throughput --models=gpt,v3
$ python bench.py --out=results --update_readme    # tables + plots in results/, README results section rewritten
$ python bench.py --fast                           # tiny sizes, seconds: the test suite's smoke run
Measurements: throughput (tokens/s; FLOP/s counted from each model's own forward; fraction of the measured
matmul peak), quality at equal token budget (val loss, bits per byte), generation (uncached / cached /
speculative tokens/s, accepted drafts, greedy equality), memory of one T4-size training step, KV-cache bytes
per token, v4.1's paged KV cache against a contiguous one on a ragged batch (bytes, decode tokens/s), and data
preparation speed.
Absolute numbers depend on the machine; compare the ratios to gpt, which are measured in the same run.
"""

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import configurator
import core
import prepare_data

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TEXT = os.path.join(HERE, "assets", "tinyshakespeare.txt")  # shipped with the repository

SETTINGS = dict(
    what="all",               # all, or a comma list of: throughput, quality, generation, memory, data, mechanisms, paged,
                              # injection
                              # (profile: the top costs of a training step of each model at both sizes, not in all)
    models="all",             # all, or a comma list of names (gpt is always added as the control)
    d_model=128, n_layers=4, n_heads=4,  # the config/cpu_tiny.py model
    max_seq_len=128,          # training window and generation context
    batch_size=4,             # sequences per training step
    steps=3,                  # timed training steps per model for throughput (after 2 warm-up steps)
    large=True,               # throughput also at d_model 384, 6 layers, batch 2 x 256 (LARGE), where V matters less
    quality_iters=16,         # training steps per model and seed for quality, same tokens for all (raise it to compare)
    budget_s=0.0,             # > 0: also quality at equal wall-clock, each model training for about this many seconds
    seeds=1,                  # quality runs per model, with seeds 0, 1, ...: mean and half-range
    data_dir="",              # shards for quality; "": assets/tinyshakespeare.txt, prepared in the run
    gen_tokens=100,           # new tokens after a 16-token prompt; prompt + new must fit max_seq_len (no sliding)
    draft_len=4,              # tokens drafted per model call in speculative decoding
    out="",                   # directory for tables (.md), plots (.png) and runs; "": a temporary directory
    update_readme=False,      # rewrite README.md between the bench markers with these tables
    fast=False,               # the smoke test: tiny sizes, few steps, models gpt and v6 unless --models is given
)
# --fast: tiny sizes, few steps and, unless --models says otherwise, the control and the flagship only (each
# model's quality run is a train.py process of a few seconds): the smoke test
FAST = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=48, batch_size=2, steps=1, quality_iters=4,
            gen_tokens=16, models="gpt,v6")
T4 = dict(d_model=768, n_layers=16, n_heads=12, max_seq_len=512)  # config/t4.py, batch 1
LARGE = dict(d_model=384, n_layers=6, n_heads=6, max_seq_len=256, batch_size=2, steps=2, warmup=1)  # the second throughput size
FAST_LARGE = dict(d_model=48, n_layers=2, n_heads=2, max_seq_len=64, batch_size=2, steps=1, warmup=1)
FAST_T4 = dict(d_model=64, n_layers=2, n_heads=2, max_seq_len=64)


def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def model_label(name, mode):
    return name if mode == "token" else f"{name} ({mode})"


# -----------------------------------------------------------------------------
# throughput

def matmul_peak_flops(n=1024, seconds=1.0):
    """The machine's fp32 matmul FLOP/s, measured now: the ceiling the models' achieved FLOP/s compare to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def train_step_seconds(model, B, T, steps, warmup=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1))
    model.train()
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)  # the fastest step: a busy neighbour only ever adds time


def size_of(s):
    return dict(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_seq_len=s["max_seq_len"])


def bench_throughput(pairs, s, peak=None):
    """Training tokens/s of every model at the size in s. gpt is timed before each model and the ratio is taken
    against that neighbouring gpt measurement, so a busy neighbour slows both sides of a ratio alike."""
    peak = peak or matmul_peak_flops()
    size = size_of(s)
    B, T = s["batch_size"], s["max_seq_len"]
    rows, results = [], {}
    torch.manual_seed(0)
    gpt = core.build_model("gpt", **size)
    for name, mode in pairs:
        torch.manual_seed(0)
        model = gpt if name == "gpt" else core.build_model(name, mode=mode, **size)
        warmup = s.get("warmup", 2)
        dt_gpt = train_step_seconds(gpt, B, T, s["steps"], warmup)
        dt = dt_gpt if name == "gpt" else train_step_seconds(model, B, T, s["steps"], warmup)
        tok_s = B * T / dt
        flops = model.flops_per_token() * tok_s
        results[(name, mode)] = dict(tokens_per_s=tok_s, flops=flops, params=model.num_params(), step_s=dt,
                                     vs_gpt=dt_gpt / dt, flops_vs_gpt=flops / (gpt.flops_per_token() * B * T / dt_gpt))
    for (name, mode), r in results.items():
        rows.append([model_label(name, mode), f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}",
                     f"{r['vs_gpt']:.2f}", f"{r['flops'] / 1e9:.1f}", f"{r['flops'] / peak:.1%}",
                     f"{r['flops_vs_gpt']:.2f}"])
    title = (f"Training throughput (d_model {size['d_model']}, {size['n_layers']} layers, batch {B} x {T}, fp32; "
             f"matmul peak measured {peak / 1e9:.1f} GFLOP/s)")
    header = ["model", "params", "tokens/s", "vs gpt", "GFLOP/s (counted)", "of peak", "FLOP/s vs gpt"]
    return table(title, header, rows), results


def bench_profile(pairs, s, sizes):
    """The top costs of one training step (forward, backward, AdamW) of every model at each size, by torch's
    profiler: operator, input shapes and share of the step's self CPU time (the five largest)."""
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for label, size in sizes:
        B, T = size["batch_size"], size["max_seq_len"]
        for name, mode in pairs:
            torch.manual_seed(0)
            model = core.build_model(name, mode=mode, **size_of(size))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
            model.train()

            def step():
                model(x[:, :-1], targets=x[:, 1:]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            top = "; ".join(f"{e.key.replace('aten::', '')} {e.input_shapes[:2] if e.input_shapes else ''} "
                            f"{e.self_cpu_time_total / total:.0%}".replace("|", "/") for e in events[:5])
            rows.append([model_label(name, mode), label, f"{total / 1e6:.2f}", top])
    return table("Top costs of one training step (torch.profiler, self CPU time; shapes of the first two inputs)",
                 ["model", "size", "step s (profiled)", "top five operators: share of the step"], rows)


# -----------------------------------------------------------------------------
# quality at equal budget (through train.py, so the numbers are the training script's own)

def default_shards(work):
    data_dir = os.path.join(work, "data")
    if os.path.exists(SAMPLE_TEXT):
        docs, name, shard = prepare_data.text_files([SAMPLE_TEXT]), "tinyshakespeare", 60_000
    else:
        print(f"bench: {SAMPLE_TEXT} is absent; using the stdlib corpus", file=sys.stderr)
        docs, name, shard = prepare_data.text_files(prepare_data.stdlib_paths()[:300]), "stdlib", 200_000
    prepare_data.prepare(docs, data_dir, name, shard_size=shard, max_tokens=shard * 6, num_proc=1)
    return data_dir


def bytes_per_token(data_dir, B, T, iters):
    from train import val_batches
    enc = prepare_data.get_tokenizer()
    val, _ = prepare_data.list_shards(data_dir)
    n_tokens = n_bytes = 0
    for _, y in val_batches(val, B, T, iters, 0, 1):
        n_tokens += y.numel()
        n_bytes += sum(len(enc.decode_bytes(row.tolist())) for row in y)
    return n_bytes / n_tokens


def bench_quality(pairs, s, work, data_dir, step_s=None):
    """Val loss after training every model through train.py on the same data: for quality_iters steps each (equal
    tokens) or, with step_s {(name, mode): seconds per training step}, for budget_s / step_s steps each (equal
    wall-clock, from each model's measured step time at this size)."""
    iters, B, T = s["quality_iters"], s["batch_size"], s["max_seq_len"]
    steps_of = {}
    eval_iters = 4
    bpt = bytes_per_token(data_dir, B, T, eval_iters)
    corpus = os.path.basename(prepare_data.list_shards(data_dir)[0][0]).rsplit("_val_", 1)[0]
    curves, finals, runs = {}, {}, {}
    for name, mode in pairs:
        if step_s:
            iters = max(1, round(s["budget_s"] / step_s[(name, mode)]))
        steps_of[(name, mode)] = iters
        for seed in range(s["seeds"]):
            out_dir = os.path.join(work, "runs", f"{name}-{mode}-s{seed}" + ("-budget" if step_s else ""))
            cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--model={name}", f"--mode={mode}",
                   f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--d_model={s['d_model']}",
                   f"--n_layers={s['n_layers']}", f"--n_heads={s['n_heads']}", f"--max_seq_len={T}",
                   f"--batch_size={B}", f"--max_iters={iters}", f"--eval_interval={iters}",
                   f"--eval_iters={eval_iters}", f"--log_interval={max(1, iters // 20)}", "--optimizer=adamw",
                   f"--warmup_iters={max(1, iters // 10)}", "--learning_rate=2e-3", f"--seed={seed}",
                   "--device=cpu"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"training {name} ({mode}) failed:\n{result.stderr[-2000:]}")
            with open(os.path.join(out_dir, "log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            finals.setdefault((name, mode), []).append([r["val_loss"] for r in log if "val_loss" in r][-1])
            if seed == 0:
                curves[(name, mode)] = [(r["step"], r["loss"]) for r in log if "loss" in r]
                runs[(name, mode)] = out_dir
    gpt = finals.get(("gpt", "token"))  # absent when only the injection table was asked for
    base = sum(gpt) / len(gpt) if gpt else None
    rows = []
    for (name, mode), losses in finals.items():
        mean = sum(losses) / len(losses)
        spread = f" ± {(max(losses) - min(losses)) / 2:.3f}" if len(losses) > 1 else ""
        rows.append([model_label(name, mode)] + ([f"{steps_of[(name, mode)]}"] if step_s else [])
                    + [f"{mean:.3f}{spread}", f"{mean / math.log(2) / bpt:.3f}",
                       "-" if base is None else f"{mean - base:+.3f}"])
    if step_s:
        title = (f"Quality at equal wall-clock (about {s['budget_s']:.0f} s of training each: steps = budget / the "
                 f"model's measured step time; batch {B} x {T}, {s['seeds']} seed(s); d_model {s['d_model']}, "
                 f"{s['n_layers']} layers; data: {corpus})")
        header = ["model", "steps", "val loss (nats/token)", "bits per byte", "vs gpt"]
    else:
        title = (f"Quality at equal budget ({iters} steps x {B} x {T} tokens = {iters * B * T:,} tokens, "
                 f"{s['seeds']} seed(s); d_model {s['d_model']}, {s['n_layers']} layers; data: {corpus})")
        header = ["model", "val loss (nats/token)", "bits per byte", "vs gpt"]
    return table(title, header, rows), curves, runs


# -----------------------------------------------------------------------------
# generation from the trained checkpoints

def timed_generate(model, prompt, n, **kw):
    stats = {}
    t0 = time.perf_counter()
    out = model.generate(prompt, n, stats=stats, **kw)
    return out, n / (time.perf_counter() - t0), stats


GEN_REPEATS = 3   # cached and speculative runs are timed this many times, interleaved; the fastest of each counts


def bench_generation(runs, s, data_dir):
    """Uncached, cached and speculative decoding of every checkpoint, greedy and sampled. Single timings on a shared
    CPU move by 10-20 %, as much as the differences measured, so the cached and speculative configurations are run
    GEN_REPEATS times in turn and each reports its fastest run (the sampled ones restart from the same seed)."""
    n = s["gen_tokens"]
    val, _ = prepare_data.list_shards(data_dir)
    prompt = torch.from_numpy(prepare_data.load_shard(val[0])[:16].astype("int64"))[None]
    rows = []
    for (name, mode), run_dir in runs.items():
        model = core.model_from_checkpoint(core.load_checkpoint(run_dir)).eval()
        uncached, r_unc, _ = timed_generate(model, prompt, n, temperature=0, use_cache=False)
        configs = {"cached": dict(temperature=0), "spec": dict(temperature=0, speculative=True),
                   "sampled": dict(temperature=0.8, top_k=50),
                   "spec_sampled": dict(temperature=0.8, top_k=50, speculative=True)}
        best = {}
        for _ in range(1 if s["fast"] else GEN_REPEATS):
            for key, kw in configs.items():
                kw = dict(kw, generator=torch.Generator().manual_seed(0)) if "top_k" in kw else kw
                if kw.get("speculative"):
                    kw = dict(kw, draft_len=s["draft_len"])
                run = timed_generate(model, prompt, n, **kw)
                if key not in best or run[1] > best[key][1]:
                    best[key] = run
        (cached, r_c, _), (speculative, r_s, st) = best["cached"], best["spec"]
        r_cs, (r_ss, st_s) = best["sampled"][1], best["spec_sampled"][1:]
        same = torch.equal(uncached, cached) and torch.equal(cached, speculative)
        rows.append([model_label(name, mode), f"{r_unc:,.1f}", f"{r_c:,.1f}", f"{r_c / r_unc:.1f}x",
                     f"{r_s:,.1f}", f"{r_s / r_c:.2f}x", f"{n / st['model_calls']:.2f}",
                     f"{r_ss / r_cs:.2f}x", f"{n / st_s['model_calls']:.2f}", "yes" if same else "NO"])
    title = (f"Generation ({n} new tokens after a 16-token prompt, batch 1, CPU; speculative draft length "
             f"{s['draft_len']}; sampled: temperature 0.8, top-k 50; cached and speculative: fastest of "
             f"{1 if s['fast'] else GEN_REPEATS} interleaved runs)")
    header = ["model", "uncached tok/s", "cached tok/s", "cached vs uncached", "speculative tok/s",
              "speculative vs cached", "tokens/call (greedy)", "speculative vs cached (sampled)", "tokens/call (sampled)",
              "greedy outputs equal"]
    return table(title, header, rows)


# -----------------------------------------------------------------------------
# mechanisms: what each adaptive part does after training, measured on held-out windows
#
# Each entry of MECHANISMS is f(name, model, val_windows) -> list of row dicts, one row per thing measured, with
# the keys of MECHANISM_COLUMNS (missing ones print as "-"); a function returns [] for a model without its
# mechanism. `model` is the eval-mode model of a quality run's checkpoint (name as in the quality table, e.g.
# "v4 (chunk)"), val_windows a list of (x, y) token batches of the validation split. ablation_dloss is the held-out
# loss with the mechanism switched off minus the loss with it on: ~0 says the mechanism does nothing.

MECHANISMS = []
MECHANISM_COLUMNS = ["model", "mechanism", "measure", "value", "ablation_dloss"]


def mechanism(fn):
    """Register a row function of the mechanisms table."""
    MECHANISMS.append(fn)
    return fn


@torch.no_grad()
def held_out_loss(model, windows):
    """Mean next-token cross-entropy (nats/token) of an eval-mode model over (x, y) windows."""
    total = count = 0
    for x, y in windows:
        total += core.lm_loss(model(x).logits, y).item() * y.numel()
        count += y.numel()
    return total / count


def mechanism_table(rows):
    def cell(key, v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:+.4f}" if key == "ablation_dloss" else f"{v:.4g}"
        return str(v)
    return [[cell(k, r.get(k)) for k in MECHANISM_COLUMNS] for r in rows]


@torch.no_grad()
def forward_flops_per_token(model, x):
    """FLOPs of one eval forward over x (dense: early exit off), per token, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # missing from the counter's table
                lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    saved, model.config.exit_threshold = model.config.exit_threshold, 2.0
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            model(x)
    finally:
        model.config.exit_threshold = saved
    return counter.get_total_flops() / x.numel()


@mechanism
def early_exit_rows(name, model, windows):
    """Early exit at the checkpoint's threshold (train.py calibrates it on the validation split at the end of
    training, core.calibrate_exit): the exit heads' confidence spread, the share of positions (tokens; chunk slots in
    chunk mode) that stop after each bottom layer, the held-out loss against the dense model (threshold 2: nothing
    exits; ablation Δloss = dense - exiting, negative when exits cost loss) and the FLOPs a per-token implementation
    saves: a skipped block costs 24 D^2 + 4 D keys per position (2 per multiply-add), minus the 4 D^2 of the K/V it
    still writes, against the dense forward's counted FLOPs."""
    trunks = core.exit_trunks(model)
    if not trunks:
        return []
    trunk, c = trunks[0], model.config
    nb, D, threshold = len(trunk.bottom), c.d_model, c.exit_threshold
    dense, _, _ = core.exit_profile(model, windows, 2.0)
    loss, share, conf = core.exit_profile(model, windows, threshold)
    x = windows[0][0]
    T = x.size(1)
    n_axis = T if c.mode == "token" else T // c.chunk_size + 1                # positions of the trunk per window
    per_block = 20 * D * D + 4 * D * (n_axis + 1) / 2                       # mean keys over a causal window
    skipped = sum(share[l].item() * (nb - 1 - l) for l in range(nb))         # bottom blocks skipped per position
    saved = skipped * per_block * n_axis / T / forward_flops_per_token(model, x[:1])
    row = dict(model=name, mechanism="early exit")
    rows = [dict(row, measure="threshold (calibrated)" if threshold <= 1 else "threshold (> 1: never exits)",
                 value=float(threshold)),
            dict(row, measure="exit confidence std over positions", value=conf.std().item())]
    rows += [dict(row, measure=f"share stopping after bottom layer {l + 1} of {nb}", value=share[l].item())
             for l in range(nb)]
    rows += [dict(row, measure="held-out loss cost vs dense (nats/token)", value=loss - dense,
                  ablation_dloss=dense - loss),
             dict(row, measure="forward FLOPs saved (share)", value=saved)]
    return rows


@torch.no_grad()
def exit_depths(model, x):
    """The bottom layers each trunk position (a token; a chunk slot in chunk mode) of x (1, T) runs at the model's
    exit threshold, in eval mode: (positions,)."""
    seen = []
    handle = core.exit_trunks(model)[0].register_forward_hook(lambda m, i, out: seen.append(out[2]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0][0]


def bench_mechanisms(runs, s, data_dir):
    """-> (the mechanisms table, {label: (chunk_size, exit depth per trunk position along the first held-out
    window)} for the models with early exit, for the plot)."""
    from train import val_batches
    val, _ = prepare_data.list_shards(data_dir)
    windows = list(val_batches(val, s["batch_size"], s["max_seq_len"], 4, 0, 1))
    rows, depths = [], {}
    for (name, mode), run_dir in runs.items():
        model = core.model_from_checkpoint(core.load_checkpoint(run_dir)).eval()
        for fn in MECHANISMS:
            rows += fn(model_label(name, mode), model, windows)
        if core.exit_trunks(model):
            depths[model_label(name, mode)] = (model.config.chunk_size if mode == "chunk" else 1,
                                               exit_depths(model, windows[0][0][:1]).tolist())
    title = (f"Mechanisms after training (the quality runs' checkpoints, {sum(x.numel() for x, _ in windows):,} "
             f"held-out tokens; ablation Δloss = loss with the mechanism off minus loss with it on)")
    return table(title, MECHANISM_COLUMNS, mechanism_table(rows)), depths


# routing rows: v4.1's offset routing, v5's processor gates, ChaosLogic's task analyzer, depth, lattice gates and
# pattern selector. Switching a part off is done from the outside for the measurement only: a forward hook that
# replaces a module's output, or an instance attribute that shadows one method until the block ends.

@contextlib.contextmanager
def replaced_output(module, fn):
    """module's forward returns fn(inputs, output) inside the block."""
    handle = module.register_forward_hook(lambda mod, args, out: fn(args, out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def replaced_method(obj, name, fn):
    """obj.name is fn inside the block (the class's method comes back afterwards)."""
    setattr(obj, name, fn)
    try:
        yield
    finally:
        delattr(obj, name)


@torch.no_grad()
def captured(model, module, windows):
    """The outputs of `module` (one tuple or tensor per window) and of the model over the held-out windows."""
    seen = []
    with replaced_output(module, lambda args, out: seen.append(out)):
        outs = [model(x) for x, _ in windows]
    return seen, outs


def spread_rows(name, mechanism_name, p, choice_name):
    """Rows for routing distributions p (N, T, K) (N windows' rows, T positions): mean entropy, per-token spread
    (total variation from the mean routing over the rows at the same position: 0 = one routing for every token)
    and the choices in use as each token's argmax."""
    entropy = -(p * p.clamp_min(1e-9).log()).sum(-1).mean().item()
    tv = 0.5 * (p - p.mean(0, keepdim=True)).abs().sum(-1).mean().item()
    used = p.argmax(-1).unique().numel()
    return [dict(model=name, mechanism=mechanism_name, measure=f"entropy (nats, max ln {p.size(-1)} = "
                 f"{math.log(p.size(-1)):.2f})", value=entropy),
            dict(model=name, mechanism=mechanism_name, measure="per-token spread: mean TV from the mean routing",
                 value=tv),
            dict(model=name, mechanism=mechanism_name, measure=f"{choice_name} used as a token's top choice",
                 value=f"{used} of {p.size(-1)}")]


def gate_rows(name, mechanism_name, g):
    """Rows for sigmoid gates g (N, T, n): mean per gate, per-token spread |g - mean g at the position|, and the
    share of gate values away from 0 and 1."""
    return [dict(model=name, mechanism=mechanism_name, measure="mean gate per layer",
                 value=" / ".join(f"{v:.3f}" for v in g.mean((0, 1)).tolist())),
            dict(model=name, mechanism=mechanism_name, measure="per-token spread: mean |g - mean g|",
                 value=(g - g.mean(0, keepdim=True)).abs().mean().item()),
            dict(model=name, mechanism=mechanism_name, measure="share of gates in (0.05, 0.95)",
                 value=((g > 0.05) & (g < 0.95)).float().mean().item())]


@mechanism
@torch.no_grad()
def v4_1_routing_rows(name, model, windows):
    """v4.1's OffsetRoutingLattice: the per-token routing over offsets and its gate; ablations: the lattice off
    (output = input), and content routing off (every token on the learned static lattice weights w_o)."""
    if type(model).__module__ != "model_v4_1":
        return []
    lattice = model.lattice
    gates, outs = captured(model, lattice.gate, windows)
    a = torch.cat([o.routing for o in outs])                                        # (N, T, W)
    g = torch.sigmoid(torch.cat(gates))
    base = held_out_loss(model, windows)
    with replaced_output(lattice, lambda args, out: (args[0], out[1])):
        lattice_off = held_out_loss(model, windows) - base

    def static(x, start_pos=0):
        t_pos = core.positions(start_pos, x.size(1), x.device)
        z = lattice.offset_logits.expand(*x.shape[:2], -1)
        return z.masked_fill(torch.arange(lattice.window, device=x.device) > t_pos[..., None], float("-inf"))
    with replaced_method(lattice, "routing_logits", static):
        routing_off = held_out_loss(model, windows) - base
    rows = spread_rows(name, "lattice offset routing", a, "offsets")
    rows[1]["ablation_dloss"] = routing_off
    rows.append(dict(model=name, mechanism="lattice offset routing", measure="lattice gate, mean",
                     value=g.mean().item(), ablation_dloss=lattice_off))
    return rows


@mechanism
@torch.no_grad()
def v5_processor_rows(name, model, windows):
    """v5's task-routed processor: its per-token gates; ablations: the processor off (output = input), and the
    router off (each layer's gate fixed at its mean over these windows)."""
    if type(model).__module__ != "model_v5":
        return []
    processor = (model.trunk if model.config.mode == "token" else model.chunk.global_model).processor
    outs = [model(x) for x, _ in windows]
    g = torch.cat([o.gates for o in outs])                                          # (N, T or slots, n)
    base = held_out_loss(model, windows)
    with replaced_output(processor, lambda args, out: (args[0], args[0][:, :, None].expand_as(out[1]),
                                                       torch.full_like(out[2], float("-inf")))):
        processor_off = held_out_loss(model, windows) - base
    mean_logit = torch.logit(g.mean((0, 1)).double()).float()
    with replaced_method(processor, "gate_logits", lambda x, *args: mean_logit.expand(*x.shape[:2], -1)):
        router_off = held_out_loss(model, windows) - base
    rows = gate_rows(name, "processor gates (task router)", g)
    rows[1]["ablation_dloss"] = router_off
    rows[0]["ablation_dloss"] = processor_off
    rows[0]["measure"] += " (ablation: processor off)"
    rows[1]["measure"] += " (ablation: every gate at its mean)"
    return rows


def chaoslogic_dense_patterns(model):
    """ChaosLogic with every layer attending with P0 (dense causal) for every token, inside the block."""
    return replaced_method(model, "select_patterns", lambda tau: (
        torch.nn.functional.one_hot(torch.zeros(*tau.shape[:2], model.n_attn, dtype=torch.long), 4).float(), None))


def chaoslogic_full_depth(model):
    """ChaosLogic with the depth predictor's fraction forced to 1 (every token runs every bottom layer) inside
    the block."""
    return replaced_output(model.task, lambda args, out: (out[0], out[1], torch.ones_like(out[2])))


@mechanism
@torch.no_grad()
def chaoslogic_routing_rows(name, model, windows):
    """ChaosLogic's routers: the task mixture, the depth it sets (layers skipped), the lattice gates and each
    layer's pattern choice (shares of P0 dense, P1 window, P2 Pell-Lucas blocks, P3 window + sinks); ablations:
    the lattice off (gates 0), every pattern dense (P0) and every token at full depth."""
    if type(model).__module__ != "model_chaoslogic":
        return []
    analyzed, outs = captured(model, model.task, windows)
    tau = torch.cat([a[1].softmax(-1) for a in analyzed])                           # (N, T, 4)
    depth = torch.cat([o.depth for o in outs])
    skipped = torch.cat([(o.exit_depth < model.n_bottom).float() for o in outs]).mean().item()
    choice = torch.cat([o.patterns.argmax(-1) for o in outs])                       # (N, T, layers)
    shares = torch.stack([(choice == k).float().mean() for k in range(4)])
    base = held_out_loss(model, windows)
    rows = spread_rows(name, "task analyzer", tau, "tasks")
    if model.n_bottom > model.n_always:
        rows += [dict(model=name, mechanism="depth predictor", measure="bottom depth D_t: mean / std",
                      value=f"{depth.mean().item():.3f} / {depth.std().item():.3f}"),
                 dict(model=name, mechanism="depth predictor", measure="share of tokens that skip a bottom layer "
                      "(ablation: full depth)", value=skipped)]
        with chaoslogic_full_depth(model):
            rows[-1]["ablation_dloss"] = held_out_loss(model, windows) - base
    else:
        rows.append(dict(model=name, mechanism="depth predictor", measure="adaptive bottom layers",
                         value=f"none at n_layers={model.config.n_layers} (needs >= 4)"))
    rows.append(dict(model=name, mechanism="pattern selector",
                     measure="shares of P0 / P1 / P2 / P3 over tokens and layers (ablation: all P0)",
                     value=" / ".join(f"{v:.2f}" for v in shares.tolist())))
    with chaoslogic_dense_patterns(model):
        rows[-1]["ablation_dloss"] = held_out_loss(model, windows) - base
    rows.append(dict(model=name, mechanism="pattern selector", measure="layers whose tokens pick different patterns",
                     value=f"{sum(choice[..., l].unique().numel() > 1 for l in range(choice.size(-1)))} of "
                           f"{choice.size(-1)}"))
    if model.lattice_gate is not None:
        rows += gate_rows(name, "lattice gates", torch.cat([o.lattice_gates for o in outs]))
        with replaced_output(model.lattice_gate, lambda args, out: torch.full_like(out, float("-inf"))):
            rows[-3]["ablation_dloss"] = held_out_loss(model, windows) - base
        rows[-3]["measure"] += " (ablation: lattice off)"
    return rows


@mechanism
@torch.no_grad()
def v8_2_rows(name, model, windows):
    """v8.2's crystalline parts: the top-k path lattice's routing (entropy, per-token spread, paths in use) and the
    held-out loss change when each part is switched off from the outside, its module returning its input: the path
    lattice, the Hebbian fast weights of every block, the diamond coupling of every block, the feedback loop."""
    if type(model).__module__ != "model_v8_2":
        return []
    blocks = list(model.bottom) + list(model.top)
    routed, _ = captured(model, model.lattice.router, windows)
    p = torch.cat([r.view(*x.shape, -1) for r, (x, _) in zip(routed, windows)]).float().softmax(-1)  # (N, T, P)
    base = held_out_loss(model, windows)

    def off(modules, keep=lambda args, out: args[0]):
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(replaced_output(m, keep))
            return held_out_loss(model, windows) - base
    rows = spread_rows(name, "path lattice (top-k routing)", p, "paths")
    rows.append(dict(model=name, mechanism="path lattice (top-k routing)", measure="held-out loss with it on "
                     "(ablation: lattice off)", value=base,
                     ablation_dloss=off([model.lattice], lambda args, out: (args[0],) + tuple(out[1:]))))
    for mechanism, modules in (("Hebbian fast weights", [b.hebbian for b in blocks]),
                               ("diamond coupling", [b.diamond for b in blocks]),
                               ("feedback loop", [model.feedback])):
        rows.append(dict(model=name, mechanism=mechanism, measure=f"held-out loss with it on in {len(modules)} "
                         f"place(s) (ablation: off)", value=base, ablation_dloss=off(modules)))
    return rows


@mechanism
@torch.no_grad()
def spine_attention_rows(name, model, windows):
    """v6 / v7.1.2's causal spine attention (every position reads itself, a local window and its spine-offset
    predecessors): the held-out loss with its blocks switched off (each returns its input) minus with them on."""
    if not any(isinstance(m, core.SpineBlock) for m in model.modules()):
        return []
    base = held_out_loss(model, windows)
    with core.spine_attention_off(model) as n_blocks:
        off = held_out_loss(model, windows) - base
    return [dict(model=name, mechanism="spine attention", measure=f"held-out loss with its {n_blocks} block(s) on",
                 value=base, ablation_dloss=off)]


# -----------------------------------------------------------------------------
# memory

def activation_bytes(model, T):
    """Bytes of the tensors autograd saves for backward in one training forward (parameters excluded):
    the activation memory of a step, measured on the CPU in fp32."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (1, T + 1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
    del loss
    return total


def adamw8bit_bytes(model):
    # bitsandbytes keeps two uint8 moments (+ one fp32 absmax per 256-block each) for tensors of >= 4096
    # elements, and two fp32 moments for smaller ones
    total = 0
    for p in model.parameters():
        total += 2 * p.numel() + 8 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
    return total


# -----------------------------------------------------------------------------
# paged KV cache against a contiguous one (v4.1, whose cache is paged)

PAGED_PROMPTS = [9, 26, 43, 60, 77, 94, 111, 128]   # a ragged batch: 8 prompts of 9..128 tokens
PAGED_NEW = 64                                      # new tokens per prompt


def contiguous_v4_1_cache(model, B):
    """v4.1's state in a contiguous cache: one KVCache per layer, every row preallocated to max_seq_len."""
    cache = core.LM.new_cache(model, B)
    cache.nodes = torch.zeros(B, model.config.max_seq_len, model.config.d_model)
    return cache


@torch.no_grad()
def bench_injection(runs, s, data_dir):
    """Context injection after ordinary training (the quality runs' chunk-mode v6 / v7.1.2 checkpoints, which
    train.py trains with the passage before each window injected into inject_train_prob of the rows): held-out
    next-token loss of validation windows with no injection, with the true preceding max_seq_len tokens injected at
    anchor 0, and with another window's preceding passage."""
    val, _ = prepare_data.list_shards(data_dir)
    tokens = torch.cat([torch.from_numpy(prepare_data.load_shard(p).astype("int64")) for p in val])
    T = s["max_seq_len"]
    n = min(32, (len(tokens) - 1) // T - 1)
    windows = torch.stack([tokens[(i + 1) * T:(i + 2) * T + 1] for i in range(n)])      # (n, T + 1)
    before = torch.stack([tokens[i * T:(i + 1) * T] for i in range(n)])                  # (n, T) the passage before
    rows = []
    for (name, mode), run_dir in runs.items():
        model = core.model_from_checkpoint(core.load_checkpoint(run_dir)).eval()
        if mode != "chunk" or not hasattr(model, "encode_injection"):
            continue

        def loss(passage):
            inj = None if passage is None else [(model.encode_injection(passage), 0)]
            return core.lm_loss(model(windows[:, :-1], injections=inj).logits, windows[:, 1:]).item()

        none, true, other = loss(None), loss(before), loss(before.roll(n // 2, 0))   # a passage from far away
        rows.append([model_label(name, mode), f"{model.config.inject_train_prob:g}", f"{none:.4f}", f"{true:.4f}",
                     f"{other:.4f}", f"{true - none:+.4f}", f"{other - none:+.4f}"])
    title = (f"Context injection after training ({n} held-out windows of {T} tokens; the injected block is the "
             f"{T} tokens before each window, or the {T} tokens before the window {n // 2} windows away)")
    return table(title, ["model", "inject_train_prob", "loss, none", "loss, true passage", "loss, other passage",
                         "Δ true", "Δ other"], rows)


def bench_paged(s):
    """Bytes of K/V allocated and decode tokens/s for the ragged batch: paged (one batch, blocks on demand) against
    contiguous (rows preallocated to the context; rows at different positions cannot share one contiguous decode,
    so each prompt is generated alone), and one sequence decoding through each cache."""
    new, lens = PAGED_NEW, PAGED_PROMPTS
    L = max(s["max_seq_len"], max(lens) + new)
    torch.manual_seed(0)
    model = core.build_model("v4_1", d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                             max_seq_len=L).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lens]
    caches, paged_cache_of = [], model.new_cache
    paged_rate = contiguous_rate = 0.0
    repeats = 1 if s["fast"] else 3
    for _ in range(repeats):  # alternate, best of 3: the machine's other load moves single runs by a lot
        model.new_cache = lambda B, *a, **kw: caches.append(paged_cache_of(B, *a, **kw)) or caches[-1]
        model.ragged_decoding = True
        t0 = time.perf_counter()
        paged_out = model.generate(prompts, new, temperature=0)
        paged_rate = max(paged_rate, len(lens) * new / (time.perf_counter() - t0))
        model.new_cache = lambda B, *a, **kw: contiguous_v4_1_cache(model, B)
        model.ragged_decoding = False
        t0 = time.perf_counter()
        contiguous_out = model.generate(prompts, new, temperature=0)
        contiguous_rate = max(contiguous_rate, len(lens) * new / (time.perf_counter() - t0))
    paged = caches[-1]
    contiguous = contiguous_v4_1_cache(model, len(lens))
    kv_bytes = sum(layer.nbytes() for layer in contiguous.layers)
    per_slot = kv_bytes / (len(lens) * L)
    single = prompts[1][None]
    rates = {}
    for _ in range(repeats):
        for label, make in (("paged", paged_cache_of),
                            ("contiguous", lambda B, *a, **kw: contiguous_v4_1_cache(model, B))):
            model.new_cache = make
            t0 = time.perf_counter()
            model.generate(single, new, temperature=0)
            rates[label] = max(rates.get(label, 0.0), new / (time.perf_counter() - t0))
    del model.new_cache, model.ragged_decoding
    same = all(torch.equal(a, b) for a, b in zip(paged_out, contiguous_out))
    stats = paged.memory_stats()
    rows = [["paged (blocks of 16 on demand), one ragged batch", f"{stats['pool_bytes']:,}", f"{stats['bytes_in_use']:,}",
             f"{paged_rate:,.1f}", f"{rates['paged']:,.1f}", "yes" if same else "NO"],
            [f"contiguous, rows preallocated to the context ({L})", f"{kv_bytes:,}", f"{kv_bytes:,}",
             f"{contiguous_rate:,.1f} (each prompt alone)", f"{rates['contiguous']:,.1f}", "-"],
            [f"contiguous, rows padded to the longest ({max(lens) + new})",
             f"{int(per_slot * len(lens) * (max(lens) + new)):,}", "-", "-", "-", "-"]]
    title = (f"Paged against contiguous KV cache (v4.1, d_model {s['d_model']}, {s['n_layers']} layers, fp32, untrained "
             f"weights, CPU): {len(lens)} prompts of {min(lens)}..{max(lens)} tokens + {new} new tokens each "
             f"(greedy); K/V bytes allocated (the pool) and in use at the end, decode tokens/s of the batch and of "
             f"one {lens[1]}-token prompt alone")
    header = ["cache", "K/V bytes allocated", "K/V bytes in use", "batch decode tok/s", "one sequence tok/s",
              "same tokens"]
    return table(title, header, rows)


def full_cache_bytes(model, n_tokens):
    """Bytes of a one-row fp16 decoding cache holding n_tokens: a paged cache allocates blocks as a row grows, so
    it is first grown to what a row of n_tokens needs."""
    cache = model.new_cache(1, dtype=torch.float16)
    if hasattr(cache, "reserve"):
        cache.reserve([0], [n_tokens])
    return cache.nbytes()


@contextlib.contextmanager
def initialisation_skipped():
    """Build models without drawing their initial weights, as transformers' no_init_weights does: torch.nn.init's
    fills are no-ops inside, and the caller zeroes the parameters (memset-fast, and no garbage NaN or denormal
    slows a forward). For the memory table, whose figures (parameter counts, tensors saved for backward, cache
    bytes) depend on shapes only: the training forward has no data-dependent shapes. Drawing the T4-size
    weights took 2-5 s a model."""
    fills = ["normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "orthogonal_", "zeros_", "ones_", "constant_"]
    saved = {name: getattr(torch.nn.init, name) for name in fills}
    for name in fills:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(torch.nn.init, name, fill)


def bench_memory(pairs, s):
    size = FAST_T4 if s["fast"] else T4
    rows = []
    for name, mode in pairs:
        with initialisation_skipped():
            model = core.build_model(name, mode=mode, **size)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        n = model.num_params()
        weights, grads, optim = 4 * n, 4 * n, adamw8bit_bytes(model)
        acts = activation_bytes(model, size["max_seq_len"])
        kv_per_token = full_cache_bytes(model, size["max_seq_len"]) / size["max_seq_len"]
        total = weights + grads + optim + acts / 2
        rows.append([model_label(name, mode), f"{n / 1e6:.1f}M", f"{weights / 2**30:.2f}", f"{grads / 2**30:.2f}",
                     f"{optim / 2**30:.2f}", f"{acts / 2**30:.2f}", f"{total / 2**30:.2f}",
                     f"{kv_per_token / 1024:.1f}"])
        del model
    label = "T4-size (config/t4.py)" if size == T4 else "--fast-size (not the T4 size)"
    title = (f"Memory of one {label} training step (d_model {size['d_model']}, {size['n_layers']} layers, seq "
             f"{size['max_seq_len']}, batch 1): ESTIMATE from CPU measurements, not a CUDA reading. Weights and "
             f"grads fp32, 8-bit AdamW state, activations = tensors saved for backward measured in fp32; the "
             f"total counts them halved for fp16 autocast. KV cache per token in fp16.")
    header = ["model", "params", "weights GiB", "grads GiB", "AdamW8bit GiB", "activations fp32 GiB",
              "est. total GiB", "KV cache KiB/token"]
    return table(title, header, rows)


def bench_memory_cuda(pairs, s):
    """On a GPU: the real peak of one fp16 step with GradScaler and bitsandbytes AdamW8bit."""
    import bitsandbytes as bnb
    rows = []
    for name, mode in pairs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = core.build_model(name, mode=mode, **T4).cuda()
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda")
        x = torch.randint(0, model.config.vocab_size, (1, T4["max_seq_len"] + 1), device="cuda")
        for _ in range(2):  # the optimizer state exists from the first step on
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x[:, :-1], targets=x[:, 1:]).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
        kv = full_cache_bytes(model, T4["max_seq_len"]) / T4["max_seq_len"]
        rows.append([model_label(name, mode), f"{model.num_params() / 1e6:.1f}M", f"{peak / 2**30:.2f}",
                     "yes" if peak <= 12 * 2**30 else "NO", f"{kv / 1024:.1f}"])
        del model, opt
    title = f"Peak CUDA memory of a T4-size fp16 training step with AdamW8bit ({torch.cuda.get_device_name()})"
    return table(title, ["model", "params", "peak GiB", "<= 12 GB", "KV cache KiB/token"], rows)


# -----------------------------------------------------------------------------
# data preparation

def bench_data(s, work):
    paths = prepare_data.stdlib_paths()[:100 if s["fast"] else 600]
    texts = list(prepare_data.text_files(paths))
    enc = prepare_data.get_tokenizer()
    procs = os.cpu_count() or 1
    enc.encode_ordinary_batch(texts[:50], num_threads=procs)  # warm-up: the first call pays one-off setup costs
    t0 = time.perf_counter()
    raw = sum(len(t) + 1 for t in enc.encode_ordinary_batch(texts, num_threads=procs))
    raw_rate = raw / (time.perf_counter() - t0)
    stats = prepare_data.prepare(iter(texts), os.path.join(work, "data_bench"), "bench",
                                 shard_size=max(1, raw // 3), num_proc=procs)
    rate = stats["tokens"] / stats["seconds"]
    rows = [[f"{len(texts)} stdlib files", f"{raw:,}", f"{raw_rate:,.0f}", f"{rate:,.0f}", f"{rate / raw_rate:.0%}"]]
    title = f"Data preparation ({procs} processes / threads, GPT-2 BPE)"
    return table(title, ["input", "tokens", "tiktoken encode_ordinary_batch tok/s", "prepare_data tok/s",
                         "prepare_data vs raw"], rows)


# -----------------------------------------------------------------------------
# plots and README

def plot(curves, throughput, out, depths=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (name, mode), points in curves.items():
            ax.plot(*zip(*points), label=model_label(name, mode), lw=2.5 if name == "gpt" else 1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title("Training loss at equal budget")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, "loss_curves.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if throughput:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [model_label(*k) for k in throughput]
        ax.bar(labels, [r["tokens_per_s"] for r in throughput.values()], color="tab:blue")
        ax.set_ylabel("training tokens/s")
        ax.set_title("Training throughput (same width and depth)")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        fig.tight_layout()
        paths.append(os.path.join(out, "throughput.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if depths:  # a chunk slot covers chunk_size tokens: drawn over them, so every strip shares the token axis
        fig, axes = plt.subplots(len(depths), 1, figsize=(9, 0.8 + 0.55 * len(depths)), sharex=True, squeeze=False)
        for ax, (label, (chunk, depth)) in zip(axes[:, 0], depths.items()):
            ax.stairs(depth, [i * chunk for i in range(len(depth) + 1)], baseline=None, lw=1.2)
            ax.set_ylim(0.5, max(depth) + 0.5 if depth else 1.5)
            ax.set_yticks(sorted(set(depth)))
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        axes[-1, 0].set_xlabel("position in the first held-out window (tokens)")
        fig.suptitle("Early exit at the calibrated threshold: bottom layers run at each position", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out, "exit_depth.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def update_readme(text):
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    path = os.path.join(HERE, "README.md")
    with open(path) as f:
        readme = f.read()
    if begin not in readme or end not in readme:
        raise core.UsageError(f"README.md has no {begin} ... {end} section to rewrite")
    head, rest = readme.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(head + begin + "\n" + text + end + tail)
    os.replace(path + ".tmp", path)


def main():
    fast = configurator.parse_overrides(sys.argv[1:], {"fast": False}, allow_config_files=False, ignore_unknown=True)["fast"]
    s = configurator.parse_overrides(sys.argv[1:], {**SETTINGS, **(FAST if fast else {})}, allow_config_files=False)
    what = {"throughput", "quality", "generation", "memory", "data", "mechanisms", "paged", "injection"} \
        if s["what"] == "all" \
        else set(s["what"].split(","))
    unknown = what - {"throughput", "quality", "generation", "memory", "data", "mechanisms", "paged", "profile",
                      "injection"}
    if unknown:
        raise core.UsageError(f"--what: unknown {', '.join(sorted(unknown))}; use all or a comma list of "
                              f"throughput, quality, generation, memory, data, mechanisms, paged, profile, "
                              f"injection")
    if "generation" in what and 16 + s["gen_tokens"] > s["max_seq_len"]:
        raise core.UsageError(f"--gen_tokens={s['gen_tokens']} after a 16-token prompt does not fit "
                              f"--max_seq_len={s['max_seq_len']}; raise max_seq_len to at least "
                              f"{16 + s['gen_tokens']} or lower gen_tokens")
    pairs = core.model_modes()
    if s["models"] != "all":
        names = set(s["models"].split(",")) | {"gpt"}
        for n in names:
            core.load_model_module(n)  # a clear error for an unknown name
        pairs = [p for p in pairs if p[0] in names]
    torch.set_num_threads(os.cpu_count() or 1)
    work = s["out"] or tempfile.mkdtemp(prefix="hst-bench-")
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    sections, curves, throughput, depths = [], {}, {}, {}
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))

    def emit(name, text):
        print(text, flush=True)
        sections.append(text)
        with open(os.path.join(work, f"{name}.md"), "w") as f:
            f.write(text)
        print(f"bench: {name} done at {time.time() - t_start:.0f} s", file=sys.stderr)

    if "data" in what:  # first: forking prepare_data's workers from a process that held T4-size models is slow
        emit("data", bench_data(s, work))
    if "profile" in what:
        small = dict(size_of(s), batch_size=s["batch_size"])
        emit("profile", bench_profile(pairs, s, [("small", small), ("large", FAST_LARGE if fast else LARGE)]))
    if "throughput" in what:
        peak = matmul_peak_flops()
        text, throughput = bench_throughput(pairs, s, peak)
        emit("throughput", text)
        if s["large"]:
            emit("throughput_large", bench_throughput(pairs, {**s, **(FAST_LARGE if fast else LARGE)}, peak)[0])
    if what & {"quality", "generation", "mechanisms", "injection"}:  # one training run per model serves them all
        data_dir = s["data_dir"] or default_shards(work)
        trained = pairs if what & {"quality", "generation", "mechanisms"} else [  # injection alone: its models only
            (name, mode) for name, mode in pairs
            if mode == "chunk" and hasattr(core.load_model_module(name).Model, "encode_injection")]
        text, curves, runs = bench_quality(trained, s, work, data_dir)
        if "quality" in what:
            emit("quality", text)
            if s["budget_s"] > 0:
                step_s = {p: r["step_s"] for p, r in throughput.items()} if throughput else {
                    (name, mode): train_step_seconds(core.build_model(name, mode=mode, **size_of(s)),
                                                     s["batch_size"], s["max_seq_len"], 2) for name, mode in pairs}
                emit("quality_budget", bench_quality(pairs, s, work, data_dir, step_s)[0])
        if "generation" in what:
            emit("generation", bench_generation(runs, s, data_dir))
        if "mechanisms" in what:
            text, depths = bench_mechanisms(runs, s, data_dir)
            emit("mechanisms", text)
        if "injection" in what:
            emit("injection", bench_injection(runs, s, data_dir))
    if "paged" in what:
        emit("paged", bench_paged(s))
    if "memory" in what:
        emit("memory", bench_memory_cuda(pairs, s) if torch.cuda.is_available() else bench_memory(pairs, s))
    plots = plot(curves, throughput, work, depths) if s["out"] else []
    command = "python bench.py " + " ".join(sys.argv[1:])
    footer = (f"Measured by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, {machine}, "
              f"in {time.time() - t_start:.0f} s.\n")
    print(footer + "".join(f"plot: {p}\n" for p in plots), file=sys.stderr)
    if s["update_readme"]:
        images = "".join(f"![{os.path.basename(p)}]({os.path.relpath(p, HERE)})\n" for p in plots)
        update_readme(footer + "\n" + "\n".join(sections) + ("\n" + images if images else ""))


if __name__ == "__main__":
    configurator.main_guard(main)
