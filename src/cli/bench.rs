//! `flowalign bench`: throughput figures as JSON, side by side in the same run with the PyTorch
//! peers in `benches/` (`torch_toy.py`, `torch_prior.py`) when python3 can import torch.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use burn::prelude::*;
use serde_json::{Value, json};

use anyhow::{Context, Result, bail};
use flowalign::align::{Reduction, align_heatmap};
use flowalign::files::write_json;
use flowalign::flow::path::{PathDraws, normal_rows};
use flowalign::flow::{FrozenPrior, VelocityMlpConfig, rows_to_tensor};
use flowalign::grid::{Heatmap, linspace};
use flowalign::rng::{Stream, rng_for};
use flowalign::train::{LatentTrainer, PriorTrainer, Schedule};

/// Arguments of `flowalign bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value_t = BenchKind::Toy)]
    pub kind: BenchKind,
    /// Network width (default: 512 for `toy`, the interactive preset's 96 for `landscape`, 1024 for `prior`).
    #[arg(long)]
    pub width: Option<usize>,
    /// Network depth (default: 4 for `toy`, 3 for `landscape`, 6 for `prior`).
    #[arg(long)]
    pub depth: Option<usize>,
    /// `prior`: feature vectors per step (default: the paper's 32,768 on a GPU, 1,024 on the CPU);
    /// `ae`: images per step (default 256 on a GPU, 2 on the CPU); `gen`: latents per step
    /// (default 256 on a GPU, 8 on the CPU).
    #[arg(long)]
    pub batch: Option<usize>,
    /// `ae`: the ViT size of encoder and decoder.
    #[arg(long, value_enum, default_value_t = flowalign::ae::model::VitSize::VitL)]
    pub model: flowalign::ae::model::VitSize,
    /// `ae`: also measure the step with the adversarial term on (the paper's DINO ViT-S
    /// discriminator at patch 16, random frozen trunk): generator and discriminator steps.
    #[arg(long)]
    pub adv: bool,
    /// `gen`: the generator preset, `paper` (MAR-B with its 1024 x 6 flow head) or `small`.
    #[arg(long, value_enum, default_value_t = flowalign::generator::GenPreset::Paper)]
    pub gen_preset: flowalign::generator::GenPreset,
    /// `gen`: MAR iterations to time sampling at.
    #[arg(long, value_delimiter = ',', default_value = "8,16,64")]
    pub iters: Vec<usize>,
    /// `gen`: time points of the head's Euler sampler to time sampling at.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    pub head_steps: Vec<usize>,
    /// `gen`: images per sampling call (default 2 on the CPU, 64 on a GPU).
    #[arg(long)]
    pub sample_batch: Option<usize>,
    /// `gen`: measure the training step only.
    #[arg(long)]
    pub no_sampling: bool,
    /// `metrics`: the FID Inception-v3 weights (safetensors; default: stand-in weights).
    #[arg(long, value_name = "FILE")]
    pub inception: Option<PathBuf>,
    /// `prior`: (t, eps) draws per vector.
    #[arg(long, default_value_t = 4)]
    pub mc: usize,
    /// `prior` and `ae`: the training step's forward-pass dtype (bf16 is emulated on the CPU).
    #[arg(long, value_enum, default_value_t = flowalign::precision::Precision::F32)]
    pub precision: flowalign::precision::Precision,
    /// Compute device (`prior` only; the toy figures are CPU figures).
    #[arg(long, value_enum, default_value_t = flowalign::backend::DeviceChoice::Auto)]
    pub device: flowalign::backend::DeviceChoice,
    /// Minimum seconds per figure (per round).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// `toy` and `prior`: rounds, each measuring flowalign and then the PyTorch peer, so that
    /// both see the same machine load; the result gives every round and the medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `toy` and `prior`: also measure flowalign with its fused CPU operations off (burn's own
    /// tensor operations and optimiser: the figures before the fused path), in the same rounds.
    #[arg(long)]
    pub plain: bool,
    /// The PyTorch peer script (default: benches/torch_toy.py for `toy`, benches/torch_prior.py
    /// for `prior`, benches/torch_ae.py for `ae`, benches/torch_mar.py for `gen`); skipped when
    /// absent or when torch is not importable.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Skip the PyTorch peer.
    #[arg(long)]
    pub no_peer: bool,
    /// Where to write the JSON result (default: runs/bench-<kind>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Benchmarks available.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchKind {
    /// Prior training (batch 256, 1024), alignment (1,000 y), L_align heatmap evaluations.
    Toy,
    /// The visualizer's landscape refresh: heatmaps, velocity field and ODE samples (milliseconds).
    Landscape,
    /// Stage-1 prior training (METHOD.md section 6): vectors/s of the full step (AdamW, clip, EMA, mc 4).
    Prior,
    /// Stage-2 autoencoder training: images/s of the step (L2 + L_align, AdamW, clip, EMA) and of
    /// the data loader (JPEG decode + augment) per core.
    Ae,
    /// Stage-3 generator: the training step (latents/s, peak memory; the PyTorch MAR-B peer on the
    /// CPU) and seconds per image of sampling over MAR iterations x head steps, with and without
    /// guidance.
    Gen,
    /// Generation metrics: the FID Inception's images/s at batch 1, 8 and 32 (`--inception FILE`,
    /// else deterministic stand-in weights of the same shapes), and the metric maths at
    /// torch-fidelity's sizes (FID, KID, precision/recall, IS on random 2048-d features).
    Metrics,
    /// Multi-process data parallelism; run it under `mpirun -np N` (build with `--features mpi`):
    /// the prior step's vectors/s per rank at a fixed per-rank batch, the gradient all-reduce of
    /// the prior (staged from the device), and a bucketed all-reduce of the `--model` autoencoder's
    /// gradient size.
    Dist,
}

/// Median milliseconds of `reps` calls of `f` after one warm-up call.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// Times the pieces of one landscape refresh of the visualizer on the CPU backend (spiral target).
pub fn landscape(width: usize, depth: usize) -> Result<Value> {
    use flowalign::flow::solver::Solver;
    use flowalign::toy::{Preset, ToyConfig};
    use flowalign::toy::{TargetKind, ToyRun};
    let mut cfg = ToyConfig::preset(Preset::Interactive, TargetKind::Spiral);
    (cfg.prior.width, cfg.prior.depth) = (width, depth);
    let run = ToyRun::new(cfg, Device::flex(), "cpu")?;
    let mut rng = rng_for(0, Stream::Init, 0);
    let prior = VelocityMlpConfig::new(2, width, depth).init(&mut rng, &Device::flex());
    let reference = run.reference_samples();
    let reps = 5;
    let mut out = serde_json::Map::new();
    out.insert("width".into(), json!(width));
    out.insert("depth".into(), json!(depth));
    for grid in [50, 100] {
        let ms = median_ms(reps, || {
            run.align_heatmap(&prior, &reference, grid, 20);
        });
        out.insert(format!("align_heatmap_{grid}x{grid}_t20_ms"), json!(ms));
        let ms = median_ms(reps, || {
            run.nll_heatmap(&reference, grid);
        });
        out.insert(format!("target_nll_heatmap_{grid}x{grid}_ms"), json!(ms));
    }
    let ms = median_ms(reps, || {
        run.velocity_at(&prior, &reference, 0.5, 21);
    });
    out.insert("velocity_21x21_ms".into(), json!(ms));
    let ms = median_ms(reps, || {
        run.prior_paths(&prior, 1000, 100, Solver::Euler, 40);
    });
    out.insert("ode_samples_1000_euler100_paths40_ms".into(), json!(ms));
    let ms = median_ms(1, || {
        run.prior_nll_heatmap(&prior, &reference, 40);
    });
    out.insert("prior_exact_nll_40x40_ms".into(), json!(ms));
    let ms = median_ms(1, || {
        run.bound_heatmap(&prior, &reference, 40, 16);
    });
    out.insert("bound_40x40_draws16_ms".into(), json!(ms));
    Ok(Value::Object(out))
}

/// Seconds the threads of this process have run on a CPU (Linux; `None` elsewhere): the sum over
/// its threads of /proc's scheduler statistics, so a busy machine's waiting is not counted.
pub fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// Calls per wall-clock second and per CPU second (all threads of the process).
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_sec: f64,
    per_cpu_sec: Option<f64>,
}

/// Calls `f` repeatedly for at least `min_s` seconds and 5 calls after 3 warm-up calls.
fn timed(min_s: f64, mut f: impl FnMut() -> flowalign::Result<()>) -> Result<Rate> {
    for _ in 0..3 {
        f()?;
    }
    let (mut n, start, cpu) = (0usize, Instant::now(), cpu_seconds());
    loop {
        f()?;
        n += 1;
        let el = start.elapsed().as_secs_f64();
        if el >= min_s && n >= 5 {
            let per_cpu_sec = cpu
                .zip(cpu_seconds())
                .map(|(a, b)| n as f64 / (b - a).max(1e-9));
            return Ok(Rate {
                per_sec: n as f64 / el,
                per_cpu_sec,
            });
        }
    }
}

/// Measures flowalign's figures on the CPU backend.
pub fn measure(width: usize, depth: usize, seconds: f64) -> Result<Value> {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let mut out = serde_json::Map::new();
    for batch in [256usize, 1024] {
        let mut rng = rng_for(0, Stream::Init, 0);
        let model = VelocityMlpConfig::new(2, width, depth).init(&mut rng, &ad);
        let mut trainer = PriorTrainer::new(model, 1e-4, Schedule::Constant, usize::MAX);
        let x = rows_to_tensor(&normal_rows(&mut rng, batch, 2), 2, &ad);
        let rate = timed(seconds, || {
            let draws = PathDraws::sample(&mut rng, batch, 2, &ad);
            trainer.train_step(x.clone(), &draws).map(|_| ())
        })?;
        out.insert(format!("train_b{batch}_steps_per_sec"), json!(rate.per_sec));
        out.insert(
            format!("train_b{batch}_steps_per_cpu_sec"),
            json!(rate.per_cpu_sec),
        );
    }
    let mut rng = rng_for(0, Stream::Init, 0);
    let prior = VelocityMlpConfig::new(2, width, depth).init(&mut rng, &device);
    out.insert("params".into(), json!(prior.num_params()));
    let y0 = normal_rows(&mut rng, 1000, 2);
    let prior = FrozenPrior::new(prior);
    let mut aligner = LatentTrainer::for_latents(&y0, 2, 1e-2, usize::MAX, &device);
    let rate = timed(seconds, || {
        aligner
            .align_step(&prior, 1, Reduction::Mean, &mut rng)
            .map(|_| ())
    })?;
    out.insert("align_n1000_steps_per_sec".into(), json!(rate.per_sec));
    out.insert(
        "align_n1000_steps_per_cpu_sec".into(),
        json!(rate.per_cpu_sec),
    );
    let axis = linspace(-3.0, 3.0, 200);
    let pts = Heatmap::points(&axis, &axis);
    let ts = linspace(0.1, 0.9, 2);
    align_heatmap(
        &prior,
        &pts.as_flattened()[..8192],
        2,
        &ts[..1],
        &mut rng,
        &device,
    );
    let (start, cpu) = (Instant::now(), cpu_seconds());
    align_heatmap(&prior, pts.as_flattened(), 2, &ts, &mut rng, &device);
    let el = start.elapsed().as_secs_f64();
    let evals = (pts.len() * ts.len()) as f64;
    out.insert("heatmap_evals_per_sec".into(), json!(evals / el));
    out.insert(
        "heatmap_evals_per_cpu_sec".into(),
        json!(
            cpu.zip(cpu_seconds())
                .map(|(a, b)| evals / (b - a).max(1e-9))
        ),
    );
    Ok(Value::Object(out))
}

/// Runs the PyTorch peer script with `extra` arguments and parses its `BENCH {json}` line; `None`
/// (with a notice) when it cannot run here.
fn peer(args: &BenchArgs, default_script: &str, extra: &[String]) -> Option<Value> {
    if args.no_peer {
        return None;
    }
    let script = args
        .peer
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_script));
    if !script.is_file() {
        tracing::info!(
            "peer script {} not found; measuring flowalign alone",
            script.display()
        );
        return None;
    }
    let torch_ok = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !torch_ok {
        tracing::info!(
            "python3 cannot import torch (pip install torch numpy); measuring flowalign alone"
        );
        return None;
    }
    tracing::info!("measuring the PyTorch peer {}", script.display());
    let out = Command::new("python3")
        .arg(&script)
        .args(extra)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("BENCH "))?;
    serde_json::from_str(line).ok()
}

/// `flowalign bench toy|landscape`.
pub fn run(args: BenchArgs) -> Result<()> {
    let name = match args.kind {
        BenchKind::Toy => "toy",
        BenchKind::Landscape => "landscape",
        BenchKind::Prior => "prior",
        BenchKind::Ae => "ae",
        BenchKind::Gen => "gen",
        BenchKind::Metrics => "metrics",
        BenchKind::Dist => return dist(&args),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/bench-{name}.json")));
    let result = match args.kind {
        BenchKind::Toy => toy(&args)?,
        BenchKind::Landscape => {
            let (w, d) = (args.width.unwrap_or(96), args.depth.unwrap_or(3));
            tracing::info!("measuring the visualizer's landscape refresh (burn flex, {w}x{d})");
            landscape(w, d)?
        }
        BenchKind::Prior => prior(&args)?,
        BenchKind::Ae => ae(&args)?,
        BenchKind::Gen => generator(&args)?,
        BenchKind::Metrics => metrics(&args)?,
        BenchKind::Dist => unreachable!("handled above"),
    };
    write_result(&out, &result)
}

/// Writes a benchmark's JSON to `out` (creating its folder) and logs it.
fn write_result(out: &std::path::Path, result: &Value) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {}; choose an --out you can write to",
                dir.display()
            )
        })?;
    }
    write_json(out, result)?;
    tracing::info!("{}", serde_json::to_string(result).expect("json"));
    Ok(())
}

/// The machine a benchmark ran on: CPU, threads, the load averages before and after, the
/// instruction sets in use, and the measured FMA peak.
pub fn machine(peak: &super::peak::Peak, load_before: Option<[f64; 3]>) -> Value {
    json!({
        "cpu": super::peak::cpu_name(),
        "threads": rayon::current_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "fused_kernels_isa": flowalign::fused::kernels::isa().name(),
        "gemm_isa": super::peak::gemm_isa(),
        "peak": peak.json(),
    })
}

/// The 1, 5 and 15 minute load averages (Linux).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The median of the values of `key` over `rounds`.
fn median_of(rounds: &[Value], key: &str) -> Option<f64> {
    let mut v: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
    })
}

/// Medians over rounds of `keys`, per-round ratios of `ours` over `theirs`, and their medians.
fn summarise(keys: &[&str], ours: &[Value], theirs: &[Value]) -> (Value, Value, Value) {
    let mut med = serde_json::Map::new();
    let mut ratio = serde_json::Map::new();
    let mut per_round = serde_json::Map::new();
    for key in keys {
        if let Some(m) = median_of(ours, key) {
            med.insert((*key).into(), json!(m));
        }
        let ratios: Vec<Value> = ours
            .iter()
            .zip(theirs)
            .filter_map(|(a, b)| Some(json!({ *key: a[*key].as_f64()? / b[*key].as_f64()? })))
            .collect();
        if let Some(m) = median_of(&ratios, key) {
            ratio.insert((*key).into(), json!(m));
            per_round.insert(
                (*key).into(),
                json!(
                    ratios
                        .iter()
                        .filter_map(|r| r[*key].as_f64())
                        .collect::<Vec<_>>()
                ),
            );
        }
    }
    (
        Value::Object(med),
        Value::Object(ratio),
        Value::Object(per_round),
    )
}

const TOY_KEYS: [&str; 4] = [
    "train_b256_steps_per_sec",
    "train_b1024_steps_per_sec",
    "align_n1000_steps_per_sec",
    "heatmap_evals_per_sec",
];

/// The same figures per CPU second of the process (all its threads).
const TOY_CPU_KEYS: [&str; 4] = [
    "train_b256_steps_per_cpu_sec",
    "train_b1024_steps_per_cpu_sec",
    "align_n1000_steps_per_cpu_sec",
    "heatmap_evals_per_cpu_sec",
];

/// GFLOP/s and fraction of `peak` of the toy figures: the matrix-product FLOPs each side does.
/// flowalign's heatmap shares the time over the grid, and its training and alignment read the
/// modulation from a table of time where the fused path applies; PyTorch's computes all three per
/// row.
fn toy_flops(figures: &Value, flops: &super::peak::MlpFlops, ours: bool, peak: f64) -> Value {
    let per_call = if ours {
        use flowalign::flow::frozen::{FIRST_INTERVALS, trains_through_table};
        let train = |rows: usize| {
            rows as f64
                * if trains_through_table(&Device::flex(), burn::tensor::DType::F32, rows) {
                    flops.train_tabulated(FIRST_INTERVALS)
                } else {
                    flops.train()
                }
        };
        let align = if flowalign::fused::enabled() {
            flops.align_tabulated()
        } else {
            flops.align()
        };
        [
            train(256),
            train(1024),
            1000.0 * align,
            flops.forward_shared_time(),
        ]
    } else {
        [
            256.0 * flops.train(),
            1024.0 * flops.train(),
            1000.0 * flops.align(),
            flops.forward(),
        ]
    };
    let mut out = serde_json::Map::new();
    for (key, f) in TOY_KEYS.iter().zip(per_call) {
        if let Some(rate) = figures[*key].as_f64() {
            let gflops = rate * f / 1e9;
            out.insert(
                (*key).into(),
                json!({ "gflops": gflops, "fraction_of_peak": gflops / peak }),
            );
        }
    }
    Value::Object(out)
}

/// `flowalign bench toy`: flowalign and, when it can run, the PyTorch peer, alternating in rounds.
fn toy(args: &BenchArgs) -> Result<Value> {
    let (width, depth) = (args.width.unwrap_or(512), args.depth.unwrap_or(4));
    if args.seconds.is_nan() || args.seconds <= 0.0 || args.rounds == 0 {
        bail!(
            "--seconds must be a positive number and --rounds at least 1, got {} and {}",
            args.seconds,
            args.rounds
        );
    }
    let load_before = load_average();
    let threads = rayon::current_num_threads();
    let peak = super::peak::measure(threads);
    let extra: Vec<String> = [
        "--bench",
        "--threads",
        &threads.to_string(),
        "--bench-batches",
        "256",
        "1024",
        "--width",
        &width.to_string(),
        "--depth",
        &depth.to_string(),
        "--bench-seconds",
        &args.seconds.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let (mut ours, mut plain, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        tracing::info!(
            "round {round}/{}: flowalign (burn flex, {width}x{depth})",
            args.rounds
        );
        ours.push(measure(width, depth, args.seconds)?);
        if args.plain {
            tracing::info!("round {round}: flowalign without the fused operations");
            flowalign::fused::set_enabled(false);
            let result = measure(width, depth, args.seconds);
            flowalign::fused::set_enabled(true);
            plain.push(result?);
        }
        if let Some(p) = peer(args, "benches/torch_toy.py", &extra) {
            theirs.push(p);
        }
    }
    let keys: Vec<&str> = TOY_KEYS.iter().chain(&TOY_CPU_KEYS).copied().collect();
    let (ours_med, ratio, ratio_rounds) = summarise(&keys, &ours, &theirs);
    let (theirs_med, _, _) = summarise(&keys, &theirs, &[]);
    let (plain_med, ratio_plain, _) = summarise(&keys, &plain, &theirs);
    let flops = super::peak::MlpFlops {
        dim: 2,
        width,
        depth,
    };
    Ok(json!({
        "machine": machine(&peak, load_before),
        "model": { "width": width, "depth": depth, "params": ours[0]["params"] },
        "seconds_per_figure": args.seconds,
        "flowalign": ours_med,
        "pytorch": theirs_med,
        "ratio_flowalign_over_pytorch": ratio,
        "ratio_per_round": ratio_rounds,
        "flowalign_gflops": toy_flops(&ours_med, &flops, true, peak.gflops),
        "pytorch_gflops": toy_flops(&theirs_med, &flops, false, peak.gflops),
        "flowalign_plain": args.plain.then_some(plain_med),
        "ratio_plain_over_pytorch": args.plain.then_some(ratio_plain),
        "rounds": { "flowalign": ours, "flowalign_plain": plain, "pytorch": theirs },
    }))
}

/// Peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// `flowalign bench prior`: the stage-1 training step on the chosen device, and the PyTorch peer
/// (CPU, same threads) when it can run.
fn prior(args: &BenchArgs) -> Result<Value> {
    use flowalign::prior::{FeaturePriorConfig, PriorPreset};
    let (device, name) = flowalign::backend::select(args.device)?;
    let on_cpu = name.starts_with("cpu");
    let mut cfg = FeaturePriorConfig::preset(PriorPreset::Paper, "-");
    cfg.model.width = args.width.unwrap_or(cfg.model.width);
    cfg.model.depth = args.depth.unwrap_or(cfg.model.depth);
    cfg.train.run.batch = args
        .batch
        .unwrap_or(if on_cpu { 1024 } else { cfg.train.run.batch });
    cfg.train.mc = args.mc;
    cfg.train.run.precision = args.precision;
    cfg.validate()?;
    let (d, batch, mc) = (cfg.data.latent_dim, cfg.train.run.batch, cfg.train.mc);
    tracing::info!(
        "measuring flowalign ({name}, {}x{}, batch {batch} x mc {mc}, {})",
        cfg.model.width,
        cfg.model.depth,
        args.precision
    );
    let load_before = load_average();
    let peak = on_cpu.then(|| super::peak::measure(rayon::current_num_threads()));
    let measure_ours = || -> Result<Value> {
        let mut trainer = flowalign::prior::run::new_trainer(&cfg, d, &device);
        let mut rng = rng_for(0, Stream::Prior, 0);
        let table = normal_rows(&mut rng, 100_000, d);
        let mut step = |rng: &mut flowalign::rng::Rng| -> flowalign::Result<()> {
            use rand::RngExt;
            let mut rows = Vec::with_capacity(batch * d);
            for _ in 0..batch {
                let i = rng.random_range(0..100_000);
                rows.extend_from_slice(&table[i * d..(i + 1) * d]);
            }
            flowalign::prior::run::step_on_rows(&mut trainer, &rows, d, mc, rng, &device)
                .map(|_| ())
        };
        let rate = timed(args.seconds, || step(&mut rng))?;
        Ok(json!({
            "vectors_per_sec": rate.per_sec * batch as f64,
            "vectors_per_cpu_sec": rate.per_cpu_sec.map(|r| r * batch as f64),
            "steps_per_sec": rate.per_sec,
        }))
    };
    let extra: Vec<String> = vec![
        "--width".into(),
        cfg.model.width.to_string(),
        "--depth".into(),
        cfg.model.depth.to_string(),
        "--batch".into(),
        batch.to_string(),
        "--mc".into(),
        mc.to_string(),
        "--seconds".into(),
        args.seconds.to_string(),
        "--threads".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .to_string(),
    ];
    // The peer trains in f32: a bf16 figure has no like-for-like peer.
    let with_peer = on_cpu && args.precision == flowalign::precision::Precision::F32;
    let (mut ours, mut plain, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        tracing::info!("round {round}/{}: flowalign ({name})", args.rounds.max(1));
        ours.push(measure_ours()?);
        if args.plain {
            tracing::info!("round {round}: flowalign without the fused operations");
            flowalign::fused::set_enabled(false);
            let result = measure_ours();
            flowalign::fused::set_enabled(true);
            plain.push(result?);
        }
        if with_peer && let Some(p) = peer(args, "benches/torch_prior.py", &extra) {
            theirs.push(p);
        }
    }
    let keys = ["vectors_per_sec", "vectors_per_cpu_sec", "steps_per_sec"];
    let (ours_med, ratio, ratio_rounds) = summarise(&keys, &ours, &theirs);
    let (theirs_med, _, _) = summarise(&keys, &theirs, &[]);
    let (plain_med, ratio_plain, _) = summarise(&keys, &plain, &theirs);
    let flops = super::peak::MlpFlops {
        dim: d,
        width: cfg.model.width,
        depth: cfg.model.depth,
    };
    let per_vector = mc as f64 * flops.train();
    // flowalign's CPU step at f32 reads the modulation from a table of time (the work it does).
    let per_vector_ours = if flowalign::flow::frozen::trains_through_table(
        &device,
        args.precision.dtype().into(),
        batch * mc,
    ) {
        mc as f64 * flops.train_tabulated(flowalign::flow::frozen::FIRST_INTERVALS)
    } else {
        per_vector
    };
    let gflops = |v: &Value, per_vector: f64| -> Value {
        let Some(rate) = v["vectors_per_sec"].as_f64() else {
            return Value::Null;
        };
        let g = rate * per_vector / 1e9;
        json!({ "gflops": g, "fraction_of_peak": peak.map(|p| g / p.gflops) })
    };
    Ok(json!({
        "machine": peak.as_ref().map(|p| machine(p, load_before)),
        "device": name,
        "precision": args.precision,
        "model": { "width": cfg.model.width, "depth": cfg.model.depth, "dim": d },
        "batch": batch,
        "mc": mc,
        "train_flops_per_vector": per_vector,
        "flowalign_flops_per_vector": per_vector_ours,
        "flowalign": ours_med,
        "pytorch": (!theirs.is_empty()).then_some(theirs_med.clone()),
        "ratio_flowalign_over_pytorch": ratio["vectors_per_sec"],
        "ratio_per_round": ratio_rounds["vectors_per_sec"],
        "ratio_per_cpu_second": ratio["vectors_per_cpu_sec"],
        "flowalign_gflops": gflops(&ours_med, per_vector_ours),
        "pytorch_gflops": gflops(&theirs_med, per_vector),
        "flowalign_plain": args.plain.then_some(plain_med),
        "ratio_plain_over_pytorch": args.plain.then(|| ratio_plain["vectors_per_sec"].clone()),
        "peak_rss_mib": peak_rss_mib(),
        "rounds": { "flowalign": ours, "flowalign_plain": plain, "pytorch": theirs },
    }))
}

/// `flowalign bench ae`: the stage-2 training step on the chosen device, and the image loader.
fn ae(args: &BenchArgs) -> Result<Value> {
    use flowalign::ae::config::{AeConfig, AePreset};
    use flowalign::ae::data::{Crop, ImageFolder, ImageLoader};
    use flowalign::ae::train::{ae_step, new_trainer};
    let (device, name) = flowalign::backend::select(args.device)?;
    let on_cpu = name.starts_with("cpu");
    let mut cfg = AeConfig::preset(AePreset::Paper, "-", "-");
    cfg.model.size = args.model;
    cfg.train.run.batch = args.batch.unwrap_or(if on_cpu { 2 } else { 256 });
    cfg.train.run.precision = args.precision;
    cfg.validate()?;
    let (b, s) = (cfg.train.run.batch, cfg.model.image_size);
    let (depth, width, heads) = cfg.model.size.dims();
    tracing::info!(
        "measuring the autoencoder step ({name}, ViT {depth} x {width}, {heads} heads, {s} px, batch {b})"
    );
    let mut trainer = new_trainer(&cfg, &device)?;
    let mut rng = rng_for(0, Stream::Init, 1);
    let prior = VelocityMlpConfig::new(cfg.model.latent_dim, 1024, 6).init(&mut rng, &device);
    let pixels: Vec<f32> = normal_rows(&mut rng, b * 3 * s, s)
        .into_iter()
        .map(|v| v.clamp(-1.0, 1.0))
        .collect();
    let replicas = [flowalign::ae::loss::Frozen {
        device: device.clone(),
        prior: flowalign::flow::FrozenPrior::new(prior),
        lpips: None,
        dino: None,
    }];
    let batch = flowalign::ae::data::ImageBatch {
        pixels,
        labels: vec![0; b],
        size: s,
        first: 0,
        total: b,
    };
    let sps = timed(args.seconds, || {
        ae_step(&mut trainer, &replicas, &batch, &cfg.loss, None, &mut rng).map(|_| ())
    })?
    .per_sec;
    let params = trainer.model().num_params();
    // The same step in plain PyTorch (f32 on the CPU only), and both against the cores' peak.
    let threads = rayon::current_num_threads();
    let theirs = if on_cpu && args.precision == flowalign::precision::Precision::F32 {
        let model = clap::ValueEnum::to_possible_value(&cfg.model.size)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let extra: Vec<String> = vec![
            "--model".into(),
            model,
            "--image-size".into(),
            s.to_string(),
            "--batch".into(),
            b.to_string(),
            "--patch".into(),
            cfg.model.patch.to_string(),
            "--latent-tokens".into(),
            cfg.model.latent_tokens.to_string(),
            "--latent-dim".into(),
            cfg.model.latent_dim.to_string(),
            "--mc".into(),
            cfg.loss.mc.to_string(),
            // At least 5 timed steps, about `--seconds` long.
            "--steps".into(),
            ((args.seconds * sps).ceil() as usize).max(5).to_string(),
            "--threads".into(),
            threads.to_string(),
        ];
        peer(args, "benches/torch_ae.py", &extra)
    } else {
        None
    };
    let ratio = theirs
        .as_ref()
        .and_then(|p| Some(sps * p["step_ms_median"].as_f64()? / 1e3));
    let flops = super::peak::vit_ae_train_flops(
        b,
        s,
        cfg.model.patch,
        width,
        depth,
        cfg.model.latent_tokens,
        cfg.model.latent_dim,
    ) + (b * cfg.model.latent_tokens * cfg.loss.mc) as f64
        * super::peak::MlpFlops {
            dim: cfg.model.latent_dim,
            width: 1024,
            depth: 6,
        }
        .align();
    let peak = on_cpu.then(|| super::peak::measure(threads));
    let gflops = sps * flops / 1e9;
    if let Some(r) = ratio {
        tracing::info!("flowalign / PyTorch steps per second: {r:.2}");
    }
    let adv = if args.adv {
        use flowalign::ae::adversarial::{AdvDraws, Adversary, disc_step};
        cfg.loss.adv.start_step = 0;
        let (mut adversary, trunk) = Adversary::new(&cfg, &device)?;
        let replicas = [flowalign::ae::loss::Frozen {
            dino: Some(trunk),
            ..replicas[0].clone()
        }];
        let draws = AdvDraws::for_step(0, 0, b, s, 1.0);
        tracing::info!("measuring the step with the adversarial term (DiffAugment and CR on)");
        let adv_sps = timed(args.seconds, || {
            let heads = adversary.frozen();
            let gen_adv = flowalign::ae::train::GenAdv {
                disc: &heads,
                aug: &draws.aug,
            };
            let (_, fakes) = ae_step(
                &mut trainer,
                &replicas,
                &batch,
                &cfg.loss,
                Some(gen_adv),
                &mut rng,
            )?;
            disc_step(
                &mut adversary.trainer,
                &replicas,
                &batch,
                &fakes,
                &draws,
                &cfg.loss.adv,
                &mut adversary.lecam,
            )
            .map(|_| ())
        })?
        .per_sec;
        let (d_depth, d_width, _) = cfg.loss.adv.model.size.dims();
        json!({
            "discriminator": { "size": cfg.loss.adv.model.size, "width": d_width, "trunk_depth": d_depth,
                               "taps": cfg.loss.adv.model.taps, "patch": cfg.loss.adv.model.patch,
                               "head_params": adversary.trainer.model().num_params() },
            "train_images_per_sec": adv_sps * b as f64,
            "train_steps_per_sec": adv_sps,
            "step_time_ratio_with_over_without": sps / adv_sps,
        })
    } else {
        Value::Null
    };

    // The loader: JPEGs of ImageNet's typical 500 x 375, decoded, resized, cropped and flipped.
    let dir = tempfile::tempdir().context("a writable temporary folder is needed")?;
    for i in 0..32u32 {
        let class = dir.path().join(format!("c{}", i % 4));
        std::fs::create_dir_all(&class)
            .with_context(|| format!("cannot create {}", class.display()))?;
        let img = image::RgbImage::from_fn(500, 375, |x, y| {
            let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729) ^ i.wrapping_mul(31)) % 64;
            image::Rgb([
                (x / 2) as u8 ^ n as u8,
                (y / 2) as u8,
                (i * 8) as u8 ^ n as u8,
            ])
        });
        let path = class.join(format!("{i}.jpg"));
        img.save(&path)
            .with_context(|| format!("could not write a benchmark image {}", path.display()))?;
    }
    let loader = ImageLoader::new(ImageFolder::scan(dir.path())?, s, 0, Crop::Train);
    let indices: Vec<usize> = (0..32).collect();
    let per_core = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("building a one-thread pool")?
        .install(|| {
            timed(args.seconds / 2.0, || {
                loader.gather(&indices, 0).map(|_| ())
            })
        })?
        .per_sec;
    let all = timed(args.seconds / 2.0, || {
        loader.gather(&indices, 0).map(|_| ())
    })?
    .per_sec;
    Ok(json!({
        "model": { "size": cfg.model.size, "depth": depth, "width": width, "heads": heads, "params": params,
                   "image_size": s, "patch": cfg.model.patch, "latent_tokens": cfg.model.latent_tokens },
        "batch": b,
        "device": name,
        "precision": args.precision,
        "train_images_per_sec": sps * b as f64,
        "train_steps_per_sec": sps,
        "flops_per_step": flops,
        "gflops": gflops,
        "fraction_of_peak": peak.as_ref().map(|p| gflops / p.gflops),
        "machine": peak.as_ref().map(|p| machine(p, None)),
        "pytorch": theirs,
        "ratio_flowalign_over_pytorch": ratio,
        "peak_rss_mib": peak_rss_mib(),
        "loader_images_per_sec_per_core": per_core * 32.0,
        "loader_images_per_sec_all_cores": all * 32.0,
        "loader_cores": rayon::current_num_threads(),
        "adversarial": adv,
    }))
}

/// MAR-B's guidance scale (the original MAR-B's; the paper's is unpublished), for the guided
/// sampling figures.
const BENCH_CFG: f32 = 2.9;

/// `flowalign bench gen`: the stage-3 training step on the chosen device (and the PyTorch MAR peer
/// on the CPU), then sampling seconds per image over iterations x head steps, CFG off and on.
fn generator(args: &BenchArgs) -> Result<Value> {
    use flowalign::generator::run::{gen_step, new_trainer};
    use flowalign::generator::sample::generate;
    use flowalign::generator::{Arch, GenConfig};
    let (device, name) = flowalign::backend::select(args.device)?;
    let on_cpu = name.starts_with("cpu");
    let mut cfg = GenConfig::preset(args.gen_preset, "-");
    cfg.arch = Arch::Mar;
    cfg.train.run.batch = args.batch.unwrap_or(if on_cpu { 8 } else { 256 });
    cfg.train.run.precision = args.precision;
    cfg.validate()?;
    let (b, m, h) = (cfg.train.run.batch, &cfg.mar, &cfg.head);
    let (tokens, dim, classes) = cfg.model_shape();
    tracing::info!(
        "measuring the MAR training step ({name}, width {}, {} + {} blocks, head {} x {}, {tokens} x {dim} tokens, batch {b}, {})",
        m.width,
        m.encoder_depth,
        m.decoder_depth,
        h.width,
        h.depth,
        args.precision
    );
    let mut trainer = new_trainer(&cfg, &device);
    let params = trainer.model().num_params();
    let mut rng = rng_for(0, Stream::Mask, 0);
    let raw = normal_rows(&mut rng, b, tokens * dim);
    let labels: Vec<usize> = (0..b).map(|i| i % classes).collect();
    let sps = timed(args.seconds, || {
        gen_step(
            &mut trainer,
            &cfg,
            raw.clone(),
            labels.clone(),
            &mut rng,
            &device,
        )
        .map(|_| ())
    })?
    .per_sec;
    let train_rss = peak_rss_mib();
    let extra: Vec<String> = [
        "--batch".to_string(),
        b.to_string(),
        "--width".into(),
        m.width.to_string(),
        "--encoder-depth".into(),
        m.encoder_depth.to_string(),
        "--decoder-depth".into(),
        m.decoder_depth.to_string(),
        "--heads".into(),
        m.heads.to_string(),
        "--buffer".into(),
        m.buffer.to_string(),
        "--head-width".into(),
        h.width.to_string(),
        "--head-depth".into(),
        h.depth.to_string(),
        "--batch-mul".into(),
        h.batch_mul.to_string(),
        "--seq-len".into(),
        tokens.to_string(),
        "--token-dim".into(),
        dim.to_string(),
        "--classes".into(),
        classes.to_string(),
        // At least 5 timed steps, about `--seconds` long.
        "--steps".into(),
        ((args.seconds * sps).ceil() as usize).max(5).to_string(),
        "--threads".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .to_string(),
    ]
    .to_vec();
    let theirs = if on_cpu && args.precision == flowalign::precision::Precision::F32 {
        peer(args, "benches/torch_mar.py", &extra)
    } else {
        None
    };
    let ratio = theirs
        .as_ref()
        .and_then(|p| Some(sps * p["step_ms_median"].as_f64()? / 1e3));

    let mut sampling = Vec::new();
    if !args.no_sampling {
        let model = trainer.frozen();
        let n = args.sample_batch.unwrap_or(if on_cpu { 2 } else { 64 });
        let wanted: Vec<Option<usize>> = (0..n).map(|i| Some(i % classes)).collect();
        for &iters in &args.iters {
            for &steps in &args.head_steps {
                for guidance in [1.0, BENCH_CFG] {
                    let mut opts = cfg.sample_options();
                    (opts.num_iter, opts.time_points, opts.cfg) = (iters, steps, guidance);
                    let start = Instant::now();
                    generate(&model, &wanted, &opts, cfg.data.scale as f32, &mut rng)?;
                    let per_image = start.elapsed().as_secs_f64() / n as f64;
                    tracing::info!(
                        "sampling: {iters} iterations, {steps} time points, cfg {guidance}: {per_image:.3} s/image"
                    );
                    sampling.push(json!({
                        "iterations": iters, "time_points": steps, "cfg": f64::from(guidance * 10.0).round() / 10.0,
                        "seconds_per_image": per_image, "images_per_sec": 1.0 / per_image,
                    }));
                }
            }
        }
    }
    Ok(json!({
        "model": { "preset": args.gen_preset, "width": m.width, "encoder_depth": m.encoder_depth,
                   "decoder_depth": m.decoder_depth, "head_width": h.width, "head_depth": h.depth,
                   "head_batch_mul": h.batch_mul, "tokens": tokens, "token_dim": dim, "params": params },
        "batch": b,
        "device": name,
        "precision": args.precision,
        "flowalign": {
            "train_steps_per_sec": sps,
            "train_latents_per_sec": sps * b as f64,
            "peak_rss_mib_after_training": train_rss,
        },
        "pytorch": theirs,
        "ratio_flowalign_over_pytorch": ratio,
        "sampling": { "batch": args.sample_batch.unwrap_or(if on_cpu { 2 } else { 64 }), "figures": sampling },
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Writes stand-in FID Inception weights (every tensor of the network, deterministic values of a
/// sensible scale: He-uniform convolutions, positive variances) to `path`: the speed of the network
/// does not depend on its values.
fn stand_in_inception(path: &std::path::Path) -> Result<()> {
    use flowalign::metrics::inception::{Layout, expected_tensors};
    use rand::RngExt;
    let mut rng = rng_for(0, Stream::Init, 7);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = expected_tensors(Layout::PytorchFid)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let bound = (6.0 / fan_in as f32).sqrt();
            let bytes = (0..n)
                .map(|_| {
                    let u: f32 = rng.random_range(-1.0..1.0);
                    if name.ends_with("running_var") || name.ends_with("bn.weight") {
                        1.0 + 0.2 * u
                    } else if shape.len() > 1 {
                        bound * u
                    } else {
                        0.1 * u
                    }
                })
                .flat_map(f32::to_le_bytes)
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .context("a stand-in tensor")
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing stand-in weights to {}", path.display()))
}

/// `flowalign bench metrics`: the Inception network's throughput and the metric maths at
/// torch-fidelity's sizes, on the CPU or the chosen device.
fn metrics(args: &BenchArgs) -> Result<Value> {
    use flowalign::metrics::fid::{FeatureStats, fid};
    use flowalign::metrics::inception::Inception;
    use flowalign::metrics::{isc, kid, prc};
    let (device, name) = flowalign::backend::select(args.device)?;
    let tmp = tempfile::tempdir().context("a writable temporary folder is needed")?;
    let (weights, stand_in) = match &args.inception {
        Some(file) => (file.clone(), false),
        None => {
            let file = tmp.path().join("inception.safetensors");
            stand_in_inception(&file)?;
            (file, true)
        }
    };
    let net = Inception::load(&weights, &device)?;
    let mut network = Vec::new();
    for batch in [1usize, 8, 32] {
        let pixels: Vec<f32> = (0..batch * 3 * 256 * 256)
            .map(|i| (i % 251) as f32 / 250.0)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(pixels, [batch, 3, 256, 256]), &device);
        let calls = timed(args.seconds / 3.0, || {
            net.features(x.clone())
                .try_into_vec_as::<f32>()
                .map(|_| ())
                .map_err(|e| flowalign::Error::Numeric(format!("{e:?}")))
        })?
        .per_sec;
        tracing::info!(
            "Inception forward at batch {batch}: {:.2} images/s",
            calls * batch as f64
        );
        network.push(json!({ "batch": batch, "images_per_sec": calls * batch as f64 }));
    }
    // Gaussian 2048-d rows, the second set shifted by 0.05 per coordinate.
    let rows = |n: usize, seed: u64| -> Vec<f32> {
        normal_rows(&mut rng_for(seed, Stream::Reference, 0), n, 2048)
            .into_iter()
            .map(|v| v + 0.05 * (seed - 1) as f32)
            .collect()
    };
    let seconds = |f: &mut dyn FnMut() -> flowalign::Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let mut fid_s = Vec::new();
    for n in [64usize, 2100] {
        let (mut a, mut b) = (FeatureStats::new(2048), FeatureStats::new(2048));
        a.add(&rows(n, 1));
        b.add(&rows(n, 2));
        let s = seconds(&mut || fid(&a, &b).map(|_| ()))?;
        tracing::info!("FID of {n} vs {n} rows: {s:.2} s");
        fid_s.push(json!({ "rows": n, "seconds": s }));
    }
    let (a, b) = (rows(5000, 1), rows(5000, 2));
    let kid_s = seconds(&mut || kid::kid(&a, &b, 2048, 100, 1000, 2020).map(|_| ()))?;
    tracing::info!("KID, 100 subsets of 1000: {kid_s:.1} s");
    let prc_s = seconds(&mut || prc::precision_recall(&a, &b, 2048, 3).map(|_| ()))?;
    tracing::info!("precision/recall, 5000 vs 5000 rows: {prc_s:.1} s");
    let logits: Vec<f32> = (0..10_000 * 1008)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let is_s = seconds(&mut || isc::inception_score(&logits, 1008, 10, Some(2020)).map(|_| ()))?;
    tracing::info!("IS of 10,000 rows: {is_s:.2} s");
    Ok(json!({
        "device": name,
        "inception": { "weights": if stand_in { "stand-in".to_string() } else { weights.display().to_string() },
                       "input_px": 256, "forward": network },
        "fid_2048d": fid_s,
        "kid_100_subsets_of_1000_seconds": kid_s,
        "precision_recall_k3_5000_vs_5000_seconds": prc_s,
        "inception_score_10000_rows_seconds": is_s,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// `flowalign bench dist`, one rank of an MPI job: every rank measures, rank 0 writes the JSON.
fn dist(args: &BenchArgs) -> Result<()> {
    use flowalign::dist::Comm;
    let comm = std::sync::Arc::new(Comm::mpi(flowalign::dist::DEFAULT_TIMEOUT)?);
    match dist_measure(args, &comm) {
        Ok(result) => {
            if comm.leads() {
                let size = comm.rank().size;
                let out = args
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("runs/bench-dist-{size}.json")));
                write_result(&out, &result)?;
            }
            comm.finish();
            Ok(())
        }
        Err(e) => {
            eprintln!("error: rank {}: {e:#}", comm.rank().rank);
            comm.abort(2)
        }
    }
}

fn dist_measure(args: &BenchArgs, comm: &std::sync::Arc<flowalign::dist::Comm>) -> Result<Value> {
    use flowalign::dist::{BUCKET_FLOATS, mean_grads, part};
    use flowalign::prior::{FeaturePriorConfig, PriorPreset};
    let me = comm.rank();
    let (device, name) = flowalign::backend::select_at(args.device, me.local_rank)?;
    let mut cfg = FeaturePriorConfig::preset(PriorPreset::Paper, "bench");
    cfg.model.width = args.width.unwrap_or(cfg.model.width);
    cfg.model.depth = args.depth.unwrap_or(cfg.model.depth);
    let per_rank = args.batch.unwrap_or(256);
    cfg.train.run.batch = per_rank * me.size;
    cfg.train.mc = args.mc;
    cfg.validate()?;
    let (d, mc) = (cfg.data.latent_dim, cfg.train.mc);
    let lead = me.rank == 0;
    if lead {
        tracing::info!(
            "measuring {} ranks: prior {}x{}, {per_rank} vectors x mc {mc} per rank on {name}",
            me.size,
            cfg.model.width,
            cfg.model.depth
        );
    }
    let mut trainer =
        flowalign::prior::run::new_trainer(&cfg, d, &device).with_comm(std::sync::Arc::clone(comm));
    let params = trainer.model().num_params();
    let mut rng = rng_for(0, Stream::Prior, 0);
    let table = normal_rows(&mut rng, 100_000, d);
    let rows_part = part(cfg.train.run.batch, me.rank, me.size);
    let devices = [device.clone()];
    let mut step = |rng: &mut flowalign::rng::Rng| -> flowalign::Result<()> {
        use rand::RngExt;
        let mut rows = Vec::with_capacity(cfg.train.run.batch * d);
        for _ in 0..cfg.train.run.batch {
            let i = rng.random_range(0..100_000);
            rows.extend_from_slice(&table[i * d..(i + 1) * d]);
        }
        flowalign::prior::run::step_on_rows_sharded(
            &mut trainer,
            &rows,
            rows_part.clone(),
            d,
            mc,
            rng,
            &devices,
        )
        .map(|_| ())
    };
    // Every rank must take the same number of steps: rank 0 picks it from a short trial.
    for _ in 0..2 {
        step(&mut rng)?;
    }
    let trial = Instant::now();
    for _ in 0..3 {
        step(&mut rng)?;
    }
    let per_step = trial.elapsed().as_secs_f64() / 3.0;
    let mine = if lead {
        (args.seconds / per_step).ceil().max(5.0)
    } else {
        0.0
    };
    let steps = comm.sum_f64(vec![mine], 0, "bench steps")?[0] as usize;
    let start = Instant::now();
    for _ in 0..steps {
        step(&mut rng)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let vectors_per_s = (steps * cfg.train.run.batch) as f64 / secs;

    // The prior's gradient all-reduce alone, staged from the device and back.
    let model = trainer.model().clone();
    let ad = device.clone().autodiff();
    let x = flowalign::flow::rows_to_tensor(&table[..per_rank * d], d, &ad);
    let draws = PathDraws::sample(&mut rng, per_rank, d, &ad);
    let loss = flowalign::align::flow_loss(&model, x, &draws, Reduction::Mean);
    let mut grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        mean_grads(comm, &model, &mut grads, 0.0, 0)?;
    }
    let prior_allreduce_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    drop((trainer, model, grads));

    // The autoencoder's gradient size: rank 0 counts it (building the model), every rank sums
    // that many floats in buckets.
    let mine = if lead {
        let mut rng = rng_for(0, Stream::Init, 0);
        let model_cfg = flowalign::ae::model::AeModelConfig {
            size: args.model,
            ..flowalign::ae::config::AeConfig::preset(
                flowalign::ae::config::AePreset::Paper,
                "",
                "",
            )
            .model
        };
        model_cfg.init(&mut rng, &Device::flex()).num_params() as f64
    } else {
        0.0
    };
    let ae_params = comm.sum_f64(vec![mine], 0, "model size")?[0] as usize;
    let time_sum = |n: usize| -> Result<f64> {
        let t = Instant::now();
        let mut left = n;
        let mut sent = 0;
        while left > 0 {
            let k = left.min(BUCKET_FLOATS);
            comm.start_sum(vec![1.0f32; k], 0, "bench all-reduce")?;
            left -= k;
            sent += 1;
        }
        for _ in 0..sent {
            comm.finish_sum()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    time_sum(ae_params.min(BUCKET_FLOATS))?;
    let mut ms: Vec<f64> = (0..3).map(|_| time_sum(ae_params)).collect::<Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    let ae_allreduce_ms = ms[1];
    let gbytes = |n: usize, ms: f64| n as f64 * 4.0 / (ms / 1e3) / 1e9;
    Ok(json!({
        "ranks": me.size,
        "ranks_on_this_machine": me.local_size,
        "device": name,
        "prior": {
            "width": cfg.model.width,
            "depth": cfg.model.depth,
            "params": params,
            "vectors_per_rank": per_rank,
            "mc": mc,
            "steps": steps,
            "vectors_per_sec": vectors_per_s,
            "vectors_per_sec_per_rank": vectors_per_s / me.size as f64,
            "grad_allreduce_ms": prior_allreduce_ms,
        },
        "ae_grad_allreduce": {
            "model": format!("{:?}", args.model),
            "params": ae_params,
            "bucket_floats": BUCKET_FLOATS,
            "ms": ae_allreduce_ms,
            "algorithm_gb_per_s": gbytes(ae_params, ae_allreduce_ms),
        },
        "peak_rss_mib": peak_rss_mib(),
    }))
}
