//! rustbpe: a byte-level BPE tokenizer for nanochat.
//!
//! - `pretokenize`: splits text into chunks with the split regex; the default pattern is
//!   matched by hand (fuzzed against fancy-regex), any other pattern by fancy-regex.
//! - `unicode`: the \p{L} / \p{N} / \s tables the hand-written splitter uses, taken from
//!   regex-syntax so they agree with the regex engine.
//! - `train`: streams texts into chunk counts, then learns merges incrementally.
//! - `encode`: tiktoken's merge rule over a vocabulary of (bytes, rank); special tokens.
//! - `fasthash`: integer-key hashers for the hot maps.
//! - `python` (feature `python`): the pyo3 bindings, a drop-in for PyPI `rustbpe` 0.1.0.
//!
//! Where the time goes, and what we do about it (measured with perf on English+Chinese
//! text; see each module for details):
//! - Splitting: fancy-regex's backtracking VM dominated both training and encoding, so
//!   the default pattern has a hand-written splitter (a few ns per char, ASCII fast path,
//!   one table load per BMP char).
//! - Training: counting runs on all cores and overlaps the Python-side iteration; the
//!   merge loop is bound by cache misses on the words it visits (prefetched) and by
//!   hash-map updates (batched per merge in a small map); the largest merges are split
//!   over the cores.
//! - Encoding: whole-chunk lookups use integer keys for short chunks; merges look up
//!   (left, right) token pairs in a table instead of hashing byte slices; long texts and
//!   batches are spread over the cores.

pub mod encode;
pub mod fasthash;
pub mod pretokenize;
pub mod train;
pub mod unicode;

#[cfg(feature = "python")]
mod python;
