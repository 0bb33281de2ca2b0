//! # testkit — what the workspace's test suites share
//!
//! A dev-dependency only: nothing here ships in `prefer`. What several test files used to
//! write for themselves:
//!
//! - [`fixtures_dir`] / [`fixture`]: the repository's `fixtures/` folder, found **at run
//!   time** — `$PREFER_FIXTURES`, else the first `fixtures/` (the one holding its contract,
//!   `README.md`) above the current directory or the test executable. `CARGO_MANIFEST_DIR`
//!   is baked in at build time and wrong where a test binary runs elsewhere (the GPU machine).
//! - [`TempDir`]: a fresh scratch folder, removed when dropped; [`dir_entries`] and
//!   [`read_json`] for what a command wrote.
//! - [`run`] and the [`prefer!`] macro: run the built `prefer` binary, capture what it
//!   printed, and assert the exit status with both streams in the message ([`Ran`]).
//! - [`u64s`], [`u32s`], [`f64s`]: the numbers of a JSON array (fixture references and
//!   output rows hold token ids and log-probs that way).
//! - [`read_safetensors_f32`] (and [`read_folder_safetensors_f32`] for a model folder) and
//!   [`peft_lora_key`]: PEFT adapters (and gradients) as named f32 tensors, and PEFT's key
//!   of each LoRA tensor.
//! - [`packed_rows`] and [`max_abs_diff`]: a fixture's sequences packed into one batch with
//!   its scored rows, and the distance of log-probs from the fixture's.
//! - [`python_with_datasets`] and [`run_python`]: check outputs with 🤗 `datasets` itself,
//!   offline, in a scratch cache.
//!
//! Helpers panic on failure: they are for tests, where a panic is the report.
//!
//! ## Example
//! ```
//! let dir = testkit::TempDir::new("doc");
//! std::fs::write(dir.join("a.txt"), "x").unwrap();
//! assert_eq!(dir.entries(), vec!["a.txt"]);
//! let echo = testkit::run(std::process::Command::new("echo").arg("hi")).ok();
//! assert_eq!(echo.stdout, "hi\n");
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// The repository's `fixtures/` folder: `$PREFER_FIXTURES`, else the first `fixtures/`
/// holding a `README.md` above the current directory (cargo runs tests in the crate folder)
/// or above the test executable (`target/<profile>/deps/`, for a binary run from elsewhere).
pub fn fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PREFER_FIXTURES") {
        return PathBuf::from(p);
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    starts
        .iter()
        .flatten()
        .flat_map(|s| s.ancestors())
        .map(|a| a.join("fixtures"))
        .find(|p| p.join("README.md").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no fixtures/ folder (with its README.md) above {:?}; set PREFER_FIXTURES",
                starts
            )
        })
}

/// `fixtures/<rel>`: e.g. `fixture("models/llama-tiny")`. Whether it exists is the
/// caller's business (reading it names the path when it does not).
pub fn fixture(rel: impl AsRef<Path>) -> PathBuf {
    fixtures_dir().join(rel)
}

/// A fresh, empty folder under the system temp dir, removed (with everything in it) when
/// dropped. Derefs to its [`Path`], so `dir.join("x")` names a file in it.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMP/prefer-test-<pid>-<tag>-<n>`: the pid and a per-process counter keep parallel
    /// tests and concurrent test binaries apart; the tag tells a person which test it was.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("prefer-test-{}-{tag}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Names of the folder's entries, sorted (to prove no temp output was left behind).
    pub fn entries(&self) -> Vec<String> {
        dir_entries(&self.0)
    }
}

/// Names of a folder's entries, sorted.
#[track_caller]
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let read = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    let mut names: Vec<String> = read
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
            e.file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A JSON file, parsed.
#[track_caller]
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A [`Command`] for the workspace's `prefer` binary. A macro because Cargo tells only the
/// integration test being compiled where that binary is (`CARGO_BIN_EXE_prefer`, read here
/// in the caller's crate).
#[macro_export]
macro_rules! prefer {
    () => {
        ::std::process::Command::new(env!("CARGO_BIN_EXE_prefer"))
    };
}

/// A finished process: its exit status and what it printed (lossy UTF-8).
#[derive(Debug)]
pub struct Ran {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with stdout and stderr captured.
pub fn run(cmd: &mut Command) -> Ran {
    let command = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    Ran::from_output(command, out)
}

impl Ran {
    /// For a process started another way (spawned, then waited on).
    pub fn from_output(command: String, out: Output) -> Ran {
        Ran {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Asserts the process succeeded (the message shows both streams); returns it.
    #[track_caller]
    pub fn ok(self) -> Ran {
        assert!(
            self.success(),
            "{} failed ({}):\n{}",
            self.command,
            self.status,
            self.all()
        );
        self
    }

    /// Asserts the process failed (the message shows both streams); returns it.
    #[track_caller]
    pub fn failed(self) -> Ran {
        assert!(
            !self.success(),
            "{} succeeded, a failure was expected:\n{}",
            self.command,
            self.all()
        );
        self
    }

    /// stdout, then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// The elements of a JSON array of non-negative integers (token ids).
#[track_caller]
pub fn u64s(v: &Value) -> Vec<u64> {
    numbers(v, Value::as_u64, "a non-negative integer")
}

/// [`u64s`], each checked to fit a `u32` (token ids as the model takes them).
#[track_caller]
pub fn u32s(v: &Value) -> Vec<u32> {
    numbers(
        v,
        |x| x.as_u64().and_then(|n| u32::try_from(n).ok()),
        "an integer in u32's range",
    )
}

/// The elements of a JSON array of numbers (log-probs).
#[track_caller]
pub fn f64s(v: &Value) -> Vec<f64> {
    numbers(v, Value::as_f64, "a number")
}

#[track_caller]
fn numbers<T>(v: &Value, get: impl Fn(&Value) -> Option<T>, what: &str) -> Vec<T> {
    let Some(items) = v.as_array() else {
        panic!("expected a JSON array, found {v}");
    };
    items
        .iter()
        .map(|x| get(x).unwrap_or_else(|| panic!("expected {what}, found {x} in {v}")))
        .collect()
}

/// A safetensors file's tensors by name: (shape, values as f32). F32, BF16 and F16 are read
/// (exactly); any other dtype panics. For adapters and gradients PEFT wrote.
#[track_caller]
pub fn read_safetensors_f32(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                // bf16 is the top half of an f32.
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                other => panic!("{}: tensor {name} is {other:?}", path.display()),
            };
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Every tensor of a model folder's `*.safetensors` files (one file or the shards), by name,
/// as [`read_safetensors_f32`] reads them.
#[track_caller]
pub fn read_folder_safetensors_f32(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut all = BTreeMap::new();
    for name in dir_entries(dir) {
        if name.ends_with(".safetensors") {
            all.extend(read_safetensors_f32(&dir.join(name)));
        }
    }
    all
}

/// IEEE half → f32, exact (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// PEFT's key (adapter name stripped, as `save_pretrained` writes it) of a LoRA tensor:
/// `module` is the HF module name (`q_proj`, `embed_tokens`, `lm_head`, ...), `layer` its
/// decoder layer (None for embed_tokens and lm_head), `a` the A matrix (else B).
pub fn peft_lora_key(layer: Option<usize>, module: &str, a: bool) -> String {
    let ab = if a { "A" } else { "B" };
    match (layer, module) {
        (None, "embed_tokens") => {
            format!("base_model.model.model.embed_tokens.lora_embedding_{ab}")
        }
        (None, "lm_head") => format!("base_model.model.lm_head.lora_{ab}.weight"),
        (Some(i), m) => {
            let block = match m {
                "gate_proj" | "up_proj" | "down_proj" => "mlp",
                _ => "self_attn",
            };
            format!("base_model.model.model.layers.{i}.{block}.{m}.lora_{ab}.weight")
        }
        (None, m) => panic!("{m} needs a layer"),
    }
}

/// The largest |a[i] − b[i]| of two slices of one length (log-probs against a reference).
#[track_caller]
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// A fixture's token sequences packed end to end, with its scored rows: what a model's
/// training batch takes (`model::TrainBatch` has these four fields).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedRows {
    /// Every sequence's ids, one after another.
    pub ids: Vec<u32>,
    /// Each sequence's length.
    pub lens: Vec<usize>,
    /// For each scored row, its position in `ids`.
    pub rows: Vec<usize>,
    /// The token scored at each row.
    pub targets: Vec<u32>,
}

/// Packs a fixture's `sequences` (arrays of token ids) end to end, with a scored row for
/// each target of each `rows` entry `{"seq", "pos", "targets": [...]}`, in order (an entry
/// may hold one `"target"` instead, as the lora_grads cases do).
#[track_caller]
pub fn packed_rows(fixture: &Value) -> PackedRows {
    let seqs: Vec<Vec<u32>> = fixture["sequences"]
        .as_array()
        .unwrap_or_else(|| panic!("no sequences array in the fixture"))
        .iter()
        .map(u32s)
        .collect();
    let mut starts = vec![0];
    for s in &seqs {
        starts.push(starts.last().unwrap() + s.len());
    }
    let index = |r: &Value, key: &str| -> usize {
        r[key]
            .as_u64()
            .unwrap_or_else(|| panic!("row {r}: {key} is not an index")) as usize
    };
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in fixture["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows array in the fixture"))
    {
        let row = starts[index(r, "seq")] + index(r, "pos");
        let row_targets = match r.get("targets") {
            Some(t) => u32s(t),
            None => vec![index(r, "target") as u32],
        };
        for t in row_targets {
            rows.push(row);
            targets.push(t);
        }
    }
    PackedRows {
        ids: seqs.concat(),
        lens: seqs.iter().map(Vec::len).collect(),
        rows,
        targets,
    }
}

/// The Python that has `datasets` and `pyarrow`: `$PREFER_PYTHON`, else `python3`. `None`
/// (the caller skips `what`, saying so) when it has not, except under CI (`$CI` set), where a
/// missing `datasets` fails the test.
pub fn python_with_datasets(what: &str) -> Option<String> {
    let python = std::env::var("PREFER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let ok = Command::new(&python)
        .args(["-c", "import datasets, pyarrow"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(python);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but `{python} -c 'import datasets'` fails: install datasets (pip install datasets pyarrow)"
        );
    }
    eprintln!(
        "NOTICE: skipping {what}: `{python}` has no `datasets` (set PREFER_PYTHON or pip install datasets)"
    );
    None
}

/// Runs `python -c script args…` offline (`HF_HUB_OFFLINE=1`) with its own scratch HF cache,
/// asserts success and returns its stdout.
#[track_caller]
pub fn run_python(python: &str, script: &str, args: &[&str]) -> String {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let cache = std::env::temp_dir().join(format!("prefer-hf-cache-{}-{n}", std::process::id()));
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_CACHE", &cache)
        .env("HF_HOME", &cache)
        .output()
        .expect("run python");
    let _ = std::fs::remove_dir_all(&cache);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_fresh_distinct_and_removed_on_drop() {
        let a = TempDir::new("t");
        let b = TempDir::new("t");
        assert_ne!(a.path(), b.path());
        std::fs::write(a.join("f"), "x").unwrap();
        std::fs::create_dir(a.join("d")).unwrap();
        assert_eq!(a.entries(), vec!["d", "f"]);
        assert!(b.entries().is_empty());
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn fixture_rows_are_packed_in_order() {
        let v: Value = serde_json::from_str(
            r#"{"sequences": [[5, 6, 7], [8, 9]],
                "rows": [{"seq": 1, "pos": 0, "targets": [9, 3]}, {"seq": 0, "pos": 2, "target": 4}]}"#,
        )
        .unwrap();
        let p = packed_rows(&v);
        assert_eq!(p.ids, vec![5, 6, 7, 8, 9]);
        assert_eq!(p.lens, vec![3, 2]);
        assert_eq!(p.rows, vec![3, 3, 2]);
        assert_eq!(p.targets, vec![9, 3, 4]);
        assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, -4.0]), 2.0);
    }

    #[test]
    fn fixtures_are_found_above_the_crate() {
        // cargo runs this in crates/testkit; the repository's fixtures/ is two levels up.
        let dir = fixtures_dir();
        assert!(dir.join("README.md").is_file(), "{}", dir.display());
        assert_eq!(fixture("tokenizer"), dir.join("tokenizer"));
    }

    #[test]
    fn json_numbers_are_read_and_checked() {
        let v: Value = serde_json::from_str("[0, 7, 4294967296]").unwrap();
        assert_eq!(u64s(&v), vec![0, 7, 1 << 32]);
        assert_eq!(f64s(&v), vec![0.0, 7.0, 4294967296.0]);
        assert!(
            std::panic::catch_unwind(|| u32s(&v)).is_err(),
            "2^32 is no u32"
        );
        let v: Value = serde_json::from_str("[-0.5, 1e-3]").unwrap();
        assert_eq!(f64s(&v), vec![-0.5, 0.001]);
        assert!(std::panic::catch_unwind(|| u64s(&v)).is_err());
        assert!(std::panic::catch_unwind(|| f64s(&Value::Null)).is_err());
    }

    #[test]
    fn safetensors_are_read_as_f32_and_peft_keys_spelled() {
        let dir = TempDir::new("st");
        // A file by hand: F32 [2], BF16 [1], F16 [3] (1.0, 2^-24 subnormal, -inf).
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]},"c":{"dtype":"F16","shape":[3],"data_offsets":[10,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        for x in [1.5f32, -2.0] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.extend_from_slice(&0x3fc0u16.to_le_bytes()); // bf16 1.5
        for h in [0x3c00u16, 0x0001, 0xfc00] {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        std::fs::write(dir.join("t.safetensors"), bytes).unwrap();
        let t = read_safetensors_f32(&dir.join("t.safetensors"));
        assert_eq!(t["a"], (vec![2], vec![1.5, -2.0]));
        assert_eq!(t["b"], (vec![1], vec![1.5]));
        assert_eq!(
            t["c"],
            (vec![3], vec![1.0, 2f32.powi(-24), f32::NEG_INFINITY])
        );

        assert_eq!(
            peft_lora_key(Some(3), "up_proj", false),
            "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
        );
        assert_eq!(
            peft_lora_key(Some(0), "q_proj", true),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_lora_key(None, "embed_tokens", true),
            "base_model.model.model.embed_tokens.lora_embedding_A"
        );
        assert_eq!(
            peft_lora_key(None, "lm_head", false),
            "base_model.model.lm_head.lora_B.weight"
        );
    }

    #[test]
    fn run_captures_both_streams_and_checks_the_status() {
        let ran = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
        assert_eq!(
            (ran.stdout.as_str(), ran.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert_eq!(ran.status.code(), Some(3));
        assert_eq!(ran.all(), "out\nerr\n");
        let ran = ran.failed();
        assert!(ran.command.contains("exit 3"), "{}", ran.command);
        let caught = std::panic::catch_unwind(|| {
            run(Command::new("sh").args(["-c", "echo oops >&2; exit 1"])).ok()
        });
        let msg = caught.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("failed") && msg.contains("oops"), "{msg}");
    }
}
