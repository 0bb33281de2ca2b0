//! The LoRA forward and backward on the CPU against PEFT 0.21 + transformers 5.17 in float64,
//! on every fixture model (fixtures/train/lora_grads, tools/gen_lora_grad_fixtures.py).
//!
//! Each case: an adapter on all nine modules (r 4, alpha 8, random A and B), three sequences
//! packed into one batch, a few scored rows per sequence. Checked:
//! - log-probs with the adapter, and with it disabled (DPO's reference pass), within 1e-4;
//! - the gradient of Σ w_i · log p_i with respect to every LoRA tensor: per tensor,
//!   max |ours − PEFT| ≤ 1e-4 · max |PEFT| + 1e-5 (measured: ≤ 6e-6 relative) (our CPU is f32, the reference f64; the
//!   bound is relative to the tensor's largest entry because f32 round-off in a sum scales
//!   with the sum's terms, not with its possibly cancelling result).

mod common;

use std::path::Path;

use common::{Case, case_dirs, f64s, load_case, peft_key};
use engine::Device;
use model::{Checkpointing, Dropout, Lora};
use testkit::{fixtures_dir, read_safetensors_f32};

const LOGP_TOL: f64 = 1e-4;
const GRAD_REL: f32 = 1e-4;
const GRAD_ABS: f32 = 1e-5;

fn check_case(dir: &Path) {
    let Case {
        name,
        json: case,
        model,
        lora,
        batch,
    } = load_case(dir, 0.0, Device::Cpu);
    let (stats, tape) = model
        .lora_forward(&batch, Some(&lora), Dropout::Off)
        .unwrap();
    for (i, (got, want)) in stats.logp.iter().zip(f64s(&case["logprobs"])).enumerate() {
        assert!(
            (*got as f64 - want).abs() <= LOGP_TOL,
            "{name} row {i}: log p with the adapter {got}, PEFT {want}"
        );
    }
    let (reference, reference_tape) = model.lora_forward(&batch, None, Dropout::Off).unwrap();
    for (i, (got, want)) in reference
        .logp
        .iter()
        .zip(f64s(&case["reference_logprobs"]))
        .enumerate()
    {
        assert!(
            (*got as f64 - want).abs() <= LOGP_TOL,
            "{name} row {i}: log p with the adapter disabled {got}, PEFT {want}"
        );
    }

    let weights: Vec<f32> = f64s(&case["weights"]).iter().map(|&w| w as f32).collect();
    // The reference pass keeps nothing to back-propagate through: refused, not a panic.
    let err = model
        .lora_backward(
            &batch,
            &lora,
            reference_tape,
            &weights,
            &mut lora.zeros_like(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("without an adapter"), "{name}: {err}");
    let mut grads = lora.zeros_like();
    model
        .lora_backward(&batch, &lora, tape, &weights, &mut grads)
        .unwrap();
    // Keeping the forward's activations instead of recomputing them changes nothing.
    let (_, kept) = model
        .lora_forward_with(&batch, Some(&lora), Dropout::Off, Checkpointing::Keep)
        .unwrap();
    let mut kept_grads = lora.zeros_like();
    model
        .lora_backward(&batch, &lora, kept, &weights, &mut kept_grads)
        .unwrap();
    for ((_, t, a), (_, _, b)) in grads.pairs().into_iter().zip(kept_grads.pairs()) {
        assert_eq!(a.a.to_vec().unwrap(), b.a.to_vec().unwrap(), "{name} {t} A");
        assert_eq!(a.b.to_vec().unwrap(), b.b.to_vec().unwrap(), "{name} {t} B");
    }
    let want = read_safetensors_f32(&dir.join("grads.safetensors"));
    let mut worst = 0.0f32;
    for (layer, t, pair) in grads.pairs() {
        for (a, got) in [(true, &pair.a), (false, &pair.b)] {
            let key = peft_key(layer, t, a);
            let (_, want) = &want[&key];
            let got = got.to_vec().unwrap();
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(want)
                .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
            worst = worst.max(err / scale.max(1e-30));
            assert!(
                err <= GRAD_REL * scale + GRAD_ABS,
                "{name} {key}: max |ours − PEFT| {err:.3e}, PEFT's largest {scale:.3e}"
            );
        }
    }
    println!("{name}: log-probs within {LOGP_TOL}, gradients worst relative error {worst:.2e}");
}

#[test]
fn lora_forward_and_gradients_match_peft() {
    for dir in case_dirs() {
        check_case(&dir);
    }
}

/// With dropout on, the gradient is that of the loss under the step's fixed masks: checked
/// against central finite differences of the forward (same masks, f32, step 1e-2 — hence
/// the loose bound: 3e-2 · max(1, |g|)) on a few entries of every pair of one model, and
/// the masks are a function of (seed, step): the same step gives the same log-probs, another
/// step different ones.
#[test]
fn dropout_gradients_are_those_of_the_masked_forward() {
    let dir = fixtures_dir()
        .join("train")
        .join("lora_grads")
        .join("llama-tiny");
    let Case {
        model,
        lora,
        batch,
        json,
        ..
    } = load_case(&dir, 0.3, Device::Cpu);
    let weights: Vec<f32> = f64s(&json["weights"]).iter().map(|&w| w as f32).collect();
    let dropout = Dropout::On {
        p: 0.3,
        seed: 7,
        step: 3,
    };
    let loss = |lora: &Lora, dropout: Dropout| -> f64 {
        let (stats, _) = model.lora_forward(&batch, Some(lora), dropout).unwrap();
        stats
            .logp
            .iter()
            .zip(&weights)
            .map(|(l, w)| *l as f64 * *w as f64)
            .sum()
    };
    let base = loss(&lora, dropout);
    assert_eq!(base, loss(&lora, dropout), "same step, same masks");
    let other = Dropout::On {
        p: 0.3,
        seed: 7,
        step: 4,
    };
    assert_ne!(base, loss(&lora, other), "another step draws other masks");
    assert_ne!(
        base,
        loss(&lora, Dropout::Off),
        "dropout changes the forward"
    );

    let (_, tape) = model.lora_forward(&batch, Some(&lora), dropout).unwrap();
    let mut grads = lora.zeros_like();
    model
        .lora_backward(&batch, &lora, tape, &weights, &mut grads)
        .unwrap();
    let grad_pairs = grads.pairs();
    let n_pairs = grad_pairs.len();
    for (p, (layer, target, g)) in grad_pairs.into_iter().enumerate() {
        for (which, g) in [(0, &g.a), (1, &g.b)] {
            let g = g.to_vec().unwrap();
            // The entry with the largest gradient, where the finite difference is informative.
            let (idx, &want) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-2f32;
            let shifted = |delta: f32| {
                let mut l = lora.clone();
                let (_, _, pair) = &mut l.pairs_mut()[p];
                let t = if which == 0 { &mut pair.a } else { &mut pair.b };
                t.as_mut_slice().unwrap()[idx] += delta;
                loss(&l, dropout)
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - want as f64).abs() <= 3e-2 * (want.abs() as f64).max(1.0),
                "{target} (layer {layer:?}) {} [{idx}]: backward {want}, finite difference {fd}",
                if which == 0 { "A" } else { "B" }
            );
        }
    }
    assert!(n_pairs >= 9, "every module of the adapter was checked");
}
