//! The logits pipeline of vLLM's V1 sampler, on one row of logits `[V]`.
//!
//! [`process_row`] applies, in vLLM's order:
//!
//! 1. min_tokens: stop tokens (EOS, generation_config EOS ids, stop_token_ids) → -inf while
//!    the output is shorter than min_tokens;
//! 2. penalties: repetition over prompt + output tokens (logit > 0 → logit / p, else
//!    logit · p), then frequency (−f · count) and presence (−p · [count > 0]) over output
//!    tokens only;
//! 3. greedy (temperature < 1e-5) stops here: the caller takes [`argmax`];
//! 4. temperature (logits / T), min_p, top_k, top_p.
//!
//! Every step works in f32 like vLLM's tensors (parameters are cast to f32 first). Masked
//! tokens get -inf, so a probability of exactly 0.
//!
//! Tie and boundary rules (vLLM's `apply_top_k_top_p` and `MinPLogitsProcessor`):
//! - top_k keeps every token whose logit is ≥ the k-th largest, so ties with the k-th token
//!   are all kept (more than k tokens may survive).
//! - top_p sorts ascending (stable: equal logits keep id order), takes the softmax and its
//!   running sum, and drops a token when the running sum up to and including it is ≤ 1 − p;
//!   the most likely token always stays. So the kept set is the smallest top set whose mass
//!   reaches p, an exact tie at the boundary drops the token (sum == 1 − p is dropped), and
//!   among equal logits the lower ids are dropped first. The running sum is accumulated in
//!   f64 and stored as f32, as torch's CPU cumsum does.
//! - min_p drops a token when its probability is < min_p · (largest probability).

use std::collections::{HashMap, HashSet};

use crate::error::{Result, SampleError};
use crate::params::ValidParams;

/// The tokens a sequence has seen, kept in the form the penalties need: which tokens occur
/// in the prompt, and how often each occurs in the output. Updated one token at a time.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    prompt: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
    output_len: usize,
}

impl TokenHistory {
    pub fn new(prompt_ids: &[u32]) -> Self {
        Self {
            prompt: prompt_ids.iter().copied().collect(),
            output_counts: HashMap::new(),
            output_len: 0,
        }
    }

    /// A history from a prompt and the output so far (for one-off calls and tests).
    pub fn from_ids(prompt_ids: &[u32], output_ids: &[u32]) -> Self {
        let mut h = Self::new(prompt_ids);
        for &id in output_ids {
            h.push_output(id);
        }
        h
    }

    /// Records one generated token.
    pub fn push_output(&mut self, id: u32) {
        *self.output_counts.entry(id).or_insert(0) += 1;
        self.output_len += 1;
    }

    /// Tokens generated so far.
    pub fn output_len(&self) -> usize {
        self.output_len
    }

    /// How often `id` occurs in the output.
    pub fn output_count(&self, id: u32) -> u32 {
        self.output_counts.get(&id).copied().unwrap_or(0)
    }
}

/// Rejects rows the model should never produce: empty, NaN or +inf (-inf is a valid mask).
pub(crate) fn check_row(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(SampleError::EmptyLogits);
    }
    if let Some(i) = logits
        .iter()
        .position(|x| x.is_nan() || *x == f32::INFINITY)
    {
        return Err(SampleError::BadLogit {
            token_id: i as u32,
            value: logits[i],
        });
    }
    Ok(())
}

/// Runs the pipeline of the module doc on `logits` (the raw row, modified in place).
/// `banned` is the stop-token set to mask for min_tokens (empty once min_tokens is reached).
/// For greedy parameters it stops after the penalties.
pub(crate) fn process_row(
    logits: &mut [f32], // [V]
    params: &ValidParams,
    history: &TokenHistory,
    banned: &[u32],
) -> Result<()> {
    mask_tokens(logits, banned)?;
    apply_penalties(
        logits,
        history,
        params.repetition_penalty as f32,
        params.frequency_penalty as f32,
        params.presence_penalty as f32,
    )?;
    if params.is_greedy() {
        return Ok(());
    }
    apply_temperature(logits, params.temperature as f32);
    if params.min_p > 0.0 {
        apply_min_p(logits, params.min_p as f32);
    }
    if let Some(k) = params.top_k_for(logits.len()) {
        apply_top_k(logits, k);
    }
    if params.top_p < 1.0 {
        apply_top_p(logits, params.top_p as f32);
    }
    Ok(())
}

/// Sets the logits of `ids` to -inf (min_tokens' masking of stop tokens).
pub(crate) fn mask_tokens(logits: &mut [f32], ids: &[u32]) -> Result<()> {
    let vocab = logits.len();
    for &id in ids {
        match logits.get_mut(id as usize) {
            Some(x) => *x = f32::NEG_INFINITY,
            None => return Err(out_of_range("stop", id, vocab)),
        }
    }
    Ok(())
}

fn out_of_range(what: &'static str, token_id: u32, vocab: usize) -> SampleError {
    SampleError::TokenOutOfRange {
        what,
        token_id,
        vocab,
    }
}

/// Repetition, frequency and presence penalties (vLLM's `apply_penalties`); a no-op at the
/// neutral values 1, 0, 0.
pub(crate) fn apply_penalties(
    logits: &mut [f32], // [V]
    history: &TokenHistory,
    repetition: f32,
    frequency: f32,
    presence: f32,
) -> Result<()> {
    let vocab = logits.len();
    let check = |what, id: u32| {
        if (id as usize) < vocab {
            Ok(id as usize)
        } else {
            Err(out_of_range(what, id, vocab))
        }
    };
    if repetition != 1.0 {
        let penalize = |x: f32| {
            if x > 0.0 {
                x / repetition
            } else {
                x * repetition
            }
        };
        for &id in &history.prompt {
            let i = check("prompt", id)?;
            logits[i] = penalize(logits[i]);
        }
        for &id in history.output_counts.keys() {
            if !history.prompt.contains(&id) {
                let i = check("output", id)?;
                logits[i] = penalize(logits[i]);
            }
        }
    }
    if frequency != 0.0 || presence != 0.0 {
        for (&id, &count) in &history.output_counts {
            let i = check("output", id)?;
            logits[i] -= frequency * count as f32;
            logits[i] -= presence;
        }
    }
    Ok(())
}

/// Divides by the temperature (in f32, as vLLM's `div_`).
pub(crate) fn apply_temperature(logits: &mut [f32], temperature: f32) {
    for x in logits.iter_mut() {
        *x /= temperature;
    }
}

/// Softmax in f32 with an f64 sum. All -inf gives all zeros.
pub(crate) fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum = exps.iter().map(|&e| e as f64).sum::<f64>() as f32;
    exps.into_iter().map(|e| e / sum).collect()
}

/// min_p: drops tokens whose probability is below min_p times the largest probability.
pub(crate) fn apply_min_p(logits: &mut [f32], min_p: f32) {
    let probs = softmax(logits);
    let max_prob = probs.iter().copied().fold(0.0f32, f32::max);
    let threshold = max_prob * min_p;
    for (x, p) in logits.iter_mut().zip(probs) {
        if p < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// top_k: keeps the tokens whose logit is ≥ the k-th largest logit (ties all kept).
/// `k` ≥ 1; `k` ≥ V keeps everything.
pub(crate) fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut values = logits.to_vec();
    // Descending: after the selection, index k-1 holds the k-th largest.
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for x in logits.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// top_p: keeps the smallest set of most likely tokens whose probability reaches `p`, with
/// vLLM's boundary and tie rules (module doc).
pub(crate) fn apply_top_p(logits: &mut [f32], p: f32) {
    // Tokens at -inf have probability 0 and add nothing to the running sum: only the finite
    // ones take part.
    let mut ids: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
        .collect();
    let n = ids.len();
    if n <= 1 {
        return;
    }
    let max = ids
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let sum = ids
        .iter()
        .map(|&i| (logits[i as usize] - max).exp() as f64)
        .sum::<f64>() as f32;
    let prob = |i: u32| (logits[i as usize] - max).exp() / sum;
    let limit = 1.0f32 - p;
    // Ascending by logit, ties by ascending id: the order of a stable sort of the row.
    let asc = |a: &u32, b: &u32| {
        logits[*a as usize]
            .total_cmp(&logits[*b as usize])
            .then(a.cmp(b))
    };

    // Sorting the whole vocabulary is wasted work when the kept set is small: sort only the
    // m largest, and check that everything below them is dropped anyway (their running sums
    // are at most the mass below the m largest). If not, widen m.
    let mut m = n.min(64);
    loop {
        let split = n - m;
        if split > 0 {
            ids.select_nth_unstable_by(split, asc);
        }
        let below: f64 = ids[..split].iter().map(|&i| prob(i) as f64).sum();
        if split > 0 && (below as f32) > limit {
            m = (m * 4).min(n);
            continue;
        }
        let (low, top) = ids.split_at_mut(split);
        top.sort_by(asc);
        let mut cumsum = below;
        let last = top.len() - 1;
        let mut drop = Vec::new();
        for (pos, &id) in top.iter().enumerate() {
            cumsum += prob(id) as f64;
            if pos != last && (cumsum as f32) <= limit {
                drop.push(id);
            }
        }
        for &id in low.iter().chain(&drop) {
            logits[id as usize] = f32::NEG_INFINITY;
        }
        return;
    }
}

/// Index of the largest logit, ties → lowest id (torch's argmax); `None` when all are -inf.
pub(crate) fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x > f32::NEG_INFINITY && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SamplingParams;

    const NEG: f32 = f32::NEG_INFINITY;

    fn kept(logits: &[f32]) -> Vec<u32> {
        (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] > NEG)
            .collect()
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties_with_the_kth() {
        let mut row = vec![0.5, 3.0, -1.0, 2.0, 2.5, 0.0];
        apply_top_k(&mut row, 3);
        assert_eq!(kept(&row), vec![1, 3, 4]);
        // Untouched values stay exact.
        assert_eq!((row[1], row[3], row[4]), (3.0, 2.0, 2.5));

        // Two tokens tie with the 2nd largest: both kept, so 3 survive k = 2.
        let mut row = vec![1.0, 4.0, 1.0, 2.0, 2.0, -3.0];
        apply_top_k(&mut row, 2);
        assert_eq!(kept(&row), vec![1, 3, 4]);

        let mut row = vec![1.0, 4.0, 1.0];
        apply_top_k(&mut row, 3);
        assert_eq!(kept(&row), vec![0, 1, 2]);
        apply_top_k(&mut row, 1);
        assert_eq!(kept(&row), vec![1]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Four equal logits (probability exactly 0.25 each) plus masked ones.
        let base = vec![0.0, NEG, 0.0, 0.0, NEG, 0.0];
        // p = 0.5: running sums 0.25, 0.5, 0.75, 1.0; ≤ 0.5 is dropped, so 2 survive, and
        // among equal logits the lower ids go first.
        let mut row = base.clone();
        apply_top_p(&mut row, 0.5);
        assert_eq!(kept(&row), vec![3, 5]);
        // p = 0.75: the boundary 0.25 == 1 - p is dropped, three survive (0.75 ≥ p).
        let mut row = base.clone();
        apply_top_p(&mut row, 0.75);
        assert_eq!(kept(&row), vec![2, 3, 5]);
        // Just above a boundary needs one more token.
        let mut row = base.clone();
        apply_top_p(&mut row, 0.76);
        assert_eq!(kept(&row), vec![0, 2, 3, 5]);
        // Tiny p keeps exactly one: the most likely (the highest id among the ties).
        let mut row = base.clone();
        apply_top_p(&mut row, 1e-6);
        assert_eq!(kept(&row), vec![5]);
    }

    #[test]
    fn top_p_on_a_skewed_distribution_matches_an_f64_reference() {
        let row = vec![2.0f32, 0.1, 1.3, -0.7, 1.9, 0.4, -2.0, 1.0];
        for &p in &[0.1f32, 0.3, 0.5, 0.62, 0.8, 0.9, 0.95, 0.99] {
            let mut got = row.clone();
            apply_top_p(&mut got, p);
            // Reference: descending order, take tokens until the mass reaches p (f64).
            let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let mut mass = 0.0;
            let mut want = Vec::new();
            for i in idx {
                want.push(i as u32);
                mass += (row[i] as f64).exp() / z;
                if mass >= p as f64 {
                    break;
                }
            }
            want.sort();
            assert_eq!(kept(&got), want, "p = {p}");
        }
    }

    /// vLLM's top_p written plainly: sort the whole row ascending (stable), softmax, running
    /// sum in f64 stored as f32, drop while ≤ 1 − p, keep the last.
    fn top_p_full_sort(row: &[f32], p: f32) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
        let max = row.iter().copied().fold(NEG, f32::max);
        let z = row.iter().map(|&x| (x - max).exp() as f64).sum::<f64>() as f32;
        let mut cum = 0.0f64;
        let mut keep = Vec::new();
        for (pos, &i) in idx.iter().enumerate() {
            cum += ((row[i] - max).exp() / z) as f64;
            if pos == idx.len() - 1 || (cum as f32) > 1.0 - p {
                keep.push(i as u32);
            }
        }
        keep.sort();
        keep
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
        // 5000 logits from a fixed LCG, with repeated values (ties) and some masked.
        let mut state = 12345u64;
        let row: Vec<f32> = (0..5000)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 97 == 0 {
                    NEG
                } else {
                    ((state >> 40) % 400) as f32 / 40.0 - 5.0
                }
            })
            .collect();
        // Small p keeps few tokens (no widening); large p needs the whole row sorted.
        let mut sizes = Vec::new();
        for &p in &[0.01f32, 0.2, 0.5, 0.9, 0.99, 0.999_9] {
            let mut got = row.clone();
            apply_top_p(&mut got, p);
            let want = top_p_full_sort(&row, p);
            assert_eq!(kept(&got), want, "p = {p}");
            for &i in &want {
                assert_eq!(got[i as usize], row[i as usize]);
            }
            sizes.push(want.len());
        }
        // Both paths ran: a kept set inside the first 64, and one past several widenings.
        assert!(sizes[0] < 64 && *sizes.last().unwrap() > 1024, "{sizes:?}");
    }

    #[test]
    fn min_p_keeps_tokens_at_least_min_p_times_the_max() {
        // Probabilities proportional to 8, 4, 2, 1 (powers of two: exact ratios).
        let ln2 = std::f32::consts::LN_2;
        let row = vec![3.0 * ln2, 2.0 * ln2, ln2, 0.0];
        let mut r = row.clone();
        apply_min_p(&mut r, 0.3); // threshold 0.3·p0: keeps 8, 4 (ratio 0.5), drops 2/8
        assert_eq!(kept(&r), vec![0, 1]);
        let mut r = row.clone();
        apply_min_p(&mut r, 0.2); // 2/8 = 0.25 ≥ 0.2 kept, 1/8 dropped
        assert_eq!(kept(&r), vec![0, 1, 2]);
        let mut r = row.clone();
        apply_min_p(&mut r, 1.0); // only the max itself
        assert_eq!(kept(&r), vec![0]);
        let mut r = row.clone();
        apply_min_p(&mut r, 0.0);
        assert_eq!(kept(&r), vec![0, 1, 2, 3]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let raw = vec![2.0f32, -1.0, 3.0, 0.0, -2.0, 1.5];
        let h = TokenHistory::from_ids(&[0, 1], &[1, 4, 4]);
        let mut row = raw.clone();
        apply_penalties(&mut row, &h, 2.0, 0.0, 0.0).unwrap();
        // Seen: 0 (prompt), 1 (both), 4 (output). Each once, whatever the count.
        assert_eq!(row, vec![1.0, -2.0, 3.0, 0.0, -4.0, 1.5]);
    }

    #[test]
    fn frequency_and_presence_penalties_count_output_tokens_only() {
        let raw = vec![2.0f32, -1.0, 3.0, 0.0, -2.0, 1.5];
        // Token 2 appears in the prompt only: untouched by frequency/presence.
        let h = TokenHistory::from_ids(&[2, 2, 2], &[1, 4, 4, 5, 4]);
        let mut row = raw.clone();
        let (f, p) = (0.5f32, 0.25f32);
        apply_penalties(&mut row, &h, 1.0, f, p).unwrap();
        let want: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = h.output_count(i as u32) as f32;
                x - f * c - if c > 0.0 { p } else { 0.0 }
            })
            .collect();
        assert_eq!(row, want);
        assert_eq!(row[4], -2.0 - 1.5 - 0.25);
        assert_eq!(row[2], 3.0);
        // Negative penalties encourage repetition.
        let mut row = raw.clone();
        apply_penalties(&mut row, &h, 1.0, -1.0, -2.0).unwrap();
        assert_eq!(row[4], -2.0 + 3.0 + 2.0);
    }

    #[test]
    fn penalties_apply_repetition_then_frequency_then_presence() {
        let h = TokenHistory::from_ids(&[], &[0, 0]);
        let mut row = vec![3.0f32, 1.0];
        apply_penalties(&mut row, &h, 1.5, 0.5, 0.25).unwrap();
        assert_eq!(row[0], 3.0 / 1.5 - 0.5 * 2.0 - 0.25);
    }

    #[test]
    fn out_of_range_ids_are_errors_not_panics() {
        let h = TokenHistory::from_ids(&[9], &[]);
        let e = apply_penalties(&mut [0.0; 4], &h, 1.2, 0.0, 0.0).unwrap_err();
        assert!(e.to_string().contains("prompt token id 9"), "{e}");
        let e = mask_tokens(&mut [0.0; 4], &[7]).unwrap_err();
        assert!(e.to_string().contains("stop token id 7"), "{e}");
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), Some(1));
        assert_eq!(argmax(&[NEG, NEG, 0.5]), Some(2));
        assert_eq!(argmax(&[NEG, NEG]), None);
    }

    #[test]
    fn pipeline_masks_stop_tokens_then_penalizes_then_filters() {
        let params = SamplingParams {
            temperature: 0.5,
            top_k: 2,
            repetition_penalty: 2.0,
            min_tokens: 3,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let h = TokenHistory::from_ids(&[3], &[]);
        // Token 0 is the stop token (banned), token 3 is in the prompt.
        let mut row = vec![9.0f32, 1.0, 2.0, 4.0, 0.5];
        process_row(&mut row, &params, &h, &[0]).unwrap();
        // After masking and penalty: [-inf, 1, 2, 2, 0.5]; / 0.5: [-inf, 2, 4, 4, 1];
        // top_k 2: the 2nd largest is 4, so tokens 2 and 3 stay.
        assert_eq!(kept(&row), vec![2, 3]);
        assert_eq!((row[2], row[3]), (4.0, 4.0));
    }

    #[test]
    fn greedy_pipeline_stops_after_penalties() {
        let params = SamplingParams {
            temperature: 0.0,
            presence_penalty: 1.0,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let h = TokenHistory::from_ids(&[], &[1]);
        let mut row = vec![1.0f32, 1.5, 0.2];
        process_row(&mut row, &params, &h, &[]).unwrap();
        assert_eq!(row, vec![1.0, 0.5, 0.2]);
        assert_eq!(argmax(&row), Some(0));
    }

    #[test]
    fn bad_rows_are_rejected() {
        assert!(matches!(check_row(&[]), Err(SampleError::EmptyLogits)));
        let e = check_row(&[0.0, f32::NAN]).unwrap_err();
        assert!(e.to_string().contains("token 1"), "{e}");
        assert!(check_row(&[0.0, f32::INFINITY]).is_err());
        assert!(check_row(&[0.0, NEG]).is_ok());
    }
}
