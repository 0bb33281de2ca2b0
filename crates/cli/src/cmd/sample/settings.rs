//! Sampling settings from the command line and a TOML file: vLLM's names, flags override
//! the file, the file overrides vLLM's defaults.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sample::SamplingParams;

/// Flags named after vLLM's `SamplingParams`. Each is optional so that an unset flag leaves
/// the TOML file's (or vLLM's default) value alone.
#[derive(clap::Args, Debug, Default)]
pub struct SamplingFlags {
    /// Sampling settings in TOML, top-level keys named as the flags with `_`
    /// (temperature = 0.7, top_k = 5, stop = ["###"], …); flags given here override them.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Completions per prompt [vLLM default: 1].
    #[arg(long)]
    pub n: Option<u32>,
    /// Softmax temperature; 0 is greedy; 0 < T < 0.01 is raised to 0.01 (with a warning),
    /// as vLLM does [default: 1.0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep the K most likely tokens; 0 or -1 is off [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// Keep the smallest set of most likely tokens whose probability reaches P [default: 1.0].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than MIN_P times the most likely one [default: 0.0].
    #[arg(long)]
    pub min_p: Option<f64>,
    /// > 1 discourages tokens of the prompt and the output [default: 1.0].
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Subtracted once from the logit of every token already generated, in [-2, 2]
    /// [default: 0.0].
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f64>,
    /// Subtracted per occurrence in the output, in [-2, 2] [default: 0.0].
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f64>,
    /// Most tokens to generate per completion [vLLM default: 16].
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Stop tokens and stop strings are ignored until this many tokens [default: 0].
    #[arg(long)]
    pub min_tokens: Option<u32>,
    /// A string that ends a completion (cut from the text unless --include-stop-str);
    /// repeat the flag for several.
    #[arg(long, value_name = "STRING")]
    pub stop: Vec<String>,
    /// Token ids that end a completion besides EOS (comma-separated or repeated).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Keep generating past EOS (and generation_config.json's EOS ids).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ignore_eos: Option<bool>,
    /// The run's seed: row ID's sample k draws from a stream derived from (SEED, ID, k), so
    /// runs and resumed runs are reproducible [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<i64>,
    /// Write each sampled token's raw log-prob (`token_logprobs`), and with N > 0 also the
    /// N most likely tokens' (`top_logprobs`).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<i32>,
    /// Keep the matched stop string (or stop token's text) in the text.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub include_stop_str: Option<bool>,
    /// Leave special tokens out of the text [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub skip_special_tokens: Option<bool>,
}

impl SamplingFlags {
    /// vLLM's defaults, then the TOML file, then the flags.
    pub fn params(&self) -> Result<SamplingParams> {
        let mut p = match &self.config {
            Some(path) => SamplingParams::from_toml_file(path)
                .with_context(|| format!("reading --config {}", path.display()))?,
            None => SamplingParams::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field { p.$field = v; }
            )*};
        }
        set!(
            n,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            min_tokens,
            ignore_eos,
            skip_special_tokens
        );
        if let Some(v) = self.max_tokens {
            p.max_tokens = Some(v);
        }
        if let Some(v) = self.seed {
            p.seed = Some(v);
        }
        if let Some(v) = self.logprobs {
            p.logprobs = Some(v);
        }
        if let Some(v) = self.include_stop_str {
            p.include_stop_str_in_output = v;
        }
        if !self.stop.is_empty() {
            p.stop = self.stop.clone();
        }
        if let Some(ids) = &self.stop_token_ids {
            p.stop_token_ids = ids.clone();
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: SamplingFlags,
    }

    fn parse(args: &[&str]) -> SamplingParams {
        let mut all = vec!["prefer"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().flags.params().unwrap()
    }

    #[test]
    fn no_flags_are_vllms_defaults() {
        assert_eq!(parse(&[]), SamplingParams::default());
    }

    #[test]
    fn flags_use_vllms_names() {
        let p = parse(&[
            "--temperature",
            "0.001",
            "--top-k",
            "5",
            "--top-p",
            "0.8",
            "--min-p",
            "0.1",
            "--repetition-penalty",
            "1.1",
            "--presence-penalty",
            "-0.5",
            "--frequency-penalty",
            "0.25",
            "--max-tokens",
            "4096",
            "--min-tokens",
            "2",
            "--stop",
            "<|endoftext|>",
            "--stop",
            "</s>",
            "--stop-token-ids",
            "7,9",
            "--ignore-eos",
            "--seed",
            "42",
            "--n",
            "3",
            "--logprobs",
            "0",
            "--include-stop-str",
            "--skip-special-tokens",
            "false",
        ]);
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.min_p),
            (0.001, 5, 0.8, 0.1)
        );
        assert_eq!(
            (
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty
            ),
            (1.1, -0.5, 0.25)
        );
        assert_eq!((p.max_tokens, p.min_tokens, p.n), (Some(4096), 2, 3));
        assert_eq!(p.stop, vec!["<|endoftext|>", "</s>"]);
        assert_eq!(p.stop_token_ids, vec![7, 9]);
        assert!(p.ignore_eos && p.include_stop_str_in_output && !p.skip_special_tokens);
        assert_eq!((p.seed, p.logprobs), (Some(42), Some(0)));
        assert_eq!(parse(&["--top-k", "-1"]).top_k, -1);
        assert!(!parse(&["--ignore-eos", "false"]).ignore_eos);
    }

    #[test]
    fn flags_override_the_toml_file() {
        let dir = std::env::temp_dir().join(format!("prefer-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sampling.toml");
        std::fs::write(
            &path,
            "temperature = 0.7\ntop_k = 5\nstop = ['###']\nmax_tokens = 100\nignore_eos = true\n",
        )
        .unwrap();
        let cfg = path.to_str().unwrap();
        let p = parse(&[
            "--config",
            cfg,
            "--top-k",
            "7",
            "--stop",
            "END",
            "--ignore-eos",
            "false",
        ]);
        assert_eq!((p.temperature, p.top_k, p.max_tokens), (0.7, 7, Some(100)));
        assert_eq!(p.stop, vec!["END"]);
        assert!(!p.ignore_eos);

        std::fs::write(&path, "temprature = 0.7\n").unwrap();
        let e = Cli::try_parse_from(["prefer", "--config", cfg])
            .unwrap()
            .flags
            .params()
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("temprature") && e.contains("sampling.toml"),
            "{e}"
        );
    }
}
