"""
Benchmarks of every registered model against the gpt control, measured side by side in one process and run.
$ python bench.py                                  # everything at the cpu_tiny size (about 10 minutes on 2 cores)
$ python bench.py --what=throughput --models=gpt,v3
$ python bench.py --out=results --update_readme    # tables + plots in results/, README results section rewritten
$ python bench.py --fast                           # tiny sizes, seconds: the test suite's smoke run
Measurements: throughput (tokens/s; FLOP/s counted from each model's own forward; fraction of the measured
matmul peak), quality at equal token budget (val loss, bits per byte), generation (uncached / cached /
speculative tokens/s, accepted drafts, greedy equality), memory of one T4-size training step, KV-cache bytes
per token, and data preparation speed.
Absolute numbers depend on the machine; compare the ratios to gpt, which are measured in the same run.
"""

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
    what="all",               # all, or a comma list of: throughput, quality, generation, memory, data
    models="all",             # all, or a comma list of names (gpt is always added as the control)
    d_model=128, n_layers=4, n_heads=4,  # the config/cpu_tiny.py model
    max_seq_len=128,          # training window and generation context
    batch_size=4,             # sequences per training step
    steps=3,                  # timed training steps per model for throughput (after 2 warm-up steps)
    quality_iters=16,         # training steps per model and seed for quality, same tokens for all (raise it to compare)
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


def train_step_seconds(model, B, T, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1))
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # the median step: robust to a busy neighbour


def bench_throughput(pairs, s):
    peak = matmul_peak_flops()
    size = dict(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_seq_len=s["max_seq_len"])
    B, T = s["batch_size"], s["max_seq_len"]
    rows, results = [], {}
    for name, mode in pairs:
        torch.manual_seed(0)
        model = core.build_model(name, mode=mode, **size)
        dt = train_step_seconds(model, B, T, s["steps"])
        tok_s = B * T / dt
        flops = model.flops_per_token() * tok_s
        results[(name, mode)] = dict(tokens_per_s=tok_s, flops=flops, params=model.num_params())
    base = results[("gpt", "token")]
    for (name, mode), r in results.items():
        rows.append([model_label(name, mode), f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}", f"{r['flops'] / 1e9:.1f}",
                     f"{r['flops'] / peak:.1%}", f"{r['flops'] / base['flops']:.2f}"])
    title = (f"Training throughput (d_model {size['d_model']}, {size['n_layers']} layers, batch {B} x {T}, fp32; "
             f"matmul peak measured {peak / 1e9:.1f} GFLOP/s)")
    header = ["model", "params", "tokens/s", "vs gpt", "GFLOP/s (counted)", "of peak", "FLOP/s vs gpt"]
    return table(title, header, rows), results


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


def bench_quality(pairs, s, work, data_dir):
    iters, B, T = s["quality_iters"], s["batch_size"], s["max_seq_len"]
    eval_iters = 4
    bpt = bytes_per_token(data_dir, B, T, eval_iters)
    corpus = os.path.basename(prepare_data.list_shards(data_dir)[0][0]).rsplit("_val_", 1)[0]
    curves, finals, runs = {}, {}, {}
    for name, mode in pairs:
        for seed in range(s["seeds"]):
            out_dir = os.path.join(work, "runs", f"{name}-{mode}-s{seed}")
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
    base = sum(finals[("gpt", "token")]) / s["seeds"]
    rows = []
    for (name, mode), losses in finals.items():
        mean = sum(losses) / len(losses)
        spread = f" ± {(max(losses) - min(losses)) / 2:.3f}" if len(losses) > 1 else ""
        rows.append([model_label(name, mode), f"{mean:.3f}{spread}", f"{mean / math.log(2) / bpt:.3f}",
                     f"{mean - base:+.3f}"])
    title = (f"Quality at equal budget ({iters} steps x {B} x {T} tokens = {iters * B * T:,} tokens, "
             f"{s['seeds']} seed(s); d_model {s['d_model']}, {s['n_layers']} layers; data: {corpus})")
    return table(title, ["model", "val loss (nats/token)", "bits per byte", "vs gpt"], rows), curves, runs


# -----------------------------------------------------------------------------
# generation from the trained checkpoints

def timed_generate(model, prompt, n, **kw):
    stats = {}
    t0 = time.perf_counter()
    out = model.generate(prompt, n, stats=stats, **kw)
    return out, n / (time.perf_counter() - t0), stats


def bench_generation(runs, s, data_dir):
    n = s["gen_tokens"]
    val, _ = prepare_data.list_shards(data_dir)
    prompt = torch.from_numpy(prepare_data.load_shard(val[0])[:16].astype("int64"))[None]
    rows = []
    for (name, mode), run_dir in runs.items():
        model = core.model_from_checkpoint(core.load_checkpoint(run_dir)).eval()
        uncached, r_unc, _ = timed_generate(model, prompt, n, temperature=0, use_cache=False)
        cached, r_c, _ = timed_generate(model, prompt, n, temperature=0)
        speculative, r_s, st = timed_generate(model, prompt, n, temperature=0, speculative=True, draft_len=s["draft_len"])
        g = torch.Generator().manual_seed(0)
        _, r_cs, _ = timed_generate(model, prompt, n, temperature=0.8, top_k=50, generator=g)
        _, r_ss, st_s = timed_generate(model, prompt, n, temperature=0.8, top_k=50, speculative=True,
                                       draft_len=s["draft_len"], generator=g)
        same = torch.equal(uncached, cached) and torch.equal(cached, speculative)
        rows.append([model_label(name, mode), f"{r_unc:,.1f}", f"{r_c:,.1f}", f"{r_c / r_unc:.1f}x",
                     f"{r_s:,.1f}", f"{r_s / r_c:.2f}x", f"{n / st['model_calls']:.2f}",
                     f"{r_ss / r_cs:.2f}x", f"{n / st_s['model_calls']:.2f}", "yes" if same else "NO"])
    title = (f"Generation ({n} new tokens after a 16-token prompt, batch 1, CPU; speculative draft length "
             f"{s['draft_len']}; sampled: temperature 0.8, top-k 50)")
    header = ["model", "uncached tok/s", "cached tok/s", "cached vs uncached", "speculative tok/s",
              "speculative vs cached", "tokens/call (greedy)", "speculative vs cached (sampled)", "tokens/call (sampled)",
              "greedy outputs equal"]
    return table(title, header, rows)


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


def bench_memory(pairs, s):
    size = FAST_T4 if s["fast"] else T4
    rows = []
    for name, mode in pairs:
        torch.manual_seed(0)
        model = core.build_model(name, mode=mode, **size)
        n = model.num_params()
        weights, grads, optim = 4 * n, 4 * n, adamw8bit_bytes(model)
        acts = activation_bytes(model, size["max_seq_len"])
        cache = model.new_cache(1, dtype=torch.float16)
        kv_per_token = cache.nbytes() / size["max_seq_len"]
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
        kv = model.new_cache(1, dtype=torch.float16).nbytes() / T4["max_seq_len"]
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

def plot(curves, throughput, out):
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
    what = {"throughput", "quality", "generation", "memory", "data"} if s["what"] == "all" else set(s["what"].split(","))
    unknown = what - {"throughput", "quality", "generation", "memory", "data"}
    if unknown:
        raise core.UsageError(f"--what: unknown {', '.join(sorted(unknown))}; use all or a comma list of "
                              f"throughput, quality, generation, memory, data")
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
    sections, curves, throughput = [], {}, {}
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))

    def emit(name, text):
        print(text, flush=True)
        sections.append(text)
        with open(os.path.join(work, f"{name}.md"), "w") as f:
            f.write(text)

    if "data" in what:  # first: forking prepare_data's workers from a process that held T4-size models is slow
        emit("data", bench_data(s, work))
    if "throughput" in what:
        text, throughput = bench_throughput(pairs, s)
        emit("throughput", text)
    if what & {"quality", "generation"}:
        data_dir = s["data_dir"] or default_shards(work)
        text, curves, runs = bench_quality(pairs, s, work, data_dir)
        if "quality" in what:
            emit("quality", text)
        if "generation" in what:
            emit("generation", bench_generation(runs, s, data_dir))
    if "memory" in what:
        emit("memory", bench_memory_cuda(pairs, s) if torch.cuda.is_available() else bench_memory(pairs, s))
    plots = plot(curves, throughput, work) if s["out"] else []
    command = "python bench.py " + " ".join(sys.argv[1:])
    footer = (f"Measured by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, {machine}, "
              f"in {time.time() - t_start:.0f} s.\n")
    print(footer + "".join(f"plot: {p}\n" for p in plots), file=sys.stderr)
    if s["update_readme"]:
        images = "".join(f"![{os.path.basename(p)}]({os.path.relpath(p, HERE)})\n" for p in plots)
        update_readme(footer + "\n" + "\n".join(sections) + ("\n" + images if images else ""))


if __name__ == "__main__":
    configurator.main_guard(main)
