//! flowalign: aligning latent spaces with flow priors (Li et al., arXiv 2506.05240).
//!
//! The engine: a flow-matching prior ([`flow`]), the alignment loss and its bound ([`align`]),
//! training steps ([`train`]), the 2D toy experiment ([`toy`]) with its reports ([`report`]), and the
//! desktop visualizer ([`gui`], cargo feature `gui`).
//! `../shared/SPEC.md` in the project tree defines every formula; doc comments cite its sections.

pub mod ae;
pub mod align;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod error;
pub mod features;
pub mod flow;
#[cfg(feature = "gui")]
pub mod gui;
pub mod metrics;
pub mod precision;
pub mod prior;
pub mod report;
pub mod rng;
pub mod stats;
pub mod toy;
pub mod train;

pub use error::{Error, Result};
