//! Stage 1 of the ImageNet recipe (METHOD.md section 6): a flow prior trained on target features.
//!
//! [`config`] holds the run's settings as data, [`data`] turns a feature table into projected,
//! scaled rows, [`run`] is the training loop with its metrics and resume (its folder is
//! [`crate::checkpoint`]'s), and [`eval`] the checks of a trained prior.

pub mod config;
pub mod data;
pub mod eval;
pub mod run;

pub use config::{FeaturePriorConfig, PriorPreset};
pub use run::{Metrics, PriorRun, Summary};
