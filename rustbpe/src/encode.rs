//! The encoder: a vocabulary (bytes <-> rank) plus tiktoken's merge rule.
//!
//! Within each pre-split chunk, repeatedly merge the adjacent pair of parts whose
//! concatenated bytes has the lowest rank in the vocabulary (leftmost on ties), until no
//! adjacent pair is in the vocabulary. This is what tiktoken does, so a tiktoken
//! `Encoding` built from our exported ranks gives identical ids.

use ahash::AHashMap;

use rayon::prelude::*;

use crate::fasthash::{short_key, PairMap, ShortMap, SHORT_MAX};
use crate::pretokenize::Splitter;

/// Below this, one text is encoded on one thread (the fork/join would cost more).
const PARALLEL_MIN_BYTES: usize = 1 << 18;

/// Cuts `text` into about `n` pieces at positions that are chunk boundaries of the
/// default pattern whatever comes before: right after a '\n' that is followed by a
/// non-whitespace ASCII char. No alternative of the pattern can match across that
/// point (whitespace runs stop at the non-space; `\s*[\r\n]` and `[\r\n]*` end at the
/// newline; the letter/number/punctuation alternatives cannot contain '\n' except as
/// a trailing `[\r\n]*`).
fn cut_at_boundaries(text: &str, n: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let target = text.len() / n.max(1);
    let mut pieces = Vec::with_capacity(n);
    let mut start = 0;
    while start < bytes.len() {
        let mut cut = start + target;
        if cut >= bytes.len() {
            break;
        }
        // Find the next '\n' followed by a non-whitespace ASCII byte.
        loop {
            match bytes[cut..].iter().position(|&b| b == b'\n') {
                None => {
                    cut = bytes.len();
                    break;
                }
                Some(off) => {
                    cut += off + 1;
                    if cut < bytes.len() && bytes[cut] < 0x80 && !bytes[cut].is_ascii_whitespace() {
                        break;
                    }
                }
            }
        }
        if cut >= bytes.len() {
            break;
        }
        pieces.push(&text[start..cut]);
        start = cut;
    }
    pieces.push(&text[start..]);
    pieces
}

pub type Rank = u32;

pub struct Vocab {
    /// bytes -> rank. Where two ranks share the same bytes the later one wins, as in a
    /// Python dict built from the exported list (what tiktoken would see).
    pub encoder: AHashMap<Vec<u8>, Rank>,
    /// rank -> bytes, for every rank given (ranks may be sparse).
    pub decoder: AHashMap<Rank, Vec<u8>>,
    /// Rank of each single byte: the encoder's innermost lookup, made an array.
    byte_rank: [Rank; 256],
    /// (left rank << 32 | right rank) -> rank of the two tokens' concatenated bytes.
    pair_rank: PairMap<Rank>,
    /// The same for two single bytes, as a dense 256x256 table indexed by the bytes
    /// (256 KiB, stays in L2): the first round of every merge is all byte pairs.
    byte_pair_rank: Vec<Rank>,
    /// Ranks of the tokens of at most SHORT_MAX bytes, keyed by `short_key`: the
    /// whole-chunk lookup that most chunks end with, without a slice hash or memcmp.
    short: ShortMap<Rank>,
}

/// Chunks up to this many bytes merge in stack arrays with a linear scan; longer ones
/// use a heap.
const SMALL: usize = 64;

impl Vocab {
    /// Builds a vocabulary from (bytes, rank) pairs. Every single byte must have a rank,
    /// so that any text can be encoded.
    pub fn new(ranks: Vec<(Vec<u8>, Rank)>) -> Result<Vocab, String> {
        let mut encoder = AHashMap::with_capacity(ranks.len());
        let mut decoder = AHashMap::with_capacity(ranks.len());
        let mut sorted = ranks;
        sorted.sort_by_key(|(_, r)| *r);
        for (bytes, rank) in sorted {
            if bytes.is_empty() {
                return Err(format!("rank {rank} has empty bytes"));
            }
            if decoder.insert(rank, bytes.clone()).is_some() {
                return Err(format!("rank {rank} is given twice"));
            }
            encoder.insert(bytes, rank);
        }
        let mut byte_rank = [0; 256];
        for (b, r) in byte_rank.iter_mut().enumerate() {
            *r = *encoder
                .get(&[b as u8][..])
                .ok_or_else(|| format!("the ranks have no token for the single byte {b}"))?;
        }
        // Every way to split each token into two tokens. The merge loop only ever joins
        // two tokens, so this table answers all its lookups.
        let mut pair_rank =
            PairMap::with_capacity_and_hasher(encoder.len() * 4, Default::default());
        for (bytes, &rank) in &encoder {
            for k in 1..bytes.len() {
                if let (Some(&l), Some(&r)) = (encoder.get(&bytes[..k]), encoder.get(&bytes[k..])) {
                    pair_rank.insert(((l as u64) << 32) | r as u64, rank);
                }
            }
        }
        let short = encoder
            .iter()
            .filter(|(b, _)| b.len() <= SHORT_MAX)
            .map(|(b, &r)| (short_key(b), r))
            .collect();
        let mut byte_pair_rank = vec![Rank::MAX; 1 << 16];
        for (bytes, &rank) in &encoder {
            if bytes.len() == 2 {
                byte_pair_rank[(bytes[0] as usize) << 8 | bytes[1] as usize] = rank;
            }
        }
        Ok(Vocab {
            encoder,
            decoder,
            byte_rank,
            pair_rank,
            byte_pair_rank,
            short,
        })
    }

    /// The 256 single bytes (rank = byte value) followed by one token per merge.
    pub fn from_merges(merges: &[(Rank, Rank)]) -> Vocab {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in merges {
            let mut t = tokens[a as usize].clone();
            t.extend_from_slice(&tokens[b as usize]);
            tokens.push(t);
        }
        let ranks = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as Rank))
            .collect();
        Vocab::new(ranks).expect("merges give a complete vocabulary")
    }

    pub fn len(&self) -> usize {
        self.decoder.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decoder.is_empty()
    }

    /// (bytes, rank) sorted by rank.
    pub fn ranks(&self) -> Vec<(Vec<u8>, Rank)> {
        let mut v: Vec<(Vec<u8>, Rank)> =
            self.decoder.iter().map(|(r, b)| (b.clone(), *r)).collect();
        v.sort_by_key(|(_, r)| *r);
        v
    }

    /// Rank of the concatenation of tokens `a` and `b`, if it is a token.
    #[inline(always)]
    fn pair(&self, a: Rank, b: Rank) -> Rank {
        self.pair_rank
            .get(&(((a as u64) << 32) | b as u64))
            .copied()
            .unwrap_or(Rank::MAX)
    }

    #[inline(always)]
    fn byte_pair(&self, a: u8, b: u8) -> Rank {
        self.byte_pair_rank[(a as usize) << 8 | b as usize]
    }

    /// Appends the ids of one pre-split chunk.
    #[inline]
    pub fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<Rank>) {
        if chunk.len() == 1 {
            out.push(self.byte_rank[chunk[0] as usize]);
            return;
        }
        // Most chunks of in-domain text are whole tokens: one hash lookup. (No separate
        // chunk -> ids cache: on our English+Chinese corpus at vocab 32768, 90% of chunks
        // are whole tokens, and only 15% of the bytes of the rest repeat, mostly CJK
        // runs that are unique; a cache would save a few percent for its upkeep.)
        let whole = if chunk.len() <= SHORT_MAX {
            self.short.get(&short_key(chunk))
        } else {
            self.encoder.get(chunk)
        };
        if let Some(&r) = whole {
            out.push(r);
            return;
        }
        if chunk.len() <= SMALL {
            self.merge_small(chunk, out);
        } else {
            self.merge_large(chunk, out);
        }
    }

    /// tiktoken's merge loop for a short chunk, on token ids: the parts live in stack
    /// arrays and each step scans for the lowest pair rank. Every part is a token, so the
    /// rank of two parts' concatenated bytes is one lookup in the (left, right) table
    /// instead of hashing a byte slice as tiktoken does.
    fn merge_small(&self, piece: &[u8], out: &mut Vec<Rank>) {
        let mut toks = [0 as Rank; SMALL];
        let mut pairs = [Rank::MAX; SMALL];
        let mut n = piece.len();
        for (i, &b) in piece.iter().enumerate() {
            toks[i] = self.byte_rank[b as usize];
        }
        for i in 0..n - 1 {
            pairs[i] = self.byte_pair(piece[i], piece[i + 1]);
        }
        // pairs[i] ranks toks[i] + toks[i+1]; pairs[n-1] stays Rank::MAX.
        loop {
            let mut best = (Rank::MAX, 0);
            for (i, &r) in pairs[..n - 1].iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            if best.0 == Rank::MAX {
                break;
            }
            let i = best.1;
            toks[i] = best.0;
            toks.copy_within(i + 2..n, i + 1);
            pairs.copy_within(i + 2..n, i + 1);
            n -= 1;
            pairs[n - 1] = Rank::MAX;
            if i + 1 < n {
                pairs[i] = self.pair(toks[i], toks[i + 1]);
            } else {
                pairs[i] = Rank::MAX;
            }
            if i > 0 {
                pairs[i - 1] = self.pair(toks[i - 1], toks[i]);
            }
        }
        out.extend_from_slice(&toks[..n]);
    }

    /// The same merge rule for long chunks (long CJK runs, long symbol runs): a min-heap
    /// keyed by (rank, position) over a linked list of parts, O(n log n) instead of
    /// tiktoken's O(n^2). Stale heap entries are skipped when popped.
    fn merge_large(&self, piece: &[u8], out: &mut Vec<Rank>) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let n = piece.len();
        // Parts are identified by their first byte's position; next/prev link live parts.
        let mut tok: Vec<Rank> = piece.iter().map(|&b| self.byte_rank[b as usize]).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.byte_pair(piece[i], piece[i + 1]);
            if r != Rank::MAX {
                heap.push(Reverse((r, i)));
            }
        }
        while let Some(Reverse((r, i))) = heap.pop() {
            if !alive[i] || next[i] >= n || self.pair(tok[i], tok[next[i]]) != r {
                continue;
            }
            let j = next[i];
            alive[j] = false;
            tok[i] = r;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
                let rn = self.pair(r, tok[next[j]]);
                if rn != Rank::MAX {
                    heap.push(Reverse((rn, i)));
                }
            }
            let p = prev[i];
            if p != usize::MAX {
                let rp = self.pair(tok[p], r);
                if rp != Rank::MAX {
                    heap.push(Reverse((rp, p)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(tok[i]);
            i = next[i];
        }
    }

    pub fn encode(&self, splitter: &Splitter, text: &str) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        splitter.split(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out));
        out
    }

    /// `encode` for one long text on all cores: the text is cut where a chunk boundary is
    /// certain, so the result is exactly the sequential one.
    pub fn encode_parallel(&self, splitter: &Splitter, text: &str) -> Vec<Rank> {
        let threads = rayon::current_num_threads();
        if text.len() < PARALLEL_MIN_BYTES || threads < 2 || !matches!(splitter, Splitter::Default)
        {
            return self.encode(splitter, text);
        }
        let pieces = cut_at_boundaries(text, threads * 4);
        let parts: Vec<Vec<Rank>> = pieces
            .par_iter()
            .map(|p| self.encode(splitter, p))
            .collect();
        parts.concat()
    }

    /// Encodes each text; texts are spread over the rayon pool.
    pub fn encode_batch(&self, splitter: &Splitter, texts: &[&str]) -> Vec<Vec<Rank>> {
        texts.par_iter().map(|t| self.encode(splitter, t)).collect()
    }

    /// Decodes `ids` to text, replacing invalid UTF-8 with U+FFFD exactly as Python's
    /// `bytes.decode("utf-8", errors="replace")` does (one per maximal invalid subpart).
    pub fn decode_lossy(&self, specials: &Specials, ids: &[Rank]) -> Result<String, Rank> {
        Ok(String::from_utf8_lossy(&self.decode_with(specials, ids)?).into_owned())
    }

    /// Concatenated bytes of `ids` (specials included), or the first unknown id.
    pub fn decode_with(&self, specials: &Specials, ids: &[Rank]) -> Result<Vec<u8>, Rank> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match self.decoder.get(&id) {
                Some(b) => out.extend_from_slice(b),
                None => out.extend_from_slice(specials.decoder.get(&id).ok_or(id)?),
            }
        }
        Ok(out)
    }

    /// Concatenated bytes of `ids`, or the first unknown id.
    pub fn decode_bytes(&self, ids: &[Rank]) -> Result<Vec<u8>, Rank> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.decoder.get(&id).ok_or(id)?);
        }
        Ok(out)
    }
}

/// Special tokens: literal strings that `encode_with_special` maps to fixed ids.
#[derive(Default)]
pub struct Specials {
    /// (string, id), longest string first, so the longest match wins at a position.
    pub by_len: Vec<(String, Rank)>,
    pub decoder: AHashMap<Rank, Vec<u8>>,
}

impl Specials {
    /// Validates and stores specials: non-empty strings, ids unique and not used by
    /// `vocab`.
    pub fn new(vocab: &Vocab, tokens: Vec<(String, Rank)>) -> Result<Specials, String> {
        let mut sp = Specials::default();
        let mut seen = AHashMap::new();
        for (s, id) in tokens {
            if s.is_empty() {
                return Err("special token strings must not be empty".into());
            }
            if let Some(b) = vocab.decoder.get(&id) {
                return Err(format!(
                    "special token {s:?} has id {id}, already the id of the token {:?}",
                    String::from_utf8_lossy(b)
                ));
            }
            if let Some(other) = seen.insert(id, s.clone()) {
                return Err(format!(
                    "special tokens {other:?} and {s:?} share the id {id}"
                ));
            }
            sp.decoder.insert(id, s.clone().into_bytes());
            sp.by_len.push((s, id));
        }
        sp.by_len
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(sp)
    }

    /// Encodes `text`, mapping special-token strings to their ids (leftmost occurrence
    /// first, longest on ties) and everything between them as ordinary text.
    pub fn encode(&self, vocab: &Vocab, splitter: &Splitter, text: &str) -> Vec<Rank> {
        let mut out = Vec::new();
        // Next occurrence of each special at or after `pos` (usize::MAX: none).
        let mut next: Vec<usize> = vec![0; self.by_len.len()];
        let mut stale = vec![true; self.by_len.len()];
        let mut pos = 0;
        loop {
            let mut best: Option<(usize, usize)> = None; // (start, index)
            for (k, (s, _)) in self.by_len.iter().enumerate() {
                if stale[k] || (next[k] != usize::MAX && next[k] < pos) {
                    next[k] = text[pos..].find(s.as_str()).map_or(usize::MAX, |i| pos + i);
                    stale[k] = false;
                }
                if next[k] != usize::MAX && best.is_none_or(|(b, _)| next[k] < b) {
                    best = Some((next[k], k));
                }
            }
            let Some((start, k)) = best else { break };
            splitter.split(&text[pos..start], |c| {
                vocab.encode_chunk(c.as_bytes(), &mut out)
            });
            out.push(self.by_len[k].1);
            pos = start + self.by_len[k].0.len();
        }
        splitter.split(&text[pos..], |c| vocab.encode_chunk(c.as_bytes(), &mut out));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::DEFAULT_PATTERN;

    fn vocab_with(extra: &[&[u8]]) -> Vocab {
        let mut ranks: Vec<(Vec<u8>, Rank)> = (0..=255u8).map(|b| (vec![b], b as Rank)).collect();
        for (i, t) in extra.iter().enumerate() {
            ranks.push((t.to_vec(), 256 + i as Rank));
        }
        Vocab::new(ranks).unwrap()
    }

    #[test]
    fn lowest_rank_pair_merges_first() {
        // "ab" < "bc" < "abc": "abc" -> [ab, c] -> [abc].
        let v = vocab_with(&[b"ab", b"bc", b"abc"]);
        let mut out = vec![];
        v.encode_chunk(b"abcd", &mut out);
        assert_eq!(out, vec![258, b'd' as Rank]);
        // "bc" ranks first: [a, bc], then "a"+"bc" is the token "abc" too (tiktoken merges
        // by the concatenated bytes, not by a merge table).
        let v = vocab_with(&[b"bc", b"ab", b"abc"]);
        let mut out = vec![];
        v.encode_chunk(b"abcd", &mut out);
        assert_eq!(out, vec![258, b'd' as Rank]);
        // Without "abc": [a, bc, d].
        let v = vocab_with(&[b"bc", b"ab"]);
        let mut out = vec![];
        v.encode_chunk(b"abcd", &mut out);
        assert_eq!(out, vec![b'a' as Rank, 256, b'd' as Rank]);
    }

    /// tiktoken's algorithm as written there: byte slices, rank of concatenated bytes.
    fn reference_merge(v: &Vocab, piece: &[u8]) -> Vec<Rank> {
        let rank = |b: &[u8]| v.encoder.get(b).copied().unwrap_or(Rank::MAX);
        let mut parts: Vec<(usize, Rank)> = (0..piece.len() - 1)
            .map(|i| (i, rank(&piece[i..i + 2])))
            .collect();
        parts.push((piece.len() - 1, Rank::MAX));
        parts.push((piece.len(), Rank::MAX));
        let get = |parts: &Vec<(usize, Rank)>, i: usize| {
            if i + 3 < parts.len() {
                rank(&piece[parts[i].0..parts[i + 3].0])
            } else {
                Rank::MAX
            }
        };
        loop {
            let mut min = (Rank::MAX, 0);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, i);
                }
            }
            if min.0 == Rank::MAX {
                break;
            }
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = get(&parts, i - 1);
            }
            parts[i].1 = get(&parts, i);
            parts.remove(i + 1);
        }
        parts
            .windows(2)
            .map(|w| rank(&piece[w[0].0..w[1].0]))
            .collect()
    }

    #[test]
    fn small_and_large_merges_agree_with_tiktoken_rule() {
        let v = vocab_with(&[
            b"aa",
            b"aaaa",
            b"ab",
            b"ba",
            b"aab",
            b"bb",
            b"abab",
            b"ba ",
            b" a",
            b"bab",
            b"a b",
            b"aaaaaaaa",
            b" ab",
            b"b a",
        ]);
        let mut seed = 7u64;
        for _ in 0..3000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 2 + (seed >> 33) as usize % 150;
            let piece: Vec<u8> = (0..n)
                .map(|k| {
                    let x = (seed.rotate_left(k as u32 % 64)
                        ^ (k as u64).wrapping_mul(0x9E3779B97F4A7C15))
                        >> 13;
                    [b'a', b'b', b' ', b'a'][(x % 4) as usize]
                })
                .collect();
            let want = reference_merge(&v, &piece);
            let mut large = vec![];
            v.merge_large(&piece, &mut large);
            assert_eq!(large, want, "piece {:?}", String::from_utf8_lossy(&piece));
            if n <= SMALL {
                let mut small = vec![];
                v.merge_small(&piece, &mut small);
                assert_eq!(small, want, "piece {:?}", String::from_utf8_lossy(&piece));
            }
            let mut any = vec![];
            v.encode_chunk(&piece, &mut any);
            assert_eq!(v.decode_bytes(&any).unwrap(), piece);
        }
    }

    #[test]
    fn round_trip_and_unknown_id() {
        let v = vocab_with(&[b"he", b"ll", b"hell", b"o ", "中".as_bytes()]);
        let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
        let text = "hello world, 中文 😀 'll\r\n";
        let ids = v.encode(&sp, text);
        assert_eq!(v.decode_bytes(&ids).unwrap(), text.as_bytes());
        assert_eq!(v.decode_bytes(&[1, 99999]), Err(99999));
    }

    #[test]
    fn specials_longest_match_first() {
        let v = vocab_with(&[b"ab"]);
        let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
        let specials = Specials::new(
            &v,
            vec![
                ("<|a|>".into(), 1000),
                ("<|a|><|b|>".into(), 1001),
                ("<|b|>".into(), 1002),
            ],
        )
        .unwrap();
        let ids = specials.encode(&v, &sp, "ab<|a|><|b|>x<|b|><|a|>");
        assert_eq!(ids, vec![256, 1001, b'x' as Rank, 1002, 1000]);
        let back = v.decode_with(&specials, &ids).unwrap();
        assert_eq!(back, b"ab<|a|><|b|>x<|b|><|a|>");
        assert_eq!(
            specials.encode(&v, &sp, "no specials"),
            v.encode(&sp, "no specials")
        );
        assert!(Specials::new(&v, vec![("x".into(), 5)])
            .err()
            .unwrap()
            .contains("already"));
        assert!(Specials::new(&v, vec![("x".into(), 900), ("y".into(), 900)]).is_err());
        assert!(Specials::new(&v, vec![("".into(), 900)]).is_err());
    }

    #[test]
    fn parallel_encode_equals_sequential() {
        let v = vocab_with(&[b"he", b"ll", b"hell", b"o ", b"\n\n", b" w"]);
        let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut text = String::new();
        let lines = [
            "hello world\n",
            "\n",
            "  indented\n",
            "x\n\n\ty\r\n",
            "中文\n",
            "!!\n",
            "12\n",
        ];
        let mut i = 0usize;
        while text.len() < 3 * PARALLEL_MIN_BYTES {
            text.push_str(lines[i % lines.len()]);
            i = i.wrapping_mul(31).wrapping_add(7) % 1000;
        }
        for n in [2, 3, 8, 64] {
            let pieces = cut_at_boundaries(&text, n);
            assert_eq!(pieces.concat(), text);
            let mut joined = vec![];
            for p in &pieces {
                joined.extend(sp.split_to_vec(p));
            }
            assert_eq!(joined, sp.split_to_vec(&text));
        }
        assert_eq!(v.encode_parallel(&sp, &text), v.encode(&sp, &text));
    }

    #[test]
    fn decode_replaces_invalid_utf8() {
        let v = vocab_with(&["中".as_bytes()]);
        let none = Specials::default();
        // A truncated 3-byte sequence, a lone continuation byte, 0xFF, then valid text.
        let ids = [0xE4, 0xB8, b'a' as Rank, 0x80, 0xFF, 256];
        assert_eq!(
            v.decode_lossy(&none, &ids).unwrap(),
            "\u{FFFD}a\u{FFFD}\u{FFFD}中"
        );
        assert_eq!(v.decode_lossy(&none, &[b'x' as Rank, 4242]), Err(4242));
    }

    #[test]
    fn missing_byte_is_an_error() {
        let ranks = vec![(b"a".to_vec(), 0)];
        assert!(Vocab::new(ranks).err().unwrap().contains("single byte"));
    }

    #[test]
    fn duplicate_rank_is_an_error() {
        let mut ranks: Vec<(Vec<u8>, Rank)> = (0..=255u8).map(|b| (vec![b], b as Rank)).collect();
        ranks.push((b"xy".to_vec(), 5));
        assert!(Vocab::new(ranks).err().unwrap().contains("twice"));
    }
}
