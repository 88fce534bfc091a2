//! The commit metadata that carries the offsets completed above a partition's watermark.
//!
//! A commit says "everything below `next` is done". Records above it may be done too (they
//! finished while an earlier one still ran); the commit's metadata lists them so that the
//! next owner of the partition skips them instead of running them again, as Parallel
//! Consumer encodes its offset map in the commit metadata.
//!
//! The format is text: `sd1:` followed by comma-separated ranges of offsets relative to the
//! committed offset, `a` for one offset or `a-b` for `a..=b` (`sd1:1,3-5` after a commit
//! of 100 means 101, 103, 104 and 105 are done). Ranges that do not fit in the byte limit
//! are left out from the highest down, which is always safe: a record left out is
//! delivered again, never skipped wrongly. Anything that does not parse as this format
//! (another client's metadata, an empty string from a broker that drops metadata) decodes
//! to the empty set, so the new owner falls back to the watermark.

use std::collections::BTreeSet;
use std::fmt::Write as _;

const TAG: &str = "sd1:";

/// Encodes the offsets in `done` above `next` (the offset committed, the first not done)
/// into at most `limit` bytes. Offsets at or below `next` are ignored. Returns an empty
/// string when nothing is done above `next` or not even the tag fits.
pub(crate) fn encode(next: i64, done: impl IntoIterator<Item = i64>, limit: usize) -> String {
    let mut out = String::new();
    let mut ranges = Vec::<(i64, i64)>::new();
    for offset in done {
        if offset <= next {
            continue;
        }
        let rel = offset - next;
        match ranges.last_mut() {
            Some((_, end)) if rel == *end + 1 => *end = rel,
            Some((_, end)) if rel <= *end => {}
            _ => ranges.push((rel, rel)),
        }
    }
    if ranges.is_empty() || TAG.len() > limit {
        return out;
    }
    out.push_str(TAG);
    let mut piece = String::new();
    for (i, (start, end)) in ranges.into_iter().enumerate() {
        piece.clear();
        if i > 0 {
            piece.push(',');
        }
        // Writing to a String cannot fail.
        let _ = if start == end {
            write!(piece, "{start}")
        } else {
            write!(piece, "{start}-{end}")
        };
        if out.len() + piece.len() > limit {
            break;
        }
        out.push_str(&piece);
    }
    if out.len() == TAG.len() {
        out.clear();
    }
    out
}

/// The offsets above `next` that `metadata` lists as done; empty when the metadata is
/// empty, not in this format, or malformed anywhere (never a partial guess).
pub(crate) fn decode(next: i64, metadata: &str) -> BTreeSet<i64> {
    let Some(body) = metadata.strip_prefix(TAG) else {
        return BTreeSet::new();
    };
    let mut done = BTreeSet::new();
    let mut last = 0i64;
    for part in body.split(',') {
        let Some((start, end)) = parse_range(part) else {
            return BTreeSet::new();
        };
        // Ranges are strictly increasing and relative offsets start at 1; anything else
        // is not ours, and a huge range is refused rather than expanded.
        if start <= last || end < start || end - start > 1_000_000 {
            return BTreeSet::new();
        }
        let (Some(from), Some(to)) = (next.checked_add(start), next.checked_add(end)) else {
            return BTreeSet::new();
        };
        done.extend(from..=to);
        last = end;
    }
    done
}

fn parse_range(part: &str) -> Option<(i64, i64)> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    match part.split_once('-') {
        Some((a, b)) => Some((number(a)?, number(b)?)),
        None => number(part).map(|a| (a, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_are_relative_to_the_commit() {
        assert_eq!(encode(100, [101, 103, 104, 105], 4096), "sd1:1,3-5");
        assert_eq!(
            decode(100, "sd1:1,3-5"),
            BTreeSet::from([101, 103, 104, 105])
        );
        assert_eq!(encode(100, [90, 100], 4096), "", "nothing above the commit");
    }

    #[test]
    fn what_is_not_ours_decodes_to_nothing() {
        for metadata in [
            "",
            "sd1:",
            "sd1:0",
            "sd1:3,2",
            "sd1:5-3",
            "sd1:1,,2",
            "sd1:-1",
            "sd1:x",
            "sd2:1",
            "{\"offsets\":[1]}",
            "sd1:1-99999999999",
            "sd1:9223372036854775807",
        ] {
            assert!(decode(100, metadata).is_empty(), "{metadata:?}");
        }
    }

    #[test]
    fn the_highest_ranges_give_way_to_the_limit() {
        let done: Vec<i64> = (0..100).map(|i| 1_000 + 2 * i + 1).collect();
        let full = encode(1_000, done.iter().copied(), 4096);
        let cut = encode(1_000, done.iter().copied(), 20);
        assert!(cut.len() <= 20 && cut.starts_with(TAG), "{cut}");
        assert!(full.starts_with(&cut));
        assert_eq!(
            encode(1_000, done.iter().copied(), 3),
            "",
            "not even the tag fits"
        );
        let kept = decode(1_000, &cut);
        assert!(!kept.is_empty());
        assert!(kept.iter().all(|o| done.contains(o)));
    }

    proptest! {
        /// Whatever the limit, what decodes is exactly the done offsets above the commit
        /// up to some cut, never an offset that was not done.
        #[test]
        fn decode_gives_back_a_prefix_of_what_was_done(
            next in 0i64..1_000_000,
            gaps in proptest::collection::vec(1i64..50, 0..300),
            limit in 0usize..2_000,
        ) {
            let mut done = Vec::new();
            let mut at = next;
            for gap in gaps {
                at += gap;
                done.push(at);
            }
            let metadata = encode(next, done.iter().copied(), limit);
            prop_assert!(metadata.len() <= limit);
            let back: Vec<i64> = decode(next, &metadata).into_iter().collect();
            prop_assert_eq!(&back[..], &done[..back.len()]);
            if encode(next, done.iter().copied(), usize::MAX).len() <= limit {
                prop_assert_eq!(back.len(), done.len());
            }
        }

        #[test]
        fn any_text_decodes_without_panicking(next in any::<i64>(), text in ".{0,64}") {
            let _ = decode(next, &text);
            let _ = decode(next, &format!("sd1:{text}"));
        }
    }
}
