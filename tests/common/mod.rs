//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use flowalign::flow::path::normal_rows;
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
