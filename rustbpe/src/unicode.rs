//! Character classes used by the default split pattern: \p{L}, \p{N} and \s.
//!
//! The tables come from regex-syntax, the same crate fancy-regex compiles the pattern
//! with, so the hand-written pre-tokenizer agrees with the regex on every code point.

use std::sync::OnceLock;

pub const LETTER: u8 = 1; // \p{L}
pub const NUMBER: u8 = 2; // \p{N}
pub const SPACE: u8 = 4; // \s (Unicode White_Space)
pub const NEWLINE: u8 = 8; // \r or \n (also SPACE)

struct Tables {
    // One byte per BMP code point: a load instead of a binary search for nearly all text
    // (Latin, CJK, punctuation). 64 KiB, built once.
    bmp: Vec<u8>,
    // Sorted, disjoint (start, end, class) ranges above U+FFFF (emoji, rare CJK).
    astral: Vec<(u32, u32, u8)>,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(pattern).expect("valid Unicode class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("expected a Unicode class for {pattern}, got {other:?}"),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral = Vec::new();
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in class_ranges(pattern) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, bit));
                }
            }
        }
        bmp['\r' as usize] |= NEWLINE;
        bmp['\n' as usize] |= NEWLINE;
        // The three classes are disjoint, so the ranges never overlap once sorted.
        astral.sort_unstable();
        Tables { bmp, astral }
    })
}

/// ASCII classes, computed at compile time: the common case needs no table lookup
/// through the OnceLock.
const ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            NUMBER
        } else if c == b'\r' || c == b'\n' {
            SPACE | NEWLINE
        } else if c == b' ' || c == b'\t' || c == 0x0B || c == 0x0C {
            SPACE
        } else {
            0
        };
        i += 1;
    }
    t
};

#[inline(always)]
pub fn ascii_class(b: u8) -> u8 {
    ASCII[b as usize]
}

/// The class bits of a code point (0 for "anything else": punctuation, symbols, marks).
#[inline]
pub fn class(cp: u32) -> u8 {
    if cp < 128 {
        return ASCII[cp as usize];
    }
    let t = tables();
    if cp < 0x10000 {
        return t.bmp[cp as usize];
    }
    match t.astral.binary_search_by(|&(lo, hi, _)| {
        if hi < cp {
            std::cmp::Ordering::Less
        } else if lo > cp {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(i) => t.astral[i].2,
        Err(_) => 0,
    }
}

/// Forces the tables to be built (so the first timed call does not pay for it).
pub fn init() {
    tables();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_table_matches_unicode_tables() {
        let t = tables();
        for b in 0u8..128 {
            assert_eq!(ascii_class(b), t.bmp[b as usize], "byte {b}");
        }
    }

    #[test]
    fn classes_agree_with_std() {
        // std's is_numeric is \p{N} and is_whitespace is White_Space; the Unicode versions
        // of std and regex-syntax may differ by a few recent code points, so only check
        // common scripts here (the fuzz test against fancy-regex is the real check).
        for c in ['a', 'Z', 'é', 'ß', '中', 'ア', '한', 'Ω'] {
            assert_eq!(class(c as u32), LETTER, "{c}");
        }
        for c in ['0', '٣', '५', '²', 'Ⅻ', '〇'] {
            assert!(c.is_numeric());
            assert_eq!(class(c as u32), NUMBER, "{c}");
        }
        for c in ['\u{A0}', '\u{3000}', '\u{2028}', '\u{85}', '\t'] {
            assert!(c.is_whitespace());
            assert_eq!(class(c as u32), SPACE, "{c:?}");
        }
        for c in ['!', '\u{301}', '😀', '\u{200B}', '\u{FEFF}'] {
            assert_eq!(class(c as u32), 0, "{c:?}");
        }
        assert_eq!(class('𝐀' as u32), LETTER);
        assert_eq!(class('𝟙' as u32), NUMBER);
    }
}
