//! A short end-to-end toy run through the library: the prior learns, alignment lowers the NLL of the
//! latents, and the L_align landscape mirrors the NLL landscape.

use std::ops::ControlFlow;
use std::sync::Arc;

use burn::prelude::*;
use flowalign::toy::{Event, TargetKind, ToyRun};
use flowalign::toy::{Preset, ToyConfig};
use flowalign::train::Schedule;

#[test]
fn short_mog_run_aligns_latents_and_heatmaps_agree() {
    let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
    cfg.prior.width = 64;
    cfg.prior.depth = 2;
    cfg.prior.steps = 800;
    cfg.prior.schedule = Schedule::Cosine {
        warmup: 50,
        final_frac: 0.05,
    };
    cfg.align.steps = 300;
    cfg.align.n_latents = 500;
    cfg.eval.t_values = 10;
    cfg.eval.bound_points = 50;
    cfg.eval.bound_draws = 64;
    cfg.eval.likelihood_steps = 20;
    let run = Arc::new(ToyRun::new(cfg, Device::flex(), "cpu").unwrap());
    let mut prior_losses = Vec::new();
    let outcome = run
        .run(None, &mut |e| {
            if let Event::PriorStep { loss, .. } = e {
                prior_losses.push(*loss);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    let s = &outcome.summary;
    let head: f32 = prior_losses[..50].iter().sum::<f32>() / 50.0;
    let tail: f32 = prior_losses[prior_losses.len() - 50..].iter().sum::<f32>() / 50.0;
    assert!(tail < 0.8 * head, "prior loss {head} -> {tail}");
    assert!(
        s.align.nll_final < s.align.nll_init - 3.0,
        "NLL {} -> {}",
        s.align.nll_init,
        s.align.nll_final
    );
    assert!(s.heatmap.pearson > 0.8, "Pearson {}", s.heatmap.pearson);
    assert!(s.heatmap.spearman > 0.8, "Spearman {}", s.heatmap.spearman);
    assert!(
        (s.prior.sample_nll - s.prior.data_nll).abs() < 1.0,
        "sample NLL {} vs data {}",
        s.prior.sample_nll,
        s.prior.data_nll
    );
    // The estimate with its base term sits below the exact log-likelihood on average over the
    // latents (METHOD.md section 3: it holds on average, not pointwise).
    let e = &s.estimate;
    assert!(
        e.with_base_term.mean < e.mean_log_p && e.with_base_term.mean_gap > 0.0,
        "{} vs {}",
        e.with_base_term.mean,
        e.mean_log_p
    );
    assert!((e.with_base_term.mean_gap - (e.mean_log_p - e.with_base_term.mean)).abs() < 1e-9);
}

#[test]
fn a_run_can_be_cancelled_between_steps() {
    let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Grid);
    cfg.prior.width = 16;
    cfg.prior.depth = 1;
    let run = Arc::new(ToyRun::new(cfg, Device::flex(), "cpu").unwrap());
    let mut seen = 0;
    let err = run
        .run(None, &mut |e| {
            if matches!(e, Event::PriorStep { .. }) {
                seen += 1;
            }
            if seen == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect_err("cancelled");
    assert!(matches!(err, flowalign::Error::Cancelled));
    assert_eq!(seen, 5);
}
