//! flowalign: aligning latent spaces with flow priors (Li et al., arXiv 2506.05240).
//!
//! The engine, layered bottom to top (each layer imports only from those below it; ARCHITECTURE.md
//! draws the picture and `tests/layers.rs` checks it):
//! - [`error`], [`rng`], [`stats`], [`grid`], [`config`], [`closed_form`]: plain types, helpers and
//!   the Gaussian closed forms of METHOD.md section 3; [`fused`]: the velocity network's fused CPU
//!   operations and a one-pass Adam;
//! - [`flow`] (the velocity network, the path, ODE solvers, the exact likelihood), [`params`],
//!   [`features`], [`report`] (figures and files from plain data), [`backend`];
//! - [`precision`], [`dist`] (MPI), [`align`] (the alignment loss, its heatmap, the estimate the paper calls a bound);
//! - [`train`] (one trainer for every module, its optimiser, EMA and state);
//! - [`checkpoint`] and [`run`] (the harness every long run goes through);
//! - the stages: [`toy`] (the 2D experiment), [`prior`] (stage 1), [`ae`] (stage 2),
//!   [`generator`] (stage 3);
//! - the desktop visualizer [`gui`] (cargo feature `gui`).
//!
//! METHOD.md in the repository states every formula, constant and recipe; doc comments cite its
//! sections.

pub mod ae;
pub mod align;
pub mod backend;
pub mod checkpoint;
pub mod closed_form;
pub mod config;
pub mod dist;
pub mod error;
pub mod features;
pub mod files;
pub mod flow;
pub mod fused;
pub mod generator;
pub mod grid;
#[cfg(feature = "gui")]
pub mod gui;
pub mod hub;
pub mod metrics;
pub mod params;
pub mod precision;
pub mod prior;
pub mod report;
pub mod rng;
pub mod run;
pub mod stats;
pub mod toy;
pub mod train;

pub use error::{Error, Result};
