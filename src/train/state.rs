//! A trainer's complete state as bytes, and how every rank of a multi-process run takes rank 0's.

use crate::dist::Comm;
use crate::error::{Error, Result};

/// A trainer's complete state, as bytes (see [`super::Trainer::state_bytes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    /// Steps taken.
    pub step: usize,
    /// Live weights (burnpack).
    pub model: Vec<u8>,
    /// EMA weights (burnpack), when an EMA is kept.
    pub ema: Option<Vec<u8>>,
    /// Optimiser moments (burnpack).
    pub optim: Vec<u8>,
}

impl TrainerState {
    /// Rank 0's trainer state on every rank (the others pass `None`): how a run starts from the same
    /// weights everywhere, new or resumed, with only rank 0 reading the run folder.
    pub fn share(comm: &Comm, state: Option<TrainerState>) -> Result<TrainerState> {
        let mut head = Vec::new();
        if let Some(s) = &state {
            head.extend_from_slice(&(s.step as u64).to_le_bytes());
            head.push(u8::from(s.ema.is_some()));
        }
        let head = comm.broadcast(head, "trainer state")?;
        let (step, has_ema) = match head.as_slice() {
            [s @ .., e] if s.len() == 8 => (
                u64::from_le_bytes(s.try_into().unwrap_or_default()) as usize,
                *e == 1,
            ),
            _ => {
                return Err(Error::Distributed(
                    "rank 0 sent a malformed trainer state".into(),
                ));
            }
        };
        let (model, ema, optim) = match state {
            Some(s) => (s.model, s.ema.unwrap_or_default(), s.optim),
            None => Default::default(),
        };
        let model = comm.broadcast(model, "initial weights")?;
        let ema = if has_ema {
            Some(comm.broadcast(ema, "initial EMA weights")?)
        } else {
            None
        };
        let optim = comm.broadcast(optim, "optimiser state")?;
        Ok(TrainerState {
            step,
            model,
            ema,
            optim,
        })
    }
}
