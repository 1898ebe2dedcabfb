//! The ACL layer against a TEST DOUBLE (tests/acl_double/acl_double.c, built
//! here with the system C compiler): a small C library that exports the ACL
//! functions and records the calls. Nothing here runs on an NPU; these tests
//! check Kiln's side of the contract: loading, call order, ownership, error
//! propagation.

#[path = "acl_double/harness.rs"]
mod harness;

use harness::{build_double, calls, count};
use kiln_runtime::acl::{Acl, AclSetupError, Device, LoadError, Model, RunMode};
use std::path::Path;
use std::process::Command;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Compiles C `source` into the shared library `out`, linked with `libs`.
fn build_c_library(out: &Path, source: &str, libs: &[&str]) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).unwrap();
    let dir = out.parent().unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(out)
        .arg(&src)
        .arg(format!("-L{}", dir.display()))
        .args(libs)
        .status()
        .expect("a C compiler (cc) builds the test libraries");
    assert!(status.success(), "building {} failed", out.display());
}

/// `libbroken_acl.so`, linked against a `libgone_dependency.so` that is
/// then deleted: dlopen of the first fails naming the second.
fn build_with_missing_dependency(dir: &Path) -> std::path::PathBuf {
    let dependency = dir.join("libgone_dependency.so");
    build_c_library(&dependency, "int gone(void) { return 1; }\n", &[]);
    let broken = dir.join("libbroken_acl.so");
    build_c_library(
        &broken,
        "int gone(void);\nint aclInit(const char *c) { (void)c; return gone(); }\n",
        &["-lgone_dependency"],
    );
    std::fs::remove_file(&dependency).unwrap();
    broken
}

/// One test: ACL is process-wide, and these steps share the environment.
#[test]
fn acl_layer_against_the_test_double() {
    let tmp = tempfile::tempdir().unwrap();

    // 1. Without ACL anywhere: a clear error that lists where it looked.
    std::env::set_var("KILN_ACL_LIB", tmp.path().join("missing/libascendcl.so"));
    std::env::remove_var("ASCEND_HOME_PATH");
    std::env::remove_var("ASCEND_TOOLKIT_HOME");
    match Acl::init() {
        Err(AclSetupError::Load(e)) => {
            let text = e.to_string();
            assert!(text.starts_with("ACL not found; looked in: "), "{text}");
            assert!(
                text.contains("missing/libascendcl.so") && text.contains("/usr/local/Ascend"),
                "{text}"
            );
        }
        Err(other) => panic!("expected ACL not found, got {other}"),
        Ok(_) => panic!("found an ACL library where none should be"),
    }

    // 2. A library that exists but whose dependency is missing: the loader's
    // own message, naming the dependency, not "not found".
    let broken = build_with_missing_dependency(tmp.path());
    std::env::set_var("KILN_ACL_LIB", &broken);
    match Acl::init() {
        Err(AclSetupError::Load(e @ LoadError::Unusable { .. })) => {
            let text = e.to_string();
            assert!(
                text.starts_with("ACL was found but could not be loaded:")
                    && text.contains(
                        "libbroken_acl.so: libgone_dependency.so: cannot open shared object file"
                    ),
                "{text}"
            );
        }
        Err(other) => panic!("expected the loader's message, got {other}"),
        Ok(_) => panic!("a library with a missing dependency loaded"),
    }

    // 3. A set that loads but lacks ACL functions does not stop the search:
    // the next set (a CANN root's lib64/libascendcl.so) is used.
    let lib = build_double(tmp.path());
    let incomplete = tmp.path().join("libincomplete.so");
    build_c_library(
        &incomplete,
        "int aclInit(const char *c) { (void)c; return 0; }\n",
        &[],
    );
    let cann = tmp.path().join("cann");
    std::fs::create_dir_all(cann.join("lib64")).unwrap();
    std::fs::copy(&lib, cann.join("lib64/libascendcl.so")).unwrap();
    std::env::set_var("KILN_ACL_LIB", &incomplete);
    std::env::set_var("ASCEND_HOME_PATH", &cann);
    {
        let acl = Acl::init().expect("the second set loads");
        assert!(
            acl.library().ends_with("cann/lib64/libascendcl.so"),
            "{}",
            acl.library()
        );
    }
    std::env::remove_var("ASCEND_HOME_PATH");

    // 4. The test double, end to end.
    let log = tmp.path().join("calls.log");
    std::env::set_var("KILN_ACL_LIB", &lib);
    std::env::set_var("KILN_ACL_DOUBLE_LOG", &log);
    let model_file = tmp.path().join("double.om");
    std::fs::write(&model_file, b"not really an om; the double only opens it").unwrap();
    {
        let acl = Acl::init().expect("the test double loads");
        assert!(acl.library().contains("libacl_test_double.so"));
        assert_eq!(acl.run_mode().unwrap(), RunMode::Device);
        // A device that does not exist: the ACL error comes back whole.
        let err = Device::open(&acl, 3).err().expect("device 3 must fail");
        assert_eq!(err.code, 107001);
        assert!(
            err.to_string()
                .contains("aclrtSetDevice failed with ACL error 107001")
                && err.message.contains("only device 0")
        );

        let device = Device::open(&acl, 0).unwrap();
        let model = Model::load(&device, &model_file).unwrap();
        assert_eq!(model.inputs()[0].name, "x");
        assert_eq!(model.inputs()[0].dims, vec![1, 4]);
        assert_eq!(model.inputs()[0].dtype.to_string(), "float32");
        assert_eq!(model.outputs()[0].size, 16);
        let mut input = device.alloc(16).unwrap();
        let mut output = device.alloc(16).unwrap();
        input.write(&f32_bytes(&[1.0, -2.0, 3.5, 0.25])).unwrap();
        model.execute(&[&input], &mut [&mut output]).unwrap();
        let mut out = [0u8; 16];
        output.read(&mut out).unwrap();
        assert_eq!(out.to_vec(), f32_bytes(&[2.0, -4.0, 7.0, 0.5]));

        // A failing execute is a readable error, and the process carries on.
        std::env::set_var("KILN_ACL_DOUBLE_FAIL_EXECUTE", "1");
        let err = model.execute(&[&input], &mut [&mut output]).unwrap_err();
        std::env::remove_var("KILN_ACL_DOUBLE_FAIL_EXECUTE");
        assert_eq!(err.code, 507011);
        assert_eq!(
            err.to_string(),
            "aclmdlExecute failed with ACL error 507011 (a runtime (aclrt) error): test double: execute failed as the test asked"
        );
        model.execute(&[&input], &mut [&mut output]).unwrap();

        // Sizes are checked before ACL sees them.
        let mut small = device.alloc(8).unwrap();
        let err = model.execute(&[&input], &mut [&mut small]).unwrap_err();
        assert!(
            err.to_string()
                .contains("buffer for `y` has 8 bytes, the model needs 16"),
            "{err}"
        );
        assert!(input.write(&[0u8; 32]).is_err());

        // A missing model file.
        let err = Model::load(&device, &tmp.path().join("nope.om"))
            .err()
            .unwrap();
        assert_eq!(err.code, 100003);
        assert!(
            err.to_string().contains("ACL_ERROR_INVALID_FILE")
                && err.to_string().contains("nope.om"),
            "{err}"
        );
        // Everything drops here, in reverse order of creation.
    }

    let calls = calls(&log);
    let order: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| {
            !matches!(
                *c,
                "aclrtMalloc" | "aclrtFree" | "aclmdlExecute double.om" | "aclrtGetRunMode"
            ) && !c.starts_with("aclrtMemcpy ")
                && !c.starts_with("malloc size ")
        })
        .collect();
    assert_eq!(
        order,
        [
            "aclInit",
            "aclrtSetDevice", // device 3, refused
            "aclrtSetDevice",
            "aclrtCreateContext",
            "aclrtCreateStream",
            "aclmdlLoadFromFile double.om",
            "aclmdlGetDesc",
            "aclmdlLoadFromFile nope.om", // refused
            "aclmdlUnload double.om",
            "aclrtDestroyStream",
            "aclrtDestroyContext",
            "aclrtResetDevice",
            "aclFinalize",
            "live objects at finalize: 0",
        ],
        "calls: {calls:?}"
    );
    assert_eq!(
        (count(&calls, "aclrtMalloc"), count(&calls, "aclrtFree")),
        (3, 3)
    );
    assert_eq!(count(&calls, "aclmdlExecute double.om"), 3);
    // One write of the input, one read of the output (host to device and
    // back as the kinds say; the double checks each side is what it claims).
    assert_eq!(count(&calls, "aclrtMemcpy host_to_device"), 1);
    assert_eq!(count(&calls, "aclrtMemcpy device_to_host"), 1);
}
