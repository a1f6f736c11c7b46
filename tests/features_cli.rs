//! `flowalign features inspect|project` on files the test writes: every format, and bad input.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use flowalign::flow::path::normal_rows;
use flowalign::rng::{Stream, rng_for};
use half::bf16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn flowalign(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowalign"))
        .args(args)
        .output()
        .expect("flowalign runs")
}

/// A bf16 table of `rows` x `cols` Gaussian values with std 0.02 (like a token-embedding table), plus
/// an integer tensor.
fn write_table(path: &Path, rows: usize, cols: usize) {
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

fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn inspect_lists_tensors_and_project_writes_a_unit_variance_npy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    write_table(&file, 3000, 64);
    let out = flowalign(&["features", "inspect", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.embed_tokens.weight") && text.contains("[3000, 64]"),
        "{text}"
    );
    assert!(text.contains("bf16"), "{text}");
    assert!(
        text.contains("ids") && text.contains("not a 2-D float table"),
        "{text}"
    );

    let npy = dir.path().join("proj.npy");
    let spec = format!("{}:model.embed_tokens.weight", file.display());
    let out = flowalign(&[
        "features",
        "project",
        "--features",
        &spec,
        "--latent-dim",
        "8",
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&npy).unwrap();
    let arr = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(arr.shape(), &[3000, 8]);
    let v: Vec<f32> = arr.into_vec().unwrap();
    // Scaled by 1/std, then W_ij ~ N(0, 1/d2): about unit variance per dimension.
    let var = v.iter().map(|x| f64::from(x * x)).sum::<f64>() / v.len() as f64;
    assert!((0.8..1.2).contains(&var), "variance {var}");
}

#[test]
fn bad_feature_files_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    write_table(&file, 100, 16);
    let path = file.to_str().unwrap();
    let out_npy = dir.path().join("o.npy");
    let out = out_npy.to_str().unwrap();

    let e = one_line_error(&flowalign(&[
        "features",
        "project",
        "--features",
        &format!("{path}:nope"),
        "--out",
        out,
    ]));
    assert!(
        e.contains("no tensor named 'nope'") && e.contains("model.embed_tokens.weight"),
        "{e}"
    );
    let e = one_line_error(&flowalign(&[
        "features",
        "project",
        "--features",
        &format!("{path}:ids"),
        "--out",
        out,
    ]));
    assert!(e.contains("shape [100]"), "{e}");
    let e = one_line_error(&flowalign(&[
        "features",
        "project",
        "--features",
        &format!("{path}:model.embed_tokens.weight"),
        "--latent-dim",
        "32",
        "--out",
        out,
    ]));
    assert!(e.contains("below --latent-dim 32"), "{e}");
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = one_line_error(&flowalign(&["features", "inspect", cut.to_str().unwrap()]));
    assert!(e.contains("truncated"), "{e}");
    let e = one_line_error(&flowalign(&["features", "inspect", "missing.npy"]));
    assert!(e.contains("missing.npy"), "{e}");
    assert!(!out_npy.exists(), "no output after a failure");
}
