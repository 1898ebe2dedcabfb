//! A loaded .om model: its description, and execution on device buffers.

use super::api::IoDims;
use super::error::AclError;
use super::{Acl, Device, DeviceBuffer};
use crate::om::AclDataType;
use std::ffi::{c_void, CStr, CString};
use std::path::Path;
use std::sync::Arc;

/// One input or output as ACL describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoDesc {
    pub name: String,
    pub dtype: AclDataType,
    pub dims: Vec<i64>,
    /// Bytes of the buffer ACL expects.
    pub size: usize,
}

pub struct Model {
    acl: Arc<Acl>,
    id: u32,
    desc: *mut c_void,
    inputs: Vec<IoDesc>,
    outputs: Vec<IoDesc>,
}

// SAFETY: a model id and its description are process-wide ACL objects.
unsafe impl Send for Model {}

/// A dataset and its data buffers, destroyed together.
struct Dataset {
    acl: Arc<Acl>,
    ptr: *mut c_void,
    buffers: Vec<*mut c_void>,
}

impl Dataset {
    fn new(acl: &Arc<Acl>, buffers: &[(*mut c_void, usize)]) -> Result<Dataset, AclError> {
        let api = acl.api();
        // SAFETY: plain constructor.
        let ptr = unsafe { (api.create_dataset)() };
        if ptr.is_null() {
            return Err(AclError::local(
                "aclmdlCreateDataset",
                "returned null".into(),
            ));
        }
        let mut set = Dataset {
            acl: acl.clone(),
            ptr,
            buffers: Vec::new(),
        };
        for &(data, size) in buffers {
            // SAFETY: `data` is a live device allocation of at least `size` bytes.
            let buffer = unsafe { (api.create_data_buffer)(data, size) };
            if buffer.is_null() {
                return Err(AclError::local(
                    "aclCreateDataBuffer",
                    "returned null".into(),
                ));
            }
            set.buffers.push(buffer);
            // SAFETY: both handles are live; the dataset does not take ownership.
            api.check("aclmdlAddDatasetBuffer", unsafe {
                (api.add_dataset_buffer)(set.ptr, buffer)
            })?;
        }
        Ok(set)
    }
}

impl Drop for Dataset {
    fn drop(&mut self) {
        let api = self.acl.api();
        // SAFETY: each handle was created above and is destroyed once.
        unsafe {
            for &b in &self.buffers {
                (api.destroy_data_buffer)(b);
            }
            (api.destroy_dataset)(self.ptr);
        }
    }
}

/// A model's input and output datasets, built once over device buffers
/// that stay allocated, so each step only calls `aclmdlExecute`.
pub struct IoBinding {
    model_id: u32,
    inputs: Dataset,
    outputs: Dataset,
}

// SAFETY: datasets are plain ACL descriptors, not tied to a thread.
unsafe impl Send for IoBinding {}

fn c_str(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: ACL returns NUL-terminated strings it owns.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn c_path(call: &'static str, path: &Path) -> Result<CString, AclError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| AclError::local(call, format!("{} contains a NUL byte", path.display())))
}

/// Adds the model file to a failed load's message.
fn naming(path: &Path) -> impl FnOnce(AclError) -> AclError + '_ {
    move |mut e| {
        e.message = format!("{} ({})", e.message.trim(), path.display());
        e
    }
}

/// A device buffer registered for one external weight file of a model.
pub struct WeightBinding<'a> {
    /// The file's bare name in the model's `weight/` folder (`weight_<sha256>`).
    pub file: &'a str,
    /// Holds the file's bytes; its size is a multiple of 32, as ACL requires.
    pub buffer: &'a DeviceBuffer,
}

impl Model {
    /// Loads an .om file on `device` and reads its description. External
    /// weights, if the model has any, are read by ACL from `weight/` beside
    /// the file into memory of its own.
    pub fn load(device: &Device, path: &Path) -> Result<Model, AclError> {
        let acl = device.acl().clone();
        let api = acl.api();
        device.bind()?;
        let c_path = c_path("aclmdlLoadFromFile", path)?;
        let mut id = 0u32;
        // SAFETY: a NUL-terminated path and a valid out-pointer.
        api.check("aclmdlLoadFromFile", unsafe {
            (api.load_from_file)(c_path.as_ptr(), &mut id)
        })
        .map_err(naming(path))?;
        Self::describe_loaded(acl, id)
    }

    /// Loads an .om file whose weights live in `weight/` files, with each of
    /// `weights` registered (`aclmdlSetExternalWeightAddress`) so that ACL
    /// uses the buffer as it is instead of allocating and reading its own
    /// copy: the same buffers registered for two models hold the weights
    /// once. `Err` with code -1 if this ACL lacks the calls (older CANN).
    pub fn load_with_weights(
        device: &Device,
        path: &Path,
        weights: &[WeightBinding],
    ) -> Result<Model, AclError> {
        use super::api::config_attr;
        let acl = device.acl().clone();
        let api = acl.api();
        let Some(config) = api.config else {
            return Err(AclError::local(
                "aclmdlLoadWithConfig",
                "this ACL has no aclmdlLoadWithConfig/aclmdlSetExternalWeightAddress".into(),
            ));
        };
        device.bind()?;
        let c_path = c_path("aclmdlLoadWithConfig", path)?;
        let names = weights
            .iter()
            .map(|w| {
                CString::new(w.file).map_err(|_| {
                    AclError::local(
                        "aclmdlSetExternalWeightAddress",
                        "a NUL in a file name".into(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: plain constructor.
        let handle = unsafe { (config.create_handle)() };
        if handle.is_null() {
            return Err(AclError::local(
                "aclmdlCreateConfigHandle",
                "returned null".into(),
            ));
        }
        struct Handle(super::api::ConfigApi, *mut c_void);
        impl Drop for Handle {
            fn drop(&mut self) {
                // SAFETY: created above, destroyed once.
                unsafe { (self.0.destroy_handle)(self.1) };
            }
        }
        let handle = Handle(config, handle);
        let load_type: usize = config_attr::LOAD_FROM_FILE;
        let path_ptr: *const std::ffi::c_char = c_path.as_ptr();
        // SAFETY (block): the handle is live; each value points at a local of
        // the size passed (ACL copies the path); every registered pointer is a
        // live device allocation of the size given, kept by the caller for as
        // long as the model stays loaded.
        unsafe {
            api.check(
                "aclmdlSetConfigOpt",
                (config.set_opt)(
                    handle.1,
                    config_attr::LOAD_TYPE_SIZET,
                    (&load_type as *const usize).cast(),
                    std::mem::size_of::<usize>(),
                ),
            )?;
            api.check(
                "aclmdlSetConfigOpt",
                (config.set_opt)(
                    handle.1,
                    config_attr::PATH_PTR,
                    (&path_ptr as *const *const std::ffi::c_char).cast(),
                    std::mem::size_of::<*const std::ffi::c_char>(),
                ),
            )?;
            for (w, name) in weights.iter().zip(&names) {
                api.check(
                    "aclmdlSetExternalWeightAddress",
                    (config.set_external_weight_address)(
                        handle.1,
                        name.as_ptr(),
                        w.buffer.as_ptr(),
                        w.buffer.size(),
                    ),
                )
                .map_err(naming(path))?;
            }
            let mut id = 0u32;
            api.check(
                "aclmdlLoadWithConfig",
                (config.load)(handle.1.cast_const(), &mut id),
            )
            .map_err(naming(path))?;
            drop(handle);
            Self::describe_loaded(acl, id)
        }
    }

    fn describe_loaded(acl: Arc<Acl>, id: u32) -> Result<Model, AclError> {
        let api = acl.api();
        // SAFETY: plain constructor.
        let desc = unsafe { (api.create_desc)() };
        let mut model = Model {
            acl: acl.clone(),
            id,
            desc,
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        if desc.is_null() {
            return Err(AclError::local("aclmdlCreateDesc", "returned null".into()));
        }
        // SAFETY: desc is live and id is a loaded model.
        api.check("aclmdlGetDesc", unsafe { (api.get_desc)(desc, id) })?;
        model.inputs = model.describe(false)?;
        model.outputs = model.describe(true)?;
        Ok(model)
    }

    fn describe(&self, outputs: bool) -> Result<Vec<IoDesc>, AclError> {
        let api = self.acl.api();
        // SAFETY (block): `desc` is live; indices are below the counts ACL gave.
        unsafe {
            let count = if outputs {
                (api.num_outputs)(self.desc)
            } else {
                (api.num_inputs)(self.desc)
            };
            let mut list = Vec::with_capacity(count.min(1024));
            for i in 0..count {
                let mut dims = Box::new(IoDims {
                    name: [0; super::api::MAX_NAME],
                    dim_count: 0,
                    dims: [0; super::api::MAX_DIMS],
                });
                let (call, code) = if outputs {
                    (
                        "aclmdlGetOutputDims",
                        (api.output_dims)(self.desc, i, &mut *dims),
                    )
                } else {
                    (
                        "aclmdlGetInputDims",
                        (api.input_dims)(self.desc, i, &mut *dims),
                    )
                };
                api.check(call, code)?;
                let rank = dims.dim_count.min(super::api::MAX_DIMS);
                list.push(IoDesc {
                    name: c_str(if outputs {
                        (api.output_name)(self.desc, i)
                    } else {
                        (api.input_name)(self.desc, i)
                    }),
                    dtype: AclDataType(if outputs {
                        (api.output_dtype)(self.desc, i)
                    } else {
                        (api.input_dtype)(self.desc, i)
                    }),
                    dims: dims.dims[..rank].to_vec(),
                    size: if outputs {
                        (api.output_size)(self.desc, i)
                    } else {
                        (api.input_size)(self.desc, i)
                    },
                });
            }
            Ok(list)
        }
    }

    pub fn inputs(&self) -> &[IoDesc] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoDesc] {
        &self.outputs
    }

    /// Runs the model synchronously. Buffers are in the model's input and
    /// output order and must be at least the sizes it declares.
    pub fn execute(
        &self,
        inputs: &[&DeviceBuffer],
        outputs: &mut [&mut DeviceBuffer],
    ) -> Result<(), AclError> {
        let outputs: Vec<&DeviceBuffer> = outputs.iter().map(|b| &**b).collect();
        // SAFETY: the buffers are borrowed for the whole call.
        let binding = unsafe { self.bind(inputs, &outputs) }?;
        self.execute_bound(&binding)
    }

    /// Builds the datasets for `inputs` and `outputs` once, for
    /// [`Model::execute_bound`]. Checked like [`Model::execute`].
    ///
    /// # Safety
    /// The buffers must stay allocated while the binding is used: ACL reads
    /// and writes them by address at every execute. And no slice from
    /// [`DeviceBuffer::host_bytes`] or `host_bytes_mut` of a bound buffer may
    /// be alive across [`Model::execute_bound`]: the device writes them then,
    /// behind any borrow.
    pub unsafe fn bind(
        &self,
        inputs: &[&DeviceBuffer],
        outputs: &[&DeviceBuffer],
    ) -> Result<IoBinding, AclError> {
        for (what, given, want) in [
            ("inputs", inputs.len(), self.inputs.len()),
            ("outputs", outputs.len(), self.outputs.len()),
        ] {
            if given != want {
                return Err(AclError::local(
                    "aclmdlExecute",
                    format!("the model has {want} {what}, {given} were given"),
                ));
            }
        }
        for (buffer, desc) in inputs
            .iter()
            .map(|b| b.size())
            .zip(&self.inputs)
            .chain(outputs.iter().map(|b| b.size()).zip(&self.outputs))
        {
            if buffer < desc.size {
                return Err(AclError::local(
                    "aclmdlExecute",
                    format!(
                        "buffer for `{}` has {buffer} bytes, the model needs {}",
                        desc.name, desc.size
                    ),
                ));
            }
        }
        let ins: Vec<(*mut c_void, usize)> =
            inputs.iter().map(|b| (b.as_ptr(), b.size())).collect();
        let outs: Vec<(*mut c_void, usize)> =
            outputs.iter().map(|b| (b.as_ptr(), b.size())).collect();
        Ok(IoBinding {
            model_id: self.id,
            inputs: Dataset::new(&self.acl, &ins)?,
            outputs: Dataset::new(&self.acl, &outs)?,
        })
    }

    /// Runs the model synchronously on a binding made by [`Model::bind`].
    pub fn execute_bound(&self, binding: &IoBinding) -> Result<(), AclError> {
        if binding.model_id != self.id {
            return Err(AclError::local(
                "aclmdlExecute",
                format!(
                    "the datasets were bound for model {}, not {}",
                    binding.model_id, self.id
                ),
            ));
        }
        let api = self.acl.api();
        // SAFETY: the model is loaded; both datasets are live and, by bind's
        // contract, reference live device buffers of the declared sizes.
        api.check("aclmdlExecute", unsafe {
            (api.execute)(self.id, binding.inputs.ptr, binding.outputs.ptr)
        })
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        let api = self.acl.api();
        // SAFETY: destroyed once, description before the model.
        unsafe {
            if !self.desc.is_null() {
                (api.destroy_desc)(self.desc);
            }
            (api.unload)(self.id);
        }
    }
}
