//! The library's error type: every variant names the input at fault and how to fix it.

use std::path::PathBuf;

/// Errors raised by the flowalign engine.
///
/// Each message is one line that names the problem and the fix, so the CLI can print it as-is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Config(String),
    /// A user-supplied data file could not be used.
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    /// A file could not be read or written.
    #[error("{path}: {source} ({hint})")]
    Io {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint is missing, truncated or does not match the requested model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// Training produced a non-finite loss.
    #[error(
        "{stage} diverged at step {step}: loss is {loss} (not finite, or above 1e6); lower the learning rate (now {lr})"
    )]
    Diverged {
        stage: &'static str,
        step: usize,
        loss: f32,
        lr: f64,
    },
    /// A numerical computation met non-finite values or did not converge.
    #[error("{0}")]
    Numeric(String),
    /// The backend could not provide the requested device.
    #[error("device: {0}")]
    Device(String),
    /// A multi-process (MPI) run could not start or went out of step.
    #[error("distributed: {0}")]
    Distributed(String),
    /// The visualizer could not open its window.
    #[error("{0}")]
    Display(String),
    /// A run was cancelled by its owner (e.g. the GUI reset it).
    #[error("cancelled")]
    Cancelled,
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns and a hint for the user.
    pub fn io(path: impl Into<PathBuf>, hint: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            hint,
            source,
        }
    }

    /// An input-file error.
    pub fn input(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
