//! A seeded holdout: move a fraction of one split's pairs into another split.
//!
//! The pairs to move are the first `round(n · ratio)` of a Fisher–Yates permutation driven
//! by SplitMix64 from the seed, so the same inputs and seed give the same split on every
//! machine and version. Both splits keep the pairs' original relative order.

use super::SplitPairs;
use crate::error::{DataError, Result};

/// `--holdout TO=RATIO` (from `--holdout-from`, default `train`), `--seed`.
#[derive(Debug, Clone, PartialEq)]
pub struct Holdout {
    pub from: String,
    pub to: String,
    pub ratio: f64,
    pub seed: u64,
}

impl Holdout {
    /// Parses `TO=RATIO` with 0 < RATIO < 1.
    pub fn parse(text: &str, from: &str, seed: u64) -> Result<Holdout> {
        let bad = || {
            DataError::Pairs(format!(
                "--holdout '{text}': expected SPLIT=RATIO with 0 < RATIO < 1"
            ))
        };
        let (to, ratio) = text.split_once('=').ok_or_else(bad)?;
        let ratio: f64 = ratio.parse().map_err(|_| bad())?;
        if !(ratio > 0.0 && ratio < 1.0) || to.is_empty() || to == from {
            return Err(bad());
        }
        Ok(Holdout {
            from: from.to_string(),
            to: to.to_string(),
            ratio,
            seed,
        })
    }

    /// Moves the pairs; returns how many moved.
    pub(crate) fn apply(&self, splits: &mut Vec<SplitPairs>) -> Result<usize> {
        let from = splits
            .iter()
            .position(|s| s.name == self.from)
            .ok_or_else(|| {
                DataError::Pairs(format!(
                    "--holdout: no split '{}' to take pairs from",
                    self.from
                ))
            })?;
        let n = splits[from].pairs.len();
        let count = (n as f64 * self.ratio).round() as usize;
        let mut chosen = vec![false; n];
        for i in permutation(n, self.seed).into_iter().take(count) {
            chosen[i] = true;
        }
        let pairs = std::mem::take(&mut splits[from].pairs);
        let (moved, stay): (Vec<_>, Vec<_>) = pairs.into_iter().zip(chosen).partition(|(_, c)| *c);
        splits[from].pairs = stay.into_iter().map(|(p, _)| p).collect();
        let moved: Vec<_> = moved.into_iter().map(|(p, _)| p).collect();
        let count = moved.len();
        match splits.iter_mut().find(|s| s.name == self.to) {
            Some(target) => target.pairs.extend(moved),
            None => splits.push(SplitPairs {
                name: self.to.clone(),
                pairs: moved,
            }),
        }
        Ok(count)
    }
}

/// SplitMix64: small, fast, and fixed forever (unlike a library RNG's stream).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (rejection sampling, no modulo bias).
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next();
            if x < zone {
                return x % bound;
            }
        }
    }
}

fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::super::Pair;
    use super::*;

    fn pairs(n: usize) -> Vec<Pair> {
        (0..n)
            .map(|i| Pair {
                prompt: i.to_string(),
                chosen: "c".into(),
                rejected: "r".into(),
                ref_chosen_logps: None,
                ref_rejected_logps: None,
            })
            .collect()
    }

    #[test]
    fn splitmix_matches_reference_values() {
        // Reference outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn holdout_is_seeded_ordered_and_sized() {
        let h = Holdout::parse("validation=0.25", "train", 7).unwrap();
        let mut a = vec![SplitPairs {
            name: "train".into(),
            pairs: pairs(100),
        }];
        let moved = h.apply(&mut a).unwrap();
        assert_eq!(moved, 25);
        assert_eq!(a[0].pairs.len(), 75);
        assert_eq!(a[1].name, "validation");
        let ids = |s: &SplitPairs| {
            s.pairs
                .iter()
                .map(|p| p.prompt.parse::<usize>().unwrap())
                .collect::<Vec<_>>()
        };
        let (t, v) = (ids(&a[0]), ids(&a[1]));
        assert!(t.windows(2).all(|w| w[0] < w[1]) && v.windows(2).all(|w| w[0] < w[1]));
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        // Same seed, same split; another seed, another.
        let mut b = vec![SplitPairs {
            name: "train".into(),
            pairs: pairs(100),
        }];
        h.apply(&mut b).unwrap();
        assert_eq!(ids(&b[1]), v);
        let mut c = vec![SplitPairs {
            name: "train".into(),
            pairs: pairs(100),
        }];
        Holdout {
            seed: 8,
            ..h.clone()
        }
        .apply(&mut c)
        .unwrap();
        assert_ne!(ids(&c[1]), v);
    }

    #[test]
    fn bad_ratios_are_rejected() {
        assert!(Holdout::parse("validation=1.5", "train", 0).is_err());
        assert!(Holdout::parse("validation", "train", 0).is_err());
        assert!(Holdout::parse("train=0.1", "train", 0).is_err());
    }
}
