//! The 2D toy experiment of METHOD.md section 5 (paper Fig. 3, 5 and 6): its config, targets,
//! densities, the step-at-a-time session both front-ends drive, its evaluation and figures.

pub mod config;
pub mod density;
pub mod events;
pub mod experiment;
pub mod figures;
pub mod session;
pub mod targets;

pub use config::{
    AlignConfig, EvalConfig, LatentInit, Plateau, Preset, PriorConfig, ToyConfig, View,
};
pub use density::Density;
pub use experiment::{ToyOutcome, ToyRun};
pub use session::{Curves, Event, SessionStage, ToySession};
pub use targets::{Target, TargetKind};
