//! The 2D toy experiment of SPEC section 5 (paper Fig. 3, 5 and 6): targets, densities and the driver.

pub mod density;
pub mod experiment;
pub mod figures;
pub mod targets;

pub use density::Density;
pub use experiment::{Event, ToyOutcome, ToyRun};
pub use targets::{Point, Target, TargetKind};
