//! Python bindings: a thin layer that validates arguments, releases the GIL around the
//! work, and turns every failure (including a Rust panic) into a Python exception.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::encode::{Rank, Specials, Vocab};
use crate::pretokenize::{Splitter, DEFAULT_PATTERN};
use crate::train::{count_chunks, learn_merges, ChunkCounts};

/// Runs `f`, turning a panic into a RuntimeError instead of unwinding into Python.
fn guarded<T>(f: impl FnOnce() -> T) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        PyRuntimeError::new_err(format!("rustbpe internal error: {msg}"))
    })
}

/// A byte-level BPE tokenizer: train it, or load ranks, then encode and decode.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    vocab: Vocab,
    specials: Specials,
}

fn extract_str<'a>(item: &'a Bound<'_, PyAny>, index: usize, what: &str) -> PyResult<&'a str> {
    let s = item.cast::<PyString>().map_err(|_| {
        let ty = item
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{what} {index} is of type {ty}, expected str"))
    })?;
    s.to_str()
}

fn id_from(id: i64) -> PyResult<Rank> {
    Rank::try_from(id).map_err(|_| PyValueError::new_err(format!("unknown token id: {id}")))
}

fn specials_from(dict: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Rank)>> {
    let mut v = Vec::with_capacity(dict.len());
    for (k, val) in dict.iter() {
        let s: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("special token names must be str"))?;
        let id: i64 = val.extract().map_err(|_| {
            PyTypeError::new_err(format!("the id of special token {s:?} must be an int"))
        })?;
        let id = Rank::try_from(id).map_err(|_| {
            PyValueError::new_err(format!("special token {s:?} has invalid id {id}"))
        })?;
        v.push((s, id));
    }
    Ok(v)
}

/// A batch is cut at this many bytes even before `buffer_size` strings, so memory
/// stays bounded when the strings are large (whole books, files).
const BATCH_MAX_BYTES: usize = 64 << 20;

/// Pulls up to `buffer_size` strings (or BATCH_MAX_BYTES) from `iter`; `done` is true
/// once it is exhausted. `index` counts the items seen, for error messages.
fn pull_batch(
    iter: &mut Bound<'_, pyo3::types::PyIterator>,
    index: &mut usize,
    buffer_size: usize,
) -> PyResult<(Vec<String>, bool)> {
    let mut batch = Vec::with_capacity(buffer_size.min(1 << 16));
    let mut bytes = 0;
    while batch.len() < buffer_size && bytes < BATCH_MAX_BYTES {
        match iter.next() {
            None => return Ok((batch, true)),
            Some(item) => {
                let item = item?;
                let s = extract_str(&item, *index, "iterator item")?;
                bytes += s.len();
                batch.push(s.to_owned());
                *index += 1;
            }
        }
    }
    Ok((batch, false))
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer: the 256 single bytes and the default split pattern.
    #[new]
    fn new() -> Self {
        Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::new(DEFAULT_PATTERN).expect("default pattern compiles"),
            vocab: Vocab::from_merges(&[]),
            specials: Specials::default(),
        }
    }

    /// Train from a streaming iterator of str. Batches of `buffer_size` strings are pulled
    /// under the GIL, then split and counted in parallel with the GIL released; only the
    /// distinct chunks and their counts are kept. `vocab_size` counts the 256 bytes plus
    /// the merges; training stops early if no pair is left to merge. Clears any special
    /// tokens.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the single bytes), got {vocab_size}"
            )));
        }
        if vocab_size > 1 << 31 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at most 2^31 (token ids are 32-bit), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be positive, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let mut iter = iterator.try_iter()?;

        crate::train::log("training starts");
        let mut index = 0usize;
        // Pipeline: while a worker thread splits and counts batch k (all cores, no GIL),
        // this thread pulls batch k+1 from Python under the GIL, so the Python-side
        // iteration and copying overlap the counting instead of adding to it.
        let counts = std::thread::scope(|scope| -> PyResult<ChunkCounts> {
            let mut counts = ChunkCounts::default();
            let mut pending: Option<
                std::thread::ScopedJoinHandle<'_, Result<ChunkCounts, String>>,
            > = None;
            loop {
                let (batch, done) = pull_batch(&mut iter, &mut index, buffer_size as usize)?;
                if let Some(h) = pending.take() {
                    counts = py
                        .detach(|| h.join())
                        .map_err(|_| {
                            PyRuntimeError::new_err("rustbpe internal error: counting thread died")
                        })?
                        .map_err(PyRuntimeError::new_err)?;
                }
                if !batch.is_empty() {
                    let mut c = std::mem::take(&mut counts);
                    let splitter = &splitter;
                    pending = Some(scope.spawn(move || {
                        catch_unwind(AssertUnwindSafe(|| count_chunks(splitter, &batch, &mut c)))
                            .map(|_| c)
                            .map_err(|_| "rustbpe internal error: panic while counting".to_string())
                    }));
                }
                if done {
                    if let Some(h) = pending.take() {
                        counts = py
                            .detach(|| h.join())
                            .map_err(|_| {
                                PyRuntimeError::new_err(
                                    "rustbpe internal error: counting thread died",
                                )
                            })?
                            .map_err(PyRuntimeError::new_err)?;
                    }
                    return Ok(counts);
                }
            }
        })?;
        if counts.is_empty() {
            return Err(PyValueError::new_err(
                "empty corpus: the iterator gave no text to train on",
            ));
        }
        crate::train::log(&format!("{index} texts counted"));
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.detach(|| guarded(|| learn_merges(counts, num_merges)))?;
        self.vocab = Vocab::from_merges(&merges);
        self.pattern = pattern;
        self.splitter = splitter;
        self.specials = Specials::default();
        Ok(())
    }

    /// Number of mergeable tokens: the 256 bytes plus the merges (special tokens are
    /// not counted, as in the shared interface and PyPI rustbpe).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// (token bytes, rank) for every mergeable token, sorted by rank: what
    /// `tiktoken.Encoding(mergeable_ranks=dict(...))` takes.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, Rank)> {
        self.vocab
            .ranks()
            .into_iter()
            .map(|(b, r)| (PyBytes::new(py, &b), r))
            .collect()
    }

    /// Encode text; special-token strings are treated as plain text.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<Rank>> {
        py.detach(|| guarded(|| self.vocab.encode_parallel(&self.splitter, text)))
    }

    /// Encode a list of texts in parallel (GIL released).
    fn batch_encode(&self, py: Python<'_>, texts: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<Rank>>> {
        // Borrow the UTF-8 of each Python str instead of copying: `items` keeps the
        // objects alive while the GIL is released.
        let items: Vec<Bound<'_, PyAny>> = if let Ok(list) = texts.cast::<PyList>() {
            list.iter().collect()
        } else {
            texts.try_iter()?.collect::<PyResult<_>>()?
        };
        let strs: Vec<&str> = items
            .iter()
            .enumerate()
            .map(|(i, o)| extract_str(o, i, "item"))
            .collect::<PyResult<_>>()?;
        py.detach(|| guarded(|| self.vocab.encode_batch(&self.splitter, &strs)))
    }

    /// Decode ids to str; invalid UTF-8 is replaced with U+FFFD (errors="replace").
    fn decode(&self, py: Python<'_>, ids: Vec<i64>) -> PyResult<String> {
        let ids: Vec<Rank> = ids.into_iter().map(id_from).collect::<PyResult<_>>()?;
        py.detach(|| guarded(|| self.vocab.decode_lossy(&self.specials, &ids)))?
            .map_err(|id| PyValueError::new_err(format!("unknown token id: {id}")))
    }

    /// Decode ids to raw bytes.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.decode_ids(py, ids)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// The bytes of one token (a special token's UTF-8 string for special ids).
    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.decode_ids(py, vec![id])?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// A tokenizer from (bytes, rank) pairs (a list, or a dict bytes -> rank as tiktoken
    /// uses), a split pattern, and optionally special tokens {str: id}.
    #[staticmethod]
    #[pyo3(signature = (mergeable_ranks, pattern, special_tokens=None))]
    fn from_ranks(
        mergeable_ranks: &Bound<'_, PyAny>,
        pattern: &str,
        special_tokens: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Tokenizer> {
        let pairs: Vec<Bound<'_, PyAny>> = if let Ok(d) = mergeable_ranks.cast::<PyDict>() {
            d.items().iter().collect()
        } else {
            mergeable_ranks.try_iter()?.collect::<PyResult<_>>()?
        };
        let mut ranks = Vec::with_capacity(pairs.len());
        for (i, p) in pairs.iter().enumerate() {
            let (b, r): (Bound<'_, PyAny>, i64) = p.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "mergeable_ranks item {i} must be a (bytes, int) pair"
                ))
            })?;
            let b = b.cast::<PyBytes>().map_err(|_| {
                PyTypeError::new_err(format!("mergeable_ranks item {i}: token must be bytes"))
            })?;
            let r = Rank::try_from(r).map_err(|_| {
                PyValueError::new_err(format!("mergeable_ranks item {i}: invalid rank {r}"))
            })?;
            ranks.push((b.as_bytes().to_vec(), r));
        }
        let splitter = Splitter::new(pattern).map_err(PyValueError::new_err)?;
        let vocab = Vocab::new(ranks).map_err(PyValueError::new_err)?;
        let specials = match special_tokens {
            Some(d) => Specials::new(&vocab, specials_from(d)?).map_err(PyValueError::new_err)?,
            None => Specials::default(),
        };
        Ok(Tokenizer {
            pattern: pattern.to_string(),
            splitter,
            vocab,
            specials,
        })
    }

    /// Replace the special tokens with {str: id}; ids must not be mergeable ranks.
    fn set_special_tokens(&mut self, special_tokens: &Bound<'_, PyDict>) -> PyResult<()> {
        self.specials = Specials::new(&self.vocab, specials_from(special_tokens)?)
            .map_err(PyValueError::new_err)?;
        Ok(())
    }

    fn get_special_tokens(&self) -> HashMap<String, Rank> {
        self.specials.by_len.iter().cloned().collect()
    }

    /// Encode text, mapping special-token strings to their ids (longest match first).
    fn encode_with_special(&self, py: Python<'_>, text: &str) -> PyResult<Vec<Rank>> {
        py.detach(|| guarded(|| self.specials.encode(&self.vocab, &self.splitter, text)))
    }
}

impl Tokenizer {
    fn decode_ids(&self, py: Python<'_>, ids: Vec<i64>) -> PyResult<Vec<u8>> {
        let ids: Vec<Rank> = ids.into_iter().map(id_from).collect::<PyResult<_>>()?;
        py.detach(|| guarded(|| self.vocab.decode_with(&self.specials, &ids)))?
            .map_err(|id| PyValueError::new_err(format!("unknown token id: {id}")))
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
