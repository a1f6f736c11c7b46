//! The visualizer's app: persisted settings, the state reported by the training thread, and the
//! effects of the user's actions.
//!
//! UI functions (`*_ui`, in `view.rs`) draw and push [`Action`]s; [`FlowAlignApp::apply`] carries
//! them out, so every effect has one place. An action that would throw a session away asks
//! first; one that replaces the target or the settings can be undone.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use eframe::egui::{self, ColorImage, Key};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::figures::{self, Dots, Figure};
use super::panels::{CurveStyle, HeatTexture};
use super::worker::{
    Command, MapData, MapKind, MapUpdate, Stage, Update, ViewRequest, Worker, target_key,
};
use crate::error::{Error, Result};
use crate::files::{write_atomic, write_json};
use crate::grid::{Heatmap, Point, Range2};
use crate::report::write_png_rgb;
use crate::toy::targets::{Target, read_points_csv};
use crate::toy::{Curves, Event, Preset, TargetKind, ToyConfig};

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

/// How fast this machine trained, as parameters x samples per second, for time estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Speed {
    pub prior: f64,
    pub align: f64,
}

impl Default for Speed {
    /// The interactive preset in the window on 2 CPU cores (burn flex, fused path, the frozen
    /// prior's modulation table): 53 prior steps/s at batch 512 and 92 alignment steps/s with
    /// 1,000 latents, with 193,346 parameters.
    fn default() -> Self {
        Speed {
            prior: 5.1e9,
            align: 1.8e10,
        }
    }
}

/// What persists between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The session: target (or inline points), hyperparameters and seed.
    pub cfg: ToyConfig,
    /// Where the custom points came from: a file's name, or `None` when drawn here.
    pub points_source: Option<String>,
    pub view: ViewRequest,
    pub curves: CurveStyle,
    /// Where exports are written.
    pub export_dir: PathBuf,
    /// Width in pixels of a panel exported as a figure.
    pub figure_width: u32,
    /// Radius of the drawing brush (drawing canvas units).
    pub brush: f32,
    /// Points added per frame while drawing.
    pub brush_rate: usize,
    /// A CSV of points or a session TOML to load.
    pub file_path: String,
    /// Repaints per second while training runs (lower leaves more CPU to training).
    pub max_fps: f32,
    /// The last measured training speed.
    pub speed: Speed,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cfg: ToyConfig::preset(Preset::Interactive, TargetKind::Mog),
            points_source: None,
            view: ViewRequest::default(),
            curves: CurveStyle::default(),
            export_dir: super::default_export_dir(),
            figure_width: 1600,
            brush: 0.3,
            brush_rate: 3,
            file_path: String::new(),
            max_fps: 20.0,
            speed: Speed::default(),
        }
    }
}

/// Parameters of the velocity network of METHOD.md section 4 on 2D data.
pub fn prior_params(width: usize, depth: usize) -> usize {
    let (c, d) = (width, 2);
    let input = d * c + c;
    let time = 256 * c + c + c * c + c;
    let block = 2 * c + (3 * c * c + 3 * c) + 2 * (c * c + c);
    let last = 2 * c * c + 2 * c + c * d + d;
    input + time + depth * block + last
}

/// The seconds a session of `cfg` should take at `speed`: (training the prior, aligning).
pub fn estimate_secs(cfg: &ToyConfig, speed: &Speed) -> (f64, f64) {
    let params = prior_params(cfg.prior.width, cfg.prior.depth) as f64;
    let prior = cfg.prior.steps as f64 * cfg.prior.batch as f64 * params / speed.prior;
    let align =
        cfg.align.steps as f64 * (cfg.align.n_latents * cfg.align.mc) as f64 * params / speed.align;
    (prior, align)
}

/// A duration for people: "12 s", "3 min 20 s", "9 h 40 min".
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round().max(0.0) as u64;
    match s {
        0 => "under a second".into(),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A count with thousands separators: 100,000.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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

/// Steps per second of a stage over the time it ran: paused time does not count, and nor does
/// the lag between a step and the frame that shows it, so a resume never reads as a burst.
#[derive(Debug, Default, Clone)]
pub struct Rate {
    /// Steps and seconds of finished stretches of running.
    steps: usize,
    secs: f64,
    /// The running stretch: where it started and the latest report.
    open: Option<(Instant, usize)>,
    last: Option<(Instant, usize)>,
    /// The step a pause stopped at (the next stretch counts from it).
    paused_at: Option<usize>,
}

impl Rate {
    /// No rate is shown before a stage has run this long.
    pub const MIN_SECS: f64 = 0.5;

    /// A step reported at `now`.
    pub fn record_at(&mut self, step: usize, now: Instant) {
        if self.open.is_none() {
            self.open = Some((now, step));
        }
        self.last = Some((now, step));
    }

    /// The stage paused at `now`: the time until [`Rate::resume_at`] does not count.
    pub fn pause_at(&mut self, now: Instant) {
        if let (Some((t0, s0)), Some((_, s1))) = (self.open.take(), self.last.take()) {
            self.steps += s1.saturating_sub(s0);
            self.secs += (now - t0).as_secs_f64();
            self.paused_at = Some(s1);
        }
    }

    /// The stage resumed at `now`: the clock runs again from the step it paused at.
    pub fn resume_at(&mut self, now: Instant) {
        if let Some(step) = self.paused_at.take() {
            self.open = Some((now, step));
            self.last = Some((now, step));
        }
    }

    /// Mean steps per second over the running time; `None` until it has run for
    /// [`Rate::MIN_SECS`].
    pub fn per_sec(&self) -> Option<f64> {
        let (mut steps, mut secs) = (self.steps, self.secs);
        if let (Some((t0, s0)), Some((t1, s1))) = (self.open, self.last) {
            steps += s1.saturating_sub(s0);
            secs += (t1 - t0).as_secs_f64();
        }
        (secs >= Self::MIN_SECS && steps > 0).then(|| steps as f64 / secs)
    }
}

/// A map with the prior step it was computed from.
#[derive(Debug, Clone)]
pub struct Stamped<T> {
    pub prior_step: usize,
    /// Seconds it took.
    pub secs: f64,
    pub value: Arc<T>,
}

/// The velocity field at one time.
#[derive(Debug, Clone)]
pub struct Velocity {
    pub arrows: Vec<(Point, Point)>,
    pub t: f32,
}

/// ODE samples of the prior and some of their paths.
#[derive(Debug, Clone)]
pub struct Samples {
    pub samples: Vec<Point>,
    pub paths: Vec<Vec<Point>>,
}

/// The landscapes on show, each as of the prior step it was computed from.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub align: Option<Stamped<Heatmap>>,
    /// Pearson and Spearman correlation of the target's NLL map and `align`.
    pub correlation: Option<(f64, f64)>,
    /// The prior's own exact NLL.
    pub prior_nll: Option<Stamped<Heatmap>>,
    /// `-(C(y) - L_align)`, the paper's estimate of METHOD.md section 3 (not a bound), on the NLL scale.
    pub neg_bound: Option<Stamped<Heatmap>>,
    pub velocity: Option<Stamped<Velocity>>,
    pub samples: Option<Stamped<Samples>>,
}

impl Analysis {
    /// The prior step of the L_align map, which names a checkpoint.
    pub fn prior_step(&self) -> Option<usize> {
        self.align.as_ref().map(|a| a.prior_step)
    }

    /// The prior step the map of `kind` shows, if it has arrived.
    pub fn step_of(&self, kind: MapKind) -> Option<usize> {
        match kind {
            MapKind::Align => self.align.as_ref().map(|m| m.prior_step),
            MapKind::PriorNll => self.prior_nll.as_ref().map(|m| m.prior_step),
            MapKind::Bound => self.neg_bound.as_ref().map(|m| m.prior_step),
            MapKind::Velocity => self.velocity.as_ref().map(|m| m.prior_step),
            MapKind::Samples => self.samples.as_ref().map(|m| m.prior_step),
        }
    }

    fn insert(&mut self, update: MapUpdate) {
        let (step, secs) = (update.prior_step, update.secs);
        let stamp = |value| Stamped {
            prior_step: step,
            secs,
            value: Arc::new(value),
        };
        match update.data {
            MapData::Heat { map, correlation } => match update.kind {
                MapKind::Align => {
                    self.align = Some(stamp(map));
                    self.correlation = correlation;
                }
                MapKind::PriorNll => self.prior_nll = Some(stamp(map)),
                _ => self.neg_bound = Some(stamp(map)),
            },
            MapData::Velocity { arrows, t } => {
                self.velocity = Some(Stamped {
                    prior_step: step,
                    secs,
                    value: Arc::new(Velocity { arrows, t }),
                })
            }
            MapData::Samples { samples, paths } => {
                self.samples = Some(Stamped {
                    prior_step: step,
                    secs,
                    value: Arc::new(Samples { samples, paths }),
                })
            }
        }
    }
}

/// Everything the training thread has reported about the target and the current session.
#[derive(Debug, Default)]
pub struct RunState {
    pub stage: Stage,
    pub paused: bool,
    /// When Start was pressed, and the wall-clock seconds from then until the alignment finished
    /// (pauses included).
    pub started: Option<Instant>,
    pub done_secs: Option<f64>,
    pub target_name: String,
    /// A random subset of the target's samples, and the view range.
    pub target_samples: Vec<Point>,
    pub range: Range2,
    /// The target's NLL on the heatmap grid (shown as soon as a target is picked).
    pub target_map: Option<Arc<Heatmap>>,
    pub prior_total: usize,
    pub align_total: usize,
    /// The loss curves of both stages, recorded from the session's events as `flowalign toy`
    /// records them.
    pub curves: Curves,
    pub history: History,
    /// Landscapes of the prior, one per L_align map (the prior's checkpoints), newest last.
    pub analyses: Vec<Arc<Analysis>>,
    /// Sliced maps being computed: kind, prior step, fraction done.
    pub progress: Vec<(MapKind, usize, f32)>,
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

    /// The rate of the stage that runs now.
    fn stage_rate(&mut self) -> &mut Rate {
        match self.stage {
            Stage::Prior => &mut self.prior_rate,
            _ => &mut self.align_rate,
        }
    }

    fn add_map(&mut self, update: MapUpdate) {
        self.progress.retain(|p| p.0 != update.kind);
        // A new L_align map of a new prior step is a new checkpoint; other maps join the newest.
        let new_checkpoint = update.kind == MapKind::Align
            && self
                .analyses
                .last()
                .is_none_or(|a| a.prior_step().is_some_and(|s| s != update.prior_step));
        if new_checkpoint {
            let mut next = self
                .analyses
                .last()
                .map(|a| (**a).clone())
                .unwrap_or_default();
            next.insert(update);
            self.analyses.push(Arc::new(next));
            if self.analyses.len() > 200 {
                self.analyses.remove(1);
                if let Some(c) = &mut self.checkpoint {
                    *c = c.saturating_sub(1);
                }
            }
        } else {
            match self.analyses.last_mut() {
                Some(last) => Arc::make_mut(last).insert(update),
                None => {
                    let mut a = Analysis::default();
                    a.insert(update);
                    self.analyses.push(Arc::new(a));
                }
            }
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

/// A target in the target menu.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetChoice {
    Builtin(TargetKind),
    /// The user's own points (drawn or loaded).
    Custom,
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
    /// Pick a target.
    SetTarget(TargetChoice),
    /// Turn drawing on panel (a) on or off.
    SetDrawing(bool),
    /// Fill in a preset's prior, alignment and evaluation settings.
    SetPreset(Preset),
    /// Load a CSV of points or a session TOML.
    Load(PathBuf),
    /// Open a file dialog for [`Action::Load`].
    Browse,
    ClearDrawing,
    /// Put back the settings the last undoable action replaced.
    Undo,
    /// Carry out the action the open question asks about.
    Confirm,
    /// Close the open question without doing anything.
    KeepSession,
    DismissMessage,
    ExportCurves,
    ExportSession,
    /// A panel as a figure (title, axes, colour bar) at the chosen width: `nll`, `align`,
    /// `prior_nll`, `bound`, `velocity`, `samples` or `curves`.
    ExportFigure(&'static str),
    /// A PNG of the window.
    Screenshot(Shot),
}

/// Which screenshot of the window to take.
#[derive(Debug, Clone)]
pub enum Shot {
    Window,
    /// The scripted screenshot taken before closing.
    Closing(PathBuf),
}

/// Settings an action replaced, and what to say when they are put back.
#[derive(Debug, Clone)]
pub struct Undo {
    pub what: String,
    pub cfg: ToyConfig,
    pub points_source: Option<String>,
}

/// A question before an action that would end the session.
#[derive(Debug, Clone)]
pub struct Question {
    pub text: String,
    /// The label of the button that goes ahead.
    pub yes: String,
    pub action: Action,
}

/// The one line of messages at the bottom of the window.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last error, until dismissed or until an action succeeds.
    pub error: Option<String>,
    /// The last informational message.
    pub notice: Option<String>,
}

/// The visualizer.
pub struct FlowAlignApp {
    pub settings: Settings,
    pub state: RunState,
    pub status: Status,
    /// Whether dragging on panel (a) adds target points.
    pub drawing: bool,
    /// Files written by exports, newest last.
    pub exported: Vec<PathBuf>,
    pub frames: FrameStats,
    pub(super) undo: Option<Undo>,
    pub(super) question: Option<Question>,
    pub(super) launch: Launch,
    worker: Worker,
    /// `settings.max_fps` as f32 bits, read by the training thread's repaint requests.
    max_fps: Arc<AtomicU32>,
    view_sent: Option<ViewRequest>,
    /// The target (key and grid) last sent for a preview.
    previewed: Option<String>,
    /// Textures of the heatmaps on show: panel, the map's address, the texture.
    pub(super) textures: Vec<(&'static str, usize, HeatTexture)>,
    pub(super) panel_rects: Vec<(&'static str, egui::Rect)>,
    pub(super) hover: Option<[f64; 2]>,
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
            settings.points_source = cfg.points.as_ref().map(|_| "the command line".into());
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
            status: Status::default(),
            drawing: false,
            exported: Vec::new(),
            frames: FrameStats::default(),
            undo: None,
            question: None,
            launch,
            worker,
            max_fps,
            view_sent: None,
            previewed: None,
            textures: Vec::new(),
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

    /// The question waiting for an answer, if any.
    pub fn question(&self) -> Option<&Question> {
        self.question.as_ref()
    }

    /// What Undo would put back, if anything.
    pub fn undo_available(&self) -> Option<&str> {
        self.undo.as_ref().map(|u| u.what.as_str())
    }

    /// Whether the training and analysis threads are alive.
    pub fn worker_alive(&self) -> bool {
        self.worker.alive()
    }

    /// Whether a session exists (or was asked for) that an action would throw away.
    fn has_session(&self) -> bool {
        self.state.stage != Stage::Idle || self.state.session_cfg.is_some()
    }

    /// The question to ask before `action`, when it would end the session.
    fn question_for(&self, action: &Action) -> Option<Question> {
        if !self.has_session() {
            return None;
        }
        let cfg = &self.settings.cfg;
        let custom = cfg.points.is_some();
        let what = match action {
            Action::SetTarget(TargetChoice::Builtin(kind)) if custom || cfg.target != *kind => {
                format!("Switching to {} ends", kind.name())
            }
            Action::SetTarget(TargetChoice::Custom) if !custom => "Drawing a target ends".into(),
            Action::SetDrawing(true) if !custom => "Drawing a target ends".into(),
            Action::ClearDrawing if custom => "Clearing the points ends".into(),
            Action::Load(path) => format!("Loading {} ends", file_name(path)),
            Action::SetPreset(p) => format!("The {} preset ends", preset_name(*p)),
            Action::Undo => "Undo ends".into(),
            _ => return None,
        };
        let s = &self.state;
        let progress = match s.stage {
            Stage::Prior => format!("the prior is at step {}", count(s.prior_step())),
            _ => format!(
                "the prior trained {} steps and alignment is at step {}",
                count(s.prior_step()),
                count(s.align_step())
            ),
        };
        Some(Question {
            text: format!("{what} the current session ({progress}). It cannot be undone."),
            yes: "End the session".into(),
            action: action.clone(),
        })
    }

    /// Carries out one user action (after asking, when it would end the session).
    pub fn apply(&mut self, ctx: &egui::Context, action: Action) {
        if !matches!(action, Action::Screenshot(Shot::Closing(_))) {
            // A new action replaces the last error; a failure sets its own.
            self.status.error = None;
        }
        // A file that cannot be loaded is refused before any question.
        if let Action::Load(path) = &action
            && let Err(e) = read_session_or_points(path, &self.settings.cfg)
        {
            self.status.error = Some(window_message(&e));
            return;
        }
        if let Some(q) = self.question_for(&action) {
            self.question = Some(q);
            return;
        }
        self.carry_out(ctx, action);
    }

    fn carry_out(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::Start => self.start(),
            Action::Pause => self.worker.send(Command::Pause),
            Action::Resume => self.worker.send(Command::Resume),
            Action::Align => {
                if self.state.stage == Stage::Idle {
                    return;
                }
                self.reset_alignment();
                self.worker
                    .send(Command::Align(self.settings.cfg.align.clone()));
            }
            Action::Reset => self.reset(None),
            Action::SetTarget(choice) => self.set_target(choice),
            Action::SetDrawing(on) => {
                self.drawing = on;
                if on && self.settings.cfg.points.is_none() {
                    let before = self.settings.cfg.builtin_target();
                    self.settings.cfg.points = Some(Vec::new());
                    self.settings.cfg.follow_target(before);
                    self.settings.points_source = None;
                }
                self.end_session_if_changed();
            }
            Action::SetPreset(preset) => {
                let before = self.remember(format!("the {} settings", preset_name(preset)));
                let cfg = &mut self.settings.cfg;
                let base = ToyConfig::preset(preset, cfg.target);
                (cfg.preset, cfg.prior, cfg.align, cfg.eval) =
                    (preset, base.prior, base.align, base.eval);
                let (prior, align) = estimate_secs(cfg, &self.settings.speed);
                let notice = format!(
                    "{} preset: {} prior steps at width {}, about {} on this machine",
                    preset_name(preset),
                    count(cfg.prior.steps),
                    cfg.prior.width,
                    duration(prior + align)
                );
                self.note_undoable(before, notice);
                self.end_session_if_changed();
            }
            Action::Load(path) => {
                if let Err(e) = self.load(&path) {
                    self.status.error = Some(window_message(&e));
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
            Action::ClearDrawing => {
                let n = self.settings.cfg.points.as_ref().map_or(0, Vec::len);
                let before = self.remember(self.points_description());
                let target = self.settings.cfg.builtin_target();
                self.settings.cfg.points = Some(Vec::new());
                self.settings.cfg.follow_target(target);
                self.settings.points_source = None;
                self.drawing = true;
                if n > 0 {
                    self.note_undoable(before, format!("cleared {}", self.undo_what(n)));
                }
                self.end_session_if_changed();
            }
            Action::Undo => {
                if let Some(u) = self.undo.take() {
                    self.settings.cfg = u.cfg;
                    self.settings.points_source = u.points_source;
                    self.drawing = false;
                    self.status.notice = Some(format!("restored {}", u.what));
                    self.end_session_if_changed();
                }
            }
            Action::Confirm => {
                if let Some(q) = self.question.take() {
                    self.reset(None);
                    self.carry_out(ctx, q.action);
                }
            }
            Action::KeepSession => self.question = None,
            Action::DismissMessage => {
                self.status = Status::default();
                self.undo = None;
            }
            Action::ExportCurves => self.report(|app| app.export_curves()),
            Action::ExportSession => self.report(|app| app.export_session()),
            Action::ExportFigure(panel) => self.report(|app| app.export_figure(panel)),
            Action::Screenshot(shot) => {
                let tx = self.shot_tx.clone();
                let repaint = ctx.clone();
                ctx.request_screenshot(move |image| {
                    let _ = tx.send((shot, image));
                    repaint.request_repaint();
                });
            }
        }
    }

    /// The undo record of the settings as they are, to keep if an action replaces them.
    fn remember(&self, what: String) -> Undo {
        Undo {
            what,
            cfg: self.settings.cfg.clone(),
            points_source: self.settings.points_source.clone(),
        }
    }

    /// Keeps `undo` and says `notice` (the status line offers Undo).
    fn note_undoable(&mut self, undo: Undo, notice: String) {
        self.undo = Some(undo);
        self.status.notice = Some(notice);
    }

    /// "1,000 drawn points" or "400 points from ring.csv".
    pub fn points_description(&self) -> String {
        let n = self.settings.cfg.points.as_ref().map_or(0, Vec::len);
        self.undo_what(n)
    }

    fn undo_what(&self, n: usize) -> String {
        match &self.settings.points_source {
            Some(src) => format!("{} points from {src}", count(n)),
            None => format!("{} drawn points", count(n)),
        }
    }

    fn set_target(&mut self, choice: TargetChoice) {
        let cfg = &self.settings.cfg;
        let target_before = cfg.builtin_target();
        let had_points = cfg.points.as_ref().is_some_and(|p| !p.is_empty());
        let before = self.remember(if had_points {
            self.points_description()
        } else {
            format!("the {} target", cfg.target.name())
        });
        match choice {
            TargetChoice::Builtin(kind) => {
                let cfg = &mut self.settings.cfg;
                cfg.target = kind;
                cfg.points = None;
                cfg.target_csv = None;
                self.settings.points_source = None;
                self.drawing = false;
                if had_points {
                    let what = before.what.clone();
                    self.note_undoable(
                        before,
                        format!("target: {} (replaced {what})", kind.name()),
                    );
                }
            }
            TargetChoice::Custom => {
                if self.settings.cfg.points.is_none() {
                    self.settings.cfg.points = Some(Vec::new());
                    self.settings.points_source = None;
                    self.drawing = true;
                }
            }
        }
        self.settings.cfg.follow_target(target_before);
        self.end_session_if_changed();
    }

    fn report(&mut self, export: impl FnOnce(&mut Self) -> Result<PathBuf>) {
        match export(self) {
            Ok(path) => {
                self.status.notice = Some(format!("wrote {}", path.display()));
                self.exported.push(path);
            }
            Err(e) => self.status.error = Some(window_message(&e)),
        }
    }

    fn start(&mut self) {
        let cfg = self.settings.cfg.clone();
        if let Some(points) = &cfg.points
            && let Err(e) = Target::from_points("custom", points)
        {
            self.status.error = Some(format!(
                "{} (draw more points, or pick a built-in target)",
                window_message(&e)
            ));
            return;
        }
        if let Err(e) = cfg.validate() {
            self.status.error = Some(window_message(&e));
            return;
        }
        self.drawing = false;
        // The target on show stays while the session starts, when it is the same one.
        let same_target = self.previewed.as_deref() == Some(&self.preview_key());
        let old = std::mem::take(&mut self.state);
        self.state = RunState {
            session_cfg: Some(cfg.clone()),
            started: Some(Instant::now()),
            ..RunState::default()
        };
        if same_target {
            let s = &mut self.state;
            (s.target_name, s.target_samples, s.range, s.target_map) = (
                old.target_name,
                old.target_samples,
                old.range,
                old.target_map,
            );
        }
        self.previewed = None;
        self.textures.clear();
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
        self.state = RunState::default();
        self.previewed = None;
        self.textures.clear();
        if notice.is_some() {
            self.status.notice = notice;
        }
    }

    fn reset_alignment(&mut self) {
        let s = &mut self.state;
        s.curves.align.clear();
        s.curves.nll.clear();
        s.history = History::default();
        s.align_rate = Rate::default();
        s.replay_index = None;
        s.replay_playing = false;
    }

    /// Loads a points CSV (the new target) or a session TOML; on error nothing changes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let is_toml = is_toml(path);
        let name = file_name(path);
        let cfg = read_session_or_points(path, &self.settings.cfg)?;
        let before = self.remember(match &self.settings.cfg.points {
            Some(p) if !p.is_empty() => self.points_description(),
            _ => "the settings before the load".into(),
        });
        let what = match &cfg.points {
            Some(p) if is_toml => format!("session {name}: {} points", count(p.len())),
            Some(p) => format!("{} points from {name}", count(p.len())),
            None => format!("session {name}: target {}", cfg.target.name()),
        };
        self.settings.points_source = cfg.points.as_ref().map(|_| name);
        self.settings.cfg = cfg;
        self.settings.file_path = path.display().to_string();
        self.drawing = false;
        self.end_session_if_changed();
        self.note_undoable(before, format!("loaded {what}"));
        Ok(())
    }

    fn export_dir(&self) -> Result<PathBuf> {
        let dir = self.settings.export_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(&dir, "choose an export folder you can write to", e))?;
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

    /// Writes panel `panel` as a figure (title, axes, colour bar) `figure_width` pixels wide.
    pub fn export_figure(&mut self, panel: &'static str) -> Result<PathBuf> {
        let path =
            self.export_dir()?
                .join(format!("{panel}-{}-{}.png", self.stem(), self.frame_count));
        figures::write(
            &self.panel_figure(panel)?,
            &path,
            self.settings.figure_width,
        )?;
        Ok(path)
    }

    /// Panel `panel` as it shows now, as plain data for a figure.
    fn panel_figure(&self, panel: &str) -> Result<Figure<'_>> {
        let s = &self.state;
        let a = s.shown_analysis();
        let missing = || Error::Figure(format!("panel {panel} has nothing to draw yet"));
        let step_note = |step: usize| format!("prior step {step}");
        Ok(match panel {
            "nll" => {
                let map = s.target_map.as_deref().ok_or_else(missing)?;
                let mut title = format!("(a) {}: NLL of the target", s.target_name);
                let latents = match s.shown_latents() {
                    Some((step, y)) => {
                        title.push_str(&format!(", y after {step} alignment steps"));
                        &y[..]
                    }
                    None => &[],
                };
                let dots = vec![
                    Dots {
                        label: "target samples",
                        points: &s.target_samples,
                        colour: figures::TARGET_DOTS,
                        radius: 1.2,
                    },
                    Dots {
                        label: "y",
                        points: latents,
                        colour: figures::LATENT_DOTS,
                        radius: 2.2,
                    },
                ];
                Figure::Heat {
                    title,
                    map,
                    dots,
                    label: "NLL",
                }
            }
            "align" | "prior_nll" | "bound" => {
                let a = a.ok_or_else(missing)?;
                let (stamp, title, label) = match panel {
                    "align" => {
                        let corr = a.correlation.map_or(String::new(), |(p, sp)| {
                            format!(" (Pearson {p:.3}, Spearman {sp:.3})")
                        });
                        (a.align.as_ref(), format!("(b) L_align{corr}"), "L_align")
                    }
                    "prior_nll" => (
                        a.prior_nll.as_ref(),
                        "the prior's exact NLL (ODE)".to_string(),
                        "NLL",
                    ),
                    _ => (
                        a.neg_bound.as_ref(),
                        "-(C(y) - L_align): the paper's estimate, not a bound".to_string(),
                        "-estimate",
                    ),
                };
                let stamp = stamp.ok_or_else(missing)?;
                Figure::Heat {
                    title: format!(
                        "{}: {title}, {}",
                        s.target_name,
                        step_note(stamp.prior_step)
                    ),
                    map: &stamp.value,
                    dots: Vec::new(),
                    label,
                }
            }
            "velocity" => {
                let v = a.and_then(|a| a.velocity.as_ref()).ok_or_else(missing)?;
                Figure::Arrows {
                    title: format!(
                        "{}: velocity v(z, t = {:.2}), {}",
                        s.target_name,
                        v.value.t,
                        step_note(v.prior_step)
                    ),
                    range: s.range,
                    arrows: &v.value.arrows,
                }
            }
            "samples" => {
                let m = a.and_then(|a| a.samples.as_ref()).ok_or_else(missing)?;
                Figure::Samples {
                    title: format!(
                        "{}: ODE samples of the prior, {}",
                        s.target_name,
                        step_note(m.prior_step)
                    ),
                    range: s.range,
                    target: &s.target_samples,
                    samples: &m.value.samples,
                    paths: &m.value.paths,
                }
            }
            "curves" => {
                if s.curves.prior.is_empty() && s.curves.align.is_empty() {
                    return Err(missing());
                }
                Figure::Curves {
                    target: &s.target_name,
                    curves: &s.curves,
                    smoothing: self.settings.curves.smoothing,
                }
            }
            _ => return Err(Error::Figure(format!("no panel named {panel}"))),
        })
    }

    fn save_shot(&mut self, shot: Shot, image: &ColorImage) -> Result<PathBuf> {
        let path = match shot {
            Shot::Window => {
                self.export_dir()?
                    .join(format!("window-{}-{}.png", self.stem(), self.frame_count))
            }
            Shot::Closing(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Error::io(dir, "choose a screenshot path you can write to", e)
                    })?;
                }
                path
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
        let last = self.state.analyses.last();
        serde_json::json!({
            "frames": self.frame_count,
            "frame_cpu_ms_p50": FrameStats::quantile(&f.cpu_ms, 0.5),
            "frame_cpu_ms_p95": FrameStats::quantile(&f.cpu_ms, 0.95),
            "frame_interval_ms_p50": FrameStats::quantile(&f.interval_ms, 0.5),
            "frame_interval_ms_p95": FrameStats::quantile(&f.interval_ms, 0.95),
            "prior_steps": self.state.prior_step(),
            "prior_steps_per_sec": self.state.prior_rate.per_sec().unwrap_or(0.0),
            "align_steps": self.state.align_step(),
            "align_steps_per_sec": self.state.align_rate.per_sec().unwrap_or(0.0),
            "landscape_refreshes": self.state.analyses.len(),
            "align_heatmap_secs": last.and_then(|a| a.align.as_ref()).map(|m| m.secs),
            "grid": self.settings.view.grid,
            "t_values": self.settings.view.t_values,
            "stage": format!("{:?}", self.state.stage),
            "seconds_start_to_done": self.state.done_secs,
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

    /// What a preview shows: the target and the grid of its NLL map.
    fn preview_key(&self) -> String {
        format!(
            "{} grid {}",
            target_key(&self.settings.cfg),
            self.settings.cfg.eval.grid
        )
    }

    /// Without a session, shows the chosen target (its samples and NLL map) as soon as it changes.
    fn preview(&mut self) {
        if self.has_session() || self.drawing {
            return;
        }
        let cfg = &self.settings.cfg;
        if cfg
            .points
            .as_ref()
            .is_some_and(|p| Target::from_points("custom", p).is_err())
        {
            return;
        }
        let key = self.preview_key();
        if self.previewed.as_ref() == Some(&key) {
            return;
        }
        self.previewed = Some(key);
        let s = &mut self.state;
        (s.target_samples, s.target_map) = (Vec::new(), None);
        self.textures.retain(|t| t.0 != "nll");
        self.worker.send(Command::Preview(Box::new(cfg.clone())));
    }

    /// Applies the training thread's reports.
    fn drain(&mut self) {
        let now = Instant::now();
        for update in self.worker.drain() {
            let s = &mut self.state;
            match update {
                Update::Target {
                    name,
                    samples,
                    range,
                } => {
                    s.target_name = name;
                    s.target_samples = samples;
                    s.range = range;
                }
                Update::Session {
                    prior_steps,
                    align_steps,
                } => {
                    s.prior_total = prior_steps;
                    s.align_total = align_steps;
                }
                Update::TargetMap(map) => s.target_map = Some(Arc::new(map)),
                Update::Stage(stage) => {
                    s.stage = stage;
                    if stage == Stage::Done && s.done_secs.is_none() {
                        s.done_secs = s.started.map(|t| now.duration_since(t).as_secs_f64());
                    }
                    if stage == Stage::Idle {
                        // A start that failed: no session after all.
                        s.session_cfg = None;
                    }
                }
                Update::Paused(p) => {
                    if p && !s.paused {
                        s.stage_rate().pause_at(now);
                    } else if !p && s.paused {
                        s.stage_rate().resume_at(now);
                    }
                    s.paused = p;
                }
                Update::Progress(event) => {
                    s.curves.record(&event);
                    match event {
                        Event::PriorStep { step, .. } => s.prior_rate.record_at(step, now),
                        Event::AlignStart { latents, align, .. } => {
                            s.prior_rate.pause_at(now);
                            s.history = History::default();
                            s.history.push(0, latents);
                            s.align_rate = Rate::default();
                            s.align_total = align.steps;
                            if let Some(cfg) = &mut s.session_cfg {
                                cfg.align = align;
                            }
                        }
                        Event::AlignStep { step, latents, .. } => {
                            s.history.push(step, latents);
                            s.align_rate.record_at(step, now);
                        }
                        Event::Done => s.align_rate.pause_at(now),
                    }
                }
                Update::Map(update) => s.add_map(*update),
                Update::MapProgress {
                    kind,
                    prior_step,
                    done,
                } => {
                    s.progress.retain(|p| p.0 != kind);
                    s.progress.push((kind, prior_step, done));
                }
                Update::Notice(text) => self.status.notice = Some(text),
                Update::Failed(msg) => {
                    tracing::warn!("{msg}");
                    self.status.error = Some(msg);
                }
            }
        }
        self.measure_speed();
    }

    /// Keeps the measured training speed for the time estimates.
    fn measure_speed(&mut self) {
        let Some(cfg) = &self.state.session_cfg else {
            return;
        };
        let params = prior_params(cfg.prior.width, cfg.prior.depth) as f64;
        if let Some(r) = self.state.prior_rate.per_sec()
            && self.state.prior_step() >= 100
        {
            self.settings.speed.prior = r * cfg.prior.batch as f64 * params;
        }
        if let Some(r) = self.state.align_rate.per_sec()
            && self.state.align_step() >= 50
        {
            let latents = (cfg.align.n_latents * cfg.align.mc) as f64;
            self.settings.speed.align = r * latents * params;
        }
    }

    /// A session's target or prior settings changed under it (outside the guarded actions):
    /// cancel the session.
    fn end_session_if_changed(&mut self) {
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
                "the target or the prior's settings changed: session ended (press Start)".into(),
            ));
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) -> Vec<Action> {
        let mut actions = Vec::new();
        if ctx.egui_wants_keyboard_input() {
            return actions;
        }
        if self.question.is_some() {
            if ctx.input(|i| i.key_pressed(Key::Enter)) {
                actions.push(Action::Confirm);
            }
            return actions;
        }
        let (space, r, undo) = ctx.input(|i| {
            (
                i.key_pressed(Key::Space),
                i.key_pressed(Key::R),
                i.modifiers.command && i.key_pressed(Key::Z),
            )
        });
        if space {
            actions.push(self.primary_action());
        }
        if r {
            actions.push(Action::Reset);
        }
        if undo && self.undo.is_some() {
            actions.push(Action::Undo);
        }
        actions
    }

    /// What space does: start, pause or resume.
    pub(super) fn primary_action(&self) -> Action {
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
                    self.status.notice = Some(
                        "no file chosen (without a desktop file-dialog service, type the path and press Load)"
                            .into(),
                    )
                }
            }
        }
        actions
    }

    fn receive_shots(&mut self, ctx: &egui::Context) {
        while let Ok((shot, image)) = self.shot_rx.try_recv() {
            let closing = matches!(shot, Shot::Closing(_));
            match self.save_shot(shot, &image) {
                Ok(path) => {
                    tracing::info!("wrote {}", path.display());
                    if !closing {
                        self.status.notice = Some(format!("wrote {}", path.display()));
                    }
                    self.exported.push(path);
                }
                Err(e) => {
                    tracing::error!("{e}");
                    self.status.error = Some(window_message(&e));
                }
            }
            if closing {
                self.close(ctx);
            }
        }
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
        if let Some(src) = &self.settings.points_source
            && !src.ends_with(", edited")
        {
            self.settings.points_source = Some(format!("{src}, edited"));
        }
    }

    /// Where panel `name` was drawn last frame (`nll`, `align`, `velocity`, `samples`, ...).
    pub fn panel_rect(&self, name: &str) -> Option<egui::Rect> {
        self.panel_rects
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
    }
}

fn is_toml(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// The settings after loading `path` over `cfg`: a session TOML replaces them, a points CSV
/// becomes the target.
fn read_session_or_points(path: &Path, cfg: &ToyConfig) -> Result<ToyConfig> {
    let mut cfg = cfg.clone();
    if is_toml(path) {
        cfg = ToyConfig::from_toml_file(path)?;
        if let Some(csv) = cfg.target_csv.take() {
            cfg.points = Some(read_points_csv(&csv)?);
        }
    } else {
        let before = cfg.builtin_target();
        cfg.points = Some(read_points_csv(path)?);
        cfg.target_csv = None;
        cfg.follow_target(before);
    }
    if let Some(points) = &cfg.points {
        Target::from_points("custom", points).map_err(|e| Error::input(path, e.to_string()))?;
    }
    Ok(cfg)
}

/// The last component of `path`, for messages.
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Interactive => "interactive",
        Preset::Paper => "paper",
    }
}

/// The window's label for a setting's TOML key.
fn control_label(key: &str) -> Option<&'static str> {
    Some(match key {
        "prior.width" => "Prior > width",
        "prior.depth" => "Prior > depth",
        "prior.batch" => "Prior > batch",
        "prior.lr" => "Prior > prior lr",
        "prior.steps" => "Prior > prior steps",
        "prior.ema" => "Prior > EMA",
        "align.n_latents" => "Alignment > latents",
        "align.steps" => "Alignment > align steps",
        "align.lr" => "Alignment > align lr",
        "align.mc" => "Alignment > mc samples",
        "eval.grid" => "Landscapes > heatmap grid",
        "eval.t_values" => "Landscapes > t values",
        _ => return None,
    })
}

/// An error as the window says it: settings by the names of their controls, not by their keys.
pub fn window_message(e: &Error) -> String {
    match e {
        Error::Setting { key, msg } => match control_label(key) {
            Some(label) => format!("{label}: {msg}"),
            None => e.to_string(),
        },
        _ => e.to_string(),
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

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let actions = self.window_ui(ui);
        for a in actions {
            self.apply(&ctx, a);
        }
        self.end_session_if_changed();
        self.sync_view();
        self.preview();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_is_no_burst_and_paused_time_does_not_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Rate::default();
        // 100 steps/s for a second.
        for k in 0..=100 {
            r.record_at(k, at(10 * k as u64));
        }
        let before = r.per_sec().unwrap();
        assert!((before - 100.0).abs() < 1.0, "{before}");
        // Paused for 10 s, then several reports drained in the frame right after the resume.
        r.pause_at(at(1000));
        r.resume_at(at(11_000));
        for k in 101..=104 {
            r.record_at(k, at(11_001));
        }
        let burst = r.per_sec().unwrap();
        assert!(burst < 110.0, "a resume reads as {burst} steps/s");
        // Another second at 100 steps/s: still 100, not halved by the pause.
        for k in 105..=200 {
            r.record_at(k, at(11_000 + 10 * (k - 100) as u64));
        }
        let after = r.per_sec().unwrap();
        assert!((after - 100.0).abs() < 3.0, "{after}");
        // Nothing is shown before half a second of running.
        let mut fresh = Rate::default();
        fresh.record_at(0, t0);
        fresh.record_at(5, t0);
        assert_eq!(fresh.per_sec(), None);
    }

    #[test]
    fn the_parameter_count_is_the_network_s() {
        use burn::module::Module;

        use crate::flow::VelocityMlpConfig;
        use crate::rng::{Stream, rng_for};
        for (w, d) in [(96, 3), (32, 2), (512, 4)] {
            let mut rng = rng_for(0, Stream::Init, 0);
            let m = VelocityMlpConfig::new(2, w, d).init(&mut rng, &Device::flex());
            assert_eq!(prior_params(w, d), m.num_params(), "width {w} depth {d}");
        }
    }

    #[test]
    fn durations_and_counts_read_well() {
        assert_eq!(duration(12.4), "12 s");
        assert_eq!(duration(200.0), "3 min 20 s");
        assert_eq!(duration(34_800.0), "9 h 40 min");
        assert_eq!(count(100_000), "100,000");
        assert_eq!(count(999), "999");
    }

    #[test]
    fn setting_errors_name_the_window_s_controls() {
        let e = Error::setting("prior.lr", "must be positive, got 0");
        assert_eq!(
            window_message(&e),
            "Prior > prior lr: must be positive, got 0"
        );
    }
}
