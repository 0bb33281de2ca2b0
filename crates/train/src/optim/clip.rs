//! Gradient clipping by the total L2 norm, as `torch.nn.utils.clip_grad_norm_` (torch 2.11)
//! does it: each gradient's norm in f32, the norm of those norms in f32, then every gradient
//! multiplied by `min(1, max_norm · (1 / (norm + 1e-6)))` (`max_norm / tensor` is a reciprocal
//! and a multiply in torch). Sums of squares are accumulated in f64 here, so each norm is the
//! correctly rounded f32 of the exact value; torch's f32 reductions land within an ulp or so.
//!
//! Non-finite gradients are not an error here (torch's default `error_if_nonfinite=False`):
//! the norm comes back NaN or infinite, and the trainer decides.

/// The L2 norm of all gradients viewed as one vector (what TRL logs as `grad_norm` when
/// clipping is off).
pub fn grad_norm(grads: &[&[f32]]) -> f32 {
    let per_tensor_sq: f64 = grads
        .iter()
        .map(|g| {
            let norm = sum_of_squares(g).sqrt() as f32;
            (norm as f64) * (norm as f64)
        })
        .sum();
    per_tensor_sq.sqrt() as f32
}

/// Scales the gradients so that their total L2 norm is at most `max_norm` and returns the
/// norm before clipping. `max_norm = inf` only measures.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f32 {
    let norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        grad_norm(&views)
    };
    let coef = clip_coefficient(norm, max_norm);
    // Multiplying by exactly 1 changes nothing; torch multiplies anyway (no host sync).
    if coef != 1.0 {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    norm
}

/// `clamp(max_norm / (norm + 1e-6), max=1)` with torch's f32 rounding.
fn clip_coefficient(norm: f32, max_norm: f64) -> f32 {
    let coef = (1.0 / (norm + 1e-6f32)) * max_norm as f32;
    // torch.clamp(max=1.0) keeps NaN.
    if coef > 1.0 { 1.0 } else { coef }
}

fn sum_of_squares(g: &[f32]) -> f64 {
    g.iter().map(|&x| (x as f64) * (x as f64)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_is_over_all_tensors_together() {
        assert_eq!(grad_norm(&[&[3.0], &[4.0]]), 5.0);
        assert_eq!(grad_norm(&[&[1.0, 2.0, 2.0], &[]]), 3.0);
        assert_eq!(grad_norm(&[]), 0.0);
    }

    #[test]
    fn clipping_scales_by_max_norm_over_norm_plus_1e6() {
        let (mut a, mut b) = (vec![3.0f32, 0.0], vec![4.0f32]);
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert_eq!(norm, 5.0);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-7, "{a:?}");
        assert!((b[0] as f64 - 4.0 * coef).abs() < 1e-7, "{b:?}");
        assert_eq!(a[1], 0.0);
        let clipped = grad_norm(&[&a, &b]);
        assert!(clipped <= 1.0 && clipped > 0.99999, "{clipped}");
    }

    #[test]
    fn small_gradients_and_infinite_max_norm_are_left_alone() {
        let mut a = vec![0.3f32, -0.4];
        assert_eq!(clip_grad_norm(&mut [&mut a[..]], 1.0), 0.5);
        assert_eq!(a, [0.3, -0.4]);
        let mut big = vec![300.0f32, -400.0];
        assert_eq!(clip_grad_norm(&mut [&mut big[..]], f64::INFINITY), 500.0);
        assert_eq!(big, [300.0, -400.0]);
    }

    #[test]
    fn non_finite_gradients_give_a_non_finite_norm() {
        let mut a = [f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut [&mut a[..]], 1.0).is_nan());
        let mut b = [f32::INFINITY];
        assert!(clip_grad_norm(&mut [&mut b[..]], 1.0).is_infinite());
    }
}
