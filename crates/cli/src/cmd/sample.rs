//! `prefer sample`: n completions per prompt from a model, as vLLM's offline
//! `LLM.generate` makes them — the rejected side of a DPO dataset.
//!
//! Stages: settings (flags over a TOML file over vLLM's defaults) → input rows (see
//! `input.rs`) → tokenize and check every prompt (empty, out of vocabulary, longer than the
//! context: errors naming the row, before any model work) → open the output and skip the
//! samples an earlier run finished → generate with the sample crate's engine (paged KV
//! cache, continuous batching, chunked prefill), appending each row as its sequence
//! finishes → for `--out FILE.parquet`, convert the rows (appended meanwhile to a JSON Lines
//! sidecar, see `output.rs`) into the parquet file. Ctrl-C stops after the current step;
//! what finished is on disk, and the same command continues.

mod input;
mod output;
mod parquet_rows;
mod settings;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::Device;
use indicatif::{ProgressBar, ProgressStyle};
use model::{GenerationConfig, Model, ModelConfig, Tokenizer};
use rayon::prelude::*;
use sample::{
    Engine, EngineConfig, ModelRunner, NewSequence, PagedRunner, RowContext, SampleKey, Sampler,
    SamplesFile, SequenceState, StepModel, StopTokens, ValidParams, plan_gpu_memory, sample_row,
};

use input::{InputRow, Prompt};
use output::{Opened, Output};
use settings::SamplingFlags;

const AFTER_HELP: &str = "\
Input (--data):
  A .jsonl of ready prompts: each line an object with \"prompt\" (text, tokenized with the
  tokenizer's special tokens, as vLLM does) or \"prompt_ids\" (token ids, used as given).
  Or any dataset `prefer pairs` reads (jsonl, json, csv/tsv, parquet, xlsx, save_to_disk
  folders) with a column mapping, PATH[:instruction=COL,input=COL,prompt=COL,id=COL,sheet=S,
  split=S], and --template to build prompts from instructions.
  Every row needs a non-empty prompt; ids (an id field/column, else FILE:ROW with ROW the
  0-based row index) must be unique. A row's own \"max_tokens\" (a positive integer field or
  column) overrides --max-tokens for that row.

Output (--out FILE.jsonl: JSON Lines, appended as completions finish, in finishing order):
  per completion id, sample_index, the input row's fields, prompt, prompt_token_count, text,
  token_ids, finish_reason (stop/length), stop_reason (the stop token id or string, or null),
  cumulative_logprob; with --logprobs N token_logprobs (raw model log-probs), with N > 0
  top_logprobs, and ref_logps when prompt + text re-tokenize (TRL-style, EOS appended) to
  exactly the sampled tokens. Run the same command again to continue an interrupted run.
  --out FILE.parquet: the same columns, typed (stop_reason as struct<token_id, string>),
  written when every row is done; until then rows go to FILE.parquet.partial.jsonl, which
  a re-run continues.

Prompts longer than the model's context are an error (listing them), not skipped.
See docs/sample.md for the semantics (vLLM's).";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Model directory: config.json, safetensors, tokenizer.json (+ tokenizer_config.json,
    /// generation_config.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Input rows: a file or save_to_disk folder, optionally with a column mapping.
    #[arg(long, value_name = "SPEC")]
    data: String,
    /// Output samples: FILE.jsonl (JSON Lines) or FILE.parquet. An unfinished output is
    /// resumed, never overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Prompt template for dataset rows: korean (the reference workflow's), alpaca, chatml,
    /// chat (the model's chat template), or the path of a Jinja template file.
    #[arg(long, value_name = "NAME|FILE")]
    template: Option<String>,
    /// Add the tokenizer's special tokens (BOS) when tokenizing prompts [default: true,
    /// false for chat templates and template files, which render them].
    #[arg(long, value_name = "BOOL")]
    add_special_tokens: Option<bool>,
    /// Where to run: cpu, cuda (GPU 0) or cuda:N. On a GPU the weights are bf16 and the KV
    /// cache lives in paged pools on the device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Fraction of the GPU's memory this run may use (vLLM's gpu_memory_utilization): the
    /// KV cache gets what the weights and the largest step's activations leave of it.
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    gpu_memory_utilization: f64,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Context length (prompt + output) [default: the model's max_position_embeddings].
    #[arg(long, value_name = "TOKENS")]
    max_model_len: Option<usize>,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    block_size: u64,
    /// Memory for the KV cache, in GiB [default: 4 on the CPU; on a GPU, sized from
    /// --gpu-memory-utilization]. The pool is never larger than max_num_seqs sequences of
    /// the longest possible length need.
    #[arg(long, value_name = "GIB")]
    kv_cache_memory: Option<f64>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_num_seqs: u64,
    /// Most tokens in one step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    max_num_batched_tokens: u64,
    /// Run every step's kernels one by one instead of replaying decode steps as CUDA graphs
    /// (vLLM's flag; PREFER_CUDA_GRAPHS=0 does the same). Slower; for debugging.
    #[arg(long)]
    enforce_eager: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device: Device = args
        .device
        .parse()
        .map_err(|_| anyhow::anyhow!("--device {:?}: expected cpu, cuda or cuda:N", args.device))?;
    // Fail before any input is read when the GPU cannot be used.
    if let Device::Cuda(n) = device {
        engine::cuda::CudaBackend::get(n).map_err(|e| {
            anyhow::anyhow!("--device {device}: {e} (--device cpu runs without a GPU)")
        })?;
    }
    let output = Output::from_arg(&args.out)?;
    if let Some(gib) = args.kv_cache_memory
        && !(gib > 0.0 && gib.is_finite())
    {
        bail!("--kv-cache-memory {gib}: expected a positive number of GiB");
    }
    let utilization = args.gpu_memory_utilization;
    if !(utilization > 0.0 && utilization <= 1.0) {
        bail!("--gpu-memory-utilization {utilization}: expected a fraction in (0, 1]");
    }
    let params = sampling_params(&args.sampling)?;

    let input = input::read(&args.data, args.template.as_deref(), &args.model)?;
    let config = ModelConfig::from_file(&args.model.join("config.json"))
        .with_context(|| format!("reading the model config in {}", args.model.display()))?;
    let tokenizer = Tokenizer::load(&args.model)
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
    let add_special = args
        .add_special_tokens
        .unwrap_or(!input.renders_special_tokens);
    let max_model_len = args
        .max_model_len
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let prompts = tokenize(&input.rows, &tokenizer, add_special)?;
    check_prompts(&input.rows, &prompts, config.vocab_size, max_model_len)?;
    let row_max_tokens = row_max_tokens(&input.rows)?;
    // The longest a sequence can get: what the KV cache is sized for.
    let longest = prompts
        .iter()
        .zip(&row_max_tokens)
        .map(|(p, m)| {
            let out = m
                .or(params.max_tokens)
                .map_or(max_model_len, |m| m as usize);
            (p.len() + out).min(max_model_len)
        })
        .max()
        .unwrap_or(0);

    // What is left to do.
    let wanted: Vec<SampleKey> = input
        .rows
        .iter()
        .flat_map(|row| {
            (0..params.n).map(|k| SampleKey {
                id: row.id.clone(),
                sample_index: k,
            })
        })
        .collect();
    let (mut out, resume) = match output.open(&wanted)? {
        Opened::Finished => return Ok(()),
        Opened::Appending(file, resume) => (file, resume),
    };
    let n = params.n as usize;
    let todo: Vec<(usize, u32)> = wanted
        .iter()
        .enumerate()
        .filter(|(_, key)| !resume.done.contains(key))
        .map(|(i, key)| (i / n, key.sample_index))
        .collect();
    drop(wanted);
    let total = input.rows.len() * n;
    if resume.rows > 0 {
        eprintln!(
            "resuming {}: {} of {total} samples already there, {} to go",
            out.path().display(),
            total - todo.len(),
            todo.len()
        );
    }
    if todo.is_empty() {
        eprintln!("nothing to do: every sample is in {}", out.path().display());
        return output.finish(out);
    }

    let model = Model::load(&args.model, device).with_context(|| {
        format!(
            "loading the model from {} onto {device}",
            args.model.display()
        )
    })?;
    let runner = runner(&args, model, longest, max_model_len)?;
    let engine_config = EngineConfig {
        max_num_seqs: args.max_num_seqs as usize,
        max_num_batched_tokens: args.max_num_batched_tokens as usize,
    };
    let mut engine = Engine::new(runner, engine_config)?;

    let generation_eos = match GenerationConfig::load(&args.model)? {
        Some(g) => g.eos_token_ids,
        // vLLM falls back to the generation config transformers derives from config.json.
        None => config.eos_token_ids.clone(),
    };
    let stop_tokens = Arc::new(StopTokens::new(
        &params,
        tokenizer.eos_token_id(),
        &generation_eos,
    ));
    let detok = Arc::new(
        sample::tokenizers::Tokenizer::from_file(args.model.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.model.join("tokenizer.json").display()))?,
    );
    let sampler = Sampler::new(run_seed(&params));
    let params = Arc::new(strip_seed(&params)?);
    let logprobs = params.num_top_logprobs(config.vocab_size);

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second Ctrl-C exits at once: every finished row is already on disk.
        let handler = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
        if let Err(e) = handler {
            tracing::warn!("cannot catch Ctrl-C ({e}); an interrupt will stop at once");
        }
    }

    let bar = progress_bar(todo.len())?;
    let start = Instant::now();
    let target_queue = (args.max_num_seqs as usize).saturating_mul(2).max(1);
    let mut pending = todo.into_iter();
    // Parameters of the rows with their own max_tokens, one per value.
    let mut by_max_tokens: HashMap<u32, Arc<ValidParams>> = HashMap::new();
    loop {
        while engine.num_unfinished() < target_queue {
            let Some((r, k)) = pending.next() else { break };
            let row = &input.rows[r];
            let params = match row_max_tokens[r] {
                None => params.clone(),
                Some(m) => match by_max_tokens.get(&m) {
                    Some(p) => p.clone(),
                    None => {
                        let mut p = params.params().clone();
                        p.max_tokens = Some(m);
                        let p = Arc::new(
                            p.validate()
                                .with_context(|| format!("{}: max_tokens {m}", row.location))?,
                        );
                        by_max_tokens.insert(m, p.clone());
                        p
                    }
                },
            };
            let new = NewSequence {
                params: params.clone(),
                prompt_ids: prompts[r].clone(),
                tokenizer: detok.clone(),
                stop_tokens: stop_tokens.clone(),
                rng: sampler.rng_for(&params, stable_hash(&row.id), k),
                max_model_len: Some(max_model_len),
            };
            engine
                .add((r, k), new)
                .with_context(|| format!("{}: cannot be sampled", row.location))?;
        }
        if !engine.has_unfinished() {
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
        for done in engine.step().context("generating")? {
            let (r, k) = done.tag;
            write_row(&mut out, &input.rows[r], k, &done.seq, logprobs, &tokenizer)?;
            bar.inc(1);
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.0} tokens/s",
            engine.stats().generated_tokens as f64 / secs
        ));
    }
    out.sync()?;
    if let Some(times) = engine.model().time_summary() {
        eprintln!("{times}");
    }
    let stats = engine.stats();
    let secs = start.elapsed().as_secs_f64();
    if interrupted.load(Ordering::SeqCst) {
        bar.abandon();
        bail!(
            "interrupted: {} rows written to {}{} ({} in flight were dropped); run the same \
             command again to continue",
            out.written(),
            out.path().display(),
            output.pending_note(),
            engine.num_unfinished()
        );
    }
    bar.finish_and_clear();
    eprintln!(
        "wrote {} rows to {}: {} tokens in {secs:.1} s ({:.0} tokens/s), {} preemptions",
        out.written(),
        out.path().display(),
        stats.generated_tokens,
        stats.generated_tokens as f64 / secs.max(1e-9),
        stats.preemptions
    );
    output.finish(out)
}

fn sampling_params(flags: &SamplingFlags) -> Result<ValidParams> {
    Ok(flags.params()?.validate()?)
}

/// The run's seed (`seed` of the settings; 0 when unset).
fn run_seed(params: &ValidParams) -> u64 {
    params.seed.map_or(0, |s| s as u64)
}

/// The parameters each sequence gets: the seed is the run's, not each request's (a
/// per-request seed would give every row the same random stream).
fn strip_seed(params: &ValidParams) -> Result<ValidParams> {
    let mut p = params.params().clone();
    p.seed = None;
    Ok(p.validate()?)
}

/// FNV-1a of the id: a key that does not change between runs or platforms.
fn stable_hash(id: &str) -> u64 {
    id.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Each row's own `max_tokens` (a positive integer field of a ready-prompt row, or a
/// column), which overrides `--max-tokens` for that row, as a per-request SamplingParams
/// does in vLLM.
fn row_max_tokens(rows: &[InputRow]) -> Result<Vec<Option<u32>>> {
    rows.iter()
        .map(|row| match row.fields.get("max_tokens") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => bail!(
                    "{}: \"max_tokens\" must be a positive integer (the row's own limit), got {v}",
                    row.location
                ),
            },
        })
        .collect()
}

/// Token ids of every prompt, in row order.
fn tokenize(rows: &[InputRow], tokenizer: &Tokenizer, add_special: bool) -> Result<Vec<Vec<u32>>> {
    rows.par_iter()
        .map(|row| match &row.prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(text) => tokenizer
                .encode_with(text, add_special)
                .with_context(|| format!("{}: tokenizing the prompt", row.location)),
        })
        .collect()
}

/// Empty prompts, ids outside the vocabulary and prompts longer than the context are
/// errors, all found before the model loads.
fn check_prompts(
    rows: &[InputRow],
    prompts: &[Vec<u32>],
    vocab: usize,
    max_len: usize,
) -> Result<()> {
    for (row, ids) in rows.iter().zip(prompts) {
        if ids.is_empty() {
            bail!("{}: the prompt is empty (no tokens)", row.location);
        }
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            bail!(
                "{}: prompt token {i} is id {id}, outside the model's vocabulary of {vocab}",
                row.location
            );
        }
    }
    let long: Vec<String> = rows
        .iter()
        .zip(prompts)
        .filter(|(_, ids)| ids.len() > max_len)
        .map(|(row, ids)| format!("{} ({} tokens)", row.location, ids.len()))
        .collect();
    if !long.is_empty() {
        let shown = long.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        let more = if long.len() > 10 {
            format!(" and {} more", long.len() - 10)
        } else {
            String::new()
        };
        bail!(
            "{} prompts are longer than the model's context of {max_len} tokens: {shown}{more}; \
             shorten or drop them (or raise --max-model-len up to max_position_embeddings)",
            long.len()
        );
    }
    Ok(())
}

/// The model behind the engine. On the CPU: [`ModelRunner`] with a KV pool of
/// `--kv-cache-memory` (4 GiB by default). On a GPU: [`PagedRunner`], its pools sized from
/// `--gpu-memory-utilization` (or `--kv-cache-memory` when given). Either way the pool is no
/// larger than `max_num_seqs` sequences of the longest possible length need.
fn runner(
    args: &Args,
    model: Model,
    longest: usize,
    max_model_len: usize,
) -> Result<Box<dyn StepModel>> {
    let block_size = args.block_size as usize;
    let useful = longest
        .div_ceil(block_size)
        .saturating_mul(args.max_num_seqs as usize);
    let gib_bytes = |gib: f64| (gib * (1u64 << 30) as f64) as u64;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    if model.device() == Device::Cpu {
        let budget = gib_bytes(args.kv_cache_memory.unwrap_or(4.0));
        let by_memory = ModelRunner::blocks_for_memory(&model, block_size, budget);
        let num_blocks = by_memory.min(useful).max(1);
        tracing::info!(
            num_blocks,
            block_size,
            bytes_per_block = ModelRunner::bytes_per_block(&model, block_size),
            "KV cache"
        );
        return Ok(Box::new(ModelRunner::new(
            model,
            block_size,
            num_blocks,
            Some(max_model_len),
        )?));
    }
    let per_block = PagedRunner::bytes_per_block(&model, block_size);
    let by_memory = match args.kv_cache_memory {
        Some(g) => (gib_bytes(g) / per_block.max(1) as u64) as usize,
        None => {
            let plan = plan_gpu_memory(
                &model,
                block_size,
                args.gpu_memory_utilization,
                args.max_num_batched_tokens as usize,
                args.max_num_seqs as usize,
                max_model_len,
            )
            .context("sizing the KV cache")?;
            eprintln!(
                "GPU memory: {:.1} GiB in all, {:.1} GiB usable at --gpu-memory-utilization {}, \
                 {:.1} GiB for weights and activations, {:.1} GiB free for the KV cache",
                gib(plan.total),
                gib(plan.budget),
                args.gpu_memory_utilization,
                gib(plan.in_use),
                gib(plan.kv_bytes)
            );
            plan.num_blocks
        }
    };
    let num_blocks = by_memory.min(useful).max(1);
    eprintln!(
        "KV cache: {num_blocks} blocks of {block_size} tokens ({:.2} GiB; {} tokens), on {}",
        gib((num_blocks * per_block) as u64),
        num_blocks * block_size,
        model.device()
    );
    let mut runner = PagedRunner::new(model, block_size, num_blocks, Some(max_model_len))?;
    if args.enforce_eager {
        runner.set_cuda_graphs(false)?;
    }
    Ok(Box::new(runner))
}

fn progress_bar(len: usize) -> Result<ProgressBar> {
    let style = ProgressStyle::with_template(
        "sampling [{bar:30}] {pos}/{len} rows, {msg}, {elapsed} elapsed, ETA {eta}",
    )
    .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
    .progress_chars("=> ");
    let bar = ProgressBar::new(len as u64).with_style(style);
    bar.set_message("0 tokens/s");
    Ok(bar)
}

fn write_row(
    out: &mut SamplesFile,
    row: &InputRow,
    k: u32,
    seq: &SequenceState,
    logprobs: Option<usize>,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let key = SampleKey {
        id: row.id.clone(),
        sample_index: k,
    };
    let prompt = match &row.prompt {
        Prompt::Text(t) => Some(t.as_str()),
        Prompt::Ids(_) => None,
    };
    let ref_logps = match (logprobs, prompt) {
        (Some(_), Some(p)) => reference_logps(tokenizer, p, seq),
        _ => None,
    };
    let ctx = RowContext {
        key: &key,
        source: &row.fields,
        prompt,
        logprobs,
        ref_logps,
    };
    out.append(&sample_row(&ctx, seq))?;
    Ok(())
}

/// The summed log-probs, when they are what a DPO trainer computes for this prompt and
/// completion: TRL tokenizes prompt and prompt + completion + EOS and splits at their
/// common prefix; only if that gives exactly the sampled prompt and tokens are the
/// sampling log-probs the reference model's.
fn reference_logps(tokenizer: &Tokenizer, prompt: &str, seq: &SequenceState) -> Option<f64> {
    let pc = tokenizer
        .encode_prompt_completion(prompt, seq.text(), true)
        .ok()?;
    (pc.prompt_ids == seq.prompt_ids() && pc.completion_ids == seq.output_ids())
        .then(|| seq.cumulative_logprob())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(stable_hash(""), 0xcbf29ce484222325);
        assert_eq!(stable_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(stable_hash("foobar"), 0x85944171f73967e8);
    }

    fn fixture_model() -> PathBuf {
        testkit::fixture("models/llama-tiny")
    }

    /// A finished sequence that generated exactly `ids` (each forced by its logits row).
    fn forced(prompt_ids: Vec<u32>, ids: &[u32], max_tokens: u32) -> SequenceState {
        let dir = fixture_model();
        let detok = sample::tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let params = sample::SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Default::default()
        };
        let seq =
            sample::testing::forced_sequence(params, prompt_ids, Arc::new(detok), 1, 1008, ids);
        assert!(seq.is_finished());
        seq
    }

    #[test]
    fn reference_logps_only_when_trl_sees_the_same_tokens() {
        let tok = Tokenizer::load(&fixture_model()).unwrap();
        let prompt = "###지시사항:\n한국의 수도는?\n\n###답변:\n";
        let pc = tok
            .encode_prompt_completion(prompt, "서울입니다.", true)
            .unwrap();
        assert_eq!(pc.completion_ids.last(), Some(&1)); // TRL's EOS
        // Ended on EOS: TRL's tokens are the sampled ones.
        let seq = forced(pc.prompt_ids.clone(), &pc.completion_ids, 100);
        assert_eq!(seq.text(), "서울입니다.");
        let got = reference_logps(&tok, prompt, &seq).unwrap();
        assert_eq!(got, seq.cumulative_logprob());
        // Cut by max_tokens: no EOS, so TRL's completion has a token more.
        let n = pc.completion_ids.len() - 1;
        let seq = forced(pc.prompt_ids.clone(), &pc.completion_ids[..n], n as u32);
        assert_eq!(reference_logps(&tok, prompt, &seq), None);
        // Sampled without BOS (another prompt tokenization): not what TRL scores.
        let seq = forced(pc.prompt_ids[1..].to_vec(), &pc.completion_ids, 100);
        assert_eq!(reference_logps(&tok, prompt, &seq), None);
    }

    #[test]
    fn a_rows_max_tokens_overrides_the_setting_and_is_checked() {
        let row = |at: &str, v: Option<serde_json::Value>| InputRow {
            id: at.into(),
            location: at.into(),
            fields: v
                .into_iter()
                .map(|v| ("max_tokens".to_string(), v))
                .collect(),
            prompt: Prompt::Ids(vec![1]),
        };
        let rows = [
            row("f:1", Some(serde_json::json!(7))),
            row("f:2", None),
            row("f:3", Some(serde_json::Value::Null)),
        ];
        assert_eq!(row_max_tokens(&rows).unwrap(), vec![Some(7), None, None]);
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-3),
            serde_json::json!("5"),
        ] {
            let e = row_max_tokens(&[row("f:9", Some(bad))])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("f:9: \"max_tokens\" must be a positive integer"),
                "{e}"
            );
        }
    }

    #[test]
    fn long_prompts_are_listed() {
        let row = |at: &str| InputRow {
            id: at.into(),
            location: at.into(),
            fields: Default::default(),
            prompt: Prompt::Ids(vec![]),
        };
        let rows = [row("f:1"), row("f:2"), row("f:3")];
        let prompts = [vec![1; 5], vec![1; 9], vec![1; 12]];
        let e = check_prompts(&rows, &prompts, 10, 8)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("2 prompts are longer than the model's context of 8"),
            "{e}"
        );
        assert!(
            e.contains("f:2 (9 tokens)") && e.contains("f:3 (12 tokens)"),
            "{e}"
        );
        let e = check_prompts(&rows, &[vec![1], vec![], vec![1]], 10, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f:2: the prompt is empty"), "{e}");
        let e = check_prompts(&rows, &[vec![1], vec![3, 10], vec![1]], 10, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f:2: prompt token 1 is id 10"), "{e}");
    }
}
