//! The model on a CUDA GPU (bf16 weights and activations) against the same model on the CPU
//! (f32), on every fixture checkpoint in `fixtures/models/*`.
//!
//! # Tolerances: judged against transformers' own bf16 error
//!
//! A bf16 forward cannot match an f32 one to a fixed bound on these fixtures: their logits are
//! large and peaked by design, so bf16 rounding of activations moves single log-probs by up to
//! a few tenths. Measured, HF transformers 5.17 itself in bf16 (torch CPU, eager attention,
//! the same checkpoints) misses the 2e-2 per-token bound against HF f32 on all nine
//! models: its largest error ranges from 4.0e-2 (gemma2-oldconfig) to 3.5e-1 (llama-tiny, mean
//! 5.5e-2). The 2e-2 is unreachable here for any bf16 engine. transformers' bf16 is the
//! baseline a user compares us with, so each model's bound is scaled by HF's bf16 error on it,
//! read from `fixtures/reference/<name>.bf16.json` (`tools/gen_bf16_reference.py`) against the
//! f32 `<name>.json` (docs/precision.md has both, and the part of it that is the bf16 weights alone,
//! `tools/bf16_error_budget.py`):
//!
//! - mean |GPU − CPU f32| over a test's tokens ≤ max(2e-2, [`MEAN_FACTOR`] × HF's mean
//!   |bf16 − f32| over the **same tokens**);
//! - every token's |GPU − CPU f32| ≤ max(2e-2, [`MAX_FACTOR`] × HF's largest |bf16 − f32| over
//!   all of the model's reference tokens — sequences, text rows and greedy decode, 278 tokens).
//!   The max is pooled because the largest of 40–95 errors is noisy: on gemma-exactgelu's 63
//!   text tokens ours reached 7.0e-2 where HF's reached 4.2e-2, while on its 95 sequence tokens
//!   ours was 6.3e-2 and HF's 6.2e-2 (the bf16 worst cases land on different tokens);
//! - where HF's own bf16 error is below 2e-2 the 2e-2 stands unchanged (the `max`).
//!
//! The tests:
//! - reference sequences, one packed forward: log-probs against the CPU as above; argmax equal
//!   to HF f32's wherever HF's top1 − top2 margin exceeds max([`MARGIN`], 2 × HF's largest bf16
//!   log-prob error on that model) — a margin that no error of that size can flip; flips at
//!   smaller margins are printed, with HF bf16's own agreement beside them;
//! - HF's greedy outputs teacher-forced: the same argmax rule;
//! - text rows against HF's f32 completion log-probs (scale: HF bf16's text-row error; the
//!   floor keeps the CPU's own 1e-4 on top of 2e-2);
//! - decoding through a KV cache on the GPU, all greedy runs, against the CPU's f32 forward
//!   (scale: HF bf16 decoding through its KV cache against HF f32, the same tokens);
//! - weights: bit-exact bf16 (bf16 checkpoints as stored, f32 ones rounded to nearest-even),
//!   and no duplicated tied table.
//!
//! Every test here needs a GPU: `#[ignore = "needs a CUDA GPU"]`. Build on the CPU machine
//! with `cargo test --release -p model --test cuda_parity --no-run` and run the binary from
//! the repository root on the GPU machine with `--include-ignored --nocapture`. Fixtures are
//! found at run time ($PREFER_FIXTURES, else a `fixtures/` folder above the current dir or the
//! executable): CARGO_MANIFEST_DIR is baked in at build time and wrong there.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use engine::Device;
use engine::cuda::CudaBackend;
use engine::ops::SeqLayout;
use model::{CpuKvCache, Model, OpKind, Tokenizer};
use serde_json::Value;
use testkit::{f64s, fixtures_dir, u32s};

const GPU: Device = Device::Cuda(0);
/// The per-token log-prob bound, bf16 GPU against f32 CPU: the floor of every bound.
const TOL: f64 = 2e-2;
/// The CPU's own bound against HF f32 (its parity tests): added where we compare with HF f32.
const CPU_TOL: f64 = 1e-4;
/// Our mean error may exceed HF bf16's mean on the same tokens by this factor.
const MEAN_FACTOR: f64 = 1.25;
/// Our largest error may exceed HF bf16's largest on the model by this factor.
const MAX_FACTOR: f64 = 1.5;
/// Argmax must agree with HF at least where HF's top-1 margin exceeds this (and 2 × HF bf16's
/// largest log-prob error on the model).
const MARGIN: f64 = 0.1;

/// The tests share one GPU and one memory arena; the memory test needs it to itself.
static GPU_LOCK: Mutex<()> = Mutex::new(());

fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (tools/gen_fixtures.py / gen_bf16_reference.py write it)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One fixture checkpoint with its f32 reference and HF's bf16 error on it.
struct Fixture {
    name: String,
    dir: PathBuf,
    /// `reference/<name>.json`: HF f32.
    reference: Value,
    hf: HfBf16,
}

/// Every fixture model with its references, sorted by name.
fn fixture_models() -> Vec<Fixture> {
    let root = fixtures_dir();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root.join("models")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let reference = read_json(&root.join("reference").join(format!("{name}.json")));
        let bf16_path = root.join("reference").join(format!("{name}.bf16.json"));
        let hf = HfBf16::new(&name, &reference, &read_json(&bf16_path));
        out.push(Fixture {
            name,
            dir,
            reference,
            hf,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        out.len() >= 9,
        "expected the nine fixture models, found {}",
        out.len()
    );
    out
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
#[derive(Default, Clone, Copy)]
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
        self.max = if err.is_nan() || self.max.is_nan() {
            f64::NAN
        } else {
            self.max.max(err)
        };
    }
    fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }
    /// |a − b| element by element; `what` names the pair in a length mismatch.
    fn between(a: &[f64], b: &[f64], what: &str) -> ErrStats {
        assert_eq!(a.len(), b.len(), "{what}: bf16 and f32 lengths differ");
        let mut s = ErrStats::default();
        for (x, y) in a.iter().zip(b) {
            s.add((x - y).abs());
        }
        s
    }
    fn merge(self, other: ErrStats) -> ErrStats {
        ErrStats {
            n: self.n + other.n,
            sum: self.sum + other.sum,
            max: if self.max.is_nan() || other.max.is_nan() {
                f64::NAN
            } else {
                self.max.max(other.max)
            },
        }
    }
}

/// HF transformers' bf16 error on one model (|HF bf16 − HF f32| per token log-prob),
/// recomputed here from the raw values of `<name>.bf16.json` and `<name>.json`.
struct HfBf16 {
    /// Over the reference sequences' next-token log-probs.
    sequences: ErrStats,
    /// Over the text rows' completion log-probs.
    text: ErrStats,
    /// Over the greedy runs' output tokens, decoded through HF's KV cache.
    decode: ErrStats,
    /// HF bf16's argmax per sequence position: [seq][T].
    seq_argmax: Vec<Vec<u32>>,
    /// HF bf16's argmax per decode step: [greedy run][40].
    decode_argmax: Vec<Vec<u32>>,
}

impl HfBf16 {
    fn new(name: &str, f32_ref: &Value, bf16: &Value) -> HfBf16 {
        let group = |key: &str| {
            bf16[key]
                .as_array()
                .unwrap_or_else(|| panic!("{name}.bf16.json: no `{key}` list"))
        };
        let (seqs, texts, greedy) = (group("sequences"), group("text"), group("greedy"));
        let mut hf = HfBf16 {
            sequences: ErrStats::default(),
            text: ErrStats::default(),
            decode: ErrStats::default(),
            seq_argmax: seqs.iter().map(|s| u32s(&s["argmax"])).collect(),
            decode_argmax: greedy.iter().map(|g| u32s(&g["argmax"])).collect(),
        };
        let f32_seqs = f32_ref["sequences"].as_array().unwrap();
        let f32_texts = f32_ref["text"].as_array().unwrap();
        assert_eq!(
            seqs.len(),
            f32_seqs.len(),
            "{name}: bf16 and f32 sequence counts differ"
        );
        assert_eq!(
            texts.len(),
            f32_texts.len(),
            "{name}: bf16 and f32 text row counts differ"
        );
        for (i, (b, f)) in seqs.iter().zip(f32_seqs).enumerate() {
            let e = ErrStats::between(
                &f64s(&b["logprobs"]),
                &f64s(&f["logprobs"]),
                &format!("{name} sequence {i}"),
            );
            hf.sequences = hf.sequences.merge(e);
        }
        for (i, (b, f)) in texts.iter().zip(f32_texts).enumerate() {
            let e = ErrStats::between(
                &f64s(&b["completion_logprobs"]),
                &f64s(&f["completion_logprobs"]),
                &format!("{name} text {i}"),
            );
            hf.text = hf.text.merge(e);
        }
        for (i, g) in greedy.iter().enumerate() {
            let e = ErrStats::between(
                &f64s(&g["logprobs"]),
                &f64s(&g["f32_logprobs"]),
                &format!("{name} greedy {i}"),
            );
            hf.decode = hf.decode.merge(e);
        }
        hf
    }

    /// HF bf16's largest log-prob error on any of the model's reference tokens.
    fn max(&self) -> f64 {
        self.sequences.merge(self.text).merge(self.decode).max
    }

    /// The top-1 margin above which a bf16 engine has no excuse to pick another token.
    fn argmax_margin(&self) -> f64 {
        MARGIN.max(2.0 * self.max())
    }

    /// The bound for a test whose tokens are the ones `same_tokens` measured, `floor` below.
    fn bound(&self, same_tokens: &ErrStats, floor: f64) -> Bound {
        Bound {
            mean: floor.max(MEAN_FACTOR * same_tokens.mean()),
            max: floor.max(MAX_FACTOR * self.max()),
            hf_mean: same_tokens.mean(),
            hf_max: same_tokens.max,
        }
    }
}

/// One model's log-prob bound for one test, with the HF numbers it came from.
struct Bound {
    mean: f64,
    max: f64,
    /// HF bf16's mean and max error on the same tokens (printed beside ours).
    hf_mean: f64,
    hf_max: f64,
}

impl Bound {
    /// Records one token's error; a NaN or one above the max bound is a mismatch.
    fn token(
        &self,
        report: &mut Report,
        ours: &mut ErrStats,
        err: f64,
        what: impl FnOnce() -> String,
    ) {
        ours.add(err);
        // NaN fails: it is not within any bound.
        if err.is_nan() || err > self.max {
            report
                .0
                .push(format!("{} (|Δ| {err:.2e} > {:.2e})", what(), self.max));
        }
    }

    /// The mean over all tokens of the test, and one line with ours and HF's numbers.
    fn finish(&self, report: &mut Report, name: &str, what: &str, ours: &ErrStats) {
        if ours.mean().is_nan() || ours.mean() > self.mean {
            report.0.push(format!(
                "{name} {what}: mean |Δ| {:.2e} > {:.2e} (HF bf16 {:.2e} on the same tokens)",
                ours.mean(),
                self.mean,
                self.hf_mean
            ));
        }
        println!(
            "{name:<18} {what}: ours mean {:.2e} max {:.2e} over {} tokens | HF bf16 mean {:.2e} \
             max {:.2e} (same tokens) | bound mean {:.2e} max {:.2e}",
            ours.mean(),
            ours.max,
            ours.n,
            self.hf_mean,
            self.hf_max,
            self.mean,
            self.max
        );
    }
}

/// Argmax agreement with HF f32: positions compared, agreeing, those that had to agree, and
/// the disagreements HF's margin excuses (printed, not failed).
struct Agree {
    threshold: f64,
    all: usize,
    same: usize,
    required: usize,
    excused: Vec<String>,
}

impl Agree {
    fn new(threshold: f64) -> Agree {
        Agree {
            threshold,
            all: 0,
            same: 0,
            required: 0,
            excused: Vec::new(),
        }
    }

    fn check(&mut self, report: &mut Report, what: String, got: u32, want: u32, margin: f64) {
        self.all += 1;
        self.same += usize::from(got == want);
        let required = margin > self.threshold;
        self.required += usize::from(required);
        if got != want {
            let line = format!(
                "{what}: argmax {got}, HF {want} (margin {margin:.3}, threshold {:.3})",
                self.threshold
            );
            if required {
                report.0.push(line);
            } else {
                self.excused.push(line);
            }
        }
    }

    fn print_excused(&self) {
        for line in &self.excused {
            println!("    within bf16 error, not failed: {line}");
        }
    }
}

/// How many of `got` equal `want`, position by position.
fn count_equal(got: &[u32], want: &[u32]) -> usize {
    got.iter().zip(want).filter(|(a, b)| a == b).count()
}

/// The reference sequences packed into one forward on each device: log-probs against the
/// CPU's within the model's bound, and the argmax equal to HF's where the margin is clear.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fixtures_match_the_cpu_in_bf16() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for Fixture {
        name,
        dir,
        reference,
        hf,
    } in fixture_models()
    {
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

        let bound = hf.bound(&hf.sequences, TOL);
        let (mut logp, mut entropy) = (ErrStats::default(), ErrStats::default());
        let mut agree = Agree::new(hf.argmax_margin());
        let (mut hf_same, mut hf_all) = (0, 0);
        let mut at = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let margins = f64s(&seq["margins"]);
            let hf_argmax = u32s(&seq["argmax"]);
            hf_same += count_equal(&hf.seq_argmax[s], &hf_argmax);
            hf_all += hf_argmax.len();
            for i in 0..lens[s] {
                let r = at + i;
                if i + 1 < lens[s] {
                    let (g, w) = (got.logp[r] as f64, want.logp[r] as f64);
                    bound.token(&mut report, &mut logp, (g - w).abs(), || {
                        format!("{name} seq {s} logprob[{i}]: GPU {g} CPU {w}")
                    });
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
        bound.finish(&mut report, &name, "sequences log-prob |GPU−CPU|", &logp);
        println!(
            "{name:<18} entropy max |GPU−CPU| {:.2e}; argmax = HF f32 at {}/{} positions (HF bf16: \
             {hf_same}/{hf_all}); {} with margin > {:.3}, all required",
            entropy.max, agree.same, agree.all, agree.required, agree.threshold
        );
        agree.print_excused();
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
    for Fixture {
        name,
        dir,
        reference,
        hf,
    } in fixture_models()
    {
        let gpu = Model::load(&dir, GPU).unwrap();
        let mut agree = Agree::new(hf.argmax_margin());
        let mut hf_same = 0;
        for (g, case) in reference["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = u32s(&case["prompt_ids"]);
            let output = u32s(&case["output_ids"]);
            let margins = f64s(&case["margins"]);
            hf_same += count_equal(&hf.decode_argmax[g], &output);
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
            "{name:<18} greedy: GPU argmax = HF f32's token at {}/{} steps (HF bf16: {hf_same}/{}); \
             {} with margin > {:.3}, all required",
            agree.same, agree.all, agree.all, agree.required, agree.threshold
        );
        agree.print_excused();
    }
    report.finish();
}

/// Decoding through a KV cache on the GPU (prefill of the prompt, then one token a step, so
/// attention runs with 1 query against all cached keys): HF's greedy tokens fed back one at a
/// time get the log-probs the CPU's full f32 forward gives them, as closely as HF bf16's own
/// KV-cache decode gets HF f32's.
#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_cache_decode_matches_the_cpu() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for Fixture {
        name,
        dir,
        reference,
        hf,
    } in fixture_models()
    {
        let cpu = Model::load(&dir, Device::Cpu).unwrap();
        let gpu = Model::load(&dir, GPU).unwrap();
        let bound = hf.bound(&hf.decode, TOL);
        let mut err = ErrStats::default();
        for (g, case) in reference["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = u32s(&case["prompt_ids"]);
            let output = u32s(&case["output_ids"]);
            let want = cpu.completion_stats(&[(&prompt, &output)]).unwrap();
            let mut cache = CpuKvCache::new(gpu.config(), 1);
            let mut ids = prompt.clone();
            let mut fed = 0;
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
                let w = want[0].logp[step] as f64;
                bound.token(&mut report, &mut err, (got - w).abs(), || {
                    format!("{name} greedy {g} cached decode step {step}: GPU {got}, CPU {w}")
                });
                fed = ids.len();
                ids.push(next);
            }
        }
        bound.finish(&mut report, &name, "KV-cache decode |GPU−CPU|", &err);
    }
    report.finish();
}

/// Text rows through `completion_stats` on the GPU against HF's f32 log-probs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn text_rows_match_hf_in_bf16() {
    let _gpu = gpu_lock();
    let mut report = Report::default();
    for Fixture {
        name,
        dir,
        reference,
        hf,
    } in fixture_models()
    {
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
        // Against HF f32 rather than our CPU: the CPU's own 1e-4 rides on the floor.
        let bound = hf.bound(&hf.text, TOL + CPU_TOL);
        let mut err = ErrStats::default();
        for (r, row) in rows.iter().enumerate() {
            let want = f64s(&row["completion_logprobs"]);
            assert_eq!(stats[r].logp.len(), want.len(), "{name} text {r}");
            for (i, (&g, &w)) in stats[r].logp.iter().zip(&want).enumerate() {
                bound.token(&mut report, &mut err, (g as f64 - w).abs(), || {
                    format!("{name} text {r} logprob[{i}]: GPU {g}, HF {w}")
                });
            }
        }
        bound.finish(&mut report, &name, "text rows |GPU−HF f32|", &err);
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
        // Cached blocks left by earlier models could serve these buffers with up to a third
        // more bytes than asked: hand them back so `live` counts fresh, exactly sized blocks.
        backend.trim_memory();
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

        // What this guards against is a duplicated tied table: V·C·2 more bytes. The bound
        // sits halfway to that, 2·params + V·C, rather than at an exact count of overhead:
        // the arena rounds every buffer up to 512 bytes and the buffer count per layer differs
        // by family (biases, Gemma-2's extra norms), and a per-layer estimate of it already
        // failed once (llama-ropeparams: 502272 bytes for ~244608 parameters, i.e. 13 KB over
        // 2·params, when the slack allowed 12 KB). Half a table is 96 KB for llama-ropeparams
        // and 47 KB for gemma2-tiny (~50 buffers, ≤ 25 KB of rounding): room for the overhead,
        // and still well short of a second table.
        let cfg = cpu.config();
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let per_layer = c * (cfg.q_dim() + 2 * cfg.kv_dim())
            + cfg.q_dim() * c
            + 3 * c * cfg.intermediate_size
            + 4 * c;
        let head = if cfg.tie_word_embeddings { 0 } else { v * c };
        let params = v * c + head + c + cfg.num_layers * per_layer;
        let bound = 2 * params + (v * c * 2) / 2;
        assert!(
            live <= bound,
            "{name}: {live} bytes on the GPU for ~{params} parameters, over 2·params + V·C = \
             {bound} (tied: {}; a duplicated tied table adds V·C·2 = {})",
            cfg.tie_word_embeddings,
            v * c * 2
        );
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
