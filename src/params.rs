//! A module's parameters as plain values and as bytes: what checkpoints, multi-process checks and
//! the EMA need from any burn module, independent of how it is trained; and pretrained weights
//! files (safetensors, f32/f16/bf16) read by name, for the loaders that map them onto our modules.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::{BurnpackStore, ModuleSnapshot};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::config::one_line;
use crate::error::{Error, Result};

/// Every float parameter of `module`, flattened in visiting order (for checksums and comparisons).
pub fn param_values<M: Module>(module: &M) -> Vec<f32> {
    let mut collect = CollectParams(Vec::new());
    module.visit(&mut collect);
    collect
        .0
        .into_iter()
        .flat_map(|t| t.try_into_vec_as::<f32>().expect("f32 readback"))
        .collect()
}

/// Collects every float parameter of a module, flattened, in visiting order.
pub(crate) struct CollectParams(pub Vec<Tensor<1>>);

impl ModuleVisitor for CollectParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().inner().reshape([-1]));
    }
}

/// A module's parameters in burn's burnpack format (with parameter ids).
pub fn module_bytes<M: Module>(module: &M) -> Result<Vec<u8>> {
    let mut store = BurnpackStore::from_bytes(None);
    let bad = |e: String| Error::Checkpoint {
        path: PathBuf::from("<weights>"),
        msg: format!("could not serialise: {e}"),
    };
    module
        .save_into(&mut store)
        .map_err(|e| bad(e.to_string()))?;
    Ok(store.get_bytes().map_err(|e| bad(e.to_string()))?.to_vec())
}

/// Loads `bytes` written by [`module_bytes`] for the same architecture into `module`; `what`
/// names the state in errors.
pub fn load_module_bytes<M: Module>(module: &mut M, bytes: &[u8], what: &str) -> Result<()> {
    let mut store =
        BurnpackStore::from_bytes(Some(burn::tensor::Bytes::from_bytes_vec(bytes.to_vec())));
    let applied = module
        .load_from(&mut store)
        .map_err(|e| Error::Checkpoint {
            path: PathBuf::from(format!("<{what}>")),
            msg: format!("unreadable ({})", one_line(&e.to_string())),
        })?;
    if !applied.errors.is_empty() || !applied.missing.is_empty() {
        return Err(Error::Checkpoint {
            path: PathBuf::from(format!("<{what}>")),
            msg: format!(
                "does not match this network ({} missing, {} mismatched tensors)",
                applied.missing.len(),
                applied.errors.len()
            ),
        });
    }
    Ok(())
}

/// A tensor read from a weights file as f32.
pub struct Loaded {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every tensor of a safetensors weights file (f32, f16 or bf16) as f32, by name.
pub fn read_all(path: &Path) -> Result<BTreeMap<String, Loaded>> {
    read_matching(path, |_| true)
}

/// The tensors of a safetensors weights file whose names pass `keep`, as f32, by name; the others
/// are neither converted nor checked (e.g. integer batch-norm counters).
pub fn read_matching(path: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, Loaded>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(path, "check the path of the weights file", e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::input(path, format!("not a readable safetensors file ({e})")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if !keep(&name) {
            continue;
        }
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::input(
                    path,
                    format!("tensor {name} has dtype {other:?}; weights must be f32, f16 or bf16"),
                ));
            }
        };
        out.insert(
            name,
            Loaded {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}
