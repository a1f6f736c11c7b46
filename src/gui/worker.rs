//! The training thread behind the visualizer: it owns the session, trains the prior and aligns the
//! latents one step at a time, and reports plain data to the UI.
//!
//! A second thread computes the landscapes (heatmaps, velocity field, ODE samples) from snapshots of
//! the prior. Every map keeps its own clock: a map new under the current settings goes first,
//! cheapest first, then the map that has waited longest for what it costs. The ODE-based maps
//! (the prior's exact NLL, the paper's estimate) are computed a slice at a time, one map at a
//! time, so a slow map never holds the others back and still gets its turn. While the session trains, the thread rests [`ANALYSIS_GAP`] times
//! as long as it worked, so it takes about a fifth of the time.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flow::solver::Solver;
use crate::flow::store::load_prior;
use crate::flow::{FrozenPrior, VelocityMlp};
use crate::grid::{Heatmap, Point, Range2};
use crate::rng::{Stream, rng_for};
use crate::stats::{pearson, spearman};
use crate::toy::experiment::check_prior_fits;
use crate::toy::{AlignConfig, Event, SessionStage, ToyConfig, ToyRun, ToySession};

/// What the landscapes show, chosen in the UI; everything else comes from the run's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ViewRequest {
    /// Heatmap cells per side.
    pub grid: usize,
    /// Number of t values (evenly spaced in [0.1, 0.9]) the L_align heatmap averages over.
    pub t_values: usize,
    /// Also compute the prior's own exact NLL (ODE) on the grid (at most 40 x 40; slow).
    pub prior_nll: bool,
    /// Also compute the bound `C(y) - L_align` of METHOD.md section 3 on the grid (at most 40 x 40).
    pub bound: bool,
    /// Time at which the velocity field is drawn.
    pub velocity_t: f32,
    /// Arrows per side of the velocity field.
    pub velocity_grid: usize,
    /// ODE solver for the prior's samples.
    pub solver: Solver,
    /// ODE steps for the prior's samples.
    pub sample_steps: usize,
    /// Number of ODE samples.
    pub samples: usize,
    /// Number of ODE paths drawn.
    pub paths: usize,
    /// Seconds between refreshes of each map while the prior trains.
    pub refresh_secs: f32,
}

impl Default for ViewRequest {
    fn default() -> Self {
        ViewRequest {
            grid: 50,
            t_values: 20,
            prior_nll: false,
            bound: false,
            velocity_t: 0.5,
            velocity_grid: 21,
            solver: Solver::Euler,
            sample_steps: 100,
            samples: 1000,
            paths: 40,
            refresh_secs: 1.0,
        }
    }
}

/// The largest grid of the ODE-based heatmaps (their cost grows with the grid's area).
pub const SLOW_GRID_MAX: usize = 40;

/// Monte Carlo draws per cell of the bound's heatmap.
pub const BOUND_DRAWS: usize = 16;

/// Commands from the UI.
#[derive(Debug, Clone)]
pub enum Command {
    /// Starts a new session (cancelling any other); with `prior`, skips training and aligns at once.
    Start {
        cfg: Box<ToyConfig>,
        prior: Option<PathBuf>,
    },
    /// Shows a target before any session starts: its samples and its NLL map (cancels any
    /// session).
    Preview(Box<ToyConfig>),
    Pause,
    Resume,
    /// Freezes the prior as trained so far and starts aligning latents with `align`.
    Align(AlignConfig),
    /// Changes what the landscapes show; the maps it concerns are recomputed.
    View(ViewRequest),
    /// Cancels the session.
    Reset,
}

/// The stage of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Stage {
    #[default]
    Idle,
    Prior,
    Align,
    Done,
}

/// The maps computed from a prior snapshot, each on its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKind {
    /// The velocity field at one time.
    Velocity,
    /// ODE samples of the prior and some of their paths.
    Samples,
    /// The L_align heatmap.
    Align,
    /// The prior's own exact NLL (ODE), a slice at a time.
    PriorNll,
    /// `-(C(y) - L_align)`, the paper's estimate of METHOD.md section 3 (not a bound), on the NLL
    /// scale, a slice at a time.
    Bound,
}

impl MapKind {
    pub const ALL: [MapKind; 5] = [
        MapKind::Velocity,
        MapKind::Samples,
        MapKind::Align,
        MapKind::PriorNll,
        MapKind::Bound,
    ];

    /// Whether `view` asks for this map.
    pub fn enabled(self, view: &ViewRequest) -> bool {
        match self {
            MapKind::PriorNll => view.prior_nll,
            MapKind::Bound => view.bound,
            _ => true,
        }
    }

    /// A first guess at a refresh's seconds (the cheapest-first order before anything is timed).
    fn guess_secs(self) -> f64 {
        match self {
            MapKind::Velocity => 0.01,
            MapKind::Samples => 0.1,
            MapKind::Align => 0.2,
            MapKind::Bound => 5.0,
            MapKind::PriorNll => 10.0,
        }
    }

    /// Whether the map is computed a slice of the grid at a time.
    fn sliced(self) -> bool {
        matches!(self, MapKind::PriorNll | MapKind::Bound)
    }

    /// The settings of `view` this map depends on: a change of them makes it due at once.
    fn view_key(self, view: &ViewRequest) -> String {
        match self {
            MapKind::Velocity => {
                format!("{} {} {}", view.grid, view.velocity_t, view.velocity_grid)
            }
            MapKind::Samples => format!(
                "{:?} {} {} {}",
                view.solver, view.sample_steps, view.samples, view.paths
            ),
            MapKind::Align => format!("{} {}", view.grid, view.t_values),
            MapKind::PriorNll | MapKind::Bound => format!("{}", view.grid.min(SLOW_GRID_MAX)),
        }
    }
}

/// What a map holds.
#[derive(Debug, Clone)]
pub enum MapData {
    /// A heatmap; for [`MapKind::Align`] also its (Pearson, Spearman) correlation with the
    /// target's NLL map over the finite cells.
    Heat {
        map: Heatmap,
        correlation: Option<(f64, f64)>,
    },
    /// `(z, v(z, t))` arrows at time `t`.
    Velocity { arrows: Vec<(Point, Point)>, t: f32 },
    /// ODE samples of the prior and the paths of some of them.
    Samples {
        samples: Vec<Point>,
        paths: Vec<Vec<Point>>,
    },
}

/// One map of one prior snapshot.
#[derive(Debug, Clone)]
pub struct MapUpdate {
    pub kind: MapKind,
    /// The prior step of the snapshot the map was computed from.
    pub prior_step: usize,
    /// Seconds the map took (for a sliced map, the sum of its slices).
    pub secs: f64,
    pub data: MapData,
}

/// The most target samples the window draws: a seeded random subset of the reference samples,
/// so every component of the target shows (the samples are generated component by component).
pub const SHOWN_SAMPLES: usize = 2000;

/// Progress reports to the UI: plain data only.
#[derive(Debug, Clone)]
pub enum Update {
    /// The target on show (a preview, or a session's): a subset of its samples and the view range
    /// (normalised coordinates).
    Target {
        name: String,
        samples: Vec<Point>,
        range: Range2,
    },
    /// A session started with these step budgets.
    Session {
        prior_steps: usize,
        align_steps: usize,
    },
    /// The target's NLL on the heatmap grid (it needs no prior).
    TargetMap(Heatmap),
    Stage(Stage),
    Paused(bool),
    /// A step of the session (the same events `flowalign toy` records).
    Progress(Event),
    Map(Box<MapUpdate>),
    /// How much (0..1) of a sliced map of the prior at `prior_step` is done.
    MapProgress {
        kind: MapKind,
        prior_step: usize,
        done: f32,
    },
    /// Something the user should know that is not an error; one line.
    Notice(String),
    /// The session stopped on an error (divergence, bad input); the message is one line.
    Failed(String),
}

/// An update tagged with the session it belongs to, so stale reports can be dropped.
#[derive(Debug, Clone)]
pub struct Tagged {
    pub session: u64,
    pub update: Update,
}

type Repaint = Arc<dyn Fn() + Send + Sync>;

/// Handle to the training thread; dropping it stops both threads promptly.
pub struct Worker {
    tx: Option<Sender<Command>>,
    rx: Receiver<Tagged>,
    session: Arc<Mutex<u64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Spawns the training and analysis threads; `repaint` is called after each report.
    pub fn spawn(device: Device, repaint: impl Fn() + Send + Sync + 'static) -> Worker {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (up_tx, up_rx) = mpsc::channel();
        let (an_tx, an_rx) = mpsc::channel::<ToAnalysis>();
        let repaint: Repaint = Arc::new(repaint);
        let session = Arc::new(Mutex::new(0));
        let live = Arc::new(Mutex::new(Live::default()));
        let wants = Arc::new(AtomicBool::new(false));
        let analysis = {
            let mut analyst = Analyst {
                rx: an_rx,
                tx: up_tx.clone(),
                repaint: repaint.clone(),
                live: live.clone(),
                wants: wants.clone(),
                ctx: None,
                view: ViewRequest::default(),
                nll: None,
                target_map_sent: false,
                prior: None,
                clocks: Default::default(),
                slice: None,
                rest_until: Instant::now(),
            };
            std::thread::Builder::new()
                .name("flowalign-analysis".into())
                .spawn(move || analyst.run())
                .expect("spawning a thread")
        };
        let trainer = {
            let session = session.clone();
            std::thread::Builder::new()
                .name("flowalign-train".into())
                .spawn(move || {
                    let mut t = Trainer {
                        device,
                        cmd_rx,
                        up_tx,
                        an_tx,
                        live,
                        wants,
                        repaint,
                        session,
                        state: None,
                    };
                    t.run();
                })
                .expect("spawning a thread")
        };
        Worker {
            tx: Some(cmd_tx),
            rx: up_rx,
            session: session.clone(),
            threads: vec![trainer, analysis],
        }
    }

    /// Sends a command; a stopped worker ignores it.
    pub fn send(&self, cmd: Command) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(cmd);
        }
    }

    /// The updates received so far for the current session.
    pub fn drain(&self) -> Vec<Update> {
        let current = *self.session.lock().unwrap_or_else(|e| e.into_inner());
        self.rx
            .try_iter()
            .filter(|t| t.session == current)
            .map(|t| t.update)
            .collect()
    }

    /// The current session number (increments on every start, preview and reset).
    pub fn session(&self) -> u64 {
        *self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether both threads still run (a panic in either ends it).
    pub fn alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the command channel ends the training thread at its next step, which closes the
        // analysis channel and ends the analysis thread after its current slice.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// While the session trains, the analysis thread rests this many times as long as it worked.
pub const ANALYSIS_GAP: f64 = 4.0;

/// The seconds one slice of a sliced map aims at.
const SLICE_SECS: f64 = 0.25;

/// What the training thread publishes for the analysis thread after every step.
#[derive(Debug, Clone, Copy, Default)]
struct Live {
    session: u64,
    prior_step: usize,
    /// The prior is frozen (alignment, or done).
    frozen: bool,
    /// The session is stepping (not paused, not done).
    running: bool,
}

/// A target (and possibly a session) for the analysis thread.
struct Context {
    session: u64,
    run: Arc<ToyRun>,
    reference: Arc<Vec<Point>>,
    /// Identifies the target's NLL map across sessions (see [`target_key`]).
    key: String,
    /// False for a preview: only the target's NLL map.
    needs_prior: bool,
}

/// A prior as the training thread had it at `step`.
struct Snapshot {
    session: u64,
    prior: VelocityMlp,
    step: usize,
    received: Instant,
}

enum ToAnalysis {
    /// A new target or session; `None` stops all work.
    Context(Option<Context>),
    View(ViewRequest),
    /// Boxed: a network is far larger than the other messages.
    Prior(Box<Snapshot>),
}

struct State {
    session: ToySession,
    paused: bool,
}

impl State {
    fn training(&self) -> bool {
        !self.paused && !self.session.is_done()
    }
}

struct Trainer {
    device: Device,
    cmd_rx: Receiver<Command>,
    up_tx: Sender<Tagged>,
    an_tx: Sender<ToAnalysis>,
    live: Arc<Mutex<Live>>,
    wants: Arc<AtomicBool>,
    repaint: Repaint,
    session: Arc<Mutex<u64>>,
    state: Option<State>,
}

impl Trainer {
    fn run(&mut self) {
        loop {
            let working = self.state.as_ref().is_some_and(State::training);
            let cmd = if working {
                match self.cmd_rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                // Idle or paused: wake up now and then to answer the analysis thread.
                let wait = if self.state.is_some() {
                    Duration::from_millis(20)
                } else {
                    Duration::from_secs(3600)
                };
                match self.cmd_rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if let Some(cmd) = cmd {
                self.handle(cmd);
            } else if working && let Err(e) = self.step() {
                self.fail(e);
            }
            self.publish();
        }
    }

    fn session(&self) -> u64 {
        *self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, update: Update) {
        let _ = self.up_tx.send(Tagged {
            session: self.session(),
            update,
        });
        (self.repaint)();
    }

    /// Tells the analysis thread where the session stands, and hands it the prior when asked.
    fn publish(&mut self) {
        let session = self.session();
        let live = match &self.state {
            Some(s) => Live {
                session,
                prior_step: s.session.prior_step(),
                frozen: s.session.stage() != SessionStage::Prior,
                running: s.training(),
            },
            None => Live {
                session,
                ..Live::default()
            },
        };
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = live;
        if self.wants.swap(false, Ordering::AcqRel)
            && let Some(s) = &self.state
        {
            let (prior, step) = s.session.prior();
            let _ = self.an_tx.send(ToAnalysis::Prior(Box::new(Snapshot {
                session,
                prior,
                step,
                received: Instant::now(),
            })));
        }
    }

    fn fail(&mut self, e: Error) {
        self.send(Update::Failed(e.to_string()));
        if let Some(s) = &mut self.state {
            s.paused = true;
        }
        self.send(Update::Paused(true));
    }

    fn new_session(&mut self) {
        self.state = None;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Start { cfg, prior } => {
                self.new_session();
                if let Err(e) = self.start(*cfg, prior) {
                    self.send(Update::Failed(e.to_string()));
                    self.send(Update::Stage(Stage::Idle));
                }
            }
            Command::Preview(cfg) => {
                self.new_session();
                let _ = self.an_tx.send(ToAnalysis::Context(None));
                if let Err(e) = self.preview(*cfg) {
                    self.send(Update::Failed(e.to_string()));
                }
            }
            Command::Pause | Command::Resume => {
                let pause = matches!(cmd, Command::Pause);
                if let Some(s) = &mut self.state
                    && !s.session.is_done()
                {
                    s.paused = pause;
                    self.send(Update::Paused(pause));
                }
            }
            Command::Align(align) => {
                if let Err(e) = self.realign(align) {
                    self.fail(e);
                }
            }
            Command::View(view) => {
                let _ = self.an_tx.send(ToAnalysis::View(view));
            }
            Command::Reset => {
                self.new_session();
                let _ = self.an_tx.send(ToAnalysis::Context(None));
                self.send(Update::Stage(Stage::Idle));
            }
        }
    }

    /// The target of `cfg`, its samples and view range, and the context the analysis thread
    /// needs for its maps.
    fn show_target(&self, cfg: ToyConfig, needs_prior: bool) -> Result<(Arc<ToyRun>, Context)> {
        let key = target_key(&cfg);
        let run = Arc::new(ToyRun::new(cfg, self.device.clone(), "gui")?);
        let reference = run.reference_samples();
        self.send(Update::Target {
            name: run.target.name.clone(),
            samples: shown_subset(&reference, run.cfg.seed),
            range: run.view_range(&reference),
        });
        let ctx = Context {
            session: self.session(),
            run: run.clone(),
            reference: Arc::new(reference),
            key,
            needs_prior,
        };
        Ok((run, ctx))
    }

    fn preview(&mut self, cfg: ToyConfig) -> Result<()> {
        let (_, ctx) = self.show_target(cfg, false)?;
        let _ = self.an_tx.send(ToAnalysis::Context(Some(ctx)));
        Ok(())
    }

    fn start(&mut self, cfg: ToyConfig, prior: Option<PathBuf>) -> Result<()> {
        let (run, ctx) = self.show_target(cfg, true)?;
        let loaded = match &prior {
            Some(path) => {
                let (model, meta) = load_prior(path, &self.device)?;
                check_prior_fits(&meta, &run.target, path)?;
                Some((model, meta))
            }
            None => None,
        };
        self.send(Update::Session {
            prior_steps: run.cfg.prior.steps,
            align_steps: run.cfg.align.steps,
        });
        let (session, start) = match loaded {
            Some((model, meta)) => {
                let (session, start) = ToySession::with_prior(run, model, meta);
                (session, Some(start))
            }
            None => (ToySession::new(run), None),
        };
        self.state = Some(State {
            session,
            paused: false,
        });
        self.publish();
        let _ = self.an_tx.send(ToAnalysis::Context(Some(ctx)));
        match start {
            Some(event) => self.aligning(event),
            None => self.send(Update::Stage(Stage::Prior)),
        }
        Ok(())
    }

    /// Freezes the prior as trained so far and aligns fresh latents with `align`.
    fn realign(&mut self, align: AlignConfig) -> Result<()> {
        let Some(s) = &mut self.state else {
            return Ok(());
        };
        let event = s.session.realign(align)?;
        s.paused = false;
        self.aligning(event);
        Ok(())
    }

    /// Reports an alignment start (after Start with a prior, a realign, or a spent prior budget).
    fn aligning(&mut self, event: Event) {
        self.send(Update::Stage(Stage::Align));
        self.send(Update::Paused(false));
        self.send(Update::Progress(event));
    }

    fn step(&mut self) -> Result<()> {
        let Some(s) = &mut self.state else {
            return Ok(());
        };
        let events = s.session.step()?;
        let flat = s.session.stopped_flat();
        for event in events {
            match event {
                Event::AlignStart { prior_step, .. } => {
                    if flat == Some(prior_step) {
                        self.send(Update::Notice(format!(
                            "the prior's loss stopped falling at step {prior_step}: aligning now"
                        )));
                    }
                    self.aligning(event);
                }
                Event::Done => {
                    self.send(Update::Progress(event));
                    self.send(Update::Stage(Stage::Done));
                }
                _ => self.send(Update::Progress(event)),
            }
        }
        Ok(())
    }
}

/// What identifies a target's NLL map apart from the grid: the target, its points, the seed (of
/// the reference samples behind the view range) and the view.
pub fn target_key(cfg: &ToyConfig) -> String {
    let mut h = DefaultHasher::new();
    if let Some(points) = &cfg.points {
        points.len().hash(&mut h);
        for p in points {
            p[0].to_bits().hash(&mut h);
            p[1].to_bits().hash(&mut h);
        }
    }
    format!(
        "{:?} {:?} {:x} {} {:?}",
        cfg.target,
        cfg.target_csv,
        h.finish(),
        cfg.seed,
        cfg.eval.view
    )
}

/// A seeded random subset of at most [`SHOWN_SAMPLES`] of `reference`, in their original order.
pub fn shown_subset(reference: &[Point], seed: u64) -> Vec<Point> {
    if reference.len() <= SHOWN_SAMPLES {
        return reference.to_vec();
    }
    let mut rng = rng_for(seed, Stream::Reference, 3);
    let mut picked = rand::seq::index::sample(&mut rng, reference.len(), SHOWN_SAMPLES).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| reference[i]).collect()
}

/// When a map was last computed, of which prior step, under which settings, and what it cost.
#[derive(Debug, Clone, Default)]
struct Clock {
    step: Option<usize>,
    view_key: String,
    at: Option<Instant>,
    secs: Option<f64>,
}

/// A sliced map in progress: its own snapshot of the prior and the values so far.
struct Slice {
    kind: MapKind,
    /// Tabulated for the bound map (its draws are at per-row times), once per map.
    prior: FrozenPrior,
    step: usize,
    view_key: String,
    xs: Vec<f32>,
    ys: Vec<f32>,
    points: Vec<Point>,
    values: Vec<f32>,
    secs: f64,
    /// Points in the next slice.
    next: usize,
    /// When its first slice was computed.
    started: Instant,
}

enum Work {
    /// Something was done; look again at once.
    Did,
    /// Nothing to do for up to this long (or until a message arrives).
    Wait(Duration),
}

/// The analysis thread: computes the target's NLL map, then the prior's maps, cheapest due first.
struct Analyst {
    rx: Receiver<ToAnalysis>,
    tx: Sender<Tagged>,
    repaint: Repaint,
    live: Arc<Mutex<Live>>,
    wants: Arc<AtomicBool>,
    ctx: Option<Context>,
    view: ViewRequest,
    /// The last target NLL map: its target key, grid and values.
    nll: Option<(String, usize, Heatmap)>,
    target_map_sent: bool,
    prior: Option<Snapshot>,
    clocks: std::collections::HashMap<MapKind, Clock>,
    slice: Option<Slice>,
    rest_until: Instant,
}

impl Analyst {
    fn run(&mut self) {
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.absorb(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if let Work::Wait(d) = self.work() {
                match self.rx.recv_timeout(d) {
                    Ok(m) => self.absorb(m),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn absorb(&mut self, msg: ToAnalysis) {
        match msg {
            ToAnalysis::Context(ctx) => {
                self.ctx = ctx;
                self.target_map_sent = false;
                self.prior = None;
                self.clocks.clear();
                self.slice = None;
                self.rest_until = Instant::now();
            }
            ToAnalysis::View(view) => {
                if view.grid != self.view.grid {
                    self.target_map_sent = false;
                }
                self.view = view;
            }
            ToAnalysis::Prior(p) => self.prior = Some(*p),
        }
    }

    fn send(&self, session: u64, update: Update) {
        let _ = self.tx.send(Tagged { session, update });
        (self.repaint)();
    }

    /// The target's NLL map on the current grid (cached across sessions of the same target).
    fn target_map(&mut self) -> Option<Heatmap> {
        let ctx = self.ctx.as_ref()?;
        let grid = self.view.grid;
        match &self.nll {
            Some((key, g, map)) if *key == ctx.key && *g == grid => Some(map.clone()),
            _ => {
                let map = ctx.run.nll_heatmap(&ctx.reference, grid);
                self.nll = Some((ctx.key.clone(), grid, map.clone()));
                Some(map)
            }
        }
    }

    fn work(&mut self) -> Work {
        let Some(ctx) = &self.ctx else {
            return Work::Wait(Duration::from_secs(3600));
        };
        let session = ctx.session;
        if !self.target_map_sent {
            if let Some(map) = self.target_map() {
                self.send(session, Update::TargetMap(map));
            }
            self.target_map_sent = true;
            return Work::Did;
        }
        if !ctx.needs_prior {
            return Work::Wait(Duration::from_secs(3600));
        }
        let live = *self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.session != session {
            return Work::Wait(Duration::from_millis(20));
        }
        let now = Instant::now();
        if now < self.rest_until {
            return Work::Wait(self.rest_until - now);
        }
        if self.slice.as_ref().is_some_and(|s| {
            s.view_key != s.kind.view_key(&self.view)
                || !s.kind.enabled(&self.view)
                || (live.frozen && s.step != live.prior_step)
        }) {
            self.slice = None;
        }
        let Some(kind) = self.next_due(&live) else {
            return Work::Wait(Duration::from_millis(50));
        };
        let started = Instant::now();
        let continuing = self.slice.as_ref().is_some_and(|s| s.kind == kind);
        if !continuing {
            // A fresh map needs a fresh prior: ask the training thread, which answers between
            // two steps.
            let training = live.running && !live.frozen;
            let fresh = self.prior.as_ref().is_some_and(|p| {
                p.session == session
                    && (p.step == live.prior_step
                        || (training && p.received.elapsed() < Duration::from_millis(250)))
            });
            if !fresh {
                self.wants.store(true, Ordering::Release);
                return Work::Wait(Duration::from_millis(20));
            }
        }
        self.compute(kind, session);
        if live.running {
            let worked = started.elapsed().as_secs_f64();
            self.rest_until = Instant::now() + Duration::from_secs_f64(ANALYSIS_GAP * worked);
        }
        Work::Did
    }

    /// The map to work on next, of those due: enabled and either never computed under the
    /// current settings, of an older prior (at most once per `refresh_secs` while the prior
    /// trains), or a sliced map in progress (another sliced map waits until it is done).
    ///
    /// Maps new under the current settings go first, cheapest first; after that (and for a sliced
    /// map once begun) the map that has waited longest for what it costs, so a cheap map
    /// refreshes often and a slow one still gets its turn.
    fn next_due(&self, live: &Live) -> Option<MapKind> {
        let training = live.running && !live.frozen;
        let refresh = Duration::from_secs_f32(self.view.refresh_secs.max(0.05));
        // (new under these settings, urgency, kind).
        let mut due: Vec<(bool, f64, MapKind)> = Vec::new();
        for kind in MapKind::ALL {
            if !kind.enabled(&self.view) {
                continue;
            }
            let clock = self.clocks.get(&kind).cloned().unwrap_or_default();
            let cost = clock.secs.unwrap_or_else(|| kind.guess_secs()).max(1e-6);
            let new = clock.view_key != kind.view_key(&self.view);
            let urgency = if new {
                -cost
            } else {
                clock
                    .at
                    .map_or(f64::INFINITY, |at| at.elapsed().as_secs_f64() / cost)
            };
            if let Some(s) = self.slice.as_ref().filter(|s| s.kind == kind) {
                // Begun, it waits its turn like a refresh: a slow new map must not hold back
                // the refreshes of the cheap ones for all the time it takes.
                let since = clock.at.unwrap_or(s.started).elapsed().as_secs_f64();
                due.push((false, since / cost, kind));
                continue;
            }
            // One sliced map at a time: starting the other would throw the half-done one away,
            // and two slow maps taking turns would never finish.
            if kind.sliced() && self.slice.is_some() {
                continue;
            }
            let older = clock.step != Some(live.prior_step);
            let waited = clock.at.is_none_or(|at| at.elapsed() >= refresh);
            if new || (older && (!training || waited)) {
                due.push((new, urgency, kind));
            }
        }
        due.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
        due.first().map(|d| d.2)
    }

    fn compute(&mut self, kind: MapKind, session: u64) {
        let Some(ctx) = &self.ctx else {
            return;
        };
        let (run, reference) = (ctx.run.clone(), ctx.reference.clone());
        if kind.sliced() {
            self.slice_step(kind, session, &run, &reference);
            return;
        }
        let Some(snapshot) = &self.prior else {
            return;
        };
        let (prior, step) = (&snapshot.prior, snapshot.step);
        let start = Instant::now();
        let view = &self.view;
        let data = match kind {
            MapKind::Align => {
                let map = run.align_heatmap(prior, &reference, view.grid, view.t_values);
                let nll = self
                    .nll
                    .as_ref()
                    .filter(|(_, g, _)| *g == view.grid)
                    .map(|n| &n.2);
                let correlation = nll.map(|nll| correlation(nll, &map));
                MapData::Heat { map, correlation }
            }
            MapKind::Velocity => MapData::Velocity {
                arrows: run.velocity_at(prior, &reference, view.velocity_t, view.velocity_grid),
                t: view.velocity_t,
            },
            MapKind::Samples => {
                let (samples, paths) = run.prior_paths(
                    prior,
                    view.samples,
                    view.sample_steps,
                    view.solver,
                    view.paths,
                );
                MapData::Samples { samples, paths }
            }
            MapKind::PriorNll | MapKind::Bound => unreachable!("sliced maps are computed above"),
        };
        let secs = start.elapsed().as_secs_f64();
        self.finish(kind, session, step, secs, kind.view_key(view), data);
    }

    fn finish(
        &mut self,
        kind: MapKind,
        session: u64,
        step: usize,
        secs: f64,
        view_key: String,
        data: MapData,
    ) {
        self.clocks.insert(
            kind,
            Clock {
                step: Some(step),
                view_key,
                at: Some(Instant::now()),
                secs: Some(secs),
            },
        );
        let update = MapUpdate {
            kind,
            prior_step: step,
            secs,
            data,
        };
        self.send(session, Update::Map(Box::new(update)));
    }

    /// Computes the next slice of a sliced map (starting it on the current snapshot if needed).
    fn slice_step(&mut self, kind: MapKind, session: u64, run: &ToyRun, reference: &[Point]) {
        if self.slice.as_ref().is_none_or(|s| s.kind != kind) {
            let Some(snapshot) = &self.prior else {
                return;
            };
            let (xs, ys) = run.grid_axes(reference, self.view.grid.min(SLOW_GRID_MAX));
            let points = Heatmap::points(&xs, &ys);
            let prior = snapshot.prior.clone();
            self.slice = Some(Slice {
                kind,
                prior: match kind {
                    MapKind::Bound => FrozenPrior::new(prior),
                    _ => FrozenPrior::exact(prior),
                },
                step: snapshot.step,
                view_key: kind.view_key(&self.view),
                values: Vec::with_capacity(points.len()),
                xs,
                ys,
                points,
                secs: 0.0,
                next: 32,
                started: Instant::now(),
            });
        }
        let Some(s) = &mut self.slice else {
            return;
        };
        let from = s.values.len();
        let to = (from + s.next).min(s.points.len());
        let start = Instant::now();
        let chunk = &s.points[from..to];
        let values = match kind {
            MapKind::PriorNll => run.prior_nll_at(s.prior.mlp(), chunk),
            _ => run
                .bound_at(&s.prior, chunk, BOUND_DRAWS, from as u64)
                .into_iter()
                .map(|v| -v)
                .collect(),
        };
        let secs = start.elapsed().as_secs_f64();
        s.values.extend(values);
        s.secs += secs;
        let per_point = secs / (to - from).max(1) as f64;
        s.next = ((SLICE_SECS / per_point.max(1e-9)) as usize).clamp(16, 4096);
        if s.values.len() < s.points.len() {
            let done = s.values.len() as f32 / s.points.len() as f32;
            let step = s.step;
            self.send(
                session,
                Update::MapProgress {
                    kind,
                    prior_step: step,
                    done,
                },
            );
            return;
        }
        let Some(s) = self.slice.take() else {
            return;
        };
        let map = Heatmap {
            xs: s.xs,
            ys: s.ys,
            values: s.values,
        };
        let data = MapData::Heat {
            map,
            correlation: None,
        };
        self.finish(kind, session, s.step, s.secs, s.view_key, data);
    }
}

/// Pearson and Spearman correlation of two maps on the same grid, over cells finite in both.
fn correlation(a: &Heatmap, b: &Heatmap) -> (f64, f64) {
    let (x, y): (Vec<f32>, Vec<f32>) = a
        .values
        .iter()
        .zip(&b.values)
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .map(|(a, b)| (*a, *b))
        .unzip();
    (pearson(&x, &y), spearman(&x, &y))
}
