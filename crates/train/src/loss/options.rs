//! The DPO loss options, named and defaulted as TRL 1.16's `DPOConfig` names them, and
//! the checks TRL makes on them (`DPOConfig.__post_init__`, `DPOTrainer.__init__`, and the
//! unknown-name errors `_compute_loss` raises), with TRL's messages.
//!
//! A few settings TRL accepts but cannot train with are refused here, each saying why:
//! an empty `loss_type` (TRL's loss is then the float 0.0, which has no backward),
//! `label_smoothing` outside [0, 0.5) with `robust` (TRL only warns; 0.5 divides by zero and
//! larger values flip the loss), outside (0, 1) with `exo_pair` (log of a non-positive
//! number), `use_weighting` with `hinge` or `sft` (TRL 1.16 fails in autograd: it scales
//! those per-sequence losses in place), a non-positive or non-finite `beta`, `discopop_tau`
//! (with `discopop`), and `ld_alpha` outside [0, 1] (TRL documents that range).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Result, TrainError};

/// One of TRL's DPO loss types (`loss_type`), spelled as TRL spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LossType {
    Sigmoid,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    Robust,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
}

impl LossType {
    /// Every type, in the order TRL's "Unknown loss type" message lists them.
    pub const ALL: [LossType; 15] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// The types built on the chosen − rejected score difference: the only ones TRL lets
    /// take an f-divergence other than reverse KL (the f-DPO reparameterisation leaves a
    /// β·log Z(x) term that cancels only in that difference).
    pub fn allows_f_divergence(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::SigmoidNorm
                | LossType::Hinge
                | LossType::Ipo
                | LossType::ExoPair
                | LossType::Robust
                | LossType::Discopop
                | LossType::Sft
        )
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<LossType> {
        LossType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| TrainError::Arg {
                what: "loss_type",
                msg: format!(
                    "Unknown loss type: {s}. Should be one of {}",
                    py_list(LossType::ALL.iter().map(|t| t.name()))
                ),
            })
    }
}

impl TryFrom<String> for LossType {
    type Error = TrainError;
    fn try_from(s: String) -> Result<LossType> {
        s.parse()
    }
}

impl From<LossType> for String {
    fn from(t: LossType) -> String {
        t.name().to_string()
    }
}

/// The f-divergence regulariser between policy and reference (f-DPO), TRL's
/// `f_divergence_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FDivergence {
    /// Standard DPO.
    #[default]
    ReverseKl,
    ForwardKl,
    JsDivergence,
    /// With `f_alpha_divergence_coef` as α.
    AlphaDivergence,
}

impl FDivergence {
    pub const ALL: [FDivergence; 4] = [
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl fmt::Display for FDivergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FDivergence {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<FDivergence> {
        FDivergence::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| TrainError::Arg {
                what: "f_divergence_type",
                msg: format!("Unknown f_divergence_type: {s}"),
            })
    }
}

impl TryFrom<String> for FDivergence {
    type Error = TrainError;
    fn try_from(s: String) -> Result<FDivergence> {
        s.parse()
    }
}

impl From<FDivergence> for String {
    fn from(d: FDivergence) -> String {
        d.name().to_string()
    }
}

/// The loss options of TRL's `DPOConfig`, with its names and defaults. Deserialises from
/// the same keys (`loss_type` may be one name or a list, as TRL accepts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoLossConfig {
    /// One or more types; several are summed, each batch mean times its weight.
    #[serde(deserialize_with = "one_or_many")]
    pub loss_type: Vec<LossType>,
    /// One weight per type; `None`: 1.0 each.
    pub loss_weights: Option<Vec<f64>>,
    /// Deviation from the reference (τ for `ipo`). Default 0.1.
    pub beta: f64,
    /// `robust`: probability a label is flipped, in [0, 0.5); `exo_pair`: ε (> 0); also
    /// read by `aot` / `aot_unpaired`. Default 0.
    pub label_smoothing: f64,
    pub f_divergence_type: FDivergence,
    /// α of `alpha_divergence`. Default 0.5.
    pub f_alpha_divergence_coef: f64,
    /// τ of `discopop`. Default 0.05.
    pub discopop_tau: f64,
    /// WPO: scale each pair's loss by the policy's length-normalised sequence
    /// probabilities (needs [`super::SeqStats::log_sum_sq_probs`]).
    pub use_weighting: bool,
    /// LD-DPO: weight of the log-probs of completion tokens past the pair's shared length
    /// (needs [`super::SeqStats::tail_logps`]). `None`: no weighting.
    pub ld_alpha: Option<f64>,
}

impl Default for DpoLossConfig {
    fn default() -> DpoLossConfig {
        DpoLossConfig {
            loss_type: vec![LossType::Sigmoid],
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
            use_weighting: false,
            ld_alpha: None,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<LossType>, D::Error> {
    // Names first, parsed after: an untagged enum of LossType would hide TRL's
    // "Unknown loss type" message behind serde's "did not match any variant".
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let names = match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(v) => v,
    };
    names
        .iter()
        .map(|n| n.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl DpoLossConfig {
    /// TRL's checks, in TRL's order (config, then trainer), then prefer's own (see the
    /// module doc). Returns the (type, weight) terms.
    pub(crate) fn validate(&self) -> Result<Vec<(LossType, f64)>> {
        let types = &self.loss_type;
        let weights = match &self.loss_weights {
            Some(w) if w.len() != types.len() => {
                return Err(arg(
                    "loss_weights",
                    format!(
                        "`loss_weights` must have the same length as `loss_type` when combining \
                         multiple losses. Got {} weights for {} loss types.",
                        w.len(),
                        types.len()
                    ),
                ));
            }
            Some(w) => w.clone(),
            None => vec![1.0; types.len()],
        };
        let has = |t: LossType| types.contains(&t);

        if self.f_divergence_type != FDivergence::ReverseKl
            && !types.iter().all(|t| t.allows_f_divergence())
        {
            let mut allowed: Vec<&str> = LossType::ALL
                .iter()
                .filter(|t| t.allows_f_divergence())
                .map(|t| t.name())
                .collect();
            allowed.sort_unstable();
            return Err(arg(
                "f_divergence_type",
                format!(
                    "`f_divergence_type='{}'` is only supported for the following loss types: \
                     {}. You provided {}. Use the default `f_divergence_type='reverse_kl'` with \
                     these losses.",
                    self.f_divergence_type,
                    py_list(allowed),
                    py_list(types.iter().map(|t| t.name()))
                ),
            ));
        }
        if self.use_weighting && (has(LossType::Aot) || has(LossType::AotUnpaired)) {
            return Err(arg(
                "use_weighting",
                "WPO-style weighting is not implemented for 'aot' or 'aot_unpaired' because those \
                 losses sort samples, which would misalign per-pair weights."
                    .to_string(),
            ));
        }
        let ls = self.label_smoothing;
        if has(LossType::Robust) && !(0.0..0.5).contains(&ls) {
            // TRL only warns; its own doc says the value must lie there.
            return Err(arg(
                "label_smoothing",
                format!(
                    "The `label_smoothing` parameter should lie in [0.0, 0.5) for the 'robust' \
                     loss. You provided {}.",
                    py_float(ls)
                ),
            ));
        }
        if has(LossType::ExoPair) && ls == 0.0 {
            return Err(arg(
                "label_smoothing",
                "Label smoothing must be greater than 0.0 when using 'exo_pair' loss. The EXO \
                 paper recommends a value of 1e-3."
                    .to_string(),
            ));
        }

        // prefer's own checks: settings TRL accepts but cannot train with.
        if types.is_empty() {
            return Err(arg(
                "loss_type",
                "at least one loss type is needed".to_string(),
            ));
        }
        if has(LossType::ExoPair) && !(ls > 0.0 && ls < 1.0) {
            return Err(arg(
                "label_smoothing",
                format!(
                    "must lie in (0, 1) for the 'exo_pair' loss (it takes log(ε) and log(1 − ε)); \
                     you provided {}",
                    py_float(ls)
                ),
            ));
        }
        if !ls.is_finite() {
            return Err(arg("label_smoothing", format!("must be finite, got {ls}")));
        }
        if self.use_weighting
            && let Some(t) = types
                .iter()
                .find(|t| matches!(t, LossType::Hinge | LossType::Sft))
        {
            return Err(arg(
                "use_weighting",
                format!(
                    "WPO weighting with the '{t}' loss is not supported: TRL 1.16 cannot train \
                     it either (it scales that loss in place, which autograd rejects)"
                ),
            ));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(arg(
                "beta",
                format!("must be a positive finite number, got {}", self.beta),
            ));
        }
        if has(LossType::Discopop) && !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
            return Err(arg(
                "discopop_tau",
                format!(
                    "must be a positive finite number for the 'discopop' loss, got {}",
                    self.discopop_tau
                ),
            ));
        }
        if self.f_divergence_type == FDivergence::AlphaDivergence
            && !self.f_alpha_divergence_coef.is_finite()
        {
            return Err(arg(
                "f_alpha_divergence_coef",
                format!("must be finite, got {}", self.f_alpha_divergence_coef),
            ));
        }
        if let Some(a) = self.ld_alpha
            && !(0.0..=1.0).contains(&a)
        {
            return Err(arg("ld_alpha", format!("must be in [0.0, 1.0], got {a}")));
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(arg(
                "loss_weights",
                format!("weight {i} ({}) is not finite", weights[i]),
            ));
        }
        Ok(types.iter().copied().zip(weights).collect())
    }
}

fn arg(what: &'static str, msg: String) -> TrainError {
    TrainError::Arg { what, msg }
}

/// A Python list of strings as `repr` writes it: `['a', 'b']`.
fn py_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.into_iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A float as Python's `str` writes the common cases (`0.5`, `-0.1`, `1.0`): TRL's messages
/// embed the value that way.
fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(types: &[LossType]) -> DpoLossConfig {
        DpoLossConfig {
            loss_type: types.to_vec(),
            ..DpoLossConfig::default()
        }
    }

    fn what(r: Result<Vec<(LossType, f64)>>) -> &'static str {
        match r {
            Err(TrainError::Arg { what, .. }) => what,
            other => panic!("expected an Arg error, got {other:?}"),
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_get_trls_message() {
        for t in LossType::ALL {
            assert_eq!(t.name().parse::<LossType>().unwrap(), t);
        }
        for d in FDivergence::ALL {
            assert_eq!(d.name().parse::<FDivergence>().unwrap(), d);
        }
        let e = "dpo".parse::<LossType>().unwrap_err().to_string();
        assert!(
            e.starts_with(
                "loss_type: Unknown loss type: dpo. Should be one of ['sigmoid', 'hinge'"
            ),
            "{e}"
        );
        assert!(e.ends_with("'sft', 'sigmoid_norm']"), "{e}");
        let e = "kl".parse::<FDivergence>().unwrap_err().to_string();
        assert_eq!(e, "f_divergence_type: Unknown f_divergence_type: kl");
    }

    #[test]
    fn defaults_are_trls_and_weights_default_to_one() {
        let c = DpoLossConfig::default();
        assert_eq!(c.beta, 0.1);
        assert_eq!(c.discopop_tau, 0.05);
        assert_eq!(c.f_alpha_divergence_coef, 0.5);
        let terms = cfg(&[LossType::Sigmoid, LossType::Sft]).validate().unwrap();
        assert_eq!(terms, vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 1.0)]);
    }

    #[test]
    fn deserialises_trls_keys_and_a_single_type() {
        let c: DpoLossConfig =
            serde_json::from_str(r#"{"loss_type": "ipo", "beta": 0.3}"#).unwrap();
        assert_eq!(c.loss_type, vec![LossType::Ipo]);
        assert_eq!(c.beta, 0.3);
        let c: DpoLossConfig = serde_json::from_str(
            r#"{"loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5],
                "f_divergence_type": "js_divergence", "ld_alpha": 0.5}"#,
        )
        .unwrap();
        assert_eq!(c.loss_weights, Some(vec![1.0, 0.5]));
        assert_eq!(c.f_divergence_type, FDivergence::JsDivergence);
        assert_eq!(c.ld_alpha, Some(0.5));
        let e = serde_json::from_str::<DpoLossConfig>(r#"{"loss_type": ["dpo"]}"#).unwrap_err();
        assert!(e.to_string().contains("Unknown loss type: dpo"), "{e}");
        let e = serde_json::from_str::<DpoLossConfig>(r#"{"betta": 1}"#).unwrap_err();
        assert!(e.to_string().contains("betta"), "{e}");
    }

    #[test]
    fn trls_checks() {
        let mut c = cfg(&[LossType::Sigmoid, LossType::Sft]);
        c.loss_weights = Some(vec![1.0]);
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "loss_weights: `loss_weights` must have the same length as `loss_type` when \
             combining multiple losses. Got 1 weights for 2 loss types."
        );

        for t in LossType::ALL {
            let mut c = cfg(&[t]);
            c.label_smoothing = if t == LossType::ExoPair { 1e-3 } else { 0.0 };
            c.f_divergence_type = FDivergence::ForwardKl;
            assert_eq!(c.validate().is_ok(), t.allows_f_divergence(), "{t}");
        }
        let mut c = cfg(&[LossType::Sigmoid, LossType::NcaPair]);
        c.f_divergence_type = FDivergence::JsDivergence;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("You provided ['sigmoid', 'nca_pair']"), "{e}");
        assert!(
            e.contains("['discopop', 'exo_pair', 'hinge', 'ipo', 'robust', 'sft', 'sigmoid', 'sigmoid_norm']"),
            "{e}"
        );

        let mut c = cfg(&[LossType::AotUnpaired]);
        c.use_weighting = true;
        assert_eq!(what(c.validate()), "use_weighting");

        assert_eq!(
            what(cfg(&[LossType::ExoPair]).validate()),
            "label_smoothing"
        );
    }

    #[test]
    fn prefers_stricter_checks() {
        for ls in [-0.1, 0.5, 0.7] {
            let mut c = cfg(&[LossType::Robust]);
            c.label_smoothing = ls;
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("You provided {}.", py_float(ls))),
                "{e}"
            );
        }
        let mut c = cfg(&[LossType::Robust]);
        c.label_smoothing = 0.49;
        assert!(c.validate().is_ok());

        for ls in [-0.5, 1.0, 2.0] {
            let mut c = cfg(&[LossType::ExoPair]);
            c.label_smoothing = ls;
            assert_eq!(what(c.validate()), "label_smoothing", "{ls}");
        }
        assert_eq!(what(cfg(&[]).validate()), "loss_type");
        for t in [LossType::Hinge, LossType::Sft] {
            let mut c = cfg(&[LossType::Sigmoid, t]);
            c.use_weighting = true;
            assert_eq!(what(c.validate()), "use_weighting");
        }
        for beta in [0.0, -0.1, f64::NAN, f64::INFINITY] {
            let mut c = cfg(&[LossType::Sigmoid]);
            c.beta = beta;
            assert_eq!(what(c.validate()), "beta");
        }
        let mut c = cfg(&[LossType::Discopop]);
        c.discopop_tau = 0.0;
        assert_eq!(what(c.validate()), "discopop_tau");
        c.loss_type = vec![LossType::Sigmoid];
        assert!(c.validate().is_ok(), "tau is only read by discopop");
        for a in [-0.1, 1.5] {
            let mut c = cfg(&[LossType::Sigmoid]);
            c.ld_alpha = Some(a);
            assert_eq!(what(c.validate()), "ld_alpha");
        }
        let mut c = cfg(&[LossType::Sigmoid]);
        c.loss_weights = Some(vec![f64::NAN]);
        assert_eq!(what(c.validate()), "loss_weights");
        let mut c = cfg(&[LossType::Sigmoid]);
        c.f_divergence_type = FDivergence::AlphaDivergence;
        c.f_alpha_divergence_coef = f64::INFINITY;
        assert_eq!(what(c.validate()), "f_alpha_divergence_coef");
    }

    #[test]
    fn python_float_text() {
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(-0.1), "-0.1");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.0), "0.0");
    }
}
