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
//! This is also the host half of GPU sampling: `engine::ops::top_k_candidates` returns each
//! row's top candidates and log-sum-exp on the device, and [`sample_from_candidates`] draws
//! from those ([`CandidateRow`]) with the same code, so only [B, n] numbers cross to the host.
//! There the raw log-prob is `value − lse`, the rank and the top log-probs come from the
//! candidates (when they provably contain every token they count).
//!
//! A row the candidates cannot decide — a tie at the top-k cut (top_k keeps every token tied
//! with the k-th, and more may sit outside the candidates), or a greedy argmax tied with the
//! runner-up (whose rank counts every tie) — is decided from a slice of it instead: every
//! token whose raw logit is ≥ [`slice_threshold`], in id order (`engine::ops::
//! logits_at_least`, on the device). That slice holds every token top_k can keep, so the
//! processors run on it in id order exactly as on the whole row (every other token is dropped
//! by top_k and adds exactly 0 to every sum), and every token the drawn token's rank counts.
//! Only what the slice cannot decide either (NaN, ±inf, a slice over its cap) goes back to the
//! whole row (see `Engine::step`).

use engine::ops::TopK;

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
        let cands = top_candidates(raw, k + 1)?; // (id, raw logit), k + 1 of them
        match draw_from_top(cands, k, params, rng) {
            Some(id) => id,
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

/// The draw of a non-greedy row from its `k + 1` largest raw logits `cands` (id, logit),
/// `None` when the (k + 1)-th ties the k-th after the temperature (the cut is not proven), or
/// when nothing is left to draw. The processors run on the candidates in id order, as on the
/// whole row.
fn draw_from_top(
    mut cands: Vec<(u32, f32)>,
    k: usize,
    params: &ValidParams,
    rng: &mut SequenceRng,
) -> Option<u32> {
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
        return None;
    }
    if params.top_p < 1.0 {
        apply_top_p(&mut row, params.top_p as f32);
    }
    draw(&softmax(&row), rng.next_uniform()).map(|i| cands[i as usize].0)
}

/// One row's candidates as a device computed them (`engine::ops::top_k_candidates`): its
/// `n` largest raw logits, value descending, ties to the lower id, and the row's lse.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CandidateRow<'a> {
    pub values: &'a [f32], // [n]
    pub ids: &'a [u32],    // [n]
    /// ln Σ e^l over the whole raw row; NaN when the row holds a NaN.
    pub lse: f32,
    /// The row's tokens at or above a threshold, when the candidates alone could not decide
    /// it (see [`slice_threshold`]).
    pub slice: Option<RowSlice<'a>>,
}

impl<'a> CandidateRow<'a> {
    /// Row `b` of a step's candidates, without a slice.
    pub(crate) fn of(top: &'a TopK, b: usize) -> Self {
        let k = top.k;
        CandidateRow {
            values: &top.values[b * k..(b + 1) * k],
            ids: &top.ids[b * k..(b + 1) * k],
            lse: top.lse[b],
            slice: None,
        }
    }
}

/// Every token of a row whose raw logit is ≥ `threshold`: (id, raw logit), ids ascending
/// (`engine::ops::logits_at_least`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSlice<'a> {
    pub threshold: f32,
    pub tokens: &'a [(u32, f32)],
}

/// How many device candidates a row sampled with `params` (and `banned` masked) needs, or
/// `None` when only the whole row will do. Greedy rows need 2 (the argmax, and its rank:
/// whether the runner-up ties it); top_k rows k + 1 (the proof of the cut); top log-probs N.
pub(crate) fn candidates_needed(
    params: &ValidParams,
    banned: &[u32],
    vocab: usize,
) -> Option<usize> {
    let p = params.params();
    let neutral = banned.is_empty()
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0;
    if !neutral || vocab == 0 {
        return None;
    }
    let draw = if params.is_greedy() {
        2
    } else if p.min_p == 0.0 {
        params.top_k_for(vocab).filter(|&k| k <= MAX_TOP_K)? + 1
    } else {
        return None;
    };
    let n = draw.max(params.num_top_logprobs(vocab).unwrap_or(0));
    (n <= engine::ops::MAX_TOP_K).then_some(n.min(vocab))
}

/// The token `Sampler::sample` would draw from the row whose device candidates are `row` —
/// `None` (with `rng` untouched) when they cannot decide it: too few of them, a tie at the
/// cut or a rank that may reach past them (without a slice of the row that settles it), or a
/// row with NaN or ±inf (whose error, or empty draw, the whole row's reference path reports).
pub(crate) fn sample_from_candidates(
    row: CandidateRow<'_>,
    params: &ValidParams,
    vocab: usize,
    rng: &mut SequenceRng,
) -> Option<SampledToken> {
    let n = usable(row, params, vocab)?;
    // A draw that turns out undecidable must leave the sequence's RNG as it was.
    let mut trial = rng.clone();
    let (token_id, x, rank) = match row.slice {
        Some(slice) => draw_from_slice(row, slice, params, vocab, &mut trial)?,
        None => {
            let (id, x) = if params.is_greedy() {
                (row.ids[0], row.values[0])
            } else {
                let k = params.top_k_for(vocab)?;
                let cands: Vec<(u32, f32)> = row.ids[..=k]
                    .iter()
                    .copied()
                    .zip(row.values[..=k].iter().copied())
                    .collect();
                let id = draw_from_top(cands, k, params, &mut trial)?;
                let at = row.ids[..=k].iter().position(|&c| c == id)?;
                (id, row.values[at])
            };
            // vLLM's rank counts every token with a raw logit ≥ x; all must be candidates.
            let rank = row.values[..n].iter().filter(|&&y| y >= x).count();
            if rank == n && n < vocab {
                return None;
            }
            (id, x, rank)
        }
    };
    let lp = |v: f32| (v as f64 - row.lse as f64) as f32;
    let n_top = params.num_top_logprobs(vocab).unwrap_or(0);
    let top_logprobs = row.ids[..n_top]
        .iter()
        .zip(&row.values[..n_top])
        .map(|(&id, &v)| (id, lp(v)))
        .collect();
    *rng = trial;
    Some(SampledToken {
        token_id,
        logprob: lp(x),
        rank: rank as u32,
        top_logprobs,
    })
}

/// How many candidates `row` has, when they are enough for `params` and the row is sound
/// (a finite lse: no NaN, no +inf, not all −inf).
fn usable(row: CandidateRow<'_>, params: &ValidParams, vocab: usize) -> Option<usize> {
    let n = row.values.len().min(row.ids.len());
    if n == 0 || !row.lse.is_finite() || candidates_needed(params, &[], vocab)? > n {
        return None;
    }
    Some(n)
}

/// The raw-logit threshold of the slice ([`RowSlice`]) that decides a row its candidates
/// could not, or `None` when only the whole row will do. Every token top_k can keep, and
/// every token the drawn token's rank counts, has a raw logit at or above it:
/// - greedy: the argmax (its rank counts every token tied with it);
/// - top_k: the smallest raw logit that the temperature division maps to the k-th largest
///   value's quotient or above. Division by T > 0 keeps the order, so the k-th largest
///   after it is the k-th raw value's quotient, but rounding may map a smaller raw logit to
///   the same quotient — a tie top_k keeps, which a threshold at the k-th raw value would
///   miss.
pub(crate) fn slice_threshold(
    row: CandidateRow<'_>,
    params: &ValidParams,
    vocab: usize,
) -> Option<f32> {
    usable(row, params, vocab)?;
    let t = if params.is_greedy() {
        row.values[0]
    } else {
        let k = params.top_k_for(vocab)?;
        lowest_tied_after_division(row.values[k - 1], params.temperature as f32)
    };
    // At −inf the slice would be the whole row (and nothing in it can be drawn).
    (t > f32::NEG_INFINITY).then_some(t)
}

/// The smallest non-NaN f32 `x` with `x / temperature ≥ c / temperature` in f32 (as
/// `apply_temperature` divides). f32 division by a positive number is monotone, so the
/// answer is found by bisection over the floats in order, from −inf up to `c`.
fn lowest_tied_after_division(c: f32, temperature: f32) -> f32 {
    // Floats in order as u32 keys: negative ones reversed below the positive ones.
    let key = |x: f32| {
        let b = x.to_bits();
        if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
    };
    let float = |k: u32| f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k });
    let target = c / temperature;
    let reaches = |x: f32| x / temperature >= target;
    if c.is_nan() || reaches(f32::NEG_INFINITY) {
        // Nothing to search: NaN reaches nothing, −inf (or a quotient of −inf) everything.
        return if c.is_nan() { c } else { f32::NEG_INFINITY };
    }
    let (mut lo, mut hi) = (key(f32::NEG_INFINITY), key(c));
    // reaches(float(hi)) and !reaches(float(lo)) throughout.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reaches(float(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    float(hi)
}

/// The draw (token, raw logit, rank) from `slice`, the row's tokens at or above a threshold:
/// `None` when the slice cannot be trusted to hold every token the draw and the rank involve
/// (a threshold above [`slice_threshold`]'s, tokens out of order or under the threshold,
/// fewer than top_k of them) or when nothing is left to draw.
fn draw_from_slice(
    row: CandidateRow<'_>,
    slice: RowSlice<'_>,
    params: &ValidParams,
    vocab: usize,
    rng: &mut SequenceRng,
) -> Option<(u32, f32, usize)> {
    let needed = slice_threshold(row, params, vocab)?;
    let tokens = slice.tokens;
    let sound = slice.threshold <= needed
        && tokens.windows(2).all(|w| w[0].0 < w[1].0)
        && tokens.iter().all(|t| t.1 >= slice.threshold);
    if !sound {
        return None;
    }
    let (id, x) = if params.is_greedy() {
        (row.ids[0], row.values[0])
    } else {
        let k = params.top_k_for(vocab)?;
        if tokens.len() < k {
            return None;
        }
        // The reference pipeline on the slice, in id order: the slice holds the k largest
        // raw logits, so its k-th largest after the temperature is the row's, and top_k
        // drops what the slice holds beyond the row's kept set.
        let mut work: Vec<f32> = tokens.iter().map(|t| t.1).collect();
        apply_temperature(&mut work, params.temperature as f32);
        apply_top_k(&mut work, k);
        if params.top_p < 1.0 {
            apply_top_p(&mut work, params.top_p as f32);
        }
        let i = draw(&softmax(&work), rng.next_uniform())?;
        tokens[i as usize]
    };
    // Every token with a raw logit ≥ x ≥ the threshold is in the slice.
    let rank = tokens.iter().filter(|t| t.1 >= x).count();
    Some((id, x, rank))
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
    use engine::ops::RowTokens;

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

    /// Device-style candidates (from the engine's CPU reference op) give the reference's
    /// token, rank and top log-prob ids, log-probs within f32 rounding — or decline, with the
    /// RNG untouched.
    #[test]
    fn drawing_from_device_candidates_matches_the_reference() {
        let (mut taken, mut total) = (0, 0);
        for case in 0..300u64 {
            let v = [50usize, 1000][case as usize % 2];
            let distinct = [7u64, 1 << 20, 1 << 20][(case / 2) as usize % 3];
            let raw = row(case, v, distinct, 20.0);
            let p = SamplingParams {
                temperature: [0.0, 0.7, 1.0, 1.7][(case / 6) as usize % 4],
                top_k: [1, 2, 5, 64][(case / 24) as usize % 4],
                top_p: [1.0, 0.8][(case / 3) as usize % 2],
                logprobs: [None, Some(0), Some(4), Some(40)][(case / 5) as usize % 4],
                ..Default::default()
            }
            .validate()
            .unwrap();
            let Some(n) = candidates_needed(&p, &[], v) else {
                continue;
            };
            let t = engine::Tensor::from_vec(raw.clone(), &[1, v]).unwrap();
            let top = engine::ops::top_k_candidates(&t, n).unwrap();
            let cand = CandidateRow {
                values: &top.values,
                ids: &top.ids,
                lse: top.lse[0],
                slice: None,
            };
            let mut a = SequenceRng::from_seed(case);
            let mut b = a.clone();
            let want = reference(&raw, &p, &mut a).unwrap();
            total += 1;
            match sample_from_candidates(cand, &p, v, &mut b) {
                Some(got) => {
                    taken += 1;
                    assert_eq!(got.token_id, want.token_id, "case {case}: {p:?}");
                    assert_eq!(got.rank, want.rank, "case {case}");
                    assert!(
                        (got.logprob - want.logprob).abs() < 2e-6 * want.logprob.abs().max(1.0)
                    );
                    assert_eq!(got.top_logprobs.len(), want.top_logprobs.len());
                    for (x, y) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                        assert_eq!(x.0, y.0, "case {case}");
                        assert!((x.1 - y.1).abs() < 2e-6 * y.1.abs().max(1.0));
                    }
                    assert_eq!(a.next_uniform(), b.next_uniform(), "case {case}");
                }
                None => {
                    // Declined: the RNG is where it was.
                    let mut fresh = SequenceRng::from_seed(case);
                    assert_eq!(b.next_uniform(), fresh.next_uniform(), "case {case}");
                }
            }
        }
        // Ties (7 distinct values) decline often; distinct rows almost never.
        assert!(taken * 3 >= total * 2, "{taken} of {total}");
    }

    /// A soft-capped row (gemma-2's final `tanh(x / cap) · cap` in f32) of wide raw logits:
    /// many saturate at exactly ±cap, so the top candidates all tie.
    fn soft_capped(seed: u64, v: usize, cap: f32, spread: f32) -> Vec<f32> {
        row(seed, v, 1 << 20, spread)
            .into_iter()
            .map(|x| (x / cap).tanh() * cap)
            .collect()
    }

    /// `raw`'s device candidates (the engine's CPU op) for `p`, the threshold of the slice
    /// when they cannot decide the row, and the slice (the engine's CPU op again).
    fn device_view(raw: &[f32], p: &ValidParams) -> (engine::ops::TopK, Option<(f32, RowTokens)>) {
        let v = raw.len();
        let n = candidates_needed(p, &[], v).unwrap();
        let t = engine::Tensor::from_vec(raw.to_vec(), &[1, v]).unwrap();
        let top = engine::ops::top_k_candidates(&t, n).unwrap();
        let slice = slice_threshold(CandidateRow::of(&top, 0), p, v).map(|th| {
            let got = engine::ops::logits_at_least(&t, &[0], &[th], usize::MAX).unwrap();
            (th, got[0].clone().unwrap())
        });
        (top, slice)
    }

    /// Draws from the device view of `raw`: the candidates alone, then with the slice when
    /// they decline. Returns the token and whether the slice was needed.
    fn draw_device(
        raw: &[f32],
        p: &ValidParams,
        rng: &mut SequenceRng,
    ) -> Option<(SampledToken, bool)> {
        let v = raw.len();
        let (top, slice) = device_view(raw, p);
        let mut row = CandidateRow::of(&top, 0);
        if let Some(t) = sample_from_candidates(row, p, v, rng) {
            return Some((t, false));
        }
        let (threshold, tokens) = slice.as_ref()?;
        row.slice = Some(RowSlice {
            threshold: *threshold,
            tokens,
        });
        sample_from_candidates(row, p, v, rng).map(|t| (t, true))
    }

    fn assert_same_token(what: &str, got: &SampledToken, want: &SampledToken) {
        assert_eq!(got.token_id, want.token_id, "{what}");
        assert_eq!(got.rank, want.rank, "{what}");
        assert!(
            (got.logprob - want.logprob).abs() <= 2e-6 * want.logprob.abs().max(1.0),
            "{what}: {} vs {}",
            got.logprob,
            want.logprob
        );
        let ids = |x: &[(u32, f32)]| x.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(ids(&got.top_logprobs), ids(&want.top_logprobs), "{what}");
        for (x, y) in got.top_logprobs.iter().zip(&want.top_logprobs) {
            assert!((x.1 - y.1).abs() <= 2e-6 * y.1.abs().max(1.0), "{what}");
        }
    }

    /// Rows with many ties at the cut — few distinct values, and soft-capped rows saturated
    /// at exactly the cap — are decided from the slice at or above the cut exactly as the
    /// reference decides them from the whole row, consuming the same random numbers.
    #[test]
    fn ties_at_the_cut_are_decided_from_a_slice_as_the_reference_decides_them() {
        let (mut sliced, mut undecided) = (0, 0);
        for case in 0..360u64 {
            let v = [300usize, 1001, 4099][case as usize % 3];
            let raw = match (case / 3) % 3 {
                0 => row(case, v, 5, 20.0),
                1 => row(case, v, 60, 20.0),
                _ => soft_capped(case, v, 30.0, 800.0),
            };
            let p = SamplingParams {
                temperature: [0.0, 0.01, 0.7, 1.0, 1.7][(case / 9) as usize % 5],
                top_k: [1, 2, 5, 64][(case / 45) as usize % 4],
                top_p: [1.0, 0.8][(case / 2) as usize % 2],
                logprobs: [None, Some(0), Some(4)][(case / 5) as usize % 3],
                ..Default::default()
            }
            .validate()
            .unwrap();
            let mut a = SequenceRng::from_seed(case);
            let mut b = a.clone();
            let want = reference(&raw, &p, &mut a).unwrap();
            let what = format!("case {case}: {p:?}");
            match draw_device(&raw, &p, &mut b) {
                Some((got, used_slice)) => {
                    sliced += usize::from(used_slice);
                    assert_same_token(&what, &got, &want);
                    assert_eq!(a.next_uniform(), b.next_uniform(), "{what}");
                }
                None => undecided += 1,
            }
        }
        // Every row here has a finite lse: the slice decides whatever the candidates cannot.
        assert_eq!(undecided, 0);
        assert!(sliced >= 100, "{sliced}");
    }

    #[test]
    fn a_saturated_soft_cap_row_keeps_every_tied_token() {
        // 300 of 1000 logits exactly at the cap: top_k 5 keeps all 300, top_p none less.
        let mut raw: Vec<f32> = (0..1000).map(|i| (i % 97) as f32 * 0.25).collect();
        for i in (0..1000)
            .step_by(10)
            .chain((3..1000).step_by(10))
            .chain((7..1000).step_by(10))
        {
            raw[i] = 30.0;
        }
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let (top, slice) = device_view(&raw, &p);
        let (threshold, tokens) = slice.unwrap();
        assert_eq!(threshold, 30.0);
        assert_eq!(tokens.len(), 300);
        let row = CandidateRow::of(&top, 0);
        assert!(sample_from_candidates(row, &p, 1000, &mut SequenceRng::from_seed(0)).is_none());
        // Over many seeds the slice draws each tied token, always what the reference draws.
        let mut seen = std::collections::HashSet::new();
        for seed in 0..3000 {
            let mut a = SequenceRng::from_seed(seed);
            let mut b = a.clone();
            let want = reference(&raw, &p, &mut a).unwrap();
            let (got, used_slice) = draw_device(&raw, &p, &mut b).unwrap();
            assert!(used_slice);
            assert_same_token(&format!("seed {seed}"), &got, &want);
            assert_eq!(got.rank, 300);
            seen.insert(got.token_id);
        }
        assert!(seen.len() > 250, "{}", seen.len());
        assert!(seen.iter().all(|&id| raw[id as usize] == 30.0));
    }

    #[test]
    fn a_greedy_tie_at_the_top_gets_its_rank_from_the_slice() {
        let mut raw = row(4, 500, 1 << 20, 4.0);
        for i in [17, 3, 250, 499] {
            raw[i] = 9.0;
        }
        let p = SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let mut rng = SequenceRng::from_seed(0);
        let want = reference(&raw, &p, &mut rng).unwrap();
        let (got, used_slice) = draw_device(&raw, &p, &mut rng).unwrap();
        assert!(used_slice);
        assert_eq!((got.token_id, got.rank), (3, 4));
        assert_same_token("greedy tie", &got, &want);
    }

    /// Distinct raw logits that the temperature division rounds to one quotient tie at the
    /// cut: the slice must start below the k-th raw value to hold them.
    #[test]
    fn the_slice_threshold_covers_logits_the_division_ties() {
        // The exact answer by walking down one float at a time.
        let walk = |c: f32, t: f32| {
            let mut x = c;
            while x > f32::NEG_INFINITY && x.next_down() / t >= c / t {
                x = x.next_down();
            }
            x
        };
        let mut collapsed = 0;
        let mut seed = 0x1234_5678u64;
        for i in 0..20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let c = f32::from_bits((seed >> 32) as u32);
            if !c.is_finite() {
                continue;
            }
            let t = [0.01f32, 0.3, 0.7, 1.0, 1.3, 1.7, 2.0][i % 7];
            let got = lowest_tied_after_division(c, t);
            assert_eq!(got.to_bits(), walk(c, t).to_bits(), "c {c:e} T {t}");
            collapsed += usize::from(got < c);
        }
        assert!(collapsed > 1000, "{collapsed}");
        assert_eq!(
            lowest_tied_after_division(f32::NEG_INFINITY, 0.7),
            f32::NEG_INFINITY
        );
        // A quotient that overflows ties every logit from there up (and c / 0.01 = −inf:
        // every logit).
        assert_eq!(lowest_tied_after_division(-3e38, 0.01), f32::NEG_INFINITY);

        // A row whose 3rd and 4th largest raw logits differ but divide to one value.
        let temperature = 0.7f32;
        let c = (0..)
            .map(|i| 1.0f32 + i as f32 * 1e-3)
            .find(|&c| c.next_down() / temperature == c / temperature)
            .unwrap();
        let mut raw = vec![0.0f32; 50];
        raw[10] = 3.0;
        raw[20] = 2.0;
        raw[30] = c;
        raw[40] = c.next_down();
        let p = SamplingParams {
            temperature: temperature as f64,
            top_k: 3,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let (_, slice) = device_view(&raw, &p);
        let (threshold, tokens) = slice.unwrap();
        assert!(threshold <= c.next_down());
        assert_eq!(
            tokens.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![10, 20, 30, 40]
        );
        // Both tied tokens are drawn, each as the reference draws it.
        let mut drawn = [false; 2];
        for seed in 0..400 {
            let mut a = SequenceRng::from_seed(seed);
            let mut b = a.clone();
            let want = reference(&raw, &p, &mut a).unwrap();
            let (got, _) = draw_device(&raw, &p, &mut b).unwrap();
            assert_same_token(&format!("seed {seed}"), &got, &want);
            if got.token_id == 30 || got.token_id == 40 {
                drawn[usize::from(got.token_id == 40)] = true;
            }
        }
        assert_eq!(drawn, [true, true]);
    }

    #[test]
    fn a_slice_that_cannot_be_trusted_is_declined() {
        let raw = row(9, 200, 5, 10.0);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let (top, slice) = device_view(&raw, &p);
        let (threshold, tokens) = slice.unwrap();
        let mut rng = SequenceRng::from_seed(0);
        let mut try_with = |threshold: f32, tokens: &[(u32, f32)]| {
            let row = CandidateRow {
                slice: Some(RowSlice { threshold, tokens }),
                ..CandidateRow::of(&top, 0)
            };
            sample_from_candidates(row, &p, 200, &mut rng)
        };
        assert!(try_with(threshold, &tokens).is_some());
        // A threshold above the cut may miss tied tokens.
        assert!(try_with(threshold.next_up(), &tokens).is_none());
        // Out of id order, or a token under the threshold.
        let mut swapped = tokens.clone();
        swapped.swap(0, 1);
        assert!(try_with(threshold, &swapped).is_none());
        let mut low = tokens.clone();
        low[0].1 = threshold.next_down();
        assert!(try_with(threshold, &low).is_none());
        // Fewer tokens than top_k.
        assert!(try_with(threshold, &tokens[..4]).is_none());
        // A lower threshold (a superset) is fine.
        let t = engine::Tensor::from_vec(raw.clone(), &[1, 200]).unwrap();
        let wider = engine::ops::logits_at_least(&t, &[0], &[-100.0], 1000).unwrap();
        assert!(try_with(-100.0, wider[0].as_ref().unwrap()).is_some());
    }

    #[test]
    fn device_candidates_decline_bad_rows_and_short_lists() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 3,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let (values, ids) = ([5.0f32, 4.0, 3.0, 2.0], [7u32, 1, 2, 9]);
        let mut rng = SequenceRng::from_seed(1);
        let row = |lse: f32, n: usize| CandidateRow {
            values: &values[..n],
            ids: &ids[..n],
            lse,
            slice: None,
        };
        assert!(sample_from_candidates(row(f32::NAN, 4), &p, 10, &mut rng).is_none());
        assert!(sample_from_candidates(row(f32::INFINITY, 4), &p, 10, &mut rng).is_none());
        // top_k 3 needs 4 candidates to prove the cut.
        assert!(sample_from_candidates(row(6.0, 3), &p, 10, &mut rng).is_none());
        let t = sample_from_candidates(row(6.0, 4), &p, 10, &mut rng).unwrap();
        assert!([7, 1, 2].contains(&t.token_id));
        // Greedy with the runner-up tied at the top and nothing after: the rank is unknown.
        let g = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let tied = CandidateRow {
            values: &[5.0, 5.0],
            ids: &[3, 4],
            lse: 6.0,
            slice: None,
        };
        assert!(sample_from_candidates(tied, &g, 10, &mut rng).is_none());
        assert_eq!(candidates_needed(&g, &[], 10), Some(2));
        assert_eq!(candidates_needed(&g, &[1], 10), None);
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
