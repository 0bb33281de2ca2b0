//! Checkpoint tensors: `model.safetensors`, or the shards `model.safetensors.index.json`
//! lists, memory-mapped and converted tensor by tensor to f32 engine tensors.
//!
//! Every header is validated when the file is opened (safetensors checks that the offsets are
//! contiguous and that the data fills the file exactly, which catches truncated files), so a
//! bad file fails before any tensor is read. A tensor is then read with the shape the config
//! implies; the wrong shape, a non-float dtype or a missing tensor is an error naming it.
//! Tensors nobody asked for are reported by [`Checkpoint::warn_unused`].
//!
//! As transformers does, `model.safetensors` is used when present, the index otherwise.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use engine::Tensor;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata, SafeTensorError};
use serde_json::Value;

use crate::error::{ModelError, Result};

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length + header).
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a model directory, read on demand.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    location: HashMap<String, usize>,
    used: BTreeSet<String>,
}

impl Checkpoint {
    /// Opens the checkpoint of `dir` and validates every header.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            location: HashMap::new(),
            used: BTreeSet::new(),
        };
        if single.is_file() {
            let shard = Shard::open(&single)?;
            for name in shard.metadata.tensors().keys() {
                checkpoint.location.insert(name.clone(), 0);
            }
            checkpoint.shards.push(shard);
        } else if index.is_file() {
            checkpoint.open_sharded(&index)?;
        } else {
            return Err(ModelError::Io {
                path: single,
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} and no {INDEX_FILE} in this model directory"),
                ),
            });
        }
        Ok(checkpoint)
    }

    fn open_sharded(&mut self, index: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|error| ModelError::Json {
            path: index.to_path_buf(),
            error,
        })?;
        let bad = |msg: String| ModelError::Safetensors {
            path: index.to_path_buf(),
            msg,
        };
        let Some(Value::Object(weight_map)) = json.get("weight_map") else {
            return Err(bad("missing the `weight_map` object".to_string()));
        };
        let mut shard_of_file: HashMap<String, usize> = HashMap::new();
        for (name, file) in weight_map {
            let Some(file) = file.as_str() else {
                return Err(bad(format!("weight_map[{name:?}] is not a file name")));
            };
            // Shards live beside the index; refuse paths that would leave the directory.
            let plain = Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(bad(format!(
                    "weight_map[{name:?}] = {file:?} is not a plain file name"
                )));
            }
            let shard = match shard_of_file.get(file) {
                Some(&i) => i,
                None => {
                    let shard = Shard::open(&self.dir.join(file))?;
                    self.shards.push(shard);
                    shard_of_file.insert(file.to_string(), self.shards.len() - 1);
                    self.shards.len() - 1
                }
            };
            if self.shards[shard].metadata.info(name).is_none() {
                return Err(bad(format!(
                    "lists tensor `{name}` in {file}, which does not contain it"
                )));
            }
            self.location.insert(name.clone(), shard);
        }
        Ok(())
    }

    /// Reads tensor `name` as f32 and checks it has `shape`; marks it used.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(&shard_index) = self.location.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        };
        let shard = &self.shards[shard_index];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        if info.shape != shape {
            return Err(ModelError::TensorShape {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let data = to_f32(bytes, info.dtype).ok_or_else(|| ModelError::TensorDtype {
            path: shard.path.clone(),
            name: name.to_string(),
            got: format!("{:?}", info.dtype),
        })?;
        self.used.insert(name.to_string());
        Ok(Tensor::from_vec(data, shape)?)
    }

    /// Names of tensors in the checkpoint that no [`Checkpoint::tensor`] call read.
    pub fn unused(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .location
            .keys()
            .filter(|n| !self.used.contains(*n))
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// Logs the unused tensors as one warning (a tied checkpoint's `lm_head.weight`, rotary
    /// caches of old exports, or a sign that the config does not match the weights).
    pub fn warn_unused(&self) {
        let unused = self.unused();
        if !unused.is_empty() {
            tracing::warn!(
                "{}: {} checkpoint tensor(s) not used by the model: {}",
                self.dir.display(),
                unused.len(),
                unused.join(", ")
            );
        }
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint changed by another process while we
        // read it is outside what we can defend against (as for every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: describe(&e, mmap.len()),
            })?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

/// A readable sentence for a safetensors parse failure.
fn describe(err: &SafeTensorError, file_len: usize) -> String {
    match err {
        SafeTensorError::HeaderTooSmall => {
            format!("not a safetensors file: {file_len} bytes, too short for a header")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!(
                "truncated or corrupt: the header length runs past the end of the {file_len}-byte file"
            )
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "truncated or corrupt: the header's tensor offsets do not match the file size \
             ({file_len} bytes)"
        ),
        SafeTensorError::HeaderTooLarge => "corrupt: the header length is implausibly large".into(),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("corrupt safetensors header: {err}")
        }
        other => format!("corrupt safetensors file: {other}"),
    }
}

/// Little-endian BF16/F16/F32 bytes → f32, in parallel chunks. `None` for other dtypes.
fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    const CHUNK: usize = 1 << 16;
    let width = match dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        _ => return None,
    };
    let mut out = vec![0f32; bytes.len() / width];
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| match dtype {
            Dtype::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    // bf16 is the top half of an f32.
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                }
            }
            _ => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
        });
    Some(out)
}

/// Writing safetensors files by hand, for tests here and in the rest of the crate.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    /// One tensor to write: name, dtype string ("F32", "BF16", "F16", "I64"...), shape, bytes.
    pub struct RawTensor {
        pub name: String,
        pub dtype: &'static str,
        pub shape: Vec<usize>,
        pub bytes: Vec<u8>,
    }

    impl RawTensor {
        pub fn f32(name: &str, shape: &[usize], data: &[f32]) -> RawTensor {
            RawTensor {
                name: name.to_string(),
                dtype: "F32",
                shape: shape.to_vec(),
                bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        }
        pub fn bf16(name: &str, shape: &[usize], data: &[f32]) -> RawTensor {
            RawTensor {
                name: name.to_string(),
                dtype: "BF16",
                shape: shape.to_vec(),
                bytes: data
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            }
        }
        pub fn f16(name: &str, shape: &[usize], data: &[f32]) -> RawTensor {
            RawTensor {
                name: name.to_string(),
                dtype: "F16",
                shape: shape.to_vec(),
                bytes: data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            }
        }
    }

    /// The bytes of a safetensors file holding `tensors` in order.
    pub fn safetensors_bytes(tensors: &[RawTensor]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for t in tensors {
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "data_offsets": [offset, offset + t.bytes.len()],
                }),
            );
            offset += t.bytes.len();
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        // Pad the header to 8 bytes with spaces, as the reference writer does.
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        for t in tensors {
            out.extend_from_slice(&t.bytes);
        }
        out
    }

    pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
        std::fs::write(path, safetensors_bytes(tensors)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn temp_dir(tag: &str) -> crate::testutil::TempDir {
        crate::testutil::temp_dir(&format!("weights-{tag}"))
    }

    fn err_text<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_f32_bf16_f16() {
        let dir = temp_dir("dtypes");
        let data = [1.0f32, -2.5, 0.333, 65504.0, 1e-3, -0.0];
        write_safetensors(
            &dir.join(SINGLE_FILE),
            &[
                RawTensor::f32("a", &[2, 3], &data),
                RawTensor::bf16("b", &[6], &data),
                RawTensor::f16("c", &[3, 2], &data),
            ],
        );
        let mut ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.tensor("a", &[2, 3]).unwrap().to_vec().unwrap(), data);
        let b = ck.tensor("b", &[6]).unwrap().to_vec().unwrap();
        let c = ck.tensor("c", &[3, 2]).unwrap().to_vec().unwrap();
        for i in 0..data.len() {
            assert_eq!(b[i], half::bf16::from_f32(data[i]).to_f32());
            assert_eq!(c[i], half::f16::from_f32(data[i]).to_f32());
        }
        assert!(ck.unused().is_empty());
    }

    #[test]
    fn large_tensor_crosses_chunks() {
        let dir = temp_dir("large");
        let data: Vec<f32> = (0..200_003).map(|i| i as f32 * 0.5).collect();
        write_safetensors(
            &dir.join(SINGLE_FILE),
            &[RawTensor::bf16("x", &[data.len()], &data)],
        );
        let mut ck = Checkpoint::open(&dir).unwrap();
        let got = ck.tensor("x", &[data.len()]).unwrap().to_vec().unwrap();
        for (g, d) in got.iter().zip(&data) {
            assert_eq!(*g, half::bf16::from_f32(*d).to_f32());
        }
    }

    #[test]
    fn wrong_shape_names_tensor() {
        let dir = temp_dir("shape");
        write_safetensors(
            &dir.join(SINGLE_FILE),
            &[RawTensor::f32("w", &[2, 2], &[0.0; 4])],
        );
        let mut ck = Checkpoint::open(&dir).unwrap();
        let e = err_text(ck.tensor("w", &[4, 1]));
        assert!(
            e.contains("`w`") && e.contains("[2, 2]") && e.contains("[4, 1]"),
            "{e}"
        );
        assert!(e.contains(SINGLE_FILE), "{e}");
    }

    #[test]
    fn wrong_dtype_names_tensor() {
        let dir = temp_dir("dtype");
        let t = RawTensor {
            name: "ids".into(),
            dtype: "I64",
            shape: vec![2],
            bytes: vec![0; 16],
        };
        write_safetensors(&dir.join(SINGLE_FILE), &[t]);
        let mut ck = Checkpoint::open(&dir).unwrap();
        let e = err_text(ck.tensor("ids", &[2]));
        assert!(
            e.contains("`ids`") && e.contains("I64") && e.contains("BF16"),
            "{e}"
        );
    }

    #[test]
    fn missing_tensor_and_unused() {
        let dir = temp_dir("missing");
        write_safetensors(&dir.join(SINGLE_FILE), &[RawTensor::f32("a", &[1], &[1.0])]);
        let mut ck = Checkpoint::open(&dir).unwrap();
        let e = err_text(ck.tensor("model.norm.weight", &[1]));
        assert!(
            e.contains("model.norm.weight") && e.contains("missing"),
            "{e}"
        );
        assert_eq!(ck.unused(), vec!["a"]);
    }

    #[test]
    fn truncated_file() {
        let dir = temp_dir("truncated");
        let mut bytes = safetensors_bytes(&[RawTensor::f32("a", &[4], &[1.0; 4])]);
        bytes.truncate(bytes.len() - 3);
        std::fs::write(dir.join(SINGLE_FILE), bytes).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains(SINGLE_FILE) && e.contains("truncated"), "{e}");
        // Cut inside the header.
        let bytes = safetensors_bytes(&[RawTensor::f32("a", &[4], &[1.0; 4])]);
        std::fs::write(dir.join(SINGLE_FILE), &bytes[..20]).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(dir.join(SINGLE_FILE), &bytes[..5]).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn corrupt_header() {
        let dir = temp_dir("corrupt");
        let mut bytes = safetensors_bytes(&[RawTensor::f32("a", &[4], &[1.0; 4])]);
        bytes[8] = b'#'; // the header's opening brace
        std::fs::write(dir.join(SINGLE_FILE), &bytes).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("corrupt") && e.contains(SINGLE_FILE), "{e}");
        // A header whose size field claims more than the file holds.
        let mut bytes = safetensors_bytes(&[RawTensor::f32("a", &[4], &[1.0; 4])]);
        bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(dir.join(SINGLE_FILE), &bytes).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("corrupt") || e.contains("truncated"), "{e}");
        // Offsets that do not match the shape.
        let mut t = RawTensor::f32("a", &[4], &[1.0; 4]);
        t.shape = vec![5];
        write_safetensors(&dir.join(SINGLE_FILE), &[t]);
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn no_checkpoint_file() {
        let dir = temp_dir("none");
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains(SINGLE_FILE) && e.contains(INDEX_FILE), "{e}");
    }

    #[test]
    fn sharded_via_index() {
        let dir = temp_dir("sharded");
        write_safetensors(
            &dir.join("model-00001-of-00002.safetensors"),
            &[RawTensor::f32("a", &[2], &[1.0, 2.0])],
        );
        write_safetensors(
            &dir.join("model-00002-of-00002.safetensors"),
            &[RawTensor::bf16("b", &[1], &[3.0])],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 10},
            "weight_map": {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors"}
        });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let mut ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(
            ck.tensor("a", &[2]).unwrap().to_vec().unwrap(),
            vec![1.0, 2.0]
        );
        assert_eq!(ck.tensor("b", &[1]).unwrap().to_vec().unwrap(), vec![3.0]);

        // An index entry its shard does not hold.
        let index = serde_json::json!({"weight_map": {"c": "model-00001-of-00002.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("`c`") && e.contains(INDEX_FILE), "{e}");
        // A shard that does not exist.
        let index = serde_json::json!({"weight_map": {"a": "model-00009.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("model-00009.safetensors"), "{e}");
        // A path escaping the directory.
        let index = serde_json::json!({"weight_map": {"a": "../x.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("plain file name"), "{e}");
        std::fs::write(dir.join(INDEX_FILE), "{\"weight_map\": 3}").unwrap();
        let e = err_text(Checkpoint::open(&dir));
        assert!(e.contains("weight_map"), "{e}");
    }
}
