//! The sampler's fast path: the same draw from a row's few top candidates instead of the
//! whole vocabulary.
//!
//! With top_k = k (1..=[`MAX_TOP_K`]) and nothing that changes logits token by token
//! (no penalties, no min_tokens mask, no min_p, whose threshold depends on the whole row's
//! softmax sum), every token the pipeline can keep is among the k largest raw logits: dividing
//! by the temperature keeps their order, top_k drops the rest, top_p only drops more.
//! So the row is scanned once for its k + 1 largest logits, and the processors of
//! [`crate::processors`] run on those alone, in id order — the same f32 operations in the same
//! order on the same values as on the whole row (a dropped token adds exactly 0 to every sum),
//! so the token, for the same random number, is bit-for-bit the reference's. The (k + 1)-th
//! candidate proves the cut: if, after the temperature, it ties with the k-th (a tie top_k
//! would keep, with perhaps more ties outside the candidates), the row takes the reference
//! path instead. Greedy rows need only the argmax.
//!
//! What still reads the whole row: the check for NaN / +inf (fused into the scan), and the raw
//! log-prob of the sampled token and its rank, which are defined over every logit. The
//! reference path stays [`crate::processors`]; `Sampler::sample` takes this path whenever
//! [`sample_candidates`] accepts the row, and the tests below compare the two on random rows.
//!
//! This is also the host half of GPU sampling: a device kernel that returns each row's top
//! candidates and log-sum-exp would feed the same code with only small arrays crossing.

use crate::error::{Result, SampleError};
use crate::params::ValidParams;
use crate::processors::{apply_temperature, apply_top_k, apply_top_p, softmax};
use crate::sampler::{SampledToken, SequenceRng, draw};

/// The largest top_k the fast path takes.
pub(crate) const MAX_TOP_K: usize = 64;

/// Whether `params` (with `banned` masked this step) allow the fast path at all.
fn eligible(params: &ValidParams, banned: &[u32], vocab: usize) -> bool {
    let p = params.params();
    let neutral = banned.is_empty()
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
        && params.num_top_logprobs(vocab).unwrap_or(0) == 0;
    if !neutral {
        return false;
    }
    if params.is_greedy() {
        return true;
    }
    p.min_p == 0.0 && params.top_k_for(vocab).is_some_and(|k| k <= MAX_TOP_K)
}

/// The token `Sampler::sample` would draw from `raw` — `Ok(None)` when the row or the
/// parameters need the reference path. Errors (an empty row, NaN or +inf) are the
/// reference's, for the same first offending token.
pub(crate) fn sample_candidates(
    raw: &[f32], // [V]
    params: &ValidParams,
    banned: &[u32],
    rng: &mut SequenceRng,
) -> Result<Option<SampledToken>> {
    if raw.is_empty() {
        return Err(SampleError::EmptyLogits);
    }
    if !eligible(params, banned, raw.len()) {
        return Ok(None);
    }
    let token_id = if params.is_greedy() {
        match greedy(raw)? {
            Some(id) => id,
            // Every logit is -inf: the reference says what is wrong.
            None => return Ok(None),
        }
    } else {
        let Some(k) = params.top_k_for(raw.len()) else {
            return Ok(None);
        };
        let mut cands = top_candidates(raw, k + 1)?; // (id, raw logit), k + 1 of them
        cands.sort_unstable_by_key(|&(id, _)| id);
        let mut row: Vec<f32> = cands.iter().map(|&(_, x)| x).collect();
        apply_temperature(&mut row, params.temperature as f32);
        // The (k + 1)-th largest must fall to top_k: then no token outside the candidates
        // (all ≤ it) survives either.
        let weakest = cands
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1).then(b.1.0.cmp(&a.1.0)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        apply_top_k(&mut row, k);
        if row[weakest] > f32::NEG_INFINITY {
            return Ok(None);
        }
        if params.top_p < 1.0 {
            apply_top_p(&mut row, params.top_p as f32);
        }
        match draw(&softmax(&row), rng.next_uniform()) {
            Some(i) => cands[i as usize].0,
            None => return Ok(None),
        }
    };
    let (logprob, rank) = logprob_and_rank(raw, token_id);
    Ok(Some(SampledToken {
        token_id,
        logprob,
        rank,
        top_logprobs: Vec::new(),
    }))
}

/// The raw log-prob of `id` and its rank, in one pass over the row after the max: the same
/// f64 arithmetic, in the same order, as `RawLogprobs` and `rank_of`.
fn logprob_and_rank(raw: &[f32], id: u32) -> (f32, u32) {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let x = raw[id as usize];
    let (mut sum, mut rank) = (0.0f64, 0u32);
    for &y in raw {
        sum += ((y - max) as f64).exp();
        rank += u32::from(y >= x);
    }
    (((x - max) as f64 - sum.ln()) as f32, rank)
}

/// The first NaN or +inf of the row, as `check_row` reports it.
fn bad_logit(i: usize, x: f32) -> SampleError {
    SampleError::BadLogit {
        token_id: i as u32,
        value: x,
    }
}

/// The first largest logit's id (torch's argmax), None when all are -inf; checks the row.
fn greedy(raw: &[f32]) -> Result<Option<u32>> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in raw.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(bad_logit(i, x));
        }
        if x > f32::NEG_INFINITY && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    Ok(best.map(|(i, _)| i as u32))
}

/// The `n` largest logits as (id, logit), ties to the lower id (the first seen); checks
/// the row. `n` ≤ V.
fn top_candidates(raw: &[f32], n: usize) -> Result<Vec<(u32, f32)>> {
    // Descending by logit; a later equal logit never displaces an earlier one.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &x) in raw.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(bad_logit(i, x));
        }
        if top.len() == n && x <= top[n - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, y)| y >= x);
        top.insert(at, (i as u32, x));
        top.truncate(n);
    }
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SamplingParams;
    use crate::processors::TokenHistory;
    use crate::sampler::Sampler;

    /// A row of `v` logits from a seeded generator: `distinct` values only, so ties are
    /// common when it is small.
    fn row(seed: u64, v: usize, distinct: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..v)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % distinct) as f32 / distinct as f32 * scale - scale / 2.0
            })
            .collect()
    }

    /// The reference path, whatever the fast path would do: the processors on the whole row.
    fn reference(raw: &[f32], params: &ValidParams, rng: &mut SequenceRng) -> Result<SampledToken> {
        Sampler::sample_reference(raw, params, &TokenHistory::from_ids(&[], &[]), &[], rng)
    }

    #[test]
    fn the_fast_path_draws_exactly_what_the_reference_draws() {
        let (mut taken, mut total) = (0, 0);
        for case in 0..400u64 {
            let v = [50usize, 1000, 5000][case as usize % 3];
            let distinct = [7u64, 100, 1 << 20][(case / 3) as usize % 3];
            let raw = row(
                case,
                v,
                distinct,
                [1.0f32, 10.0, 40.0][(case / 9) as usize % 3],
            );
            let p = SamplingParams {
                temperature: [0.0, 0.01, 0.7, 1.0, 1.7][(case / 27) as usize % 5],
                top_k: [1, 2, 5, 20, 64][(case / 5) as usize % 5],
                top_p: [1.0, 0.8, 0.3, 0.95][(case / 7) as usize % 4],
                logprobs: [None, Some(0)][(case / 2) as usize % 2],
                ..Default::default()
            }
            .validate()
            .unwrap();
            for draw in 0..5u64 {
                let mut a = SequenceRng::from_seed(case * 10 + draw);
                let mut b = a.clone();
                let want = reference(&raw, &p, &mut a).unwrap();
                // Rows of few distinct values tie at the cut on purpose (the reference path),
                // and top_k ≥ V keeps everything; count how often the others are taken.
                let counted = distinct > 100 && (p.is_greedy() || p.top_k_for(v).is_some());
                total += usize::from(counted);
                if let Some(got) = sample_candidates(&raw, &p, &[], &mut b).unwrap() {
                    taken += usize::from(counted);
                    assert_eq!(got, want, "case {case}, draw {draw}: {p:?}");
                    // The same random numbers were consumed.
                    assert_eq!(a.next_uniform(), b.next_uniform());
                }
            }
        }
        // Rows without ties take the fast path (all but a rare tie after the temperature).
        assert!(taken * 100 >= total * 98, "{taken} of {total}");
    }

    #[test]
    fn a_tie_at_the_cut_takes_the_reference_path() {
        // top_k 2 of [3, 1, 3, 3]: the reference keeps all three 3s.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raw = [3.0f32, 1.0, 3.0, 3.0];
        let mut rng = SequenceRng::from_seed(0);
        assert_eq!(sample_candidates(&raw, &p, &[], &mut rng).unwrap(), None);
        // Distinct values: taken.
        let raw = [3.0f32, 1.0, 2.0, 4.0];
        assert!(
            sample_candidates(&raw, &p, &[], &mut rng)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn parameters_that_need_the_whole_row_take_the_reference_path() {
        let raw = row(1, 100, 1 << 20, 8.0);
        let base = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            ..Default::default()
        };
        let off = [
            SamplingParams {
                top_k: 0,
                ..base.clone()
            },
            SamplingParams {
                top_k: 65,
                ..base.clone()
            },
            SamplingParams {
                min_p: 0.1,
                ..base.clone()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..base.clone()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..base.clone()
            },
            SamplingParams {
                frequency_penalty: -0.5,
                ..base.clone()
            },
            SamplingParams {
                logprobs: Some(3),
                ..base.clone()
            },
        ];
        let mut rng = SequenceRng::from_seed(0);
        for p in off {
            let v = p.clone().validate().unwrap();
            assert_eq!(
                sample_candidates(&raw, &v, &[], &mut rng).unwrap(),
                None,
                "{p:?}"
            );
        }
        let v = base.validate().unwrap();
        assert!(
            sample_candidates(&raw, &v, &[], &mut rng)
                .unwrap()
                .is_some()
        );
        // A min_tokens mask this step: reference.
        assert_eq!(sample_candidates(&raw, &v, &[3], &mut rng).unwrap(), None);
    }

    #[test]
    fn bad_rows_are_the_references_errors() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let mut rng = SequenceRng::from_seed(0);
        let mut raw = row(2, 30, 1 << 20, 4.0);
        raw[7] = f32::NAN;
        raw[9] = f32::INFINITY;
        let e = sample_candidates(&raw, &p, &[], &mut rng).unwrap_err();
        let r = reference(&raw, &p, &mut rng).unwrap_err();
        assert_eq!(e.to_string(), r.to_string());
        assert!(e.to_string().contains("token 7"), "{e}");
        assert!(matches!(
            sample_candidates(&[], &p, &[], &mut rng),
            Err(SampleError::EmptyLogits)
        ));
    }
}
