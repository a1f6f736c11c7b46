//! The prior's training rows: a feature table scaled, projected (METHOD.md section 6) and split.

use burn::prelude::*;
use rand::RngExt;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::config::DataConfig;
use crate::error::{Error, Result};
use crate::features::projection::Projection;
use crate::features::{FeatureTable, NonFinite, load, resolve_spec};
use crate::rng::{Rng, Stream, rng_for};

/// What was read, so a resumed or evaluated run can check it sees the same table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableInfo {
    /// Rows after dropping non-finite ones.
    pub rows: usize,
    /// The feature dimension d2.
    pub cols: usize,
    /// The standard deviation of the raw table.
    pub std: f64,
    /// The factor the table was multiplied by.
    pub scale: f64,
}

/// Projected, scaled feature rows split into training and held-out rows.
#[derive(Debug, Clone)]
pub struct PriorData {
    pub info: TableInfo,
    pub projection: Projection,
    /// `[rows - holdout, latent_dim]`
    pub train: FeatureTable,
    /// `[holdout, latent_dim]`
    pub holdout: FeatureTable,
}

impl PriorData {
    /// Loads `cfg.features`, scales it, fits and applies the projection, and holds out
    /// `cfg.holdout` rows (at most a tenth) chosen by `split_seed`.
    pub fn prepare(cfg: &DataConfig, split_seed: u64, device: &Device) -> Result<PriorData> {
        let (info, projection, projected) = project_table(cfg, device)?;
        let (path, _) = resolve_spec(&cfg.features)?;
        let holdout = cfg.holdout.min(projected.rows / 10);
        if projected.rows - holdout < 2 {
            return Err(Error::input(
                &path,
                format!(
                    "{} rows are too few to train a prior; give a larger table",
                    projected.rows
                ),
            ));
        }
        let (train, holdout) = split(&projected, holdout, split_seed);
        Ok(PriorData {
            info,
            projection,
            train,
            holdout,
        })
    }

    /// The latent dimension d1.
    pub fn dim(&self) -> usize {
        self.train.cols
    }

    /// `batch` training rows drawn uniformly with replacement, flat.
    pub fn batch(&self, batch: usize, rng: &mut Rng) -> Vec<f32> {
        let d = self.train.cols;
        let mut out = Vec::with_capacity(batch * d);
        for _ in 0..batch {
            let i = rng.random_range(0..self.train.rows);
            out.extend_from_slice(&self.train.data[i * d..(i + 1) * d]);
        }
        out
    }
}

/// The table `cfg.features` scaled (by `cfg.scale`, or 1/std: METHOD.md section 2) and mapped to
/// `cfg.latent_dim` by the fitted projection: the prior's rows before any split, with what was read.
pub fn project_table(
    cfg: &DataConfig,
    device: &Device,
) -> Result<(TableInfo, Projection, FeatureTable)> {
    let (path, tensor) = resolve_spec(&cfg.features)?;
    let non_finite = if cfg.drop_nonfinite {
        NonFinite::Drop
    } else {
        NonFinite::Refuse
    };
    let mut table = load(&path, tensor.as_deref(), non_finite)?;
    let std = table.std();
    let scale = match cfg.scale {
        Some(s) => s,
        None if std > 0.0 => 1.0 / std,
        None => {
            return Err(Error::input_fixed_by(
                &path,
                "every feature value is the same (std 0); give the scale explicitly (data.scale)",
                "data.scale",
            ));
        }
    };
    table.scale(scale as f32);
    let projection = Projection::fit(
        cfg.projection,
        &table,
        cfg.latent_dim,
        cfg.projection_seed,
        device,
    )?;
    let projected = projection.apply(&table, device)?;
    let info = TableInfo {
        rows: table.rows,
        cols: table.cols,
        std,
        scale,
    };
    Ok((info, projection, projected))
}

/// Splits `table` into (the rest, `n` held-out rows) by a seeded permutation.
fn split(table: &FeatureTable, n: usize, seed: u64) -> (FeatureTable, FeatureTable) {
    let mut order: Vec<usize> = (0..table.rows).collect();
    order.shuffle(&mut rng_for(seed, Stream::Reference, 0));
    let (held, rest) = order.split_at(n);
    let gather = |idx: &[usize]| {
        let mut rows: Vec<usize> = idx.to_vec();
        rows.sort_unstable();
        FeatureTable {
            rows: rows.len(),
            cols: table.cols,
            data: rows.iter().flat_map(|&i| table.row(i)).copied().collect(),
        }
    };
    (gather(rest), gather(held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let table = FeatureTable {
            rows: 100,
            cols: 1,
            data: (0..100).map(|i| i as f32).collect(),
        };
        let (a, b) = split(&table, 10, 3);
        assert_eq!((a.rows, b.rows), (90, 10));
        let mut all: Vec<f32> = a.data.iter().chain(&b.data).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, table.data);
        assert_eq!(split(&table, 10, 3).1, b);
        assert_ne!(split(&table, 10, 4).1, b);
    }
}
