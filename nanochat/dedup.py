"""
Duplicate detection in bounded memory, for the cleaning pass and the corpus builder.

Exact duplicates: a record's key is the 64-bit blake2b of its text with whitespace collapsed,
kept in a KeySet of sorted numpy runs: 8 bytes per distinct row (8 MB per million rows, twice
that for a moment while two runs merge), against ~70 bytes for a Python set of ints. Two distinct
texts share a key with probability n^2 / 2^65: about 3e-6 for 10 million rows.

Near duplicates (optional): MinHash over character 5-gram shingles of the lowercased text,
NUM_PERM hash functions in BANDS bands (LSH). A row is a near duplicate when one of its band keys
was seen before; pairs with Jaccard similarity 0.8 collide with probability 1 - (1 - 0.8^8)^16
= 95%, at 0.5 with 6%, unrelated texts practically never. Costs BANDS keys (128 bytes) per row.
"""
import hashlib

import numpy as np

SHINGLE = 5             # characters per shingle
NUM_PERM, BANDS = 128, 16  # 16 bands of 8 rows
MAX_SHINGLE_CHARS = 20_000  # near-duplicate signatures look at the first this many characters
_BLOCK = 4096           # shingles hashed at a time (bounds the (NUM_PERM, block) temporary)
_rng = np.random.default_rng(20240601)  # fixed: keys must not change between runs or processes
_A = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_BAND_SALT = _rng.integers(1, 2**63, BANDS, dtype=np.uint64)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def text_key(text: str) -> int:
    """64-bit key of a text, whitespace runs collapsed (so reflowed copies count as the same)."""
    return int.from_bytes(hashlib.blake2b(normalize_whitespace(text).encode("utf-8"), digest_size=8).digest(), "little")


class KeySet:
    """A set of 64-bit keys held as sorted, disjoint numpy runs. Runs merge like a binary counter
    (each at least twice the next), so there are O(log n) of them and each key is copied
    O(log n) times in all."""

    def __init__(self):
        self.runs = []

    def __len__(self):
        return sum(len(run) for run in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            hit |= run[at] == keys
        return hit

    def add_new(self, keys) -> np.ndarray:
        """Which of `keys` (in order) are new: not in the set and not earlier in `keys`. All are added."""
        keys = np.asarray(keys, dtype=np.uint64)
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        new = first & ~self.contains(keys)
        self._push(np.sort(keys[new]))
        return new

    def _push(self, run):
        if len(run):
            self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer, older = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([older, newer])
            merged.sort(kind="stable")  # two sorted runs: a merge in linear time
            self.runs.append(merged)


def minhash_bands(text: str) -> np.ndarray:
    """The BANDS band keys (uint64) of a text's MinHash signature."""
    text = normalize_whitespace(text.lower())[:MAX_SHINGLE_CHARS]
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(points) - SHINGLE + 1)
    shingles = np.zeros(n, dtype=np.uint64)
    for k in range(min(SHINGLE, len(points))):  # polynomial hash of each window (wraps mod 2^64)
        shingles = shingles * np.uint64(1_000_003) + points[k:k + n]
    shingles = np.unique(shingles)
    signature = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingles), _BLOCK):
        block = shingles[start:start + _BLOCK]
        hashed = (_A[:, None] * block[None, :] + _B[:, None]) >> np.uint64(32)  # universal hashing, top bits
        signature = np.minimum(signature, hashed.min(axis=1))
    rows = signature.reshape(BANDS, NUM_PERM // BANDS)
    keys = np.zeros(BANDS, dtype=np.uint64)
    for j in range(rows.shape[1]):
        keys = keys * np.uint64(0x100000001B3) + rows[:, j]
    return keys ^ _BAND_SALT  # the same values in two bands are different keys


def near_duplicates(bands: np.ndarray, seen: KeySet) -> np.ndarray:
    """bands: (rows, BANDS) in row order -> which rows share a band key with an earlier row or
    with `seen`. Every row's keys are added to `seen`."""
    if not len(bands):
        return np.zeros(0, dtype=bool)
    return ~seen.add_new(bands.reshape(-1)).reshape(bands.shape).all(axis=1)
