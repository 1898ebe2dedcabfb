//! The ACL functions Kiln calls, declared by hand and resolved at run time.

use super::error::AclError;
use libloading::Library;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;

pub const MAX_DIMS: usize = 128;
pub const MAX_NAME: usize = 128;

/// `aclmdlIODims`: 1160 bytes on LP64.
#[repr(C)]
pub struct IoDims {
    pub name: [c_char; MAX_NAME],
    pub dim_count: usize,
    pub dims: [i64; MAX_DIMS],
}

type Ptr = *mut c_void;

/// Resolved ACL entry points. The libraries stay loaded as long as this does.
pub struct AclApi {
    _libraries: Vec<Library>,
    /// Which files were loaded.
    pub origin: String,
    pub init: unsafe extern "C" fn(*const c_char) -> i32,
    pub finalize: unsafe extern "C" fn() -> i32,
    pub recent_err_msg: unsafe extern "C" fn() -> *const c_char,
    pub get_run_mode: unsafe extern "C" fn(*mut i32) -> i32,
    pub get_device_count: unsafe extern "C" fn(*mut u32) -> i32,
    pub set_device: unsafe extern "C" fn(i32) -> i32,
    pub reset_device: unsafe extern "C" fn(i32) -> i32,
    pub create_context: unsafe extern "C" fn(*mut Ptr, i32) -> i32,
    pub destroy_context: unsafe extern "C" fn(Ptr) -> i32,
    pub set_current_context: unsafe extern "C" fn(Ptr) -> i32,
    pub create_stream: unsafe extern "C" fn(*mut Ptr) -> i32,
    pub destroy_stream: unsafe extern "C" fn(Ptr) -> i32,
    pub synchronize_stream: unsafe extern "C" fn(Ptr) -> i32,
    pub malloc: unsafe extern "C" fn(*mut Ptr, usize, i32) -> i32,
    pub free: unsafe extern "C" fn(Ptr) -> i32,
    pub memcpy: unsafe extern "C" fn(Ptr, usize, *const c_void, usize, i32) -> i32,
    pub load_from_file: unsafe extern "C" fn(*const c_char, *mut u32) -> i32,
    pub unload: unsafe extern "C" fn(u32) -> i32,
    pub create_desc: unsafe extern "C" fn() -> Ptr,
    pub get_desc: unsafe extern "C" fn(Ptr, u32) -> i32,
    pub destroy_desc: unsafe extern "C" fn(Ptr) -> i32,
    pub num_inputs: unsafe extern "C" fn(Ptr) -> usize,
    pub num_outputs: unsafe extern "C" fn(Ptr) -> usize,
    pub input_size: unsafe extern "C" fn(Ptr, usize) -> usize,
    pub output_size: unsafe extern "C" fn(Ptr, usize) -> usize,
    pub input_dims: unsafe extern "C" fn(*const c_void, usize, *mut IoDims) -> i32,
    pub output_dims: unsafe extern "C" fn(*const c_void, usize, *mut IoDims) -> i32,
    pub input_dtype: unsafe extern "C" fn(*const c_void, usize) -> i32,
    pub output_dtype: unsafe extern "C" fn(*const c_void, usize) -> i32,
    pub input_name: unsafe extern "C" fn(*const c_void, usize) -> *const c_char,
    pub output_name: unsafe extern "C" fn(*const c_void, usize) -> *const c_char,
    pub create_dataset: unsafe extern "C" fn() -> Ptr,
    pub destroy_dataset: unsafe extern "C" fn(*const c_void) -> i32,
    pub add_dataset_buffer: unsafe extern "C" fn(Ptr, Ptr) -> i32,
    pub create_data_buffer: unsafe extern "C" fn(Ptr, usize) -> Ptr,
    pub destroy_data_buffer: unsafe extern "C" fn(*const c_void) -> i32,
    pub execute: unsafe extern "C" fn(u32, *const c_void, Ptr) -> i32,
    /// `aclrtGetSocName` (e.g. "Ascend310B1"); optional: only for reports.
    pub get_soc_name: Option<unsafe extern "C" fn() -> *const c_char>,
    /// `aclrtGetVersion(major, minor, patch)`; optional: only for reports.
    pub get_version: Option<unsafe extern "C" fn(*mut i32, *mut i32, *mut i32) -> i32>,
    /// Loading with a config and registered weight buffers (CANN 8.5 and
    /// later list it for the 310B); `None` on older ACL.
    pub config: Option<ConfigApi>,
    /// `aclmdlQuerySize(path, &work, &weight)`; optional: only for reports.
    pub query_size: Option<unsafe extern "C" fn(*const c_char, *mut usize, *mut usize) -> i32>,
}

/// `aclmdlCreateConfigHandle` and the calls that load a model through one,
/// with device buffers registered for its external weight files
/// (`shared/research/board-memory.md`).
#[derive(Clone, Copy)]
pub struct ConfigApi {
    pub create_handle: unsafe extern "C" fn() -> Ptr,
    pub destroy_handle: unsafe extern "C" fn(Ptr) -> i32,
    /// `aclmdlSetConfigOpt(handle, attr, &value, sizeof value)`.
    pub set_opt: unsafe extern "C" fn(Ptr, i32, *const c_void, usize) -> i32,
    pub load: unsafe extern "C" fn(*const c_void, *mut u32) -> i32,
    /// `aclmdlSetExternalWeightAddress(handle, file name, device pointer, size)`.
    pub set_external_weight_address: unsafe extern "C" fn(Ptr, *const c_char, Ptr, usize) -> i32,
}

/// `aclmdlConfigAttr` values and the load type Kiln uses (acl_mdl.h).
pub mod config_attr {
    pub const LOAD_TYPE_SIZET: i32 = 1;
    pub const PATH_PTR: i32 = 2;
    pub const LOAD_FROM_FILE: usize = 1;
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "ACL not found; looked in: {}. Install CANN (and source its set_env.sh), set \
         ASCEND_HOME_PATH, or point KILN_ACL_LIB at libascendcl.so; the CPU backend works without it",
        tried.join(", ")
    )]
    NotFound { tried: Vec<String> },
    /// Some candidate exists but none could be used: each attempt keeps the
    /// dynamic loader's own message (a driver library missing from
    /// LD_LIBRARY_PATH, say) or the ACL function it lacks.
    #[error(
        "ACL was found but could not be loaded:\n{}\nSource CANN's set_env.sh (it puts the driver's \
         lib64 on LD_LIBRARY_PATH), or point KILN_ACL_LIB at a complete libascendcl.so",
        failures.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n")
    )]
    Unusable { failures: Vec<String> },
}

/// Why one candidate set of libraries was not used.
enum Refusal {
    /// No such file (or, for a bare name, the loader found none).
    Absent,
    /// The file exists but `dlopen` failed; the loader's message.
    Unloadable(String),
    /// It loaded, but lacks an ACL function.
    MissingSymbol(String),
}

/// Where to look for ACL, in order: `$KILN_ACL_LIB` (files, `:`-separated),
/// then each CANN root's `lib64`, then the dynamic loader's own path.
fn candidates() -> Vec<Vec<PathBuf>> {
    let mut sets = Vec::new();
    if let Some(explicit) = std::env::var_os("KILN_ACL_LIB") {
        sets.push(std::env::split_paths(&explicit).collect());
    }
    let mut roots: Vec<PathBuf> = ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    roots.push("/usr/local/Ascend/cann".into());
    roots.push("/usr/local/Ascend/ascend-toolkit/latest".into());
    for root in roots {
        let lib = root.join("lib64");
        sets.push(vec![lib.join("libacl_mdl.so"), lib.join("libacl_rt.so")]);
        sets.push(vec![lib.join("libascendcl.so")]);
    }
    sets.push(vec!["libascendcl.so".into()]);
    sets.push(vec!["libacl_mdl.so".into(), "libacl_rt.so".into()]);
    sets
}

/// Opens every library of a set, or says why not.
fn open_set(set: &[PathBuf]) -> Result<Vec<Library>, Refusal> {
    let is_bare_name = |p: &PathBuf| p.components().count() == 1;
    if set.iter().any(|p| !is_bare_name(p) && !p.is_file()) {
        return Err(Refusal::Absent);
    }
    let mut libraries = Vec::new();
    for path in set {
        // SAFETY: loading a shared library runs its initializers; these are
        // the ACL libraries the user's CANN install (or KILN_ACL_LIB) names.
        match unsafe { Library::new(path) } {
            Ok(library) => libraries.push(library),
            Err(e) => {
                // The loader's own words (`dlerror`), not libloading's summary.
                let message = match &e {
                    libloading::Error::DlOpen { source } => source.to_string(),
                    other => other.to_string(),
                };
                // A bare name the loader cannot find at all is simply absent;
                // one it finds but cannot load names another file.
                let own_name = path.display().to_string();
                let absent = is_bare_name(path)
                    && message.starts_with(&format!("{own_name}: cannot open shared object file"));
                return Err(if absent {
                    Refusal::Absent
                } else {
                    Refusal::Unloadable(message)
                });
            }
        }
    }
    Ok(libraries)
}

impl AclApi {
    /// Loads the first complete candidate set of libraries. A set that
    /// fails (a missing dependency, a missing function) does not stop the
    /// search; if none succeeds, every failure is reported as it was.
    pub fn load() -> Result<AclApi, LoadError> {
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        for set in candidates() {
            let label = set
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ");
            let refusal = match open_set(&set) {
                Ok(libraries) => match Self::resolve(libraries, label.clone()) {
                    Ok(api) => return Ok(api),
                    Err(symbol) => Refusal::MissingSymbol(symbol),
                },
                Err(refusal) => refusal,
            };
            match refusal {
                Refusal::Absent => {}
                Refusal::Unloadable(message) => failures.push(format!("{label}: {message}")),
                Refusal::MissingSymbol(symbol) => failures.push(format!(
                    "{label}: lacks the ACL function {symbol} (not a complete AscendCL library)"
                )),
            }
            tried.push(label);
        }
        if failures.is_empty() {
            Err(LoadError::NotFound { tried })
        } else {
            Err(LoadError::Unusable { failures })
        }
    }

    /// Resolves every required function; `Err` names the first missing one.
    fn resolve(libraries: Vec<Library>, origin: String) -> Result<AclApi, String> {
        fn symbol<T: Copy>(libraries: &[Library], name: &str) -> Result<T, String> {
            for lib in libraries {
                // SAFETY: T is the documented ACL signature of `name`, as
                // declared in AclApi; the library stays loaded with the api.
                if let Ok(s) = unsafe { lib.get::<T>(name.as_bytes()) } {
                    return Ok(*s);
                }
            }
            Err(name.to_string())
        }
        macro_rules! sym {
            ($name:literal) => {
                symbol(&libraries, $name)?
            };
        }
        // Calls used only to describe the device: missing ones are left out.
        macro_rules! optional_sym {
            ($name:literal) => {
                symbol(&libraries, $name).ok()
            };
        }
        Ok(AclApi {
            init: sym!("aclInit"),
            finalize: sym!("aclFinalize"),
            recent_err_msg: sym!("aclGetRecentErrMsg"),
            get_run_mode: sym!("aclrtGetRunMode"),
            get_device_count: sym!("aclrtGetDeviceCount"),
            set_device: sym!("aclrtSetDevice"),
            reset_device: sym!("aclrtResetDevice"),
            create_context: sym!("aclrtCreateContext"),
            destroy_context: sym!("aclrtDestroyContext"),
            set_current_context: sym!("aclrtSetCurrentContext"),
            create_stream: sym!("aclrtCreateStream"),
            destroy_stream: sym!("aclrtDestroyStream"),
            synchronize_stream: sym!("aclrtSynchronizeStream"),
            malloc: sym!("aclrtMalloc"),
            free: sym!("aclrtFree"),
            memcpy: sym!("aclrtMemcpy"),
            load_from_file: sym!("aclmdlLoadFromFile"),
            unload: sym!("aclmdlUnload"),
            create_desc: sym!("aclmdlCreateDesc"),
            get_desc: sym!("aclmdlGetDesc"),
            destroy_desc: sym!("aclmdlDestroyDesc"),
            num_inputs: sym!("aclmdlGetNumInputs"),
            num_outputs: sym!("aclmdlGetNumOutputs"),
            input_size: sym!("aclmdlGetInputSizeByIndex"),
            output_size: sym!("aclmdlGetOutputSizeByIndex"),
            input_dims: sym!("aclmdlGetInputDims"),
            output_dims: sym!("aclmdlGetOutputDims"),
            input_dtype: sym!("aclmdlGetInputDataType"),
            output_dtype: sym!("aclmdlGetOutputDataType"),
            input_name: sym!("aclmdlGetInputNameByIndex"),
            output_name: sym!("aclmdlGetOutputNameByIndex"),
            create_dataset: sym!("aclmdlCreateDataset"),
            destroy_dataset: sym!("aclmdlDestroyDataset"),
            add_dataset_buffer: sym!("aclmdlAddDatasetBuffer"),
            create_data_buffer: sym!("aclCreateDataBuffer"),
            destroy_data_buffer: sym!("aclDestroyDataBuffer"),
            execute: sym!("aclmdlExecute"),
            get_soc_name: optional_sym!("aclrtGetSocName"),
            get_version: optional_sym!("aclrtGetVersion"),
            // All five or none: a partial set is treated as absent.
            config: (|| {
                Some(ConfigApi {
                    create_handle: optional_sym!("aclmdlCreateConfigHandle")?,
                    destroy_handle: optional_sym!("aclmdlDestroyConfigHandle")?,
                    set_opt: optional_sym!("aclmdlSetConfigOpt")?,
                    load: optional_sym!("aclmdlLoadWithConfig")?,
                    set_external_weight_address: optional_sym!("aclmdlSetExternalWeightAddress")?,
                })
            })(),
            query_size: optional_sym!("aclmdlQuerySize"),
            _libraries: libraries,
            origin,
        })
    }

    /// `Ok` for ACL_SUCCESS, else the error with ACL's latest message.
    pub fn check(&self, call: &'static str, code: i32) -> Result<(), AclError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: aclGetRecentErrMsg returns null or a NUL-terminated string
        // owned by ACL, valid until the next ACL call on this thread.
        let message = unsafe {
            let p = (self.recent_err_msg)();
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(AclError {
            call,
            code,
            message,
        })
    }
}
