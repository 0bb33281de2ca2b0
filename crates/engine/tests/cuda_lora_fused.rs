//! The fused LoRA projection (`ops::lora_project`, `ops::lora_project_backward`) on the GPU
//! against the CPU composition of the unfused ops it replaces (apply_dropout, linear, scale,
//! add_into_columns; columns, linear_backward_input / _weight, apply_dropout_backward,
//! add_inplace).
//!
//! Inputs are bf16-exact, so both devices start from identical values. The backward is fed
//! the GPU forward's own u (bf16), on both devices. Accumulators (y, dx, grad_a, grad_b)
//! start from random nonzero values, so a GEMM that overwrites instead of adding fails.
//!
//! Tolerances, elementwise, `abs + rel·U·|want|` (U = 2⁻⁸), with Δ the reference's increment
//! (want − initial value) and the rationale:
//! - u (bf16 out): `1e-2 · max|u|`, rel 1.05. With dropout the GPU rounds xd = x / (1 − p) to
//!   bf16 (p = 0.05 makes it inexact); the CPU keeps it f32.
//! - y's column range (bf16, += s · u · Bᵀ): `1e-2 · max|Δ|`, rel 1.05 (y's own rounding).
//!   The GPU multiplies the bf16 u, the reference its f32 u: 16 terms each off by ≤ 2⁻⁹.
//! - y outside the range: bit-identical to its initial value (a wrong offset or leading
//!   dimension writes there).
//! - grad_b (f32, += s · dy_mᵀ · u): `1e-3 · max|Δ|`: identical bf16 operands, only the f32
//!   summation order differs.
//! - grad_a (f32, += duᵀ · xd): `1e-2 · max|Δ|`: the GPU rounds du (and xd) to bf16.
//! - dx (bf16): `1e-2 · max|Δ|`, rel 1.05; where the CPU's mask is 0, dx must keep its exact
//!   initial bits (the masks agree bit for bit, and a dropped element adds exactly 0).
//!
//! Every GPU test is `#[ignore = "needs a CUDA GPU"]`: build on the CPU machine with
//! `cargo test --release -p engine --test cuda_lora_fused --no-run`, run on the GPU machine
//! with `--include-ignored`.

use engine::cuda::DType;
use engine::ops::{self, DropoutKey};
use engine::{Device, EngineError, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock, rand_tensor};

/// One module: (T, in, R, out, N, col0).
type Case = [usize; 6];

/// qwen05's modules at training lengths (C 896, I 4864, q/k/v stacked into 896 + 128 + 128,
/// gate/up into 2 · 4864, R 16), then odd sizes at odd columns (2-byte aligned ranges, rows
/// of odd length), and empty dimensions.
const CASES: &[Case] = &[
    [1000, 896, 16, 896, 1152, 0],     // q_proj
    [1000, 896, 16, 128, 1152, 896],   // k_proj
    [2000, 896, 16, 128, 1152, 1024],  // v_proj
    [1500, 896, 16, 896, 896, 0],      // o_proj
    [4000, 896, 16, 4864, 9728, 0],    // gate_proj
    [3000, 896, 16, 4864, 9728, 4864], // up_proj
    [2000, 4864, 16, 896, 896, 0],     // down_proj
    [7, 13, 3, 5, 11, 3],
    [33, 17, 16, 5, 40, 3],
    [129, 40, 8, 37, 77, 1],
    [1, 1, 1, 1, 1, 0],
    [0, 8, 4, 3, 6, 1],
    [5, 8, 0, 3, 6, 1],
    [5, 8, 4, 0, 6, 6],
    [5, 0, 4, 3, 6, 1],
];

fn key(p: f32, module: u64) -> DropoutKey {
    DropoutKey {
        p,
        seed: 1234,
        step: 17,
        layer: Some(5),
        module,
    }
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

fn describe(case: &Case, p: Option<f32>) -> String {
    let [t, inp, r, out, n, col0] = *case;
    format!("T{t} in{inp} R{r} out{out} N{n} col0 {col0} p {p:?}")
}

/// `got` (on the GPU, `dtype`) against `want`, both with initial contents `init`: elementwise
/// `frac · max|want − init| + rel·U·|want|`.
#[allow(clippy::too_many_arguments)]
fn assert_increment(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    init: &Tensor,
    dtype: DType,
    frac: f64,
    rel: f64,
) {
    assert_eq!(got.device(), GPU, "{what}: device");
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w, i) = (
        got.to_vec().unwrap(),
        want.to_vec().unwrap(),
        init.to_vec().unwrap(),
    );
    let delta: Vec<f32> = w.iter().zip(&i).map(|(w, i)| w - i).collect();
    let abs = frac * max_abs(&delta);
    common::assert_close_slices(what, &g, &w, abs, rel, NonFinite::Fails);
}

/// The unfused forward on the CPU: (u, y after the add).
fn reference_forward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f32,
    key: Option<&DropoutKey>,
    y: &Tensor,
    col0: usize,
) -> (Tensor, Tensor) {
    let xd = match key {
        Some(k) => ops::apply_dropout(x, k).unwrap(),
        None => x.clone(),
    };
    let u = ops::linear(&xd, a, None).unwrap();
    let delta = ops::scale(&ops::linear(&u, b, None).unwrap(), s).unwrap();
    let mut y = y.clone();
    ops::add_into_columns(&mut y, col0, &delta).unwrap();
    (u, y)
}

/// The unfused backward on the CPU, accumulating into copies of `acc` (dx, grad_a, grad_b).
#[allow(clippy::too_many_arguments)]
fn reference_backward(
    dy: &Tensor,
    col0: usize,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    u: &Tensor,
    s: f32,
    key: Option<&DropoutKey>,
    acc: &[Tensor; 3],
) -> [Tensor; 3] {
    let [mut dx, mut ga, mut gb] = acc.clone();
    let dy_m = ops::columns(dy, col0, b.shape()[0]).unwrap();
    let ds = ops::scale(&dy_m, s).unwrap();
    let du = ops::linear_backward_input(&ds, b).unwrap();
    ops::add_inplace(&mut gb, &ops::linear_backward_weight(&ds, u).unwrap()).unwrap();
    let xd = match key {
        Some(k) => ops::apply_dropout(x, k).unwrap(),
        None => x.clone(),
    };
    ops::add_inplace(&mut ga, &ops::linear_backward_weight(&du, &xd).unwrap()).unwrap();
    let mut dxd = ops::linear_backward_input(&du, a).unwrap();
    if let Some(k) = key {
        dxd = ops::apply_dropout_backward(&dxd, k).unwrap();
    }
    ops::add_inplace(&mut dx, &dxd).unwrap();
    [dx, ga, gb]
}

/// One module's random problem, on the CPU (bf16-exact).
struct Problem {
    x: Tensor,  // [T, in]
    a: Tensor,  // [R, in]
    b: Tensor,  // [out, R]
    y0: Tensor, // [T, N]
    dy: Tensor, // [T, N]
    /// Initial dx [T, in], grad_a [R, in], grad_b [out, R].
    acc: [Tensor; 3],
}

impl Problem {
    fn new(rng: &mut Rng, &[t, inp, r, out, n, _]: &Case) -> Problem {
        Problem {
            x: rand_tensor(rng, &[t, inp], -1.0, 1.0),
            a: rand_tensor(rng, &[r, inp], -0.1, 0.1),
            b: rand_tensor(rng, &[out, r], -0.5, 0.5),
            y0: rand_tensor(rng, &[t, n], -1.0, 1.0),
            dy: rand_tensor(rng, &[t, n], -1.0, 1.0),
            acc: [
                rand_tensor(rng, &[t, inp], -1.0, 1.0),
                rand_tensor(rng, &[r, inp], -1.0, 1.0),
                rand_tensor(rng, &[out, r], -1.0, 1.0),
            ],
        }
    }
}

/// The GPU forward against the CPU's; returns the GPU's u.
fn check_forward(case: &Case, p: &Problem, k: Option<&DropoutKey>, s: f32) -> Tensor {
    let [t, _, r, out, n, col0] = *case;
    let what = describe(case, k.map(|k| k.p));
    let (want_u, want_y) = reference_forward(&p.x, &p.a, &p.b, s, k, &p.y0, col0);
    let mut gy = gpu(&p.y0);
    // Another owner of y's buffer: the op must write a copy, not the shared buffer.
    let shared = gy.clone();
    let gu = ops::lora_project(&gpu(&p.x), &gpu(&p.a), &gpu(&p.b), s, k, &mut gy, col0).unwrap();
    assert_eq!(gu.shape(), &[t, r], "{what} u");
    assert_eq!(gu.dtype(), DType::Bf16, "{what} u");
    let u_scale = max_abs(&want_u.to_vec().unwrap());
    let (gu_v, want_uv) = (gu.to_vec().unwrap(), want_u.to_vec().unwrap());
    let u_what = format!("{what} u");
    common::assert_close_slices(
        &u_what,
        &gu_v,
        &want_uv,
        1e-2 * u_scale,
        1.05,
        NonFinite::Fails,
    );

    assert_eq!(gy.dtype(), DType::Bf16, "{what} y");
    assert_eq!(
        shared.to_vec().unwrap(),
        p.y0.to_vec().unwrap(),
        "{what}: shared y written"
    );
    let (got, want, init) = (
        gy.to_vec().unwrap(),
        want_y.to_vec().unwrap(),
        p.y0.to_vec().unwrap(),
    );
    // The range's columns, gathered, against the reference; the rest bit for bit.
    let (mut g_in, mut w_in, mut d_in) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..t {
        for c in 0..n {
            let i = row * n + c;
            if (col0..col0 + out).contains(&c) {
                g_in.push(got[i]);
                w_in.push(want[i]);
                d_in.push(want[i] - init[i]);
            } else {
                assert_eq!(
                    got[i].to_bits(),
                    init[i].to_bits(),
                    "{what}: y[{row}, {c}] is outside the module's columns but changed"
                );
            }
        }
    }
    let abs = 1e-2 * max_abs(&d_in);
    common::assert_close_slices(
        &format!("{what} y"),
        &g_in,
        &w_in,
        abs,
        1.05,
        NonFinite::Fails,
    );
    gu
}

/// The GPU backward against the CPU's, both given the GPU forward's u.
fn check_backward(case: &Case, p: &Problem, k: Option<&DropoutKey>, s: f32, gu: &Tensor) {
    let [t, inp, _, _, _, col0] = *case;
    let what = describe(case, k.map(|k| k.p));
    let u = gu.to_device(Device::Cpu).unwrap();
    let want = reference_backward(&p.dy, col0, &p.x, &p.a, &p.b, &u, s, k, &p.acc);
    let mut dx = gpu(&p.acc[0]);
    let mut ga = p.acc[1].to_device_f32(GPU).unwrap();
    let mut gb = p.acc[2].to_device_f32(GPU).unwrap();
    let shared = [dx.clone(), ga.clone(), gb.clone()];
    let (gx, ga_in, gb_in) = (gpu(&p.x), gpu(&p.a), gpu(&p.b));
    ops::lora_project_backward(
        &gpu(&p.dy),
        col0,
        &gx,
        &ga_in,
        &gb_in,
        gu,
        s,
        k,
        &mut dx,
        &mut ga,
        &mut gb,
    )
    .unwrap();
    for (i, sh) in shared.iter().enumerate() {
        assert_eq!(
            sh.to_vec().unwrap(),
            p.acc[i].to_vec().unwrap(),
            "{what}: shared accumulator {i} written"
        );
    }
    assert_increment(
        &format!("{what} grad_b"),
        &gb,
        &want[2],
        &p.acc[2],
        DType::F32,
        1e-3,
        0.0,
    );
    assert_increment(
        &format!("{what} grad_a"),
        &ga,
        &want[1],
        &p.acc[1],
        DType::F32,
        1e-2,
        0.0,
    );
    assert_increment(
        &format!("{what} dx"),
        &dx,
        &want[0],
        &p.acc[0],
        DType::Bf16,
        1e-2,
        1.05,
    );
    if let Some(k) = k {
        // Dropped elements add exactly nothing: the GPU's mask is the CPU's, bit for bit.
        let mask = ops::dropout_mask(k, t, inp, Device::Cpu).unwrap();
        let (mask, got, init) = (
            mask.to_vec().unwrap(),
            dx.to_vec().unwrap(),
            p.acc[0].to_vec().unwrap(),
        );
        let dropped = mask.iter().filter(|&&m| m == 0.0).count();
        for (i, &m) in mask.iter().enumerate() {
            if m == 0.0 {
                assert_eq!(
                    got[i].to_bits(),
                    init[i].to_bits(),
                    "{what}: dropped dx[{i}] changed"
                );
            }
        }
        eprintln!("{what}: {dropped} of {} elements dropped", mask.len());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_project_and_its_backward_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(201);
    for (i, case) in CASES.iter().enumerate() {
        let p = Problem::new(&mut rng, case);
        // alpha 32 / r 16, then a scaling that is not a power of two.
        for (dropout, s) in [(None, 2.0f32), (Some(0.05f32), 0.37)] {
            let k = dropout.map(|p| key(p, i as u64));
            let gu = check_forward(case, &p, k.as_ref(), s);
            check_backward(case, &p, k.as_ref(), s, &gu);
        }
    }
}

/// A mask that drops half the elements: keep = 2 is exact in bf16, so xd is identical on both
/// devices, and many dx elements are checked for exact preservation.
#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_project_with_heavy_dropout_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(202);
    for case in [[300, 136, 16, 40, 200, 17], [64, 896, 16, 128, 1152, 896]] {
        let p = Problem::new(&mut rng, &case);
        let k = key(0.5, 9);
        let gu = check_forward(&case, &p, Some(&k), 1.0);
        check_backward(&case, &p, Some(&k), 1.0, &gu);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_fused_on_the_gpu_refuses_bad_inputs() {
    let _gpu = gpu_lock();
    let z = |shape: &[usize]| gpu(&Tensor::zeros(shape));
    let z32 = |shape: &[usize]| Tensor::zeros(shape).to_device_f32(GPU).unwrap();
    let (x, a, b) = (z(&[2, 5]), z(&[3, 5]), z(&[4, 3]));
    // y must be bf16; the error names it.
    let err = ops::lora_project(&x, &a, &b, 1.0, None, &mut z32(&[2, 8]), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("y must be bf16"), "{err}");
    // Shapes and ranges: the CPU's checks.
    assert!(matches!(
        ops::lora_project(&x, &z(&[3, 6]), &b, 1.0, None, &mut z(&[2, 8]), 1),
        Err(EngineError::Shape { .. })
    ));
    assert!(matches!(
        ops::lora_project(&x, &a, &b, 1.0, None, &mut z(&[2, 8]), 5),
        Err(EngineError::Arg { .. })
    ));
    // Mixed devices: an error naming both tensors.
    let err = ops::lora_project(
        &x,
        &a,
        &Tensor::zeros(&[4, 3]),
        1.0,
        None,
        &mut z(&[2, 8]),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("x is on cuda:0 but b is on cpu"), "{err}");

    // The backward: gradients must be f32, dx bf16; nothing is written on a refusal.
    let (dy, u) = (z(&[2, 8]), z(&[2, 3]));
    let ones = Tensor::from_vec(vec![1.0; 15], &[3, 5]).unwrap();
    let mut dx = gpu(&Tensor::from_vec(vec![1.0; 10], &[2, 5]).unwrap());
    let mut ga_bf16 = gpu(&ones);
    let mut gb = z32(&[4, 3]);
    let err = ops::lora_project_backward(
        &dy,
        1,
        &x,
        &a,
        &b,
        &u,
        1.0,
        None,
        &mut dx,
        &mut ga_bf16,
        &mut gb,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("grad_a must be f32"), "{err}");
    let mut ga = ones.to_device_f32(GPU).unwrap();
    let mut dx32 = z32(&[2, 5]);
    let err = ops::lora_project_backward(
        &dy, 1, &x, &a, &b, &u, 1.0, None, &mut dx32, &mut ga, &mut gb,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("dx must be bf16"), "{err}");
    assert!(ga.to_vec().unwrap().iter().all(|&v| v == 1.0));
    assert!(dx.to_vec().unwrap().iter().all(|&v| v == 1.0));
    let err = ops::lora_project_backward(
        &Tensor::zeros(&[2, 8]),
        1,
        &x,
        &a,
        &b,
        &u,
        1.0,
        None,
        &mut dx,
        &mut ga,
        &mut gb,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("dy is on cpu but x is on cuda:0"), "{err}");
}
