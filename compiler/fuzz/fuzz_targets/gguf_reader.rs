//! Any bytes through the GGUF reader, and every tensor it accepts through
//! dequantization: errors are fine, panics and runaway allocations are not.
#![no_main]

use kiln::frontend::gguf::{quant, reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, _, tensors)) = reader::parse_bytes(data) else {
        return;
    };
    for t in tensors {
        // The reader promised the range is inside the file and whole blocks.
        let bytes = &data[t.start..t.start + t.len];
        let mut out = vec![0f32; t.numel()];
        quant::dequantize(t.ggml_type, bytes, &mut out);
    }
});
