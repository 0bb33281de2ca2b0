//! AdamW's state on disk, for an exact resume: `<dir>/optimizer.safetensors` holds, for each
//! registered parameter `<name>`, the F32 tensors `exp_avg.<name>` and `exp_avg_sq.<name>`
//! ([len]); its metadata holds `format` ("prefer.adamw"), `version` ("1"), `step`, and the
//! hyper-parameters `beta1`, `beta2`, `eps`, `weight_decay` (Rust's shortest round-trip
//! decimal of each f64).
//!
//! Loading checks the file against the optimizer it is loaded into: the same parameters
//! (names and lengths, nothing missing, nothing extra) and the same hyper-parameters — a
//! resume that silently changed β2 or the decay would not be the run it claims to continue.
//! The state is replaced only when every check passed.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::peft::tensor_file::{F32Tensor, TensorFile, write_f32};

/// The state file's name inside a checkpoint folder.
pub const STATE_FILE: &str = "optimizer.safetensors";

const FORMAT: &str = "prefer.adamw";
const VERSION: &str = "1";

impl AdamW {
    /// Writes the step count and both moments of every parameter to
    /// `<dir>/optimizer.safetensors` (temporary file, then rename). `dir` must exist.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            for (prefix, data) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
                tensors.push(F32Tensor {
                    name: format!("{prefix}.{}", p.name),
                    shape: vec![data.len()],
                    data,
                });
            }
        }
        let mut metadata: HashMap<String, String> = self
            .hyper_parameters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        metadata.insert("format".into(), FORMAT.into());
        metadata.insert("version".into(), VERSION.into());
        metadata.insert("step".into(), self.step.to_string());
        write_f32(&dir.join(STATE_FILE), &tensors, metadata)
    }

    /// Replaces the step count and moments with those saved in `<dir>/optimizer.safetensors`.
    /// On any error the optimizer is left as it was.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let file = TensorFile::read(&path)?;
        let bad = |where_: String, msg: String| TrainError::Format {
            path: path.clone(),
            where_,
            msg,
        };
        let meta = file.metadata()?;
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("metadata {key}"), "missing".into()))
        };
        let format = field("format")?;
        let version = field("version")?;
        if format != FORMAT || version != VERSION {
            return Err(bad(
                "metadata format".into(),
                format!("{format} version {version}; expected {FORMAT} version {VERSION}"),
            ));
        }
        let step: u64 = field("step")?
            .parse()
            .map_err(|e| bad("metadata step".into(), format!("not a step count: {e}")))?;
        for (key, ours) in self.hyper_parameters() {
            let saved = field(key)?;
            if *saved != ours {
                return Err(bad(
                    format!("metadata {key}"),
                    format!(
                        "saved with {saved}, this run has {ours}: a resume must keep the optimizer's settings"
                    ),
                ));
            }
        }

        let mut loaded = Vec::with_capacity(self.params.len());
        let mut expected = std::collections::HashSet::new();
        for p in &self.params {
            let mut moments = Vec::with_capacity(2);
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let name = format!("{prefix}.{}", p.name);
                let (shape, values) = file
                    .f32_tensor(&name)?
                    .ok_or_else(|| bad(format!("tensor {name}"), "missing".into()))?;
                if shape != [p.exp_avg.len()] {
                    return Err(bad(
                        format!("tensor {name}"),
                        format!("shape {shape:?}; expected [{}]", p.exp_avg.len()),
                    ));
                }
                moments.push(values);
                expected.insert(name);
            }
            loaded.push(moments);
        }
        let st = file.tensors()?;
        if let Some(extra) = st.names().into_iter().find(|n| !expected.contains(*n)) {
            return Err(bad(
                format!("tensor {extra}"),
                "not a parameter of this optimizer".into(),
            ));
        }

        for (p, mut moments) in self.params.iter_mut().zip(loaded) {
            p.exp_avg_sq = moments.pop().unwrap_or_default();
            p.exp_avg = moments.pop().unwrap_or_default();
        }
        self.step = step;
        Ok(())
    }

    fn hyper_parameters(&self) -> [(&'static str, String); 4] {
        let c = &self.config;
        [
            ("beta1", format!("{:?}", c.beta1)),
            ("beta2", format!("{:?}", c.beta2)),
            ("eps", format!("{:?}", c.eps)),
            ("weight_decay", format!("{:?}", c.weight_decay)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("prefer-train-optim-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn stepped(n: u64) -> (AdamW, Vec<f32>) {
        let mut opt = AdamW::new(AdamWConfig::default(), [("w", 3)]).unwrap();
        let mut w = vec![1.0f32, 2.0, 3.0];
        for t in 0..n {
            let g = [t as f32 - 1.0, 0.5, -(t as f32)];
            opt.step(1e-2, &mut [&mut w[..]], &[&g[..]]).unwrap();
        }
        (opt, w)
    }

    #[test]
    fn saved_state_reloads_bit_for_bit() {
        let dir = scratch("reload");
        let (opt, _) = stepped(4);
        opt.save_state(&dir).unwrap();
        let mut fresh = AdamW::new(AdamWConfig::default(), [("w", 3)]).unwrap();
        fresh.load_state(&dir).unwrap();
        assert_eq!(fresh.steps_taken(), 4);
        assert_eq!(fresh.exp_avg(0), opt.exp_avg(0));
        assert_eq!(fresh.exp_avg_sq(0), opt.exp_avg_sq(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatched_parameters_or_settings_are_refused_and_change_nothing() {
        let dir = scratch("mismatch");
        stepped(2).0.save_state(&dir).unwrap();

        let mut other = AdamW::new(AdamWConfig::default(), [("v", 3)]).unwrap();
        let err = other.load_state(&dir).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors")
                && err.contains("tensor exp_avg.v")
                && err.contains("missing"),
            "{err}"
        );
        assert_eq!(other.steps_taken(), 0);

        let mut longer = AdamW::new(AdamWConfig::default(), [("w", 4)]).unwrap();
        let err = longer.load_state(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tensor exp_avg.w") && err.contains("[4]"),
            "{err}"
        );

        let mut fewer = AdamW::new(AdamWConfig::default(), Vec::<(String, usize)>::new()).unwrap();
        let err = fewer.load_state(&dir).unwrap_err().to_string();
        assert!(err.contains("not a parameter of this optimizer"), "{err}");

        let changed = AdamWConfig {
            beta2: 0.95,
            ..AdamWConfig::default()
        };
        let mut other = AdamW::new(changed, [("w", 3)]).unwrap();
        let err = other.load_state(&dir).unwrap_err().to_string();
        assert!(
            err.contains("metadata beta2") && err.contains("0.999") && err.contains("0.95"),
            "{err}"
        );
        assert_eq!(other.steps_taken(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_state_file_is_an_io_error_naming_it() {
        let dir = scratch("missing");
        let mut opt = AdamW::new(AdamWConfig::default(), [("w", 3)]).unwrap();
        let err = opt.load_state(&dir).unwrap_err().to_string();
        assert!(err.contains("optimizer.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
