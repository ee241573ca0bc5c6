//! The trainer: count pre-split chunks, then learn merges incrementally.
//!
//! Counting streams: each batch of texts is split and counted in parallel and folded
//! into one map chunk -> count, so memory grows with the number of *distinct* chunks,
//! not with the corpus.
//!
//! Merging works on the distinct chunks ("words") with their counts. Pair counts live in
//! a hash map; a max-heap orders pairs by (count, then smallest pair) and is refreshed
//! lazily: a popped entry whose count is stale is pushed back with the current count.
//! This is exact because a merge only lowers the counts of existing pairs and creates
//! new pairs (which contain the new token) that are pushed once with their full count.
//! An index pair -> words holding it means each merge visits only those words.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use rayon::prelude::*;

use crate::pretokenize::Splitter;

pub type Pair = (u32, u32);

/// chunk -> number of occurrences.
pub type ChunkCounts = AHashMap<Box<str>, u64>;

/// Splits `texts` in parallel and adds their chunk counts to `counts`.
pub fn count_chunks(splitter: &Splitter, texts: &[String], counts: &mut ChunkCounts) {
    // Per-thread maps borrow the chunks from the batch (no allocation per occurrence);
    // only chunks new to the global map are copied.
    let local: AHashMap<&str, u64> = texts
        .par_iter()
        .fold(AHashMap::new, |mut m: AHashMap<&str, u64>, text| {
            splitter.split(text, |chunk| *m.entry(chunk).or_insert(0) += 1);
            m
        })
        .reduce(AHashMap::new, |mut a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, std::mem::take(&mut a)) };
            for (k, v) in small {
                *big.entry(k).or_insert(0) += v;
            }
            big
        });
    counts.reserve(local.len());
    for (k, v) in local {
        if let Some(c) = counts.get_mut(k) {
            *c += v;
        } else {
            counts.insert(k.into(), v);
        }
    }
}

/// Distinct chunks as token sequences, stored flat: word w is
/// `syms[start[w] .. start[w] + len[w]]`; merging shrinks `len[w]` in place.
struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

#[inline(always)]
fn key(p: Pair) -> u64 {
    ((p.0 as u64) << 32) | p.1 as u64
}

#[inline(always)]
fn unkey(k: u64) -> Pair {
    ((k >> 32) as u32, k as u32)
}

/// Learns up to `num_merges` merges; merge i creates token 256 + i. Stops early when no
/// pair occurs any more. Deterministic: ties go to the smallest (left, right) pair.
pub fn learn_merges(counts: ChunkCounts, num_merges: usize) -> Vec<Pair> {
    // Sort the chunks so word ids (and so every later iteration order) do not depend on
    // hash-map order. Chunks of one byte can never hold a pair: drop them.
    let mut items: Vec<(Box<str>, u64)> = counts.into_iter().filter(|(k, _)| k.len() > 1).collect();
    items.par_sort_unstable();
    let total: usize = items.iter().map(|(k, _)| k.len()).sum();
    let mut words = Words {
        syms: Vec::with_capacity(total),
        start: Vec::with_capacity(items.len()),
        len: Vec::with_capacity(items.len()),
        count: Vec::with_capacity(items.len()),
    };
    for (k, c) in items {
        words.start.push(words.syms.len());
        words.len.push(k.len() as u32);
        words.count.push(c as i64);
        words.syms.extend(k.as_bytes().iter().map(|&b| b as u32));
    }

    // Initial pair counts and the pair -> words index, in parallel over word ranges.
    // Each word appears once per pair it holds (ranges are in word order, so each index
    // list comes out sorted).
    let n_words = words.len.len();
    let n_chunks = rayon::current_num_threads().max(1) * 4;
    let step = n_words.div_ceil(n_chunks).max(1);
    let partial: Vec<(AHashMap<u64, i64>, AHashMap<u64, Vec<u32>>)> = (0..n_words)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| {
            let mut pc: AHashMap<u64, i64> = AHashMap::new();
            let mut wh: AHashMap<u64, Vec<u32>> = AHashMap::new();
            for w in lo..(lo + step).min(n_words) {
                let s = &words.syms[words.start[w]..words.start[w] + words.len[w] as usize];
                for p in s.windows(2) {
                    let k = key((p[0], p[1]));
                    *pc.entry(k).or_insert(0) += words.count[w];
                    let v = wh.entry(k).or_default();
                    if v.last() != Some(&(w as u32)) {
                        v.push(w as u32);
                    }
                }
            }
            (pc, wh)
        })
        .collect();
    let mut pair_counts: AHashMap<u64, i64> = AHashMap::new();
    let mut where_: AHashMap<u64, Vec<u32>> = AHashMap::new();
    for (pc, wh) in partial {
        for (k, c) in pc {
            *pair_counts.entry(k).or_insert(0) += c;
        }
        for (k, v) in wh {
            where_.entry(k).or_default().extend(v);
        }
    }

    let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
        pair_counts.iter().filter(|(_, &c)| c > 0).map(|(&k, &c)| (c, Reverse(k))).collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut new_pairs: Vec<u64> = Vec::new();
    while merges.len() < num_merges {
        let Some((c, Reverse(k))) = heap.pop() else { break };
        let cur = pair_counts.get(&k).copied().unwrap_or(0);
        if cur != c {
            if cur > 0 {
                heap.push((cur, Reverse(k)));
            }
            continue;
        }
        if c <= 0 {
            break;
        }
        let pair = unkey(k);
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        let holders = where_.remove(&k).unwrap_or_default();
        new_pairs.clear();
        for w in holders {
            merge_word(&mut words, w as usize, pair, new_id, |p, delta, w| {
                let pk = key(p);
                let e = pair_counts.entry(pk).or_insert(0);
                if delta > 0 && p.0 != new_id && p.1 != new_id {
                    unreachable!("a merge only creates pairs with the new token");
                }
                if delta > 0 {
                    if *e == 0 {
                        new_pairs.push(pk);
                    }
                    let v = where_.entry(pk).or_default();
                    if v.last() != Some(&(w as u32)) {
                        v.push(w as u32);
                    }
                }
                *e += delta;
            });
        }
        debug_assert_eq!(pair_counts.get(&k).copied().unwrap_or(0), 0);
        pair_counts.remove(&k);
        for &pk in &new_pairs {
            let c = pair_counts[&pk];
            if c > 0 {
                heap.push((c, Reverse(pk)));
            }
        }
    }
    merges
}

/// Replaces each occurrence of `pair` in word `w` (left to right, non-overlapping) with
/// `new_id`, reporting pair-count changes (already weighted by the word's count).
#[inline]
fn merge_word(
    words: &mut Words,
    w: usize,
    pair: Pair,
    new_id: u32,
    mut change: impl FnMut(Pair, i64, usize),
) {
    let (a, b) = pair;
    let cnt = words.count[w];
    let lo = words.start[w];
    let n = words.len[w] as usize;
    let s = &mut words.syms[lo..lo + n];
    let mut out = 0; // write cursor: s[..out] is the merged prefix
    let mut i = 0;
    while i < n {
        if i + 1 < n && s[i] == a && s[i + 1] == b {
            change(pair, -cnt, w);
            if out > 0 {
                let p = s[out - 1];
                change((p, a), -cnt, w);
                change((p, new_id), cnt, w);
            }
            if i + 2 < n {
                let q = s[i + 2];
                change((b, q), -cnt, w);
                change((new_id, q), cnt, w);
            }
            s[out] = new_id;
            out += 1;
            i += 2;
        } else {
            s[out] = s[i];
            out += 1;
            i += 1;
        }
    }
    words.len[w] = out as u32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::DEFAULT_PATTERN;

    /// Obviously-correct BPE: recount every pair each step.
    fn naive(counts: &ChunkCounts, num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> = counts
            .iter()
            .map(|(k, &c)| (k.bytes().map(|b| b as u32).collect(), c as i64))
            .collect();
        let mut merges = vec![];
        for m in 0..num_merges {
            let mut pc: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *pc.entry((p[0], p[1])).or_insert(0) += c;
                }
            }
            let Some((&best, &bc)) = pc.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else {
                break;
            };
            if bc <= 0 {
                break;
            }
            let id = 256 + m as u32;
            merges.push(best);
            for (w, _) in words.iter_mut() {
                let mut out = vec![];
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(id);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    fn counts_of(texts: &[&str]) -> ChunkCounts {
        let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut counts = ChunkCounts::default();
        let owned: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        count_chunks(&sp, &owned, &mut counts);
        counts
    }

    #[test]
    fn first_merges_on_small_text() {
        let counts = counts_of(&["aaa aaa aaa", "hello hello"]);
        let merges = learn_merges(counts, 3);
        // (a,a) occurs twice in each "aaa" (overlaps count): 3 words x 2 = 6.
        assert_eq!(merges[0], (b'a' as u32, b'a' as u32));
        // Then ties at count 3 / 2 ... " aaa" -> [' ', aa, a]: (' ', 256) count 2,
        // (256, 'a') count 3, ('a','a') gone. Highest is (256,'a') = 3.
        assert_eq!(merges[1], (256, b'a' as u32));
    }

    #[test]
    fn matches_naive_reference_with_ties() {
        let text = "the cat sat on the mat. the dog ate the hat! aaaa abab baba 1234 12 \
                    中文中文中 ab ab ab ba ba ba cc cc dd dd 'll 's the the then there";
        let counts = counts_of(&[text, text, "abcabc abab", "zzz zz z"]);
        let want = naive(&counts, 60);
        let got = learn_merges(counts, 60);
        assert_eq!(got, want);
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let texts: Vec<String> = (0..300).map(|i| format!("word{} other{} the x{}", i % 17, i % 5, i % 3)).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
                let mut counts = ChunkCounts::default();
                for batch in texts.chunks(37) {
                    count_chunks(&sp, batch, &mut counts);
                }
                learn_merges(counts, 100)
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(1));
    }

    #[test]
    fn stops_when_no_pairs_remain() {
        let merges = learn_merges(counts_of(&["a\nb\nc"]), 10);
        assert!(merges.is_empty());
        let merges = learn_merges(counts_of(&["ab"]), 10);
        assert_eq!(merges, vec![(b'a' as u32, b'b' as u32)]);
    }
}
