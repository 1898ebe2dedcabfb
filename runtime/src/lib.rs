//! Kiln's runtime: the IR shared with the compiler, the weight store, the
//! reference CPU interpreter, KV-cache sessions and the generation loop.
//!
//! This crate stays small and free of the compiler's dependencies so that it
//! builds for the aarch64 boards Kiln targets.

// The contract with the compiler: the IR, its tensors and weight store.
pub mod ir;
pub mod tensor;
pub mod weights;

// Running it: the reference interpreter, the engines that keep a KV cache
// (CPU and NPU), ACL and the .om format underneath the NPU engine.
pub mod acl;
pub mod engine;
pub mod interp;
pub mod om;

// A compiled directory: its manifest, weights and the checks on its .om files.
pub mod compiled;

// Using it: generation (sampling, chat templates, tokenizer), CPU-vs-NPU
// diffs, the OpenAI-compatible server and llama-bench-style benchmarks.
pub mod bench;
pub mod console;
pub mod diff;
pub mod generate;
pub mod npy;
pub mod serve;

/// Helpers the unit tests share.
#[cfg(test)]
pub(crate) mod test_util {
    /// `len` values in [-0.5, 0.5) from a fixed linear congruential sequence.
    pub fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }
}
