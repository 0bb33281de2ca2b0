//! `prefer score`: completion log-probs under a model — DPO's reference pass, exposed.
//!
//! Stages: read and check every row (errors name `file:line`), tokenize the text rows in
//! parallel the way TRL does, pack rows into forwards by a token budget (longest first, so
//! batches are dense), score, and write the output rows in input order to `<out>.tmp`,
//! renamed to `<out>` only when everything succeeded — a failed run leaves no output file.

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
The output is written to <OUT>.tmp and renamed to <OUT> when every row is scored.";

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
    /// (a longer row runs alone).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    batch_tokens: u64,
    /// Append the tokenizer's EOS to each text completion (as TRL does for DPO).
    #[arg(long)]
    add_eos: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    if device != Device::Cpu {
        bail!(
            "--device {device}: the CUDA backend is not available yet in this build; \
             use --device cpu"
        );
    }
    let rows = read_rows(&args.data)?;
    let model = Model::load(&args.model, device)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let seqs = tokenize_rows(&rows, &args, model.config().vocab_size)?;
    let scores = score_all(&model, &seqs, args.batch_tokens as usize)?;
    write_output(&args.out, &rows, &scores)
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
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

/// Completion token log-probs of every row, in row order.
fn score_all(model: &Model, seqs: &[(Vec<u32>, Vec<u32>)], budget: usize) -> Result<Vec<Vec<f32>>> {
    let lens: Vec<usize> = seqs.iter().map(|(p, c)| p.len() + c.len()).collect();
    let batches = plan_batches(&lens, budget);
    let bar = ProgressBar::new(seqs.len() as u64).with_style(
        ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} rows, {msg} ({elapsed})")
            .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let mut done_tokens = 0usize;
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    for batch in batches {
        let pairs: Vec<(&[u32], &[u32])> = batch
            .iter()
            .map(|&i| (seqs[i].0.as_slice(), seqs[i].1.as_slice()))
            .collect();
        let stats = model
            .completion_stats(&pairs)
            .context("scoring a batch of rows")?;
        for (&i, s) in batch.iter().zip(stats) {
            scores[i] = s.logp;
            done_tokens += lens[i];
        }
        let rate = done_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{rate:.0} tokens/s"));
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    tracing::info!(
        rows = seqs.len(),
        tokens = done_tokens,
        seconds = start.elapsed().as_secs_f64(),
        "scored"
    );
    Ok(scores)
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
        assert!(parse_device("gpu").is_err());
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
