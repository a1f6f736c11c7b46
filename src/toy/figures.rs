//! The toy's figures and tables (paper Fig. 3, 5, 6), built from a [`ToyOutcome`]'s plain data.

use std::path::Path;

use plotters::prelude::*;

use super::experiment::ToyOutcome;
use crate::error::Result;
use crate::files::{write_csv, write_json};
use crate::report::{
    Overlay, arrows_panel, curves_panel, heatmap_panel, save_png, scatter_panel, with_footer,
};
use crate::stats::moving_average;

/// Window of the L_align moving average (METHOD.md section 5).
pub const SMOOTHING_WINDOW: usize = 17;

const TARGET_DOTS: RGBColor = RGBColor(235, 235, 235);
const LATENT_DOTS: RGBColor = RGBColor(230, 40, 40);

/// Draws one Fig. 3 row (NLL + y, L_align, curves) into three areas.
fn figure3_row(
    areas: &[plotters::drawing::DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>],
    o: &ToyOutcome,
) -> Result<()> {
    let s = &o.summary;
    let y_final = &o.snapshots.last().expect("at least the initial snapshot").1;
    // Every k-th sample: some samplers fill components in order (moons halves, rings).
    let stride = o.target_samples.len().div_ceil(1500).max(1);
    let targets: Vec<_> = o.target_samples.iter().step_by(stride).copied().collect();
    let targets = &targets[..];
    heatmap_panel(
        &areas[0],
        &format!("{}: NLL, y after {} steps", s.target, s.align.steps),
        &o.nll_map,
        &[
            Overlay {
                points: targets,
                colour: TARGET_DOTS,
                radius: 1,
            },
            Overlay {
                points: y_final,
                colour: LATENT_DOTS,
                radius: 2,
            },
        ],
    )?;
    heatmap_panel(
        &areas[1],
        &format!(
            "L_align (Pearson {:.3}, Spearman {:.3})",
            s.heatmap.pearson, s.heatmap.spearman
        ),
        &o.align_map,
        &[Overlay {
            points: targets,
            colour: TARGET_DOTS,
            radius: 1,
        }],
    )?;
    let losses: Vec<f32> = o.curves.align.iter().map(|a| a.1).collect();
    let smooth = moving_average(&losses, SMOOTHING_WINDOW);
    curves_panel(&areas[2], "L_align and NLL of y", &smooth, &o.curves.nll)
}

/// `figure.png`: the paper's Fig. 3 layout for one target.
///
/// The run's budget (network, steps, learning rates) is written under it.
pub fn figure3(path: &Path, o: &ToyOutcome) -> Result<()> {
    save_png(path, (1650, 530), |root| {
        let main = with_footer(root, &o.summary.budget, FOOTER)?;
        let areas = main.split_evenly((1, 3));
        figure3_row(&areas, o)
    })
}

/// Height of the budget line under a figure.
const FOOTER: u32 = 30;

/// `figure5.png`: one Fig. 3 row per target (the paper's Fig. 5), the budget under it.
pub fn figure5(path: &Path, outcomes: &[ToyOutcome]) -> Result<()> {
    save_png(path, (1650, 480 * outcomes.len() as u32 + FOOTER), |root| {
        let budget = outcomes.first().map_or("", |o| o.summary.budget.as_str());
        let main = with_footer(root, budget, FOOTER)?;
        let areas = main.split_evenly((outcomes.len(), 3));
        for (row, o) in outcomes.iter().enumerate() {
            figure3_row(&areas[row * 3..row * 3 + 3], o)?;
        }
        Ok(())
    })
}

/// `trajectories.png`: 10 snapshots of y over the NLL heatmap (the paper's Fig. 6).
pub fn trajectories(path: &Path, o: &ToyOutcome) -> Result<()> {
    save_png(path, (2250, 860), |root| {
        let areas = root.split_evenly((2, 5));
        for (area, (step, y)) in areas.iter().zip(&o.snapshots) {
            heatmap_panel(
                area,
                &format!("step {step}"),
                &o.nll_map,
                &[Overlay {
                    points: y,
                    colour: LATENT_DOTS,
                    radius: 2,
                }],
            )?;
        }
        Ok(())
    })
}

/// `velocity.png`: the prior's velocity field at t = 0.1, 0.3, 0.5, 0.7, 0.9.
pub fn velocity(path: &Path, o: &ToyOutcome) -> Result<()> {
    let r = o.nll_map.extent();
    let cell = (r.0.1 - r.0.0) / 24.0;
    save_png(path, (2250, 470), |root| {
        let areas = root.split_evenly((1, o.velocity.len()));
        for (area, (t, arrows)) in areas.iter().zip(&o.velocity) {
            arrows_panel(area, &format!("v(z, t = {t:.1})"), r, arrows, cell)?;
        }
        Ok(())
    })
}

/// `samples.png`: data samples next to prior samples from the Euler ODE.
pub fn samples(path: &Path, o: &ToyOutcome) -> Result<()> {
    let r = o.nll_map.extent();
    let s = &o.summary.prior;
    save_png(path, (1000, 500), |root| {
        let areas = root.split_evenly((1, 2));
        scatter_panel(
            &areas[0],
            &format!("data (NLL {:.3})", s.data_nll),
            r,
            &o.data_samples,
            RGBColor(31, 119, 180),
        )?;
        scatter_panel(
            &areas[1],
            &format!("prior samples, Euler 100 (NLL {:.3})", s.sample_nll),
            r,
            &o.prior_samples,
            RGBColor(255, 127, 14),
        )
    })
}

/// `heatmaps.csv`: the grid with the NLL and L_align at each point.
pub fn heatmaps_csv(path: &Path, o: &ToyOutcome) -> Result<()> {
    let (nll, al) = (&o.nll_map, &o.align_map);
    let nx = nll.xs.len();
    let rows = (0..nll.values.len()).map(|i| {
        vec![
            nll.xs[i % nx].to_string(),
            nll.ys[i / nx].to_string(),
            nll.values[i].to_string(),
            al.values[i].to_string(),
        ]
    });
    write_csv(path, &["x", "y", "nll", "l_align"], rows)
}

/// Writes every output of one run into `dir`.
pub fn write_all(dir: &Path, o: &ToyOutcome) -> Result<()> {
    write_json(&dir.join("summary.json"), &o.summary)?;
    o.curves.write_csv(&dir.join("curves.csv"))?;
    heatmaps_csv(&dir.join("heatmaps.csv"), o)?;
    figure3(&dir.join("figure.png"), o)?;
    trajectories(&dir.join("trajectories.png"), o)?;
    velocity(&dir.join("velocity.png"), o)?;
    samples(&dir.join("samples.png"), o)
}
