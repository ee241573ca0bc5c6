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

use crate::fasthash::PairMap;
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
            let (mut big, small) = if a.len() >= b.len() {
                (a, b)
            } else {
                (b, std::mem::take(&mut a))
            };
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

/// One distinct chunk ("word"): its tokens are `syms[start .. start + len]` in the shared
/// buffer (merging shrinks `len` in place), and `count` is how often it occurred.
/// Packed in one struct so visiting a word costs one cache miss for its metadata.
#[derive(Clone, Copy)]
struct Word {
    start: usize,
    count: i64,
    len: u32,
}

#[inline(always)]
fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; it never faults, even on a bad address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
fn key(p: Pair) -> u64 {
    ((p.0 as u64) << 32) | p.1 as u64
}

#[inline(always)]
fn unkey(k: u64) -> Pair {
    ((k >> 32) as u32, k as u32)
}

/// What we keep per live pair: its count and its list of words (which may still hold
/// it) in the arena.
#[derive(Clone, Copy, Default)]
struct PairInfo {
    count: i64,
    start: u32,
    len: u32,
}

/// Pair counts plus the pair -> words index, in one map so each update is one lookup.
/// Lists live back to back in one arena and the map holds (start, len) into it: a few
/// bytes per pair instead of a heap-allocated Vec per pair, which matters because every
/// merge creates many new (mostly rare) pairs. Removed lists leave holes that `compact`
/// squeezes out once they are half the arena.
struct Pairs {
    map: PairMap<PairInfo>,
    arena: Vec<u32>,
    live: usize,
}

impl Pairs {
    fn count(&self, k: u64) -> i64 {
        self.map.get(&k).map_or(0, |p| p.count)
    }

    /// Forgets pair `k`, returning the arena range of its word list.
    fn take(&mut self, k: u64) -> std::ops::Range<usize> {
        match self.map.remove(&k) {
            Some(p) => {
                self.live -= p.len as usize;
                p.start as usize..(p.start + p.len) as usize
            }
            None => 0..0,
        }
    }

    /// Adds `d` to the count of `k`; a pair whose count drops to zero is held by no word
    /// any more, so it is forgotten at once (its heap entries are dropped when popped).
    fn add(&mut self, k: u64, d: i64) {
        let p = self.map.entry(k).or_default();
        p.count += d;
        if p.count == 0 {
            self.take(k);
        }
    }

    /// Sets the word list of the (counted) pair `k`.
    fn set_list(&mut self, k: u64, words: &[u32]) {
        let start = self.arena.len();
        // Grow by a quarter rather than doubling: the arena is the largest structure of
        // the merge phase, and a large realloc is an mremap, not a copy.
        if self.arena.capacity() - start < words.len() {
            self.arena.reserve_exact(words.len().max(start / 4));
        }
        self.arena.extend_from_slice(words);
        assert!(
            self.arena.len() <= u32::MAX as usize,
            "pair index exceeds 2^32 entries"
        );
        let p = self.map.get_mut(&k).expect("set_list on a counted pair");
        self.live += words.len() - p.len as usize;
        p.start = start as u32;
        p.len = words.len() as u32;
    }

    fn compact(&mut self) {
        if self.arena.len() < 1 << 20 || self.live * 2 > self.arena.len() {
            return;
        }
        let mut arena = Vec::with_capacity(self.live * 5 / 4);
        for p in self.map.values_mut() {
            let start = arena.len() as u32;
            arena.extend_from_slice(&self.arena[p.start as usize..(p.start + p.len) as usize]);
            p.start = start;
        }
        self.arena = arena;
    }
}

/// Learns up to `num_merges` merges; merge i creates token 256 + i. Stops early when no
/// pair occurs any more. Deterministic: ties go to the smallest (left, right) pair.
pub fn learn_merges(counts: ChunkCounts, num_merges: usize) -> Vec<Pair> {
    learn_merges_with(counts, num_merges, PARALLEL_MIN_WORDS)
}

fn learn_merges_with(
    counts: ChunkCounts,
    num_merges: usize,
    parallel_min_words: usize,
) -> Vec<Pair> {
    // Word order follows the hash map and does not matter: pair counts are sums, and the
    // heap pops by (count, pair) whatever order entries were pushed in. Chunks of one byte
    // can never hold a pair: skip them.
    let (n, total) = counts
        .iter()
        .filter(|(k, _)| k.len() > 1)
        .fold((0, 0), |(n, t), (k, _)| (n + 1, t + k.len()));
    let mut syms: Vec<u32> = Vec::with_capacity(total);
    let mut words: Vec<Word> = Vec::with_capacity(n);
    for (k, c) in counts.into_iter().filter(|(k, _)| k.len() > 1) {
        words.push(Word {
            start: syms.len(),
            count: c as i64,
            len: k.len() as u32,
        });
        syms.extend(k.as_bytes().iter().map(|&b| b as u32));
    }
    log(&format!("{} words, {} symbols", words.len(), syms.len()));
    let mut pairs = index_pairs(&words, &syms);
    log(&format!(
        "{} words, {} pairs: indexed",
        words.len(),
        pairs.map.len()
    ));

    let mut heap: BinaryHeap<(i64, Reverse<u64>)> = pairs
        .map
        .iter()
        .map(|(&k, p)| (p.count, Reverse(k)))
        .collect();
    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges.min(1 << 20));
    // Per-merge scratch. Pair-count changes accumulate in a small, cache-resident map, so
    // the big global map is touched once per distinct pair instead of once per
    // occurrence; (new pair, word) records are grouped into index lists afterwards.
    let mut delta: PairMap<i64> = PairMap::default();
    let mut born: Vec<(u64, u32)> = Vec::new();
    let mut scratch: Vec<u32> = Vec::new();
    let (mut visits, mut pops) = (0usize, 0usize);
    while merges.len() < num_merges {
        let Some((c, Reverse(k))) = heap.pop() else {
            break;
        };
        pops += 1;
        let cur = pairs.count(k);
        if cur != c {
            if cur > 0 {
                heap.push((cur, Reverse(k)));
            }
            continue;
        }
        let pair = unkey(k);
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        // Words may be listed though they no longer hold the pair; merging them is a
        // no-op. Lists are sorted, so the words are visited in memory order.
        let holders = pairs.take(k);
        visits += holders.len();
        let hs = &pairs.arena[holders];
        let wp = WordsPtr {
            words: words.as_mut_ptr(),
            syms: syms.as_mut_ptr(),
        };
        if hs.len() < parallel_min_words {
            // SAFETY: index lists hold distinct, valid word ids; only this thread runs.
            unsafe { visit_words(wp, hs, pair, new_id, &mut delta, &mut born) };
        } else {
            // The first merges touch a large share of all words: split the list over
            // the cores, each with its own changes, then fold them in list order (so
            // `born` stays sorted by word within each pair).
            let per = hs.len().div_ceil(rayon::current_num_threads() * 2);
            let parts: Vec<Changes> = hs
                .par_chunks(per)
                .map(|part| {
                    let (mut d, mut bn) = (PairMap::default(), Vec::new());
                    // SAFETY: the parts are disjoint slices of a list of distinct,
                    // valid word ids, so no word is touched by two threads.
                    unsafe { visit_words(wp, part, pair, new_id, &mut d, &mut bn) };
                    (d, bn)
                })
                .collect();
            for (d, bn) in parts {
                for (pk, x) in d {
                    *delta.entry(pk).or_insert(0) += x;
                }
                born.extend(bn);
            }
        }

        for (pk, d) in delta.drain() {
            if d != 0 {
                pairs.add(pk, d);
            }
        }
        // Pairs with the new token are new: list their words and push each pair once
        // with its full count. The stable sort keeps each pair's words in order.
        born.sort_by_key(|&(pk, _)| pk);
        let mut i = 0;
        while i < born.len() {
            let pk = born[i].0;
            let mut j = i;
            while j < born.len() && born[j].0 == pk {
                j += 1;
            }
            let c = pairs.count(pk);
            if c > 0 {
                heap.push((c, Reverse(pk)));
                scratch.clear();
                scratch.extend(born[i..j].iter().map(|r| r.1));
                scratch.dedup();
                pairs.set_list(pk, &scratch);
            }
            i = j;
        }
        born.clear();
        pairs.compact();
        if delta.capacity() > 1 << 16 {
            delta = PairMap::default();
            born = Vec::new();
        }
    }
    log(&format!(
        "{} merges done ({visits} word visits, {pops} heap pops, {} pairs left, index {} / {})",
        merges.len(),
        pairs.map.len(),
        pairs.live,
        pairs.arena.len()
    ));
    merges
}

/// One thread's share of a merge: pair-count deltas and (new pair, word) records.
type Changes = (PairMap<i64>, Vec<(u64, u32)>);

/// Below this many candidate words a merge is done on one thread.
const PARALLEL_MIN_WORDS: usize = 4096;

/// Raw pointers to the word table, so that disjoint words can be merged from several
/// threads at once.
#[derive(Clone, Copy)]
struct WordsPtr {
    words: *mut Word,
    syms: *mut u32,
}
// SAFETY: only used by `visit_words`, whose callers give each thread its own words.
unsafe impl Send for WordsPtr {}
unsafe impl Sync for WordsPtr {}

/// Merges `pair` into `new_id` in each word of `hs`, adding the pair-count changes to
/// `delta` and the (new pair, word) records to `born`. Changes to `pair` itself are not
/// recorded: once every word is merged its count is exactly zero.
///
/// SAFETY: the ids in `hs` are distinct, index valid words, and no other thread
/// touches those words (or their symbols) meanwhile.
unsafe fn visit_words(
    wp: WordsPtr,
    hs: &[u32],
    pair: Pair,
    new_id: u32,
    delta: &mut PairMap<i64>,
    born: &mut Vec<(u64, u32)>,
) {
    let k = key(pair);
    for (j, &w) in hs.iter().enumerate() {
        // Profiling showed this loop stalled on two cache misses per word (its metadata,
        // then its symbols). The list is known ahead, so prefetch both a few words early.
        if let Some(&w2) = hs.get(j + 16) {
            prefetch(&*wp.words.add(w2 as usize));
        }
        if let Some(&w1) = hs.get(j + 8) {
            prefetch(&*wp.syms.add((*wp.words.add(w1 as usize)).start));
        }
        let word = &mut *wp.words.add(w as usize);
        let s = std::slice::from_raw_parts_mut(wp.syms.add(word.start), word.len as usize);
        let n = merge_word(s, pair, new_id, word.count, |p, d| {
            let pk = key(p);
            if pk == k {
                return;
            }
            *delta.entry(pk).or_insert(0) += d;
            if d > 0 && born.last() != Some(&(pk, w)) {
                born.push((pk, w));
            }
        });
        word.len = n as u32;
    }
}

/// Counts every adjacent pair of every word (weighted by the word's count) and lists,
/// for each pair, the words holding it, in parallel over word ranges. Ranges are merged
/// in order, so each list is sorted and holds a word once.
fn index_pairs(words: &[Word], syms: &[u32]) -> Pairs {
    let n_words = words.len();
    let n_ranges = rayon::current_num_threads().max(1) * 4;
    let step = n_words.div_ceil(n_ranges).max(1);
    let mut partial: Vec<(PairMap<i64>, PairMap<Vec<u32>>)> = (0..n_words)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| {
            let mut pc: PairMap<i64> = PairMap::default();
            let mut wh: PairMap<Vec<u32>> = PairMap::default();
            for (w, word) in words.iter().enumerate().skip(lo).take(step) {
                let s = &syms[word.start..word.start + word.len as usize];
                for p in s.windows(2) {
                    let k = key((p[0], p[1]));
                    *pc.entry(k).or_insert(0) += word.count;
                    let v = wh.entry(k).or_default();
                    if v.last() != Some(&(w as u32)) {
                        v.push(w as u32);
                    }
                }
            }
            (pc, wh)
        })
        .collect();
    let mut pairs = Pairs {
        map: PairMap::default(),
        arena: Vec::new(),
        live: 0,
    };
    for (pc, _) in &partial {
        for (&k, &c) in pc {
            pairs.map.entry(k).or_default().count += c;
        }
    }
    let mut keys: Vec<u64> = pairs.map.keys().copied().collect();
    keys.sort_unstable();
    let mut scratch: Vec<u32> = Vec::new();
    for k in keys {
        scratch.clear();
        // Free each partial list as soon as it is copied: the largest are separate
        // mmaps, so peak memory holds about one copy of the index, not two.
        for (_, wh) in partial.iter_mut() {
            if let Some(v) = wh.remove(&k) {
                scratch.extend_from_slice(&v);
            }
        }
        pairs.set_list(k, &scratch);
    }
    pairs
}

/// Replaces each occurrence of `pair` in the word `s` (left to right, non-overlapping)
/// with `new_id`, in place, reporting the pair-count changes (weighted by the word's
/// `count`). Returns the word's new length.
#[inline]
fn merge_word(
    s: &mut [u32],
    pair: Pair,
    new_id: u32,
    count: i64,
    mut change: impl FnMut(Pair, i64),
) -> usize {
    let (a, b) = pair;
    let n = s.len();
    let mut out = 0; // write cursor: s[..out] is the merged prefix
    let mut i = 0;
    while i < n {
        if i + 1 < n && s[i] == a && s[i + 1] == b {
            change(pair, -count);
            if out > 0 {
                let p = s[out - 1];
                change((p, a), -count);
                change((p, new_id), count);
            }
            if i + 2 < n {
                let q = s[i + 2];
                change((b, q), -count);
                change((new_id, q), count);
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
    out
}

/// Progress lines on stderr when RUSTBPE_VERBOSE is set (timings for profiling).
pub fn log(msg: &str) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    if let Some(t0) =
        START.get_or_init(|| std::env::var_os("RUSTBPE_VERBOSE").map(|_| Instant::now()))
    {
        // CPU time of this thread too: wall time is noisy on a shared machine.
        let cpu = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(String::new(), |ns| format!(" cpu {:.3}s", ns / 1e9));
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(String::new(), |pages| {
                format!(" rss {:.0}MB", pages * 4096.0 / 1e6)
            });
        eprintln!(
            "rustbpe [{:8.3}s{cpu}{rss}] {msg}",
            t0.elapsed().as_secs_f64()
        );
    }
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
            let Some((&best, &bc)) = pc.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
            else {
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
        let texts: Vec<String> = (0..300)
            .map(|i| format!("word{} other{} the x{}", i % 17, i % 5, i % 3))
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
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
    fn parallel_merge_steps_equal_sequential() {
        let texts: Vec<String> = (0..3000u32)
            .map(|i| {
                format!(
                    "w{} x{}y q{}{} 中{}",
                    i * 7919 % 1000,
                    i % 37,
                    i % 11,
                    i % 13,
                    i % 97
                )
            })
            .collect();
        let sp = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut counts = ChunkCounts::default();
        count_chunks(&sp, &texts, &mut counts);
        let seq = learn_merges_with(counts.clone(), 300, usize::MAX);
        let par = learn_merges_with(counts.clone(), 300, 1);
        assert_eq!(seq, par);
        assert!(seq.len() > 100);
        assert_eq!(seq, naive(&counts, 300));
    }

    #[test]
    fn stops_when_no_pairs_remain() {
        let merges = learn_merges(counts_of(&["a\nb\nc"]), 10);
        assert!(merges.is_empty());
        let merges = learn_merges(counts_of(&["ab"]), 10);
        assert_eq!(merges, vec![(b'a' as u32, b'b' as u32)]);
    }
}
