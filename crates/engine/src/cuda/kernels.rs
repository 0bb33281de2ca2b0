//! The kernel sources (kernels/*.cu, embedded at build time) and how they are compiled.
//!
//! One CUDA module per op family; each is compiled by NVRTC on first use, for the device's
//! architecture, and cached on disk (see [`super::cache`]).

use super::nvrtc::Arch;

/// In-memory headers every module may `#include` (each is part of every module's cache key).
pub(crate) const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    // The tensor-core attention loop of attention.cu and paged_attention.cu.
    (
        "attention_tile.cuh",
        include_str!("../../kernels/attention_tile.cuh"),
    ),
    // The counter-based dropout mask of lora.cu and lora_fused.cu.
    ("dropout.cuh", include_str!("../../kernels/dropout.cuh")),
];

/// A CUDA module: one `kernels/<name>.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Activation,
    Embedding,
    RmsNorm,
    Rope,
    Attention,
    Logprobs,
    PagedAttention,
    TopK,
    Lora,
    AttentionBackward,
    LoraFused,
}

impl Module {
    /// Every module, in the order `prefer kernels` reports them.
    pub const ALL: [Module; 12] = [
        Module::Elementwise,
        Module::Activation,
        Module::Embedding,
        Module::RmsNorm,
        Module::Rope,
        Module::Attention,
        Module::Logprobs,
        Module::PagedAttention,
        Module::TopK,
        Module::Lora,
        Module::AttentionBackward,
        Module::LoraFused,
    ];

    /// The file stem under kernels/.
    pub fn name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise",
            Module::Activation => "activation",
            Module::Embedding => "embedding",
            Module::RmsNorm => "rms_norm",
            Module::Rope => "rope",
            Module::Attention => "attention",
            Module::Logprobs => "logprobs",
            Module::PagedAttention => "paged_attention",
            Module::TopK => "top_k",
            Module::Lora => "lora",
            Module::AttentionBackward => "attention_backward",
            Module::LoraFused => "lora_fused",
        }
    }

    pub(crate) fn source(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("../../kernels/elementwise.cu"),
            Module::Activation => include_str!("../../kernels/activation.cu"),
            Module::Embedding => include_str!("../../kernels/embedding.cu"),
            Module::RmsNorm => include_str!("../../kernels/rms_norm.cu"),
            Module::Rope => include_str!("../../kernels/rope.cu"),
            Module::Attention => include_str!("../../kernels/attention.cu"),
            Module::Logprobs => include_str!("../../kernels/logprobs.cu"),
            Module::PagedAttention => include_str!("../../kernels/paged_attention.cu"),
            Module::TopK => include_str!("../../kernels/top_k.cu"),
            Module::Lora => include_str!("../../kernels/lora.cu"),
            Module::AttentionBackward => include_str!("../../kernels/attention_backward.cu"),
            Module::LoraFused => include_str!("../../kernels/lora_fused.cu"),
        }
    }

    /// The `extern "C"` kernels the module defines; checked after every compile so a renamed
    /// kernel fails at build (CI) time, not at its first launch.
    pub(crate) fn kernels(self) -> &'static [&'static str] {
        match self {
            Module::Elementwise => super::ops::elementwise::KERNELS,
            Module::Activation => super::ops::activation::KERNELS,
            Module::Embedding => super::ops::embedding::KERNELS,
            Module::RmsNorm => super::ops::rms_norm::KERNELS,
            Module::Rope => super::ops::rope::KERNELS,
            Module::Attention => &[
                "attention_fwd_d64_m1",
                "attention_fwd_d64_m2",
                "attention_fwd_d80_m1",
                "attention_fwd_d80_m2",
                "attention_fwd_d96_m1",
                "attention_fwd_d96_m2",
                "attention_fwd_d128_m1",
                "attention_fwd_d256_m1",
                "attention_simple",
            ],
            Module::Logprobs => super::ops::logprobs::KERNELS,
            Module::PagedAttention => super::ops::paged_attention::KERNELS,
            Module::TopK => super::ops::top_k::KERNELS,
            Module::Lora => super::ops::lora_ops::KERNELS,
            Module::AttentionBackward => super::ops::attention_backward::KERNELS,
            Module::LoraFused => super::ops::lora_fused::KERNELS,
        }
    }
}

/// Compiles `module` for sm_90 with ptxas statistics (no GPU needed), prints them and
/// asserts that no kernel spills registers: the check each module's tests share. `None` (the
/// test skips) when libnvrtc is not found.
#[cfg(test)]
pub(crate) fn compile_without_spills(module: Module) -> Option<super::nvrtc::Compiled> {
    if !super::libs::Library::Nvrtc.is_present() {
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to run this test)");
        return None;
    }
    let arch = Arch::parse("sm_90").unwrap();
    let mut opts = options(arch);
    opts.push("--ptxas-options=--verbose".to_string());
    let compiled =
        super::nvrtc::compile_cubin(module.name(), module.source(), HEADERS, &opts, arch)
            .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", compiled.log);
    for line in compiled.log.lines().filter(|l| l.contains("spill")) {
        assert!(
            line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
            "{line}"
        );
    }
    Some(compiled)
}

/// NVRTC flags for one architecture. Precise division and square root stay on (the CPU
/// reference is f32); hot paths use explicit fast intrinsics where their error is harmless.
pub(crate) fn options(arch: Arch) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
    ]
}
