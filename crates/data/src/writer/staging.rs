//! Write-then-rename for outputs.
//!
//! Folders: [`Staged::new`] refuses an existing output unless overwriting, and creates a
//! hidden sibling `.NAME.tmp-PID`; [`Staged::commit`] renames it into place (moving an old
//! output aside first and deleting it after). Dropping an uncommitted `Staged` removes the
//! temporary folder, so errors leave nothing behind.
//!
//! Single files: [`StagedFile`] names a hidden sibling `.NAME.tmp-PID` to write to;
//! [`StagedFile::commit`] renames it over the target in one step, so the target is either
//! absent (or the old file) or complete, never half-written. Dropped uncommitted, it removes
//! the temporary file.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    committed: bool,
}

/// Fails when `target` exists and `overwrite` is off (call early to fail before work).
pub fn check_target(target: &Path, overwrite: bool) -> Result<()> {
    if target.exists() && !overwrite {
        return Err(DataError::OutputExists {
            path: target.to_path_buf(),
        });
    }
    Ok(())
}

fn sibling(target: &Path, tag: &str) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| DataError::Write {
        path: target.to_path_buf(),
        message: "the output needs a folder name".into(),
    })?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

impl Staged {
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        check_target(target, overwrite)?;
        let tmp = sibling(target, "tmp")?;
        if let Some(parent) = tmp.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(Staged {
            tmp,
            target: target.to_path_buf(),
            overwrite,
            committed: false,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished folder into place.
    pub fn commit(mut self) -> Result<()> {
        check_target(&self.target, self.overwrite)?;
        let old = if self.target.exists() {
            let old = sibling(&self.target, "old")?;
            std::fs::rename(&self.target, &old).map_err(|e| DataError::io(&self.target, e))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.tmp, &self.target).map_err(|e| DataError::io(&self.target, e))?;
        self.committed = true;
        if let Some(old) = old {
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|e| DataError::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A file written under a temporary name and renamed into place when complete.
pub struct StagedFile {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Names the temporary sibling of `target` (removing a leftover of the same name, which
    /// only an earlier process with this pid can have left). The caller creates and writes it.
    pub fn new(target: &Path) -> Result<Self> {
        let tmp = sibling(target, "tmp")?;
        if tmp.exists() {
            std::fs::remove_file(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        }
        Ok(StagedFile {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the written file over the target. The caller has flushed and synced it; the
    /// folder is synced after the rename (where the platform allows) so that the new name is
    /// durable before anything that depends on it (a sidecar's removal) happens.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.target).map_err(|e| DataError::io(&self.target, e))?;
        self.committed = true;
        #[cfg(unix)]
        if let Some(parent) = self.target.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| DataError::io(parent, e))?;
        }
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.parquet");
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let staged = StagedFile::new(&target).unwrap();
        assert_eq!(
            staged.path().file_name().unwrap().to_string_lossy(),
            format!(".x.parquet.tmp-{}", std::process::id())
        );
        std::fs::write(staged.path(), "half").unwrap();
        drop(staged);
        assert!(names().is_empty(), "an uncommitted file is removed");

        let staged = StagedFile::new(&target).unwrap();
        std::fs::write(staged.path(), "one").unwrap();
        assert!(!target.exists(), "nothing at the target before the commit");
        staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "one");
        let staged = StagedFile::new(&target).unwrap();
        std::fs::write(staged.path(), "two").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "two");
        assert_eq!(names(), vec!["x.parquet"]);
    }

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let s = Staged::new(&target, false).unwrap();
        std::fs::write(s.path().join("f"), "1").unwrap();
        assert!(!target.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "1");

        assert!(matches!(
            Staged::new(&target, false),
            Err(DataError::OutputExists { .. })
        ));
        let s = Staged::new(&target, true).unwrap();
        let tmp = s.path().to_path_buf();
        std::fs::write(s.path().join("g"), "2").unwrap();
        drop(s);
        assert!(!tmp.exists(), "an uncommitted stage is removed");
        assert!(target.join("f").exists(), "the old output is untouched");

        let s = Staged::new(&target, true).unwrap();
        std::fs::write(s.path().join("g"), "2").unwrap();
        s.commit().unwrap();
        assert!(target.join("g").exists() && !target.join("f").exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no tmp or old folders left");
    }
}
