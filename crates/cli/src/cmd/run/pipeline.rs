//! The pipeline file: top-level `model` and `workdir`, then one table per stage. What the
//! keys of a stage table mean is the stage's command's business (see `argv`); this module
//! only checks the file's shape.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::stages::Stage;

/// A pipeline file, read and shape-checked.
pub(super) struct Pipeline {
    /// The file, as given (messages name it).
    pub(super) path: PathBuf,
    /// The SFT model folder every stage that loads a model uses unless its table says
    /// otherwise.
    pub(super) model: Option<String>,
    /// Where the stages' outputs go by default.
    pub(super) workdir: PathBuf,
    /// The stage tables present, in the job's order.
    pub(super) tables: Vec<(Stage, toml::Table)>,
}

impl Pipeline {
    pub(super) fn read(path: &Path) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the pipeline file {}", path.display()))?;
        Pipeline::parse(&text, path)
    }

    /// Parses `text`; `path` names the file in messages.
    pub(super) fn parse(text: &str, path: &Path) -> Result<Pipeline> {
        let file = path.display();
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{file}: {e}"))?;
        let mut model = None;
        let mut workdir = None;
        let mut tables = Vec::new();
        for (key, value) in doc {
            match (key.as_str(), value) {
                ("model", toml::Value::String(s)) => model = Some(s),
                ("workdir", toml::Value::String(s)) => workdir = Some(PathBuf::from(s)),
                ("model" | "workdir", other) => bail!(
                    "{file}: `{key}` must be a string (a folder path), found {}",
                    other.type_str()
                ),
                (name, toml::Value::Table(table)) => {
                    let Some(stage) = Stage::from_name(name) else {
                        bail!(
                            "{file}: [{name}] is not a stage; the stages are {}",
                            Stage::ORDER.map(Stage::name).join(", ")
                        );
                    };
                    tables.push((stage, table));
                }
                (name, _) => bail!(
                    "{file}: unknown top-level key `{name}`: the top level holds `model` and \
                     `workdir`; a command's options go in its stage's table ([sample], …)"
                ),
            }
        }
        let Some(workdir) = workdir else {
            bail!("{file}: `workdir` is missing: the folder where the stages' outputs go");
        };
        if tables.is_empty() {
            bail!(
                "{file}: no stage tables; add some of {}",
                Stage::ORDER.map(|s| format!("[{}]", s.name())).join(", ")
            );
        }
        tables.sort_by_key(|(stage, _)| *stage);
        Ok(Pipeline {
            path: path.to_path_buf(),
            model,
            workdir,
            tables,
        })
    }

    /// The file's name as messages give it (the path it was given as).
    pub(super) fn file_name(&self) -> String {
        self.path.display().to_string()
    }

    pub(super) fn has(&self, stage: Stage) -> bool {
        self.tables.iter().any(|(s, _)| *s == stage)
    }

    /// `sample, pairs, train`: the stages present.
    pub(super) fn stage_names(&self) -> String {
        self.tables
            .iter()
            .map(|(s, _)| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline> {
        Pipeline::parse(text, Path::new("p.toml"))
    }

    #[test]
    fn stages_come_in_the_jobs_order_whatever_the_files() {
        let p = parse(
            "model = \"m\"\nworkdir = \"w\"\n[train]\nmax_steps = 2\n[sample]\n[pairs]\n[export]\n",
        )
        .unwrap();
        let order: Vec<&str> = p.tables.iter().map(|(s, _)| s.name()).collect();
        assert_eq!(order, ["sample", "pairs", "train", "export"]);
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.workdir, PathBuf::from("w"));
        assert_eq!(p.tables[2].1["max_steps"].as_integer(), Some(2));
    }

    #[test]
    fn shape_errors_name_the_file_and_the_key() {
        let err = |text: &str| parse(text).err().unwrap().to_string();
        assert!(err("workdir = \"w\"\n[sampel]\n").contains("p.toml: [sampel] is not a stage"));
        assert!(err("workdir = \"w\"\nbeta = 0.1\n[train]\n").contains("top-level key `beta`"));
        assert!(err("workdir = 3\n[train]\n").contains("`workdir` must be a string"));
        assert!(err("model = \"m\"\n[train]\n").contains("`workdir` is missing"));
        assert!(err("workdir = \"w\"\n").contains("no stage tables"));
        // TOML syntax errors keep toml's line and column.
        let syntax = err("workdir = \"w\"\n[train]\nbeta = \n");
        assert!(
            syntax.starts_with("p.toml: ") && syntax.contains("line 3"),
            "{syntax}"
        );
    }
}
