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
