//! The logistic function and its log, in forms that stay exact where they saturate.
//!
//! Every DPO loss is built from these. `log_sigmoid` is the form torch's `F.logsigmoid`
//! uses (`min(z, 0) − log1p(exp(−|z|))`), so neither overflows for large |z|.

/// σ(z) = 1 / (1 + e^−z), without overflow for negative z.
pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log σ(z).
pub(crate) fn log_sigmoid(z: f64) -> f64 {
    z.min(0.0) - (-z.abs()).exp().ln_1p()
}

/// σ'(z) = σ(z)·σ(−z), both factors computed directly: for large |z| the product stays
/// accurate where σ(z)·(1 − σ(z)) would round to zero.
pub(crate) fn sigmoid_slope(z: f64) -> f64 {
    sigmoid(z) * sigmoid(-z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_where_it_is_representable() {
        for &z in &[-5.0, -0.5, 0.0, 0.25, 3.0] {
            let naive = 1.0 / (1.0 + f64::exp(-z));
            assert!((sigmoid(z) - naive).abs() <= 1e-15 * naive, "{z}");
            assert!((log_sigmoid(z) - naive.ln()).abs() <= 1e-14 * naive.ln().abs().max(1e-300));
            let slope = naive * (1.0 - naive);
            assert!((sigmoid_slope(z) - slope).abs() <= 1e-14 * slope, "{z}");
        }
        // Far out, log σ(z) = −log(1 + e^−z) ≈ −e^−z, and log σ(−z) ≈ −z − e^−z.
        let tiny = (-30f64).exp();
        assert!((log_sigmoid(30.0) + tiny).abs() <= 1e-12 * tiny);
        assert_eq!(log_sigmoid(-30.0), -30.0 - tiny);
        assert!((sigmoid(-30.0) - tiny).abs() <= 1e-12 * tiny);
    }

    #[test]
    fn saturates_without_overflow() {
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(log_sigmoid(-1000.0), -1000.0);
        assert_eq!(log_sigmoid(1000.0), 0.0);
        // e^-40 is far below f64's resolution near 1, yet the slope keeps it.
        let s = sigmoid_slope(40.0);
        assert!((s - (-40.0f64).exp()).abs() < 1e-30, "{s}");
    }
}
