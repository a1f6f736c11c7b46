//! The `flowalign` binary on real files: outputs, reuse of a prior, determinism and bad input.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flowalign"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A config small enough for a test: tiny network, few steps, a coarse grid.
fn tiny_config(dir: &Path, target: &str) -> PathBuf {
    let text = format!(
        r#"preset = "interactive"
target = "{target}"
seed = 0

[prior]
width = 32
depth = 1
steps = 40
batch = 64
lr = 2e-3
schedule = {{ kind = "constant" }}

[align]
n_latents = 200
steps = 30
lr = 1e-2
mc = 1
reduction = "mean"
init = "normal"

[eval]
grid = 12
t_values = 4
view = "data"
n_check = 100
sample_steps = 20
likelihood_steps = 8
bound_points = 20
bound_draws = 16
"#
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("flowalign runs")
}

/// `flowalign toy --config CFG [EXTRA...] --out OUT`.
fn toy<S: AsRef<OsStr>>(cfg: &Path, out: &Path, extra: &[S]) -> Output {
    run(bin()
        .arg("toy")
        .arg("--config")
        .arg(cfg)
        .args(extra)
        .arg("--out")
        .arg(out))
}

const NONE: [&str; 0] = [];

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one error line of a failed run, after asserting exit code 2.
fn fails(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stderr:\n{err}",
        o.status.code()
    );
    assert!(
        !err.contains("panicked"),
        "panic instead of an error:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    line.to_string()
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn toy_run_writes_every_output_and_reuses_its_prior() {
    let d = tmp();
    let cfg = tiny_config(d.path(), "moons");
    let out = d.path().join("run");
    let o = toy(&cfg, &out, &NONE);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "figure.png",
        "trajectories.png",
        "velocity.png",
        "samples.png",
        "curves.csv",
        "heatmaps.csv",
        "summary.json",
        "config.toml",
        "prior.safetensors",
        "prior.toml",
    ] {
        let meta = std::fs::metadata(out.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    let s = summary(&out);
    for key in [
        "/prior/steps",
        "/prior/final_loss",
        "/prior/seconds",
        "/prior/steps_per_sec",
        "/prior/data_nll",
        "/prior/sample_nll",
        "/align/steps",
        "/align/nll_init",
        "/align/nll_final",
        "/align/loss_final",
        "/align/seconds",
        "/align/steps_per_sec",
        "/heatmap/grid",
        "/heatmap/pearson",
        "/heatmap/spearman",
        "/heatmap/seconds",
        "/estimate/mean_log_p",
        "/estimate/paper/mean",
        "/estimate/paper/mean_gap",
        "/estimate/with_base_term/mean",
        "/estimate/with_base_term/violations",
        "/seed",
    ] {
        assert!(
            s.pointer(key).is_some_and(Value::is_number),
            "{key} is not a number in summary.json"
        );
    }
    assert_eq!(s["target"], "moons");
    let heat = std::fs::read_to_string(out.join("heatmaps.csv")).unwrap();
    assert_eq!(heat.lines().count(), 1 + 12 * 12);
    let curves = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    assert_eq!(curves.lines().count(), 1 + 40 + 31);

    // The written config reproduces the run; the saved prior skips training.
    let again = d.path().join("again");
    let o = toy(
        &out.join("config.toml"),
        &again,
        &[OsStr::new("--prior"), out.as_os_str()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s2 = summary(&again);
    assert_eq!(s2["prior"]["loaded"], true);
    assert_eq!(s2["align"]["nll_final"], s["align"]["nll_final"]);
    assert_eq!(s2["heatmap"]["pearson"], s["heatmap"]["pearson"]);
}

#[test]
fn same_seed_gives_bit_identical_numbers() {
    let d = tmp();
    let cfg = tiny_config(d.path(), "mog");
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    for out in [&a, &b] {
        let o = toy(&cfg, out, &NONE);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // The heatmaps read every weight of the prior, the curves every step of both stages. (The
    // safetensors bytes themselves may order tensors differently between writes.)
    for f in ["curves.csv", "heatmaps.csv"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let (sa, sb) = (summary(&a), summary(&b));
    for key in [
        "/align/nll_final",
        "/align/loss_final",
        "/heatmap/pearson",
        "/estimate/paper/mean",
        "/estimate/mean_log_p",
        "/prior/sample_nll",
    ] {
        assert_eq!(sa.pointer(key), sb.pointer(key), "{key} differs");
    }
    // A different seed gives different numbers.
    let c = d.path().join("c");
    let o = toy(&cfg, &c, &["--seed", "1"]);
    assert!(o.status.success());
    assert!(
        std::fs::read(a.join("curves.csv")).unwrap()
            != std::fs::read(c.join("curves.csv")).unwrap()
    );
}

#[test]
fn custom_csv_target_runs_with_a_kde() {
    let d = tmp();
    let cfg = tiny_config(d.path(), "mog");
    let csv = d.path().join("pts.csv");
    let mut text = String::from("x,y\n");
    for i in 0..300 {
        let a = i as f32 * 0.05;
        text.push_str(&format!("{},{}\n", 3.0 * a.cos(), 3.0 * a.sin()));
    }
    std::fs::write(&csv, text).unwrap();
    let out = d.path().join("run");
    let o = toy(&cfg, &out, &[OsStr::new("--target-csv"), csv.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&out);
    assert_eq!(s["target"], "pts");
    assert!(s["nll_method"].as_str().unwrap().contains("KDE on 300"));
}

fn csv_error(content: &str) -> String {
    let d = tmp();
    let cfg = tiny_config(d.path(), "mog");
    let csv = d.path().join("bad.csv");
    std::fs::write(&csv, content).unwrap();
    let o = toy(
        &cfg,
        &d.path().join("o"),
        &[OsStr::new("--target-csv"), csv.as_os_str()],
    );
    let line = fails(&o);
    assert!(
        line.contains("bad.csv"),
        "error does not name the file: {line}"
    );
    line
}

#[test]
fn bad_csv_files_get_one_line_errors() {
    assert!(csv_error("").contains("at least 2 rows"));
    assert!(csv_error("x,y\n1,2\nfoo,3\n").contains("line 3"));
    assert!(csv_error("1,2\n3,NaN\n").contains("non-finite"));
    assert!(csv_error("1,2\n3,inf\n").contains("non-finite"));
    assert!(csv_error("1\n2\n3\n").contains("2 columns"));
    assert!(csv_error("1,2,3\n4,5,6\n").contains("exactly 2 columns"));
    assert!(csv_error("1,1\n1,1\n1,1\n").contains("coincide"));
    let d = tmp();
    let o = run(bin()
        .args(["toy", "--target-csv"])
        .arg(d.path().join("missing.csv"))
        .arg("--out")
        .arg(d.path().join("o")));
    assert!(fails(&o).contains("missing.csv"));
}

#[test]
fn bad_priors_and_values_get_one_line_errors() {
    let d = tmp();
    let cfg = tiny_config(d.path(), "moons");
    let out = d.path().join("run");
    let o = toy(&cfg, &out, &NONE);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(out.join("summary.json")).unwrap();
    let x = d.path().join("x");

    // Missing checkpoint.
    let o = toy(
        &cfg,
        &x,
        &[OsStr::new("--prior"), d.path().join("nowhere").as_os_str()],
    );
    assert!(fails(&o).contains("not found"));
    // A prior trained on another target.
    let o = toy(
        &cfg,
        &x,
        &[
            OsStr::new("--target"),
            OsStr::new("spiral"),
            OsStr::new("--prior"),
            out.as_os_str(),
        ],
    );
    assert!(fails(&o).contains("trained on target 'moons'"));
    // A truncated checkpoint.
    let broken = d.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let w = std::fs::read(out.join("prior.safetensors")).unwrap();
    std::fs::write(broken.join("prior.safetensors"), &w[..w.len() / 2]).unwrap();
    std::fs::copy(out.join("prior.toml"), broken.join("prior.toml")).unwrap();
    let o = toy(&cfg, &x, &[OsStr::new("--prior"), broken.as_os_str()]);
    assert!(fails(&o).contains("truncated"));
    // Zero, negative or non-finite values: the message names the setting, its flag and the value.
    for (args, key) in [
        (["--prior-steps", "0"], "prior.steps"),
        (["--align-steps", "0"], "align.steps"),
        (["--batch", "0"], "prior.batch"),
        (["--prior-lr", "0"], "prior.lr"),
        (["--align-lr=-1", "-1"], "align.lr"),
        (["--align-lr", "NaN"], "align.lr"),
        (["--ema", "1.5"], "prior.ema"),
        (["--n-latents", "0"], "align.n_latents"),
        (["--grid", "1"], "eval.grid"),
    ] {
        let line = fails(&toy(
            &cfg,
            &x,
            &args[..1 + usize::from(!args[0].contains('='))],
        ));
        let flag = args[0].split('=').next().unwrap();
        assert!(
            line.contains(key) && line.contains(flag) && line.contains(args[1]),
            "{args:?}: {line}"
        );
    }
    // A value clap itself refuses (not a count) is named in its message.
    let o = toy(&cfg, &x, &["--align-steps", "-3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'-3'"), "{}", stderr(&o));
    // An unknown config key.
    let typo = d.path().join("typo.toml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[prior]\n", "[prior]\nwidht = 3\n"),
    )
    .unwrap();
    let o = toy(&typo, &x, &NONE);
    assert!(fails(&o).contains("widht"));
    // An unwritable output folder (a path below a regular file).
    let o = toy(&cfg, &out.join("summary.json").join("sub"), &NONE);
    assert!(fails(&o).contains("--out"));

    // A diverging run stops at the first non-finite loss and keeps the earlier outputs intact.
    let o = toy(&cfg, &out, &["--prior-lr", "1e30"]);
    let line = fails(&o);
    assert!(
        line.contains("diverged") && line.contains("lower the learning rate"),
        "{line}"
    );
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), before);
}
