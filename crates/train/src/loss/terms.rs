//! Each DPO loss type on its own: the loss TRL 1.16's `_compute_loss` computes and its
//! derivatives, worked out by hand.
//!
//! Notation (per pair): lr = log π − log π_ref of the chosen (c) and rejected (r) sequence,
//! s = the f-divergence score of lr (s = lr for reverse KL) with slope s' = ds/dlr,
//! Δ = s_c − s_r, β = `beta`, ε = `label_smoothing`, n = completion tokens (at least 1).
//! Derivatives are returned with respect to lr_c and lr_r, i.e. the policy's log-prob sums
//! (the reference is a constant).
//!
//! `aot` and `aot_unpaired` compare sorted batches: the loss at sorted position k belongs to
//! whichever pair sorted there, so the gradient flows back through the permutation.

use super::logistic::{log_sigmoid, sigmoid, sigmoid_slope};
use super::options::LossType;

/// The options the loss formulas read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    pub beta: f64,
    pub label_smoothing: f64,
    pub discopop_tau: f64,
}

/// One pair as the per-pair losses see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PairView {
    pub lr_c: f64,
    pub lr_r: f64,
    pub s_c: f64,
    pub s_r: f64,
    /// ds/dlr of each score.
    pub ds_c: f64,
    pub ds_r: f64,
    /// Completion tokens, clamped to at least 1 (TRL's `clamp(min=1.0)`).
    pub n_c: f64,
    pub n_r: f64,
}

/// A per-pair loss value and its derivatives with respect to lr_c and lr_r.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PairTerm {
    pub loss: f64,
    pub d_c: f64,
    pub d_r: f64,
}

impl PairTerm {
    /// A loss of the score difference Δ, given ℓ and dℓ/dΔ.
    fn of_delta(p: &PairView, loss: f64, d_delta: f64) -> PairTerm {
        PairTerm {
            loss,
            d_c: d_delta * p.ds_c,
            d_r: -d_delta * p.ds_r,
        }
    }

    /// A loss of the two scores, given ℓ, dℓ/ds_c and dℓ/ds_r.
    fn of_scores(p: &PairView, loss: f64, d_sc: f64, d_sr: f64) -> PairTerm {
        PairTerm {
            loss,
            d_c: d_sc * p.ds_c,
            d_r: d_sr * p.ds_r,
        }
    }
}

/// The per-pair loss of type `t`. `None` for the types that need the whole batch
/// (`aot`, `aot_unpaired`, `sft`).
pub(crate) fn pair_term(t: LossType, p: &PairView, k: &Params) -> Option<PairTerm> {
    let beta = k.beta;
    let ls = k.label_smoothing;
    let delta = p.s_c - p.s_r;
    let term = match t {
        // ℓ = −log σ(βΔ)
        LossType::Sigmoid => {
            let z = beta * delta;
            PairTerm::of_delta(p, -log_sigmoid(z), -beta * sigmoid(-z))
        }
        // ℓ = relu(1 − βΔ); torch's relu has slope 0 at the kink.
        LossType::Hinge => {
            let m = 1.0 - beta * delta;
            let slope = if m > 0.0 { -beta } else { 0.0 };
            PairTerm::of_delta(p, m.max(0.0), slope)
        }
        // ℓ = (s_c/n_c − s_r/n_r − 1/(2β))²: IPO on per-token averages.
        LossType::Ipo => {
            let m = (p.s_c / p.n_c - p.s_r / p.n_r) - 1.0 / (2.0 * beta);
            PairTerm::of_scores(p, m * m, 2.0 * m / p.n_c, -2.0 * m / p.n_r)
        }
        // EXO: ℓ = q(z)·(log q(z) − log(1−ε)) + q(−z)·(log q(−z) − log ε), q = σ, z = βΔ;
        // dℓ/dz = σ(z)σ(−z)·(z − log(1−ε) + log ε).
        LossType::ExoPair => {
            let z = beta * delta;
            let log_pw = (-ls).ln_1p();
            let log_pl = ls.ln();
            let loss =
                sigmoid(z) * (log_sigmoid(z) - log_pw) + sigmoid(-z) * (log_sigmoid(-z) - log_pl);
            let d = sigmoid_slope(z) * (z - log_pw + log_pl);
            PairTerm::of_delta(p, loss, beta * d)
        }
        // ℓ = −log σ(βlr_c) − ½ log σ(−βlr_c) − ½ log σ(−βlr_r)
        LossType::NcaPair => {
            let (rc, rr) = (beta * p.lr_c, beta * p.lr_r);
            PairTerm {
                loss: -log_sigmoid(rc) - 0.5 * log_sigmoid(-rc) - 0.5 * log_sigmoid(-rr),
                d_c: beta * (-sigmoid(-rc) + 0.5 * sigmoid(rc)),
                d_r: beta * 0.5 * sigmoid(rr),
            }
        }
        // ℓ = (−(1−ε) log σ(z) + ε log σ(−z)) / (1 − 2ε), z = βΔ
        LossType::Robust => {
            let z = beta * delta;
            let clean = -(1.0 - ls) * log_sigmoid(z);
            let flipped = -ls * log_sigmoid(-z);
            let d = (-(1.0 - ls) * sigmoid(-z) - ls * sigmoid(z)) / (1.0 - 2.0 * ls);
            PairTerm::of_delta(p, (clean - flipped) / (1.0 - 2.0 * ls), beta * d)
        }
        // ℓ = −log σ(βlr_c) − log σ(−βlr_r)
        LossType::BcoPair => {
            let (rc, rr) = (beta * p.lr_c, beta * p.lr_r);
            PairTerm {
                loss: -log_sigmoid(rc) - log_sigmoid(-rr),
                d_c: -beta * sigmoid(-rc),
                d_r: beta * sigmoid(rr),
            }
        }
        // ℓ = (lr_c − 1/(2β))² + (lr_r + 1/(2β))²
        LossType::SppoHard => {
            let w = p.lr_c - 0.5 / beta;
            let l = p.lr_r + 0.5 / beta;
            PairTerm {
                loss: w * w + l * l,
                d_c: 2.0 * w,
                d_r: 2.0 * l,
            }
        }
        // APO-zero: ℓ = 1 − σ(βlr_c) + σ(βlr_r)
        LossType::ApoZero => {
            let (rc, rr) = (beta * p.lr_c, beta * p.lr_r);
            PairTerm {
                loss: (1.0 - sigmoid(rc)) + sigmoid(rr),
                d_c: -beta * sigmoid_slope(rc),
                d_r: beta * sigmoid_slope(rr),
            }
        }
        // APO-down: ℓ = σ(βlr_c) + 1 − σ(β(lr_c − lr_r))
        LossType::ApoDown => {
            let rc = beta * p.lr_c;
            let u = beta * (p.lr_c - p.lr_r);
            PairTerm {
                loss: sigmoid(rc) + (1.0 - sigmoid(u)),
                d_c: beta * sigmoid_slope(rc) - beta * sigmoid_slope(u),
                d_r: beta * sigmoid_slope(u),
            }
        }
        // DiscoPOP: ℓ = −log σ(z)·(1 − m) + e^−z·m, m = σ(z/τ), z = βΔ
        LossType::Discopop => {
            let z = delta * beta;
            let tau = k.discopop_tau;
            let m = sigmoid(z / tau);
            let dm = sigmoid_slope(z / tau) / tau;
            let logistic = -log_sigmoid(z);
            let exp = (-z).exp();
            let loss = logistic * (1.0 - m) + exp * m;
            let d = -sigmoid(-z) * (1.0 - m) - logistic * dm - exp * m + exp * dm;
            PairTerm::of_delta(p, loss, beta * d)
        }
        // ℓ = −log σ(β(s_c/n_c − s_r/n_r))
        LossType::SigmoidNorm => {
            let z = beta * (p.s_c / p.n_c - p.s_r / p.n_r);
            let d = -beta * sigmoid(-z);
            PairTerm::of_scores(p, -log_sigmoid(z), d / p.n_c, -d / p.n_r)
        }
        LossType::Aot | LossType::AotUnpaired | LossType::Sft => return None,
    };
    Some(term)
}

/// The smoothed logistic loss both AOT variants apply at each sorted position:
/// ℓ(δ) = −log σ(βδ)(1 − ε) − log σ(−βδ)ε, with dℓ/dδ.
fn aot_position(delta: f64, k: &Params) -> (f64, f64) {
    let z = k.beta * delta;
    let ls = k.label_smoothing;
    let loss = -log_sigmoid(z) * (1.0 - ls) - log_sigmoid(-z) * ls;
    let d = k.beta * (-sigmoid(-z) * (1.0 - ls) + sigmoid(z) * ls);
    (loss, d)
}

/// Indices of `v` in ascending order of value (stable: equal values keep their order).
fn argsort(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx
}

/// A batch-wide loss: the mean over positions and the gradient of that mean with respect
/// to each pair's policy log-prob sums.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BatchTerm {
    pub mean: f64,
    pub d_c: Vec<f64>, // [N]
    pub d_r: Vec<f64>, // [N]
}

/// AOT (paired): sort the policy's chosen − rejected log-ratio and the reference's
/// separately, compare position by position.
///
/// `x_c`, `x_r`, `ref_c`, `ref_r`: [N] summed log-probs.
pub(crate) fn aot(x_c: &[f64], x_r: &[f64], ref_c: &[f64], ref_r: &[f64], k: &Params) -> BatchTerm {
    let policy: Vec<f64> = x_c.iter().zip(x_r).map(|(c, r)| c - r).collect();
    let reference: Vec<f64> = ref_c.iter().zip(ref_r).map(|(c, r)| c - r).collect();
    let (pi, ri) = (argsort(&policy), argsort(&reference));
    // The pair sorted at `pos` owns this position's gradient, on both of its sides.
    aot_sorted((&policy, &pi), (&reference, &ri), &pi, k)
}

/// AOT (unpaired): sort the chosen log-ratios and the rejected log-ratios separately and
/// compare position by position.
///
/// `lr_c`, `lr_r`: [N] log-ratios.
pub(crate) fn aot_unpaired(lr_c: &[f64], lr_r: &[f64], k: &Params) -> BatchTerm {
    let (ci, ri) = (argsort(lr_c), argsort(lr_r));
    aot_sorted((lr_c, &ci), (lr_r, &ri), &ri, k)
}

/// The AOT loss of two sequences compared in sorted order: position `pos` scores
/// `a[ai[pos]] − b[bi[pos]]`, and its gradient goes to the chosen side of pair `ai[pos]`
/// and the rejected side of pair `rejected_owner[pos]`. `a`, `b`: [N]; the orders are
/// permutations of 0..N.
fn aot_sorted(
    (a, ai): (&[f64], &[usize]),
    (b, bi): (&[f64], &[usize]),
    rejected_owner: &[usize],
    k: &Params,
) -> BatchTerm {
    let n = a.len();
    let mut t = BatchTerm {
        mean: 0.0,
        d_c: vec![0.0; n],
        d_r: vec![0.0; n],
    };
    let mut sum = 0.0;
    for pos in 0..n {
        let (loss, d) = aot_position(a[ai[pos]] - b[bi[pos]], k);
        sum += loss;
        t.d_c[ai[pos]] = d / n as f64;
        t.d_r[rejected_owner[pos]] = -d / n as f64;
    }
    t.mean = sum / n as f64;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: Params = Params {
        beta: 0.7,
        label_smoothing: 0.15,
        discopop_tau: 0.3,
    };

    /// A pair under a made-up, non-trivial score map s = 0.5·lr + 0.1·lr² (slope 0.5 + 0.2·lr),
    /// so the tests see the chain through the score.
    fn view(lr_c: f64, lr_r: f64, n_c: f64, n_r: f64) -> PairView {
        let s = |x: f64| 0.5 * x + 0.1 * x * x;
        let ds = |x: f64| 0.5 + 0.2 * x;
        PairView {
            lr_c,
            lr_r,
            s_c: s(lr_c),
            s_r: s(lr_r),
            ds_c: ds(lr_c),
            ds_r: ds(lr_r),
            n_c,
            n_r,
        }
    }

    /// Each per-pair type's derivatives against central differences (points away from
    /// hinge's kink), through the score map.
    #[test]
    fn pair_derivatives_match_finite_differences() {
        let h = 1e-6;
        let points = [(0.3, -0.4), (-1.2, 0.9), (2.5, 2.0), (-0.05, -3.0)];
        for t in LossType::ALL {
            for &(c, r) in &points {
                let Some(term) = pair_term(t, &view(c, r, 3.0, 5.0), &PARAMS) else {
                    continue;
                };
                let at = |c, r| pair_term(t, &view(c, r, 3.0, 5.0), &PARAMS).unwrap().loss;
                let fd_c = (at(c + h, r) - at(c - h, r)) / (2.0 * h);
                let fd_r = (at(c, r + h) - at(c, r - h)) / (2.0 * h);
                let tol = |g: f64| 1e-6 * (1.0 + g.abs());
                assert!(
                    (fd_c - term.d_c).abs() < tol(fd_c),
                    "{t} d_c at {c},{r}: {} vs {fd_c}",
                    term.d_c
                );
                assert!(
                    (fd_r - term.d_r).abs() < tol(fd_r),
                    "{t} d_r at {c},{r}: {} vs {fd_r}",
                    term.d_r
                );
            }
        }
    }

    #[test]
    fn losses_match_their_formulas_at_a_point() {
        // Reverse KL (s = lr), computed from the textbook definitions.
        let (c, r, b) = (0.8f64, -0.3f64, PARAMS.beta);
        let p = PairView {
            lr_c: c,
            lr_r: r,
            s_c: c,
            s_r: r,
            ds_c: 1.0,
            ds_r: 1.0,
            n_c: 4.0,
            n_r: 2.0,
        };
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let z = b * (c - r);
        let want = [
            (LossType::Sigmoid, -sig(z).ln()),
            (LossType::Hinge, (1.0 - z).max(0.0)),
            (LossType::Ipo, (c / 4.0 - r / 2.0 - 1.0 / (2.0 * b)).powi(2)),
            (LossType::BcoPair, -sig(b * c).ln() - sig(-b * r).ln()),
            (
                LossType::SppoHard,
                (c - 0.5 / b).powi(2) + (r + 0.5 / b).powi(2),
            ),
            (LossType::ApoZero, 1.0 - sig(b * c) + sig(b * r)),
            (LossType::ApoDown, sig(b * c) + 1.0 - sig(z)),
            (LossType::SigmoidNorm, -sig(b * (c / 4.0 - r / 2.0)).ln()),
            (
                LossType::NcaPair,
                -sig(b * c).ln() - 0.5 * sig(-b * c).ln() - 0.5 * sig(-b * r).ln(),
            ),
        ];
        for (t, w) in want {
            let got = pair_term(t, &p, &PARAMS).unwrap().loss;
            assert!((got - w).abs() < 1e-14, "{t}: {got} vs {w}");
        }
        // EXO is the KL divergence between {σ(z), σ(−z)} and {1−ε, ε}.
        let e = PARAMS.label_smoothing;
        let (q1, q2) = (sig(z), sig(-z));
        let kl = q1 * (q1 / (1.0 - e)).ln() + q2 * (q2 / e).ln();
        let got = pair_term(LossType::ExoPair, &p, &PARAMS).unwrap().loss;
        assert!((got - kl).abs() < 1e-14, "{got} vs {kl}");
        // Robust with ε = 0 is sigmoid.
        let k0 = Params {
            label_smoothing: 0.0,
            ..PARAMS
        };
        let robust = pair_term(LossType::Robust, &p, &k0).unwrap();
        let sigmoid = pair_term(LossType::Sigmoid, &p, &k0).unwrap();
        assert_eq!(robust, sigmoid);
    }

    #[test]
    fn hinge_is_flat_past_the_margin() {
        let p = view(10.0, -10.0, 1.0, 1.0);
        let t = pair_term(LossType::Hinge, &p, &PARAMS).unwrap();
        assert_eq!((t.loss, t.d_c, t.d_r), (0.0, 0.0, 0.0));
    }

    /// Reverse KL: the scores are the log-ratios.
    fn plain(lr_c: f64, lr_r: f64) -> PairView {
        PairView {
            lr_c,
            lr_r,
            s_c: lr_c,
            s_r: lr_r,
            ds_c: 1.0,
            ds_r: 1.0,
            n_c: 1.0,
            n_r: 1.0,
        }
    }

    #[test]
    fn saturated_losses_keep_their_tails() {
        // βΔ = 0.7 · 60 = 42: the loss is e^−42, not a rounded 0; the gradient likewise.
        let t = pair_term(LossType::Sigmoid, &plain(30.0, -30.0), &PARAMS).unwrap();
        let tail = (-42f64).exp();
        assert!((t.loss - tail).abs() < 1e-12 * tail, "{t:?}");
        assert!((t.d_c + 0.7 * tail).abs() < 1e-12 * tail, "{t:?}");
        // The other way round the loss is large, finite, and its slope is −β.
        let t = pair_term(LossType::Sigmoid, &plain(-300.0, 300.0), &PARAMS).unwrap();
        assert!((t.loss - 420.0).abs() < 1e-9 && t.d_c == -0.7, "{t:?}");
        // BCO and APO use the log-ratios themselves.
        let t = pair_term(LossType::ApoZero, &plain(60.0, -60.0), &PARAMS).unwrap();
        assert!(t.d_c < 0.0 && t.d_c > -1e-15 && t.d_r > 0.0, "{t:?}");
    }

    /// Sorting makes the batch loss piecewise smooth: central differences per input, at a
    /// point without ties, match the gradient routed through the permutation.
    #[test]
    fn aot_gradients_flow_through_the_sort() {
        // No ties among the ratios, their differences or the log-ratios.
        let x_c = [-3.0, -7.5, -1.25, -4.0];
        let x_r = [-2.0, -9.0, -6.5, -3.75];
        let ref_c = [-2.5, -8.1, -2.0, -4.7];
        let ref_r = [-2.25, -8.5, -5.0, -3.3];
        let h = 1e-6;
        let t = aot(&x_c, &x_r, &ref_c, &ref_r, &PARAMS);
        for i in 0..4 {
            let bump = |v: &[f64], d: f64| {
                let mut v = v.to_vec();
                v[i] += d;
                v
            };
            let fd_c = (aot(&bump(&x_c, h), &x_r, &ref_c, &ref_r, &PARAMS).mean
                - aot(&bump(&x_c, -h), &x_r, &ref_c, &ref_r, &PARAMS).mean)
                / (2.0 * h);
            let fd_r = (aot(&x_c, &bump(&x_r, h), &ref_c, &ref_r, &PARAMS).mean
                - aot(&x_c, &bump(&x_r, -h), &ref_c, &ref_r, &PARAMS).mean)
                / (2.0 * h);
            assert!((fd_c - t.d_c[i]).abs() < 1e-8, "aot d_c[{i}]");
            assert!((fd_r - t.d_r[i]).abs() < 1e-8, "aot d_r[{i}]");
        }
        let lr_c: Vec<f64> = x_c.iter().zip(&ref_c).map(|(a, b)| a - b).collect();
        let lr_r: Vec<f64> = x_r.iter().zip(&ref_r).map(|(a, b)| a - b).collect();
        let t = aot_unpaired(&lr_c, &lr_r, &PARAMS);
        for i in 0..4 {
            let bump = |v: &[f64], d: f64| {
                let mut v = v.to_vec();
                v[i] += d;
                v
            };
            let fd_c = (aot_unpaired(&bump(&lr_c, h), &lr_r, &PARAMS).mean
                - aot_unpaired(&bump(&lr_c, -h), &lr_r, &PARAMS).mean)
                / (2.0 * h);
            let fd_r = (aot_unpaired(&lr_c, &bump(&lr_r, h), &PARAMS).mean
                - aot_unpaired(&lr_c, &bump(&lr_r, -h), &PARAMS).mean)
                / (2.0 * h);
            assert!((fd_c - t.d_c[i]).abs() < 1e-8, "aot_unpaired d_c[{i}]");
            assert!((fd_r - t.d_r[i]).abs() < 1e-8, "aot_unpaired d_r[{i}]");
        }
    }

    #[test]
    fn aot_compares_sorted_positions_not_pairs() {
        // Policy ratios [3, 1], reference [0, 2]: sorted [1, 3] vs [0, 2] → δ = 1 at both.
        let k = Params {
            beta: 1.0,
            label_smoothing: 0.0,
            discopop_tau: 1.0,
        };
        let t = aot(&[3.0, 1.0], &[0.0, 0.0], &[0.0, 2.0], &[0.0, 0.0], &k);
        let want = -log_sigmoid(1.0);
        assert!((t.mean - want).abs() < 1e-15);
    }
}
