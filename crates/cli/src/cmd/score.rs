//! `prefer score`: completion log-probs under a model — DPO's reference pass, exposed.
//!
//! Stages: read and check every row (errors name `file:line`), tokenize the text rows in
//! parallel the way TRL does, pack rows into forwards by a token budget (longest first, so
//! batches are dense), score, and write the output rows in input order to `<out>.tmp`,
//! renamed to `<out>` only when everything succeeded — a failed run leaves no output file.
//!
//! `--device cuda[:N]` runs the model in bf16 on a GPU (see the model crate); the output has
//! the same format. `--stats`, `--warmup` and `--profile` are for benchmarks: a JSON summary
//! (timings, tokens/s, peak GPU memory, and with `--profile` the time per op kind) on stderr.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::Device;
use indicatif::{ProgressBar, ProgressStyle};
use model::{Model, Tokenizer};
use serde_json::{Map, Value};

const AFTER_HELP: &str = "\
Input: JSON Lines, one object per line (blank lines are skipped). Each row needs either
  \"prompt\" and \"completion\" strings, or
  \"prompt_ids\" and \"completion_ids\" arrays of token ids.
If a row has both forms, the ids are scored and the text is ignored.

Text is tokenized as TRL 1.16's DPO trainer does: the prompt alone and prompt + completion
together, both with the tokenizer's special tokens (e.g. its BOS); the prompt is their common
prefix and the completion every token after it. With --add-eos the tokenizer's eos_token
string is appended to the completion text first, unless the completion already ends with it.

Output: JSON Lines in input order; each row is the input object, all its fields kept in their
order, plus
  \"logp\"         the sum of the completion's token log-probs, and
  \"token_logps\"  log p(c_t | prompt, c_<t) for each completion token.
Tokenized ids are not added to text rows (re-tokenize, or score ids rows, to get them).
The output is written to <OUT>.tmp and renamed to <OUT> when every row is scored.

On a GPU (--device cuda or cuda:N) the model runs in bf16, as transformers does with
dtype=torch.bfloat16: log-probs differ from the CPU's f32 ones by bf16 rounding (about 1e-2).

--stats prints one line to stderr at the end: `prefer score stats: {JSON}` with the rows,
tokens, seconds per stage, tokens/s of the timed scoring pass (`timed_s`: after --warmup's
untimed pass, without it) and, on a GPU, the peak device memory
(bytes live in prefer's allocator, and reserved from the driver). --profile adds the GPU (or
CPU) time of each op kind over one extra pass of the first batch.";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Model directory: config.json, model.safetensors (or a sharded index), and
    /// tokenizer.json + tokenizer_config.json when rows carry text.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Input rows (JSON Lines).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Output rows (JSON Lines).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tokens per forward pass: rows are packed until their total length reaches this
    /// (a longer row runs alone). Default: 8192 on the CPU, 65536 on a GPU.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_tokens: Option<u64>,
    /// Append the tokenizer's EOS to each text completion (as TRL does for DPO).
    #[arg(long)]
    add_eos: bool,
    /// Print a JSON summary to stderr at the end: timings, tokens/s, peak GPU memory.
    #[arg(long)]
    stats: bool,
    /// Score the first batch once, untimed, before the timed run (benchmarks: keeps one-off
    /// start-up costs out of the tokens/s). The output does not change.
    #[arg(long)]
    warmup: bool,
    /// After scoring, time each op kind over one more pass of the first batch and add the
    /// breakdown to the --stats summary (implies --stats).
    #[arg(long)]
    profile: bool,
}

/// Default token budget per forward: a GPU needs long batches to be busy; on the CPU a
/// smaller one keeps memory modest at no cost in speed.
const CPU_BATCH_TOKENS: usize = 8192;
const GPU_BATCH_TOKENS: usize = 65536;

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    let budget = args.batch_tokens.map_or(
        match device {
            Device::Cpu => CPU_BATCH_TOKENS,
            Device::Cuda(_) => GPU_BATCH_TOKENS,
        },
        |b| b as usize,
    );
    let mut timer = StageTimer::default();
    let rows = read_rows(&args.data)?;
    timer.lap("read_s");
    let model = Model::load(&args.model, device)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let weights_bytes = gpu_memory(device)?.map(|m| m.live);
    timer.lap("load_s");
    let seqs = tokenize_rows(&rows, &args, model.config().vocab_size)?;
    timer.lap("tokenize_s");
    let run = score_all(&model, &seqs, budget, args.warmup)?;
    timer.lap("score_s");
    let profile = if args.profile {
        Some(profile_first_batch(&model, &seqs, &run)?)
    } else {
        None
    };
    write_output(&args.out, &rows, &run.scores)?;
    timer.lap("write_s");
    if args.stats || args.profile {
        let mut stats = Map::new();
        stats.insert("device".into(), Value::from(device.to_string()));
        stats.insert(
            "model".into(),
            Value::from(args.model.display().to_string()),
        );
        stats.insert("rows".into(), Value::from(seqs.len()));
        stats.insert("batches".into(), Value::from(run.batch_ms.len()));
        stats.insert("batch_tokens".into(), Value::from(budget));
        stats.insert("tokens".into(), Value::from(run.tokens));
        stats.insert("scored_tokens".into(), Value::from(run.scored_tokens));
        // The timed pass only: `score_s` below also holds the warm-up pass, if any.
        stats.insert("timed_s".into(), Value::from(run.seconds));
        stats.insert(
            "tokens_per_s".into(),
            Value::from(run.tokens as f64 / run.seconds.max(1e-9)),
        );
        stats.insert("warmup".into(), Value::from(args.warmup));
        stats.insert("warmup_s".into(), Value::from(run.warmup_seconds));
        for (name, seconds) in &timer.laps {
            stats.insert((*name).into(), Value::from(*seconds));
        }
        stats.insert("batch_ms".into(), Value::from(run.batch_ms.clone()));
        if let Some(mem) = gpu_memory(device)? {
            stats.insert("weights_bytes".into(), Value::from(weights_bytes));
            stats.insert("peak_live_bytes".into(), Value::from(mem.peak_live));
            stats.insert("peak_reserved_bytes".into(), Value::from(mem.peak_reserved));
            stats.insert("driver_allocs".into(), Value::from(mem.driver_allocs));
        }
        if let Some(p) = profile {
            stats.insert("profile".into(), p);
        }
        eprintln!("prefer score stats: {}", Value::Object(stats));
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`, as the engine parses it.
pub(crate) fn parse_device(s: &str) -> Result<Device> {
    s.parse::<Device>()
        .map_err(|e| anyhow::anyhow!("--device {s:?}: {e}"))
}

/// The GPU allocator's counters (None on the CPU).
pub(crate) fn gpu_memory(device: Device) -> Result<Option<engine::cuda::MemoryStats>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(n) => Ok(Some(
            engine::cuda::CudaBackend::get(n)
                .context("the CUDA device")?
                .memory_stats(),
        )),
    }
}

/// Wall-clock seconds of each stage, in order.
struct StageTimer {
    last: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Default for StageTimer {
    fn default() -> Self {
        StageTimer {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }
}

impl StageTimer {
    /// Ends the stage `name`: returns and records its seconds.
    fn lap(&mut self, name: &'static str) -> f64 {
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        self.laps.push((name, seconds));
        seconds
    }
}

/// One input row as read: its object, its line number, and what to score.
struct Row {
    line: usize,
    object: Map<String, Value>,
    input: RowInput,
}

enum RowInput {
    Text {
        prompt: String,
        completion: String,
    },
    Ids {
        prompt: Vec<u32>,
        completion: Vec<u32>,
    },
}

fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the input rows {}", path.display()))?;
    // A UTF-8 byte-order mark (as some editors write) is not part of the first row.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{line_no}", path.display());
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Value::Object(object) = value else {
            bail!("{}: expected a JSON object, got {}", at(), kind(&value));
        };
        let input = row_input(&object).map_err(|msg| anyhow::anyhow!("{}: {msg}", at()))?;
        rows.push(Row {
            line: line_no,
            object,
            input,
        });
    }
    if rows.is_empty() {
        bail!("{}: no rows to score", path.display());
    }
    Ok(rows)
}

/// What a row asks to score; the message says what is wrong with it.
fn row_input(object: &Map<String, Value>) -> std::result::Result<RowInput, String> {
    if object.contains_key("prompt_ids") || object.contains_key("completion_ids") {
        return Ok(RowInput::Ids {
            prompt: id_array(object, "prompt_ids")?,
            completion: id_array(object, "completion_ids")?,
        });
    }
    match (object.get("prompt"), object.get("completion")) {
        (Some(Value::String(p)), Some(Value::String(c))) => Ok(RowInput::Text {
            prompt: p.clone(),
            completion: c.clone(),
        }),
        (None, _) | (_, None) => Err(
            "each row needs \"prompt\" and \"completion\" strings, or \"prompt_ids\" and \
             \"completion_ids\" arrays of token ids"
                .into(),
        ),
        (Some(p), Some(c)) => {
            let (field, v) = if p.is_string() {
                ("completion", c)
            } else {
                ("prompt", p)
            };
            Err(format!("\"{field}\" must be a string, got {}", kind(v)))
        }
    }
}

fn id_array(object: &Map<String, Value>, field: &str) -> std::result::Result<Vec<u32>, String> {
    let Some(value) = object.get(field) else {
        return Err(format!(
            "\"{field}\" is missing (rows with token ids need both \"prompt_ids\" and \
             \"completion_ids\")"
        ));
    };
    let Value::Array(items) = value else {
        return Err(format!(
            "\"{field}\" must be an array of token ids, got {}",
            kind(value)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    format!("{field}[{i}] = {v} is not a token id (a non-negative integer)")
                })
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Prompt and completion ids of every row, checked against the model's vocabulary.
fn tokenize_rows(rows: &[Row], args: &Args, vocab: usize) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let texts: Vec<(&str, &str)> = rows
        .iter()
        .filter_map(|r| match &r.input {
            RowInput::Text { prompt, completion } => Some((prompt.as_str(), completion.as_str())),
            RowInput::Ids { .. } => None,
        })
        .collect();
    let mut encoded = if texts.is_empty() {
        Vec::new()
    } else {
        let tokenizer = Tokenizer::load(&args.model)
            .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
        tokenizer.encode_prompt_completions(&texts, args.add_eos)
    }
    .into_iter();

    let mut seqs = Vec::with_capacity(rows.len());
    for row in rows {
        let at = || format!("{}:{}", args.data.display(), row.line);
        let (prompt, completion, origin) = match &row.input {
            RowInput::Ids { prompt, completion } => (prompt.clone(), completion.clone(), ""),
            RowInput::Text { .. } => {
                let pc = encoded
                    .next()
                    .context("internal: one tokenization per text row")?
                    .with_context(at)?;
                (
                    pc.prompt_ids,
                    pc.completion_ids,
                    " (from tokenizing the text)",
                )
            }
        };
        for (field, ids) in [("prompt_ids", &prompt), ("completion_ids", &completion)] {
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= vocab)
            {
                bail!(
                    "{}: {field}[{i}] = {id}{origin} is out of the model's vocabulary \
                     (vocab_size {vocab})",
                    at()
                );
            }
        }
        if prompt.is_empty() {
            bail!(
                "{}: the prompt is empty{origin}: the first completion token would have no \
                 context to be scored in",
                at()
            );
        }
        seqs.push((prompt, completion));
    }
    Ok(seqs)
}

/// Groups of row indices, each at most `budget` tokens (a longer row alone), longest rows
/// first so that batches are dense.
fn plan_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut tokens = 0;
    for i in order {
        match batches.last_mut() {
            Some(batch) if tokens + lens[i] <= budget => {
                batch.push(i);
                tokens += lens[i];
            }
            _ => {
                batches.push(vec![i]);
                tokens = lens[i];
            }
        }
    }
    batches
}

/// The scores of a run and what the summary reports about it.
struct ScoreRun {
    /// Completion token log-probs of every row, in row order.
    scores: Vec<Vec<f32>>,
    batches: Vec<Vec<usize>>,
    /// Wall milliseconds of each batch (forward, log-probs and the copy back).
    batch_ms: Vec<f64>,
    /// Prompt + completion tokens, and completion tokens alone.
    tokens: usize,
    scored_tokens: usize,
    /// Wall seconds of the timed pass over every batch (the warm-up excluded).
    seconds: f64,
    /// Wall seconds of the warm-up pass (0 without one).
    warmup_seconds: f64,
}

/// The rows of `batch` as the model takes them.
fn batch_pairs<'a>(
    seqs: &'a [(Vec<u32>, Vec<u32>)],
    batch: &[usize],
) -> Vec<(&'a [u32], &'a [u32])> {
    batch
        .iter()
        .map(|&i| (seqs[i].0.as_slice(), seqs[i].1.as_slice()))
        .collect()
}

/// Scores every row in batches of at most `budget` tokens; with `warmup`, the first batch
/// once more before, untimed.
fn score_all(
    model: &Model,
    seqs: &[(Vec<u32>, Vec<u32>)],
    budget: usize,
    warmup: bool,
) -> Result<ScoreRun> {
    let lens: Vec<usize> = seqs.iter().map(|(p, c)| p.len() + c.len()).collect();
    let batches = plan_batches(&lens, budget);
    let warmup_start = Instant::now();
    if warmup && let Some(first) = batches.first() {
        model
            .completion_stats(&batch_pairs(seqs, first))
            .context("warming up on the first batch")?;
    }
    let warmup_seconds = warmup_start.elapsed().as_secs_f64();
    let bar = ProgressBar::new(seqs.len() as u64).with_style(
        ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} rows, {msg} ({elapsed})")
            .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let mut done_tokens = 0usize;
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    let mut batch_ms = Vec::with_capacity(batches.len());
    for batch in &batches {
        let t0 = Instant::now();
        let stats = model
            .completion_stats(&batch_pairs(seqs, batch))
            .context("scoring a batch of rows")?;
        batch_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        for (&i, s) in batch.iter().zip(stats) {
            scores[i] = s.logp;
            done_tokens += lens[i];
        }
        let rate = done_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{rate:.0} tokens/s"));
        bar.inc(batch.len() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    tracing::info!(rows = seqs.len(), tokens = done_tokens, seconds, "scored");
    Ok(ScoreRun {
        scores,
        batches,
        batch_ms,
        tokens: done_tokens,
        scored_tokens: seqs.iter().map(|(_, c)| c.len()).sum(),
        seconds,
        warmup_seconds,
    })
}

/// Times each op kind over one more pass of the first batch. GPU ops are timed one by one
/// with CUDA events (each waits for the one before), so the sum of op times is the GPU's busy
/// time; `wall_ms` is the same batch's unprofiled time from the scoring run.
fn profile_first_batch(
    model: &Model,
    seqs: &[(Vec<u32>, Vec<u32>)],
    run: &ScoreRun,
) -> Result<Value> {
    let (Some(first), Some(&wall_ms)) = (run.batches.first(), run.batch_ms.first()) else {
        return Ok(Value::Null);
    };
    model.start_profile();
    let result = model.completion_stats(&batch_pairs(seqs, first));
    let times = model.stop_profile();
    result.context("profiling the first batch")?;
    let total = times.total_ms();
    let gemm = times.ms(model::OpKind::Gemm);
    let mut ops = Map::new();
    for (kind, (ms, calls)) in &times.by_kind {
        ops.insert(
            kind.name().into(),
            serde_json::json!({"ms": ms, "calls": calls}),
        );
    }
    let tokens: usize = first
        .iter()
        .map(|&i| seqs[i].0.len() + seqs[i].1.len())
        .sum();
    Ok(serde_json::json!({
        "batch_rows": first.len(),
        "batch_tokens": tokens,
        "wall_ms": wall_ms,
        "ops_total_ms": total,
        "ops": Value::Object(ops),
        "gemm_share_of_ops": gemm / total.max(1e-9),
        "gemm_share_of_wall": gemm / wall_ms.max(1e-9),
        "note": "gemm = the layers' linear projections; lm_head_logprobs (its GEMMs and the softmax fold) is separate",
    }))
}

/// Removes the temporary output unless the run completed.
struct TempOutput {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The f64 whose shortest decimal is the f32's own (-9.211389, not -9.211389541625977): the
/// output shows the digits the f32 holds, and parsing them back gives the same f32.
fn shortest(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

fn write_output(out: &Path, rows: &[Row], scores: &[Vec<f32>]) -> Result<()> {
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let mut tmp = TempOutput {
        path: PathBuf::from(tmp_name),
        committed: false,
    };
    let file = File::create(&tmp.path)
        .with_context(|| format!("creating the output {}", tmp.path.display()))?;
    let mut w = BufWriter::new(file);
    for (row, token_logps) in rows.iter().zip(scores) {
        let mut object = row.object.clone();
        let logp: f64 = token_logps.iter().map(|&x| x as f64).sum();
        object.insert("logp".into(), Value::from(logp));
        object.insert(
            "token_logps".into(),
            Value::Array(
                token_logps
                    .iter()
                    .map(|&x| Value::from(shortest(x)))
                    .collect(),
            ),
        );
        serde_json::to_writer(&mut w, &Value::Object(object))
            .with_context(|| format!("writing {}", tmp.path.display()))?;
        w.write_all(b"\n")
            .with_context(|| format!("writing {}", tmp.path.display()))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.path.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", tmp.path.display()))?;
    std::fs::rename(&tmp.path, out)
        .with_context(|| format!("renaming {} to {}", tmp.path.display(), out.display()))?;
    tmp.committed = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_round_trips() {
        for x in [-9.211_39_f32, 0.1, -1e-30, 123_456.7, 0.0] {
            let y = shortest(x);
            assert_eq!(y as f32, x);
            assert!(
                format!("{y}").len() <= format!("{x}").len() + 2,
                "{x} → {y}"
            );
        }
    }

    #[test]
    fn devices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        let e = parse_device("gpu").unwrap_err().to_string();
        assert!(e.contains("--device") && e.contains("cuda:N"), "{e}");
        assert!(parse_device("cuda:x").is_err());
    }

    #[test]
    fn batches_respect_the_budget() {
        let lens = [5, 1, 9, 3, 3, 20, 2];
        let batches = plan_batches(&lens, 10);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| lens[i]).sum();
            assert!(total <= 10 || b.len() == 1, "{b:?}");
        }
        // The over-long row runs alone, first.
        assert_eq!(batches[0], vec![5]);
    }

    #[test]
    fn row_forms() {
        let obj = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
        assert!(matches!(
            row_input(&obj(r#"{"prompt": "a", "completion": "b"}"#)),
            Ok(RowInput::Text { .. })
        ));
        assert!(matches!(
            row_input(&obj(
                r#"{"prompt": "a", "completion": "b", "prompt_ids": [1], "completion_ids": []}"#
            )),
            Ok(RowInput::Ids { .. })
        ));
        let e = row_input(&obj(r#"{"prompt": "a"}"#)).err().unwrap();
        assert!(e.contains("completion"), "{e}");
        let e = row_input(&obj(r#"{"prompt": "a", "completion": 3}"#))
            .err()
            .unwrap();
        assert!(e.contains("\"completion\" must be a string"), "{e}");
        let e = row_input(&obj(r#"{"prompt_ids": [1, -2], "completion_ids": [3]}"#))
            .err()
            .unwrap();
        assert!(e.contains("prompt_ids[1]"), "{e}");
        let e = row_input(&obj(r#"{"prompt_ids": [1]}"#)).err().unwrap();
        assert!(e.contains("completion_ids"), "{e}");
    }
}
