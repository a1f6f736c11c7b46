//! The FID Inception-v3 against pytorch-fid's own network (`benches/fid_reference.py`, run with the
//! same deterministic weights and images): features and FID; both weight layouts and half-precision
//! files load; bad files are refused naming the tensor.
//!
//! The embedded values come from the float64 PyTorch network. With `FLOWALIGN_FID_REFERENCE=DIR`
//! (the script's `--out`), every feature is compared as well and the differences are printed.

use std::path::Path;

use burn::prelude::*;
use flowalign::metrics::fid::{FeatureStats, fid};
use flowalign::metrics::inception::{Inception, Layout};
use safetensors::Dtype;

mod common;
use common::{inception_tensors, write_inception, write_tensors};

/// Per image of set a then set b: sum of the 2048 features, sum of squares, features `PICKS`.
const PICKS: [usize; 4] = [0, 257, 1023, 2047];
const REFERENCE: [[f64; 6]; 16] = [
    [
        1.592895e+03,
        3.402829e+03,
        5.515655e-02,
        3.696585e-01,
        5.098580e-01,
        3.131682e+00,
    ],
    [
        1.593369e+03,
        3.430648e+03,
        6.725176e-02,
        3.335489e-01,
        4.868788e-01,
        3.031176e+00,
    ],
    [
        1.593456e+03,
        3.448812e+03,
        4.348270e-02,
        3.475582e-01,
        3.806122e-01,
        2.857617e+00,
    ],
    [
        1.603577e+03,
        3.484557e+03,
        6.114787e-02,
        3.839714e-01,
        4.062999e-01,
        2.847975e+00,
    ],
    [
        1.624254e+03,
        3.582707e+03,
        5.131408e-02,
        3.907230e-01,
        4.694085e-01,
        3.090525e+00,
    ],
    [
        1.632909e+03,
        3.625682e+03,
        5.927530e-02,
        4.144253e-01,
        4.782500e-01,
        3.186685e+00,
    ],
    [
        1.645160e+03,
        3.687673e+03,
        6.649970e-02,
        4.079127e-01,
        4.302349e-01,
        3.129328e+00,
    ],
    [
        1.662869e+03,
        3.758700e+03,
        7.395066e-02,
        4.336718e-01,
        4.111405e-01,
        3.152247e+00,
    ],
    [
        1.540411e+03,
        3.211245e+03,
        3.180161e-02,
        3.458782e-01,
        3.713679e-01,
        2.926655e+00,
    ],
    [
        1.545655e+03,
        3.238255e+03,
        4.101049e-02,
        3.728542e-01,
        4.224813e-01,
        2.800975e+00,
    ],
    [
        1.523414e+03,
        3.149523e+03,
        3.577601e-02,
        3.764466e-01,
        4.381408e-01,
        2.809529e+00,
    ],
    [
        1.550035e+03,
        3.259776e+03,
        3.017285e-02,
        4.069238e-01,
        4.353774e-01,
        2.892796e+00,
    ],
    [
        1.569631e+03,
        3.355279e+03,
        4.335166e-02,
        3.915035e-01,
        3.868981e-01,
        3.113738e+00,
    ],
    [
        1.585839e+03,
        3.427630e+03,
        4.598130e-02,
        4.280668e-01,
        4.091252e-01,
        3.048296e+00,
    ],
    [
        1.591518e+03,
        3.452135e+03,
        5.117432e-02,
        4.506317e-01,
        3.663781e-01,
        3.034790e+00,
    ],
    [
        1.610714e+03,
        3.533542e+03,
        4.336425e-02,
        4.218397e-01,
        3.445958e-01,
        3.083812e+00,
    ],
];
/// FID(a, b) of the float64 PyTorch features (eigen route; pytorch-fid's scipy route: 8.033850).
const FID_AB: f64 = 8.033856e+00;

/// The script's 8 images `[8, 3, 64, 64]` in [0, 1] of set `a` or `b`.
fn images(set: char) -> Vec<f32> {
    let mut out = Vec::with_capacity(8 * 3 * 64 * 64);
    for i in 0..8usize {
        for c in 0..3usize {
            for y in 0..64usize {
                for x in 0..64usize {
                    let v = if set == 'a' {
                        (x * (3 + i) + y * (5 + 2 * c) + 17 * i) % 256
                    } else {
                        (x * (4 + i) + y * (6 + c) + 11 * i + 40 * c) % 256
                    };
                    out.push(v as f32 / 255.0);
                }
            }
        }
    }
    out
}

fn features(net: &Inception, pixels: &[f32], n: usize, dev: &Device) -> Vec<f32> {
    let x = Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [n, 3, 64, 64]), dev);
    let f = net.features(x);
    assert_eq!(f.dims(), [n, 2048]);
    f.try_into_vec_as::<f32>().unwrap()
}

/// A float32 or float64 tensor of a safetensors file, as f64.
fn read_f64(path: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
            .collect(),
        Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn features_and_fid_match_pytorch_fid() {
    let dev = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("inception-fid.safetensors");
    write_inception(&file, Layout::PytorchFid);
    let net = Inception::load(&file, &dev).unwrap();
    let start = std::time::Instant::now();
    let fa = features(&net, &images('a'), 8, &dev);
    let fb = features(&net, &images('b'), 8, &dev);
    eprintln!(
        "16 images at 299 px: {:.2} images/s",
        16.0 / start.elapsed().as_secs_f64()
    );
    assert!(fa.iter().chain(&fb).all(|v| v.is_finite()));
    let mut worst = 0.0f64;
    for (row, f) in fa.chunks(2048).chain(fb.chunks(2048)).enumerate() {
        let sum: f64 = f.iter().map(|&v| f64::from(v)).sum();
        let sq: f64 = f.iter().map(|&v| f64::from(v).powi(2)).sum();
        let want = REFERENCE[row];
        let rel = |got: f64, want: f64| (got - want).abs() / want.abs();
        worst = worst.max(rel(sum, want[0])).max(rel(sq, want[1]));
        for (k, &j) in PICKS.iter().enumerate() {
            // Against the largest feature (about 3): the picked ones can be small.
            worst = worst.max((f64::from(f[j]) - want[2 + k]).abs() / 3.0);
        }
    }
    let (mut a, mut b) = (FeatureStats::new(2048), FeatureStats::new(2048));
    a.add(&fa);
    b.add(&fb);
    let got = fid(&a, &b).unwrap();
    eprintln!(
        "vs PyTorch float64: worst relative difference {worst:.2e}; FID {got:.6} vs {FID_AB:.6}"
    );
    assert!(worst < 1e-4, "{worst}");
    assert!((got - FID_AB).abs() < 1e-3 * FID_AB, "{got} vs {FID_AB}");

    // The whole feature vectors, when the script's output is at hand.
    if let Ok(dir) = std::env::var("FLOWALIGN_FID_REFERENCE") {
        let reference = Path::new(&dir).join("reference.safetensors");
        let rust: Vec<f64> = fa.iter().chain(&fb).map(|&v| f64::from(v)).collect();
        for (what, names) in [
            ("PyTorch float64", ["features_a64", "features_b64"]),
            ("PyTorch float32", ["features_a", "features_b"]),
        ] {
            let want: Vec<f64> = names.iter().flat_map(|n| read_f64(&reference, n)).collect();
            let max_abs = rust
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let max_ref = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
            let max_rel = rust
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
                .fold(0.0, f64::max);
            eprintln!(
                "all 16 x 2048 features vs {what}: max abs diff {max_abs:.3e} (max |f| {max_ref:.3}, {:.3e} of it); max elementwise relative diff {max_rel:.3e}",
                max_abs / max_ref
            );
            assert!(max_abs < 1e-4 * max_ref, "{what}: {max_abs}");
        }
        // Our FID maths on PyTorch's float64 features, both routes.
        let torch =
            |n: &str| -> Vec<f32> { read_f64(&reference, n).iter().map(|&v| v as f32).collect() };
        let (mut a, mut b) = (FeatureStats::new(2048), FeatureStats::new(2048));
        a.add(&torch("features_a64"));
        b.add(&torch("features_b64"));
        let general = flowalign::metrics::fid::frechet_distance(
            a.mean(),
            &a.covariance().unwrap(),
            b.mean(),
            &b.covariance().unwrap(),
        )
        .unwrap();
        eprintln!(
            "FID of PyTorch's features by our maths: low-rank route {:.6}, general route {general:.6}",
            fid(&a, &b).unwrap()
        );
    }
}

#[test]
fn both_layouts_and_half_precision_load_and_agree() {
    let dev = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let pixels: Vec<f32> = images('a')[..2 * 3 * 64 * 64].to_vec();
    let tv = tmp.path().join("tv.safetensors");
    write_inception(&tv, Layout::Torchvision);
    let fid_f16 = tmp.path().join("fid-f16.safetensors");
    write_tensors(&fid_f16, &inception_tensors(Layout::PytorchFid), Dtype::F16);
    let f_tv = features(&Inception::load(&tv, &dev).unwrap(), &pixels, 2, &dev);
    let f_half = features(&Inception::load(&fid_f16, &dev).unwrap(), &pixels, 2, &dev);
    // Set a's first two images of the float64 PyTorch network.
    for (row, f) in f_tv.chunks(2048).enumerate() {
        let sum: f64 = f.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - REFERENCE[row][0]).abs() < 1e-4 * REFERENCE[row][0]);
    }
    // Half-precision weights: close, not equal.
    let worst = f_tv
        .iter()
        .zip(&f_half)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.05, "{worst}");
}

#[test]
fn bad_weights_are_refused_naming_the_tensor() {
    let dev = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let all = inception_tensors(Layout::PytorchFid);
    let err = |tensors: &[(String, Vec<usize>, Vec<f32>)], name: &str| -> String {
        let path = tmp.path().join(name);
        write_tensors(&path, tensors, Dtype::F32);
        let msg = Inception::load(&path, &dev).err().unwrap().to_string();
        assert!(msg.contains(name), "the file is named: {msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        msg
    };
    let missing: Vec<_> = all
        .iter()
        .filter(|(n, _, _)| n != "blocks.2.4.branch7x7_2.bn.running_var")
        .cloned()
        .collect();
    let msg = err(&missing, "missing.safetensors");
    assert!(
        msg.contains("has no tensor blocks.2.4.branch7x7_2.bn.running_var")
            && msg.contains("pt_inception-2015-12-05"),
        "{msg}"
    );
    // A 7 x 1 kernel where the network has 1 x 7.
    let mut wrong = all.clone();
    let t = wrong
        .iter_mut()
        .find(|(n, _, _)| n == "blocks.2.4.branch7x7_2.conv.weight")
        .unwrap();
    t.1 = vec![128, 128, 7, 1];
    let msg = err(&wrong, "wrong.safetensors");
    assert!(
        msg.contains("blocks.2.4.branch7x7_2.conv.weight")
            && msg.contains("[128, 128, 7, 1]")
            && msg.contains("[128, 128, 1, 7]"),
        "{msg}"
    );
    let other = vec![("features.0.weight".to_string(), vec![2], vec![0.0, 1.0])];
    let msg = err(&other, "other.safetensors");
    assert!(
        msg.contains("blocks.0.0.conv.weight") && msg.contains("Conv2d_1a_3x3.conv.weight"),
        "{msg}"
    );
    let msg = Inception::load(Path::new("/no/inception.safetensors"), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("/no/inception.safetensors"), "{msg}");
}
