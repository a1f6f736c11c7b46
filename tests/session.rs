//! One toy session, two faces: the same config run by `flowalign toy` and by the window's worker
//! thread records the same events, so the two `curves.csv` files are byte for byte the same.
#![cfg(feature = "gui")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use flowalign::gui::worker::{Command as WorkerCommand, Stage, Update, Worker};
use flowalign::toy::{Curves, Preset, TargetKind, ToyConfig};
use flowalign::train::Schedule;

fn small_config() -> ToyConfig {
    let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Moons);
    cfg.seed = 3;
    cfg.prior.width = 32;
    cfg.prior.depth = 1;
    cfg.prior.steps = 60;
    cfg.prior.batch = 64;
    cfg.prior.schedule = Schedule::Constant;
    cfg.align.n_latents = 100;
    cfg.align.steps = 40;
    cfg.eval.grid = 10;
    cfg.eval.t_values = 3;
    cfg.eval.n_check = 50;
    cfg.eval.bound_points = 10;
    cfg.eval.bound_draws = 8;
    cfg.eval.likelihood_steps = 4;
    cfg.eval.sample_steps = 10;
    cfg
}

/// The curves the window's worker reports for `cfg`, recorded as the app records them.
fn worker_curves(cfg: &ToyConfig) -> Curves {
    let worker = Worker::spawn(Device::flex(), || {});
    worker.send(WorkerCommand::Start {
        cfg: Box::new(cfg.clone()),
        prior: None,
    });
    let mut curves = Curves::default();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut done = false;
        for update in worker.drain() {
            match update {
                Update::Progress(event) => curves.record(&event),
                Update::Stage(Stage::Done) => done = true,
                Update::Failed(msg) => panic!("the worker failed: {msg}"),
                _ => {}
            }
        }
        if done {
            return curves;
        }
        assert!(Instant::now() < deadline, "the worker did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_cli_and_the_window_write_the_same_curves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let cfg_path = dir.path().join("session.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).unwrap();
    let out = dir.path().join("cli");
    let o = Command::new(env!("CARGO_BIN_EXE_flowalign"))
        .args(["toy", "--device", "cpu", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_window = dir.path().join("window.csv");
    worker_curves(&cfg).write_csv(&from_window).unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let (cli, window) = (read(&out.join("curves.csv")), read(&from_window));
    // 60 prior rows, the initial latents and 40 alignment rows, under a header.
    assert_eq!(cli.lines().count(), 1 + 60 + 1 + 40);
    assert!(
        cli.lines().nth(61).unwrap().starts_with("align,0,,"),
        "{cli}"
    );
    assert_eq!(cli, window);
}
