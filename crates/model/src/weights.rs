//! Checkpoint tensors: `model.safetensors`, or the shards `model.safetensors.index.json`
//! lists, memory-mapped and converted tensor by tensor to engine tensors: f32 on the CPU,
//! bf16 on a GPU (uploaded straight from the map's bytes, or rounded to nearest-even).
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

use engine::{Device, Tensor};
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

/// One tensor as its file holds it.
pub(crate) struct StoredTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Little-endian elements, C order.
    pub bytes: &'a [u8],
    /// The safetensors file it is in.
    pub path: &'a Path,
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

    /// Reads tensor `name` as f32 on the CPU and checks it has `shape`; marks it used.
    #[cfg(test)]
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensor_on(name, shape, Device::Cpu)
    }

    /// Reads tensor `name`, checking it has `shape`, onto `device`: f32 on the CPU, bf16 on a
    /// GPU (see [`Checkpoint::concat_on`]).
    pub fn tensor_on(&mut self, name: &str, shape: &[usize], device: Device) -> Result<Tensor> {
        self.concat_on(&[(name, shape)], device)
    }

    /// Reads the tensors `parts` (each with the shape given, all with the same trailing
    /// dims) and stacks them along their first dim, onto `device`: [Σ n_i, ...] from
    /// [n_i, ...]. This is how q/k/v and gate/up become one GEMM each.
    ///
    /// On a GPU the elements are bf16: bf16 weights are uploaded bit for bit, f16 and f32
    /// ones rounded to nearest-even on the host first. The host holds one converted copy of
    /// the stacked tensor at a time (2 bytes an element for a GPU), never an f32 copy of the
    /// model.
    pub fn concat_on(&mut self, parts: &[(&str, &[usize])], device: Device) -> Result<Tensor> {
        let Some(&(first, first_shape)) = parts.first() else {
            return Err(ModelError::Input {
                what: "checkpoint",
                msg: "no tensors to stack".into(),
            });
        };
        let rows: usize = parts
            .iter()
            .map(|(_, s)| s.first().copied().unwrap_or(1))
            .sum();
        let mut shape = first_shape.to_vec();
        if let Some(r) = shape.first_mut() {
            *r = rows;
        }
        let len: usize = shape.iter().product();
        let mut data = match device {
            Device::Cpu => HostData::F32(Vec::with_capacity(len)),
            Device::Cuda(_) => HostData::Bf16(Vec::with_capacity(len)),
        };
        for &(name, part_shape) in parts {
            if part_shape.get(1..) != first_shape.get(1..) {
                return Err(ModelError::Input {
                    what: "checkpoint",
                    msg: format!(
                        "cannot stack `{name}` {part_shape:?} under `{first}` {first_shape:?}"
                    ),
                });
            }
            let (bytes, dtype, path) = self.raw(name, part_shape)?;
            let ok = match &mut data {
                HostData::F32(out) => append_f32(out, bytes, dtype),
                HostData::Bf16(out) => append_bf16_bits(out, bytes, dtype),
            };
            if !ok {
                return Err(ModelError::TensorDtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    got: format!("{dtype:?}"),
                });
            }
            self.used.insert(name.to_string());
        }
        Ok(match data {
            HostData::F32(v) => Tensor::from_vec(v, &shape)?,
            HostData::Bf16(bits) => Tensor::from_bf16_bits(&bits, &shape, device)?,
        })
    }

    /// The stored bytes, dtype and file of tensor `name`, after checking it has `shape`.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(&[u8], Dtype, &Path)> {
        let stored = self.stored(name)?;
        if stored.shape != shape {
            return Err(ModelError::TensorShape {
                path: stored.path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: stored.shape.to_vec(),
            });
        }
        Ok((stored.bytes, stored.dtype, stored.path))
    }

    /// Every tensor name in the checkpoint, sorted.
    pub(crate) fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Tensor `name` exactly as stored, whatever its dtype and shape (for copying a
    /// checkpoint through, as the merge does). Does not mark it used.
    pub(crate) fn stored(&self, name: &str) -> Result<StoredTensor<'_>> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        };
        let &shard_index = self.location.get(name).ok_or_else(missing)?;
        let shard = &self.shards[shard_index];
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        let (start, end) = info.data_offsets;
        Ok(StoredTensor {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &shard.mmap[shard.data_start + start..shard.data_start + end],
            path: &shard.path,
        })
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

/// Host-side elements of a tensor on its way to a device.
enum HostData {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
}

/// Elements per rayon task of a conversion.
const CHUNK: usize = 1 << 16;

/// Bytes per element of the float dtypes we read; `None` for the others.
fn float_width(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => Some(2),
        Dtype::F32 => Some(4),
        _ => None,
    }
}

/// Appends `bytes` (little-endian `dtype` elements) converted by `convert` to `out`, in
/// parallel chunks. False for a dtype that is not BF16, F16 or F32.
fn append_converted<T: Copy + Default + Send>(
    out: &mut Vec<T>,
    bytes: &[u8],
    dtype: Dtype,
    convert: impl Fn(&[u8]) -> T + Sync,
) -> bool {
    let Some(width) = float_width(dtype) else {
        return false;
    };
    let start = out.len();
    out.resize(start + bytes.len() / width, T::default());
    out[start..]
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(width)) {
                *d = convert(s);
            }
        });
    true
}

/// One little-endian element of `dtype` as f32 (exact for all three).
fn element_f32(s: &[u8], dtype: Dtype) -> f32 {
    match dtype {
        // bf16 is the top half of an f32.
        Dtype::BF16 => f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16),
        Dtype::F16 => half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32(),
        _ => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
    }
}

/// Appends BF16/F16/F32 bytes as f32.
fn append_f32(out: &mut Vec<f32>, bytes: &[u8], dtype: Dtype) -> bool {
    append_converted(out, bytes, dtype, |s| element_f32(s, dtype))
}

/// Appends BF16/F16/F32 bytes as bf16 bits: BF16 as stored, the others rounded to
/// nearest-even (f16 → f32 is exact, so f16 is rounded once too).
fn append_bf16_bits(out: &mut Vec<u16>, bytes: &[u8], dtype: Dtype) -> bool {
    match dtype {
        Dtype::BF16 => append_converted(out, bytes, dtype, |s| u16::from_le_bytes([s[0], s[1]])),
        _ => append_converted(out, bytes, dtype, |s| {
            half::bf16::from_f32(element_f32(s, dtype)).to_bits()
        }),
    }
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

    /// Round-to-nearest-even f32 → bf16 by integer arithmetic (an independent reference for
    /// half's conversion; finite inputs only).
    fn rne_bf16(x: f32) -> u16 {
        let u = x.to_bits();
        ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
    }

    #[test]
    fn bf16_bits_round_to_nearest_even() {
        // Exact halfway cases (ties to even, both directions), just above/below halfway,
        // subnormals, and values past a conversion chunk.
        let halfway = 1.0f32 + 2f32.powi(-8); // between 1.0 and 1 + 2^-7: ties to 1.0
        let odd_halfway = 1.0f32 + 3.0 * 2f32.powi(-8); // ties up to 1 + 2^-6
        let mut data = vec![
            halfway,
            odd_halfway,
            f32::from_bits(halfway.to_bits() + 1),
            f32::from_bits(halfway.to_bits() - 1),
            -halfway,
            1e-40,
            -3.0e38,
            0.0,
            -0.0,
        ];
        data.extend((0..CHUNK as u32 + 77).map(|i| (i as f32 * 0.37).sin() * 1000.0));
        let f32_bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut bits = Vec::new();
        assert!(append_bf16_bits(&mut bits, &f32_bytes, Dtype::F32));
        let want: Vec<u16> = data.iter().map(|&x| rne_bf16(x)).collect();
        assert_eq!(bits, want);
        assert_eq!(bits[0], 0x3f80);
        assert_eq!(bits[1], 0x3f82);

        // f16 goes through an exact f32: one rounding.
        let f16s: Vec<half::f16> = data[..9].iter().map(|&x| half::f16::from_f32(x)).collect();
        let f16_bytes: Vec<u8> = f16s
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect();
        let mut bits = Vec::new();
        assert!(append_bf16_bits(&mut bits, &f16_bytes, Dtype::F16));
        let want: Vec<u16> = f16s.iter().map(|x| rne_bf16(x.to_f32())).collect();
        assert_eq!(bits, want);

        // bf16 is copied bit for bit, NaN payloads included.
        let raw: Vec<u16> = vec![0x7fc1, 0x0001, 0xff80, 0x3f80];
        let bytes: Vec<u8> = raw.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut bits = Vec::new();
        assert!(append_bf16_bits(&mut bits, &bytes, Dtype::BF16));
        assert_eq!(bits, raw);
        assert!(!append_bf16_bits(&mut bits, &bytes, Dtype::I64));
    }

    #[test]
    fn stacks_tensors_along_rows() {
        let dir = temp_dir("stack");
        write_safetensors(
            &dir.join(SINGLE_FILE),
            &[
                RawTensor::f32("q", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                RawTensor::bf16("k", &[1, 3], &[7.0, 8.0, 9.0]),
                RawTensor::f16("bq", &[2], &[0.5, 1.5]),
                RawTensor::f32("bk", &[1], &[2.5]),
                RawTensor::f32("odd", &[1, 2], &[0.0, 0.0]),
            ],
        );
        let mut ck = Checkpoint::open(&dir).unwrap();
        let w = ck
            .concat_on(&[("q", &[2, 3]), ("k", &[1, 3])], Device::Cpu)
            .unwrap();
        assert_eq!(w.shape(), &[3, 3]);
        assert_eq!(
            w.to_vec().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
        );
        let b = ck
            .concat_on(&[("bq", &[2]), ("bk", &[1])], Device::Cpu)
            .unwrap();
        assert_eq!(b.to_vec().unwrap(), vec![0.5, 1.5, 2.5]);
        assert_eq!(ck.unused(), vec!["odd"]);
        let e = err_text(ck.concat_on(&[("q", &[2, 3]), ("odd", &[1, 2])], Device::Cpu));
        assert!(e.contains("`odd`") && e.contains("stack"), "{e}");
        // The shape check still names the tensor inside a stack.
        let e = err_text(ck.concat_on(&[("q", &[2, 3]), ("k", &[2, 3])], Device::Cpu));
        assert!(e.contains("`k`") && e.contains("[1, 3]"), "{e}");
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
