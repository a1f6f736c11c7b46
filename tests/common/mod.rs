//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use flowalign::flow::path::normal_rows;
use flowalign::metrics::inception::{Layout, expected_tensors};
use flowalign::rng::{Stream, rng_for};
use half::bf16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Runs the `flowalign` binary with `args`.
pub fn flowalign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowalign"))
        .args(args)
        .output()
        .expect("flowalign runs")
}

/// A bf16 table of `rows` x `cols` Gaussian values with std 0.02 (like a token-embedding table), plus
/// an integer tensor.
pub fn write_table(path: &Path, rows: usize, cols: usize) {
    let mut rng = rng_for(5, Stream::Reference, 0);
    let values: Vec<u8> = normal_rows(&mut rng, rows, cols)
        .into_iter()
        .flat_map(|v| bf16::from_f32(0.02 * v).to_le_bytes())
        .collect();
    let ids: Vec<u8> = (0..rows as i64).flat_map(|i| i.to_le_bytes()).collect();
    let views: HashMap<String, TensorView> = [
        (
            "model.embed_tokens.weight".to_string(),
            TensorView::new(Dtype::BF16, vec![rows, cols], &values).unwrap(),
        ),
        (
            "ids".to_string(),
            TensorView::new(Dtype::I64, vec![rows], &ids).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Asserts a one-line error and exit code 2; returns the message.
pub fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// `n` 40 x 40 PNGs in 3 class folders: a colour gradient per class and a bright square.
pub fn draw_images(root: &Path, n: usize) {
    let colours = [[220u8, 60, 40], [40, 180, 90], [50, 80, 230]];
    for i in 0..n {
        let class = i % 3;
        let dir = root.join(format!("class{class}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (sx, sy) = ((i * 7) % 24, (i * 13) % 24);
        let img = image::RgbImage::from_fn(40, 40, |x, y| {
            let c = colours[class];
            let g = (x + y) as f32 / 80.0;
            let inside =
                (sx..sx + 12).contains(&(x as usize)) && (sy..sy + 12).contains(&(y as usize));
            if inside {
                image::Rgb([250, 250, 250])
            } else {
                image::Rgb(c.map(|v| (v as f32 * (0.4 + 0.6 * g)) as u8))
            }
        });
        img.save(dir.join(format!("img{i:03}.png"))).unwrap();
    }
}

/// A 4-dim prior from a small table.
pub fn train_prior(dir: &Path, table: &Path) {
    let data: Vec<f32> = (0..2000 * 16)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 16 < 4 { 2.0 } else { 1.0 })
        .collect();
    flowalign::features::write_npy(table, 2000, 16, &data).unwrap();
    let out = flowalign(&[
        "prior",
        "train",
        "--features",
        table.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--preset",
        "small",
        "--latent-dim",
        "4",
        "--width",
        "32",
        "--depth",
        "2",
        "--batch",
        "256",
        "--steps",
        "100",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// `n` values in [-0.5, 0.5) from splitmix64 of (FNV-1a of `name`, index): the generator of
/// `benches/fid_reference.py`, bit for bit.
pub fn hashed_uniform(name: &str, n: usize) -> Vec<f32> {
    let mut seed = 0xCBF2_9CE4_8422_2325u64;
    for b in name.bytes() {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// The deterministic FID Inception-v3 weights of `benches/fid_reference.py` (values drawn by the
/// torchvision name, so both layouts hold the same numbers), named as in `layout`.
pub fn inception_tensors(layout: Layout) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    expected_tensors(Layout::Torchvision)
        .into_iter()
        .zip(expected_tensors(layout))
        .map(|((tv, shape), (name, _))| {
            let n: usize = shape.iter().product();
            let u = hashed_uniform(&tv, n);
            let values: Vec<f32> = if tv.ends_with("conv.weight") {
                let fan_in: usize = shape[1..].iter().product();
                let scale = (2.0 * (6.0 / fan_in as f64).sqrt()) as f32;
                u.iter().map(|v| v * scale).collect()
            } else if tv.ends_with("bn.weight") {
                u.iter().map(|v| (v + 0.5) * 0.4 + 0.8).collect()
            } else if tv.ends_with("bn.running_var") {
                u.iter().map(|v| (v + 0.5) * 0.8 + 0.6).collect()
            } else {
                u.iter().map(|v| v * 0.2).collect()
            };
            (name, shape, values)
        })
        .collect()
}

/// Writes `tensors` as a safetensors file of `dtype` (F32, F16 or BF16).
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
            other => panic!("no writer for {other:?}"),
        })
        .collect();
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes the deterministic FID Inception-v3 weights to `path` (f32, named as in `layout`).
pub fn write_inception(path: &Path, layout: Layout) {
    write_tensors(path, &inception_tensors(layout), Dtype::F32);
}

/// The deterministic weights with the classifier too, as torch-fidelity's weights file has it
/// (`fc.weight` `[1008, 2048]` He-uniform, `fc.bias` in [-0.1, 0.1)): the draws of
/// `benches/fid_reference.py`'s `deterministic_weights` for those names.
pub fn inception_tensors_with_fc(layout: Layout) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut tensors = inception_tensors(layout);
    let scale = (2.0 * (6.0 / 2048f64).sqrt()) as f32;
    let weight = hashed_uniform("fc.weight", 1008 * 2048)
        .iter()
        .map(|v| v * scale)
        .collect();
    let bias = hashed_uniform("fc.bias", 1008)
        .iter()
        .map(|v| v * 0.2)
        .collect();
    tensors.push(("fc.weight".into(), vec![1008, 2048], weight));
    tensors.push(("fc.bias".into(), vec![1008], bias));
    tensors
}

/// The flags of a tiny run on `features` into `out`.
pub fn prior_args<'a>(features: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "prior",
        "train",
        "--features",
        features,
        "--out",
        out,
        "--preset",
        "small",
        "--latent-dim",
        "8",
        "--width",
        "48",
        "--depth",
        "2",
        "--batch",
        "128",
        "--steps",
        steps,
        "--warmup",
        "10",
        "--checkpoint-every",
        "20",
        "--log-every",
        "10",
        "--device",
        "cpu",
    ]
}

/// Replaces the value of `flag` in `args`.
pub fn set<'a>(args: &mut [&'a str], flag: &str, value: &'a str) {
    let i = args.iter().position(|a| *a == flag).unwrap();
    args[i + 1] = value;
}

/// The flags of a tiny autoencoder run (32 px, batch 8, 150 steps, the adversarial term from step 20).
pub fn ae_args<'a>(data: &'a str, prior: &'a str, out: &'a str, lambda: &'a str) -> Vec<&'a str> {
    vec![
        "ae",
        "train",
        "--data",
        data,
        "--prior",
        prior,
        "--out",
        out,
        "--preset",
        "small",
        "--image-size",
        "32",
        "--patch",
        "8",
        "--latent-tokens",
        "8",
        "--latent-dim",
        "4",
        "--batch",
        "8",
        "--steps",
        "150",
        "--lambda",
        lambda,
        "--checkpoint-every",
        "50",
        "--log-every",
        "10",
        "--monitor-every",
        "50",
        "--recon-every",
        "50",
        "--adv-weight",
        "0.1",
        "--adv-start",
        "20",
        "--device",
        "cpu",
    ]
}
