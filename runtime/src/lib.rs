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
