//! Builds the ACL TEST DOUBLE (acl_double.c, next to this file) with the
//! system C compiler and reads the calls it records. Nothing built here is
//! CANN or touches an NPU. Shared by the runtime's tests and the
//! workspace's (tests/compile.rs), which each use part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The double's source, found next to this file whichever crate's test
/// includes it.
const SOURCE: &str = include_str!("acl_double.c");

/// Compiles the test double into `dir` and returns the library's path.
pub fn build_double(dir: &Path) -> PathBuf {
    build_double_as(dir, "libacl_test_double.so", &[])
}

/// The double as ACL before CANN 8.5: without aclmdlLoadWithConfig and
/// aclmdlSetExternalWeightAddress.
pub fn build_old_cann_double(dir: &Path) -> PathBuf {
    build_double_as(
        dir,
        "libacl_test_double_old.so",
        &["-DKILN_DOUBLE_OLD_CANN"],
    )
}

fn build_double_as(dir: &Path, name: &str, defines: &[&str]) -> PathBuf {
    let src = dir.join("acl_double.c");
    std::fs::write(&src, SOURCE).unwrap();
    let lib = dir.join(name);
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror"])
        .args(defines)
        .arg("-o")
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed to build the ACL test double");
    assert!(
        out.status.success(),
        "building the ACL test double failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// The calls the double recorded, one per line.
pub fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The sizes of every aclrtMalloc, in order.
pub fn malloc_sizes(calls: &[String]) -> Vec<usize> {
    calls
        .iter()
        .filter_map(|c| c.strip_prefix("malloc size "))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// How many recorded calls are exactly `call`.
pub fn count(calls: &[String], call: &str) -> usize {
    calls.iter().filter(|c| *c == call).count()
}
