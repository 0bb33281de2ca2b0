//! safetensors files of f32 tensors, for adapters and optimizer state: written whole to a
//! temporary file beside the target, synced, then renamed into place (a crash leaves the old
//! file or none, never half of a new one); read with errors that name the file and tensor.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::error::{Result, TrainError};

/// One tensor to write: its name, shape and row-major values.
pub(crate) struct F32Tensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl View for &F32Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // safetensors is little-endian whatever the host.
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes `tensors` (each shape must hold exactly its values) and `metadata` to `path`.
pub(crate) fn write_f32(
    path: &Path,
    tensors: &[F32Tensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    for t in tensors {
        let want: usize = t.shape.iter().product();
        if want != t.data.len() {
            return Err(TrainError::Format {
                path: path.to_path_buf(),
                where_: format!("tensor {}", t.name),
                msg: format!(
                    "shape {:?} holds {want} values, the buffer has {} (a bug in the caller)",
                    t.shape,
                    t.data.len()
                ),
            });
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|t| (&t.name, t)), Some(metadata))
        .map_err(|e| TrainError::Format {
            path: path.to_path_buf(),
            where_: "safetensors".into(),
            msg: e.to_string(),
        })?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a unique temporary file beside `path`, syncs it, and renames it to
/// `path`. The temporary file is removed on failure.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::io(path, e));
    }
    Ok(())
}

/// `.<name>.<pid>.<nanos>.tmp` in `path`'s folder: unique per process and moment, hidden,
/// and on the same file system as `path` (so the rename is atomic).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()))
}

/// A safetensors file read into memory.
pub(crate) struct TensorFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let file = TensorFile {
            path: path.to_path_buf(),
            bytes,
        };
        file.tensors()?; // validate the header once, here
        Ok(file)
    }

    /// The parsed file (header checked by [`TensorFile::read`]).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| self.error("safetensors header", e))
    }

    /// The header's `__metadata__` (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| self.error("safetensors header", e))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Tensor `name` as f32 values and its shape; F32, BF16 and F16 are accepted (PEFT
    /// writes F32 LoRA weights by default, BF16/F16 with `autocast_adapter_dtype=False`).
    pub fn f32_tensor(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let st = self.tensors()?;
        let view = match st.tensor(name) {
            Ok(view) => view,
            Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
            Err(e) => return Err(self.error(&format!("tensor {name}"), e)),
        };
        let values = self.to_f32(name, &view)?;
        Ok(Some((view.shape().to_vec(), values)))
    }

    fn to_f32(&self, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(TrainError::Format {
                    path: self.path.clone(),
                    where_: format!("tensor {name}"),
                    msg: format!("dtype {other:?}; expected F32, BF16 or F16"),
                });
            }
        };
        Ok(values)
    }

    fn error(&self, where_: &str, e: impl std::fmt::Display) -> TrainError {
        TrainError::Format {
            path: self.path.clone(),
            where_: where_.to_string(),
            msg: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "prefer-train-tensor-file-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn f32_tensors_round_trip_with_metadata_and_leave_no_temp_file() {
        let dir = scratch("roundtrip");
        let path = dir.join("t.safetensors");
        let a = [1.0f32, -2.5, 3.25, f32::MIN_POSITIVE, -0.0, 7.0];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let tensors = [F32Tensor {
            name: "a.weight".into(),
            shape: vec![2, 3],
            data: &a,
        }];
        write_f32(&path, &tensors, meta.clone()).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["t.safetensors"]);
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.metadata().unwrap(), meta);
        let (shape, values) = file.f32_tensor("a.weight").unwrap().unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(file.f32_tensor("missing").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bf16_and_f16_tensors_read_as_f32_and_other_dtypes_are_named() {
        let dir = scratch("dtypes");
        let path = dir.join("t.safetensors");
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let hf: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let ints = [1u8, 0, 0, 0];
        let views = [
            ("b", TensorView::new(Dtype::BF16, vec![2], &bf).unwrap()),
            ("h", TensorView::new(Dtype::F16, vec![2], &hf).unwrap()),
            ("i", TensorView::new(Dtype::I32, vec![1], &ints).unwrap()),
        ];
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.f32_tensor("b").unwrap().unwrap().1, [1.5, -2.0]);
        assert_eq!(file.f32_tensor("h").unwrap().unwrap().1, [0.25, 3.0]);
        let err = file.f32_tensor("i").unwrap_err().to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("tensor i") && err.contains("I32"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let dir = scratch("truncated");
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, [8u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        let err = TensorFile::read(&path).err().unwrap().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("header"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
