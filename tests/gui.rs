//! Interaction tests of the real visualizer (egui_kittest, no renderer): each drives the app through
//! its widgets and asserts on the state the training thread reports.
#![cfg(feature = "gui")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use eframe::egui::{self, Key, accesskit::Role};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;
use flowalign::gui::worker::Stage;
use flowalign::gui::{FlowAlignApp, Launch};
use flowalign::toy::TargetKind;
use flowalign::toy::{Preset, ToyConfig};

/// A session small enough to train in a second or two on the CPU.
fn tiny(target: TargetKind) -> ToyConfig {
    let mut c = ToyConfig::preset(Preset::Interactive, target);
    (c.prior.width, c.prior.depth, c.prior.batch) = (32, 2, 256);
    (c.prior.steps, c.prior.lr) = (300, 5e-3);
    (c.align.n_latents, c.align.steps, c.align.lr) = (200, 150, 0.05);
    (c.eval.grid, c.eval.t_values) = (16, 4);
    c
}

fn harness(export: &Path) -> Harness<'static, FlowAlignApp> {
    let mut h = Harness::builder()
        .with_size([1500.0, 950.0])
        .build_eframe(|cc| FlowAlignApp::new(cc, Launch::default(), Device::flex()));
    let app = h.state_mut();
    app.settings.cfg = tiny(TargetKind::Mog);
    app.settings.export_dir = export.to_path_buf();
    let v = &mut app.settings.view;
    (v.samples, v.paths, v.sample_steps, v.refresh_secs) = (200, 4, 20, 0.2);
    h.step();
    h
}

/// Steps frames until `cond` holds; fails with `what` after 60 s.
fn wait_for(h: &mut Harness<'_, FlowAlignApp>, what: &str, cond: impl Fn(&FlowAlignApp) -> bool) {
    let start = Instant::now();
    while !cond(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; stage {:?}, error {:?}",
            h.state().state.stage,
            h.state().state.error
        );
        std::thread::sleep(Duration::from_millis(10));
        h.step();
    }
}

/// Clicks a widget through accessibility (it works where the widget is scrolled out of view).
fn click(h: &mut Harness<'_, FlowAlignApp>, label: &str) {
    h.get_by_label(label).click_accesskit();
    h.step();
    h.step();
}

fn choose_target(h: &mut Harness<'_, FlowAlignApp>, name: &str) {
    h.get_by_role_and_label(Role::ComboBox, "target").click();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label(name).click();
    h.step();
    h.step();
}

#[test]
fn select_target_start_pause_resume_align() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 2000;
    choose_target(&mut h, "moons");
    assert_eq!(h.state().settings.cfg.target, TargetKind::Moons);
    assert!(h.state().settings.cfg.points.is_none());

    click(&mut h, "Start");
    wait_for(&mut h, "prior steps", |a| a.state.prior_step() >= 20);
    assert_eq!(h.state().state.stage, Stage::Prior);
    assert_eq!(h.state().state.target_name, "moons");

    click(&mut h, "Pause");
    wait_for(&mut h, "the pause", |a| a.state.paused);
    std::thread::sleep(Duration::from_millis(100));
    h.step();
    let paused_at = h.state().state.prior_step();
    std::thread::sleep(Duration::from_millis(400));
    h.step();
    assert_eq!(
        h.state().state.prior_step(),
        paused_at,
        "training went on while paused"
    );

    click(&mut h, "Resume");
    wait_for(&mut h, "training to resume", |a| {
        a.state.prior_step() > paused_at + 20
    });

    // Landscapes arrive while the prior trains.
    wait_for(&mut h, "a landscape", |a| !a.state.analyses.is_empty());
    let a = h.state().state.analyses.last().unwrap().clone();
    assert_eq!(a.nll.values.len(), 16 * 16);
    assert_eq!(a.align.values.len(), 16 * 16);
    assert!(a.pearson.is_finite() && a.spearman.is_finite());
    assert_eq!(a.samples.len(), 200);

    // Align once the prior has learnt something, well before its budget is spent.
    wait_for(&mut h, "a trained prior", |a| a.state.prior_step() >= 200);
    click(&mut h, "Align now");
    wait_for(&mut h, "the alignment stage", |a| {
        a.state.stage == Stage::Align
    });
    let prior_steps = h.state().state.prior_step();
    assert!(
        prior_steps < 2000,
        "Align now should not wait for the step budget"
    );
    wait_for(&mut h, "the end of alignment", |a| {
        a.state.stage == Stage::Done
    });
    let s = &h.state().state;
    assert_eq!(s.align_step(), 150);
    assert_eq!(s.prior_step(), prior_steps, "the prior froze");
    let (first, last) = (s.curves.nll[0].1, s.curves.nll.last().unwrap().1);
    assert!(
        last < first - 1.0,
        "NLL of y should fall: {first} -> {last}"
    );
    assert!(s.history.steps.len() > 10);
    assert_eq!(s.history.latest().unwrap().1.len(), 200);
}

#[test]
fn keyboard_space_starts_and_pauses_r_resets() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.key_press(Key::Space);
    h.step();
    wait_for(&mut h, "a start", |a| a.state.prior_step() > 5);
    h.key_press(Key::Space);
    h.step();
    wait_for(&mut h, "a pause", |a| a.state.paused);
    h.key_press(Key::R);
    h.step();
    assert_eq!(h.state().state.stage, Stage::Idle);
    assert!(h.state().state.curves.prior.is_empty());
    // A reset session reports nothing more.
    std::thread::sleep(Duration::from_millis(300));
    h.step();
    assert!(h.state().state.curves.prior.is_empty());
}

#[test]
fn the_prior_runs_to_its_budget_then_aligns_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 40;
    h.state_mut().settings.cfg.align.steps = 20;
    click(&mut h, "Start");
    // Alignment settings edited after the start apply to the next "Restart alignment", not this run.
    h.state_mut().settings.cfg.align.steps = 999;
    wait_for(&mut h, "the end", |a| a.state.stage == Stage::Done);
    let s = &h.state().state;
    assert_eq!(s.prior_step(), 40);
    assert_eq!(s.align_step(), 20);
    assert_eq!(s.align_total, 20);
    assert_eq!(s.session_cfg.as_ref().unwrap().align.steps, 20);
}

#[test]
fn drawing_on_panel_a_makes_a_custom_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.get_by_label("draw on panel (a)").click();
    h.step();
    h.step();
    assert!(h.state().drawing);
    let rect = h.state().panel_rect("nll").expect("panel (a) is drawn");
    let c = rect.center();
    h.hover_at(c);
    h.drag_at(c);
    for k in 1..=30 {
        let p = c + egui::vec2(3.0 * k as f32, 2.0 * (k as f32 * 0.3).sin() * 20.0);
        h.hover_at(p);
        h.step();
    }
    h.drop_at(c + egui::vec2(90.0, 0.0));
    h.step();
    let n = h.state().settings.cfg.points.as_ref().map_or(0, Vec::len);
    assert!(n >= 30, "dragging should add points, got {n}");
    // The drawn points are on the right of the centre, where the drag went.
    let pts = h.state().settings.cfg.points.clone().unwrap();
    let mean_x = pts.iter().map(|p| p[0]).sum::<f32>() / n as f32;
    assert!(mean_x > 0.0, "points at mean x {mean_x}");
    click(&mut h, "Start");
    wait_for(&mut h, "the custom session", |a| {
        a.state.target_name == "custom"
    });
    assert!(!h.state().drawing);
    click(&mut h, "Clear");
    assert_eq!(
        h.state().settings.cfg.points.as_ref().map(Vec::len),
        Some(0)
    );
    assert_eq!(h.state().state.stage, Stage::Idle);
    // An empty drawing cannot start: an error, no session.
    click(&mut h, "Start");
    assert!(
        h.state()
            .state
            .error
            .as_deref()
            .unwrap()
            .contains("at least 2 points")
    );
    assert_eq!(h.state().state.stage, Stage::Idle);
}

#[derive(Debug)]
struct DroppedPath(PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/assets")
        .join(name)
}

#[test]
fn a_bad_csv_is_an_error_and_a_good_one_becomes_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    click(&mut h, "Start");
    wait_for(&mut h, "training", |a| a.state.prior_step() > 5);

    h.state_mut().settings.file_path = asset("bad.csv").display().to_string();
    click(&mut h, "Load");
    let err = h.state().state.error.clone().expect("an error in the UI");
    assert!(err.contains("bad.csv"), "{err}");
    assert!(!err.contains('\n'));
    // The session goes on untouched.
    assert_eq!(h.state().settings.cfg.target, TargetKind::Mog);
    assert!(h.state().settings.cfg.points.is_none());
    let step = h.state().state.prior_step();
    wait_for(&mut h, "training to go on", |a| {
        a.state.prior_step() > step + 5
    });

    // Dropping a good CSV onto the window loads it as the new target.
    h.input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(asset("ring.csv"))));
    h.step();
    h.step();
    let app = h.state();
    assert_eq!(app.settings.cfg.points.as_ref().map(Vec::len), Some(400));
    assert_eq!(
        app.state.stage,
        Stage::Idle,
        "a new target resets the session"
    );
    click(&mut h, "Start");
    wait_for(&mut h, "the ring session", |a| {
        a.state.target_name == "custom"
    });
}

#[test]
fn exports_write_curves_and_a_session_that_toy_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 30;
    h.state_mut().settings.cfg.align.steps = 10;
    h.state_mut().settings.cfg.seed = 7;
    click(&mut h, "Start");
    wait_for(&mut h, "the end", |a| a.state.stage == Stage::Done);
    click(&mut h, "Curves CSV");
    click(&mut h, "Session TOML");
    let files = h.state().exported.clone();
    assert_eq!(files.len(), 2, "{:?}", h.state().state.error);
    let csv = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "stage,step,loss,nll_y");
    assert_eq!(lines.iter().filter(|l| l.starts_with("prior,")).count(), 30);
    // The initial latents' row (step 0) and 10 steps, as `flowalign toy` writes them.
    assert_eq!(lines.iter().filter(|l| l.starts_with("align,")).count(), 11);
    assert!(lines.iter().any(|l| l.starts_with("align,0,,")), "{csv}");
    let loaded = ToyConfig::from_toml_file(&files[1]).unwrap();
    assert_eq!(loaded, h.state().state.session_cfg.clone().unwrap());
    assert_eq!(loaded.seed, 7);

    // The session loads back into the window.
    h.state_mut().settings.cfg = tiny(TargetKind::Grid);
    h.state_mut().settings.file_path = files[1].display().to_string();
    click(&mut h, "Load");
    assert_eq!(h.state().settings.cfg, loaded);
}

#[test]
fn a_diverging_run_stops_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.lr = 1e4;
    h.state_mut().settings.cfg.prior.schedule = flowalign::train::Schedule::Constant;
    click(&mut h, "Start");
    wait_for(&mut h, "the divergence", |a| a.state.error.is_some());
    let err = h.state().state.error.clone().unwrap();
    assert!(err.contains("diverged"), "{err}");
    assert!(err.contains("lower the learning rate"), "{err}");
    wait_for(&mut h, "the pause", |a| a.state.paused);
}

#[test]
fn changing_the_target_mid_training_resets_and_closing_is_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 100_000;
    click(&mut h, "Start");
    wait_for(&mut h, "training", |a| a.state.prior_step() > 5);
    choose_target(&mut h, "spiral");
    assert_eq!(h.state().state.stage, Stage::Idle);
    assert!(h.state().state.notice.as_deref().unwrap().contains("reset"));
    click(&mut h, "Start");
    wait_for(&mut h, "the spiral session", |a| {
        a.state.target_name == "spiral" && a.state.prior_step() > 5
    });
    let start = Instant::now();
    drop(h);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "closing mid-training took {:?}",
        start.elapsed()
    );
}
