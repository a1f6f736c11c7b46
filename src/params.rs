//! A module's parameters as plain values and as bytes: what checkpoints, multi-process checks and
//! the EMA need from any burn module, independent of how it is trained.

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::{BurnpackStore, ModuleSnapshot};

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
