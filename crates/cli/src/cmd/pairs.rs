//! `prefer pairs`: gold answers + model samples → a DPO dataset folder (docs/pairs.md).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use data::ingest::SourceSpec;
use data::pairs::{Filters, GoldSource, Holdout, JoinKey, PairOptions};
use data::template::Template;
use data::tokens::TokenCounter;
use data::writer::{self, Columns, Format, Schema};

#[derive(clap::Args)]
pub struct Args {
    /// Gold rows: [SPLIT=]PATH[:KEY=VALUE,...]; repeat for several sources per split.
    /// Keys: sheet, split, and field=COLUMN for id, prompt, instruction, input, output.
    /// SPLIT defaults to train.
    #[arg(long, required = true, value_name = "SPEC")]
    gold: Vec<String>,
    /// Samples written by `prefer sample` (jsonl; any ingest format works); repeatable.
    #[arg(long, required = true, value_name = "FILE")]
    samples: Vec<PathBuf>,
    /// Output folder (written to a temp folder, renamed when complete).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Prompt template: korean, alpaca, chatml, chat (the model's), or a Jinja file.
    #[arg(long, default_value = "korean")]
    template: String,
    /// Model folder (tokenizer.json, tokenizer_config.json) for the token budget and `chat`.
    #[arg(long, value_name = "MODEL_DIR")]
    tokenizer: Option<PathBuf>,
    /// Column names: trl (prompt/chosen/rejected) or reference (question/response_j/response_k).
    #[arg(long, default_value = "trl")]
    schema: String,
    /// Split file format: parquet or jsonl.
    #[arg(long, default_value = "parquet")]
    format: String,
    /// Join key between gold rows and samples: auto, id, prompt.
    #[arg(long, default_value = "auto")]
    join: String,
    /// Keep samples cut by max_tokens (finish_reason "length").
    #[arg(long)]
    keep_truncated: bool,
    /// Drop pairs whose prompt + longer response + EOS exceeds this many tokens.
    #[arg(long, value_name = "TOKENS")]
    max_length: Option<usize>,
    /// Drop pairs whose prompt exceeds this many tokens.
    #[arg(long, value_name = "TOKENS")]
    max_prompt_length: Option<usize>,
    /// Move a seeded fraction of --holdout-from's pairs into SPLIT: SPLIT=RATIO.
    #[arg(long, value_name = "SPLIT=RATIO")]
    holdout: Option<String>,
    /// The split the holdout takes pairs from.
    #[arg(long, default_value = "train")]
    holdout_from: String,
    /// Seed of the holdout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `prefer score` output with the chosen completions' reference log-probs.
    #[arg(long, value_name = "FILE")]
    chosen_logps: Option<PathBuf>,
    /// Treat numeric or boolean cells where text is expected as errors.
    #[arg(long)]
    strict: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
}

fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    writer::staging::check_target(&args.out, args.overwrite)?;
    let schema = Schema::from_name(&args.schema)
        .with_context(|| format!("--schema '{}': expected trl or reference", args.schema))?;
    let format = Format::from_name(&args.format)
        .with_context(|| format!("--format '{}': expected parquet or jsonl", args.format))?;
    let join = match args.join.as_str() {
        "auto" => JoinKey::Auto,
        "id" => JoinKey::Id,
        "prompt" => JoinKey::Prompt,
        other => bail!("--join '{other}': expected auto, id or prompt"),
    };
    let template = Template::from_name(&args.template, args.tokenizer.as_deref())?;
    let budget = args.max_length.is_some() || args.max_prompt_length.is_some();
    let tokens = match (&args.tokenizer, budget) {
        (Some(dir), true) => Some(TokenCounter::open(dir)?),
        (None, true) => {
            bail!("--max-length / --max-prompt-length count tokens: pass --tokenizer MODEL_DIR")
        }
        _ => None,
    };
    let mut gold = Vec::with_capacity(args.gold.len());
    for text in &args.gold {
        let (split, spec) = SourceSpec::parse_with_split(text)?;
        let split = split.unwrap_or_else(|| "train".to_string());
        if !writer::valid_split_name(&split) {
            bail!("--gold '{text}': split name '{split}' must be letters, digits, _ (and dots)");
        }
        gold.push(GoldSource { split, spec });
    }
    let holdout = args
        .holdout
        .as_deref()
        .map(|h| Holdout::parse(h, &args.holdout_from, args.seed))
        .transpose()?;
    if let Some(h) = &holdout
        && !writer::valid_split_name(&h.to)
    {
        bail!(
            "--holdout: split name '{}' must be letters, digits, _ (and dots)",
            h.to
        );
    }

    let bar = spinner();
    bar.set_message("reading samples");
    let mut samples = Vec::new();
    for path in &args.samples {
        samples.extend(data::samples::read_samples(path)?);
    }
    let scores = args
        .chosen_logps
        .as_deref()
        .map(data::samples::read_scores)
        .transpose()?;
    bar.set_message(format!(
        "joining {} samples with the gold rows, filtering",
        samples.len()
    ));
    let options = PairOptions {
        template: &template,
        join,
        strict: args.strict,
        filters: Filters {
            keep_truncated: args.keep_truncated,
            max_length: args.max_length,
            max_prompt_length: args.max_prompt_length,
        },
        tokens: tokens.as_ref(),
        holdout,
        scores: scores.as_ref(),
    };
    let set = data::pairs::build(&gold, &samples, &options)?;
    bar.set_message("writing");
    let columns = Columns {
        schema,
        ref_chosen: set.has_ref_chosen,
        ref_rejected: set.has_ref_rejected,
    };
    let body = card_body(&args, &template, &set, tokens.as_ref());
    writer::write_dataset(
        &args.out,
        &set.splits,
        columns,
        format,
        &body,
        args.overwrite,
    )?;
    bar.finish_and_clear();

    print!("{}", set.report.render_text());
    let total: usize = set.splits.iter().map(|s| s.pairs.len()).sum();
    for s in set.splits.iter().filter(|s| s.pairs.is_empty()) {
        println!("warning: split {} has no pairs and was not written", s.name);
    }
    if !set.has_ref_rejected && set.report.ref_rejected.0 > 0 {
        println!(
            "note: ref_rejected_logps left out: only {} of {} pairs have sampling-time reference log-probs",
            set.report.ref_rejected.0, set.report.ref_rejected.1
        );
    }
    println!(
        "wrote {total} pairs to {} in {:.1}s ({:.0} rows/s)",
        args.out.display(),
        started.elapsed().as_secs_f64(),
        samples.len() as f64 / started.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// The card body: how the data was made, then the report.
fn card_body(
    args: &Args,
    template: &Template,
    set: &data::pairs::PairSet,
    tokens: Option<&TokenCounter>,
) -> String {
    let mut body = String::from("## How it was made\n\n");
    body.push_str(&format!("- template: {}\n", template.name()));
    body.push_str(&format!("- join: {}\n", args.join));
    body.push_str(&format!(
        "- truncated samples: {}\n",
        if args.keep_truncated {
            "kept"
        } else {
            "dropped"
        }
    ));
    if let Some(t) = tokens {
        let file = t
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        body.push_str(&format!(
            "- token budget ({file}): max_length {:?}, max_prompt_length {:?}\n",
            args.max_length, args.max_prompt_length
        ));
    }
    body.push_str(&format!(
        "- reference log-probs: chosen {}, rejected {}\n\n",
        if set.has_ref_chosen { "yes" } else { "no" },
        if set.has_ref_rejected { "yes" } else { "no" }
    ));
    body.push_str(&set.report.render_markdown());
    body
}
