//! Backends: IR → artifacts for other toolchains. Each reads the IR only.

pub mod ascendc;
pub mod atc;
pub mod onnx;
