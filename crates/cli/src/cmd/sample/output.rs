//! Where `--out` puts the samples: a JSON Lines file appended to as rows finish, or a
//! parquet file written once at the end.
//!
//! Parquet output keeps the resumability of JSON Lines through a sidecar,
//! `FILE.parquet.partial.jsonl` beside the target:
//!
//! 1. While `FILE.parquet` does not exist, finished rows are appended to the sidecar, which
//!    resumes exactly as a `.jsonl` output does (torn last line cut, done samples skipped).
//! 2. When every sample asked for is in the sidecar, it is converted
//!    (`parquet_rows::convert`) into a temporary sibling that is renamed to `FILE.parquet`
//!    only when complete, and then the sidecar is removed. A run that stops before leaves
//!    the sidecar, and the next run continues it.
//! 3. An existing `FILE.parquet` is finished: if it holds every sample asked for there is
//!    nothing to do (as with a complete `.jsonl`); a leftover sidecar whose rows are all in
//!    it — a crash between the rename and the removal — is removed. If it lacks samples,
//!    that is an error: a finished parquet file is never appended to or rewritten.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use sample::{Resume, SampleKey, SamplesFile};

use super::parquet_rows;

pub(super) enum Output {
    Jsonl(PathBuf),
    Parquet { target: PathBuf, sidecar: PathBuf },
}

/// What [`Output::open`] found.
pub(super) enum Opened {
    /// Every sample asked for is in the finished parquet file.
    Finished,
    /// Finished rows go to this file; what an earlier run left in it.
    Appending(SamplesFile, Resume),
}

impl Output {
    /// The output `--out` names, by its extension (checked before any work).
    pub(super) fn from_arg(out: &Path) -> Result<Output> {
        let ext = out
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" => Ok(Output::Jsonl(out.to_path_buf())),
            "parquet" => {
                let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
                let Some(name) = name else {
                    bail!("--out {}: expected a file name", out.display());
                };
                Ok(Output::Parquet {
                    target: out.to_path_buf(),
                    sidecar: out.with_file_name(format!("{name}.partial.jsonl")),
                })
            }
            _ => bail!(
                "--out {}: expected a .jsonl file (JSON Lines, appended to as rows finish) or \
                 a .parquet file (written when every row is done)",
                out.display()
            ),
        }
    }

    /// Opens the output for the samples `wanted`.
    pub(super) fn open(&self, wanted: &[SampleKey]) -> Result<Opened> {
        match self {
            Output::Jsonl(path) => {
                let (file, resume) = SamplesFile::open(path)?;
                Ok(Opened::Appending(file, resume))
            }
            Output::Parquet { target, sidecar } if target.exists() => {
                check_finished(target, sidecar, wanted)?;
                Ok(Opened::Finished)
            }
            Output::Parquet { sidecar, .. } => {
                let (file, resume) = SamplesFile::open(sidecar)?;
                Ok(Opened::Appending(file, resume))
            }
        }
    }

    /// What a stopped run tells the user about the final file, if anything.
    pub(super) fn pending_note(&self) -> String {
        match self {
            Output::Jsonl(_) => String::new(),
            Output::Parquet { target, .. } => {
                format!(" ({} is written once every row is done)", target.display())
            }
        }
    }

    /// Called when every sample asked for is in `file`: syncs it, and for parquet output
    /// converts the sidecar into the target and removes the sidecar.
    pub(super) fn finish(&self, file: SamplesFile) -> Result<()> {
        file.sync()?;
        drop(file);
        let Output::Parquet { target, sidecar } = self else {
            return Ok(());
        };
        let converted = parquet_rows::convert(sidecar, target)?;
        eprintln!(
            "wrote {} rows ({} columns) to {}",
            converted.rows,
            converted.columns.len(),
            target.display()
        );
        if let Err(e) = std::fs::remove_file(sidecar) {
            // The parquet file is complete; the next run removes the leftover.
            tracing::warn!("cannot remove {}: {e}", sidecar.display());
        }
        Ok(())
    }
}

/// Step 3 of the module doc: a finished parquet target must hold every sample wanted.
fn check_finished(target: &Path, sidecar: &Path, wanted: &[SampleKey]) -> Result<()> {
    let have = parquet_rows::read_keys(target)?;
    let present = wanted.iter().filter(|k| have.contains(k)).count();
    if present < wanted.len() {
        bail!(
            "{}: this finished file holds {present} of the {} samples this command asks for \
             (another --data or --n than the run that wrote it?), and a finished parquet file \
             is never appended to: move it away or choose another --out to sample the rest",
            target.display(),
            wanted.len()
        );
    }
    if sidecar.exists() {
        match SamplesFile::read(sidecar) {
            Ok(left) if left.done.iter().all(|k| have.contains(k)) => {
                std::fs::remove_file(sidecar).map_err(|e| {
                    anyhow::anyhow!("removing the leftover {}: {e}", sidecar.display())
                })?;
                eprintln!(
                    "removed {}: left over from the run that wrote {} (its rows are all there)",
                    sidecar.display(),
                    target.display()
                );
            }
            Ok(_) => tracing::warn!(
                "{} holds samples that {} lacks; it is left as it is",
                sidecar.display(),
                target.display()
            ),
            Err(e) => tracing::warn!("{e}; it is left as it is"),
        }
    }
    eprintln!("nothing to do: every sample is in {}", target.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_picks_the_output() {
        let Output::Parquet { target, sidecar } =
            Output::from_arg(Path::new("d/x.Parquet")).unwrap()
        else {
            panic!("not parquet")
        };
        assert_eq!(target, Path::new("d/x.Parquet"));
        assert_eq!(sidecar, Path::new("d/x.Parquet.partial.jsonl"));
        assert!(matches!(
            Output::from_arg(Path::new("x.jsonl")).unwrap(),
            Output::Jsonl(_)
        ));
        for bad in ["x.json", "x.csv", "x", "x.parquet.tmp"] {
            let e = Output::from_arg(Path::new(bad)).err().unwrap().to_string();
            assert!(
                e.starts_with(&format!("--out {bad}: expected a .jsonl file")),
                "{e}"
            );
        }
    }
}
