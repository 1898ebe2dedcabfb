//! Writes a few valid .om files (both partition-table forms, with and
//! without MODEL_INOUT_INFO) to seed the fuzzer.
use kiln_runtime::om::writer::{inout_info, om_file, TensorSpec};

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: om_seed DIR"));
    let inputs = [
        TensorSpec { name: "input_ids", dtype: 9, dims: &[1, 1] },
        TensorSpec { name: "k_cache", dtype: 1, dims: &[2, 1, 2, 16, 8] },
    ];
    let outputs = [TensorSpec { name: "logits:0", dtype: 1, dims: &[1, 1, 32] }];
    for wide in [true, false] {
        for io in [true, false] {
            let mut parts = vec![(0u32, vec![1u8; 24]), (1u32, vec![2u8; 40])];
            if io {
                parts.push((8, inout_info(&inputs, &outputs)));
            }
            let name = format!("seed-{}-{}.om", if wide { "wide" } else { "tiny" }, if io { "io" } else { "noio" });
            std::fs::write(dir.join(name), om_file("decode", &parts, wide)).unwrap();
        }
    }
}
