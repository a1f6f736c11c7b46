//! Stage 3 of METHOD.md section 7: the generator trained on the aligned latents — MAR-B with a
//! flow head (the paper's), or a DiT over the same tokens (a common alternative, not the paper's).
//!
//! The pure parts: architectures ([`mar`], [`head`], [`dit`], [`block`]), masks and schedules
//! ([`masking`]), the loss of a batch given its seeded draws ([`loss`]), the optimiser with MAR's
//! weight-decay groups ([`optim`]), generation ([`sample`]) and the run's config ([`config`]).
//!
//! Time convention of every generator here: **t = 1 is noise, t = 0 is data** (the reverse of the
//! prior's): `x_t = (1 - t) x + t noise`, velocity target `noise - x`, sampling by Euler from t = 1
//! to t = 0.

pub mod block;
pub mod config;
pub mod dit;
pub mod head;
pub mod loss;
pub mod mar;
pub mod masking;
pub mod optim;
pub mod sample;

use burn::prelude::*;

pub use config::{Arch, GenConfig, GenPreset};
pub use loss::{GenBatch, GenDraws, gen_loss};
pub use optim::gen_optimizer;
pub use sample::{SampleOptions, generate};

/// Either generator, as one module type a trainer can hold.
#[derive(Module, Debug)]
pub enum Generator {
    /// MAR with the flow head (the paper's).
    Mar(mar::MarGenerator),
    /// The DiT over the tokens.
    Dit(dit::Dit),
}

impl Generator {
    /// Which architecture this is.
    pub fn arch(&self) -> Arch {
        match self {
            Generator::Mar(_) => Arch::Mar,
            Generator::Dit(_) => Arch::Dit,
        }
    }
}
