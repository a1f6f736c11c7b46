//! The visualizer's app: persisted settings, the state reported by the training thread, and the UI.
//!
//! UI functions (`*_ui`) draw and push [`Action`]s; [`FlowAlignApp::apply`] carries them out, so
//! every effect has one place.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use eframe::egui::{self, Color32, ColorImage, Key, RichText, Ui};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::panels::{
    self, CurveStyle, HeatTexture, LATENT_COLOUR, Overlay, PanelResponse, TARGET_COLOUR,
};
use super::worker::{Analysis, Command, SLOW_GRID_MAX, Stage, Update, ViewRequest, Worker};
use crate::align::Reduction;
use crate::error::Result;
use crate::files::{write_atomic, write_json};
use crate::flow::solver::Solver;
use crate::grid::Point;
use crate::report::write_png_rgb;
use crate::toy::targets::{Target, read_points_csv};
use crate::toy::{Curves, Event, LatentInit, Preset, TargetKind, ToyConfig};

/// How the window was launched (command-line options); the default is an interactive session.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// A config to start from instead of the persisted one.
    pub cfg: Option<ToyConfig>,
    /// A trained prior to align with at once.
    pub prior: Option<PathBuf>,
    /// Start training on the first frame.
    pub autostart: bool,
    /// Save a PNG of the window when closing (scripted runs).
    pub screenshot: Option<PathBuf>,
    /// Close after this many seconds.
    pub exit_after: Option<f64>,
    /// Write frame and throughput statistics here when closing.
    pub stats: Option<PathBuf>,
    /// Also show the prior's exact NLL and the bound heatmaps.
    pub prior_nll: bool,
    pub bound: bool,
}

impl Launch {
    /// Whether the run is scripted (it closes itself), so persisted settings are not used.
    pub fn scripted(&self) -> bool {
        self.exit_after.is_some()
    }
}

/// What persists between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The session: target (or inline points), hyperparameters and seed.
    pub cfg: ToyConfig,
    pub view: ViewRequest,
    pub curves: CurveStyle,
    /// Where exports are written.
    pub export_dir: PathBuf,
    /// Radius of the drawing brush (drawing canvas units).
    pub brush: f32,
    /// Points added per frame while drawing.
    pub brush_rate: usize,
    /// A CSV of points or a session TOML to load.
    pub file_path: String,
    /// Repaints per second while training runs (lower leaves more CPU to training).
    pub max_fps: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cfg: ToyConfig::preset(Preset::Interactive, TargetKind::Mog),
            view: ViewRequest::default(),
            curves: CurveStyle::default(),
            export_dir: super::default_export_dir(),
            brush: 0.3,
            brush_rate: 3,
            file_path: String::new(),
            max_fps: 20.0,
        }
    }
}

/// The recorded alignment: y after selected steps (every `stride`-th once the history is long).
#[derive(Debug, Default)]
pub struct History {
    pub steps: Vec<(usize, Vec<Point>)>,
    stride: usize,
}

impl History {
    const MAX: usize = 1000;

    fn push(&mut self, step: usize, y: Vec<Point>) {
        let stride = self.stride.max(1);
        if !step.is_multiple_of(stride) && !self.steps.is_empty() {
            return;
        }
        self.steps.push((step, y));
        if self.steps.len() > Self::MAX {
            // Keep every other snapshot and record half as often from now on.
            let mut k = 0;
            self.steps.retain(|_| {
                k += 1;
                k % 2 == 1
            });
            self.stride = stride * 2;
        }
    }

    /// The latest latents.
    pub fn latest(&self) -> Option<&(usize, Vec<Point>)> {
        self.steps.last()
    }
}

/// Steps per second over the session's running time.
#[derive(Debug, Default, Clone)]
pub struct Rate {
    first: Option<(Instant, usize)>,
    last: Option<(Instant, usize)>,
}

impl Rate {
    fn record(&mut self, step: usize) {
        let now = (Instant::now(), step);
        if self.first.is_none() {
            self.first = Some(now);
        }
        self.last = Some(now);
    }

    /// Mean steps per second since the first recorded step.
    pub fn per_sec(&self) -> f64 {
        match (self.first, self.last) {
            (Some((t0, s0)), Some((t1, s1))) if s1 > s0 => {
                (s1 - s0) as f64 / (t1 - t0).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        }
    }

    /// Starts over (after a pause, so paused time does not count).
    fn restart(&mut self) {
        *self = Rate::default();
    }
}

/// Everything the training thread has reported about the current session.
#[derive(Debug, Default)]
pub struct RunState {
    pub stage: Stage,
    pub paused: bool,
    /// The last error (divergence, bad file), shown until dismissed.
    pub error: Option<String>,
    /// The last informational message.
    pub notice: Option<String>,
    pub target_name: String,
    pub target_samples: Vec<Point>,
    pub range: ((f32, f32), (f32, f32)),
    pub prior_total: usize,
    pub align_total: usize,
    /// The loss curves of both stages, recorded from the session's events as `flowalign toy`
    /// records them.
    pub curves: Curves,
    pub history: History,
    /// Landscapes of the prior at the steps they were taken (the prior's checkpoints), newest last.
    pub analyses: Vec<Arc<Analysis>>,
    pub prior_rate: Rate,
    pub align_rate: Rate,
    /// Replay: an index into `history` (None = live), whether it plays, and the shown checkpoint.
    pub replay_index: Option<usize>,
    pub replay_playing: bool,
    pub checkpoint: Option<usize>,
    /// The config the session was started with.
    pub session_cfg: Option<ToyConfig>,
}

impl RunState {
    /// The prior step reached so far.
    pub fn prior_step(&self) -> usize {
        self.curves.prior.last().map_or(0, |p| p.0)
    }

    /// The alignment step reached so far.
    pub fn align_step(&self) -> usize {
        self.curves.align.last().map_or(0, |p| p.0)
    }

    /// The landscapes on display: the chosen checkpoint or the newest.
    pub fn shown_analysis(&self) -> Option<&Arc<Analysis>> {
        match self.checkpoint {
            Some(i) => self.analyses.get(i),
            None => self.analyses.last(),
        }
    }

    /// The latents on display: the replayed step or the latest.
    pub fn shown_latents(&self) -> Option<&(usize, Vec<Point>)> {
        match self.replay_index {
            Some(i) => self.history.steps.get(i),
            None => self.history.latest(),
        }
    }
}

/// Frame times of the UI, for the performance report.
#[derive(Debug, Default)]
pub struct FrameStats {
    /// CPU time of each frame's UI pass (ms), as eframe measures it.
    pub cpu_ms: VecDeque<f32>,
    /// Time between frame starts (ms).
    pub interval_ms: VecDeque<f32>,
    last: Option<Instant>,
}

impl FrameStats {
    const KEEP: usize = 10_000;

    fn record(&mut self, cpu: Option<f32>) {
        let now = Instant::now();
        if let Some(last) = self.last {
            push_capped(&mut self.interval_ms, (now - last).as_secs_f32() * 1e3);
        }
        if let Some(cpu) = cpu {
            push_capped(&mut self.cpu_ms, cpu * 1e3);
        }
        self.last = Some(now);
    }

    /// The `q` quantile (0..1) of `v`, or 0 when empty.
    pub fn quantile(v: &VecDeque<f32>, q: f32) -> f32 {
        let mut s: Vec<f32> = v.iter().copied().collect();
        if s.is_empty() {
            return 0.0;
        }
        s.sort_by(f32::total_cmp);
        s[((s.len() - 1) as f32 * q).round() as usize]
    }
}

fn push_capped(v: &mut VecDeque<f32>, x: f32) {
    if v.len() == FrameStats::KEEP {
        v.pop_front();
    }
    v.push_back(x);
}

/// What the user asked for this frame.
#[derive(Debug, Clone)]
#[must_use]
pub enum Action {
    Start,
    Pause,
    Resume,
    /// Freeze the prior as trained so far and align (again) with the current alignment settings.
    Align,
    Reset,
    /// Load a CSV of points or a session TOML.
    Load(PathBuf),
    /// Open a file dialog for [`Action::Load`].
    Browse,
    ExportCurves,
    ExportSession,
    /// A PNG of the window or of one panel.
    Screenshot(Shot),
    ClearDrawing,
}

/// Which part of the window a screenshot keeps.
#[derive(Debug, Clone)]
pub enum Shot {
    Window,
    Panel(&'static str, egui::Rect),
    /// The scripted screenshot taken before closing.
    Closing(PathBuf),
}

/// The visualizer.
pub struct FlowAlignApp {
    pub settings: Settings,
    pub state: RunState,
    /// Whether dragging on panel (a) adds target points.
    pub drawing: bool,
    /// Files written by exports, newest last.
    pub exported: Vec<PathBuf>,
    pub frames: FrameStats,
    launch: Launch,
    worker: Worker,
    /// `settings.max_fps` as f32 bits, read by the training thread's repaint requests.
    max_fps: Arc<AtomicU32>,
    view_sent: Option<ViewRequest>,
    textures: Option<(usize, Vec<(&'static str, HeatTexture)>)>,
    panel_rects: Vec<(&'static str, egui::Rect)>,
    hover: Option<[f64; 2]>,
    shot_tx: Sender<(Shot, Arc<ColorImage>)>,
    shot_rx: Receiver<(Shot, Arc<ColorImage>)>,
    browse_rx: Option<Receiver<Option<PathBuf>>>,
    opened: Instant,
    closing: Option<Instant>,
    started: bool,
    frame_count: u64,
}

impl FlowAlignApp {
    /// Builds the app for eframe (or a test harness): persisted settings, then the launch options.
    pub fn new(cc: &eframe::CreationContext<'_>, launch: Launch, device: Device) -> Self {
        let mut settings: Settings = if launch.scripted() {
            Settings::default()
        } else {
            cc.storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default()
        };
        if let Some(cfg) = &launch.cfg {
            settings.cfg = cfg.clone();
        }
        settings.view.prior_nll |= launch.prior_nll;
        settings.view.bound |= launch.bound;
        let ctx = cc.egui_ctx.clone();
        let max_fps = Arc::new(AtomicU32::new(settings.max_fps.to_bits()));
        let fps = max_fps.clone();
        let worker = Worker::spawn(device, move || {
            let fps = f32::from_bits(fps.load(Ordering::Relaxed)).clamp(1.0, 240.0);
            ctx.request_repaint_after(Duration::from_secs_f32(1.0 / fps));
        });
        let (shot_tx, shot_rx) = mpsc::channel();
        FlowAlignApp {
            settings,
            state: RunState::default(),
            drawing: false,
            exported: Vec::new(),
            frames: FrameStats::default(),
            launch,
            worker,
            max_fps,
            view_sent: None,
            textures: None,
            panel_rects: Vec::new(),
            hover: None,
            shot_tx,
            shot_rx,
            browse_rx: None,
            opened: Instant::now(),
            closing: None,
            started: false,
            frame_count: 0,
        }
    }

    /// Carries out one user action.
    pub fn apply(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::Start => self.start(),
            Action::Pause => self.worker.send(Command::Pause),
            Action::Resume => {
                self.state.prior_rate.restart();
                self.state.align_rate.restart();
                self.worker.send(Command::Resume);
            }
            Action::Align => {
                if self.state.stage == Stage::Idle {
                    return;
                }
                self.reset_alignment();
                self.worker
                    .send(Command::Align(self.settings.cfg.align.clone()));
            }
            Action::Reset => self.reset(None),
            Action::Load(path) => {
                if let Err(e) = self.load(&path) {
                    self.state.error = Some(e.to_string());
                }
            }
            Action::Browse => {
                let (tx, rx) = mpsc::channel();
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let picked = rfd::FileDialog::new()
                        .add_filter("points CSV or session TOML", &["csv", "txt", "toml"])
                        .pick_file();
                    let _ = tx.send(picked);
                    ctx.request_repaint();
                });
                self.browse_rx = Some(rx);
            }
            Action::ExportCurves => self.report(|app| app.export_curves()),
            Action::ExportSession => self.report(|app| app.export_session()),
            Action::Screenshot(shot) => {
                let tx = self.shot_tx.clone();
                let repaint = ctx.clone();
                ctx.request_screenshot(move |image| {
                    let _ = tx.send((shot, image));
                    repaint.request_repaint();
                });
            }
            Action::ClearDrawing => {
                self.settings.cfg.points = Some(Vec::new());
                self.reset(None);
            }
        }
    }

    fn report(&mut self, export: impl FnOnce(&mut Self) -> Result<PathBuf>) {
        match export(self) {
            Ok(path) => {
                self.state.notice = Some(format!("wrote {}", path.display()));
                self.exported.push(path);
            }
            Err(e) => self.state.error = Some(e.to_string()),
        }
    }

    fn start(&mut self) {
        let cfg = self.settings.cfg.clone();
        if let Some(points) = &cfg.points
            && let Err(e) = Target::from_points("custom", points)
        {
            self.state.error = Some(format!("{e} (draw more points, or pick a built-in target)"));
            return;
        }
        if let Err(e) = cfg.validate() {
            self.state.error = Some(e.to_string());
            return;
        }
        self.drawing = false;
        self.state = RunState {
            session_cfg: Some(cfg.clone()),
            ..RunState::default()
        };
        self.textures = None;
        self.view_sent = None;
        self.sync_view();
        self.worker.send(Command::Start {
            cfg: Box::new(cfg),
            prior: self.launch.prior.take(),
        });
    }

    /// Cancels the session; `notice` says why when the user did not ask.
    fn reset(&mut self, notice: Option<String>) {
        self.worker.send(Command::Reset);
        let error = self.state.error.take();
        self.state = RunState {
            notice,
            error,
            ..RunState::default()
        };
        self.textures = None;
    }

    fn reset_alignment(&mut self) {
        let s = &mut self.state;
        s.curves.align.clear();
        s.curves.nll.clear();
        s.history = History::default();
        s.align_rate.restart();
        s.replay_index = None;
        s.replay_playing = false;
    }

    /// Loads a points CSV (the new target) or a session TOML; on error nothing changes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let mut cfg = self.settings.cfg.clone();
        if is_toml {
            cfg = ToyConfig::from_toml_file(path)?;
            if let Some(csv) = cfg.target_csv.take() {
                cfg.points = Some(read_points_csv(&csv)?);
            }
        } else {
            let points = read_points_csv(path)?;
            Target::from_points("custom", &points)
                .map_err(|e| crate::Error::input(path, e.to_string()))?;
            cfg.points = Some(points);
            cfg.target_csv = None;
        }
        if let Some(points) = &cfg.points {
            Target::from_points("custom", points)
                .map_err(|e| crate::Error::input(path, e.to_string()))?;
        }
        self.settings.cfg = cfg;
        self.settings.file_path = path.display().to_string();
        self.drawing = false;
        self.reset(Some(format!("loaded {}", path.display())));
        Ok(())
    }

    fn export_dir(&self) -> Result<PathBuf> {
        let dir = self.settings.export_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::Error::io(&dir, "choose an export folder you can write to", e))?;
        Ok(dir)
    }

    fn stem(&self) -> String {
        let cfg = self
            .state
            .session_cfg
            .as_ref()
            .unwrap_or(&self.settings.cfg);
        let target = if cfg.points.is_some() {
            "custom"
        } else {
            cfg.target.name()
        };
        format!("{target}-seed{}", cfg.seed)
    }

    /// Writes the curves as CSV: the same writer and format as `flowalign toy`'s `curves.csv`.
    pub fn export_curves(&mut self) -> Result<PathBuf> {
        let path = self
            .export_dir()?
            .join(format!("curves-{}.csv", self.stem()));
        self.state.curves.write_csv(&path)?;
        Ok(path)
    }

    /// Writes the session (target points, hyperparameters, seed) as a TOML that `flowalign toy
    /// --config` and the visualizer both load.
    pub fn export_session(&mut self) -> Result<PathBuf> {
        let path = self
            .export_dir()?
            .join(format!("session-{}.toml", self.stem()));
        let cfg = self
            .state
            .session_cfg
            .as_ref()
            .unwrap_or(&self.settings.cfg);
        write_atomic(&path, cfg.to_toml().as_bytes())?;
        Ok(path)
    }

    fn save_shot(&mut self, shot: Shot, image: &ColorImage, ppp: f32) -> Result<PathBuf> {
        let (image, path) = match shot {
            Shot::Window => (
                image.clone(),
                self.export_dir()?
                    .join(format!("window-{}-{}.png", self.stem(), self.frame_count)),
            ),
            Shot::Panel(name, rect) => (
                {
                    // A panel may reach past the window's edge; crop to what was rendered.
                    let size = egui::vec2(image.size[0] as f32, image.size[1] as f32) / ppp;
                    let rect = rect.intersect(egui::Rect::from_min_size(egui::Pos2::ZERO, size));
                    image.region(&rect, Some(ppp))
                },
                self.export_dir()?
                    .join(format!("{name}-{}-{}.png", self.stem(), self.frame_count)),
            ),
            Shot::Closing(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        crate::Error::io(dir, "choose a --screenshot path you can write to", e)
                    })?;
                }
                (image.clone(), path)
            }
        };
        let rgb: Vec<u8> = image
            .pixels
            .iter()
            .flat_map(|c| [c.r(), c.g(), c.b()])
            .collect();
        write_png_rgb(&path, &rgb, (image.size[0] as u32, image.size[1] as u32))?;
        Ok(path)
    }

    /// The frame and throughput statistics of this window.
    pub fn stats_json(&self) -> serde_json::Value {
        let f = &self.frames;
        serde_json::json!({
            "frames": self.frame_count,
            "frame_cpu_ms_p50": FrameStats::quantile(&f.cpu_ms, 0.5),
            "frame_cpu_ms_p95": FrameStats::quantile(&f.cpu_ms, 0.95),
            "frame_interval_ms_p50": FrameStats::quantile(&f.interval_ms, 0.5),
            "frame_interval_ms_p95": FrameStats::quantile(&f.interval_ms, 0.95),
            "prior_steps": self.state.prior_step(),
            "prior_steps_per_sec": self.state.prior_rate.per_sec(),
            "align_steps": self.state.align_step(),
            "align_steps_per_sec": self.state.align_rate.per_sec(),
            "landscape_refreshes": self.state.analyses.len(),
            "align_heatmap_secs": self.state.analyses.last().map(|a| a.align_map_secs),
            "analysis_secs": self.state.analyses.last().map(|a| a.total_secs),
            "grid": self.settings.view.grid,
            "t_values": self.settings.view.t_values,
            "stage": format!("{:?}", self.state.stage),
        })
    }

    fn sync_view(&mut self) {
        let mut view = self.settings.view.clone();
        view.grid = self.settings.cfg.eval.grid;
        view.t_values = self.settings.cfg.eval.t_values;
        if self.view_sent.as_ref() != Some(&view) {
            self.worker.send(Command::View(view.clone()));
            self.view_sent = Some(view);
        }
    }

    /// Applies the training thread's reports.
    fn drain(&mut self) {
        for update in self.worker.drain() {
            let s = &mut self.state;
            match update {
                Update::Session {
                    target,
                    samples,
                    range,
                    prior_steps,
                    align_steps,
                } => {
                    s.target_name = target;
                    s.target_samples = samples;
                    s.range = range;
                    s.prior_total = prior_steps;
                    s.align_total = align_steps;
                }
                Update::Stage(stage) => s.stage = stage,
                Update::Paused(p) => s.paused = p,
                Update::Progress(event) => {
                    s.curves.record(&event);
                    match event {
                        Event::PriorStep { step, .. } => s.prior_rate.record(step),
                        Event::AlignStart { latents, align, .. } => {
                            s.history = History::default();
                            s.history.push(0, latents);
                            s.align_rate.restart();
                            s.align_total = align.steps;
                            if let Some(cfg) = &mut s.session_cfg {
                                cfg.align = align;
                            }
                        }
                        Event::AlignStep { step, latents, .. } => {
                            s.history.push(step, latents);
                            s.align_rate.record(step);
                        }
                        Event::Done => {}
                    }
                }
                Update::Analysis(a) => {
                    let a: Arc<Analysis> = Arc::from(a);
                    // During alignment the prior is frozen: the newest landscapes replace the last.
                    if s.analyses
                        .last()
                        .is_some_and(|l| l.prior_step == a.prior_step)
                    {
                        s.analyses.pop();
                    }
                    s.analyses.push(a);
                    if s.analyses.len() > 200 {
                        s.analyses.remove(1);
                    }
                }
                Update::Failed(msg) => {
                    tracing::warn!("{msg}");
                    s.error = Some(msg);
                }
            }
        }
    }

    /// A session's prior settings changed under it: cancel the session.
    fn cancel_if_changed(&mut self) {
        let Some(cfg) = &self.state.session_cfg else {
            return;
        };
        let s = &self.settings.cfg;
        if self.state.stage != Stage::Idle
            && (cfg.prior != s.prior
                || cfg.seed != s.seed
                || cfg.target != s.target
                || cfg.points != s.points)
        {
            self.reset(Some(
                "the target or the prior's settings changed: session reset (press Start)".into(),
            ));
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) -> Vec<Action> {
        let mut actions = Vec::new();
        if ctx.egui_wants_keyboard_input() {
            return actions;
        }
        let (space, r) = ctx.input(|i| (i.key_pressed(Key::Space), i.key_pressed(Key::R)));
        if space {
            actions.push(self.primary_action());
        }
        if r {
            actions.push(Action::Reset);
        }
        actions
    }

    /// What space does: start, pause or resume.
    fn primary_action(&self) -> Action {
        match (self.state.stage, self.state.paused) {
            (Stage::Idle, _) => Action::Start,
            (_, true) => Action::Resume,
            (Stage::Done, false) => Action::Align,
            _ => Action::Pause,
        }
    }

    /// Scripted runs: start at once, screenshot and close after `exit_after`.
    fn script(&mut self, ctx: &egui::Context) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.started {
            self.started = true;
            if self.launch.autostart || self.launch.prior.is_some() {
                actions.push(Action::Start);
            }
        }
        let Some(secs) = self.launch.exit_after else {
            return actions;
        };
        match self.closing {
            None if self.opened.elapsed().as_secs_f64() >= secs => {
                self.closing = Some(Instant::now());
                match self.launch.screenshot.clone() {
                    Some(path) => actions.push(Action::Screenshot(Shot::Closing(path))),
                    None => self.close(ctx),
                }
            }
            Some(t) if t.elapsed() > Duration::from_secs(20) => {
                tracing::error!("the screenshot never arrived (renderer without read-back?)");
                self.close(ctx);
            }
            _ => ctx.request_repaint_after(Duration::from_millis(100)),
        }
        actions
    }

    fn close(&mut self, ctx: &egui::Context) {
        if let Some(path) = self.launch.stats.clone()
            && let Err(e) = write_json(&path, &self.stats_json())
        {
            tracing::error!("{e}");
        }
        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
    }

    fn receive_files(&mut self, ctx: &egui::Context) -> Vec<Action> {
        let mut actions: Vec<Action> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| Action::Load(f.path().to_path_buf()))
                .collect()
        });
        if let Some(rx) = &self.browse_rx
            && let Ok(picked) = rx.try_recv()
        {
            self.browse_rx = None;
            match picked {
                Some(path) => actions.push(Action::Load(path)),
                None => {
                    self.state.notice = Some(
                        "no file chosen (without a desktop file-dialog service, type the path and press Load)"
                            .into(),
                    )
                }
            }
        }
        actions
    }

    fn receive_shots(&mut self, ctx: &egui::Context) {
        let ppp = ctx.pixels_per_point();
        while let Ok((shot, image)) = self.shot_rx.try_recv() {
            let closing = matches!(shot, Shot::Closing(_));
            match self.save_shot(shot, &image, ppp) {
                Ok(path) => {
                    tracing::info!("wrote {}", path.display());
                    self.state.notice = Some(format!("wrote {}", path.display()));
                    self.exported.push(path);
                }
                Err(e) => {
                    tracing::error!("{e}");
                    self.state.error = Some(e.to_string());
                }
            }
            if closing {
                self.close(ctx);
            }
        }
    }
}

impl eframe::App for FlowAlignApp {
    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        self.frame_count += 1;
        self.frames.record(frame.info().cpu_usage);
        self.drain();
        self.receive_shots(ctx);
        let mut actions = self.script(ctx);
        actions.extend(self.receive_files(ctx));
        actions.extend(self.shortcuts(ctx));
        for a in actions {
            self.apply(ctx, a);
        }
        if self.state.replay_playing {
            let last = self.state.history.steps.len().saturating_sub(1);
            let next = self.state.replay_index.map_or(0, |i| i + 1);
            if next >= last {
                self.state.replay_playing = false;
                self.state.replay_index = None;
            } else {
                self.state.replay_index = Some(next);
                ctx.request_repaint_after(Duration::from_millis(30));
            }
        }
    }

    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let mut actions = Vec::new();
        egui::Panel::top("controls").show(ui, |ui| self.controls_ui(ui, &mut actions));
        egui::Panel::left("settings")
            .default_size(290.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_ui(ui, &mut actions));
            });
        egui::CentralPanel::default().show(ui, |ui| self.landscapes_ui(ui, &mut actions));
        for a in actions {
            self.apply(&ctx, a);
        }
        self.cancel_if_changed();
        self.sync_view();
        self.max_fps
            .store(self.settings.max_fps.to_bits(), Ordering::Relaxed);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        if self.closing.is_none()
            && let Some(path) = &self.launch.stats
            && let Err(e) = write_json(path, &self.stats_json())
        {
            tracing::error!("{e}");
        }
    }
}

const GREEN: Color32 = Color32::from_rgb(80, 200, 120);

impl FlowAlignApp {
    fn controls_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let s = &self.state;
        ui.horizontal_wrapped(|ui| {
            ui.heading("flowalign");
            ui.separator();
            match s.stage {
                Stage::Idle => {
                    if ui.button("Start").on_hover_text("train the prior (space)").clicked() {
                        actions.push(Action::Start);
                    }
                }
                _ => {
                    if s.stage != Stage::Done {
                        if s.paused {
                            if ui.button("Resume").on_hover_text("space").clicked() {
                                actions.push(Action::Resume);
                            }
                        } else if ui.button("Pause").on_hover_text("space").clicked() {
                            actions.push(Action::Pause);
                        }
                    }
                    let label = if s.stage == Stage::Prior {
                        "Align now"
                    } else {
                        "Restart alignment"
                    };
                    if ui
                        .button(label)
                        .on_hover_text(
                            "freeze the prior as trained so far and align the latents with the current alignment settings",
                        )
                        .clicked()
                    {
                        actions.push(Action::Align);
                    }
                    if ui.button("Reset").on_hover_text("R").clicked() {
                        actions.push(Action::Reset);
                    }
                }
            }
            ui.separator();
            let stage = match (s.stage, s.paused) {
                (Stage::Idle, _) => "idle".to_string(),
                (Stage::Prior, p) => format!(
                    "prior {}/{}{}",
                    s.prior_step(),
                    s.prior_total,
                    if p { " (paused)" } else { "" }
                ),
                (Stage::Align, p) => format!(
                    "align {}/{}{}",
                    s.align_step(),
                    s.align_total,
                    if p { " (paused)" } else { "" }
                ),
                (Stage::Done, _) => format!("done: align {}/{}", s.align_step(), s.align_total),
            };
            ui.label(RichText::new(format!("stage: {stage}")).strong().color(GREEN));
            match s.stage {
                Stage::Prior => {
                    if let Some(&(_, loss, lr)) = s.curves.prior.last() {
                        ui.label(format!(
                            "loss {loss:.3}  lr {lr:.1e}  {:.0} steps/s",
                            s.prior_rate.per_sec()
                        ));
                    }
                }
                Stage::Align | Stage::Done => {
                    if let (Some(l), Some(n)) = (s.curves.align.last(), s.curves.nll.last()) {
                        ui.label(format!(
                            "L_align {:.3}  NLL(y) {:.3}  {:.0} steps/s",
                            l.1,
                            n.1,
                            s.align_rate.per_sec()
                        ));
                    }
                }
                Stage::Idle => {}
            }
            ui.separator();
            ui.label(format!(
                "frame {:.1} ms (p95 {:.1})",
                FrameStats::quantile(&self.frames.cpu_ms, 0.5),
                FrameStats::quantile(&self.frames.cpu_ms, 0.95)
            ))
            .on_hover_text("CPU time of the UI pass, median and 95th percentile");
            ui.separator();
            if ui.button("Window PNG").clicked() {
                actions.push(Action::Screenshot(Shot::Window));
            }
        });
        if let Some(e) = self.state.error.clone() {
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(format!("error: {e}")).color(Color32::from_rgb(255, 90, 90)),
                );
                if ui.small_button("dismiss").clicked() {
                    self.state.error = None;
                }
            });
        } else if let Some(n) = &self.state.notice {
            ui.label(RichText::new(n).italics());
        }
    }

    fn settings_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let idle = self.state.stage == Stage::Idle;
        let cfg = &mut self.settings.cfg;
        egui::CollapsingHeader::new("Target")
            .default_open(true)
            .show(ui, |ui| {
                let custom = cfg.points.is_some();
                let current = if custom { "custom" } else { cfg.target.name() };
                egui::ComboBox::from_label("target")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for kind in TargetKind::ALL {
                            if ui
                                .selectable_label(!custom && cfg.target == kind, kind.name())
                                .clicked()
                            {
                                cfg.target = kind;
                                cfg.points = None;
                                cfg.target_csv = None;
                                self.drawing = false;
                            }
                        }
                        if ui.selectable_label(custom, "custom").clicked() && !custom {
                            cfg.points = Some(Vec::new());
                            self.drawing = true;
                        }
                    });
                if ui
                    .checkbox(&mut self.drawing, "draw on panel (a)")
                    .on_hover_text("drag on the NLL panel to add target points")
                    .changed()
                    && self.drawing
                    && cfg.points.is_none()
                {
                    cfg.points = Some(Vec::new());
                }
                ui.add(egui::Slider::new(&mut self.settings.brush, 0.05..=1.5).text("brush"));
                ui.add(
                    egui::Slider::new(&mut self.settings.brush_rate, 1..=20).text("points/frame"),
                );
                ui.horizontal(|ui| {
                    let n = cfg.points.as_ref().map_or(0, Vec::len);
                    ui.label(format!("{n} drawn points"));
                    if ui.button("Clear").clicked() {
                        actions.push(Action::ClearDrawing);
                    }
                });
                ui.horizontal(|ui| {
                    ui.add(
                        egui::TextEdit::singleline(&mut self.settings.file_path)
                            .hint_text("points.csv or session.toml")
                            .desired_width(150.0),
                    );
                    if ui.button("Load").clicked() {
                        actions.push(Action::Load(PathBuf::from(self.settings.file_path.trim())));
                    }
                    if ui.button("Browse").clicked() {
                        actions.push(Action::Browse);
                    }
                });
                ui.label(RichText::new("or drop a CSV / TOML onto the window").small());
            });
        egui::CollapsingHeader::new("Prior")
            .default_open(true)
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    for preset in [Preset::Interactive, Preset::Paper] {
                        let name = format!("{preset:?}").to_lowercase();
                        if ui
                            .selectable_label(cfg.preset == preset, &name)
                            .on_hover_text("fill in the preset's values (METHOD.md section 5)")
                            .clicked()
                        {
                            let base = ToyConfig::preset(preset, cfg.target);
                            (cfg.preset, cfg.prior, cfg.align, cfg.eval) =
                                (preset, base.prior, base.align, base.eval);
                        }
                    }
                });
                let p = &mut cfg.prior;
                egui::Grid::new("prior_grid").num_columns(2).show(ui, |ui| {
                    field(
                        ui,
                        "width",
                        egui::DragValue::new(&mut p.width).range(4..=2048),
                    );
                    field(
                        ui,
                        "depth",
                        egui::DragValue::new(&mut p.depth).range(1..=16),
                    );
                    field(
                        ui,
                        "batch",
                        egui::DragValue::new(&mut p.batch).range(8..=65536),
                    );
                    field(
                        ui,
                        "prior lr",
                        egui::DragValue::new(&mut p.lr)
                            .range(1e-6..=10.0)
                            .speed(1e-4)
                            .max_decimals(6),
                    );
                    field(
                        ui,
                        "prior steps",
                        egui::DragValue::new(&mut p.steps).range(1..=1_000_000),
                    );
                    field(
                        ui,
                        "EMA",
                        egui::DragValue::new(&mut p.ema)
                            .range(0.0..=0.9999)
                            .speed(1e-3),
                    );
                    field(ui, "seed", egui::DragValue::new(&mut cfg.seed));
                });
                if !idle {
                    ui.label(RichText::new("changing these resets the session").small());
                }
            });
        egui::CollapsingHeader::new("Alignment")
            .default_open(true)
            .show(ui, |ui| {
                let a = &mut cfg.align;
                egui::Grid::new("align_grid").num_columns(2).show(ui, |ui| {
                    field(
                        ui,
                        "latents",
                        egui::DragValue::new(&mut a.n_latents).range(1..=100_000),
                    );
                    field(
                        ui,
                        "align steps",
                        egui::DragValue::new(&mut a.steps).range(1..=1_000_000),
                    );
                    field(
                        ui,
                        "align lr",
                        egui::DragValue::new(&mut a.lr)
                            .range(1e-6..=10.0)
                            .speed(1e-3)
                            .max_decimals(6),
                    );
                    field(
                        ui,
                        "mc samples",
                        egui::DragValue::new(&mut a.mc).range(1..=256),
                    );
                    let l = ui.label("reduction");
                    egui::ComboBox::from_id_salt("reduction")
                        .selected_text(format!("{:?}", a.reduction).to_lowercase())
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut a.reduction, Reduction::Sum, "sum");
                            ui.selectable_value(&mut a.reduction, Reduction::Mean, "mean");
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                    let l = ui.label("init");
                    egui::ComboBox::from_id_salt("init")
                        .selected_text(format!("{:?}", a.init).to_lowercase())
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut a.init, LatentInit::Normal, "normal N(0, I)");
                            ui.selectable_value(&mut a.init, LatentInit::Box, "uniform box");
                            ui.selectable_value(&mut a.init, LatentInit::Corner, "corner cluster");
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                });
                ui.label(RichText::new("applied by Align now / Restart alignment").small());
            });
        egui::CollapsingHeader::new("Landscapes")
            .default_open(true)
            .show(ui, |ui| {
                let v = &mut self.settings.view;
                let e = &mut cfg.eval;
                ui.add(egui::Slider::new(&mut e.grid, 10..=150).text("heatmap grid"));
                ui.add(egui::Slider::new(&mut e.t_values, 1..=50).text("t values"))
                    .on_hover_text("L_align averages over t in linspace(0.1, 0.9, n)");
                ui.checkbox(&mut v.prior_nll, "prior's exact NLL (ODE)")
                    .on_hover_text(format!("slow: at most {SLOW_GRID_MAX} x {SLOW_GRID_MAX}"));
                ui.checkbox(&mut v.bound, "paper's estimate -(C(y) - L_align)")
                    .on_hover_text(
                        "the quantity the paper calls a bound on log p; it is not one (METHOD.md \
                         section 3). On the NLL scale; 16 draws per cell",
                    );
                ui.add(egui::Slider::new(&mut v.velocity_t, 0.0..=1.0).text("velocity t"));
                ui.add(egui::Slider::new(&mut v.velocity_grid, 5..=40).text("arrows"));
                egui::ComboBox::from_label("solver")
                    .selected_text(format!("{:?}", v.solver))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut v.solver, Solver::Euler, "Euler");
                        ui.selectable_value(&mut v.solver, Solver::Rk4, "Rk4");
                    });
                ui.add(egui::Slider::new(&mut v.sample_steps, 1..=500).text("ODE steps"));
                ui.add(egui::Slider::new(&mut v.samples, 10..=5000).text("samples"));
                ui.add(egui::Slider::new(&mut v.paths, 0..=200).text("paths"));
                ui.add(
                    egui::Slider::new(&mut v.refresh_secs, 0.2..=10.0)
                        .text("refresh (s)")
                        .logarithmic(true),
                );
            });
        egui::CollapsingHeader::new("Curves")
            .default_open(false)
            .show(ui, |ui| {
                let c = &mut self.settings.curves;
                ui.checkbox(&mut c.log_steps, "log-scale steps");
                ui.add(egui::Slider::new(&mut c.smoothing, 1..=201).text("smoothing"));
                ui.add(egui::Slider::new(&mut self.settings.max_fps, 5.0..=60.0).text("max fps"))
                    .on_hover_text(
                        "repaints per second while training; fewer leave more CPU to training",
                    );
            });
        egui::CollapsingHeader::new("Export")
            .default_open(true)
            .show(ui, |ui| {
                let mut dir = self.settings.export_dir.display().to_string();
                ui.horizontal(|ui| {
                    let l = ui.label("export folder");
                    if ui
                        .text_edit_singleline(&mut dir)
                        .labelled_by(l.id)
                        .changed()
                    {
                        self.settings.export_dir = PathBuf::from(dir.trim());
                    }
                });
                ui.horizontal(|ui| {
                    if ui.button("Curves CSV").clicked() {
                        actions.push(Action::ExportCurves);
                    }
                    if ui.button("Session TOML").clicked() {
                        actions.push(Action::ExportSession);
                    }
                    if ui.button("Window PNG").clicked() {
                        actions.push(Action::Screenshot(Shot::Window));
                    }
                });
                ui.label(
                    RichText::new("session TOMLs load here and in `flowalign toy --config`")
                        .small(),
                );
            });
    }

    /// Makes sure the textures show the analysis on display.
    fn update_textures(&mut self, ctx: &egui::Context) {
        let Some(a) = self.state.shown_analysis().cloned() else {
            self.textures = None;
            return;
        };
        let key = Arc::as_ptr(&a) as usize;
        if self.textures.as_ref().map(|t| t.0) == Some(key) {
            return;
        }
        let mut maps = vec![
            ("nll", panels::heat_texture(ctx, "nll", &a.nll)),
            ("align", panels::heat_texture(ctx, "align", &a.align)),
        ];
        if let Some(m) = &a.prior_nll {
            maps.push(("prior_nll", panels::heat_texture(ctx, "prior_nll", m)));
        }
        if let Some(m) = &a.neg_bound {
            maps.push(("bound", panels::heat_texture(ctx, "bound", m)));
        }
        self.textures = Some((key, maps));
    }

    fn landscapes_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let ctx = ui.ctx().clone();
        self.update_textures(&ctx);
        let drawing = self.drawing;
        let custom_idle = self.state.stage == Stage::Idle && self.settings.cfg.points.is_some();
        let range = if drawing || custom_idle || self.state.target_samples.is_empty() {
            ((-3.0, 3.0), (-3.0, 3.0))
        } else {
            self.state.range
        };
        let avail = ui.available_size();
        // Two rows: up to four maps above; velocity, samples and the curves (1.2 wide) below.
        let extra = self
            .textures
            .as_ref()
            .map_or(0, |(_, v)| v.len().saturating_sub(2));
        let size = ((avail.x - 60.0) / (2.0 + extra as f32).max(3.2))
            .min((avail.y - 150.0) / 2.0)
            .max(160.0);
        let analysis = self.state.shown_analysis().cloned();
        let latents = self
            .state
            .shown_latents()
            .map(|(_, y)| y.clone())
            .unwrap_or_default();
        let target: Vec<Point> = if drawing || self.state.target_samples.is_empty() {
            self.settings.cfg.points.clone().unwrap_or_default()
        } else {
            self.state.target_samples.clone()
        };
        let textures = self.textures.take();
        let tex = |name: &str| {
            textures
                .as_ref()
                .and_then(|(_, v)| v.iter().find(|(n, _)| *n == name).map(|(_, t)| t))
        };
        let mut legend: Vec<(&str, (f32, f32))> = Vec::new();
        for (name, label) in [
            ("nll", "NLL"),
            ("align", "L_align"),
            ("prior_nll", "prior NLL"),
            ("bound", "-bound"),
        ] {
            if let Some(t) = tex(name) {
                legend.push((label, t.range));
            }
        }
        ui.horizontal(|ui| {
            panels::colour_legend(ui, &legend);
            if let Some(a) = &analysis {
                ui.separator();
                ui.label(
                    RichText::new(format!(
                        "NLL vs L_align: Pearson {:.3}  Spearman {:.3}",
                        a.pearson, a.spearman
                    ))
                    .strong(),
                )
                .on_hover_text("correlation of the heatmaps (a) and (b) over the grid");
                ui.label(format!(
                    "(prior step {}, L_align map {:.0} ms)",
                    a.prior_step,
                    a.align_map_secs * 1e3
                ));
            }
        });

        let mut frame = PanelFrame {
            actions,
            last_rects: std::mem::take(&mut self.panel_rects),
            rects: Vec::new(),
            hover: None,
            drag: None,
        };
        ui.horizontal(|ui| {
            let title = if drawing {
                "(a) draw the target: drag here"
            } else {
                "(a) NLL of the target, y (red), samples"
            };
            frame.panel(ui, "nll", title, |ui| {
                let overlays = [
                    Overlay {
                        name: "target",
                        points: &target,
                        colour: TARGET_COLOUR,
                        radius: 1.0,
                    },
                    Overlay {
                        name: "y",
                        points: &latents,
                        colour: LATENT_COLOUR,
                        radius: 1.8,
                    },
                ];
                let heat = if drawing { None } else { tex("nll") };
                panels::heatmap_plot(ui, "nll", heat, &overlays, range, size, drawing)
            });
            frame.panel(ui, "align", "(b) L_align of the prior", |ui| {
                panels::heatmap_plot(ui, "align", tex("align"), &[], range, size, false)
            });
            let bound_title = if tex("prior_nll").is_some() {
                "(d) -(C(y) - L_align): the paper's 'bound', which is none"
            } else {
                "(c) -(C(y) - L_align): the paper's 'bound', which is none"
            };
            for (name, title) in [
                ("prior_nll", "(c) the prior's exact NLL (ODE)"),
                ("bound", bound_title),
            ] {
                if tex(name).is_some() {
                    frame.panel(ui, name, title, |ui| {
                        panels::heatmap_plot(ui, name, tex(name), &[], range, size, false)
                    });
                }
            }
        });
        let mut curve_actions = Vec::new();
        ui.horizontal(|ui| {
            if let Some(a) = &analysis {
                let grid = self.settings.view.velocity_grid;
                let title = format!("velocity field at t = {:.2}", a.velocity_t);
                frame.panel(ui, "velocity", &title, |ui| {
                    panels::velocity_plot(ui, &a.velocity, a.velocity_t, range, grid, size)
                });
                frame.panel(ui, "samples", "ODE samples and paths of the prior", |ui| {
                    panels::samples_plot(ui, &target, &a.samples, &a.paths, range, size)
                });
            }
            ui.vertical(|ui| self.curves_ui(ui, size, &mut curve_actions));
        });
        let PanelFrame {
            rects, hover, drag, ..
        } = frame;
        actions.extend(curve_actions);
        self.textures = textures;
        self.panel_rects = rects;
        self.hover_ui(ui, hover, analysis.as_deref());
        if let Some(p) = drag {
            self.add_drawn_points(p);
            ctx.request_repaint();
        }
    }

    fn hover_ui(&mut self, ui: &mut Ui, hover: Option<[f64; 2]>, analysis: Option<&Analysis>) {
        self.hover = hover.or(self.hover);
        let (Some(p), Some(a)) = (self.hover, analysis) else {
            return;
        };
        let mut text = format!("at ({:.2}, {:.2}):", p[0], p[1]);
        let maps = [
            ("NLL", Some(&a.nll)),
            ("L_align", Some(&a.align)),
            ("prior NLL", a.prior_nll.as_ref()),
            ("-bound", a.neg_bound.as_ref()),
        ];
        for (name, map) in maps {
            if let Some(v) = map.and_then(|m| panels::value_at(m, p)) {
                text.push_str(&format!("  {name} {v:.3}"));
            }
        }
        ui.label(text);
    }

    fn curves_ui(&mut self, ui: &mut Ui, size: f32, actions: &mut Vec<Action>) {
        let style = self.settings.curves;
        let s = &mut self.state;
        let w = size * 1.2;
        let h = (size - 60.0) / 2.0;
        ui.label(RichText::new("prior loss").strong());
        let prior: Vec<[f64; 2]> = s
            .curves
            .prior
            .iter()
            .map(|p| [p.0 as f64, f64::from(p.1)])
            .collect();
        panels::prior_curve_plot(ui, &prior, style, egui::vec2(w, h.max(60.0)));
        ui.label(RichText::new("L_align (left) and NLL of y (right)").strong());
        let marker = s
            .replay_index
            .and_then(|i| s.history.steps.get(i))
            .map(|(step, _)| *step as f64);
        let pairs = |v: &[(usize, f32)]| -> Vec<[f64; 2]> {
            v.iter().map(|p| [p.0 as f64, f64::from(p.1)]).collect()
        };
        panels::align_curve_plot(
            ui,
            &pairs(&s.curves.align),
            &pairs(&s.curves.nll),
            style,
            egui::vec2(w, h.max(60.0)),
            marker,
        );
        // The time scrubber over the recorded latents and the prior's checkpoints.
        let n = s.history.steps.len();
        ui.horizontal(|ui| {
            let play = if s.replay_playing { "Stop" } else { "Play" };
            if ui.add_enabled(n > 1, egui::Button::new(play)).clicked() {
                s.replay_playing = !s.replay_playing;
                if s.replay_playing && s.replay_index.is_none() {
                    s.replay_index = Some(0);
                }
            }
            let mut idx = s.replay_index.unwrap_or(n.saturating_sub(1));
            let step = s.history.steps.get(idx).map_or(0, |h| h.0);
            if ui
                .add_enabled(
                    n > 1,
                    egui::Slider::new(&mut idx, 0..=n.saturating_sub(1))
                        .show_value(false)
                        .text(format!("y at step {step}")),
                )
                .changed()
            {
                s.replay_index = (idx + 1 < n).then_some(idx);
                s.replay_playing = false;
            }
            if s.replay_index.is_some() && ui.small_button("live").clicked() {
                s.replay_index = None;
            }
        });
        let m = s.analyses.len();
        ui.horizontal(|ui| {
            let mut idx = s.checkpoint.unwrap_or(m.saturating_sub(1));
            let step = s.analyses.get(idx).map_or(0, |a| a.prior_step);
            if ui
                .add_enabled(
                    m > 1,
                    egui::Slider::new(&mut idx, 0..=m.saturating_sub(1))
                        .show_value(false)
                        .text(format!("prior at step {step}")),
                )
                .changed()
            {
                s.checkpoint = (idx + 1 < m).then_some(idx);
            }
            if s.checkpoint.is_some() && ui.small_button("latest").clicked() {
                s.checkpoint = None;
            }
        });
        if ui.small_button("curves CSV").clicked() {
            actions.push(Action::ExportCurves);
        }
    }

    /// Where panel `name` was drawn last frame (`nll`, `align`, `velocity`, `samples`, ...).
    pub fn panel_rect(&self, name: &str) -> Option<egui::Rect> {
        self.panel_rects
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
    }

    /// Adds a few points, uniform in the brush's disc around `p` (drawing canvas coordinates).
    pub fn add_drawn_points(&mut self, p: [f64; 2]) {
        let radius = self.settings.brush;
        let mut rng = rand::rng();
        let points = self.settings.cfg.points.get_or_insert_with(Vec::new);
        for _ in 0..self.settings.brush_rate {
            let r = radius * rng.random::<f32>().sqrt();
            let a = std::f32::consts::TAU * rng.random::<f32>();
            points.push([p[0] as f32 + r * a.cos(), p[1] as f32 + r * a.sin()]);
        }
        self.settings.cfg.target_csv = None;
    }
}

/// One labelled row of a settings grid (the label names the widget for screen readers and tests).
fn field(ui: &mut Ui, label: &str, widget: impl egui::Widget) {
    let l = ui.label(label);
    ui.add(widget).labelled_by(l.id);
    ui.end_row();
}

/// Collects what the 2D panels report while they are drawn.
struct PanelFrame<'a> {
    actions: &'a mut Vec<Action>,
    last_rects: Vec<(&'static str, egui::Rect)>,
    rects: Vec<(&'static str, egui::Rect)>,
    hover: Option<[f64; 2]>,
    drag: Option<[f64; 2]>,
}

impl PanelFrame<'_> {
    /// A titled panel with a PNG button (cropping last frame's rectangle of the panel).
    fn panel(
        &mut self,
        ui: &mut Ui,
        name: &'static str,
        title: &str,
        body: impl FnOnce(&mut Ui) -> PanelResponse,
    ) {
        ui.vertical(|ui| {
            ui.horizontal(|ui| {
                ui.label(RichText::new(title).strong());
                let last = self.last_rects.iter().find(|(n, _)| *n == name);
                if let Some((_, rect)) = last
                    && ui
                        .small_button("PNG")
                        .on_hover_text("save this panel")
                        .clicked()
                {
                    self.actions
                        .push(Action::Screenshot(Shot::Panel(name, *rect)));
                }
            });
            let r = body(ui);
            self.hover = r.hover.or(self.hover);
            self.drag = r.drag.or(self.drag);
            self.rects.push((name, r.rect));
        });
    }
}
