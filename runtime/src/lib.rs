//! Kiln's runtime: the IR shared with the compiler, the weight store, the
//! reference CPU interpreter, KV-cache sessions and the generation loop.
//!
//! This crate stays small and free of the compiler's dependencies so that it
//! builds for the aarch64 boards Kiln targets.

pub mod acl;
pub mod chat;
pub mod compiled;
pub mod diff;
pub mod generate;
pub mod interp;
pub mod ir;
pub mod manifest;
pub mod npu;
pub mod npy;
pub mod om;
pub mod run;
pub mod sampling;
pub mod session;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

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
