//! A naive f64 decoder written from the HF modeling files with plain loops, independent of the
//! engine's ops: the reference the model's forward is tested against (the HF fixtures then
//! pin the semantics themselves). Test-only.

use engine::ops::{Activation, RopeScaling};

use crate::config::ModelConfig;
use crate::decoder::Linear;
use crate::model::Model;

type Mat = Vec<Vec<f64>>; // [rows][cols]

fn weights(t: &engine::Tensor) -> Vec<f64> {
    t.as_slice().unwrap().iter().map(|&x| x as f64).collect()
}

fn linear(x: &Mat, l: &Linear) -> Mat {
    linear_rows(x, l, 0..l.weight.shape()[0])
}

/// The outputs `rows` of a linear layer: the part of a stacked projection (q of q/k/v, ...).
fn linear_rows(x: &Mat, l: &Linear, rows: std::ops::Range<usize>) -> Mat {
    let w = weights(&l.weight);
    let k = l.weight.shape()[1];
    let b = l.bias.as_ref().map(weights);
    x.iter()
        .map(|row| {
            rows.clone()
                .map(|o| {
                    let dot: f64 = (0..k).map(|i| row[i] * w[o * k + i]).sum();
                    dot + b.as_ref().map_or(0.0, |b| b[o])
                })
                .collect()
        })
        .collect()
}

fn rms_norm(x: &Mat, w: &engine::Tensor, eps: f64, offset: f64) -> Mat {
    let w = weights(w);
    x.iter()
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter()
                .zip(&w)
                .map(|(v, w)| v * r * (offset + w))
                .collect()
        })
        .collect()
}

/// erf by its Taylor series (|x| < 5; beyond, erf is ±1 to within 2e-12).
fn erf(x: f64) -> f64 {
    if x.abs() >= 5.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn activation(x: f64, act: Activation) -> f64 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

/// HF's inverse frequencies (default, linear, llama3), in f64.
fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f64).powf((2 * i) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f64).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
            );
            let old = original_max_position_embeddings as f64;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high {
                        f
                    } else if wavelen > old / low {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// rotate_half RoPE of one head vector at `pos`.
fn rope(v: &mut [f64], pos: usize, inv: &[f64]) {
    let half = v.len() / 2;
    for i in 0..half {
        let angle = pos as f64 * inv[i];
        let (s, c) = angle.sin_cos();
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/// Log-probs of every next token of one sequence: out[t] = log softmax(logits(ids[..=t]))
/// over the vocabulary, for t in 0..ids.len(). [T][V]
pub(crate) fn reference_log_softmax(model: &Model, ids: &[u32]) -> Mat {
    let cfg = model.config();
    let a = &cfg.arch;
    let (t_len, c) = (ids.len(), cfg.hidden_size);
    let (h, hkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let eps = cfg.rms_norm_eps as f64;
    let offset = a.norm_offset as f64;
    let inv = inv_freq(cfg);
    let embed = weights(&model.embed_tokens);
    let mut x: Mat = ids
        .iter()
        .map(|&id| {
            (0..c)
                .map(|j| embed[id as usize * c + j] * model.embed_scale() as f64)
                .collect()
        })
        .collect();
    for layer in &model.layers {
        let hn = rms_norm(&x, &layer.input_layernorm, eps, offset);
        let (qd, kvd) = (h * d, hkv * d);
        let mut q = linear_rows(&hn, &layer.qkv_proj, 0..qd);
        let mut k = linear_rows(&hn, &layer.qkv_proj, qd..qd + kvd);
        let v = linear_rows(&hn, &layer.qkv_proj, qd + kvd..qd + 2 * kvd);
        for t in 0..t_len {
            for head in 0..h {
                rope(&mut q[t][head * d..(head + 1) * d], t, &inv);
            }
            for head in 0..hkv {
                rope(&mut k[t][head * d..(head + 1) * d], t, &inv);
            }
        }
        let mut attn = vec![vec![0.0; h * d]; t_len];
        for head in 0..h {
            let kvh = head / (h / hkv);
            for p in 0..t_len {
                let keys: Vec<usize> = (0..=p)
                    .filter(|&kp| layer.window.is_none_or(|w| p - kp < w))
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&kp| {
                        let s: f64 = (0..d)
                            .map(|i| q[p][head * d + i] * k[kp][kvh * d + i])
                            .sum::<f64>()
                            * a.attn_scale as f64;
                        match a.attn_softcap {
                            Some(cap) => (s / cap as f64).tanh() * cap as f64,
                            None => s,
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (s, &kp) in scores.iter().zip(&keys) {
                    let w = (s - m).exp() / z;
                    for i in 0..d {
                        attn[p][head * d + i] += w * v[kp][kvh * d + i];
                    }
                }
            }
        }
        let mut o = linear(&attn, &layer.o_proj);
        if a.sandwich_norms {
            o = rms_norm(&o, &layer.post_attention_layernorm, eps, offset);
        }
        for (xr, or) in x.iter_mut().zip(&o) {
            xr.iter_mut().zip(or).for_each(|(a, b)| *a += b);
        }
        let pre = layer
            .pre_feedforward_layernorm
            .as_ref()
            .unwrap_or(&layer.post_attention_layernorm);
        let hn = rms_norm(&x, pre, eps, offset);
        let inter = cfg.intermediate_size;
        let gate = linear_rows(&hn, &layer.gate_up_proj, 0..inter);
        let up = linear_rows(&hn, &layer.gate_up_proj, inter..2 * inter);
        let act: Mat = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(g, u)| activation(*g, a.activation) * u)
                    .collect()
            })
            .collect();
        let mut m = linear(&act, &layer.down_proj);
        if let Some(w) = &layer.post_feedforward_layernorm {
            m = rms_norm(&m, w, eps, offset);
        }
        for (xr, mr) in x.iter_mut().zip(&m) {
            xr.iter_mut().zip(mr).for_each(|(a, b)| *a += b);
        }
    }
    let hn = rms_norm(&x, &model.norm, eps, offset);
    let head = Linear {
        weight: model.lm_head.clone(),
        bias: None,
    };
    linear(&hn, &head)
        .into_iter()
        .map(|row| {
            let row: Vec<f64> = match a.final_softcap {
                Some(cap) => row
                    .iter()
                    .map(|l| (l / cap as f64).tanh() * cap as f64)
                    .collect(),
                None => row,
            };
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            row.iter().map(|l| l - lse).collect()
        })
        .collect()
}

/// Reference completion log-probs and argmaxes (ties → lowest id) of one (prompt, completion).
pub(crate) fn reference_completion(
    model: &Model,
    prompt: &[u32],
    completion: &[u32],
) -> (Vec<f64>, Vec<u32>) {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let lsm = reference_log_softmax(model, &ids);
    completion
        .iter()
        .enumerate()
        .map(|(t, &target)| {
            let row = &lsm[prompt.len() - 1 + t];
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            (row[target as usize], best as u32)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(2) to 15 digits.
        assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
        assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-14);
        assert!((erf(-2.0) + 0.995_322_265_018_952_7).abs() < 1e-13);
    }
}
