//! f-DPO scores: what each f-divergence makes of a sequence's log-ratio
//! log π(y|x) − log π_ref(y|x), and the score's derivative.
//!
//! The score is f'(t) at t = π/π_ref for the divergence's generator f (TRL's
//! `chosen_scores` / `rejected_scores`); reverse KL gives the log-ratio itself (plain DPO).

use super::logistic::{log_sigmoid, sigmoid};
use super::options::FDivergence;

/// TRL clamps (α − 1)·log-ratio at this before `exp` (its value for float32 and bfloat16).
const ALPHA_EXP_CLAMP: f64 = 80.0;

/// Below this distance from 1, TRL treats α as 1: the limit f'(t) → log t, reverse KL.
const ALPHA_ONE_EPS: f64 = 1e-6;

/// A divergence with its α (read only by `AlphaDivergence`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Divergence {
    pub kind: FDivergence,
    pub alpha: f64,
}

impl Divergence {
    /// (score, d score / d log-ratio) at log-ratio `x`.
    pub(crate) fn score(&self, x: f64) -> (f64, f64) {
        match self.kind {
            FDivergence::ReverseKl => (x, 1.0),
            // f'(t) = 1 − 1/t
            FDivergence::ForwardKl => {
                let e = (-x).exp();
                (1.0 - e, e)
            }
            // f'(t) = log(2t / (t + 1)) = log 2 + log σ(log t)
            FDivergence::JsDivergence => (std::f64::consts::LN_2 + log_sigmoid(x), sigmoid(-x)),
            // f'(t) = (t^(α−1) − 1) / (α − 1)
            FDivergence::AlphaDivergence => {
                let a1 = self.alpha - 1.0;
                if a1.abs() < ALPHA_ONE_EPS {
                    return (x, 1.0);
                }
                let coef = 1.0 / a1;
                let t = a1 * x;
                // Past the clamp the score is constant: no gradient (torch's clamp passes
                // the gradient where t ≤ max).
                let e = t.min(ALPHA_EXP_CLAMP).exp();
                let slope = if t <= ALPHA_EXP_CLAMP {
                    e * a1 * coef
                } else {
                    0.0
                };
                ((e - 1.0) * coef, slope)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn div(kind: FDivergence, alpha: f64) -> Divergence {
        Divergence { kind, alpha }
    }

    #[test]
    fn scores_are_the_generators_derivative_at_the_ratio() {
        for &x in &[-3.0, -0.2, 0.0, 0.7, 2.5] {
            let t: f64 = f64::exp(x);
            let cases = [
                (div(FDivergence::ReverseKl, 0.5), t.ln()),
                (div(FDivergence::ForwardKl, 0.5), 1.0 - 1.0 / t),
                (
                    div(FDivergence::JsDivergence, 0.5),
                    (2.0 * t / (t + 1.0)).ln(),
                ),
                (
                    div(FDivergence::AlphaDivergence, 0.5),
                    (t.powf(-0.5) - 1.0) / -0.5,
                ),
                (div(FDivergence::AlphaDivergence, 2.0), t - 1.0),
                (div(FDivergence::AlphaDivergence, 1.0 + 1e-7), t.ln()),
            ];
            for (d, want) in cases {
                let (s, _) = d.score(x);
                assert!(
                    (s - want).abs() < 1e-12 * (1.0 + want.abs()),
                    "{d:?} {x}: {s} {want}"
                );
            }
        }
    }

    #[test]
    fn slopes_match_central_differences() {
        let h = 1e-6;
        for kind in FDivergence::ALL {
            for &alpha in &[0.5, 1.0, 3.0] {
                let d = div(kind, alpha);
                for &x in &[-2.0, -0.1, 0.4, 1.9] {
                    let fd = (d.score(x + h).0 - d.score(x - h).0) / (2.0 * h);
                    let (_, slope) = d.score(x);
                    assert!((fd - slope).abs() < 1e-7 * (1.0 + slope.abs()), "{d:?} {x}");
                }
            }
        }
    }

    #[test]
    fn alpha_clamps_the_exponent_and_stops_the_gradient() {
        let d = div(FDivergence::AlphaDivergence, 3.0);
        // (α − 1)·x = 90 > 80
        let (s, slope) = d.score(45.0);
        assert_eq!(s, (80f64.exp() - 1.0) * 0.5);
        assert_eq!(slope, 0.0);
        let (_, slope) = d.score(39.0);
        assert!(slope > 0.0);
    }
}
