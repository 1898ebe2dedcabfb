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
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "ACL not found; looked in: {}. Install CANN (and source its set_env.sh), set \
         ASCEND_HOME_PATH, or point KILN_ACL_LIB at libascendcl.so; the CPU backend works without it",
        tried.join(", ")
    )]
    NotFound { tried: Vec<String> },
    #[error("{library} lacks the ACL function {symbol}: it is not a (complete) AscendCL library")]
    MissingSymbol { library: String, symbol: String },
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

impl AclApi {
    /// Loads the first complete candidate set of libraries.
    pub fn load() -> Result<AclApi, LoadError> {
        let mut tried = Vec::new();
        for set in candidates() {
            let label = set
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ");
            let is_bare_name = set.iter().all(|p| p.components().count() == 1);
            if !is_bare_name && !set.iter().all(|p| p.is_file()) {
                tried.push(label);
                continue;
            }
            // SAFETY: loading a shared library runs its initializers; these are
            // the ACL libraries the user's CANN install (or KILN_ACL_LIB) names.
            let libraries: Result<Vec<Library>, _> =
                set.iter().map(|p| unsafe { Library::new(p) }).collect();
            match libraries {
                Ok(libraries) => return Self::resolve(libraries, label),
                Err(_) => tried.push(label),
            }
        }
        Err(LoadError::NotFound { tried })
    }

    fn resolve(libraries: Vec<Library>, origin: String) -> Result<AclApi, LoadError> {
        fn symbol<T: Copy>(
            libraries: &[Library],
            origin: &str,
            name: &str,
        ) -> Result<T, LoadError> {
            for lib in libraries {
                // SAFETY: T is the documented ACL signature of `name`, as
                // declared in AclApi; the library stays loaded with the api.
                if let Ok(s) = unsafe { lib.get::<T>(name.as_bytes()) } {
                    return Ok(*s);
                }
            }
            Err(LoadError::MissingSymbol {
                library: origin.to_string(),
                symbol: name.to_string(),
            })
        }
        macro_rules! sym {
            ($name:literal) => {
                symbol(&libraries, &origin, $name)?
            };
        }
        // Calls used only to describe the device: missing ones are left out.
        macro_rules! optional_sym {
            ($name:literal) => {
                symbol(&libraries, &origin, $name).ok()
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
