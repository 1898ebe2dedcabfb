//! The .om reader on arbitrary bytes: it must return an error or a model,
//! never panic, hang or allocate absurdly.
#![no_main]

use kiln_runtime::om::OmFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(om) = OmFile::parse(data) {
        // Formatting walks every parsed field.
        let _ = om.to_string();
    }
});
