//! AscendCL, loaded at run time. The declarations are written from the
//! public ACL documentation and headers' facts (see
//! `shared/research/acl-and-om.md`), resolved with `libloading` from
//! `libacl_mdl.so` + `libacl_rt.so` (newer CANN) or `libascendcl.so`
//! (older, and what Orange Pi AI Pro images carry).
//!
//! Safe wrappers own every ACL object: the process-wide initialization
//! ([`Acl`]), a device with its context and stream ([`Device`]), device
//! memory ([`DeviceBuffer`]), a loaded model ([`Model`]). Dropping them
//! releases the objects in the order ACL requires. Every failing call
//! becomes an [`AclError`] carrying the call, the code, its name and ACL's
//! own message.

mod api;
mod error;
mod model;

pub use api::{AclApi, LoadError};
pub use error::{code_name, AclError};
pub use model::{IoBinding, IoDesc, Model, WeightBinding};

use std::ffi::c_void;
use std::sync::{Arc, Mutex, Weak};

/// `aclrtRunMode`: where the calling code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// On the device's own CPU (Orange Pi AI Pro): host and device memory
    /// are the same DRAM, so "copies" between them can be skipped.
    Device,
    /// On a host with the NPU on a card.
    Host,
}

/// ACL initialized for this process. `aclInit` may run once per process:
/// every [`Acl::init`] while one is alive returns the same handle, and
/// `aclFinalize` runs when the last handle drops.
pub struct Acl {
    api: AclApi,
}

fn live_instance() -> &'static Mutex<Weak<Acl>> {
    static LIVE: std::sync::OnceLock<Mutex<Weak<Acl>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Weak::new()))
}

impl Acl {
    /// Loads ACL (see [`AclApi::load`]) and initializes it.
    pub fn init() -> Result<Arc<Acl>, AclSetupError> {
        let mut live = live_instance().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(acl) = live.upgrade() {
            return Ok(acl);
        }
        let api = AclApi::load()?;
        // SAFETY: a null config path is allowed; the api's symbols were resolved.
        let code = unsafe { (api.init)(std::ptr::null()) };
        api.check("aclInit", code)?;
        let acl = Arc::new(Acl { api });
        *live = Arc::downgrade(&acl);
        Ok(acl)
    }

    pub fn api(&self) -> &AclApi {
        &self.api
    }

    /// The library files in use.
    pub fn library(&self) -> String {
        self.api.origin.clone()
    }

    pub fn run_mode(&self) -> Result<RunMode, AclError> {
        let mut mode: i32 = -1;
        // SAFETY: `mode` is a valid out-pointer.
        let code = unsafe { (self.api.get_run_mode)(&mut mode) };
        self.api.check("aclrtGetRunMode", code)?;
        Ok(if mode == 0 {
            RunMode::Device
        } else {
            RunMode::Host
        })
    }

    /// `aclrtGetSocName`, when the library has it (e.g. "Ascend310B1").
    pub fn soc_name(&self) -> Option<String> {
        let get = self.api.get_soc_name?;
        // SAFETY: returns null or a NUL-terminated string owned by ACL.
        let p = unsafe { get() };
        // SAFETY: checked for null; ACL keeps the string alive.
        (!p.is_null()).then(|| {
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        })
    }

    /// `aclrtGetVersion` as "major.minor.patch", when the library has it.
    pub fn version(&self) -> Option<String> {
        let get = self.api.get_version?;
        let (mut major, mut minor, mut patch) = (0, 0, 0);
        // SAFETY: three valid out-pointers.
        let code = unsafe { get(&mut major, &mut minor, &mut patch) };
        (code == 0).then(|| format!("{major}.{minor}.{patch}"))
    }

    /// Whether models can be loaded with registered weight buffers
    /// ([`Model::load_with_weights`]): the calls exist from CANN 8.5 on.
    pub fn can_register_weights(&self) -> bool {
        self.api.config.is_some()
    }

    /// `aclmdlQuerySize`: the work and weight bytes an .om needs, when this
    /// ACL has the call and it succeeds.
    pub fn query_size(&self, path: &std::path::Path) -> Option<(usize, usize)> {
        let query = self.api.query_size?;
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        let (mut work, mut weight) = (0usize, 0usize);
        // SAFETY: a NUL-terminated path and two valid out-pointers.
        let code = unsafe { query(c_path.as_ptr(), &mut work, &mut weight) };
        (code == 0).then_some((work, weight))
    }

    pub fn device_count(&self) -> Result<u32, AclError> {
        let mut count = 0u32;
        // SAFETY: `count` is a valid out-pointer.
        let code = unsafe { (self.api.get_device_count)(&mut count) };
        self.api.check("aclrtGetDeviceCount", code)?;
        Ok(count)
    }
}

impl Drop for Acl {
    fn drop(&mut self) {
        // SAFETY: every object created through this Acl holds an Arc to it,
        // so all of them are gone by now.
        unsafe { (self.api.finalize)() };
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AclSetupError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Call(#[from] AclError),
}

/// A device set for this thread, with its own context and stream.
pub struct Device {
    acl: Arc<Acl>,
    id: i32,
    run_mode: RunMode,
    context: *mut c_void,
    stream: *mut c_void,
}

// SAFETY: ACL contexts may be made current on any thread (Device::bind does
// so before use); the raw handles are only passed back to ACL.
unsafe impl Send for Device {}

impl Device {
    pub fn open(acl: &Arc<Acl>, id: i32) -> Result<Device, AclError> {
        let api = acl.api();
        let run_mode = acl.run_mode()?;
        // SAFETY: plain calls with valid out-pointers; on failure the partial
        // state is released below in reverse order.
        unsafe {
            api.check("aclrtSetDevice", (api.set_device)(id))?;
            let mut context = std::ptr::null_mut();
            if let Err(e) = api.check("aclrtCreateContext", (api.create_context)(&mut context, id))
            {
                (api.reset_device)(id);
                return Err(e);
            }
            let mut stream = std::ptr::null_mut();
            if let Err(e) = api.check("aclrtCreateStream", (api.create_stream)(&mut stream)) {
                (api.destroy_context)(context);
                (api.reset_device)(id);
                return Err(e);
            }
            Ok(Device {
                acl: acl.clone(),
                id,
                run_mode,
                context,
                stream,
            })
        }
    }

    pub fn id(&self) -> i32 {
        self.id
    }

    pub fn acl(&self) -> &Arc<Acl> {
        &self.acl
    }

    /// Where this process runs relative to the device (read once, at open).
    pub fn run_mode(&self) -> RunMode {
        self.run_mode
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<(), AclError> {
        let api = self.acl.api();
        // SAFETY: the context is alive as long as self.
        api.check("aclrtSetCurrentContext", unsafe {
            (api.set_current_context)(self.context)
        })
    }

    pub fn synchronize(&self) -> Result<(), AclError> {
        let api = self.acl.api();
        // SAFETY: the stream is alive as long as self.
        api.check("aclrtSynchronizeStream", unsafe {
            (api.synchronize_stream)(self.stream)
        })
    }

    /// Allocates device memory.
    pub fn alloc(&self, size: usize) -> Result<DeviceBuffer, AclError> {
        let api = self.acl.api();
        let mut ptr = std::ptr::null_mut();
        // Policy 0: huge pages first, normal pages if none are left.
        // SAFETY: `ptr` is a valid out-pointer.
        api.check("aclrtMalloc", unsafe {
            (api.malloc)(&mut ptr, size.max(1), 0)
        })?;
        Ok(DeviceBuffer {
            acl: self.acl.clone(),
            ptr,
            size,
            host_visible: self.run_mode == RunMode::Device,
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let api = self.acl.api();
        // SAFETY: streams before contexts before the device, as ACL requires;
        // models and buffers hold their own Arc<Acl> and are dropped by their owners.
        unsafe {
            (api.destroy_stream)(self.stream);
            (api.destroy_context)(self.context);
            (api.reset_device)(self.id);
        }
    }
}

/// Device memory (on the 310B the same DRAM as the host's).
pub struct DeviceBuffer {
    acl: Arc<Acl>,
    ptr: *mut c_void,
    size: usize,
    /// The process runs on the device (ACL_DEVICE): this memory is plain
    /// DRAM the CPU may read and write directly.
    host_visible: bool,
}

// SAFETY: device memory is not tied to a thread.
unsafe impl Send for DeviceBuffer {}

/// `aclrtMemcpyKind`.
#[derive(Clone, Copy)]
enum CopyKind {
    HostToDevice = 1,
    DeviceToHost = 2,
    DeviceToDevice = 3,
}

impl DeviceBuffer {
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// The buffer as host memory, when the process runs on the device
    /// (ACL_DEVICE run mode: host and device share the board's DRAM, see
    /// `shared/research/acl-and-om.md`, and CANN's own samples read model
    /// outputs there without a copy). `None` on a host with a PCIe card.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        // SAFETY: in device run mode the allocation is CPU-addressable and
        // `size` bytes long; the borrow of self keeps it alive.
        self.host_visible
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.size) })
    }

    /// [`DeviceBuffer::host_bytes`], writable.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        // SAFETY: as in host_bytes; &mut self makes this the only view.
        self.host_visible
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.size) })
    }

    /// Copies `len` bytes from `src` at `src_offset` to this buffer at
    /// `dst_offset`, device to device: the data never visits the host.
    pub fn copy_from_device(
        &mut self,
        dst_offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        len: usize,
    ) -> Result<(), AclError> {
        let fits =
            |offset: usize, size: usize| offset.checked_add(len).is_some_and(|end| end <= size);
        if !fits(dst_offset, self.size) || !fits(src_offset, src.size) {
            return Err(AclError::local(
                "aclrtMemcpy",
                format!(
                    "copying {len} bytes from {src_offset} of a {}-byte buffer to {dst_offset} of a {}-byte buffer",
                    src.size, self.size
                ),
            ));
        }
        // SAFETY: both ranges were checked against their allocations above.
        let (dst, from) = unsafe {
            (
                self.ptr.cast::<u8>().add(dst_offset),
                src.ptr.cast::<u8>().add(src_offset),
            )
        };
        self.copy(
            dst.cast(),
            self.size - dst_offset,
            from.cast(),
            len,
            CopyKind::DeviceToDevice,
        )
    }

    fn copy(
        &self,
        dst: *mut c_void,
        dst_len: usize,
        src: *const c_void,
        len: usize,
        kind: CopyKind,
    ) -> Result<(), AclError> {
        let api = self.acl.api();
        // SAFETY: both ranges are valid for `len` bytes (checked by callers).
        api.check("aclrtMemcpy", unsafe {
            (api.memcpy)(dst, dst_len, src, len, kind as i32)
        })
    }

    /// Copies `bytes` to the start of the buffer.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), AclError> {
        self.write_at(0, bytes)
    }

    /// Copies `bytes` into the buffer at `offset`.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> Result<(), AclError> {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.size)
        {
            return Err(AclError::local(
                "aclrtMemcpy",
                format!(
                    "writing {} bytes at {offset} overflows a {}-byte device buffer",
                    bytes.len(),
                    self.size
                ),
            ));
        }
        // SAFETY: offset + len <= size, checked above.
        let dst = unsafe { self.ptr.cast::<u8>().add(offset) }.cast();
        self.copy(
            dst,
            self.size - offset,
            bytes.as_ptr().cast(),
            bytes.len(),
            CopyKind::HostToDevice,
        )
    }

    /// Copies the buffer's first `out.len()` bytes out.
    pub fn read(&self, out: &mut [u8]) -> Result<(), AclError> {
        if out.len() > self.size {
            return Err(AclError::local(
                "aclrtMemcpy",
                format!(
                    "reading {} bytes from a {}-byte device buffer",
                    out.len(),
                    self.size
                ),
            ));
        }
        self.copy(
            out.as_mut_ptr().cast(),
            out.len(),
            self.ptr,
            out.len(),
            CopyKind::DeviceToHost,
        )
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let api = self.acl.api();
        // SAFETY: the pointer came from aclrtMalloc and is freed once.
        unsafe { (api.free)(self.ptr) };
    }
}
