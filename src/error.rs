//! The library's error type: every variant says what kind of failure it is and names the input at
//! fault; the front-ends add their own hints (the CLI its flags, the window its controls).

use std::path::PathBuf;

/// Errors raised by the flowalign engine.
///
/// Each message is one line that names the problem and, where the library knows it, the fix in
/// the library's own terms (a setting's key as written in a TOML config, such as `train.batch`).
/// [`Error::setting`] gives that key to a front-end that wants to translate it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range or inconsistent; `key` is its name in the TOML config.
    #[error("{key}: {msg}")]
    Setting { key: String, msg: String },
    /// A user-supplied data file could not be used; `setting` names the setting that would
    /// accept it, where one exists.
    #[error("{path}: {msg}")]
    Input {
        path: PathBuf,
        msg: String,
        setting: Option<&'static str>,
    },
    /// A model named by its hub id (`hf:ORG/NAME...`) is not in the local Hugging Face cache, or
    /// the id is malformed.
    #[error("{id}: {msg}")]
    Hub { id: String, msg: String },
    /// A file could not be read or written.
    #[error("{path}: {source} ({hint})")]
    Io {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or a saved model is missing, truncated or does not match the requested model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A new run was asked for in a folder that already holds one.
    #[error("{} already holds a run (checkpoint at step {step})", dir.display())]
    RunExists { dir: PathBuf, step: usize },
    /// A run was to be resumed from a folder that holds none.
    #[error("{} holds no run to resume", dir.display())]
    NoRun { dir: PathBuf },
    /// A resumed run asks for a setting that differs from the one its checkpoint was trained with.
    #[error("resuming: {key} is {now} but the checkpoint was trained with {saved}")]
    ResumeMismatch {
        key: String,
        now: String,
        saved: String,
    },
    /// Training produced a non-finite or exploding loss.
    #[error(
        "{stage} diverged at step {step}: loss is {loss} (not finite, or above 1e6); lower the learning rate (now {lr})"
    )]
    Diverged {
        stage: &'static str,
        step: usize,
        loss: f32,
        lr: f64,
    },
    /// The device ran out of memory during a step of `batch` items.
    #[error("out of memory at {what}; a smaller batch (e.g. {}) fits in less", (batch / 2).max(1))]
    OutOfMemory { what: String, batch: usize },
    /// A numerical computation met non-finite values or did not converge.
    #[error("{0}")]
    Numeric(String),
    /// A metric cannot be computed from the samples given (too few of them for its estimator).
    #[error("{0}")]
    Metric(String),
    /// The backend could not provide the requested device.
    #[error("device: {0}")]
    Device(String),
    /// A multi-process (MPI) run could not start or went out of step.
    #[error("distributed: {0}")]
    Distributed(String),
    /// The visualizer could not open its window.
    #[error("{0}")]
    Display(String),
    /// A figure could not be drawn or encoded.
    #[error("could not draw a figure: {0}")]
    Figure(String),
    /// A helper thread (an image loader, a worker) stopped before its owner did.
    #[error("the {0} stopped unexpectedly")]
    Stopped(&'static str),
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
            setting: None,
        }
    }

    /// An input-file error that the setting `key` would resolve (named in `msg` too).
    pub fn input_fixed_by(
        path: impl Into<PathBuf>,
        msg: impl Into<String>,
        key: &'static str,
    ) -> Self {
        Error::Input {
            path: path.into(),
            msg: msg.into(),
            setting: Some(key),
        }
    }

    /// A setting error.
    pub fn setting(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Setting {
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// The setting (its TOML key) whose change would fix this error, when there is one.
    pub fn setting_key(&self) -> Option<&str> {
        match self {
            Error::Setting { key, .. } | Error::ResumeMismatch { key, .. } => Some(key),
            Error::Input { setting, .. } => *setting,
            _ => None,
        }
    }
}
