"""
Key/value caches for decoding: KVCache for one batch that moves in step (a prompt's prefill and
its samples; training-time samples), RowKVCache for many sequences of different lengths decoded
together by the engine. GPT.forward asks a cache for the new tokens' rotary angles (rotary), how
long the sequence gets (end) and, per layer, stores and returns keys and values (insert_kv);
attention uses the cache's attn_mask when it has one.
"""
import torch


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.
    Storage is (num_layers, 2, batch, heads, time, head_dim), allocated on the first insert
    with the keys' dtype and device, and grown when a sequence outruns seq_len."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.batch_size, self.num_heads, self.head_dim, self.num_layers = batch_size, num_heads, head_dim, num_layers
        self.seq_len = seq_len
        self.kv = None
        self.pos = 0  # tokens already cached; advanced when the last layer has inserted

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos

    def _allocate(self, seq_len, dtype, device):
        self.seq_len = seq_len
        shape = (self.num_layers, 2, self.batch_size, self.num_heads, seq_len, self.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)  # only [:pos] is ever read: no zero-fill

    def prefill(self, other):
        """Copy a batch-1 (or same-batch) cache into this empty one: prefill a prompt once,
        then sample several continuations of it in parallel."""
        assert self.kv is None and self.pos == 0, "KVCache.prefill: the destination cache must be empty"
        assert other.kv is not None, "KVCache.prefill: the source cache is empty"
        assert (other.num_layers, other.num_heads, other.head_dim) == (self.num_layers, self.num_heads, self.head_dim), \
            "KVCache.prefill: layers/heads/head_dim differ between the caches"
        assert other.batch_size in (1, self.batch_size), \
            f"KVCache.prefill: source batch {other.batch_size} must be 1 or {self.batch_size}"
        self._allocate(max(self.seq_len, other.pos), other.kv.dtype, other.kv.device)
        self.kv[:, :, :, :, :other.pos] = other.kv[:, :, :, :, :other.pos]  # broadcasts batch 1 -> N
        self.pos = other.pos

    attn_mask = None  # attention derives its mask from the shapes (see CausalSelfAttention)

    def rotary(self, cos, sin, T):
        """The rotary angles of the T new tokens: they follow the cached ones."""
        return cos[:, self.pos:self.pos + T], sin[:, self.pos:self.pos + T]

    def end(self, T):
        return self.pos + T

    def insert_kv(self, layer_idx, k, v):
        """Store k, v (B, H, T_new, D) after the cached tokens; return all keys and values so far."""
        if self.kv is None:
            self._allocate(self.seq_len, k.dtype, k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv.size(4):  # grow to the next multiple of 1024 past what is needed
            extra = (t1 + 1024) // 1024 * 1024 - self.kv.size(4)
            pad = torch.zeros(*self.kv.shape[:4], extra, self.head_dim, dtype=self.kv.dtype, device=self.kv.device)
            self.kv = torch.cat([self.kv, pad], dim=4)
            self.seq_len = self.kv.size(4)
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]


class RowKVCache:
    """Keys and values of up to max_rows sequences of different lengths, decoded together (the
    engine's continuous batching). Storage (layers, 2, max_rows, heads, capacity, head_dim); row r
    holds pos[r] tokens. A decode step feeds one token to each of rows 0..n-1: it is written at its
    row's own position, gets its own rotary angle and attends to its own row only (a mask over the
    padded time axis). Rows are loaded from a prefilled KVCache and moved, so the active rows stay
    a prefix and every step works on views, never gathers."""

    def __init__(self, num_layers, num_heads, head_dim, max_rows, device):
        self.shape = (num_layers, 2, max_rows, num_heads, 0, head_dim)
        self.kv, self.device = None, device
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.n, self.attn_mask = 0, None
        self.expected = 0  # tokens per row the caller expects to need: one allocation, not several

    def _reserve(self, length, dtype):
        """Room for `length` tokens per row (grown in steps of 256, so memory follows the requests;
        straight to `expected` when the caller said how long its rows get: each growth allocates,
        zero-fills and copies the whole cache)."""
        if self.kv is not None and length <= self.kv.size(4) and self.kv.dtype == dtype:
            return
        capacity = (max(length, self.expected) + 255) // 256 * 256
        kv = torch.zeros(*self.shape[:4], capacity, self.shape[5], dtype=dtype, device=self.device)
        if self.kv is not None:
            kv[:, :, :, :, :self.kv.size(4)] = self.kv
        self.kv = kv

    def load(self, row, cache, length=None, src=0):
        """Row `row` := row `src` of a prefilled KVCache (its first `length` tokens)."""
        length = cache.pos if length is None else length
        self._reserve(length + 1, cache.kv.dtype)
        self.kv[:, :, row, :, :length] = cache.kv[:, :, src, :, :length]
        self.pos[row] = length

    def save(self, row):
        """A copy of row `row` as a batch-1 KVCache: the row can be freed, and loaded back later
        (into any row) to go on where it was (the engine parks a sequence while its tool runs)."""
        layers, _, _, heads, _, head_dim = self.shape
        length = int(self.pos[row])
        cache = KVCache(1, heads, length, head_dim, layers)
        cache.kv, cache.pos = self.kv[:, :, row:row + 1, :, :length].clone(), length
        return cache

    def move(self, src, dst):
        """Row dst := row src (to keep the active rows a prefix when one in the middle ends)."""
        length = int(self.pos[src])
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]
        self.pos[dst] = length

    def begin_step(self, n):
        """Decode one token for each of rows 0..n-1 next."""
        self.n = n
        pos = self.pos[:n]
        length = int(pos.max()) + 1
        self._reserve(length, self.kv.dtype)
        self.attn_mask = (torch.arange(length, device=self.device) <= pos[:, None])[:, None, None, :]  # (n, 1, 1, L)

    def rotary(self, cos, sin, T):
        assert T == 1, "RowKVCache decodes one token per row"
        p = self.pos[:self.n]
        return cos[0, p][:, None], sin[0, p][:, None]  # (n, 1, 1, D)

    def end(self, T):
        return int(self.pos[:self.n].max()) + T

    def insert_kv(self, layer_idx, k, v):
        n, rows, p = self.n, torch.arange(self.n, device=self.device), self.pos[:self.n]
        self.kv[layer_idx, 0, rows, :, p] = k[:, :, 0]
        self.kv[layer_idx, 1, rows, :, p] = v[:, :, 0]
        length = self.attn_mask.size(-1)
        if layer_idx == self.shape[0] - 1:
            self.pos[:n] += 1
        return self.kv[layer_idx, 0, :n, :, :length], self.kv[layer_idx, 1, :n, :, :length]
