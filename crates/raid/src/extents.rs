//! Block ranges a rebuild copies when the caller knows that the new member
//! already holds everything else (`corral_rebuild_ranges` of
//! `bdev_raid_add_base_bdev`).
//!
//! The control plane builds the list from a healthy replica's head-layer
//! allocation map, so it may come unsorted, with overlaps or with neighbours
//! that touch; [`normalize_ranges`] turns it into the sorted, disjoint,
//! non-adjacent list the rebuild walks, and refuses entries that do not fit
//! the raid (a wrong unit or a wrong volume must not be half-applied).

/// Why a list of ranges was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// An entry of zero blocks: meaningless, most likely a caller bug.
    #[error("entry {index} [{offset_blocks}, 0] has no blocks")]
    Empty { index: usize, offset_blocks: u64 },
    /// An entry reaching past the end of the raid (or overflowing u64).
    #[error(
        "entry {index} [{offset_blocks}, {num_blocks}] ends past the raid's {raid_blocks} blocks"
    )]
    OutOfRange {
        index: usize,
        offset_blocks: u64,
        num_blocks: u64,
        raid_blocks: u64,
    },
}

/// Sorts `ranges` (`(offset_blocks, num_blocks)` pairs), merges overlapping
/// and adjacent ones, and checks each against a device of `raid_blocks`
/// blocks. The result is sorted by offset, its ranges are disjoint and never
/// touch, and it covers exactly the blocks of the input. An empty input gives
/// an empty result.
pub fn normalize_ranges(
    ranges: &[(u64, u64)],
    raid_blocks: u64,
) -> Result<Vec<(u64, u64)>, RangeError> {
    // Half-open [start, end) pairs are easier to merge.
    let mut v: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (index, &(offset_blocks, num_blocks)) in ranges.iter().enumerate() {
        if num_blocks == 0 {
            return Err(RangeError::Empty {
                index,
                offset_blocks,
            });
        }
        match offset_blocks.checked_add(num_blocks) {
            Some(end) if end <= raid_blocks => v.push((offset_blocks, end)),
            _ => {
                return Err(RangeError::OutOfRange {
                    index,
                    offset_blocks,
                    num_blocks,
                    raid_blocks,
                })
            }
        }
    }
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            // Sorted by start: this one overlaps or touches the last one.
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(out.into_iter().map(|(s, e)| (s, e - s)).collect())
}

/// Blocks covered by normalised `ranges`.
pub fn total_blocks(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sorts_merges_overlapping_and_adjacent() {
        let got = normalize_ranges(&[(50, 10), (0, 4), (4, 4), (55, 20), (100, 1), (2, 1)], 200);
        assert_eq!(got.unwrap(), vec![(0, 8), (50, 25), (100, 1)]);
    }

    #[test]
    fn contained_and_duplicate_ranges_collapse() {
        let got = normalize_ranges(&[(10, 100), (20, 5), (10, 100), (109, 1)], 200).unwrap();
        assert_eq!(got, vec![(10, 100)]);
        assert_eq!(total_blocks(&got), 100);
    }

    #[test]
    fn gaps_of_one_block_stay_apart() {
        let got = normalize_ranges(&[(0, 4), (5, 4)], 10).unwrap();
        assert_eq!(got, vec![(0, 4), (5, 4)]);
    }

    #[test]
    fn empty_list_is_empty() {
        assert_eq!(normalize_ranges(&[], 10).unwrap(), vec![]);
        assert_eq!(total_blocks(&[]), 0);
    }

    #[test]
    fn whole_device_and_last_block_fit() {
        assert_eq!(normalize_ranges(&[(0, 10)], 10).unwrap(), vec![(0, 10)]);
        assert_eq!(normalize_ranges(&[(9, 1)], 10).unwrap(), vec![(9, 1)]);
    }

    #[test]
    fn refuses_entries_that_do_not_fit() {
        assert_eq!(
            normalize_ranges(&[(0, 1), (9, 2)], 10),
            Err(RangeError::OutOfRange {
                index: 1,
                offset_blocks: 9,
                num_blocks: 2,
                raid_blocks: 10
            })
        );
        assert!(matches!(
            normalize_ranges(&[(10, 1)], 10),
            Err(RangeError::OutOfRange { index: 0, .. })
        ));
        // offset + num overflows u64
        assert!(matches!(
            normalize_ranges(&[(u64::MAX, 2)], 10),
            Err(RangeError::OutOfRange { index: 0, .. })
        ));
        assert_eq!(
            normalize_ranges(&[(1, 1), (3, 0)], 10),
            Err(RangeError::Empty {
                index: 1,
                offset_blocks: 3
            })
        );
        let msg = normalize_ranges(&[(9, 2)], 10).unwrap_err().to_string();
        assert!(msg.contains("[9, 2]") && msg.contains("10 blocks"), "{msg}");
    }

    /// Against a bitmap: same blocks covered, sorted, disjoint, never touching.
    #[test]
    fn matches_a_bitmap_on_random_lists() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let blocks = rng.gen_range(1..300u64);
            let n = rng.gen_range(0..12);
            let input: Vec<(u64, u64)> = (0..n)
                .map(|_| {
                    let off = rng.gen_range(0..blocks);
                    (off, rng.gen_range(1..=blocks - off))
                })
                .collect();
            let got = normalize_ranges(&input, blocks).unwrap();
            let mut want = vec![false; blocks as usize];
            for &(o, l) in &input {
                want[o as usize..(o + l) as usize].fill(true);
            }
            let mut have = vec![false; blocks as usize];
            for &(o, l) in &got {
                assert!(l > 0);
                have[o as usize..(o + l) as usize].fill(true);
            }
            assert_eq!(have, want, "{input:?} -> {got:?}");
            for w in got.windows(2) {
                assert!(w[0].0 + w[0].1 < w[1].0, "{input:?} -> {got:?}");
            }
            assert_eq!(
                total_blocks(&got),
                want.iter().filter(|b| **b).count() as u64
            );
        }
    }
}
