//! `prefer train`: DPO with LoRA on preference pairs → a PEFT adapter (docs/train.md).
//!
//! Options are TRL's `DPOConfig` names (a TOML file with `--config`, flags on top); the loop,
//! losses and checkpoints are the train crate's. This file reads the data, prints progress
//! and the logged metrics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use data::cell::{Cell, TextCell};
use data::ingest::{self, SourceSpec, Table};
use model::{Model, Tokenizer};
use train::examples::{PreferenceColumns, PreferenceRow, build_examples};
use train::trainer::{Event, Resume, TrainConfig};

/// The reference workflow's DPO-time prompt wrapper (GUIDE §1), by name.
const REFERENCE_WRAPPER: &str = "###질문:\n{question}\n\n###답변:\n";

#[derive(clap::Args)]
pub struct Args {
    /// The SFT model folder (HF config, safetensors, tokenizer): the policy's base and the
    /// reference.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Training pairs: a `prefer pairs` folder (its train split), or [SPLIT=]PATH[:KEY=VALUE,...]
    /// of any ingest format, with prompt/chosen/rejected or question/response_j/response_k.
    #[arg(long, value_name = "SPEC")]
    data: String,
    /// Evaluation pairs, as --data. Default: the validation split of a `prefer pairs` folder
    /// given to --data, when it has one.
    #[arg(long, value_name = "SPEC")]
    eval_data: Option<String>,
    /// Checkpoints and the final adapter go here.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Options as TOML, TRL's DPOConfig names (flags below override them).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue from the latest checkpoint in --output-dir (a fresh start when there is none).
    #[arg(long)]
    resume: bool,
    /// Continue from this checkpoint folder.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    resume_from: Option<PathBuf>,
    /// cpu, cuda or cuda:N (bf16 weights and activations on a GPU; the adapter and its
    /// optimizer stay f32).
    #[arg(long, default_value = "cpu")]
    device: String,

    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    beta: Option<f64>,
    /// One or more of TRL's loss types (comma-separated).
    #[arg(long, value_delimiter = ',')]
    loss_type: Option<Vec<String>>,
    #[arg(long)]
    num_train_epochs: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    per_device_eval_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    lr_scheduler_type: Option<String>,
    /// A count (≥ 1) or a ratio of the total steps (< 1).
    #[arg(long)]
    warmup_steps: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// true (recompute each layer in the backward: less memory) or false (keep the
    /// forward's activations: faster).
    #[arg(long)]
    gradient_checkpointing: Option<bool>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// keep_start or keep_end.
    #[arg(long)]
    truncation_mode: Option<String>,
    /// A template with {question} applied to every prompt, `reference` for the reference
    /// workflow's `###질문:\n{question}\n\n###답변:\n`, or `none` (overrides --config's).
    #[arg(long, value_name = "TEMPLATE")]
    prompt_wrapper: Option<String>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f32>,
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// Comma-separated HF module names.
    #[arg(long, value_delimiter = ',')]
    lora_target_modules: Option<Vec<String>>,
    /// Start from this PEFT adapter instead of a fresh one.
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    #[arg(long)]
    logging_steps: Option<usize>,
    #[arg(long)]
    eval_steps: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    save_total_limit: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let config = config(&args)?;
    config.validate()?;
    let device = super::score::parse_device(&args.device)?;
    let tokenizer = Tokenizer::load(&args.model)?;
    let examples = config.example_config()?;
    let (train_spec, eval_spec) = data_specs(&args)?;
    let train_rows = read_rows(&train_spec)?;
    let train_set = build_examples(&tokenizer, &train_rows, &examples)?;
    eprintln!("train: {}: {train_set}", train_spec.describe());
    let eval_set = match &eval_spec {
        Some(spec) => {
            let rows = read_rows(spec)?;
            let set = build_examples(&tokenizer, &rows, &examples)?;
            eprintln!("eval: {}: {set}", spec.describe());
            Some(set.examples)
        }
        None => None,
    };
    if eval_set.is_some() && config.eval_steps.is_none() {
        eprintln!(
            "note: evaluation data given without --eval-steps (or eval_steps): it is not used"
        );
    }
    let model = Model::load(&args.model, device)?;
    // PREFER_PROFILE=1: time every op of the forward and backward passes (each op then waits
    // for the one before: slower steps, but each op's own GPU time).
    let profile = model::env_switch("PREFER_PROFILE", false).map_err(anyhow::Error::msg)?;
    if profile {
        model.start_profile();
    }
    let resume = match (&args.resume_from, args.resume) {
        (Some(dir), _) => Resume::From(dir.clone()),
        (None, true) => Resume::Latest,
        (None, false) => {
            if train::trainer::latest_checkpoint(&config.output_dir)?.is_some() {
                bail!(
                    "{} already holds checkpoints: pass --resume to continue that run, or \
                     choose another --output-dir",
                    config.output_dir.display()
                );
            }
            Resume::No
        }
    };

    let mut step_times: Vec<f64> = Vec::new();
    let mut last_step = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let summary = train::trainer::train(
        &model,
        &config,
        &train_set.examples,
        eval_set.as_deref(),
        resume,
        &mut |event| match event {
            Event::Started {
                start_step,
                total_steps,
            } => {
                bar.set_length(total_steps as u64);
                last_step = Instant::now();
                bar.set_position(start_step as u64);
                if start_step > 0 {
                    say(
                        &bar,
                        format!("resuming at step {start_step} of {total_steps}"),
                    );
                }
            }
            Event::Stepped { step } => {
                step_times.push(last_step.elapsed().as_secs_f64());
                last_step = Instant::now();
                bar.set_position(step as u64);
            }
            Event::Logged(entry) => {
                if let Some(loss) = entry.get("loss").and_then(|v| v.as_f64()) {
                    bar.set_message(format!("loss {loss:.4}"));
                }
                say(&bar, serde_json::Value::Object(entry.clone()).to_string());
            }
            Event::Saved(dir) => say(&bar, format!("saved {}", dir.display())),
        },
    )?;
    bar.finish_and_clear();
    // Seconds of each optimizer step this process ran (logging, evaluation and saving
    // included), and the GPU's memory: what bench/gpu/train.sh reads.
    let mut stats = serde_json::Map::new();
    stats.insert("device".into(), device.to_string().into());
    stats.insert("step_s".into(), step_times.clone().into());
    let mut sorted = step_times;
    sorted.sort_by(f64::total_cmp);
    if let Some(median) = sorted.get(sorted.len() / 2) {
        stats.insert("median_step_s".into(), (*median).into());
    }
    if let Some(mem) = super::score::gpu_memory(device)? {
        stats.insert("peak_live_bytes".into(), mem.peak_live.into());
        stats.insert("peak_reserved_bytes".into(), mem.peak_reserved.into());
    }
    if profile {
        let times = model.stop_profile();
        let ms: serde_json::Map<String, serde_json::Value> = times
            .by_kind
            .iter()
            .map(|(kind, (ms, calls))| {
                (
                    kind.name().to_string(),
                    serde_json::json!({"ms": ms, "calls": calls}),
                )
            })
            .collect();
        stats.insert("profile_ms".into(), ms.into());
    }
    eprintln!("prefer train stats: {}", serde_json::Value::Object(stats));
    eprintln!(
        "trained {} steps in {:.1?}; mean loss {:.4}; adapter: {} (last checkpoint {})",
        summary.global_step,
        started.elapsed(),
        summary.train_loss,
        summary.adapter_dir.display(),
        summary.last_checkpoint.display()
    );
    Ok(())
}

/// A line above the progress bar, or on stderr when there is no bar to draw (not a terminal):
/// the logged metrics must reach a log file too.
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The TOML file's options with the flags on top.
fn config(args: &Args) -> Result<TrainConfig> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            TrainConfig::from_toml(&text, &path.display().to_string())?
        }
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = &args.$field {
                c.$field = v.clone().into();
            }
        )*};
    }
    set!(
        learning_rate,
        num_train_epochs,
        per_device_train_batch_size,
        per_device_eval_batch_size,
        gradient_accumulation_steps,
        lr_scheduler_type,
        warmup_steps,
        weight_decay,
        max_grad_norm,
        gradient_checkpointing,
        truncation_mode,
        lora_r,
        lora_alpha,
        lora_dropout,
        lora_target_modules,
        logging_steps,
        save_steps,
        seed
    );
    if let Some(dir) = &args.output_dir {
        c.output_dir = dir.clone();
    } else if args.config.is_none() {
        bail!("--output-dir is required (or output_dir in --config)");
    }
    for (value, slot) in [
        (args.max_steps, &mut c.max_steps),
        (args.max_length, &mut c.max_length),
        (args.max_prompt_length, &mut c.max_prompt_length),
        (args.eval_steps, &mut c.eval_steps),
        (args.save_total_limit, &mut c.save_total_limit),
    ] {
        if value.is_some() {
            *slot = value;
        }
    }
    if let Some(beta) = args.beta {
        c.loss.beta = beta;
    }
    if let Some(types) = &args.loss_type {
        c.loss.loss_type = types
            .iter()
            .map(|t| t.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--loss-type: {e}"))?;
    }
    if let Some(w) = &args.prompt_wrapper {
        c.prompt_wrapper = match w.as_str() {
            "reference" => Some(REFERENCE_WRAPPER.to_string()),
            "none" => None,
            other => Some(other.to_string()),
        };
    }
    if let Some(dir) = &args.init_adapter {
        c.init_adapter = Some(dir.clone());
    }
    Ok(c)
}

/// Where training (and evaluation) rows come from.
struct DataSpec {
    /// One table or, for a `prefer pairs` folder, its split's files.
    files: Vec<SourceSpec>,
    what: String,
}

impl DataSpec {
    fn describe(&self) -> &str {
        &self.what
    }
}

fn data_specs(args: &Args) -> Result<(DataSpec, Option<DataSpec>)> {
    let train = parse_spec(&args.data, "train")?;
    let eval = match &args.eval_data {
        Some(text) => Some(parse_spec(text, "validation")?),
        None => match pairs_folder_split(Path::new(&args.data), "validation")? {
            Some(files) if !files.is_empty() => Some(DataSpec {
                what: format!("{} [validation]", args.data),
                files,
            }),
            _ => None,
        },
    };
    Ok((train, eval))
}

/// A `prefer pairs` folder's split, or a plain source spec (`SPLIT=` picks a split of a
/// multi-split source).
fn parse_spec(text: &str, default_split: &str) -> Result<DataSpec> {
    let (split, spec) = SourceSpec::parse_with_split(text)?;
    let split = split.unwrap_or_else(|| default_split.to_string());
    if let Some(files) = pairs_folder_split(&spec.path, &split)? {
        if files.is_empty() {
            bail!(
                "{}: a `prefer pairs` folder with no {split} split in data/",
                spec.path.display()
            );
        }
        return Ok(DataSpec {
            what: format!("{} [{split}]", spec.path.display()),
            files,
        });
    }
    let mut spec = spec;
    if spec.split.is_none() && spec.path.is_dir() {
        spec.split = Some(split);
    }
    Ok(DataSpec {
        what: text.to_string(),
        files: vec![spec],
    })
}

/// `Some(files)` when `dir` is a dataset folder as `prefer pairs` writes it (data/ with
/// `{split}-*.parquet` or `.jsonl`): that split's files in order.
fn pairs_folder_split(dir: &Path, split: &str) -> Result<Option<Vec<SourceSpec>>> {
    let data = dir.join("data");
    if !data.is_dir() {
        return Ok(None);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&data)
        .with_context(|| format!("reading {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&format!("{split}-"))
                && (name.ends_with(".parquet") || name.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(Some(files.into_iter().map(SourceSpec::plain).collect()))
}

fn read_rows(spec: &DataSpec) -> Result<Vec<PreferenceRow>> {
    let mut rows = Vec::new();
    for file in &spec.files {
        let table = ingest::open(file, None)?;
        rows.extend(table_rows(&table)?);
    }
    Ok(rows)
}

/// The table's rows as preference rows (numbers and booleans become text, as everywhere).
fn table_rows(table: &Table) -> Result<Vec<PreferenceRow>> {
    let columns = PreferenceColumns::resolve(Path::new(&table.source), &table.columns)?;
    table
        .rows
        .iter()
        .enumerate()
        .map(|(i, cells)| {
            let location = table.location(i);
            let texts: Vec<Option<String>> = cells
                .iter()
                .enumerate()
                .map(|(c, cell)| text(cell, &table.source, &location, &table.columns[c]))
                .collect::<Result<_>>()?;
            let refs: Vec<Option<&str>> = texts.iter().map(|t| t.as_deref()).collect();
            Ok(columns.row(&location, &refs)?)
        })
        .collect()
}

fn text(cell: &Cell, source: &str, location: &str, column: &str) -> Result<Option<String>> {
    match cell.to_text(false) {
        Ok(TextCell::Text(s) | TextCell::Converted(s)) => Ok(Some(s)),
        // Empty text stays text: the row check names an empty completion precisely.
        Ok(TextCell::Empty) => Ok(match cell {
            Cell::Text(s) => Some(s.clone()),
            _ => None,
        }),
        Err(e) => bail!(
            "{source}: {location}, column {column}: {}; expected text",
            e.found
        ),
    }
}
