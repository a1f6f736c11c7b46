//! A frozen velocity network on disk: `prior.safetensors` beside `prior.toml`, the file every
//! front-end saves a trained prior as and loads it from (the toy, `prior train`, the autoencoder).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use super::{VelocityMlp, VelocityMlpConfig};
use crate::config::one_line;
use crate::error::{Error, Result};
use crate::files::write_atomic;

/// What a prior checkpoint's TOML says about the network and its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorMeta {
    /// Data dimension d.
    pub dim: usize,
    /// Hidden width C.
    pub width: usize,
    /// Residual blocks.
    pub depth: usize,
    /// Target the prior was trained on.
    pub target: String,
    /// Normalisation scale of that target.
    pub scale: f32,
    /// Training steps taken.
    pub steps: usize,
    /// Seed of the run.
    pub seed: u64,
}

/// The weights and metadata file names of a prior checkpoint in folder `dir`.
pub fn prior_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("prior.safetensors"), dir.join("prior.toml"))
}

/// Saves `model` and `meta` atomically as `prior.safetensors` and `prior.toml` in `dir`.
pub fn save_prior(dir: &Path, model: &VelocityMlp, meta: &PriorMeta) -> Result<()> {
    let (weights, meta_path) = prior_paths(dir);
    let mut store = SafetensorsStore::from_bytes(None);
    model.save_into(&mut store).map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        msg: format!("could not serialise: {e}"),
    })?;
    let bytes = store.get_bytes().map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        msg: format!("could not serialise: {e}"),
    })?;
    write_atomic(&weights, &bytes)?;
    let text = toml::to_string_pretty(meta).expect("PriorMeta serialises");
    write_atomic(&meta_path, text.as_bytes())
}

/// Loads a prior saved by [`save_prior`]; `path` is its folder or its `.safetensors` file.
pub fn load_prior(path: &Path, device: &Device) -> Result<(VelocityMlp, PriorMeta)> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let (weights, meta_path) = if path.is_dir() {
        prior_paths(&dir)
    } else {
        (path.to_path_buf(), path.with_extension("toml"))
    };
    let bad = |p: &Path, msg: String| Error::Checkpoint {
        path: p.to_path_buf(),
        msg,
    };
    if !weights.is_file() {
        return Err(bad(
            &weights,
            "not found; give the folder of a run that trained a prior (it holds prior.safetensors)"
                .into(),
        ));
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| {
        bad(
            &meta_path,
            format!("{e}; the prior's metadata must sit next to its weights"),
        )
    })?;
    let meta: PriorMeta = toml::from_str(&text).map_err(|e| {
        bad(
            &meta_path,
            format!("malformed metadata: {}", one_line(&e.to_string())),
        )
    })?;
    let bytes = std::fs::read(&weights).map_err(|e| bad(&weights, e.to_string()))?;
    let mut rng = crate::rng::rng_for(0, crate::rng::Stream::Init, 0);
    let mut model = VelocityMlpConfig::new(meta.dim, meta.width, meta.depth).init(&mut rng, device);
    let mut store = SafetensorsStore::from_bytes(Some(bytes)).validate(true);
    let applied = model.load_from(&mut store).map_err(|e| {
        bad(
            &weights,
            format!(
                "unreadable or truncated ({}); retrain the prior or restore the file",
                one_line(&e.to_string())
            ),
        )
    })?;
    if !applied.errors.is_empty() || !applied.missing.is_empty() {
        return Err(bad(
            &weights,
            format!(
                "does not match the {}x{} network in {} ({} missing, {} mismatched tensors); retrain the prior",
                meta.width,
                meta.depth,
                meta_path.display(),
                applied.missing.len(),
                applied.errors.len()
            ),
        ));
    }
    Ok((model, meta))
}
