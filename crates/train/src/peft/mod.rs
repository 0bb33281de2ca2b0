//! LoRA adapters as PEFT 0.21 makes, writes and reads them.
//!
//! - [`init_lora`]: PEFT's initialisation (linear A Kaiming-uniform, B zero; embedding A zero,
//!   B normal) from a [`SeededRng`], whose state saves for an exact resume;
//! - [`save_adapter`] / [`load_adapter`]: the adapter folder `PeftModel.from_pretrained` and
//!   vLLM load — `adapter_config.json` ([`AdapterConfig`], PEFT's keys and values) and
//!   `adapter_model.safetensors` (PEFT's tensor names, [`lora_tensor_names`]), read back with
//!   errors that name the file and tensor;
//! - the adapter itself is the model crate's [`model::Lora`] (its [`model::LoraSpec`] holds
//!   r, lora_alpha, lora_dropout, use_rslora and the targets; scaling is alpha/r, or
//!   alpha/√r with rsLoRA).
//!
//! We never write PEFT's dumps of the full base embedding and head (see [`adapter_file`]).
//!
//! ```no_run
//! use std::path::Path;
//! use model::{LoraSpec, LoraTarget, ModelConfig};
//! use train::peft::{SeededRng, init_lora, load_adapter, save_adapter};
//! let cfg = ModelConfig::from_file(Path::new("model/config.json")).unwrap();
//! let spec = LoraSpec { r: 16, alpha: 16.0, dropout: 0.05, use_rslora: false,
//!                       targets: vec![LoraTarget::QProj, LoraTarget::VProj] };
//! let mut rng = SeededRng::new(42);
//! let lora = init_lora(spec, &cfg, &mut rng).unwrap();
//! save_adapter(Path::new("out/adapter"), &lora, Some("org/base-model")).unwrap();
//! let back = load_adapter(Path::new("out/adapter"), &cfg).unwrap();
//! assert_eq!(back.lora.spec, lora.spec);
//! ```

pub mod adapter_file;
mod config;
mod init;
mod keys;
mod rng;
pub(crate) mod tensor_file;

pub use adapter_file::{LoadedAdapter, WEIGHTS_FILE, load_adapter, save_adapter};
pub use config::{AdapterConfig, CONFIG_FILE, PEFT_FORMAT_VERSION};
pub use init::init_lora;
pub use keys::{is_base_weight_dump, lora_parameters, lora_tensor_names, module_path};
pub use rng::{RngState, SeededRng};
