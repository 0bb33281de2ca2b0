//! The LoRA forward and backward on a GPU (bf16 weights, activations and adapter copy; f32
//! gradients) against the same on the CPU (f32, itself equal to PEFT's autograd in f64 within
//! 6e-6: lora_grads.rs), on every fixture case of fixtures/train/lora_grads.
//!
//! Tolerances. bf16 moves these peaked fixtures' log-probs by hundredths (docs/precision.md:
//! up to 0.35 for transformers' own bf16 on llama-tiny), so the log-probs are bounded by the
//! same kind of bound as the GPU forward's tests: mean ≤ 0.1, max ≤ 0.5. Gradients are sums
//! over every token of products of those activations; each tensor must point the same way as
//! the CPU's (cosine ≥ [`MIN_COSINE`]) with a norm within [`NORM_REL`] of it. Dropout masks are
//! the same bits on both devices, so the check holds with dropout on too. Measured on the
//! H200 (2026-11-28): worst cosine 0.9968 (llama-tiny), worst norm error 4.1e-2
//! (mistral-tiny), log-probs mean ≤ 5.6e-2 and max ≤ 2.0e-1.
//!
//! Needs a GPU: `#[ignore = "needs a CUDA GPU"]`; run the built binary from the repository
//! root with `--include-ignored --nocapture`.

mod common;

use common::{Case, case_dirs, load_case};
use engine::Device;
use model::{Dropout, Lora};

const GPU: Device = Device::Cuda(0);
const LOGP_MEAN: f64 = 0.1;
const LOGP_MAX: f64 = 0.5;
const MIN_COSINE: f64 = 0.99;
const NORM_REL: f64 = 0.08;

fn grads(case: &Case, lora: &Lora, dropout: Dropout) -> (Vec<f32>, Lora) {
    let device = case.model.device();
    let compute = lora.to_device(device).unwrap();
    let (stats, tape) = case
        .model
        .lora_forward(&case.batch, Some(&compute), dropout)
        .unwrap();
    let weights: Vec<f32> = common::f64s(&case.json["weights"])
        .iter()
        .map(|&w| w as f32)
        .collect();
    let mut g = lora.zeros_on(device).unwrap();
    case.model
        .lora_backward(&case.batch, &compute, tape, &weights, &mut g)
        .unwrap();
    (stats.logp, g.to_device(Device::Cpu).unwrap())
}

fn compare(name: &str, dropout: Dropout) {
    let dir = case_dirs()
        .into_iter()
        .find(|d| d.ends_with(name))
        .unwrap_or_else(|| panic!("no case {name}"));
    let p = match dropout {
        Dropout::On { p, .. } => p,
        Dropout::Off => 0.0,
    };
    let cpu = load_case(&dir, p, Device::Cpu);
    let gpu = load_case(&dir, p, GPU);
    let (lp_cpu, g_cpu) = grads(&cpu, &cpu.lora, dropout);
    let (lp_gpu, g_gpu) = grads(&gpu, &cpu.lora, dropout);
    let errs: Vec<f64> = lp_cpu
        .iter()
        .zip(&lp_gpu)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .collect();
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    let max = errs.iter().cloned().fold(0.0, f64::max);
    let (mut worst_cos, mut worst_norm) = (1.0f64, 0.0f64);
    for ((layer, t, a), (_, _, b)) in g_cpu.pairs().into_iter().zip(g_gpu.pairs()) {
        for (which, x, y) in [("A", &a.a, &b.a), ("B", &a.b, &b.b)] {
            let (x, y) = (x.to_vec().unwrap(), y.to_vec().unwrap());
            let dot: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            let nx = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let ny = y.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            if nx == 0.0 {
                assert_eq!(ny, 0.0, "{name} {t} {layer:?} {which}: CPU zero, GPU not");
                continue;
            }
            let cos = dot / (nx * ny).max(1e-300);
            let norm = (ny - nx).abs() / nx;
            worst_cos = worst_cos.min(cos);
            worst_norm = worst_norm.max(norm);
            assert!(
                cos >= MIN_COSINE && norm <= NORM_REL,
                "{name} {t} (layer {layer:?}) {which}: cosine {cos:.4}, norm off by {norm:.3}"
            );
        }
    }
    println!(
        "{name} ({dropout:?}): log p |GPU−CPU| mean {mean:.2e} max {max:.2e}; gradients worst \
         cosine {worst_cos:.5}, worst norm error {worst_norm:.2e}"
    );
    assert!(
        mean <= LOGP_MEAN && max <= LOGP_MAX,
        "{name}: log-probs off by mean {mean}, max {max}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_gradients_on_the_gpu_match_the_cpu() {
    for dir in case_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        compare(&name, Dropout::Off);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_masks_are_the_same_on_both_devices() {
    let dropout = Dropout::On {
        p: 0.3,
        seed: 5,
        step: 2,
    };
    compare("qwen2-tiny", dropout);
    compare("gemma2-tiny", dropout);
}
