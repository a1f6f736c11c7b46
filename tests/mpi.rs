//! Multi-process training through MPI (`--distributed mpi`, cargo feature `mpi`) with `mpirun` on
//! loopback: two ranks train the weights of one, a run resumes on another rank count, an uneven
//! batch is refused, and a killed or hung rank ends the job with a message naming it.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use flowalign::ae::config::AeConfig;
use flowalign::ae::train::AeRun;
use flowalign::checkpoint;
use flowalign::flow::store::load_prior;
use flowalign::params::param_values;

mod common;
use common::{ae_args, draw_images, flowalign, prior_args, set, train_prior, write_table};

/// `mpirun -np ranks flowalign args...`, set up for a container (root, no shared-memory
/// single-copy mechanism).
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--oversubscribe",
        "--allow-run-as-root",
        "-np",
        &ranks.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_flowalign"))
    .args(args)
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output()
        .expect("mpirun runs (OpenMPI: apt-get install openmpi-bin)")
}

fn prior_weights(dir: &Path) -> Vec<f32> {
    let (prior, _) = load_prior(dir, &Device::flex()).unwrap();
    param_values(&prior)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The steps logged in `dir/metrics.csv`, in order.
fn logged_steps(dir: &Path) -> Vec<usize> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn two_ranks_train_the_weights_of_one_and_resume_on_another_count() {
    let tmp = tempfile::tempdir().unwrap();
    let table = tmp.path().join("table.safetensors");
    write_table(&table, 3000, 32);
    let f = table.to_str().unwrap();

    let solo = tmp.path().join("solo");
    let out = flowalign(&prior_args(f, solo.to_str().unwrap(), "60"));
    assert!(out.status.success(), "{out:?}");

    let duo = tmp.path().join("duo");
    let mut args = prior_args(f, duo.to_str().unwrap(), "60");
    args.extend(["--distributed", "mpi"]);
    let out = run(mpirun(2, &args));
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MPI job of 2 ranks"), "{stderr}");
    let d = max_diff(&prior_weights(&solo), &prior_weights(&duo));
    eprintln!("2 ranks vs 1: max weight difference {d:e} after 60 steps");
    assert!(d < 1e-4, "2 ranks vs 1: {d}");
    // Only rank 0 wrote the log: every line once.
    assert_eq!(logged_steps(&duo), [10, 20, 30, 40, 50, 60]);

    // A one-process checkpoint at step 40 (of a 40-step schedule), continued to 60 by one process
    // and by two ranks.
    let [one, two] = ["one", "two"].map(|n| tmp.path().join(n));
    for dir in [&one, &two] {
        let out = flowalign(&prior_args(f, dir.to_str().unwrap(), "40"));
        assert!(out.status.success(), "{out:?}");
    }
    let mut args = prior_args(f, one.to_str().unwrap(), "60");
    args.push("--resume");
    let out = flowalign(&args);
    assert!(out.status.success(), "{out:?}");
    let mut args = prior_args(f, two.to_str().unwrap(), "60");
    args.extend(["--resume", "--distributed", "mpi"]);
    let out = run(mpirun(2, &args));
    assert!(out.status.success(), "{out:?}");
    let d = max_diff(&prior_weights(&one), &prior_weights(&two));
    eprintln!("resumed at step 40 by 2 ranks vs 1: max weight difference {d:e}");
    assert!(d < 1e-4, "resumed on 2 ranks: {d}");
    assert_eq!(logged_steps(&two), [10, 20, 30, 40, 50, 60]);

    // A global batch that two ranks cannot share evenly is refused by both, and the job ends.
    let odd = tmp.path().join("odd");
    let mut args = prior_args(f, odd.to_str().unwrap(), "60");
    set(&mut args, "--batch", "127");
    args.extend(["--distributed", "mpi"]);
    let out = run(mpirun(2, &args));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not split evenly over 2 ranks"),
        "{stderr}"
    );
}

/// The pid of rank `rank` among the processes whose command line mentions `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &str| {
            hay.split(|b| *b == 0)
                .any(|part| String::from_utf8_lossy(part).contains(needle))
        };
        if has(&cmdline, marker)
            && !has(&cmdline, "mpirun")
            && environ
                .split(|b| *b == 0)
                .any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Starts a long 2-rank prior run into `out`; waits until its first checkpoint exists and returns
/// mpirun with rank 1's pid.
fn start_long_run(features: &str, out: &Path) -> (Child, u32) {
    let mut args = prior_args(features, out.to_str().unwrap(), "1000000");
    set(&mut args, "--checkpoint-every", "200");
    set(&mut args, "--log-every", "1000");
    args.extend(["--distributed", "mpi", "--comm-timeout", "6"]);
    let mut child = mpirun(2, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.join(checkpoint::MANIFEST).is_file() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the job ended early ({status}): {:?}",
                child.wait_with_output()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint yet"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let marker = out.to_str().unwrap();
    let pid = rank_pid(marker, 1).expect("rank 1 is running");
    (child, pid)
}

/// Waits for `child` to end (at most a minute); returns its stderr and how long it took.
fn finish(mut child: Child) -> (Output, Duration) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the job did not stop within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited = start.elapsed();
    (child.wait_with_output().unwrap(), waited)
}

#[test]
fn a_killed_or_hung_rank_stops_the_job_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let table = tmp.path().join("table.safetensors");
    write_table(&table, 3000, 32);
    let f = table.to_str().unwrap();

    // SIGKILL: mpirun notices at once and names the rank.
    let killed = tmp.path().join("killed");
    let (child, pid) = start_long_run(f, &killed);
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let (out, waited) = finish(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("killed rank: job ended {waited:?} later");
    assert!(!out.status.success());
    assert!(stderr.contains("rank 1"), "{stderr}");
    // The last checkpoint is intact: a lone process continues it.
    let manifest = std::fs::read_to_string(killed.join(checkpoint::MANIFEST)).unwrap();
    let step: usize = manifest
        .lines()
        .find_map(|l| l.strip_prefix("step = "))
        .unwrap()
        .parse()
        .unwrap();
    let next = (step + 5).to_string();
    let mut args = prior_args(f, killed.to_str().unwrap(), &next);
    set(&mut args, "--checkpoint-every", "200");
    args.push("--resume");
    let out = flowalign(&args);
    assert!(out.status.success(), "{out:?}");

    // SIGSTOP: no one exits, so the deadline (--comm-timeout 6) must end the job and name rank 1.
    let hung = tmp.path().join("hung");
    let (child, pid) = start_long_run(f, &hung);
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let (out, waited) = finish(child);
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "hung rank: job ended {waited:?} later: {}",
        stderr
            .lines()
            .find(|l| l.contains("flowalign:"))
            .unwrap_or("")
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("rank(s) 1 "),
        "rank 0 names the hung rank: {stderr}"
    );
}

/// The autoencoder with every loss term (the adversarial one from step 5: discriminator, LeCAM,
/// DiffAugment) on 2 ranks against 1.
#[test]
fn two_ranks_train_the_autoencoder_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    draw_images(&images, 24);
    let prior = tmp.path().join("prior");
    train_prior(&prior, &tmp.path().join("table.npy"));
    let (data, prior) = (images.to_str().unwrap(), prior.to_str().unwrap());
    let (solo, duo) = (tmp.path().join("solo"), tmp.path().join("duo"));
    let (solo_s, duo_s) = (solo.to_str().unwrap(), duo.to_str().unwrap());
    let mut one = ae_args(data, prior, solo_s, "0.1");
    let mut two = ae_args(data, prior, duo_s, "0.1");
    for a in [&mut one, &mut two] {
        for (flag, value) in [
            ("--steps", "20"),
            ("--adv-start", "5"),
            ("--checkpoint-every", "10"),
            ("--monitor-every", "10"),
            ("--recon-every", "10"),
        ] {
            set(a, flag, value);
        }
    }
    let out = flowalign(&one);
    assert!(out.status.success(), "{out:?}");
    two.extend(["--distributed", "mpi"]);
    let out = run(mpirun(2, &two));
    assert!(out.status.success(), "{out:?}");
    let weights = |dir: &Path| {
        let cfg: AeConfig = checkpoint::read_config(dir, "ae train").unwrap();
        param_values(
            &AeRun::open(cfg, dir, true, &Device::flex(), None)
                .unwrap()
                .frozen(),
        )
    };
    let d = max_diff(&weights(&solo), &weights(&duo));
    let loss = |dir: &Path| -> Vec<f32> {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(2)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let (l1, l2) = (loss(&solo), loss(&duo));
    eprintln!("autoencoder, 2 ranks vs 1: losses {l1:?} vs {l2:?}; max weight difference {d:e}");
    assert_eq!(l1.len(), 2);
    assert!((l1[0] - l2[0]).abs() < 1e-4 * l1[0], "{l1:?} vs {l2:?}");
    assert!(d < 1e-3, "2 ranks vs 1: {d}");
}
