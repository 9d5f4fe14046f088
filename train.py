"""
Train any registered model on prepared shards. One process:
$ python train.py config/cpu_tiny.py
$ python train.py --model=v6 --mode=chunk --batch_size=8
Several GPUs (DDP) on one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/t4.py --gradient_accumulation_steps=4
Settings are the globals below, overridden in order by config/*.py files and --key=value (or --key value);
fields of the chosen model's Config (for example a variant's horizon length) are accepted the same way
(`python train.py --model=v6 --help` lists them).
Without --data_dir and without fineweb-edu shards in data/fineweb-edu, the offline corpus in data/stdlib is
used when it is prepared (`python prepare_data.py --corpus=stdlib`).
Ctrl+C saves a checkpoint at the next step boundary; --init_from=resume continues it exactly, with the
checkpoint's model settings and data folder.
"""

import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer allocator splits on a T4

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import core
import prepare_data
from prepare_data import list_shards, load_shard

# -----------------------------------------------------------------------------
# defaults: a small model on fineweb-edu shards
# I/O
out_dir = "out"               # checkpoint (ckpt.pt) and log (log.jsonl) folder
data_dir = "data/fineweb-edu"  # shards from prepare_data.py (without them: data/stdlib when prepared)
init_from = "scratch"         # "scratch" or "resume" (from out_dir/ckpt.pt, with its model settings and data)
eval_interval = 250           # steps between val-loss evaluations; 0: none
eval_iters = 20               # validation batches per evaluation (the first ones of the validation shard)
exit_tolerance = 0.02         # early-exit models, end of training: exit_threshold calibrated so that exits cost at
                              # most this many nats/token of val loss (core.calibrate_exit); 0 or --exit_threshold: keep
log_interval = 10             # steps between log lines (step 1 is always logged, with its time and ETA)
save_interval = 1000          # steps between checkpoints (one is also saved at the end and on Ctrl+C)
# model
model = "gpt"                 # gpt (the control), v3, v4, v4_1, v5, v6, v7_1_2, v8_2 or chaoslogic
mode = "token"                # "token", or "chunk" for the models that have it (v4, v5, v6, v7_1_2)
d_model = 256                 # width
n_layers = 4                  # depth (in chunk mode: of the global model)
n_heads = 4                   # attention heads; must divide d_model
max_seq_len = 256             # context length in tokens (training window)
dropout = 0.0                 # dropout probability
# data
batch_size = 8                # micro-batch per process
gradient_accumulation_steps = 1  # total over all processes, as nanoGPT: divided by the world size
data_order = "random"         # "random" windows (nanoGPT) or "sequential" rank-strided windows (llm.c)
# optimizer
optimizer = "adamw8bit"       # bitsandbytes AdamW8bit, falling back to torch AdamW; or "adamw"
learning_rate = 6e-4          # peak learning rate, reached after warmup_iters
max_iters = 5000              # training steps
weight_decay = 0.1            # AdamW weight decay (matrices and embeddings only)
beta1 = 0.9                   # AdamW beta1
beta2 = 0.95                  # AdamW beta2
grad_clip = 1.0               # 0 disables
warmup_iters = 100            # linear warmup steps (a warning when it is not shorter than max_iters)
lr_decay_iters = 0            # 0: decay until max_iters
min_lr = 0.0                  # 0: learning_rate / 10
# system
device = "auto"               # auto picks cuda, then mps, then cpu
dtype = "auto"                # auto: bf16 where supported, fp16 + GradScaler on older GPUs (T4), fp32 on CPU
compile = False               # torch.compile the model
seed = 1337                   # seed of the weights and the data order (each DDP rank adds its rank)
# -----------------------------------------------------------------------------

DEFAULT_DATA_DIR, OFFLINE_DATA_DIR = data_dir, "data/stdlib"
MODEL_KEYS = ("mode", "d_model", "n_layers", "n_heads", "max_seq_len", "dropout")  # settings that live in the model

# peak dense tensor-core FLOP/s for MFU, matched against the CUDA device name
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class ShardLoader:
    """Windows of max_seq_len + 1 tokens from the training shards.

    "random": each window starts at a uniformly random offset of a shard chosen in proportion to its size
    (nanoGPT); every rank draws from its own seeded generator. "sequential": windows are read in order,
    rank r of w taking every w-th batch (llm.c). Both are resumable through state_dict().
    context_len > 0 (a model that trains context injection): every window also comes with the context_len tokens
    just before it in the shard stream, a passage the window lacks; windows then start at offset >= context_len."""

    def __init__(self, paths, B, T, vocab_size, order, seed, rank=0, world=1, context_len=0):
        self.shards = [load_shard(p) for p in paths]
        for path, shard in zip(paths, self.shards):
            if len(shard) < context_len + T + 1:
                raise core.UsageError(f"shard {path} has {len(shard)} tokens, fewer than max_seq_len + 1 = "
                                      f"{T + 1}" + (f" plus the {context_len} injected before each window"
                                                    if context_len else "") +
                                      "; lower --max_seq_len or prepare more data")
            top = int(shard.max())
            if top >= vocab_size:
                raise core.UsageError(f"shard {path} holds token {top} >= vocab_size {vocab_size}; "
                                      f"it was not made by prepare_data.py: re-run it")
        if order not in ("random", "sequential"):
            raise core.UsageError(f"data_order={order!r}: use 'random' or 'sequential'")
        self.B, self.T, self.order, self.rank, self.world = B, T, order, rank, world
        self.context_len = L = context_len
        self.sizes = torch.tensor([len(s) - T - 1 - L for s in self.shards], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.shard, self.pos = 0, L + rank * B * T

    def state_dict(self):
        return {"generator": self.generator.get_state(), "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.shard, self.pos = state["shard"], state["pos"]
        if self.shard >= len(self.shards):  # other shards than the checkpoint's: start them from the top
            self.shard, self.pos = 0, self.context_len + self.rank * self.B * self.T

    def next_batch(self):
        """-> (x, y), or (x, y, context) when context_len > 0: context (B, context_len) precedes each window."""
        B, T, L = self.B, self.T, self.context_len
        if self.order == "random":
            shard_ids = torch.multinomial(self.sizes + 1, B, replacement=True, generator=self.generator)
            starts = (torch.rand(B, generator=self.generator, dtype=torch.float64)
                      * (self.sizes[shard_ids] + 1)).long() + L
            rows = [self.shards[s][o - L:o + T + 1] for s, o in zip(shard_ids.tolist(), starts.tolist())]
            buf = torch.from_numpy(np.stack(rows).astype(np.int64))                   # (B, L + T + 1)
        else:
            if self.pos + B * T + 1 > len(self.shards[self.shard]):
                self.shard, self.pos = (self.shard + 1) % len(self.shards), L + self.rank * B * T
            buf = torch.from_numpy(self.shards[self.shard][self.pos - L:self.pos + B * T + 1].astype(np.int64))
            buf = torch.stack([buf[i * T:i * T + L + T + 1] for i in range(B)])        # (B, L + T + 1)
            self.pos += B * T * self.world
        x, y = buf[:, L:-1], buf[:, L + 1:]
        return (x, y) if not L else (x, y, buf[:, :L])


def val_batches(paths, B, T, iters, rank, world):
    """The fixed validation set: the first `iters` batches of the validation shards, whatever the number
    of processes (rank r evaluates batches r, r + world, ...), so val loss compares across runs. A validation
    set smaller than one batch (a small text's 10%) gives one batch of as many windows as it holds."""
    tokens = np.concatenate([load_shard(p) for p in paths])
    if len(tokens) < T + 1:
        raise core.UsageError(f"the validation shard holds {len(tokens)} tokens, fewer than one window of "
                              f"max_seq_len + 1 = {T + 1}: lower --max_seq_len or prepare more text")
    B = min(B, (len(tokens) - 1) // T)
    n = (len(tokens) - 1) // (B * T)
    for i in range(rank, min(n, iters), world):
        buf = torch.from_numpy(tokens[i * B * T:(i + 1) * B * T + 1].astype(np.int64))
        yield torch.stack([buf[b * T:b * T + T] for b in range(B)]), \
            torch.stack([buf[b * T + 1:b * T + T + 1] for b in range(B)])


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    floor = min_lr or learning_rate / 10
    if it >= decay_iters:
        return floor
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - floor)


def make_optimizer(raw_model, device_type):
    groups = core.param_groups(raw_model, weight_decay)
    if optimizer == "adamw8bit":
        try:
            # its CPU backend logs a warning about optional 4-bit kernels that AdamW8bit does not use
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=(beta1, beta2)), "bitsandbytes AdamW8bit"
        except Exception as e:  # not installed, or no kernels for this device
            note = f"torch AdamW (bitsandbytes AdamW8bit unavailable: {type(e).__name__}: {str(e)[:80]})"
    elif optimizer == "adamw":
        note = "torch AdamW"
    else:
        raise core.UsageError(f"optimizer={optimizer!r}: use 'adamw8bit' or 'adamw'")
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused), note


def resolve_device():
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(device_type):
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise core.UsageError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16")
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def format_eta(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def config_sources(name):
    """The files that define a model's Config fields (its module and the modules of its Config's bases), for
    --help's comments."""
    files = []
    for cls in core.load_model_module(name).Config.__mro__:
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if path and path not in files:
            files.append(path)
    return files


def truncate_log(path, step, evaluates_again):
    """Drop the log lines past the resumed step (written after the checkpoint, by a run that was killed), and
    the val line at the step itself when the resumed run evaluates it again; a torn last line goes too."""
    if not os.path.exists(path):
        return 0
    import json
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = record["step"] < step or (record["step"] == step and not
                                                  ("val_loss" in record and evaluates_again))
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped


def main():
    if hasattr(sys.stdout, "reconfigure"):  # (a notebook's stdout has no such method and needs none)
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they are printed, also through a pipe
    argv = sys.argv[1:]
    settings = {k: v for k, v in globals().items()
                if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}
    given = set()
    first = configurator.parse_overrides(argv, settings, ignore_unknown=True, given=given)
    chosen, ckpt = first["model"], None
    ckpt_path = os.path.join(first["out_dir"], "ckpt.pt")
    if first["init_from"] == "resume" and not configurator.wants_help(argv):
        ckpt = core.load_checkpoint(ckpt_path)
        if "model" not in given:  # the checkpoint says which model it holds
            chosen = ckpt["model_name"]
    model_fields = {}
    for f in core.dataclasses.fields(core.load_model_module(chosen).Config):
        if f.name not in settings and f.name not in ("vocab_size",):
            model_fields[f.name] = f.default
    given = set()
    config = configurator.parse_overrides(argv, {**settings, "model": chosen, **model_fields}, given=given,
                                          help_sources=[__file__] + config_sources(chosen),
                                          help_comments={k: f"a field of {chosen}'s Config" for k in model_fields})
    notes = []
    if config["init_from"] == "resume":
        # the model is the checkpoint's: its settings win over flags, which are named when they differ
        if config["model"] != ckpt["model_name"]:
            raise core.UsageError(f"{ckpt_path} holds model {ckpt['model_name']!r}, not {config['model']!r}: "
                                  f"leave out --model (or pass --model={ckpt['model_name']}), or use another --out_dir")
        saved, ignored = ckpt["model_config"], []
        for key in MODEL_KEYS + tuple(model_fields):
            if key in saved:
                if key in given and config[key] != saved[key]:
                    ignored.append(f"--{key}={config[key]} (checkpoint: {saved[key]})")
                config[key] = saved[key]
        # the optimizer too: its state in the checkpoint is the one that ran (torch AdamW when bitsandbytes
        # was missing), and only that one can load it
        saved_opt = ckpt.get("optimizer_kind") or ckpt.get("train_config", {}).get("optimizer")
        if saved_opt and saved_opt != config["optimizer"]:
            if "optimizer" in given:
                ignored.append(f"--optimizer={config['optimizer']} (checkpoint: {saved_opt})")
            config["optimizer"] = saved_opt
        saved_data = ckpt.get("train_config", {}).get("data_dir")
        if saved_data and saved_data != config["data_dir"]:
            if "data_dir" not in given:
                config["data_dir"] = saved_data
            elif prepare_data.shard_files(saved_data):
                ignored.append(f"--data_dir={config['data_dir']} (checkpoint: {saved_data})")
                config["data_dir"] = saved_data
            else:
                notes.append(f"the checkpoint's data folder {saved_data} has no shards here: using "
                             f"--data_dir={config['data_dir']}")
        if ignored:
            notes.append(f"resume keeps the checkpoint's settings; ignored {', '.join(ignored)}")
    elif (config["data_dir"] == DEFAULT_DATA_DIR and "data_dir" not in given
          and not prepare_data.shard_files(DEFAULT_DATA_DIR)):
        if not prepare_data.shard_files(OFFLINE_DATA_DIR):
            raise core.UsageError(f"no training data: {DEFAULT_DATA_DIR} has no shards. Prepare the offline "
                                  f"corpus with `python prepare_data.py --corpus=stdlib --max_tokens=4000000` "
                                  f"(into {OFFLINE_DATA_DIR}, which train.py then uses; under a minute), or "
                                  f"fineweb-edu with `python prepare_data.py` (from the hub), or pass --data_dir")
        config["data_dir"] = OFFLINE_DATA_DIR
        notes.append(f"no fineweb-edu shards in {DEFAULT_DATA_DIR}: training on the offline corpus in "
                     f"{OFFLINE_DATA_DIR} (`python prepare_data.py` prepares fineweb-edu; --data_dir picks a folder)")
    globals().update({k: v for k, v in config.items() if k in settings})
    model_overrides = {k: config[k] for k in model_fields if config[k] != model_fields[k]}

    # distributed setup
    ddp = int(os.environ.get("RANK", -1)) != -1
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    if gradient_accumulation_steps % world:  # before the process group: every rank stops here, rank 0 says why
        multiple = world * math.ceil(gradient_accumulation_steps / world)
        raise core.UsageError(f"--gradient_accumulation_steps={gradient_accumulation_steps} (the total over all "
                              f"processes) is not divisible by the {world} processes: pass "
                              f"--gradient_accumulation_steps={multiple} or another multiple of {world}")
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        dev = resolve_device()
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    else:
        rank, local_rank, dev = 0, 0, resolve_device()
    master = rank == 0
    accum = gradient_accumulation_steps // world
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":")[0]
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(device_type)]
    torch.manual_seed(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler("cuda", enabled=(ptdtype == torch.float16 and device_type == "cuda"))

    # model and optimizer
    if init_from == "resume":
        raw_model = core.model_from_checkpoint(ckpt)
    elif init_from == "scratch":
        raw_model = core.build_model(model, mode=mode, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                     max_seq_len=max_seq_len, dropout=dropout, **model_overrides)
    else:
        raise core.UsageError(f"init_from={init_from!r}: use 'scratch' or 'resume'")
    cfg = raw_model.config
    raw_model.to(dev)
    opt, opt_note = make_optimizer(raw_model, device_type)
    val_paths, train_paths = list_shards(data_dir)
    # a model that trains context injection gets each window's preceding passage (model.train_context_len tokens)
    context_len = getattr(raw_model, "train_context_len", 0)
    loader = ShardLoader(train_paths, batch_size, cfg.max_seq_len, cfg.vocab_size, data_order, seed, rank, world,
                         context_len)
    iter_num, best_val_loss = 0, float("inf")
    opt_kind = "adamw" if isinstance(opt, torch.optim.AdamW) else "adamw8bit"
    if ckpt is not None:
        if opt_kind != optimizer:
            raise core.UsageError(f"{ckpt_path} holds the state of bitsandbytes AdamW8bit, which is unavailable "
                                  f"here ({opt_note}): pip install bitsandbytes, or train again")
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise core.UsageError(f"{ckpt_path}: its optimizer state does not fit {opt_note} ({type(e).__name__}); "
                                  f"pass the --optimizer it was trained with") from None
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"][rank] if rank < len(ckpt["loader"]) else ckpt["loader"][0])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device_type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        del ckpt
    train_model = torch.compile(raw_model) if compile else raw_model
    if ddp:
        train_model = DDP(train_model, device_ids=[local_rank] if device_type == "cuda" else None)

    tokens_per_iter = gradient_accumulation_steps * batch_size * cfg.max_seq_len
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter
    peak = next((v for k, v in PEAK_FLOPS.items() if device_type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        for note in notes:
            print(f"note: {note}")
        stale = [f for f in os.listdir(out_dir) if f.startswith("ckpt.pt") and f.endswith(".tmp")]
        for f in stale:  # a save that was killed before its rename
            os.remove(os.path.join(out_dir, f))
        if stale:
            print(f"note: removed {', '.join(stale)}, left in {out_dir} by an interrupted save")
        if init_from == "resume":
            evaluates_again = eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters)
            dropped = truncate_log(log_path, iter_num, evaluates_again)
            print(f"resuming {ckpt_path} at step {iter_num}" + (f"; dropped {dropped} line(s) of log.jsonl "
                                                                f"written after it" if dropped else ""))
        n_train = sum(len(s) for s in loader.shards)
        n_val = sum(prepare_data.read_header(p)[2] for p in val_paths)
        print(f"data {data_dir}: {n_train:,} training tokens in {len(train_paths)} shard(s), {n_val:,} validation "
              f"tokens")
        print(f"model {model} ({cfg.mode}): {raw_model.num_params():,} parameters | device {dev} {ptdtype} | "
              f"{world} process(es) | {tokens_per_iter:,} tokens/iter | optimizer {opt_note}")
        if 0 < max_iters <= warmup_iters:
            print(f"warning: warmup_iters={warmup_iters} is not shorter than max_iters={max_iters}: the learning "
                  f"rate only reaches {get_lr(max_iters - 1):.2e} of learning_rate={learning_rate:g}; lower "
                  f"--warmup_iters (e.g. --warmup_iters={max(1, max_iters // 10)})")
    log_file = open(log_path, "a" if init_from == "resume" else "w") if master else None

    @torch.no_grad()
    def evaluate():
        train_model.eval()
        total = torch.zeros(2, device=dev)
        for x, y in val_batches(val_paths, batch_size, cfg.max_seq_len, eval_iters, rank, world):
            with autocast:
                logits = raw_model(x.to(dev)).logits
            # next-token cross-entropy alone, whatever auxiliary terms a model trains with, so val losses
            # compare across models
            total += torch.stack([core.lm_loss(logits, y.to(dev)), torch.ones((), device=dev)])
        if ddp:
            dist.all_reduce(total)
        train_model.train()
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def calibrate():
        # every rank calibrates on the same first validation batches (at most 8), so all ranks agree
        t0 = time.time()
        windows = [(x.to(dev), y.to(dev)) for x, y in val_batches(val_paths, batch_size, cfg.max_seq_len,
                                                                  min(eval_iters, 8) or 8, 0, 1)]
        with autocast:
            r = core.calibrate_exit(raw_model, windows, exit_tolerance)
        if master:
            shares = ", ".join(f"{s:.2f}" for s in r["depth_share"])
            print(f"early exit calibrated: threshold {r['threshold']:.4f}, val loss {r['loss']:.4f} vs dense "
                  f"{r['dense_loss']:.4f} (tolerance {exit_tolerance}), share of positions stopping after each "
                  f"bottom layer [{shares}] ({time.time() - t0:.1f}s)")
            log_file.write(f'{{"step": {iter_num}, "exit_threshold": {r["threshold"]:.6f}, '
                           f'"exit_loss_cost": {r["loss"] - r["dense_loss"]:.6f}}}\n')
            log_file.flush()
        train_model.train()

    def checkpoint():
        # the position before the prefetched batch, which has not been trained on yet
        loader_states = [pending["loader"]]
        if ddp:
            gathered = [None] * world
            dist.all_gather_object(gathered, pending["loader"])
            loader_states = gathered
        if master:
            core.save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "model_name": model, "model_config": core.dataclasses.asdict(cfg),
                "optimizer": opt.state_dict(), "optimizer_kind": opt_kind, "scaler": scaler.state_dict(),
                "iter_num": iter_num,
                "best_val_loss": best_val_loss, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
                "loader": loader_states, "train_config": config})
            print(f"saved {ckpt_path} at step {iter_num}")

    stop = {"requested": False, "at": 0.0}

    def on_sigint(signum, frame):
        # a terminal's Ctrl+C reaches a torchrun worker twice (directly, and forwarded by the agent):
        # only a second press a moment later means "quit now"
        if stop["requested"] and time.time() - stop["at"] > 1.0:
            raise KeyboardInterrupt
        if not stop["requested"] and master:
            print("\nCtrl+C: saving a checkpoint at the end of this step (press again to quit without saving)")
        stop["requested"], stop["at"] = True, stop["at"] or time.time()

    pending = {}

    def next_batch():
        """-> (x, y, extra forward kwargs): the preceding passage as `context` for a model that trains injection."""
        pending["loader"] = loader.state_dict()
        x, y, *context = (t.to(dev, non_blocking=True) for t in loader.next_batch())
        return x, y, {"context": context[0]} if context else {}

    signal.signal(signal.SIGINT, on_sigint)
    train_model.train()
    x, y, extra = next_batch()
    t_start, t_last, start_iter, last_log_iter = time.time(), time.time(), iter_num, iter_num
    eval_seconds = 0.0
    while True:
        requested = stop["requested"]
        if ddp:  # every rank must stop at the same step, or the next all-reduce hangs
            flag = torch.tensor(float(requested), device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            checkpoint()
            break
        if eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters):
            t_eval = time.time()
            val_loss = evaluate()
            best_val_loss = min(best_val_loss, val_loss)
            if master:
                print(f"step {iter_num}: val loss {val_loss:.4f} ({time.time() - t_eval:.1f}s)")
                log_file.write(f'{{"step": {iter_num}, "val_loss": {val_loss:.6f}}}\n')
                log_file.flush()
            t_last += time.time() - t_eval  # throughput and ETA count training time only
            eval_seconds += time.time() - t_eval
        if iter_num >= max_iters:
            if exit_tolerance > 0 and "exit_threshold" not in given and core.exit_trunks(raw_model):
                calibrate()
            checkpoint()
            break

        lr = get_lr(iter_num)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        for micro_step in range(accum):
            if ddp:  # all-reduce gradients only on the last micro-step
                train_model.require_backward_grad_sync = micro_step == accum - 1
            with autocast:
                loss = train_model(x, targets=y, **extra).loss / accum
            x, y, extra = next_batch()  # prefetch while backward runs
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if grad_clip > 0:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        else:
            grad_norm = torch.zeros(())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % log_interval == 0 or iter_num == max_iters or iter_num == start_iter + 1:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            now = time.time()
            dt, t_last, last_log_iter = (now - t_last) / (iter_num - last_log_iter), now, iter_num
            if master:
                tok_s = tokens_per_iter / dt
                mfu = f"{flops_per_iter / dt / peak * 100:.1f}%" if peak else "n/a"
                eta = (now - t_start - eval_seconds) / (iter_num - start_iter) * (max_iters - iter_num)
                lossf, gn = loss_sum.item(), float(grad_norm)
                print(f"step {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {gn:.3f} | "
                      f"{tok_s:,.0f} tok/s | mfu {mfu} | eta {format_eta(eta)}")
                log_file.write(f'{{"step": {iter_num}, "loss": {lossf:.6f}, "lr": {lr:.6e}, '
                               f'"grad_norm": {gn:.6f}, "tokens_per_s": {tok_s:.1f}}}\n')
                log_file.flush()
        if iter_num % save_interval == 0 and iter_num < max_iters:
            checkpoint()
    if master:
        log_file.close()
    if ddp:
        # leave together: no rank tears its connections down while another is still finishing the checkpoint
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    configurator.main_guard(main)
