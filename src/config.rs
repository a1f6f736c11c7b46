//! Validation shared by every run config (the toy's, the prior's, the autoencoder's, the
//! generator's): each check names the offending key as it is written in the TOML file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads a `what` config (e.g. "toy") from the TOML file `path` and checks it with `validate`;
/// unknown keys, malformed values and invalid settings are errors naming the file.
pub fn read_toml<C: DeserializeOwned>(
    path: &Path,
    what: &str,
    validate: impl FnOnce(&C) -> Result<()>,
) -> Result<C> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "check the config file's path", e))?;
    let cfg: C = toml::from_str(&text).map_err(|e| {
        Error::input(
            path,
            format!("not a valid {what} config: {}", one_line(&e.to_string())),
        )
    })?;
    validate(&cfg).map_err(|e| Error::input(path, e.to_string()))?;
    Ok(cfg)
}

/// Fails naming the first key whose count is 0.
pub fn require_counts(counts: &[(&str, usize)]) -> Result<()> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(Error::setting(*key, "must be at least 1, got 0")),
        None => Ok(()),
    }
}

/// Fails naming the first key whose value is not a finite positive number.
pub fn require_positive(values: &[(&str, f64)]) -> Result<()> {
    match values.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        Some((key, v)) => Err(Error::setting(
            *key,
            format!("must be a positive number, got {v}"),
        )),
        None => Ok(()),
    }
}

/// Folds a multi-line parser message into one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
