"""Paged KV cache (vLLM's PagedAttention, Kwon et al. 2023), used by HST v4.1 and v5.

Every cached layer owns a pool of fixed-size blocks, (n_blocks, block_size, n_heads, head_dim). One allocator serves
all layers: a physical block id names the same slot range in every layer's pool, so a sequence has a single block
table. Blocks are taken from a free list as a row grows and go back to it when a row is truncated or freed; the pool
itself grows on demand (by at least a quarter, so growth is amortised) up to enough blocks for every row to reach
max_len, or is fixed at n_blocks when that is given. Blocks are reference-counted: `fork` shares a prefix between
sequences (and copies the model's other per-row state), and the first write into a shared block copies it
(copy-on-write). Attention reads K/V through the block table, cut at the sequence's length, so it sees exactly the
keys a contiguous cache holds: same values, same order, same query shapes, hence the same output. When the rows'
blocks lie consecutively in the pool (one sequence decoding, a freshly prefilled batch) the read is a strided view
of the pool, no copy; otherwise it gathers the row's own blocks, since torch's scaled_dot_product_attention needs
dense keys. Bookkeeping (tables, free list, reference counts) lives on the host as in vLLM; only the pools are
tensors. Ragged batches (rows at different positions) write and attend through `attend`: the models that decode
ragged batches pass a per-row start position, and generate.generate batches prompts of different lengths that way.
"""

import torch
import torch.nn.functional as F

import core


class BlockAllocator:
    """A free-block stack with reference counts. Nothing is ever evicted silently: an empty pool is an error."""

    def __init__(self, n_blocks):
        self.ref = [0] * n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))  # pop() hands out the lowest id first

    @property
    def n_free(self):
        return len(self.free)

    def extend(self, n):
        """n more blocks, the lowest new id on top of the stack (so a growing row's blocks stay consecutive)."""
        old = len(self.ref)
        self.ref += [0] * n
        self.free = list(range(old + n - 1, old - 1, -1)) + self.free

    def alloc(self):
        if not self.free:
            raise RuntimeError(f"the paged KV pool's {len(self.ref)} blocks are all in use; build the cache with "
                               f"more blocks (kv_blocks) or free finished sequences")
        block = self.free.pop()
        self.ref[block] = 1
        return block

    def share(self, block):
        self.ref[block] += 1

    def release(self, block):
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free.append(block)


class PagedLayer:
    """One attention layer's view of a PagedKVCache, with KVCache's interface (`update`, `length`, `truncate`), so
    CausalSelfAttention, GroupedCausalSelfAttention and fill_kv read and write through block tables unchanged."""

    def __init__(self, cache, index):
        self.cache, self.index = cache, index
        self.lengths = [0] * cache.batch_size   # valid positions per sequence in this layer

    @property
    def length(self):
        return max(self.lengths)

    def truncate(self, n):
        self.cache.truncate(n)

    def update(self, start_pos, k, v):
        """k, v (B, nh, T, hd) at positions start_pos.. of every sequence -> all keys and values so far,
        (B, nh, start_pos + T, hd), read through the block tables."""
        B, _, T, _ = k.shape
        if any(start_pos > n for n in self.lengths):
            raise RuntimeError(f"cache write at {start_pos} would leave a gap after {min(self.lengths)} valid positions")
        self.write(k, v, [start_pos] * B, [T] * B)
        return self.read([start_pos + T] * B)

    def write(self, k, v, starts, n_new):
        """Row b's first n_new[b] new keys and values (of k, v (B, nh, T, hd)) go to positions starts[b].."""
        c = self.cache
        c.reserve(starts, n_new)
        per_row = []
        for b, (start, n) in enumerate(zip(starts, n_new)):
            per_row.append(c.slot_mapping(b, start, start + n))
            self.lengths[b] = start + n
        flat = (-1,) + c.k_pool[self.index].shape[2:]                          # (n_blocks * block_size, nh, hd)
        k_flat, v_flat = c.k_pool[self.index].view(flat), c.v_pool[self.index].view(flat)
        k, v = k.transpose(1, 2).to(k_flat.dtype), v.transpose(1, 2).to(v_flat.dtype)   # (B, T, nh, hd)
        if all(not s or s[-1] - s[0] == len(s) - 1 for s in per_row):  # each row's slots are one run: slice writes
            for b, s in enumerate(per_row):
                if s:
                    k_flat[s[0]:s[0] + len(s)], v_flat[s[0]:s[0] + len(s)] = k[b, :len(s)], v[b, :len(s)]
            return
        slots = torch.tensor([x for s in per_row for x in s], dtype=torch.long, device=k.device)
        rows = torch.tensor([b for b, s in enumerate(per_row) for _ in s], device=k.device)
        cols = torch.tensor([i for s in per_row for i in range(len(s))], device=k.device)
        k_flat[slots], v_flat[slots] = k[rows, cols], v[rows, cols]

    def read(self, lengths):
        """(B, nh, max(lengths), hd) keys and values of every row; a row's entries past its length are stale."""
        c = self.cache
        L = max(lengths)
        n_logical = -(-L // c.block_size)
        k_pool, v_pool = c.k_pool[self.index], c.v_pool[self.index]
        view = c.consecutive_view(n_logical)
        if view is not None:  # each row's blocks are a run of ids, rows evenly spaced: a strided view, no copy
            first, stride = view
            _, bs, nh, hd = k_pool.shape
            shape, strides = (len(lengths), L, nh, hd), (stride * bs * nh * hd, nh * hd, hd, 1)
            k = k_pool.as_strided(shape, strides, first * bs * nh * hd)
            v = v_pool.as_strided(shape, strides, first * bs * nh * hd)
            return k.transpose(1, 2), v.transpose(1, 2)
        table = torch.tensor([(t + [0] * n_logical)[:n_logical] for t in c.block_tables], dtype=torch.long,
                             device=k_pool.device)                              # (B, M) padded block tables
        k = k_pool[table].flatten(1, 2)[:, :L]                                  # (B, M * bs, nh, hd) -> (B, L, nh, hd)
        v = v_pool[table].flatten(1, 2)[:, :L]
        return k.transpose(1, 2), v.transpose(1, 2)

    def n_new(self, k):
        """Per row, how many of the T new keys (B, nh, T, hd) are real: cache.real_tokens when set (a right-padded
        prefill), else all T."""
        return self.cache.real_tokens or [k.size(2)] * k.size(0)

    def write_ragged(self, k, v, starts):
        """Row b's new keys and values (B, nh, T, hd) at positions starts[b].., without attending (an exited token's
        skipped layers, core.fill_kv); of them the first n_new."""
        self.write(k, v, starts, self.n_new(k))

    def attend(self, q, k, v, starts):
        """Ragged decoding: row b's T queries and new keys/values (B, nh, T, hd) sit at positions starts[b]..; of
        them the first n_new are written."""
        return self.cache.attend(self.index, q, k, v, starts, self.n_new(k))


class PagedKVCache(core.Cache):
    """K/V of `n_layers` attention layers for `batch_size` sequences in pooled blocks of `block_size` tokens.

    n_blocks=0 (the default) grows the pool on demand up to enough blocks for every sequence to reach max_len;
    n_blocks > 0 fixes the pool at that many blocks. Sequences may have different lengths (`truncate` takes one
    length per row, `attend` writes and reads ragged rows). Variants subclass it to keep per-row state beside the
    block tables (listed by `row_state`, which `fork` copies); `truncate` must roll that back too."""

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, device, dtype, block_size=16, n_blocks=0):
        self.batch_size, self.max_len, self.block_size = batch_size, max_len, block_size
        self.max_blocks = n_blocks or batch_size * -(-max_len // block_size)
        self.allocator = BlockAllocator(n_blocks)
        shape = (n_blocks, block_size, n_heads, head_dim)
        self.k_pool = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v_pool = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.block_tables = [[] for _ in range(batch_size)]   # logical block -> physical block, per sequence
        self.real_tokens = None   # per-row count of real (unpadded) tokens in a ragged call, set by its caller
        super().__init__([PagedLayer(self, i) for i in range(n_layers)])

    def row_state(self):
        """Tensors (batch_size, ...) of per-row decoding state kept beside the K/V; subclasses list theirs."""
        return []

    def reserve(self, starts, n_new):
        """Grow the pool (every layer's) so that writing n_new[b] positions at starts[b] of each row finds free
        blocks: by what is missing, and by at least a quarter of the pool, so a decoding batch rarely grows it."""
        bs, ref = self.block_size, self.allocator.ref
        need = sum(1 for t, start, n in zip(self.block_tables, starts, n_new) if n
                   for j in range(start // bs, -(-(start + n) // bs)) if j >= len(t) or ref[t[j]] > 1)
        missing = need - self.allocator.n_free
        if missing <= 0 or len(ref) >= self.max_blocks:
            return
        grow = min(self.max_blocks - len(ref), max(missing, -(-len(ref) // 4)))
        for pools in (self.k_pool, self.v_pool):
            for i, pool in enumerate(pools):
                pools[i] = torch.cat([pool, pool.new_zeros((grow,) + pool.shape[1:])])
        self.allocator.extend(grow)

    def consecutive_view(self, n_logical):
        """(first block, stride) when row b's first n_logical blocks are first + b * stride + 0..n_logical-1 (what
        a strided view of the pool can read), else None."""
        tables = self.block_tables
        first = tables[0][0] if tables[0] else None
        stride = tables[1][0] - first if len(tables) > 1 and tables[1] and first is not None else n_logical
        if first is None or stride < n_logical or first + stride * (len(tables) - 1) + n_logical > len(self.allocator.ref):
            return None
        for b, t in enumerate(tables):
            start = first + b * stride
            if t[:n_logical] != list(range(start, start + min(len(t), n_logical))):
                return None
        return first, stride

    def slot_mapping(self, row, start, end):
        """Flat pool slots of positions start..end-1 of sequence `row` (vLLM's slot_mapping), after allocating the
        blocks they need and copying any shared block they write into (copy-on-write, all layers at once)."""
        if end > self.max_len:
            raise RuntimeError(f"cache holds {self.max_len} positions; writing up to {end} overflows it")
        bs, table, pool = self.block_size, self.block_tables[row], self.allocator
        for j in range(start // bs, -(-end // bs)):
            if j == len(table):
                table.append(pool.alloc())
            elif pool.ref[table[j]] > 1:
                fresh = pool.alloc()
                for k_pool, v_pool in zip(self.k_pool, self.v_pool):
                    k_pool[fresh], v_pool[fresh] = k_pool[table[j]], v_pool[table[j]]
                pool.release(table[j])
                table[j] = fresh
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def truncate(self, n):
        """Keep the first n positions of every row (n an int, or one length per row) and return the blocks past
        them to the free list."""
        lengths = [n] * self.batch_size if isinstance(n, int) else list(n)
        for b, keep in enumerate(lengths):
            for layer in self.layers:
                layer.lengths[b] = min(layer.lengths[b], keep)
            keep_blocks = -(-max(layer.lengths[b] for layer in self.layers) // self.block_size)
            while len(self.block_tables[b]) > keep_blocks:
                self.allocator.release(self.block_tables[b].pop())

    def fork(self, src, dst):
        """Sequence dst becomes a copy of sequence src (parallel samples, beam search, a shared prompt): it shares
        src's blocks, and either one's next write into a shared block copies that block first; the model's other
        per-row state (row_state: lattice nodes, prefix sums) is copied, so dst decodes exactly as src would."""
        self.free(dst)
        self.block_tables[dst] = list(self.block_tables[src])
        for block in self.block_tables[dst]:
            self.allocator.share(block)
        for layer in self.layers:
            layer.lengths[dst] = layer.lengths[src]
        for state in self.row_state():
            state[dst] = state[src]

    def free(self, row):
        self.truncate([0 if b == row else self.max_len for b in range(self.batch_size)])

    def attend(self, layer, q, k, v, starts, n_new):
        """Ragged attention through the block tables: row b's queries and new keys/values (B, nh, T, hd) sit at
        positions starts[b].., of which the first n_new[b] are real (the rest is padding, not written). Query i of
        row b reads keys j <= starts[b] + i. Returns (B, nh, T, hd); padded queries' outputs are meaningless."""
        self.layers[layer].write(k, v, starts, n_new)
        lengths = [s + n for s, n in zip(starts, n_new)]
        keys, values = self.layers[layer].read(lengths)                        # (B, nh, L, hd)
        q_pos = torch.tensor(starts, device=q.device)[:, None] + torch.arange(q.size(2), device=q.device)  # (B, T)
        k_pos = torch.arange(keys.size(2), device=q.device)
        mask = (k_pos[None, None] <= q_pos[..., None]) & (k_pos < torch.tensor(lengths, device=q.device)[:, None, None])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])

    def nbytes(self):
        return sum(p.nelement() * p.element_size() for p in self.k_pool + self.v_pool)

    def memory_stats(self):
        """vLLM-style accounting of KV slots: allocated = blocks in use x block_size, used = tokens held; waste is
        the share of allocated slots that hold no token (only the last, partly filled block of each sequence)."""
        blocks = sum(1 for r in self.allocator.ref if r > 0)
        allocated = blocks * self.block_size
        used = sum(self.layers[0].lengths) if self.layers else 0
        per_block = sum(p.shape[1:].numel() * p.element_size() for p in self.k_pool + self.v_pool)
        return dict(block_size=self.block_size, blocks_in_use=blocks, free_blocks=self.allocator.n_free,
                    allocated_slots=allocated, used_slots=used, waste=1 - used / allocated if allocated else 0.0,
                    bytes_in_use=blocks * per_block, pool_bytes=PagedKVCache.nbytes(self))  # K/V pools only


def kv_memory_comparison(paged, contiguous):
    """KV memory of the same sequences in a PagedKVCache and in a contiguous Cache of KVCaches (rows padded to
    max_len), from the cache objects themselves: slots and bytes allocated and used, and the waste share."""
    stats = paged.memory_stats()
    used = stats["used_slots"]
    kv = contiguous.layers[0]
    slots = kv.k.size(0) * kv.max_len
    return dict(paged=stats,
                contiguous=dict(allocated_slots=slots, used_slots=used, waste=1 - used / slots,
                                bytes_in_use=contiguous.nbytes(), pool_bytes=contiguous.nbytes()))
