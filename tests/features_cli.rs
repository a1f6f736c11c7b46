//! `flowalign features inspect|project` on files the test writes: every format, and bad input.

mod common;
use common::{flowalign, one_line_error, write_table};

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
        "--projection",
        "avgpool",
        "--out",
        out,
    ]));
    assert!(
        e.contains("latent dim (32)") && e.contains("--projection"),
        "{e}"
    );
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = one_line_error(&flowalign(&["features", "inspect", cut.to_str().unwrap()]));
    assert!(e.contains("truncated"), "{e}");
    let e = one_line_error(&flowalign(&["features", "inspect", "missing.npy"]));
    assert!(e.contains("missing.npy"), "{e}");
    assert!(!out_npy.exists(), "no output after a failure");
}
