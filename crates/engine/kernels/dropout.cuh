// dropout.cuh — the counter-based dropout mask of ops::lora_ops, shared by lora.cu and
// lora_fused.cu so every kernel draws the bits the CPU draws.
#pragma once
#include "common.cuh"

// SplitMix64's finaliser (Steele, Lea & Flood), the CPU's `dropout_hash`: unsigned 64-bit
// arithmetic wraps, as Rust's wrapping_add / wrapping_mul do.
__device__ __forceinline__ u64 dropout_hash(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The multiplier of element i: keep (1 / (1 − p)) when the hash is at or above cut (p·2⁶⁴),
// else 0.
__device__ __forceinline__ float dropout_multiplier(u64 key, u64 cut, float keep, i64 i) {
    return dropout_hash(key ^ (u64)i) >= cut ? keep : 0.0f;
}
