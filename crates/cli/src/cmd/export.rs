//! `prefer export`: a trained LoRA adapter merged into its base model, written as a plain HF
//! model folder that transformers and vLLM load without LoRA support (docs/export.md).
//!
//! The merge itself — the arithmetic in each dtype, transformers' sharding, tied embeddings,
//! the files beside the weights — is `model::merge_adapter`. This file decides what to ask of
//! it and checks everything it can before any work:
//! - which deltas to leave out (`--leave-out`, and `--servable vllm`, which keeps the export
//!   loadable by vLLM for the model's family);
//! - the shard size, parsed as transformers' `save_pretrained` parses `max_shard_size`;
//! - the output folder: a new or empty one, or with `--overwrite` a previous export replaced
//!   only once the new one is complete (merged into a hidden sibling, then renamed);
//! - that the adapter was trained on this base (a warning when its config names another).
//!
//! Then it prints what was merged, copied and left out, whether the tie was broken, and the
//! bytes and time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use data::writer::staging::Staged;
use engine::Tensor;
use model::{Family, Lora, MergeOptions, MergeReport, ModelConfig, merge_adapter};
use train::peft::{CONFIG_FILE, LoadedAdapter, load_adapter};

#[derive(clap::Args)]
pub struct Args {
    /// The base model folder the adapter was trained on (config.json, safetensors, tokenizer).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The PEFT LoRA adapter: `prefer train`'s --output-dir, one of its checkpoint-N folders,
    /// or any PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The model folder to write (a new or empty folder, unless --overwrite).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Write these weights as the base has them, without the adapter's delta
    /// (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODULES")]
    leave_out: Vec<Module>,
    /// Leave out what this server cannot load for the model's family (Gemma and Gemma-2:
    /// the embed_tokens/lm_head deltas that would untie their embeddings).
    #[arg(long, value_enum, value_name = "SERVER")]
    servable: Option<Server>,
    /// Largest weights file before sharding, as transformers' save_pretrained reads it:
    /// 5GB, 500MB, 200KB (powers of 10), 2GiB, 512MiB (powers of 2), or bytes.
    #[arg(long, default_value = "50GB", value_name = "SIZE")]
    max_shard_size: String,
    /// Replace an existing output folder that holds a model (an earlier export), once the new
    /// export is complete.
    #[arg(long)]
    overwrite: bool,
}

/// The modules whose delta `--leave-out` can skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Module {
    #[value(name = "embed_tokens")]
    EmbedTokens,
    #[value(name = "lm_head")]
    LmHead,
}

/// Servers `--servable` knows the limits of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Server {
    Vllm,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let max_shard_bytes = parse_size(&args.max_shard_size)
        .map_err(|msg| anyhow::anyhow!("--max-shard-size {:?}: {msg}", args.max_shard_size))?;
    let config_path = args.model.join("config.json");
    if !args.model.is_dir() {
        bail!("--model {}: no such folder", args.model.display());
    }
    let config = ModelConfig::from_file(&config_path)?;
    let adapter = read_adapter(&args.adapter, &args.model, &config)?;
    if let Some(named) = &adapter.base_model_name_or_path
        && let Some(warning) = other_base(named, &args.model)
    {
        eprintln!("warning: {warning}");
    }
    if !adapter.ignored_tensors.is_empty() {
        eprintln!(
            "note: skipped PEFT's copies of unchanged base weights in the adapter: {}",
            adapter.ignored_tensors.join(", ")
        );
    }

    let plan = LeaveOut::choose(&args, &config, &adapter.lora, &config_path)?;
    let options = MergeOptions {
        leave_out_embed_tokens: plan.embed_tokens,
        leave_out_lm_head: plan.lm_head,
        max_shard_bytes,
    };
    let staged = prepare_output(&args.out, args.overwrite, &[&args.model, &args.adapter])?;

    // merge_adapter reports no progress; a spinner with the elapsed time shows it is alive
    // (hidden when stderr is not a terminal).
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} merging into {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(args.out.display().to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let merged = merge_adapter(&args.model, &adapter.lora, staged.path(), &options);
    bar.finish_and_clear();
    let report = merged.with_context(|| {
        format!(
            "merging the adapter {} into {}",
            args.adapter.display(),
            args.model.display()
        )
    })?;
    staged
        .commit()
        .with_context(|| format!("moving the export into {}", args.out.display()))?;

    print_report(&report, &plan, &config, &args.out, started.elapsed());
    Ok(())
}

/// Reads the adapter folder for this model, with errors that say what the folder is missing.
fn read_adapter(dir: &Path, model_dir: &Path, config: &ModelConfig) -> Result<LoadedAdapter> {
    if !dir.is_dir() {
        bail!("--adapter {}: no such folder", dir.display());
    }
    if !dir.join(CONFIG_FILE).is_file() {
        // `prefer train --output-dir` before its first save holds only checkpoints; say so.
        let latest = latest_checkpoint(dir);
        let hint = match latest {
            Some(name) => format!(
                "; it holds training checkpoints — pass one of them, e.g. --adapter {}",
                dir.join(name).display()
            ),
            None => String::new(),
        };
        bail!(
            "{}: missing — --adapter must be a PEFT adapter folder{hint}",
            dir.join(CONFIG_FILE).display()
        );
    }
    load_adapter(dir, config).with_context(|| {
        format!(
            "reading the adapter {} for the model {} ({}, {} layers, hidden size {}, \
             vocabulary {})",
            dir.display(),
            model_dir.display(),
            config.family,
            config.num_layers,
            config.hidden_size,
            config.vocab_size
        )
    })
}

/// The `checkpoint-N` subfolder of `dir` with the largest N.
fn latest_checkpoint(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then_some((step, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// A warning when adapter_config.json's `base_model_name_or_path` names another model than
/// `model_dir`: an existing folder that is not this one, or a Hub id / path whose last
/// component differs from this folder's name. Merging still works when the shapes fit (a copy
/// of the same base, or a fine-tune of it) — the user decides.
fn other_base(named: &str, model_dir: &Path) -> Option<String> {
    let ours = std::fs::canonicalize(model_dir).unwrap_or_else(|_| model_dir.to_path_buf());
    let theirs = Path::new(named);
    let same = if theirs.is_dir() {
        std::fs::canonicalize(theirs).is_ok_and(|t| t == ours)
    } else {
        // A Hub id ("org/name") or a folder not on this machine: compare the names.
        let last = named.trim_end_matches('/').rsplit('/').next();
        last.is_some() && last.map(std::ffi::OsStr::new) == ours.file_name()
    };
    (!same).then(|| {
        format!(
            "the adapter was trained on {named} (adapter_config.json base_model_name_or_path), \
             not on {}: merging it anyway — check that both are the same base model",
            model_dir.display()
        )
    })
}

/// Which of the embedding and head deltas are left out, and why (one line per reason).
#[derive(Debug, Default, PartialEq)]
struct LeaveOut {
    embed_tokens: bool,
    lm_head: bool,
    reasons: Vec<String>,
}

impl LeaveOut {
    fn choose(
        args: &Args,
        config: &ModelConfig,
        lora: &Lora,
        config_path: &Path,
    ) -> Result<LeaveOut> {
        let mut plan = LeaveOut::default();
        for m in &args.leave_out {
            let (present, name) = match m {
                Module::EmbedTokens => (lora.embed.is_some(), "embed_tokens"),
                Module::LmHead => (lora.lm_head.is_some(), "lm_head"),
            };
            if !present {
                plan.reasons.push(format!(
                    "--leave-out {name}: the adapter has no {name} pair, nothing to leave out"
                ));
                continue;
            }
            match m {
                Module::EmbedTokens => plan.embed_tokens = true,
                Module::LmHead => plan.lm_head = true,
            }
            plan.reasons
                .push(format!("{name}: left out on request (--leave-out)"));
        }
        if let Some(Server::Vllm) = args.servable {
            plan.add_vllm(config, lora, config_path)?;
        }
        Ok(plan)
    }

    /// vLLM's Gemma and Gemma-2 models assert `tie_word_embeddings` (they read the head from
    /// the embedding and skip any `lm_head.weight`), so an export must keep the tie: leave out
    /// the embed_tokens/lm_head deltas, unless they are one delta that keeps the tie (the head
    /// pair the embedding pair transposed). The other families load a separate head.
    fn add_vllm(&mut self, config: &ModelConfig, lora: &Lora, config_path: &Path) -> Result<()> {
        let family = config.family;
        if !matches!(family, Family::Gemma | Family::Gemma2) {
            self.reasons.push(format!(
                "--servable vllm: vLLM loads {family} with or without tied embeddings; \
                 nothing more to leave out"
            ));
            return Ok(());
        }
        if !config.tie_word_embeddings {
            bail!(
                "--servable vllm: vLLM's {} requires tied embeddings, and this base model is \
                 untied ({} says tie_word_embeddings: false) — vLLM cannot load it or any \
                 export of it",
                family_class(family),
                config_path.display()
            );
        }
        let (embed, head) = (lora.embed.as_ref(), lora.lm_head.as_ref());
        let one_delta = match (embed, head) {
            (Some(e), Some(h)) => {
                transposed_equal(&h.a, &e.b).unwrap_or(false)
                    && transposed_equal(&h.b, &e.a).unwrap_or(false)
            }
            _ => false,
        };
        let present: Vec<&str> = [(embed, "embed_tokens"), (head, "lm_head")]
            .iter()
            .filter(|(p, _)| p.is_some())
            .map(|(_, n)| *n)
            .collect();
        if present.is_empty() || one_delta {
            self.reasons.push(format!(
                "--servable vllm: {family} keeps its tied embeddings (the adapter {}); \
                 nothing more to leave out",
                if one_delta {
                    "adds one delta to the shared embedding and head"
                } else {
                    "has no embed_tokens or lm_head pair"
                }
            ));
            return Ok(());
        }
        self.embed_tokens |= embed.is_some();
        self.lm_head |= head.is_some();
        self.reasons.push(format!(
            "{}: left out for --servable vllm — vLLM's {} requires tied embeddings, and \
             merging {} would untie them (the adapter trained a separate embedding and head)",
            present.join(", "),
            family_class(family),
            if present.len() == 2 {
                "these deltas"
            } else {
                "this delta"
            }
        ));
        Ok(())
    }
}

fn family_class(family: Family) -> &'static str {
    match family {
        Family::Gemma => "GemmaForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
    }
}

/// Whether `x` [m, n] equals `y` [n, m] transposed, value for value.
fn transposed_equal(x: &Tensor, y: &Tensor) -> Result<bool> {
    let (&[m, n], &[n2, m2]) = (x.shape(), y.shape()) else {
        return Ok(false);
    };
    if (m, n) != (m2, n2) {
        return Ok(false);
    }
    let (xs, ys) = (x.to_vec()?, y.to_vec()?);
    Ok((0..m).all(|i| (0..n).all(|j| xs[i * n + j] == ys[j * m + i])))
}

/// transformers' `save_pretrained(max_shard_size=...)` in bytes. transformers 5.17 hands the
/// string to huggingface_hub's `parse_size_to_int`: a number (decimals allowed) and a unit
/// among KB, MB, GB, TB (powers of 10, any letter case), truncated to an integer. We also
/// take KiB, MiB, GiB (powers of 2, as transformers' `convert_file_size_to_int`) and a plain
/// byte count (the integer save_pretrained also takes). transformers' older parser read a
/// lowercase "b" as bits ("5Gb" = 5e9 / 8); save_pretrained no longer uses it, and neither
/// do we: any case of "gb" is 10^9 bytes.
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    const UNITS: [(&str, f64); 7] = [
        ("KIB", 1024.0),
        ("MIB", 1048576.0),
        ("GIB", 1073741824.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
    ];
    let s = text.trim();
    let upper = s.to_ascii_uppercase();
    let (number, multiplier) = match UNITS.iter().find(|(u, _)| upper.ends_with(u)) {
        Some((unit, m)) => (s[..s.len() - unit.len()].trim(), *m),
        None if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() => (s, 1.0),
        None => {
            return Err(
                "expected a number and a unit: KB, MB, GB, TB (powers of 10), KiB, MiB, GiB \
                 (powers of 2), or a byte count — e.g. 5GB"
                    .into(),
            );
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a number"))?;
    // As Python's int(value * multiplier): the product in f64, truncated.
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err("expected a size of at least 1 byte".into());
    }
    Ok(bytes as u64)
}

/// Where the merge writes: a hidden sibling of `out`, renamed into place when complete (an
/// old export moved aside first and deleted after). Refuses a non-empty `out` without
/// `--overwrite`, and with it anything that is not a model folder or that holds an input.
fn prepare_output(out: &Path, overwrite: bool, inputs: &[&Path]) -> Result<Staged> {
    let entries = match std::fs::read_dir(out) {
        Ok(read) => {
            let mut names: Vec<String> = read
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Some(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) if out.exists() && !out.is_dir() => {
            bail!("--out {}: exists and is not a folder", out.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let replace = match entries {
        None => false,
        Some(names) if names.is_empty() => true, // an empty folder: nothing to lose
        Some(names) => {
            let shown = show_names(&names);
            if !overwrite {
                bail!(
                    "--out {}: the folder exists and is not empty ({shown}); pass --overwrite \
                     to replace it, or choose another folder",
                    out.display()
                );
            }
            let canonical = std::fs::canonicalize(out)
                .with_context(|| format!("resolving {}", out.display()))?;
            for input in inputs {
                if std::fs::canonicalize(input).is_ok_and(|i| i.starts_with(&canonical)) {
                    bail!(
                        "--out {} --overwrite would delete {}, an input of this export",
                        out.display(),
                        input.display()
                    );
                }
            }
            let holds_model = names.iter().any(|n| {
                n == "config.json"
                    || n.ends_with(".safetensors")
                    || n == "model.safetensors.index.json"
            });
            if !holds_model {
                bail!(
                    "--out {}: refusing to replace it — --overwrite replaces a model folder \
                     (an earlier export), and this one holds no config.json or safetensors \
                     ({shown})",
                    out.display()
                );
            }
            true
        }
    };
    Ok(Staged::new(out, replace)?)
}

/// The first few names of a listing, for messages.
fn show_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > shown.len() {
        format!(", … {} in all", names.len())
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

fn print_report(
    report: &MergeReport,
    plan: &LeaveOut,
    config: &ModelConfig,
    out: &Path,
    elapsed: Duration,
) {
    println!(
        "merged {} tensors with the adapter's delta, copied {} unchanged",
        report.merged.len(),
        report.copied
    );
    if !report.left_out.is_empty() {
        println!(
            "left out the delta of {} (written as the base has it)",
            report.left_out.join(", ")
        );
    }
    for reason in &plan.reasons {
        println!("  {reason}");
    }
    let tie = if !config.tie_word_embeddings {
        "untied in the base, untied in the export".to_string()
    } else if report.tie_broken {
        let vllm = if matches!(config.family, Family::Gemma | Family::Gemma2) {
            " — vLLM's Gemma models refuse this; --servable vllm keeps the tie"
        } else {
            ""
        };
        format!(
            "broken: the adapter trained a separate embedding and head, so lm_head.weight is \
             written and config.json says tie_word_embeddings: false{vllm}"
        )
    } else {
        "kept (one shared matrix, as in the base)".to_string()
    };
    println!("tied embeddings: {tie}");
    println!(
        "wrote {} in {} files ({}) to {} in {:.2?}",
        human_bytes(report.bytes_written),
        report.files.len(),
        report.files.join(", "),
        out.display(),
        elapsed
    );
}

/// Bytes in decimal units (as the shard sizes are given), with the exact count.
fn human_bytes(n: u64) -> String {
    let (value, unit) = match n {
        n if n >= 1_000_000_000 => (n as f64 / 1e9, "GB"),
        n if n >= 1_000_000 => (n as f64 / 1e6, "MB"),
        n if n >= 1_000 => (n as f64 / 1e3, "KB"),
        n => return format!("{n} bytes"),
    };
    format!("{value:.2} {unit} ({n} bytes)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_save_pretrained_reads_them() {
        let ok = |s: &str| parse_size(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("5GB"), 5_000_000_000);
        assert_eq!(ok("50GB"), model::DEFAULT_MAX_SHARD_BYTES);
        assert_eq!(ok("500MB"), 500_000_000);
        assert_eq!(ok("200KB"), 200_000);
        assert_eq!(ok("2TB"), 2_000_000_000_000);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("512MiB"), 512 << 20);
        assert_eq!(ok("3KiB"), 3 << 10);
        // huggingface_hub: strip, any case, decimals, int() truncation.
        assert_eq!(ok(" 5 gb "), 5_000_000_000);
        assert_eq!(ok("1.5GB"), 1_500_000_000);
        assert_eq!(ok("0.3GB"), (0.3f64 * 1e9) as u64);
        assert_eq!(ok("1.0000001KB"), 1000);
        assert_eq!(ok("1000"), 1000);
        for bad in [
            "", "GB", "5XB", "5 G", "five GB", "0GB", "-1GB", "0.0001KB", "1e400GB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn transposed_pairs_are_recognised() {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let xt = Tensor::from_vec(vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0], &[3, 2]).unwrap();
        assert!(transposed_equal(&x, &xt).unwrap());
        assert!(!transposed_equal(&x, &x).unwrap(), "shapes [2,3] and [2,3]");
        let off = Tensor::from_vec(vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.5], &[3, 2]).unwrap();
        assert!(!transposed_equal(&x, &off).unwrap());
    }

    #[test]
    fn another_base_is_recognised_by_folder_or_name() {
        let dir = std::env::temp_dir().join(format!("prefer-export-base-{}", std::process::id()));
        let (a, b) = (dir.join("base-a"), dir.join("base-b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let a_str = a.to_string_lossy().into_owned();
        assert_eq!(other_base(&a_str, &a), None);
        assert_eq!(other_base(&format!("{a_str}/"), &a), None);
        let w = other_base(&a_str, &b).expect("another folder");
        assert!(w.contains(&a_str) && w.contains("base-b"), "{w}");
        // A Hub id: its name against the folder's.
        assert_eq!(other_base("org/base-a", &a), None);
        assert!(other_base("org/other-model", &a).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bytes_read_for_people() {
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(1_502_960), "1.50 MB (1502960 bytes)");
        assert_eq!(human_bytes(5_000_000_000), "5.00 GB (5000000000 bytes)");
    }
}
