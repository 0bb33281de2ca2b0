//! The model on a CUDA GPU (bf16 weights and activations) against the same model on the CPU
//! (f32), on every fixture checkpoint in `fixtures/models/*`.
//!
//! Tolerances:
//! - every token log-prob: |GPU − CPU| < 2e-2 (the bound for bf16 against f32); the
//!   mean and max absolute error per model are printed;
//! - argmax (teacher-forced on the reference sequences and on HF's greedy outputs): equal
//!   wherever HF's top1 − top2 margin is at least [`MARGIN`] — five times the log-prob
//!   tolerance, so only a real error can flip it; how many of all positions agree is printed;
//! - text rows against HF's f32 completion log-probs: < 2e-2 + 1e-4 (the CPU's own bound);
//! - decoding through a KV cache on the GPU: each step's log-prob within 2e-2 of the CPU's;
//! - weights: bit-exact bf16 (bf16 checkpoints as stored, f32 ones rounded to nearest-even).
//!
//! Every test here needs a GPU: `#[ignore = "needs a CUDA GPU"]`. Build on the CPU machine
//! with `cargo test --release -p model --test cuda_parity --no-run` and run the binary from
//! the repository root on the GPU machine with `--include-ignored --nocapture`. Fixtures are
//! found at run time ($PREFER_FIXTURES, else a `fixtures/` folder above the current dir or the
//! executable): CARGO_MANIFEST_DIR is baked in at build time and wrong there.

use std::path::PathBuf;
use std::sync::Mutex;

use engine::Device;
use engine::cuda::CudaBackend;
use engine::ops::SeqLayout;
use model::{CpuKvCache, Model, OpKind, Tokenizer};
use serde_json::Value;

const GPU: Device = Device::Cuda(0);
/// Per-token log-prob tolerance, bf16 GPU against f32 CPU.
const TOL: f64 = 2e-2;
/// Argmax must agree where HF's top-1 margin is at least this.
const MARGIN: f64 = 0.1;

/// The tests share one GPU and one memory arena; the memory test needs it to itself.
static GPU_LOCK: Mutex<()> = Mutex::new(());

fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PREFER_FIXTURES") {
        return PathBuf::from(p);
    }
    [std::env::current_dir().ok(), std::env::current_exe().ok()]
        .iter()
        .flatten()
        .flat_map(|s| s.ancestors())
        .map(|a| a.join("fixtures"))
        .find(|p| p.join("models").is_dir())
        .expect("no fixtures/ folder with models/ above the current dir or the test binary; set PREFER_FIXTURES")
}

/// Every fixture model with its reference, sorted by name.
fn fixture_models() -> Vec<(String, PathBuf, Value)> {
    let root = fixtures_dir();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root.join("models")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let path = root.join("reference").join(format!("{name}.json"));
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((name, dir, json));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 9,
        "expected the nine fixture models, found {}",
        out.len()
    );
    out
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Collects mismatches so one run reports all of them.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} mismatches:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Absolute errors of one model: count, sum and max.
#[derive(Default)]
struct ErrStats {
    n: usize,
    sum: f64,
    max: f64,
}

impl ErrStats {
    fn add(&mut self, err: f64) {
        self.n += 1;
        self.sum += err;
        // NaN must count as a failure, not vanish in max().
        self.max = if err.is_nan() {
            f64::NAN
        } else {
            self.max.max(err)
        };
    }
    fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }
}

/// Argmax agreement: positions compared, agreeing, and those that had to agree.
#[derive(Default)]
struct Agree {
    all: usize,
    same: usize,
    required: usize,
}

impl Agree {
    fn check(&mut self, report: &mut Report, what: String, got: u32, want: u32, margin: f64) {
        self.all += 1;
        self.same += usize::from(got == want);
        if margin >= MARGIN {
            self.required += 1;
            if got != want {
                report.0.push(format!(
                    "{what}: argmax {got}, HF {want} (margin {margin:.3} ≥ {MARGIN})"
                ));
            }
        }
    }
}

/// The reference sequences packed into one forward on each device: every log-prob within
/// TOL of the CPU's, and the argmax equal to HF's where the margin is clear.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fixtures_match_the_cpu_in_bf16() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let cpu = Model::load(&dir, Device::Cpu).unwrap();
        let gpu = Model::load(&dir, GPU).unwrap();
        assert_eq!(gpu.device(), GPU);
        let seqs = reference["sequences"].as_array().unwrap();
        let all_ids: Vec<Vec<u32>> = seqs.iter().map(|s| u32s(&s["ids"])).collect();
        let lens: Vec<usize> = all_ids.iter().map(Vec::len).collect();
        let ids: Vec<u32> = all_ids.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        // The last row of a sequence has no next token: target 0, only its argmax counts.
        let targets: Vec<u32> = all_ids
            .iter()
            .flat_map(|s| s[1..].iter().copied().chain([0]))
            .collect();
        let layout = SeqLayout::prefill(&lens);
        let run = |m: &Model| {
            let h = m.forward(&ids, &positions, &layout).unwrap();
            m.token_stats(&h, &targets).unwrap()
        };
        let (want, got) = (run(&cpu), run(&gpu));

        let (mut logp, mut entropy) = (ErrStats::default(), ErrStats::default());
        let mut agree = Agree::default();
        let mut at = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let margins = f64s(&seq["margins"]);
            let hf_argmax = u32s(&seq["argmax"]);
            for i in 0..lens[s] {
                let r = at + i;
                if i + 1 < lens[s] {
                    let err = (got.logp[r] as f64 - want.logp[r] as f64).abs();
                    logp.add(err);
                    if err.is_nan() || err >= TOL {
                        report.0.push(format!(
                            "{name} seq {s} logprob[{i}]: GPU {} CPU {} (|Δ| {err:.2e})",
                            got.logp[r], want.logp[r]
                        ));
                    }
                }
                entropy.add((got.entropy[r] as f64 - want.entropy[r] as f64).abs());
                agree.check(
                    &mut report,
                    format!("{name} seq {s} position {i}"),
                    got.argmax[r],
                    hf_argmax[i],
                    margins[i],
                );
            }
            at += lens[s];
        }
        println!(
            "{name:<18} log-prob |GPU−CPU| mean {:.2e} max {:.2e} over {} tokens; entropy max \
             {:.2e}; argmax agrees with HF at {}/{} positions ({} with margin ≥ {MARGIN}, all \
             required)",
            logp.mean(),
            logp.max,
            logp.n,
            entropy.max,
            agree.same,
            agree.all,
            agree.required
        );
    }
    report.finish();
}

/// HF's greedy outputs, teacher-forced through one GPU forward per run: the argmax at each
/// step is HF's next token wherever its margin is clear (so free-running greedy decoding would
/// produce the same ids up to the first near tie).
#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_outputs_agree_with_hf() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let gpu = Model::load(&dir, GPU).unwrap();
        let mut agree = Agree::default();
        for (g, case) in reference["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = u32s(&case["prompt_ids"]);
            let output = u32s(&case["output_ids"]);
            let margins = f64s(&case["margins"]);
            // Rows prompt_len − 1 .. end − 1 predict the output tokens.
            let stats = gpu.completion_stats(&[(&prompt, &output)]).unwrap();
            for (step, (&got, &want)) in stats[0].argmax.iter().zip(&output).enumerate() {
                agree.check(
                    &mut report,
                    format!("{name} greedy {g} step {step}"),
                    got,
                    want,
                    margins[step],
                );
            }
        }
        println!(
            "{name:<18} greedy: GPU argmax = HF's token at {}/{} steps ({} with margin ≥ \
             {MARGIN}, all required)",
            agree.same, agree.all, agree.required
        );
    }
    report.finish();
}

/// Decoding through a KV cache on the GPU (prefill of the prompt, then one token a step, so
/// attention runs with 1 query against all cached keys): HF's greedy tokens fed back one at a
/// time get the log-probs the CPU's full f32 forward gives them.
#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_cache_decode_matches_the_cpu() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let cpu = Model::load(&dir, Device::Cpu).unwrap();
        let gpu = Model::load(&dir, GPU).unwrap();
        let case = &reference["greedy"].as_array().unwrap()[0];
        let prompt = u32s(&case["prompt_ids"]);
        let output = u32s(&case["output_ids"]);
        let want = cpu.completion_stats(&[(&prompt, &output)]).unwrap();
        let mut cache = CpuKvCache::new(gpu.config(), 1);
        let mut ids = prompt.clone();
        let mut fed = 0;
        let mut err = ErrStats::default();
        for (step, &next) in output.iter().enumerate() {
            let new = &ids[fed..];
            let positions: Vec<u32> = (fed as u32..ids.len() as u32).collect();
            let layout = SeqLayout {
                q_starts: vec![0, new.len()],
                kv_starts: vec![0, ids.len()],
            };
            let hidden = gpu
                .forward_cached(new, &positions, &layout, &mut cache)
                .unwrap();
            let last = gpu.select_rows(&hidden, &[new.len() - 1]).unwrap();
            let got = gpu.token_stats(&last, &[next]).unwrap().logp[0] as f64;
            let e = (got - want[0].logp[step] as f64).abs();
            err.add(e);
            if e.is_nan() || e >= TOL {
                report.0.push(format!(
                    "{name} cached decode step {step}: GPU {got}, CPU {} (|Δ| {e:.2e})",
                    want[0].logp[step]
                ));
            }
            fed = ids.len();
            ids.push(next);
        }
        println!(
            "{name:<18} KV-cache decode on the GPU: |GPU−CPU| mean {:.2e} max {:.2e} over {} steps",
            err.mean(),
            err.max,
            err.n
        );
    }
    report.finish();
}

/// Text rows through `completion_stats` on the GPU against HF's f32 log-probs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn text_rows_match_hf_in_bf16() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for (name, dir, reference) in fixture_models() {
        let gpu = Model::load(&dir, GPU).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        let rows = reference["text"].as_array().unwrap();
        let pcs: Vec<_> = rows
            .iter()
            .map(|row| {
                tok.encode_prompt_completion(
                    row["prompt"].as_str().unwrap(),
                    row["completion"].as_str().unwrap(),
                    row["add_eos"].as_bool().unwrap(),
                )
                .unwrap()
            })
            .collect();
        // All rows packed in one forward.
        let pairs: Vec<(&[u32], &[u32])> = pcs
            .iter()
            .map(|pc| (pc.prompt_ids.as_slice(), pc.completion_ids.as_slice()))
            .collect();
        let stats = gpu.completion_stats(&pairs).unwrap();
        let mut err = ErrStats::default();
        for (r, row) in rows.iter().enumerate() {
            let want = f64s(&row["completion_logprobs"]);
            assert_eq!(stats[r].logp.len(), want.len(), "{name} text {r}");
            for (i, (&g, &w)) in stats[r].logp.iter().zip(&want).enumerate() {
                let e = (g as f64 - w).abs();
                err.add(e);
                if e.is_nan() || e >= TOL + 1e-4 {
                    report.0.push(format!(
                        "{name} text {r} logprob[{i}]: GPU {g}, HF {w} (|Δ| {e:.2e})"
                    ));
                }
            }
        }
        println!(
            "{name:<18} text rows: |GPU−HF f32| mean {:.2e} max {:.2e} over {} tokens",
            err.mean(),
            err.max,
            err.n
        );
    }
    report.finish();
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Weights on the GPU are the checkpoint's in bf16: bit for bit from a bf16 checkpoint,
/// rounded to nearest-even from f32 ones; Gemma's embedding scale is rounded to bf16 as HF
/// rounds it to the model dtype; a tied head costs no extra memory.
#[test]
#[ignore = "needs a CUDA GPU"]
fn weights_upload_as_bf16() {
    let _gpu = gpu_lock();
    let models = fixtures_dir().join("models");
    let backend = CudaBackend::get(0).unwrap();
    for name in ["llama-ropeparams", "llama-tiny", "gemma2-tiny"] {
        let dir = models.join(name);
        let cpu = Model::load(&dir, Device::Cpu).unwrap();
        let live_before = backend.memory_stats().live;
        let gpu = Model::load(&dir, GPU).unwrap();
        let live = backend.memory_stats().live - live_before;

        let want: Vec<f32> = cpu
            .lm_head()
            .to_vec()
            .unwrap()
            .into_iter()
            .map(bf16_round)
            .collect();
        let got = gpu.lm_head().to_vec().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{name}: {differ} lm_head elements differ from bf16(CPU)"
        );

        // Unique parameters × 2 bytes, plus the arena's rounding of each buffer (< 512 bytes
        // for buffers under 1 MiB; at most 10 buffers a layer). A duplicated tied table would
        // add V·C·2 bytes, far above that slack.
        let cfg = cpu.config();
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let per_layer = c * (cfg.q_dim() + 2 * cfg.kv_dim())
            + cfg.q_dim() * c
            + 3 * c * cfg.intermediate_size
            + 4 * c;
        let head = if cfg.tie_word_embeddings { 0 } else { v * c };
        let params = v * c + head + c + cfg.num_layers * per_layer;
        let slack = 512 * (10 * cfg.num_layers + 4);
        assert!(
            live <= 2 * params + slack,
            "{name}: {live} bytes on the GPU for ~{params} parameters (tied: {})",
            cfg.tie_word_embeddings
        );
        if cfg.tie_word_embeddings {
            assert!(
                live < 2 * params + v * c,
                "{name}: the tied table looks duplicated"
            );
        }
        println!(
            "{name:<18} {live} bytes on the GPU for {params} parameters (tied: {})",
            cfg.tie_word_embeddings
        );
    }
    let gemma2 = Model::load(&models.join("gemma2-tiny"), GPU).unwrap();
    let c = gemma2.config().hidden_size as f64;
    assert_eq!(gemma2.embed_scale(), bf16_round(c.sqrt() as f32));
    assert_ne!(
        gemma2.embed_scale(),
        c.sqrt() as f32,
        "sqrt({c}) is not a bf16 value"
    );
}

/// The profiler times the GPU forward per op kind.
#[test]
#[ignore = "needs a CUDA GPU"]
fn profile_counts_the_gpu_ops() {
    let _gpu = gpu_lock();
    let dir = fixtures_dir().join("models").join("qwen2-tiny");
    let gpu = Model::load(&dir, GPU).unwrap();
    let prompt: Vec<u32> = (3..40).collect();
    let completion: Vec<u32> = (40..90).collect();
    let plain = gpu.completion_stats(&[(&prompt, &completion)]).unwrap();
    gpu.start_profile();
    let profiled = gpu.completion_stats(&[(&prompt, &completion)]).unwrap();
    let times = gpu.stop_profile();
    // Profiling only adds waits between ops: the same kernels compute the same values.
    for (p, q) in plain[0].logp.iter().zip(&profiled[0].logp) {
        assert!(
            (p - q).abs() <= 1e-5,
            "profiling changed a log-prob: {p} vs {q}"
        );
    }
    assert_eq!(plain[0].argmax, profiled[0].argmax);
    let layers = gpu.config().num_layers;
    // Per layer: q/k/v, o, gate/up and down.
    assert_eq!(times.by_kind[&OpKind::Gemm].1, 4 * layers);
    assert_eq!(times.by_kind[&OpKind::Attention].1, layers);
    assert_eq!(times.by_kind[&OpKind::LmHead].1, 1);
    for kind in [OpKind::Gemm, OpKind::Attention, OpKind::LmHead] {
        assert!(times.ms(kind) > 0.0, "{kind:?}: {times:?}");
    }
    println!("qwen2-tiny profile: {times:?}");
}
