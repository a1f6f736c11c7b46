//! A scripted soak of the real app (egui_kittest, no renderer): seeded random clicks, drags, key
//! presses, dropped files and target changes, with no panic, both worker threads alive and the
//! memory bounded. `a_short_soak` runs in every test run (about 20 s); `a_long_soak` is opt-in:
//!
//!     FLOWALIGN_SOAK_SECS=600 cargo test --release --test gui_soak -- --ignored
#![cfg(feature = "gui")]

mod gui_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use eframe::egui::{self, Key, Modifiers};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;
use flowalign::gui::worker::Stage;
use flowalign::gui::{FlowAlignApp, Launch};
use flowalign::rng::{Rng, Stream, rng_for};
use flowalign::toy::{Preset, TargetKind, ToyConfig};
use gui_common::{DroppedPath, asset};
use rand::RngExt;

/// Resident memory of this process in MB (Linux; 0 elsewhere).
fn rss_mb() -> f64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0.0;
    };
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

/// Keeps whatever the clicks chose small, so the soak exercises the window, not the trainer.
fn keep_small(cfg: &mut ToyConfig) {
    cfg.prior.width = cfg.prior.width.min(32);
    cfg.prior.depth = cfg.prior.depth.min(2);
    cfg.prior.batch = cfg.prior.batch.min(256);
    cfg.prior.steps = cfg.prior.steps.min(400);
    cfg.align.n_latents = cfg.align.n_latents.min(200);
    cfg.align.steps = cfg.align.steps.min(200);
    cfg.eval.grid = cfg.eval.grid.clamp(10, 24);
    cfg.eval.t_values = cfg.eval.t_values.min(4);
}

fn soak(secs: f64) {
    let dir = tempfile::tempdir().unwrap();
    let size = egui::vec2(1500.0, 950.0);
    let mut h = Harness::builder()
        .with_size(size)
        .build_eframe(|cc| FlowAlignApp::new(cc, Launch::default(), Device::flex()));
    {
        let app = h.state_mut();
        app.settings.cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
        keep_small(&mut app.settings.cfg);
        app.settings.export_dir = dir.path().to_path_buf();
        let v = &mut app.settings.view;
        (v.samples, v.paths, v.sample_steps, v.refresh_secs) = (200, 4, 20, 0.3);
    }
    h.step();
    // A session TOML to drop now and then.
    let session = dir.path().join("session.toml");
    std::fs::write(&session, h.state().settings.cfg.to_toml()).unwrap();
    let files = [
        asset("ring.csv"),
        asset("bad.csv"),
        session,
        dir.path().join("missing.csv"),
    ];
    let mut rng = rng_for(7, Stream::Eval, 0);
    let at =
        |rng: &mut Rng| egui::pos2(rng.random_range(0.0..size.x), rng.random_range(0.0..size.y));
    let start = Instant::now();
    let (mut warm, mut peak, mut actions) = (None, 0.0f64, 0usize);
    while start.elapsed().as_secs_f64() < secs {
        actions += 1;
        match rng.random_range(0..100) {
            // Clicks anywhere (buttons, sliders, menus, the question's buttons or backdrop).
            0..=54 => {
                let p = at(&mut rng);
                h.hover_at(p);
                h.drag_at(p);
                h.step();
                h.drop_at(p);
            }
            // Drags: drawing on panel (a), panning plots, moving sliders.
            55..=69 => {
                let (mut p, q) = (at(&mut rng), at(&mut rng));
                h.hover_at(p);
                h.drag_at(p);
                for _ in 0..8 {
                    p += (q - p) / 4.0;
                    h.hover_at(p);
                    h.step();
                }
                h.drop_at(p);
            }
            // Keys: start/pause, reset, undo, answers to a question.
            70..=84 => {
                let keys = [Key::Space, Key::R, Key::Z, Key::Escape, Key::Enter];
                let key = keys[rng.random_range(0..keys.len())];
                if key == Key::Z {
                    h.key_press_modifiers(Modifiers::COMMAND, key);
                } else {
                    h.key_press(key);
                }
            }
            // Dropped files: a good CSV, a bad one, a session, a missing path.
            85..=91 => {
                let f = files[rng.random_range(0..files.len())].clone();
                h.input_mut().dropped_files.push(Arc::new(DroppedPath(f)));
            }
            // Landscape options (the ODE maps come and go).
            _ => {
                let v = &mut h.state_mut().settings.view;
                match rng.random_range(0..3) {
                    0 => v.prior_nll = !v.prior_nll,
                    1 => v.bound = !v.bound,
                    _ => v.velocity_t = rng.random_range(0.0..1.0),
                }
            }
        }
        for _ in 0..rng.random_range(1..4) {
            h.step();
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        keep_small(&mut h.state_mut().settings.cfg);
        assert!(h.state().worker_alive(), "a worker thread died");
        let rss = rss_mb();
        if warm.is_none() && start.elapsed().as_secs_f64() > secs / 4.0 {
            warm = Some(rss);
        }
        peak = peak.max(rss);
    }
    let warm = warm.unwrap_or(peak);
    eprintln!(
        "soak: {actions} actions in {secs:.0} s, memory {warm:.0} MB after a quarter, peak {peak:.0} MB, exported {} files",
        h.state().exported.len()
    );
    assert!(
        peak - warm < 300.0,
        "memory grew from {warm:.0} MB to {peak:.0} MB"
    );
    // The window still works: a fresh session on mog starts and trains.
    h.drop_at(egui::pos2(1.0, 1.0));
    for _ in 0..5 {
        if h.query_by_label("Keep the session").is_some() {
            h.get_by_label("Keep the session").click_accesskit();
        }
        h.step();
    }
    h.key_press(Key::R);
    h.step();
    let app = h.state_mut();
    app.settings.cfg.points = None;
    app.settings.cfg.target = TargetKind::Mog;
    app.drawing = false;
    h.step();
    h.step();
    h.get_by_label("Start").click_accesskit();
    let start = Instant::now();
    while h.state().state.prior_step() < 5 {
        let app = h.state();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no training after the soak: stage {:?}, error {:?}, question {:?}, cfg {:?}",
            app.state.stage,
            app.status.error,
            app.question().map(|q| &q.text),
            app.settings.cfg
        );
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.state().state.stage, Stage::Prior);
}

fn soak_secs(default: f64) -> f64 {
    std::env::var("FLOWALIGN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_short_soak() {
    soak(20.0);
}

#[test]
#[ignore = "minutes long: FLOWALIGN_SOAK_SECS=600 cargo test --release --test gui_soak -- --ignored"]
fn a_long_soak() {
    soak(soak_secs(300.0));
}
