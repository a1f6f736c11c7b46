//! The training thread behind the visualizer: it owns the run, trains the prior and aligns the
//! latents one step at a time, and reports plain data to the UI.
//!
//! A second thread computes the landscapes (heatmaps, velocity field, ODE samples) from snapshots of
//! the prior, at a bounded duty cycle so that it never stalls training for long.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flow::VelocityMlp;
use crate::flow::solver::Solver;
use crate::flow::store::load_prior;
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
    /// Seconds between landscape refreshes while the prior trains.
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

/// Commands from the UI.
#[derive(Debug, Clone)]
pub enum Command {
    /// Starts a new session (cancelling any other); with `prior`, skips training and aligns at once.
    Start {
        cfg: Box<ToyConfig>,
        prior: Option<PathBuf>,
    },
    Pause,
    Resume,
    /// Freezes the prior as trained so far and starts aligning latents with `align`.
    Align(AlignConfig),
    /// Changes what the landscapes show; recomputes them.
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

/// The landscapes of one prior snapshot.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The prior step the snapshot was taken at.
    pub prior_step: usize,
    /// NLL of the target density.
    pub nll: Heatmap,
    /// L_align of the prior.
    pub align: Heatmap,
    /// The prior's own exact NLL, when asked for.
    pub prior_nll: Option<Heatmap>,
    /// `-(C(y) - L_align(y))`, the bound of METHOD.md section 3 on the NLL scale, when asked for.
    pub neg_bound: Option<Heatmap>,
    /// Correlations between the NLL and L_align maps (finite cells).
    pub pearson: f64,
    pub spearman: f64,
    /// `(z, v(z, t))` arrows at `velocity_t`.
    pub velocity: Vec<(Point, Point)>,
    pub velocity_t: f32,
    /// ODE samples of the prior and the paths of some of them.
    pub samples: Vec<Point>,
    pub paths: Vec<Vec<Point>>,
    /// Seconds the L_align heatmap took, and the whole analysis.
    pub align_map_secs: f64,
    pub total_secs: f64,
}

/// The most target samples the window draws: a seeded random subset of the reference samples,
/// so every component of the target shows (the samples are generated component by component).
pub const SHOWN_SAMPLES: usize = 2000;

/// Progress reports to the UI: plain data only.
#[derive(Debug, Clone)]
pub enum Update {
    /// A session started: a subset of the target's samples and the view range (normalised
    /// coordinates).
    Session {
        target: String,
        samples: Vec<Point>,
        range: Range2,
        prior_steps: usize,
        align_steps: usize,
    },
    Stage(Stage),
    Paused(bool),
    /// A step of the session (the same events `flowalign toy` records).
    Progress(Event),
    Analysis(Box<Analysis>),
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
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let repaint: Repaint = Arc::new(repaint);
        let session = Arc::new(Mutex::new(0));
        let busy = Arc::new(Mutex::new(AnalysisClock::default()));
        let analysis = {
            let (up_tx, repaint, busy) = (up_tx.clone(), repaint.clone(), busy.clone());
            std::thread::Builder::new()
                .name("flowalign-analysis".into())
                .spawn(move || analysis_loop(job_rx, up_tx, repaint, busy))
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
                        job_tx,
                        busy,
                        repaint,
                        session,
                        state: None,
                        view: ViewRequest::default(),
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

    /// The current session number (increments on every start and reset).
    pub fn session(&self) -> u64 {
        *self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the command channel ends the training thread at its next step, which closes the
        // job channel and ends the analysis thread after its current job.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether the analysis thread is working, and how long its last job took.
#[derive(Debug, Default)]
struct AnalysisClock {
    busy: bool,
    last_secs: f64,
}

/// While the prior trains, a landscape refresh waits this many times the last one's duration.
const ANALYSIS_GAP: f64 = 4.0;

struct Job {
    session: u64,
    run: Arc<ToyRun>,
    reference: Arc<Vec<Point>>,
    prior: VelocityMlp,
    prior_step: usize,
    view: ViewRequest,
}

struct State {
    session: ToySession,
    reference: Arc<Vec<Point>>,
    paused: bool,
    /// When the landscapes were last requested, and whether the current prior still needs them.
    last_job: Option<Instant>,
    stale: bool,
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
    job_tx: Sender<Job>,
    busy: Arc<Mutex<AnalysisClock>>,
    repaint: Repaint,
    session: Arc<Mutex<u64>>,
    state: Option<State>,
    view: ViewRequest,
}

impl Trainer {
    fn run(&mut self) {
        loop {
            let working = self.state.as_ref().is_some_and(State::training);
            let waiting_on_analysis = self.state.as_ref().is_some_and(|s| s.stale);
            let cmd = if working {
                match self.cmd_rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                // Idle: wake up now and then to schedule a pending landscape refresh.
                let wait = if waiting_on_analysis {
                    Duration::from_millis(50)
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
                continue;
            }
            if working && let Err(e) = self.step() {
                self.fail(e);
            }
            self.schedule_analysis();
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
            Command::Pause | Command::Resume => {
                let pause = matches!(cmd, Command::Pause);
                if let Some(s) = &mut self.state {
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
                self.view = view;
                if let Some(s) = &mut self.state {
                    s.stale = true;
                    s.last_job = None;
                }
            }
            Command::Reset => {
                self.new_session();
                self.send(Update::Stage(Stage::Idle));
            }
        }
    }

    fn start(&mut self, cfg: ToyConfig, prior: Option<PathBuf>) -> Result<()> {
        let run = Arc::new(ToyRun::new(cfg, self.device.clone(), "gui")?);
        let loaded = match &prior {
            Some(path) => {
                let (model, meta) = load_prior(path, &self.device)?;
                check_prior_fits(&meta, &run.target, path)?;
                Some((model, meta))
            }
            None => None,
        };
        let reference = run.reference_samples();
        self.send(Update::Session {
            target: run.target.name.clone(),
            samples: shown_subset(&reference, run.cfg.seed),
            range: run.view_range(&reference),
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
            reference: Arc::new(reference),
            paused: false,
            last_job: None,
            stale: true,
        });
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
        if let Some(s) = &mut self.state {
            s.stale = true;
            s.last_job = None;
        }
        self.send(Update::Stage(Stage::Align));
        self.send(Update::Paused(false));
        self.send(Update::Progress(event));
    }

    fn step(&mut self) -> Result<()> {
        let Some(s) = &mut self.state else {
            return Ok(());
        };
        for event in s.session.step()? {
            match event {
                Event::AlignStart { .. } => self.aligning(event),
                Event::Done => {
                    self.send(Update::Progress(event));
                    self.send(Update::Stage(Stage::Done));
                }
                _ => self.send(Update::Progress(event)),
            }
        }
        Ok(())
    }

    /// Hands the analysis thread a snapshot of the prior when it is idle and the duty cycle allows.
    fn schedule_analysis(&mut self) {
        let session = self.session();
        let Some(s) = &mut self.state else {
            return;
        };
        let last_secs = {
            let clock = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if clock.busy {
                return;
            }
            clock.last_secs
        };
        let training = s.session.stage() == SessionStage::Prior && !s.paused;
        if !training && !s.stale {
            return;
        }
        if let Some(last) = s.last_job {
            // While the prior trains, landscapes take at most about a fifth of the time.
            let gap = f64::from(self.view.refresh_secs).max(ANALYSIS_GAP * last_secs);
            if last.elapsed().as_secs_f64() < gap {
                return;
            }
        }
        let (prior, prior_step) = s.session.prior();
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).busy = true;
        let job = Job {
            session,
            run: s.session.run().clone(),
            reference: s.reference.clone(),
            prior,
            prior_step,
            view: self.view.clone(),
        };
        s.last_job = Some(Instant::now());
        s.stale = false;
        if self.job_tx.send(job).is_err() {
            self.busy.lock().unwrap_or_else(|e| e.into_inner()).busy = false;
        }
    }
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

/// Computes the landscapes of each job; the target's NLL map is cached per session and grid.
fn analysis_loop(
    rx: Receiver<Job>,
    tx: Sender<Tagged>,
    repaint: Repaint,
    clock: Arc<Mutex<AnalysisClock>>,
) {
    let mut nll_cache: Option<((u64, usize, String), Heatmap)> = None;
    while let Ok(mut job) = rx.recv() {
        // Skip to the newest job.
        while let Ok(newer) = rx.try_recv() {
            job = newer;
        }
        let key = (job.session, job.view.grid, job.run.target.name.clone());
        let nll = match &nll_cache {
            Some((k, map)) if *k == key => map.clone(),
            _ => {
                let map = job.run.nll_heatmap(&job.reference, job.view.grid);
                nll_cache = Some((key, map.clone()));
                map
            }
        };
        let analysis = analyse(&job, nll);
        let secs = analysis.total_secs;
        let _ = tx.send(Tagged {
            session: job.session,
            update: Update::Analysis(Box::new(analysis)),
        });
        *clock.lock().unwrap_or_else(|e| e.into_inner()) = AnalysisClock {
            busy: false,
            last_secs: secs,
        };
        repaint();
    }
}

fn analyse(job: &Job, nll: Heatmap) -> Analysis {
    let start = Instant::now();
    let (run, reference, prior, view) = (&job.run, &job.reference[..], &job.prior, &job.view);
    let align = run.align_heatmap(prior, reference, view.grid, view.t_values);
    let align_map_secs = start.elapsed().as_secs_f64();
    let (a, b): (Vec<f32>, Vec<f32>) = nll
        .values
        .iter()
        .zip(&align.values)
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .map(|(a, b)| (*a, *b))
        .unzip();
    let slow_grid = view.grid.min(SLOW_GRID_MAX);
    let prior_nll = view
        .prior_nll
        .then(|| run.prior_nll_heatmap(prior, reference, slow_grid));
    let neg_bound = view.bound.then(|| {
        let mut map = run.bound_heatmap(prior, reference, slow_grid, 16);
        map.values.iter_mut().for_each(|v| *v = -*v);
        map
    });
    let velocity = run.velocity_at(prior, reference, view.velocity_t, view.velocity_grid);
    let (samples, paths) = run.prior_paths(
        prior,
        view.samples,
        view.sample_steps,
        view.solver,
        view.paths,
    );
    Analysis {
        prior_step: job.prior_step,
        pearson: pearson(&a, &b),
        spearman: spearman(&a, &b),
        nll,
        align,
        prior_nll,
        neg_bound,
        velocity,
        velocity_t: view.velocity_t,
        samples,
        paths,
        align_map_secs,
        total_secs: start.elapsed().as_secs_f64(),
    }
}
