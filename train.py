"""
Train any registered model on prepared shards. One process:
$ python train.py config/cpu_tiny.py
$ python train.py --model=v6 --mode=chunk --batch_size=8
Several GPUs (DDP) on one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/t4.py
Settings are the globals below, overridden in order by config/*.py files and --key=value (or --key value);
fields of the chosen model's Config (for example a variant's horizon length) are accepted the same way.
Ctrl+C saves a checkpoint at the next step boundary; --init_from=resume continues it exactly.
"""

import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the T4 seed scripts set it

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
out_dir = "out"
data_dir = "data/fineweb-edu"
init_from = "scratch"         # "scratch" or "resume" (from out_dir/ckpt.pt)
eval_interval = 250
eval_iters = 20
log_interval = 10
save_interval = 1000
# model
model = "gpt"
mode = "token"
d_model = 256
n_layers = 4
n_heads = 4
max_seq_len = 256
dropout = 0.0
# data
batch_size = 8                # micro-batch per process
gradient_accumulation_steps = 1  # total over all processes, as nanoGPT: divided by the world size
data_order = "random"         # "random" windows (nanoGPT) or "sequential" rank-strided windows (llm.c)
# optimizer
optimizer = "adamw8bit"       # bitsandbytes AdamW8bit, falling back to torch AdamW; or "adamw"
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 disables
warmup_iters = 100
lr_decay_iters = 0            # 0: decay until max_iters
min_lr = 0.0                  # 0: learning_rate / 10
# system
device = "auto"               # auto picks cuda, then mps, then cpu
dtype = "auto"                # auto: bf16 where supported, fp16 + GradScaler on older GPUs (T4), fp32 on CPU
compile = False
seed = 1337
# -----------------------------------------------------------------------------

# peak dense tensor-core FLOP/s for MFU, matched against the CUDA device name
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class ShardLoader:
    """Windows of max_seq_len + 1 tokens from the training shards.

    "random": each window starts at a uniformly random offset of a shard chosen in proportion to its size
    (nanoGPT); every rank draws from its own seeded generator. "sequential": windows are read in order,
    rank r of w taking every w-th batch (llm.c). Both are resumable through state_dict()."""

    def __init__(self, paths, B, T, vocab_size, order, seed, rank=0, world=1):
        self.shards = [load_shard(p) for p in paths]
        for path, shard in zip(paths, self.shards):
            if len(shard) < T + 1:
                raise core.UsageError(f"shard {path} has {len(shard)} tokens, fewer than max_seq_len + 1 = "
                                      f"{T + 1}; lower --max_seq_len or prepare more data")
            top = int(shard.max())
            if top >= vocab_size:
                raise core.UsageError(f"shard {path} holds token {top} >= vocab_size {vocab_size}; "
                                      f"it was not made by prepare_data.py: re-run it")
        if order not in ("random", "sequential"):
            raise core.UsageError(f"data_order={order!r}: use 'random' or 'sequential'")
        self.B, self.T, self.order, self.rank, self.world = B, T, order, rank, world
        self.sizes = torch.tensor([len(s) - T - 1 for s in self.shards], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.shard, self.pos = 0, rank * B * T

    def state_dict(self):
        return {"generator": self.generator.get_state(), "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.shard, self.pos = state["shard"], state["pos"]

    def next_batch(self):
        B, T = self.B, self.T
        if self.order == "random":
            shard_ids = torch.multinomial(self.sizes + 1, B, replacement=True, generator=self.generator)
            starts = (torch.rand(B, generator=self.generator, dtype=torch.float64)
                      * (self.sizes[shard_ids] + 1)).long()
            rows = [self.shards[s][o:o + T + 1] for s, o in zip(shard_ids.tolist(), starts.tolist())]
            buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        else:
            if self.pos + B * T + 1 > len(self.shards[self.shard]):
                self.shard, self.pos = (self.shard + 1) % len(self.shards), self.rank * B * T
            buf = torch.from_numpy(self.shards[self.shard][self.pos:self.pos + B * T + 1].astype(np.int64))
            buf = torch.stack([buf[i * T:i * T + T + 1] for i in range(B)])
            self.pos += B * T * self.world
        return buf[:, :-1], buf[:, 1:]


def val_batches(paths, B, T, iters, rank, world):
    """The fixed validation set: the first `iters` batches of the validation shards, whatever the number
    of processes (rank r evaluates batches r, r + world, ...), so val loss compares across runs."""
    tokens = np.concatenate([load_shard(p) for p in paths])
    n = (len(tokens) - 1) // (B * T)
    if n < 1:
        raise core.UsageError(f"validation shards hold {len(tokens)} tokens, less than one batch ({B}x{T}); "
                              f"lower --batch_size/--max_seq_len or prepare more data")
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


def main():
    model_fields = {}
    settings = {k: v for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    chosen = configurator.parse_overrides(sys.argv[1:], settings, ignore_unknown=True)["model"]
    for f in core.dataclasses.fields(core.load_model_module(chosen).Config):
        if f.name not in settings and f.name not in ("vocab_size",):
            model_fields[f.name] = f.default
    config = configurator.parse_overrides(sys.argv[1:], {**settings, **model_fields})
    globals().update({k: v for k, v in config.items() if k in settings})
    model_overrides = {k: config[k] for k in model_fields if config[k] != model_fields[k]}

    # distributed setup
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dev = resolve_device()
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world, dev = 0, 0, 1, resolve_device()
    master = rank == 0
    if gradient_accumulation_steps % world:
        raise core.UsageError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible "
                              f"by the {world} processes")
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
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "resume":
        ckpt = core.load_checkpoint(ckpt_path)
        if ckpt["model_name"] != model:
            raise core.UsageError(f"{ckpt_path} holds model {ckpt['model_name']!r}, not {model!r}: "
                                  f"pass --model={ckpt['model_name']} or use another --out_dir")
        raw_model = core.model_from_checkpoint(ckpt)
    elif init_from == "scratch":
        ckpt = None
        raw_model = core.build_model(model, mode=mode, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                     max_seq_len=max_seq_len, dropout=dropout, **model_overrides)
    else:
        raise core.UsageError(f"init_from={init_from!r}: use 'scratch' or 'resume'")
    cfg = raw_model.config
    raw_model.to(dev)
    opt, opt_note = make_optimizer(raw_model, device_type)
    val_paths, train_paths = list_shards(data_dir)
    loader = ShardLoader(train_paths, batch_size, cfg.max_seq_len, cfg.vocab_size, data_order, seed, rank, world)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
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
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"model {model} ({cfg.mode}): {raw_model.num_params():,} parameters | device {dev} {ptdtype} | "
              f"{world} process(es) | {tokens_per_iter:,} tokens/iter | optimizer {opt_note}")
    log_file = open(os.path.join(out_dir, "log.jsonl"), "a" if init_from == "resume" else "w") if master else None

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
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
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
        pending["loader"] = loader.state_dict()
        return (t.to(dev, non_blocking=True) for t in loader.next_batch())

    signal.signal(signal.SIGINT, on_sigint)
    train_model.train()
    x, y = next_batch()
    t_start, t_last, start_iter, last_log_iter = time.time(), time.time(), iter_num, iter_num
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
                print(f"step {iter_num}: val loss {val_loss:.4f}")
                log_file.write(f'{{"step": {iter_num}, "val_loss": {val_loss:.6f}}}\n')
                log_file.flush()
            t_last += time.time() - t_eval  # throughput counts training time only
        if iter_num >= max_iters:
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
                loss = train_model(x, targets=y).loss / accum
            x, y = next_batch()  # prefetch while backward runs
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

        if iter_num % log_interval == 0 or iter_num == max_iters:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            now = time.time()
            dt, t_last, last_log_iter = (now - t_last) / (iter_num - last_log_iter), now, iter_num
            if master:
                tok_s = tokens_per_iter / dt
                mfu = f"{flops_per_iter / dt / peak * 100:.1f}%" if peak else "n/a"
                eta = (now - t_start) / (iter_num - start_iter) * (max_iters - iter_num)
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
        dist.destroy_process_group()


if __name__ == "__main__":
    configurator.main_guard(main)
