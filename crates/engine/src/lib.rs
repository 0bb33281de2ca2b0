//! # engine — tensors on a device, and the ops a decoder needs
//!
//! Every op lives in one file under [`ops`]: its CPU reference (f32, rayon), which hands over
//! to the op's CUDA launcher (`cuda/ops/<op>.rs`, kernels in `kernels/<op>.cu`) when its
//! inputs are on a GPU ([`cuda`] describes that backend). The CPU path is the reference that
//! every CUDA kernel is tested against, and what CI runs.
//!
//! There is no general autograd. Each op will get an explicit input-gradient function beside
//! its forward (the DPO trainer recomputes a decoder layer in backward instead of keeping its
//! activations), so forwards return what a backward needs — e.g. attention's per-row
//! logsumexp.
//!
//! ## Dimension legend (used in every shape comment of the workspace)
//! - `B` sequences in a batch, `T` tokens (all sequences packed end to end)
//! - `C` hidden size, `I` MLP intermediate size, `V` vocabulary
//! - `H` query heads, `Hkv` key/value heads, `D` head dim, `R` LoRA rank, `L` layers
//!
//! ## Example
//! ```
//! use engine::{Tensor, ops};
//! let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
//! let w = Tensor::from_vec(vec![1.0, 1.0], &[2]).unwrap();
//! let y = ops::rms_norm(&x, &w, 1e-6, 0.0).unwrap();
//! assert_eq!(y.shape(), &[2, 2]);
//! ```

pub mod cuda;
pub mod error;
mod indices;
pub mod ops;
mod staging;
pub mod tensor;

#[cfg(test)]
mod test_util;

pub use cuda::DType;
pub use error::{EngineError, Result};
pub use indices::Indices;
pub use staging::{Staged, Staging};
pub use tensor::{Device, Tensor};
