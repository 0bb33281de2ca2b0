//! What is on disk of a stage's output: whether it is there, how new it is (the newest file
//! in it, make's notion of a target's time), and removing an old one before a rerun.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

/// The time an output was last written, for make's rule: an output older than one of its
/// inputs is rebuilt.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Stamp {
    /// Nothing there.
    Absent,
    /// Its newest file's modification time.
    At(SystemTime),
    /// A dry run's stand-in for an output the run would write now: newer than anything.
    Rewritten,
}

impl Stamp {
    /// Whether an output with this stamp is older than an input with `input`'s (equal times,
    /// as on a coarse file system, count as up to date).
    pub(super) fn older_than(&self, input: &Stamp) -> bool {
        match (self, input) {
            (Stamp::Absent, _) | (_, Stamp::Absent) => false,
            (Stamp::Rewritten, _) => false,
            (_, Stamp::Rewritten) => true,
            (Stamp::At(out), Stamp::At(inp)) => out < inp,
        }
    }
}

/// `path`'s stamp: a file's modification time, or the newest of a folder's files (found
/// recursively); an empty folder has none.
pub(super) fn stamp(path: &Path) -> Result<Stamp> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stamp::Absent),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !meta.is_dir() {
        let time = meta
            .modified()
            .with_context(|| format!("reading the time of {}", path.display()))?;
        return Ok(Stamp::At(time));
    }
    let mut newest = Stamp::Absent;
    for entry in read_dir(path)? {
        let inner = stamp(&entry)?;
        if newest == Stamp::Absent || newest.older_than(&inner) {
            newest = inner;
        }
    }
    Ok(newest)
}

/// The entries of folder `dir`, sorted.
pub(super) fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// Whether `path` is there and, for a folder, holds something.
pub(super) fn present(path: &Path) -> Result<bool> {
    if path.is_dir() {
        Ok(!read_dir(path)?.is_empty())
    } else {
        Ok(path.exists())
    }
}

/// Removes a stage's old output (a file or a folder) before the stage runs again.
pub(super) fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the old output {}", path.display())),
    }
}

/// What `prefer train` keeps in its output folder: the final adapter, `checkpoint-N`
/// folders, and hidden temporaries (`.checkpoint-N.partial`, `.NAME.PID.TIME.tmp`).
fn written_by_train(name: &str) -> bool {
    name == train::peft::CONFIG_FILE
        || name == train::peft::WEIGHTS_FILE
        || name.starts_with("checkpoint-")
        || name.starts_with('.')
}

/// Whether train's output folder `dir` holds a finished adapter (its config is written
/// last), checkpoints of an unfinished run, or nothing of train's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum TrainState {
    Finished,
    Checkpoints,
    Empty,
}

pub(super) fn train_state(dir: &Path) -> Result<TrainState> {
    if !dir.is_dir() {
        return Ok(TrainState::Empty);
    }
    if dir.join(train::peft::CONFIG_FILE).is_file() {
        return Ok(TrainState::Finished);
    }
    Ok(if train::trainer::latest_checkpoint(dir)?.is_some() {
        TrainState::Checkpoints
    } else {
        TrainState::Empty
    })
}

/// Checks that train's output folder `dir` holds only what train writes, so removing it
/// before a retrain removes nothing else. `place` names the table in the error.
pub(super) fn check_train_dir_removable(dir: &Path, place: &str) -> Result<()> {
    for entry in read_dir(dir)? {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !written_by_train(&name) {
            bail!(
                "{place}: retraining removes the old adapter and checkpoints in {}, but it also \
                 holds {name}, which prefer train does not write: move that away, or set \
                 another output_dir",
                dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use testkit::TempDir;

    use super::*;

    #[test]
    fn an_output_is_stale_only_when_an_input_is_newer() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(1);
        assert!(Stamp::At(t0).older_than(&Stamp::At(t1)));
        assert!(!Stamp::At(t1).older_than(&Stamp::At(t0)));
        assert!(!Stamp::At(t0).older_than(&Stamp::At(t0)));
        assert!(Stamp::At(t1).older_than(&Stamp::Rewritten));
        assert!(!Stamp::Rewritten.older_than(&Stamp::At(t1)));
        assert!(!Stamp::At(t1).older_than(&Stamp::Absent));
        assert!(!Stamp::Absent.older_than(&Stamp::At(t1)));
    }

    /// Sets `path`'s modification time to `secs` after the epoch.
    fn touch(path: &Path, secs: u64) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn a_folders_stamp_is_its_newest_file_at_any_depth() {
        let dir = TempDir::new("run-stamp");
        assert_eq!(stamp(&dir.join("none")).unwrap(), Stamp::Absent);
        assert_eq!(stamp(&dir).unwrap(), Stamp::Absent, "an empty folder");
        std::fs::create_dir_all(dir.join("data/deep")).unwrap();
        std::fs::write(dir.join("a"), "x").unwrap();
        std::fs::write(dir.join("data/deep/b"), "y").unwrap();
        touch(&dir.join("a"), 1_000);
        touch(&dir.join("data/deep/b"), 2_000);
        let at = |secs| Stamp::At(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(stamp(&dir).unwrap(), at(2_000));
        assert_eq!(stamp(&dir.join("a")).unwrap(), at(1_000));
        assert!(present(&dir).unwrap() && !present(&dir.join("none")).unwrap());
    }

    #[test]
    fn a_train_folder_with_foreign_files_is_not_removed() {
        let dir = TempDir::new("run-train-dir");
        std::fs::create_dir_all(dir.join("checkpoint-2")).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        std::fs::write(dir.join(".adapter_model.safetensors.1.2.tmp"), "").unwrap();
        check_train_dir_removable(&dir, "p.toml [train]").unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let err = check_train_dir_removable(&dir, "p.toml [train]")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("p.toml [train]: ") && err.contains("notes.txt"),
            "{err}"
        );
        assert_eq!(train_state(&dir).unwrap(), TrainState::Finished);
        remove(&dir).unwrap();
        assert_eq!(train_state(&dir).unwrap(), TrainState::Empty);
        remove(&dir).unwrap();
    }
}
