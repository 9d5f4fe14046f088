"""
Generate text from a trained checkpoint.
$ python sample.py --ckpt out/ --prompt "To be, or not" --max_new_tokens 200
$ python sample.py --ckpt=out/ --prompt FILE:prompt.txt --temperature 0 --speculative
$ python sample.py --ckpt=out/ --inject=chapter.txt@4,notes.txt@12   # chunk mode (v6, v7_1_2): context injection
Generated text goes to stdout as it is produced; counts and speed go to stderr, so the text can be piped.
"""

import codecs
import contextlib
import sys
import time

import torch

import configurator
import core
import generate
import prepare_data

ckpt = "out"              # a run directory holding ckpt.pt, or the .pt file itself
prompt = "\n"             # text, or FILE:path to read the prompt from a file
num_samples = 1           # samples, one after another
max_new_tokens = 200      # tokens generated per sample
temperature = 0.8         # 0 = greedy
top_k = 200               # 0 disables
top_p = 1.0               # nucleus sampling; 1.0 disables
seed = 1337               # the sampling generator's seed: the same seed gives the same samples
use_cache = True          # decode with the KV cache (False: recompute the whole context every token)
speculative = False       # draft-and-verify decoding; lossless (exactly greedy's tokens at temperature 0)
draft_len = 4             # --speculative: tokens drafted per model call
inject = ""               # chunk-mode context injection: FILE@ANCHOR[,FILE@ANCHOR...], anchors are spine chunk indices
device = "auto"           # auto picks cuda, else cpu


def main():
    settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    cfg = configurator.parse_overrides(sys.argv[1:], settings, allow_config_files=False)
    globals().update(cfg)
    if max_new_tokens < 1 or num_samples < 1:
        raise core.UsageError("--max_new_tokens and --num_samples must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise core.UsageError("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
    state = core.load_checkpoint(ckpt)
    model = core.model_from_checkpoint(state)
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()

    enc = prepare_data.get_tokenizer()
    text = prompt
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise core.UsageError(f"cannot read the prompt file {text[5:]!r}: {e.strerror}") from None
    ids = enc.encode(text, allowed_special={"<|endoftext|>"}) or [prepare_data.EOT_TOKEN]
    L = model.config.max_seq_len
    if len(ids) > L:
        raise core.UsageError(f"the prompt has {len(ids)} tokens but the model's context is {L}: "
                              f"shorten the prompt to at most {L} tokens")
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    injecting = contextlib.nullcontext()
    if inject:
        if not hasattr(model, "inject"):
            raise core.UsageError(f"--inject needs a model with context injection (v6, v7_1_2 in chunk mode), "
                                  f"not {state['model_name']}")
        blocks = []
        for item in inject.split(","):
            path, sep, anchor = item.strip().rpartition("@")
            if not sep or not path or not anchor.strip().lstrip("-").isdigit():
                raise core.UsageError(f"--inject item {item!r} should be FILE@ANCHOR, ANCHOR a chunk index")
            try:
                with open(path, encoding="utf-8") as f:
                    block = enc.encode(f.read(), allowed_special={"<|endoftext|>"}) or [prepare_data.EOT_TOKEN]
            except OSError as e:
                raise core.UsageError(f"cannot read the injection file {path!r}: {e.strerror}") from None
            blocks.append((torch.tensor(block, dtype=torch.long, device=dev), int(anchor)))
        injecting = model.inject(blocks)  # checks every anchor (spine, range) before anything is generated
        print(f"injecting {len(blocks)} block(s) at chunk(s) {', '.join(str(a) for _, a in blocks)}", file=sys.stderr)
    generator = torch.Generator(device=dev).manual_seed(seed)
    print(f"{state['model_name']} ({model.config.mode}), {model.num_params():,} parameters, step "
          f"{state.get('iter_num', '?')} | prompt {len(ids)} tokens", file=sys.stderr)

    with injecting:
        run_samples(model, idx, text, enc, generator)


def run_samples(model, idx, text, enc, generator):
    for i in range(num_samples):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text)

        def stream(new_tokens):
            sys.stdout.write(decoder.decode(enc.decode_bytes(new_tokens[0].tolist())))
            sys.stdout.flush()

        stats = {}
        t0 = time.perf_counter()
        model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                       top_p=top_p if top_p < 1 else None, use_cache=use_cache, speculative=speculative,
                       generator=generator, draft_len=draft_len, stats=stats, callback=stream)
        dt = time.perf_counter() - t0
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        if num_samples > 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()
        line = f"sample {i + 1}/{num_samples}: {max_new_tokens} new tokens in {dt:.2f}s, {max_new_tokens / dt:.1f} tok/s"
        if speculative:
            calls = stats["model_calls"]
            hist = stats["accepted_hist"]
            line += (f" | speculative: {max_new_tokens / calls:.2f} tokens per model call, mean accepted drafts "
                     f"{sum(n * c for n, c in enumerate(hist)) / max(1, sum(hist)):.2f} of {draft_len}")
            # drafts past the model's horizon offsets are never proposed: report the heads that exist
            rates = generate.acceptance_per_head(hist)[:getattr(model.config, "horizon", len(hist)) - 1]
            line += ", acceptance per draft " + " ".join(f"{r:.2f}" for r in rates if r == r)
            # the speed-up is measured, not estimated: the same generation once more without speculation
            t0 = time.perf_counter()
            model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                           top_p=top_p if top_p < 1 else None, use_cache=use_cache, generator=generator)
            line += f", speed-up {(time.perf_counter() - t0) / dt:.2f}x over plain cached decoding"
        print(line, file=sys.stderr)


if __name__ == "__main__":
    configurator.main_guard(main)
