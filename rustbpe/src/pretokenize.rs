//! Pre-tokenization: splitting text into the chunks that BPE works inside.
//!
//! Profiles of tiktoken and of our first version agree that the split regex, not the
//! merging, is most of the encode time (fancy-regex runs a backtracking VM for the
//! possessive quantifiers and the lookahead). So for the default pattern we use a
//! hand-written splitter that makes exactly the same choices as the regex, at memory
//! speed; any other pattern goes through fancy-regex. The tests fuzz one against the
//! other.

use crate::unicode::{ascii_class, class, LETTER, NEWLINE, NUMBER, SPACE};

/// GPT-4's split pattern with numbers in groups of 1-2 digits.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    /// The default pattern, matched by hand (see `default_chunk_end`).
    Default,
    /// Any other pattern.
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        // Compile even the default pattern: a regex that fancy-regex rejects must be an
        // error whichever path we take.
        let re = fancy_regex::Regex::new(pattern)
            .map_err(|e| format!("invalid regex pattern {pattern:?}: {e}"))?;
        if pattern == DEFAULT_PATTERN {
            crate::unicode::init();
            Ok(Splitter::Default)
        } else {
            Ok(Splitter::Regex(Box::new(re)))
        }
    }

    /// Calls `f` on each chunk of `text`, in order. The chunks cover the text exactly for
    /// the default pattern; for other patterns, text the regex does not match is skipped
    /// (as tiktoken does).
    #[inline]
    pub fn split<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) {
        match self {
            Splitter::Default => {
                let bytes = text.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    let end = default_chunk_end(bytes, i);
                    // SAFETY: `default_chunk_end` only stops on char boundaries.
                    f(unsafe { text.get_unchecked(i..end) });
                    i = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => f(m.as_str()),
                        Err(_) => {
                            // Backtrack limit hit on a pathological input: stop matching
                            // rather than fail. (Only reachable with custom patterns.)
                            break;
                        }
                    }
                }
            }
        }
    }

    pub fn split_to_vec<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        self.split(text, |c| out.push(c));
        out
    }
}

/// Decodes the char starting at `i` (which must be a char boundary): (code point, length).
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// (class bits, char length) at `i`; ASCII takes the compile-time table.
#[inline(always)]
fn class_at(s: &[u8], i: usize) -> (u8, usize) {
    let b = s[i];
    if b < 0x80 {
        (ascii_class(b), 1)
    } else {
        let (cp, n) = decode(s, i);
        (class(cp), n)
    }
}

/// End of the longest run of chars starting at `i` whose class has a bit of `want`
/// (or, with `invert`, has none of `want`).
#[inline(always)]
fn scan(s: &[u8], mut i: usize, want: u8, invert: bool) -> usize {
    while i < s.len() {
        let (c, n) = class_at(s, i);
        if ((c & want) != 0) == invert {
            break;
        }
        i += n;
    }
    i
}

/// Code point for the case-insensitive contraction letters: lowercased ASCII, with
/// U+017F (long s) folding to 's' as it does under the regex's Unicode case folding.
#[inline]
fn fold_at(s: &[u8], i: usize) -> Option<(u8, usize)> {
    if i >= s.len() {
        return None;
    }
    let (cp, n) = decode(s, i);
    if cp < 128 {
        Some(((cp as u8).to_ascii_lowercase(), n))
    } else if cp == 0x17F {
        Some((b's', n))
    } else {
        None
    }
}

/// The end of the chunk the default pattern matches at `i`. Each branch below is one
/// alternative of the pattern, tried in the regex's (leftmost-first) order.
#[inline]
pub fn default_chunk_end(s: &[u8], i: usize) -> usize {
    let (c0, n0) = class_at(s, i);
    let j = i + n0;

    // '(?i:[sdmt]|ll|ve|re)
    if s[i] == b'\'' {
        if let Some((a, na)) = fold_at(s, j) {
            match a {
                b's' | b'd' | b'm' | b't' => return j + na,
                b'l' | b'v' | b'r' => {
                    let want = if a == b'l' { b'l' } else { b'e' };
                    if let Some((b, nb)) = fold_at(s, j + na) {
                        if b == want {
                            return j + na + nb;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    // [^\r\n\p{L}\p{N}]?+\p{L}+
    if c0 & LETTER != 0 {
        return scan(s, j, LETTER, false);
    }
    if c0 & (NUMBER | NEWLINE) == 0 && j < s.len() {
        let (c1, n1) = class_at(s, j);
        if c1 & LETTER != 0 {
            return scan(s, j + n1, LETTER, false);
        }
    }

    // \p{N}{1,2}
    if c0 & NUMBER != 0 {
        if j < s.len() {
            let (c1, n1) = class_at(s, j);
            if c1 & NUMBER != 0 {
                return j + n1;
            }
        }
        return j;
    }

    //  ?[^\s\p{L}\p{N}]++[\r\n]*
    const WORDISH: u8 = LETTER | NUMBER | SPACE;
    if c0 == 0 {
        let k = scan(s, j, WORDISH, true);
        return scan(s, k, NEWLINE, false);
    }
    if s[i] == b' ' && j < s.len() {
        let (c1, n1) = class_at(s, j);
        if c1 == 0 {
            let k = scan(s, j + n1, WORDISH, true);
            return scan(s, k, NEWLINE, false);
        }
    }

    // c0 is whitespace. Find the maximal whitespace run, the end of its last \r or \n,
    // and the start of its last char.
    let mut k = i;
    let mut last_start = i;
    let mut after_newline = 0;
    while k < s.len() {
        let (c, n) = class_at(s, k);
        if c & SPACE == 0 {
            break;
        }
        last_start = k;
        k += n;
        if c & NEWLINE != 0 {
            after_newline = k;
        }
    }
    // \s*[\r\n]
    if after_newline != 0 {
        return after_newline;
    }
    // \s+(?!\S): all of it at the end of the text, else all but the last char.
    if k == s.len() || last_start > i {
        return if k == s.len() { k } else { last_start };
    }
    // \s+
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_split(pattern: &str, text: &str) -> Vec<String> {
        let re = fancy_regex::Regex::new(pattern).unwrap();
        re.find_iter(text)
            .map(|m| m.unwrap().as_str().to_string())
            .collect()
    }

    fn check(text: &str) {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        assert!(matches!(fast, Splitter::Default));
        let got: Vec<String> = fast
            .split_to_vec(text)
            .iter()
            .map(|s| s.to_string())
            .collect();
        let want = regex_split(DEFAULT_PATTERN, text);
        assert_eq!(got, want, "text {text:?}");
    }

    #[test]
    fn hand_picked_edge_cases() {
        for t in [
            "",
            "a",
            " ",
            "Hello world",
            "Hello, world! How's it going? I'LL see; we'Ve, they'RE, he'D, I'M, it'S 'T",
            "'ſ 'ſa 'll 'lL 'Ll 'le 've 'vE 'rE 're 'x ''s '' ' 's",
            "  leading and trailing spaces  ",
            "tabs\tand\t\tmore\t",
            "line1\nline2\r\nline3\n\n\n  \n \r\r\n",
            "x  \n  y",
            "   \u{A0}word \u{3000}中文 \u{A0}\u{A0}",
            "12345 1 22 333 ٣٤٥ ５６７ ²³ Ⅻ",
            "(hello) [1] {a1b2} --x-- ...\n\n...\r\n",
            " !!!\n\n !?",
            "中文测试，这是一个句子。English mixed 中英混合123",
            "emoji 😀😀 test 👍🏽 done",
            "e\u{301}te\u{301} cafe\u{301}\u{301}x",
            "\u{85}\u{2028}\u{2029}\u{B}\u{C}",
            "a'b'c d's e'S",
            "   ",
            "\n",
            " \n",
            "\u{A0}\n",
            " 1",
            " a",
            "  a",
            "\ta",
            "\t\ta",
            "x\u{FEFF}y\u{200B}z",
            "\u{10400}\u{1D7D9}\u{1F600}\u{2070E}",
        ] {
            check(t);
        }
    }

    /// xorshift64*: enough randomness for fuzzing, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const ATOMS: &[&str] = &[
        "a",
        "b",
        "Z",
        "s",
        "S",
        "t",
        "T",
        "d",
        "D",
        "m",
        "M",
        "l",
        "L",
        "v",
        "V",
        "e",
        "E",
        "r",
        "R",
        "x",
        "ſ",
        "K",
        "k",
        "\u{212A}",
        "0",
        "1",
        "9",
        "٣",
        "५",
        "²",
        "Ⅻ",
        "５",
        " ",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\u{B}",
        "\u{C}",
        "\u{85}",
        "\u{A0}",
        "\u{3000}",
        "\u{2028}",
        "\u{2009}",
        "\u{200B}",
        "\u{FEFF}",
        "'",
        "'",
        "''",
        "\"",
        ".",
        ",",
        "!",
        "?",
        "-",
        "(",
        ")",
        "_",
        "@",
        "#",
        "$",
        "%",
        "/",
        "\\",
        "中",
        "文",
        "。",
        "，",
        "、",
        "「",
        "ア",
        "한",
        "é",
        "\u{301}",
        "\u{308}",
        "ß",
        "Ω",
        "😀",
        "👍🏽",
        "\u{1F1FA}\u{1F1F8}",
        "𝐀",
        "𝟙",
        "\u{10400}",
        "\u{E000}",
        "\u{0}",
        "\u{7F}",
        "'s",
        "'S",
        "'ll",
        "'LL",
        "'ve",
        "'Re",
        "'d",
        "'M",
        "'t",
        "hello",
        "World",
    ];

    fn random_text(rng: &mut Rng) -> String {
        let n = rng.below(24);
        let mut s = String::new();
        for _ in 0..n {
            s.push_str(ATOMS[rng.below(ATOMS.len())]);
        }
        s
    }

    #[test]
    fn fuzz_default_pattern_against_fancy_regex() {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        let re = fancy_regex::Regex::new(DEFAULT_PATTERN).unwrap();
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for case in 0..20000 {
            let text = random_text(&mut rng);
            let got = fast.split_to_vec(&text);
            let want: Vec<&str> = re.find_iter(&text).map(|m| m.unwrap().as_str()).collect();
            assert_eq!(got, want, "case {case}: text {text:?}");
        }
    }

    #[test]
    fn fuzz_random_code_points() {
        // Arbitrary scalar values, weighted towards the interesting low planes.
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        let re = fancy_regex::Regex::new(DEFAULT_PATTERN).unwrap();
        let mut rng = Rng(12345);
        for case in 0..5000 {
            let n = rng.below(16);
            let mut text = String::new();
            for _ in 0..n {
                let cp = match rng.below(4) {
                    0 => rng.below(0x80) as u32,
                    1 => rng.below(0x3000) as u32,
                    2 => rng.below(0x10000) as u32,
                    _ => rng.below(0x110000) as u32,
                };
                if let Some(c) = char::from_u32(cp) {
                    text.push(c);
                }
            }
            let got = fast.split_to_vec(&text);
            let want: Vec<&str> = re.find_iter(&text).map(|m| m.unwrap().as_str()).collect();
            assert_eq!(got, want, "case {case}: text {text:?}");
        }
    }

    #[test]
    fn every_class_boundary_code_point() {
        // Each code point once, between letters and after a space, to pin the tables.
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        let re = fancy_regex::Regex::new(DEFAULT_PATTERN).unwrap();
        let mut text = String::new();
        for cp in (0..0x110000u32).step_by(7) {
            if let Some(c) = char::from_u32(cp) {
                text.push('a');
                text.push(c);
                text.push(' ');
                text.push(c);
                text.push('1');
            }
        }
        let got = fast.split_to_vec(&text);
        let want: Vec<&str> = re.find_iter(&text).map(|m| m.unwrap().as_str()).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    #[test]
    fn custom_pattern_uses_regex() {
        let sp = Splitter::new(r"\w+|\s+").unwrap();
        assert!(matches!(sp, Splitter::Regex(_)));
        assert_eq!(sp.split_to_vec("ab cd"), vec!["ab", " ", "cd"]);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        let err = Splitter::new("(unclosed").err().unwrap();
        assert!(err.contains("invalid regex"), "{err}");
    }
}
