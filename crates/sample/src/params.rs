//! Sampling parameters: vLLM's names, defaults and checks.
//!
//! [`SamplingParams`] is what a user writes (command-line flags or a TOML table); every field
//! has vLLM's name and default. [`SamplingParams::validate`] does what vLLM's
//! `SamplingParams.__post_init__` does, in the same order, and returns a [`ValidParams`], the
//! only form the sampler accepts:
//!
//! 1. `0 < temperature < 0.01` is raised to 0.01 with a warning (vLLM's `_MAX_TEMP`): smaller
//!    values overflow the softmax. The reference workflow's `temperature = 0.001` therefore
//!    samples at 0.01 under vLLM, and here too.
//! 2. `seed = -1` means no seed; `stop_token_ids` lose duplicates (first occurrence kept).
//! 3. Range checks (vLLM's `_verify_args`).
//! 4. `temperature < 1e-5` (after step 1 that is exactly 0) is greedy: top_p, top_k and min_p
//!    are switched off, and `n` must be 1.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::error::{Result, SampleError};

/// Below this temperature vLLM samples greedily (`_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE_EPS: f64 = 1e-5;
/// Non-zero temperatures below this are raised to it (vLLM's `_MAX_TEMP`).
pub const MIN_SAMPLING_TEMPERATURE: f64 = 1e-2;

/// Sampling settings as a user gives them, with vLLM's names and defaults.
///
/// Deserializes from a TOML table (unknown keys are an error); `stop` takes a string or a
/// list of strings, and `include_stop_str` is accepted for `include_stop_str_in_output`
/// (the command-line flag's name).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Independent completions per prompt.
    pub n: u32,
    /// Softmax temperature; 0 is greedy. Range [0, 2].
    pub temperature: f64,
    /// Keep the k most likely tokens (ties with the k-th kept too); 0 or -1 is off.
    pub top_k: i64,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p. (0, 1].
    pub top_p: f64,
    /// Drop tokens less likely than min_p times the most likely one. [0, 1].
    pub min_p: f64,
    /// > 1 discourages tokens seen in the prompt or output: logit / p if > 0, else logit · p.
    pub repetition_penalty: f64,
    /// Subtracted once from the logit of every token already in the output. [-2, 2].
    pub presence_penalty: f64,
    /// Subtracted per occurrence in the output. [-2, 2].
    pub frequency_penalty: f64,
    /// Most tokens to generate; `None` leaves only the model's context as the limit.
    pub max_tokens: Option<u32>,
    /// Stop tokens (EOS, stop_token_ids) are masked until this many tokens are generated, and
    /// stop strings are not looked for in their text.
    pub min_tokens: u32,
    /// Strings that end generation; cut from the text unless include_stop_str_in_output.
    #[serde(deserialize_with = "string_or_list")]
    pub stop: Vec<String>,
    /// Token ids that end generation (besides EOS); their stop_reason is the id.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (generation_config's EOS ids stop nothing either).
    pub ignore_eos: bool,
    /// Per-request seed: the same seed gives the same draws whatever else is in the batch.
    /// -1 means none.
    pub seed: Option<i64>,
    /// Also return the N most likely raw log-probs per token (-1: the whole vocabulary).
    pub logprobs: Option<i32>,
    /// Keep the matched stop string (or the stop token's text) in the output text.
    #[serde(alias = "include_stop_str")]
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the detokenized text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // vLLM's SamplingParams defaults.
        Self {
            n: 1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: Some(16),
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            seed: None,
            logprobs: None,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
        }
    }
}

fn string_or_list<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl SamplingParams {
    /// Parses a TOML document whose top-level keys are sampling parameters. `origin` names
    /// where the text came from (a path) for the error message. Not validated yet.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| SampleError::Toml {
            origin: origin.to_string(),
            msg: e.to_string(),
        })
    }

    /// Reads and parses a TOML file of sampling parameters (see [`Self::from_toml_str`]).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| SampleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Normalizes and checks the parameters as vLLM's `SamplingParams.__post_init__` does
    /// (see the module doc for the steps). Warns through `tracing` when it raises a low
    /// temperature.
    pub fn validate(mut self) -> Result<ValidParams> {
        if self.temperature > 0.0 && self.temperature < MIN_SAMPLING_TEMPERATURE {
            tracing::warn!(
                "temperature {} is below {MIN_SAMPLING_TEMPERATURE}: raised to \
                 {MIN_SAMPLING_TEMPERATURE} as vLLM does (smaller values overflow the softmax); \
                 use temperature 0 for greedy decoding",
                self.temperature
            );
            self.temperature = MIN_SAMPLING_TEMPERATURE;
        }
        if self.seed == Some(-1) {
            self.seed = None;
        }
        let mut seen = std::collections::HashSet::new();
        self.stop_token_ids.retain(|id| seen.insert(*id));

        self.verify()?;

        if self.temperature < GREEDY_TEMPERATURE_EPS {
            self.top_p = 1.0;
            self.top_k = 0;
            self.min_p = 0.0;
            if self.n > 1 {
                return Err(param(
                    "n",
                    format!("must be 1 when using greedy sampling, got {}", self.n),
                ));
            }
        }
        Ok(ValidParams(self))
    }

    /// vLLM's `_verify_args`. Written as `!(in range)` so NaN fails every check.
    fn verify(&self) -> Result<()> {
        if self.n < 1 {
            return Err(param("n", format!("must be at least 1, got {}", self.n)));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(param(name, format!("must be in [-2, 2], got {v}")));
            }
        }
        let rp = self.repetition_penalty;
        if !rp.is_finite() || rp <= 0.0 {
            return Err(param(
                "repetition_penalty",
                format!("must be a finite number greater than zero, got {rp}"),
            ));
        }
        let t = self.temperature;
        if !(0.0..=2.0).contains(&t) {
            return Err(param("temperature", format!("must be in [0, 2], got {t}")));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(param(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if self.top_k < -1 {
            return Err(param(
                "top_k",
                format!("must be 0 or -1 (off), or at least 1, got {}", self.top_k),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(param(
                "min_p",
                format!("must be in [0, 1], got {}", self.min_p),
            ));
        }
        if let Some(max) = self.max_tokens {
            if max < 1 {
                return Err(param(
                    "max_tokens",
                    format!("must be at least 1, got {max}"),
                ));
            }
            if self.min_tokens > max {
                return Err(param(
                    "min_tokens",
                    format!(
                        "must be less than or equal to max_tokens={max}, got {}",
                        self.min_tokens
                    ),
                ));
            }
        }
        if let Some(lp) = self.logprobs
            && lp < -1
        {
            return Err(param(
                "logprobs",
                format!("must be non-negative, or -1 for the whole vocabulary, got {lp}"),
            ));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(param("stop", format!("entry {i} is an empty string")));
        }
        Ok(())
    }
}

fn param(name: &'static str, msg: String) -> SampleError {
    SampleError::Param { name, msg }
}

/// Sampling parameters that passed [`SamplingParams::validate`]; read them through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams(SamplingParams);

impl std::ops::Deref for ValidParams {
    type Target = SamplingParams;
    fn deref(&self) -> &SamplingParams {
        &self.0
    }
}

impl ValidParams {
    /// Greedy decoding: argmax of the penalized logits, no randomness.
    pub fn is_greedy(&self) -> bool {
        self.0.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// The top-k cut for a vocabulary of `vocab` logits, or `None` when it keeps everything
    /// (k ≤ 0, or k ≥ vocab, as vLLM's input batch treats it).
    pub fn top_k_for(&self, vocab: usize) -> Option<usize> {
        let k = self.0.top_k;
        (k > 0 && (k as u64) < vocab as u64).then_some(k as usize)
    }

    /// How many top log-probs to return per token for a vocabulary of `vocab`: `None` when
    /// not asked, `Some(0)` for only the sampled token's.
    pub fn num_top_logprobs(&self, vocab: usize) -> Option<usize> {
        self.0.logprobs.map(|n| {
            if n < 0 {
                vocab
            } else {
                (n as usize).min(vocab)
            }
        })
    }

    /// The underlying parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(p: SamplingParams) -> String {
        p.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_vllms() {
        let p = SamplingParams::default();
        assert_eq!(
            (p.n, p.temperature, p.top_k, p.top_p, p.min_p),
            (1, 1.0, 0, 1.0, 0.0)
        );
        assert_eq!(p.max_tokens, Some(16));
        assert!(p.skip_special_tokens && !p.ignore_eos && !p.include_stop_str_in_output);
        let v = p.validate().unwrap();
        assert!(!v.is_greedy());
    }

    #[test]
    fn low_temperature_is_raised_to_one_hundredth() {
        for t in [0.001, 1e-6, 0.009_999] {
            let v = SamplingParams {
                temperature: t,
                top_k: 5,
                top_p: 0.8,
                ..Default::default()
            }
            .validate()
            .unwrap();
            assert_eq!(v.temperature, 0.01, "t = {t}");
            // Raised before the greedy check, so it samples (with its filters intact).
            assert!(!v.is_greedy());
            assert_eq!((v.top_k, v.top_p), (5, 0.8));
        }
        let v = SamplingParams {
            temperature: 0.01,
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(v.temperature, 0.01);
    }

    /// A tracing subscriber that keeps the messages of WARN events.
    #[derive(Default, Clone)]
    struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl tracing::Subscriber for Warnings {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Msg<'a>(&'a mut String);
            impl tracing::field::Visit for Msg<'_> {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        *self.0 = format!("{v:?}");
                    }
                }
            }
            if *event.metadata().level() == tracing::Level::WARN {
                let mut m = String::new();
                event.record(&mut Msg(&mut m));
                self.0.lock().unwrap().push(m);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn the_clamp_says_so_in_a_warning() {
        let w = Warnings::default();
        tracing::subscriber::with_default(w.clone(), || {
            SamplingParams {
                temperature: 0.001,
                ..Default::default()
            }
            .validate()
            .unwrap();
            SamplingParams {
                temperature: 0.5,
                ..Default::default()
            }
            .validate()
            .unwrap();
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            }
            .validate()
            .unwrap();
        });
        let got = w.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("temperature 0.001") && got[0].contains("raised to 0.01"),
            "{got:?}"
        );
    }

    #[test]
    fn zero_temperature_is_greedy_and_switches_filters_off() {
        let v = SamplingParams {
            temperature: 0.0,
            top_k: 5,
            top_p: 0.5,
            min_p: 0.3,
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert!(v.is_greedy());
        assert_eq!((v.top_k, v.top_p, v.min_p), (0, 1.0, 0.0));
        let e = err_of(SamplingParams {
            temperature: 0.0,
            n: 2,
            ..Default::default()
        });
        assert!(e.contains("greedy"), "{e}");
    }

    /// The default parameters with one change.
    fn with(change: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        change(&mut p);
        p
    }

    #[test]
    fn ranges_are_checked_like_vllm() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (with(|p| p.n = 0), "`n`"),
            (with(|p| p.presence_penalty = 2.5), "presence_penalty"),
            (with(|p| p.frequency_penalty = -2.1), "frequency_penalty"),
            (with(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (
                with(|p| p.repetition_penalty = f64::INFINITY),
                "repetition_penalty",
            ),
            (with(|p| p.temperature = -0.5), "temperature"),
            (with(|p| p.temperature = 2.5), "temperature"),
            (with(|p| p.temperature = f64::NAN), "temperature"),
            (with(|p| p.top_p = 0.0), "top_p"),
            (with(|p| p.top_p = 1.01), "top_p"),
            (with(|p| p.top_k = -2), "top_k"),
            (with(|p| p.min_p = 1.5), "min_p"),
            (with(|p| p.max_tokens = Some(0)), "max_tokens"),
            (
                with(|p| {
                    p.max_tokens = Some(4);
                    p.min_tokens = 5;
                }),
                "min_tokens",
            ),
            (with(|p| p.logprobs = Some(-2)), "logprobs"),
            (with(|p| p.stop = vec!["a".into(), String::new()]), "stop"),
        ];
        for (p, name) in cases {
            let e = err_of(p.clone());
            assert!(e.contains(name), "{p:?} -> {e}");
        }
    }

    #[test]
    fn top_k_minus_one_and_zero_are_off_and_seed_minus_one_is_none() {
        let v = SamplingParams {
            top_k: -1,
            seed: Some(-1),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(v.top_k_for(100), None);
        assert_eq!(v.seed, None);
        let v = SamplingParams {
            top_k: 0,
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(v.top_k_for(100), None);
        let v = SamplingParams {
            top_k: 5,
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(v.top_k_for(100), Some(5));
        assert_eq!(v.top_k_for(5), None);
    }

    #[test]
    fn stop_token_ids_lose_duplicates_in_order() {
        let v = SamplingParams {
            stop_token_ids: vec![7, 3, 7, 1, 3],
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(v.stop_token_ids, vec![7, 3, 1]);
    }

    #[test]
    fn toml_parses_vllm_names_and_the_flag_alias() {
        let p = SamplingParams::from_toml_str(
            "temperature = 0.7\ntop_k = 5\ntop_p = 0.8\nmax_tokens = 4096\n\
             stop = ['<|endoftext|>', '</s>']\nstop_token_ids = [2]\nseed = 42\n\
             include_stop_str = true\nlogprobs = 0\n",
            "test.toml",
        )
        .unwrap();
        assert_eq!(p.temperature, 0.7);
        assert_eq!((p.top_k, p.top_p, p.max_tokens), (5, 0.8, Some(4096)));
        assert_eq!(p.stop, vec!["<|endoftext|>", "</s>"]);
        assert_eq!((p.seed, p.logprobs), (Some(42), Some(0)));
        assert!(p.include_stop_str_in_output);
        // Unset keys keep vLLM's defaults.
        assert_eq!((p.n, p.repetition_penalty), (1, 1.0));

        let p = SamplingParams::from_toml_str("stop = \"###\"", "t.toml").unwrap();
        assert_eq!(p.stop, vec!["###"]);
        // Integers are fine where vLLM takes floats.
        let p = SamplingParams::from_toml_str("temperature = 1\ntop_p = 1\n", "t.toml").unwrap();
        assert_eq!((p.temperature, p.top_p), (1.0, 1.0));
    }

    #[test]
    fn toml_errors_name_the_origin_key_and_line() {
        let e = SamplingParams::from_toml_str("temperature = 0.7\ntop_kk = 5\n", "cfg/sample.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg/sample.toml"), "{e}");
        assert!(e.contains("top_kk"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = SamplingParams::from_toml_str("top_k = \"five\"\n", "s.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("top_k") || e.contains("line 1"), "{e}");
        let e = SamplingParams::from_toml_str("stop = 3\n", "s.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a string or a list of strings"), "{e}");
        let e = SamplingParams::from_toml_file(Path::new("/nonexistent/s.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/s.toml"), "{e}");
    }
}
