//! AdamW, clipping, schedules and the decay rule against torch 2.11 / transformers 5.17:
//! replays fixtures/train/optim.json (tools/gen_optim_fixtures.py).

use serde_json::Value;
use train::optim::{AdamW, AdamWConfig, clip_grad_norm, decays};
use train::schedule::{Schedule, SchedulerKind, SchedulerKwargs, warmup_steps};

/// f32 state after 30 steps of f32 math: torch's CPU sqrt is not correctly rounded and its
/// norm reductions accumulate in f32 in module order, so values agree to a few ulps, not bit
/// for bit (measured: parameters 5.6e-7, moments 2.6e-7 of their tensor's scale).
const REL_TOL: f64 = 1e-6;
/// Learning rates are f64 arithmetic on both sides; only libm's cos may differ by an ulp.
const LR_TOL: f64 = 1e-15;

fn fixture() -> Value {
    let path = testkit::fixture("train/optim.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    testkit::f64s(v).into_iter().map(|x| x as f32).collect()
}

fn f32_lists(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

/// Largest |ours − theirs| / max(|theirs|, floor) over a list of tensors.
fn worst_rel(ours: &[Vec<f32>], theirs: &[Vec<f32>], floor: f64) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.len(), b.len());
        for (&x, &y) in a.iter().zip(b) {
            let rel = (x as f64 - y as f64).abs() / (y as f64).abs().max(floor);
            worst = worst.max(rel);
        }
    }
    worst
}

/// Largest |ours − theirs| over each tensor, relative to that tensor's largest |theirs|:
/// moments are sums of sign-changing gradients, so single elements can be near zero.
fn worst_tensor_rel(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f64, |m, &y| m.max((y as f64).abs()));
        let diff = a
            .iter()
            .zip(b)
            .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
        worst = worst.max(diff / scale.max(f64::MIN_POSITIVE));
    }
    worst
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(f64::MIN_POSITIVE)
}

#[test]
fn decay_groups_match_get_decay_parameter_names() {
    let fx = fixture();
    for case in fx["decay_rule"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        assert_eq!(decays(name), case["decay"].as_bool().unwrap(), "{name}");
    }
}

/// The run's optimizer, schedule and initial parameters, as the fixture describes them.
struct Run {
    fx: Value,
    opt: AdamW,
    schedule: Schedule,
    params: Vec<Vec<f32>>,
    max_grad_norm: f64,
}

fn start_run() -> Run {
    let fx = fixture();
    let run = &fx["run"];
    let betas = testkit::f64s(&run["betas"]);
    let config = AdamWConfig {
        beta1: betas[0],
        beta2: betas[1],
        eps: run["eps"].as_f64().unwrap(),
        weight_decay: run["weight_decay"].as_f64().unwrap(),
    };
    let specs: Vec<(String, usize)> = run["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let len = testkit::u64s(&p["shape"]).iter().product::<u64>() as usize;
            (p["name"].as_str().unwrap().to_string(), len)
        })
        .collect();
    let opt = AdamW::new(config, specs).unwrap();
    let kind = SchedulerKind::from_name(
        run["scheduler"].as_str().unwrap(),
        &SchedulerKwargs::default(),
    )
    .unwrap();
    let schedule = Schedule::new(
        kind,
        run["lr"].as_f64().unwrap(),
        run["warmup_steps"].as_u64().unwrap(),
        run["total_steps"].as_u64().unwrap(),
    )
    .unwrap();
    let params = run["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| f32s(&p["init"]))
        .collect();
    let max_grad_norm = run["max_grad_norm"].as_f64().unwrap();
    Run {
        fx,
        opt,
        schedule,
        params,
        max_grad_norm,
    }
}

impl Run {
    fn step_record(&self, k: usize) -> &Value {
        &self.fx["run"]["steps"][k]
    }

    /// Optimizer step k (0-based) as the Trainer takes it: clip, step with λ(k)·lr.
    /// Returns (pre-clip norm, clipped gradients).
    fn step(&mut self, k: usize) -> (f32, Vec<Vec<f32>>) {
        let mut grads = f32_lists(&self.step_record(k)["grads"]);
        let norm = {
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
            clip_grad_norm(&mut views, self.max_grad_norm)
        };
        let lr = self.schedule.lr(k as u64);
        let mut params: Vec<&mut [f32]> = self.params.iter_mut().map(|p| &mut p[..]).collect();
        let views: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        self.opt.step(lr, &mut params, &views).unwrap();
        (norm, grads)
    }
}

#[test]
fn thirty_steps_of_adamw_with_clipping_and_warmup_match_torch() {
    let mut run = start_run();
    let decay_flags: Vec<bool> = run.opt.params().map(|p| p.decay).collect();
    let fixture_flags: Vec<bool> = run.fx["run"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["decay"].as_bool().unwrap())
        .collect();
    assert_eq!(decay_flags, fixture_flags, "decay groups");
    assert!(decay_flags.contains(&true) && decay_flags.contains(&false));

    let n = run.fx["run"]["steps"].as_array().unwrap().len();
    let (mut clipped_steps, mut worst_param, mut worst_grad) = (0, 0f64, 0f64);
    for k in 0..n {
        let record = run.step_record(k).clone();
        let lr = run.schedule.lr(k as u64);
        let torch_lr = record["lr"].as_f64().unwrap();
        assert!(
            close(lr, torch_lr, LR_TOL) || lr == torch_lr,
            "step {k}: lr {lr} vs {torch_lr}"
        );

        let (norm, clipped) = run.step(k);
        let torch_norm = record["grad_norm"].as_f64().unwrap();
        assert!(
            close(norm as f64, torch_norm, REL_TOL),
            "step {k}: grad_norm {norm} vs {torch_norm}"
        );
        if torch_norm > run.max_grad_norm {
            clipped_steps += 1;
        }
        worst_grad = worst_grad.max(worst_rel(
            &clipped,
            &f32_lists(&record["clipped_grads"]),
            1e-3,
        ));

        let torch_params = f32_lists(&record["params"]);
        let rel = worst_rel(&run.params, &torch_params, 1e-2);
        assert!(
            rel <= REL_TOL,
            "step {k}: parameters differ from torch's by {rel:e} (relative)"
        );
        worst_param = worst_param.max(rel);
    }
    assert!(
        clipped_steps > 0 && clipped_steps < n,
        "the fixture clips some steps, not all"
    );
    assert!(
        worst_grad <= REL_TOL,
        "clipped gradients differ by {worst_grad:e}"
    );
    eprintln!(
        "worst relative parameter error {worst_param:e}, clipped-gradient error {worst_grad:e}"
    );
}

#[test]
fn optimizer_state_matches_torchs_exp_avg_and_exp_avg_sq() {
    let mut run = start_run();
    let states = run.fx["run"]["states"].as_array().unwrap().clone();
    let mut k = 0;
    for state in &states {
        let after = state["after_step"].as_u64().unwrap() as usize;
        while k < after {
            run.step(k);
            k += 1;
        }
        assert_eq!(run.opt.steps_taken(), after as u64);
        for s in testkit::f64s(&state["step"]) {
            assert_eq!(s, after as f64);
        }
        let n = run.params.len();
        let m: Vec<Vec<f32>> = (0..n)
            .map(|i| run.opt.exp_avg(i).unwrap().to_vec())
            .collect();
        let v: Vec<Vec<f32>> = (0..n)
            .map(|i| run.opt.exp_avg_sq(i).unwrap().to_vec())
            .collect();
        let rel_m = worst_tensor_rel(&m, &f32_lists(&state["exp_avg"]));
        let rel_v = worst_tensor_rel(&v, &f32_lists(&state["exp_avg_sq"]));
        eprintln!("after step {after}: exp_avg {rel_m:e}, exp_avg_sq {rel_v:e}");
        assert!(
            rel_m <= REL_TOL && rel_v <= REL_TOL,
            "after step {after}: exp_avg {rel_m:e}, exp_avg_sq {rel_v:e}"
        );
    }
}

#[test]
fn a_run_resumed_from_saved_state_is_the_uninterrupted_run() {
    let mut whole = start_run();
    let n = whole.fx["run"]["steps"].as_array().unwrap().len();
    for k in 0..n {
        whole.step(k);
    }

    let mut first = start_run();
    let cut = 15;
    for k in 0..cut {
        first.step(k);
    }
    let dir = testkit::TempDir::new("optim-resume");
    first.opt.save_state(&dir).unwrap();
    assert_eq!(dir.entries(), vec![train::optim::STATE_FILE]);

    // A fresh process: new optimizer, parameters as they were saved, state from disk.
    let mut resumed = start_run();
    resumed.params = first.params.clone();
    resumed.opt.load_state(&dir).unwrap();
    assert_eq!(resumed.opt.steps_taken(), cut as u64);
    for k in cut..n {
        resumed.step(k);
    }
    assert_eq!(resumed.params, whole.params, "bit for bit");
    for i in 0..whole.params.len() {
        assert_eq!(resumed.opt.exp_avg(i), whole.opt.exp_avg(i));
        assert_eq!(resumed.opt.exp_avg_sq(i), whole.opt.exp_avg_sq(i));
    }
}

#[test]
fn schedules_match_get_scheduler() {
    let fx = fixture();
    let cases = fx["schedules"].as_array().unwrap();
    let mut names = std::collections::HashSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        names.insert(name);
        let kw = &case["kwargs"];
        let kwargs = SchedulerKwargs {
            num_cycles: kw["num_cycles"].as_f64(),
            min_lr: kw["min_lr"].as_f64(),
            min_lr_rate: kw["min_lr_rate"].as_f64(),
        };
        let kind = SchedulerKind::from_name(name, &kwargs).unwrap();
        let schedule = Schedule::new(
            kind,
            case["base_lr"].as_f64().unwrap(),
            case["warmup_steps"].as_u64().unwrap(),
            case["total_steps"].as_u64().unwrap(),
        )
        .unwrap();
        for (k, want) in testkit::f64s(&case["lrs"]).into_iter().enumerate() {
            let got = schedule.lr(k as u64);
            assert!(
                got == want || close(got, want, LR_TOL),
                "{name} {kw} step {k}: {got} vs transformers {want}"
            );
        }
    }
    assert_eq!(names.len(), 5, "every supported type is covered: {names:?}");
}

#[test]
fn warmup_steps_match_get_warmup_steps() {
    let fx = fixture();
    for case in fx["warmup_steps"].as_array().unwrap() {
        let w = case["warmup_steps"].as_f64().unwrap();
        let total = case["total_steps"].as_u64().unwrap();
        assert_eq!(
            warmup_steps(w, total).unwrap(),
            case["steps"].as_u64().unwrap(),
            "warmup_steps {w} of {total}"
        );
    }
}
