//! The draw: its distribution (chi-square against an f64 reference), seeds, batches, n > 1.

use sample::{Sampler, SamplingParams, SequenceRng, TokenHistory, ValidParams, step_batch};

use crate::common::{VOCAB, keyed_sequence};

/// Upper 0.1% point of the chi-square distribution with `df` degrees of freedom
/// (Wilson–Hilferty; within 1% of the table for df ≥ 3: df 9 → 28.0, table 27.88).
fn chi2_critical_0_001(df: usize) -> f64 {
    let d = df as f64;
    let z = 3.090_232; // standard normal upper 0.1% point
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Pearson's statistic over the tokens with expected mass; tokens with none must never be
/// drawn. Returns (statistic, degrees of freedom).
fn chi2(counts: &[u64], expected: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let mut stat = 0.0;
    let mut cells = 0;
    for (i, (&c, &p)) in counts.iter().zip(expected).enumerate() {
        if p == 0.0 {
            assert_eq!(c, 0, "token {i} has no mass but was drawn {c} times");
            continue;
        }
        let e = p * n as f64;
        stat += (c as f64 - e).powi(2) / e;
        cells += 1;
    }
    (stat, cells - 1)
}

/// The processed distribution computed independently, in f64 and by plain sorting:
/// softmax(logits / T), then min_p, top_k, top_p (descending order, take tokens until their
/// mass reaches p), renormalized.
fn reference(logits: &[f32], t: f64, top_k: usize, top_p: f64, min_p: f64) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let norm = |w: &[f64]| {
        let z: f64 = w.iter().sum();
        w.iter().map(|x| x / z).collect::<Vec<f64>>()
    };
    let mut p = norm(&scaled.iter().map(|x| (x - max).exp()).collect::<Vec<_>>());
    let pmax = p.iter().cloned().fold(0.0, f64::max);
    for x in p.iter_mut() {
        if *x < min_p * pmax {
            *x = 0.0;
        }
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    if top_k > 0 {
        for &i in &order[top_k..] {
            p[i] = 0.0;
        }
    }
    let p = norm(&p);
    let mut keep = vec![false; p.len()];
    let mut mass = 0.0;
    for &i in &order {
        if p[i] == 0.0 {
            break;
        }
        keep[i] = true;
        mass += p[i];
        if mass >= top_p {
            break;
        }
    }
    norm(
        &p.iter()
            .zip(&keep)
            .map(|(x, k)| if *k { *x } else { 0.0 })
            .collect::<Vec<_>>(),
    )
}

fn counts(logits: &[f32], params: &ValidParams, draws: usize, seed: u64) -> Vec<u64> {
    let mut rng = SequenceRng::from_seed(seed);
    let history = TokenHistory::default();
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        let t = Sampler::sample(logits, params, &history, &[], &mut rng).unwrap();
        counts[t.token_id as usize] += 1;
    }
    counts
}

const LOGITS: [f32; 10] = [1.2, -0.3, 2.0, 0.7, 1.9, -1.5, 0.0, 1.1, 2.3, -0.8];

#[test]
fn draws_follow_softmax_of_logits_over_temperature() {
    let params = SamplingParams {
        temperature: 0.7,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let c = counts(&LOGITS, &params, 20_000, 11);
    let (stat, df) = chi2(&c, &reference(&LOGITS, 0.7, 0, 1.0, 0.0));
    assert_eq!(df, 9);
    assert!(stat < chi2_critical_0_001(df), "chi2 {stat} with df {df}");

    // The test has teeth: the same draws are far from the T = 1 distribution.
    let (wrong, _) = chi2(&c, &reference(&LOGITS, 1.0, 0, 1.0, 0.0));
    assert!(
        wrong > 10.0 * chi2_critical_0_001(9),
        "chi2 vs T=1: {wrong}"
    );
}

#[test]
fn filtered_draws_follow_the_renormalized_kept_set() {
    for (t, k, p, mp) in [
        (1.0, 5, 1.0, 0.0),
        (0.8, 0, 0.7, 0.0),
        (1.3, 6, 0.9, 0.2),
        (1.0, 0, 1.0, 0.3),
    ] {
        let params = SamplingParams {
            temperature: t,
            top_k: k as i64,
            top_p: p,
            min_p: mp,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let want = reference(&LOGITS, t, k, p, mp);
        let c = counts(&LOGITS, &params, 20_000, 5);
        let (stat, df) = chi2(&c, &want);
        assert!(df >= 1, "{t} {k} {p} {mp}: only one token kept");
        assert!(
            stat < chi2_critical_0_001(df),
            "T {t} k {k} p {p} min_p {mp}: chi2 {stat}, df {df}"
        );
    }
}

#[test]
fn a_seed_reproduces_its_draws_and_other_seeds_differ() {
    let params = SamplingParams::default().validate().unwrap();
    let row = vec![0.0f32; 64];
    let run = |seed| {
        let mut rng = SequenceRng::from_seed(seed);
        (0..100)
            .map(|_| {
                Sampler::sample(&row, &params, &TokenHistory::default(), &[], &mut rng)
                    .unwrap()
                    .token_id
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    assert_ne!(run(0), run(1));
}

fn uniform_rows(steps: usize) -> Vec<Vec<f32>> {
    // Uniform over the first 200 ids (no special or rare effects: plain draws).
    (0..steps)
        .map(|_| {
            let mut row = vec![f32::NEG_INFINITY; VOCAB];
            row[10..210].iter_mut().for_each(|x| *x = 0.0);
            row
        })
        .collect()
}

#[test]
fn draws_do_not_depend_on_the_batch() {
    let steps = 12;
    let rows = uniform_rows(steps);
    let params = |seed| SamplingParams {
        seed,
        max_tokens: Some(steps as u32),
        ..Default::default()
    };
    // Alone.
    let mut alone = keyed_sequence(params(Some(5)), "가", &[], 0, 0);
    for row in &rows {
        alone.step(row).unwrap();
    }
    // In a batch with others, at another position, joining after a step of its own, and
    // with an unseeded neighbour.
    let mut a = keyed_sequence(params(Some(5)), "가", &[], 0, 0);
    let mut b = keyed_sequence(params(None), "나", &[], 3, 0);
    let mut c = keyed_sequence(params(Some(6)), "다", &[], 0, 0);
    a.step(&rows[0]).unwrap();
    for row in &rows[1..] {
        let flat: Vec<f32> = [row.clone(), row.clone(), row.clone()].concat();
        let mut batch = [&mut b, &mut c, &mut a];
        for r in step_batch(&mut batch, &flat, VOCAB).unwrap() {
            r.unwrap();
        }
    }
    assert_eq!(a.output_ids(), alone.output_ids());
    assert_ne!(a.output_ids(), c.output_ids());
    assert_ne!(a.output_ids(), b.output_ids());
}

#[test]
fn n_samples_are_independent_and_reproducible() {
    let steps = 20;
    let rows = uniform_rows(steps);
    for seed in [Some(123), None] {
        let run = || {
            (0..4u32)
                .map(|i| {
                    let p = SamplingParams {
                        n: 4,
                        seed,
                        max_tokens: Some(steps as u32),
                        ..Default::default()
                    };
                    let mut s = keyed_sequence(p, "보험", &[], 9, i);
                    for row in &rows {
                        s.step(row).unwrap();
                    }
                    s.output_ids().to_vec()
                })
                .collect::<Vec<_>>()
        };
        let outs = run();
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(
                    outs[i], outs[j],
                    "seed {seed:?}: samples {i} and {j} are equal"
                );
            }
        }
        assert_eq!(outs, run(), "seed {seed:?}: not reproducible");
    }

    // Across many samples of one request, first tokens are uniform (the per-sample seeds
    // s + i give unrelated streams).
    let params = SamplingParams {
        seed: Some(77),
        n: 2000,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let row = [0.0f32; 8];
    let mut c = vec![0u64; 8];
    let sampler = Sampler::new(0);
    for i in 0..2000 {
        let mut rng = sampler.rng_for(&params, 0, i);
        let t = Sampler::sample(&row, &params, &TokenHistory::default(), &[], &mut rng).unwrap();
        c[t.token_id as usize] += 1;
    }
    let (stat, df) = chi2(&c, &[0.125; 8]);
    assert!(stat < chi2_critical_0_001(df), "chi2 {stat}");
}
