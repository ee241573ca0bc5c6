//! rustbpe: a byte-level BPE tokenizer. The algorithms live in pure-Rust modules; the
//! Python bindings (feature `python`) are in `python.rs`.

pub mod encode;
pub mod fasthash;
pub mod pretokenize;
pub mod train;
pub mod unicode;

#[cfg(feature = "python")]
mod python;
