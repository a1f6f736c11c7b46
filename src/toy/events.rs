//! What a toy session reports, as plain data: its events and the loss curves recorded from them,
//! the one source of `curves.csv` for the CLI and the window alike.

use std::path::Path;

use serde::Serialize;

use super::config::AlignConfig;
use crate::error::Result;
use crate::files::write_csv;
use crate::grid::Point;

/// What one step of a session did, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A prior training step finished.
    PriorStep { step: usize, loss: f32, lr: f64 },
    /// The prior was frozen and alignment starts from `latents` with the settings `align`; `nll`
    /// is their mean NLL under the target.
    AlignStart {
        prior_step: usize,
        latents: Vec<Point>,
        nll: f32,
        align: AlignConfig,
    },
    /// An alignment step finished; `nll` is the mean NLL of y after it.
    AlignStep {
        step: usize,
        loss: f32,
        nll: f32,
        latents: Vec<Point>,
    },
    /// The alignment budget is spent.
    Done,
}

/// The loss curves of a session, recorded from its events: the one source of `curves.csv`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Curves {
    /// `(step, flow-matching loss, learning rate)` of every prior step.
    pub prior: Vec<(usize, f32, f64)>,
    /// `(step, L_align)` of every alignment step.
    pub align: Vec<(usize, f32)>,
    /// `(step, mean NLL of y)`; step 0 holds the initial latents.
    pub nll: Vec<(usize, f32)>,
}

impl Curves {
    /// Adds what `event` measured; a new alignment start begins the alignment curves afresh.
    pub fn record(&mut self, event: &Event) {
        match event {
            Event::PriorStep { step, loss, lr } => self.prior.push((*step, *loss, *lr)),
            Event::AlignStart { nll, .. } => {
                self.align.clear();
                self.nll = vec![(0, *nll)];
            }
            Event::AlignStep {
                step, loss, nll, ..
            } => {
                self.align.push((*step, *loss));
                self.nll.push((*step, *nll));
            }
            Event::Done => {}
        }
    }

    /// Writes `curves.csv`: `stage, step, loss, nll_y`, one row per prior step, then one per
    /// alignment step from step 0 (the initial latents, with no loss).
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        let prior = self.prior.iter().map(|&(step, loss, _)| {
            vec![
                "prior".into(),
                step.to_string(),
                loss.to_string(),
                String::new(),
            ]
        });
        let align = self.nll.iter().map(|&(step, nll)| {
            let loss = self
                .align
                .iter()
                .find(|a| a.0 == step)
                .map_or(String::new(), |a| a.1.to_string());
            vec!["align".into(), step.to_string(), loss, nll.to_string()]
        });
        write_csv(
            path,
            &["stage", "step", "loss", "nll_y"],
            prior.chain(align),
        )
    }
}
