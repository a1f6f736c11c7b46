//! Interaction tests of the real visualizer (egui_kittest, no renderer): each drives the app through
//! its widgets and asserts on the state the training thread reports.
#![cfg(feature = "gui")]

mod gui_common;

use std::path::Path;
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
use gui_common::{DroppedPath, asset};

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
            h.state().status.error
        );
        std::thread::sleep(Duration::from_millis(10));
        h.step();
    }
}

/// Clicks a widget through accessibility (it works where the widget is scrolled out of view);
/// a widget that has just been asked for (a question's buttons) gets a few frames to appear.
fn click(h: &mut Harness<'_, FlowAlignApp>, label: &str) {
    for _ in 0..5 {
        if h.query_by_label(label).is_some() {
            break;
        }
        h.step();
    }
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
    wait_for(&mut h, "the landscapes", |a| {
        a.state
            .analyses
            .last()
            .is_some_and(|a| a.align.is_some() && a.samples.is_some())
    });
    let a = h.state().state.analyses.last().unwrap().clone();
    assert_eq!(
        h.state().state.target_map.as_ref().unwrap().values.len(),
        16 * 16
    );
    assert_eq!(a.align.as_ref().unwrap().value.values.len(), 16 * 16);
    let (pearson, spearman) = a.correlation.unwrap();
    assert!(pearson.is_finite() && spearman.is_finite());
    assert_eq!(a.samples.as_ref().unwrap().value.samples.len(), 200);

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
    // Clearing the session's own points asks first.
    click(&mut h, "Clear");
    assert!(h.state().question().is_some());
    assert_eq!(
        h.state().settings.cfg.points.as_ref().map(Vec::len),
        Some(n)
    );
    click(&mut h, "End the session");
    assert_eq!(
        h.state().settings.cfg.points.as_ref().map(Vec::len),
        Some(0)
    );
    assert_eq!(h.state().state.stage, Stage::Idle);
    // An empty drawing cannot start: an error, no session.
    click(&mut h, "Start");
    assert!(
        h.state()
            .status
            .error
            .as_deref()
            .unwrap()
            .contains("at least 2 points")
    );
    assert_eq!(h.state().state.stage, Stage::Idle);
    // The cleared points come back with Undo.
    click(&mut h, "Undo");
    assert_eq!(
        h.state().settings.cfg.points.as_ref().map(Vec::len),
        Some(n)
    );
}

#[test]
fn a_bad_csv_is_an_error_and_a_good_one_becomes_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    click(&mut h, "Start");
    wait_for(&mut h, "training", |a| a.state.prior_step() > 5);

    h.state_mut().settings.file_path = asset("bad.csv").display().to_string();
    click(&mut h, "Load");
    // A bad file is refused at once, without asking to end the session.
    assert!(h.state().question().is_none());
    let err = h.state().status.error.clone().expect("an error in the UI");
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
    click(&mut h, "End the session");
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
    assert_eq!(files.len(), 2, "{:?}", h.state().status.error);
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

    // The session loads back into the window (after ending the finished session).
    h.state_mut().settings.cfg = tiny(TargetKind::Grid);
    h.state_mut().settings.file_path = files[1].display().to_string();
    click(&mut h, "Load");
    click(&mut h, "End the session");
    assert_eq!(h.state().settings.cfg, loaded);
}

#[test]
fn a_diverging_run_stops_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.lr = 1e4;
    h.state_mut().settings.cfg.prior.schedule = flowalign::train::Schedule::Constant;
    click(&mut h, "Start");
    wait_for(&mut h, "the divergence", |a| a.status.error.is_some());
    let err = h.state().status.error.clone().unwrap();
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
    // A target change asks before it throws the session away; keeping it changes nothing.
    choose_target(&mut h, "spiral");
    let q = h.state().question().expect("a question").text.clone();
    assert!(q.contains("spiral") && q.contains("step"), "{q}");
    click(&mut h, "Keep the session");
    assert_eq!(h.state().settings.cfg.target, TargetKind::Mog);
    let step = h.state().state.prior_step();
    wait_for(&mut h, "training to go on", |a| {
        a.state.prior_step() > step + 5
    });
    choose_target(&mut h, "spiral");
    click(&mut h, "End the session");
    assert_eq!(h.state().state.stage, Stage::Idle);
    assert_eq!(h.state().settings.cfg.target, TargetKind::Spiral);
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

/// The shown samples of the target on show, in the target's raw coordinates.
fn shown_raw(h: &Harness<'_, FlowAlignApp>, kind: TargetKind) -> Vec<[f32; 2]> {
    let scale = flowalign::toy::Target::builtin(kind).scale;
    h.state()
        .state
        .target_samples
        .iter()
        .map(|p| [p[0] * scale, p[1] * scale])
        .collect()
}

#[test]
fn the_preset_prior_steps_follow_the_picked_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Mog);
    h.step();
    assert_eq!(h.state().settings.cfg.prior.steps, 2000);
    choose_target(&mut h, "rings");
    assert_eq!(h.state().settings.cfg.target, TargetKind::Rings);
    assert_eq!(h.state().settings.cfg.prior.steps, 4000);
    choose_target(&mut h, "moons");
    assert_eq!(h.state().settings.cfg.prior.steps, 2000);
    // Drawing a target of one's own takes the longer budget.
    h.get_by_label("draw on panel (a)").click_accesskit();
    h.step();
    assert!(h.state().settings.cfg.points.is_some());
    assert_eq!(h.state().settings.cfg.prior.steps, 4000);
}

#[test]
fn a_picked_target_shows_every_component_and_its_nll_before_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    // On launch, before any Start: the target, its NLL map, and the prompt to start.
    wait_for(&mut h, "the launch preview", |a| {
        a.state.target_name == "mog" && a.state.target_map.is_some()
    });
    h.get_by_label("Start (space)");
    assert!(h.state().panel_rect("nll").is_some());

    choose_target(&mut h, "moons");
    wait_for(&mut h, "the moons preview", |a| {
        a.state.target_name == "moons" && a.state.target_map.is_some()
    });
    assert_eq!(h.state().state.stage, Stage::Idle);
    assert_eq!(
        h.state().state.target_map.as_ref().unwrap().values.len(),
        16 * 16
    );
    // Both moons: (2 cos, 2 sin) over [0, pi], and (2 cos + 2, 2 sin - 0.5) over [pi, 2 pi].
    let raw = shown_raw(&h, TargetKind::Moons);
    let n = raw.len();
    assert_eq!(n, flowalign::gui::worker::SHOWN_SAMPLES);
    let upper = raw
        .iter()
        .filter(|p| (p[0].hypot(p[1]) - 2.0).abs() < 0.4 && p[1] > -0.4)
        .count();
    let lower = raw
        .iter()
        .filter(|p| ((p[0] - 2.0).hypot(p[1] + 0.5) - 2.0).abs() < 0.4 && p[1] < 0.0)
        .count();
    assert!(
        upper > n * 35 / 100 && lower > n * 35 / 100,
        "moons: {upper} upper, {lower} lower of {n}"
    );

    // All three rings, radii 4/3, 8/3 and 4.
    choose_target(&mut h, "rings");
    wait_for(&mut h, "the rings preview", |a| {
        a.state.target_name == "rings" && a.state.target_map.is_some()
    });
    let raw = shown_raw(&h, TargetKind::Rings);
    let mut per_ring = [0usize; 3];
    for p in &raw {
        let r = p[0].hypot(p[1]);
        let k = (0..3)
            .min_by(|&a, &b| {
                let d = |k: usize| (r - 4.0 / 3.0 * (k + 1) as f32).abs();
                d(a).total_cmp(&d(b))
            })
            .unwrap();
        per_ring[k] += 1;
    }
    assert!(
        per_ring.iter().all(|&c| c > raw.len() / 4),
        "rings: {per_ring:?} of {}",
        raw.len()
    );
}

#[test]
fn the_rate_does_not_spike_after_pause_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 100_000;
    click(&mut h, "Start");
    wait_for(&mut h, "a rate", |a| {
        a.state.prior_rate.per_sec().is_some() && a.state.prior_step() > 50
    });
    let before = h.state().state.prior_rate.per_sec().unwrap();
    for _ in 0..3 {
        click(&mut h, "Pause");
        wait_for(&mut h, "the pause", |a| a.state.paused);
        std::thread::sleep(Duration::from_millis(700));
        h.step();
        click(&mut h, "Resume");
        // Every frame for a second after the resume: no burst (load only lowers a rate, so a
        // generous bound cannot flake).
        let start = Instant::now();
        let mut highest = 0.0f64;
        while start.elapsed() < Duration::from_secs(1) {
            h.step();
            if let Some(r) = h.state().state.prior_rate.per_sec() {
                highest = highest.max(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            highest < 3.0 * before,
            "{highest:.0} steps/s after a resume, {before:.0} before the pause"
        );
    }
}

#[test]
fn an_error_goes_away_after_an_action_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.file_path = asset("bad.csv").display().to_string();
    click(&mut h, "Load");
    assert!(h.state().status.error.is_some());
    h.state_mut().settings.file_path = asset("ring.csv").display().to_string();
    click(&mut h, "Load");
    assert_eq!(h.state().status.error, None);
    let notice = h.state().status.notice.clone().unwrap();
    assert!(notice.contains("400 points from ring.csv"), "{notice}");
    // Loaded points are not "drawn points".
    assert!(h.state().points_description().contains("from ring.csv"));
}

#[test]
fn messages_do_not_move_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    wait_for(&mut h, "the preview", |a| a.state.target_map.is_some());
    h.step();
    let rects = |h: &Harness<'_, FlowAlignApp>| {
        ["nll", "align", "velocity", "samples"].map(|p| h.state().panel_rect(p).unwrap())
    };
    let load = h.get_by_label("Load").rect();
    let before = rects(&h);
    // An error, then a notice with an Undo button.
    h.state_mut().settings.file_path = asset("bad.csv").display().to_string();
    click(&mut h, "Load");
    assert!(h.state().status.error.is_some());
    assert_eq!(rects(&h), before);
    assert_eq!(h.get_by_label("Load").rect(), load);
    h.state_mut().settings.file_path = asset("ring.csv").display().to_string();
    click(&mut h, "Load");
    assert!(h.state().undo_available().is_some());
    wait_for(&mut h, "the ring preview", |a| a.state.target_map.is_some());
    h.step();
    assert_eq!(h.get_by_label("Load").rect(), load);
    let after = rects(&h);
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.min, b.min, "a panel moved");
    }
}

#[test]
fn at_1000_by_700_every_panel_fits_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.set_size(egui::vec2(1000.0, 700.0));
    h.state_mut().settings.view.prior_nll = true;
    wait_for(&mut h, "the preview", |a| a.state.target_map.is_some());
    h.step();
    h.step();
    let window = egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(1000.0, 700.0));
    for p in ["nll", "align", "prior_nll", "velocity", "samples"] {
        let r = h
            .state()
            .panel_rect(p)
            .unwrap_or_else(|| panic!("no panel {p}"));
        assert!(window.contains_rect(r), "{p} at {r:?} leaves the window");
        assert!(r.width() > 150.0, "{p} is {} wide", r.width());
    }
}

#[test]
fn heavy_maps_do_not_starve_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 100_000;
    let v = &mut h.state_mut().settings.view;
    (v.prior_nll, v.bound, v.grid) = (true, true, 40);
    click(&mut h, "Start");
    wait_for(&mut h, "training", |a| a.state.prior_step() > 5);
    // While the ODE maps (40 x 40, computed a slice at a time) are on, L_align keeps refreshing
    // from newer priors, and both slow maps arrive and refresh too (neither starves the other).
    let stamps = |a: &FlowAlignApp| {
        let x = a.state.shown_analysis();
        [
            x.and_then(|x| x.align.as_ref()).map(|m| m.prior_step),
            x.and_then(|x| x.prior_nll.as_ref()).map(|m| m.prior_step),
            x.and_then(|x| x.neg_bound.as_ref()).map(|m| m.prior_step),
        ]
    };
    let mut seen: [Vec<usize>; 3] = Default::default();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        h.step();
        for (s, v) in stamps(h.state()).into_iter().zip(&mut seen) {
            if let Some(s) = s
                && v.last() != Some(&s)
            {
                v.push(s);
            }
        }
        if seen[0].len() >= 4 && seen[1].len() >= 2 && seen[2].len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let [align, nll, estimate] = &seen;
    assert!(
        align.len() >= 4 && nll.len() >= 2 && estimate.len() >= 2,
        "maps from prior steps: L_align {align:?}, exact NLL {nll:?}, estimate {estimate:?}"
    );
    for v in &seen {
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
}

#[test]
fn a_slow_map_in_progress_does_not_hold_back_the_cheap_one() {
    // The exact-NLL map (capped at 40 x 40) with 200 RK4 steps instead of 40 takes many slices,
    // so L_align, refreshed on its own clock, must arrive several times before it does. A
    // scheduler that finishes a begun map before starting any other shows exactly one L_align map
    // here. (With the preset's 40 steps a fast moment of the machine could finish the map between
    // two L_align refreshes.)
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    h.state_mut().settings.cfg.prior.steps = 100_000;
    h.state_mut().settings.cfg.eval.likelihood_steps = 200;
    let v = &mut h.state_mut().settings.view;
    (v.prior_nll, v.bound, v.grid) = (true, false, 80);
    click(&mut h, "Start");
    wait_for(&mut h, "training", |a| a.state.prior_step() > 5);
    let mut align: Vec<usize> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(90) {
        h.step();
        let x = h.state().state.shown_analysis();
        if let Some(s) = x.and_then(|x| x.align.as_ref()).map(|m| m.prior_step)
            && align.last() != Some(&s)
        {
            align.push(s);
        }
        if x.is_some_and(|x| x.prior_nll.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        h.state()
            .state
            .shown_analysis()
            .is_some_and(|x| x.prior_nll.is_some()),
        "the exact-NLL map never arrived"
    );
    eprintln!("L_align maps before the first exact-NLL map: from prior steps {align:?}");
    assert!(
        align.len() >= 2,
        "L_align maps (from prior steps {align:?}) before the first exact-NLL map"
    );
}

#[test]
fn every_panel_exports_a_figure_at_the_chosen_width() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(dir.path());
    let app = h.state_mut();
    (app.settings.cfg.prior.steps, app.settings.cfg.align.steps) = (60, 20);
    (app.settings.view.prior_nll, app.settings.figure_width) = (true, 900);
    click(&mut h, "Start");
    wait_for(&mut h, "the end", |a| a.state.stage == Stage::Done);
    wait_for(&mut h, "every map", |a| {
        a.state
            .shown_analysis()
            .is_some_and(|x| x.align.is_some() && x.prior_nll.is_some() && x.velocity.is_some())
    });
    h.step();
    let buttons = h.get_all_by_label("PNG").count();
    // nll, align, prior_nll, velocity, samples and the curves.
    assert_eq!(buttons, 6);
    for k in 0..buttons {
        h.get_all_by_label("PNG").nth(k).unwrap().click_accesskit();
        h.step();
        h.step();
    }
    assert_eq!(h.state().status.error, None);
    let files = h.state().exported.clone();
    assert_eq!(files.len(), buttons, "{files:?}");
    for f in &files {
        let decoder = png::Decoder::new(std::fs::File::open(f).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.width, 900, "{}", f.display());
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if ["nll", "align", "prior_nll"]
            .iter()
            .any(|p| name.starts_with(&format!("{p}-")))
        {
            // A colour bar (and the map) span viridis from deep purple to yellow.
            let channels = info.color_type.samples();
            let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks_exact(channels).collect();
            let near = |p: &[u8], c: [u8; 3]| {
                p.iter()
                    .zip(c)
                    .all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= 30)
            };
            let purple = px.iter().filter(|p| near(p, [68, 1, 84])).count();
            let yellow = px.iter().filter(|p| near(p, [253, 231, 37])).count();
            assert!(
                purple > 200 && yellow > 200,
                "{name}: {purple} purple, {yellow} yellow px"
            );
        }
    }
}
