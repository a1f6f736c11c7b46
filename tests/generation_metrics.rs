//! The generation metrics against torch-fidelity itself (`benches/fidelity_reference.py`: its image
//! reading, TF1 resize, Inception and metric maths, run on the same PNGs with the same deterministic
//! stand-in weights, fc layer included); cached and ADM-style `.npz` references; bad input.
//!
//! With `FLOWALIGN_FIDELITY_REFERENCE=DIR` (the script's `--out`), the pool3 features and logits are
//! compared with torch-fidelity's as well and the differences printed.

use std::path::Path;

use flowalign::metrics::inception::{Inception, Layout};
use flowalign::metrics::input::ImageSet;
use flowalign::metrics::{
    self, ExtractOptions, GenMetricsOptions, GenMetricsReport, Reference, evaluate_images,
    extract_features,
};
use safetensors::Dtype;

mod common;
use common::{inception_tensors, inception_tensors_with_fc, write_tensors};

// torch-fidelity 0.4.0, float32 network (its default), kid_subset_size 20, precision/recall on pool3.
const FID: f64 = 2.183722674e+01;
const IS_MEAN: f64 = 1.186428564e+00;
const IS_STD: f64 = 1.591905464e-01;
const KID_MEAN: f64 = -4.087539673e+00;
const KID_STD: f64 = 9.738419184e-01;
const PRECISION: f64 = 8.750000000e-01;
const RECALL: f64 = 8.999999762e-01;
const F_SCORE: f64 = 8.873239321e-01;
/// The same FID of torch-fidelity's features by the symmetric eigen route (our maths); torch-fidelity's
/// `eigvals` of the non-symmetric, singular `s1 s2` gives the value above, 9e-5 lower.
const FID_EIGEN: f64 = 2.183922004e+01;

const N_GEN: usize = 24;
const N_REF: usize = 20;

/// The script's generated image `i`: uint8 `[64, 64, 3]` (see `generated_image` there).
fn generated_image(i: usize) -> image::RgbImage {
    let i = i as i64;
    image::RgbImage::from_fn(64, 64, |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        image::Rgb(std::array::from_fn(|c| {
            let c = c as i64;
            if i % 2 == 0 {
                let v = (x * (3 + i % 7) + y * (5 + 2 * c + i % 3)) * (i % 5) / 4 + (i / 5) * 45
                    - 60
                    + ((x / 8 + y / 8 + i) % 2) * 40 * (i % 3)
                    - c * 20 * (i % 4);
                v.clamp(0, 255) as u8
            } else {
                ((x * (3 + i % 7)
                    + y * (5 + 2 * c + i % 3)
                    + 17 * i
                    + 40 * c
                    + ((x / 8 + y / 8 + i) % 2) * 60 * (i % 4))
                    % 256) as u8
            }
        }))
    })
}

/// The script's reference image `j`: uint8 `[48, 48, 3]`.
fn reference_image(j: usize) -> image::RgbImage {
    let j = j as i64;
    image::RgbImage::from_fn(48, 48, |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        image::Rgb(std::array::from_fn(|c| {
            let c = c as i64;
            if j % 3 == 0 {
                let v = (x * (4 + j % 5) + y * (6 + c + j % 4)) * (j % 4 + 1) / 4 + (j / 4) * 25
                    - 10
                    + (((x / 6) ^ (y / 6)) % 3) * 60 * (j % 3)
                    - c * 25 * (j % 3);
                v.clamp(0, 255) as u8
            } else {
                ((x * (4 + j % 5)
                    + y * (6 + c + j % 4)
                    + 11 * j
                    + 30 * c
                    + (((x / 6) ^ (y / 6)) % 3) * 50 * (j % 3))
                    % 256) as u8
            }
        }))
    })
}

/// Writes images `0..n` of `draw` as `NNN.png` into `dir`.
fn write_pngs(dir: &Path, n: usize, draw: fn(usize) -> image::RgbImage) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        draw(i).save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

/// The stand-in weights with the classifier, in torch-fidelity's (torchvision's) names.
fn network(dir: &Path) -> Inception {
    let file = dir.join("inception-fidelity.safetensors");
    write_tensors(
        &file,
        &inception_tensors_with_fc(Layout::Torchvision),
        Dtype::F32,
    );
    Inception::load(&file, &burn::prelude::Device::flex()).unwrap()
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// Checks every number of `report` against torch-fidelity's; returns the worst relative differences
/// (FID, IS, KID) for the log.
fn check_against_torch_fidelity(report: &GenMetricsReport) -> [f64; 3] {
    assert_eq!(report.generated_images, N_GEN);
    assert_eq!(report.reference_images, Some(N_REF));
    // FID within 1e-3 of torch-fidelity's, and closer still to the same maths on its features.
    assert!(rel(report.fid, FID) < 1e-3, "FID {} vs {FID}", report.fid);
    assert!(
        rel(report.fid, FID_EIGEN) < 1e-4,
        "FID {} vs {FID_EIGEN}",
        report.fid
    );
    // IS within 1e-3, and so is its log, the mean KL (IS is near 1 with stand-in weights, so the
    // first alone would say little).
    let is = report
        .inception_score
        .expect("the weights have the classifier");
    assert_eq!(is.splits, 10);
    assert!(rel(is.mean, IS_MEAN) < 1e-3, "IS {is:?} vs {IS_MEAN}");
    assert!(
        rel(is.mean.ln(), IS_MEAN.ln()) < 1e-3,
        "log IS {} vs {}",
        is.mean.ln(),
        IS_MEAN.ln()
    );
    assert!(rel(is.std, IS_STD) < 1e-3, "IS std {} vs {IS_STD}", is.std);
    // KID: torch-fidelity sums its kernels in float32, here in f64; same subsets (numpy's draws).
    let kid = report.kid.expect("reference images give KID");
    assert_eq!((kid.subsets, kid.subset_size), (100, 20));
    assert!(rel(kid.mean, KID_MEAN) < 1e-4, "KID {kid:?} vs {KID_MEAN}");
    assert!(rel(kid.std, KID_STD) < 1e-4, "KID std {kid:?} vs {KID_STD}");
    // Precision/recall are counts: equal (torch-fidelity returns them as float32).
    let pr = report
        .precision_recall
        .expect("reference images give precision/recall");
    assert!((pr.precision - PRECISION).abs() < 1e-6, "{pr:?}");
    assert!((pr.recall - RECALL).abs() < 1e-6, "{pr:?}");
    assert!((pr.f_score - F_SCORE).abs() < 1e-6, "{pr:?}");
    [
        rel(report.fid, FID),
        rel(is.mean, IS_MEAN).max(rel(is.std, IS_STD)),
        rel(kid.mean, KID_MEAN).max(rel(kid.std, KID_STD)),
    ]
}

#[test]
fn metrics_match_torch_fidelity() {
    let tmp = tempfile::tempdir().unwrap();
    let (gen_dir, ref_dir) = (tmp.path().join("generated"), tmp.path().join("reference"));
    write_pngs(&gen_dir, N_GEN, generated_image);
    write_pngs(&ref_dir, N_REF, reference_image);
    let net = network(tmp.path());
    let opts = GenMetricsOptions::default();
    let reference = Reference::open(&ref_dir, false).unwrap();
    let start = std::time::Instant::now();
    let report = evaluate_images(&gen_dir, &reference, &net, &opts).unwrap();
    eprintln!(
        "{} images in {:.1} s: {}",
        N_GEN + N_REF,
        start.elapsed().as_secs_f64(),
        serde_json::to_string(&report).unwrap()
    );
    let [fid, is, kid] = check_against_torch_fidelity(&report);
    eprintln!(
        "vs torch-fidelity: FID rel diff {fid:.2e}, IS {is:.2e}, KID {kid:.2e}; precision/recall equal"
    );
    assert_eq!(report.reference_statistics, "images");
    assert!(report.notes.is_empty(), "{:?}", report.notes);

    // Every feature, when the script's output is at hand.
    if let Ok(dir) = std::env::var("FLOWALIGN_FIDELITY_REFERENCE") {
        let file = std::fs::read(Path::new(&dir).join("features.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let torch = |name: &str| -> Vec<f64> {
            let t = st.tensor(name).unwrap();
            match t.dtype() {
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
                _ => t
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            }
        };
        for (set, dir) in [("gen", &gen_dir), ("ref", &ref_dir)] {
            let images = ImageSet::open(dir, false).unwrap();
            let ours = extract_features(
                &images,
                &net,
                ExtractOptions {
                    batch: 8,
                    keep_rows: true,
                    isc: None,
                },
            )
            .unwrap()
            .pool3
            .unwrap();
            for suffix in ["", "64"] {
                let want = torch(&format!("{set}_pool3{suffix}"));
                let max_abs = ours
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (f64::from(*a) - b).abs())
                    .fold(0.0, f64::max);
                let max_ref = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
                eprintln!(
                    "{set} pool3 vs torch-fidelity's {} network: max abs diff {max_abs:.3e} ({:.3e} of max |f| {max_ref:.3})",
                    if suffix.is_empty() {
                        "float32"
                    } else {
                        "float64"
                    },
                    max_abs / max_ref
                );
                assert!(max_abs < 1e-4 * max_ref);
            }
        }
    }
}

#[test]
fn cached_statistics_give_the_same_numbers_and_belong_to_their_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (gen_dir, ref_dir) = (tmp.path().join("generated"), tmp.path().join("reference"));
    write_pngs(&gen_dir, N_GEN, generated_image);
    write_pngs(&ref_dir, N_REF, reference_image);
    let net = network(tmp.path());
    let opts = GenMetricsOptions::default();
    let cache = tmp.path().join("reference-stats.npz");
    let made = metrics::reference_cached(&ref_dir, &cache, &net, &opts).unwrap();
    assert!(cache.exists());
    // Read back (not recomputed: the second call finds it).
    let reread = metrics::reference_cached(&ref_dir, &cache, &net, &opts).unwrap();
    let (Reference::Stats(a), Reference::Stats(b)) = (&made, &reread) else {
        panic!("statistics")
    };
    assert_eq!(a.pool3, b.pool3);
    assert_eq!(a.mu, b.mu);
    assert_eq!(a.fingerprint, Some(net.fingerprint()));
    let report = evaluate_images(&gen_dir, &reread, &net, &opts).unwrap();
    check_against_torch_fidelity(&report);
    assert_eq!(report.reference_statistics, "mu/sigma");

    // Other weights (no classifier: another fingerprint) refuse the cache.
    let plain = tmp.path().join("plain.safetensors");
    write_tensors(&plain, &inception_tensors(Layout::PytorchFid), Dtype::F32);
    let other = Inception::load(&plain, &burn::prelude::Device::flex()).unwrap();
    assert_ne!(other.fingerprint(), net.fingerprint());
    let err = evaluate_images(&gen_dir, &reread, &other, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reference-stats.npz") && err.contains("other Inception weights"),
        "{err}"
    );
}

/// Writes an `.npz` like ADM's reference batches: `mu`, `sigma` and optionally `arr_0` uint8
/// `[n, h, w, 3]`.
fn write_adm_npz(path: &Path, mu: &[f64], sigma: &[f64], images: Option<(&[u8], [u64; 4])>) {
    use npyz::WriterBuilder as _;
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    let d = mu.len() as u64;
    let mut w = npz
        .array::<f64>("mu", Default::default())
        .unwrap()
        .default_dtype()
        .shape(&[d])
        .begin_nd()
        .unwrap();
    w.extend(mu.iter().copied()).unwrap();
    w.finish().unwrap();
    let mut w = npz
        .array::<f64>("sigma", Default::default())
        .unwrap()
        .default_dtype()
        .shape(&[d, d])
        .begin_nd()
        .unwrap();
    w.extend(sigma.iter().copied()).unwrap();
    w.finish().unwrap();
    if let Some((pixels, shape)) = images {
        let mut w = npz
            .array::<u8>("arr_0", Default::default())
            .unwrap()
            .default_dtype()
            .shape(&shape)
            .begin_nd()
            .unwrap();
        w.extend(pixels.iter().copied()).unwrap();
        w.finish().unwrap();
    }
}

#[test]
fn adm_style_references_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let net = network(tmp.path());
    let dev = burn::prelude::Device::flex();
    // A few images keep this test short: the network costs the same per image at any size.
    let gen_dir = tmp.path().join("generated");
    write_pngs(&gen_dir, 3, generated_image);
    let ref_dir = tmp.path().join("reference");
    write_pngs(&ref_dir, 4, reference_image);
    let opts = GenMetricsOptions {
        isc_splits: 3,
        prc_neighbourhood: 2,
        ..GenMetricsOptions::default()
    };

    // ADM's layout: arr_0 images with mu/sigma. Its images give the folder's features.
    let pixels: Vec<u8> = (0..4).flat_map(|j| reference_image(j).into_raw()).collect();
    let stats = match metrics::reference_cached(&ref_dir, &tmp.path().join("c.npz"), &net, &opts)
        .unwrap()
    {
        Reference::Stats(s) => s,
        Reference::Images(_) => panic!("statistics"),
    };
    let sigma_rows: Vec<f64> = stats.sigma.transpose().iter().copied().collect();
    let adm = tmp.path().join("VIRTUAL_reference.npz");
    write_adm_npz(
        &adm,
        stats.mu.as_slice(),
        &sigma_rows,
        Some((&pixels, [4, 48, 48, 3])),
    );
    let Reference::Stats(adm_ref) = Reference::open(&adm, false).unwrap() else {
        panic!("statistics")
    };
    assert_eq!(adm_ref.mu, stats.mu);
    assert!((&adm_ref.sigma - &stats.sigma).amax() == 0.0);
    let from_npz = extract_features(
        adm_ref.images.as_ref().unwrap(),
        &net,
        ExtractOptions {
            batch: 3,
            keep_rows: true,
            isc: None,
        },
    )
    .unwrap()
    .pool3
    .unwrap();
    let cached = stats.pool3.as_ref().unwrap();
    let worst = from_npz
        .iter()
        .zip(cached)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "arr_0 vs PNG features: {worst}");
    let report = evaluate_images(&gen_dir, &Reference::Stats(adm_ref), &net, &opts).unwrap();
    assert_eq!(report.reference_images, Some(4));
    assert!(report.kid.is_some() && report.precision_recall.is_some());
    let with_images_fid = report.fid;

    // mu/sigma only (MAR's adm_in256_stats.npz): FID only, and the report says so.
    let mu_sigma = tmp.path().join("adm_in256_stats.npz");
    write_adm_npz(&mu_sigma, stats.mu.as_slice(), &sigma_rows, None);
    let reference = Reference::open(&mu_sigma, false).unwrap();
    let report = evaluate_images(&gen_dir, &reference, &net, &opts).unwrap();
    assert!((report.fid - with_images_fid).abs() < 1e-9 * with_images_fid);
    assert_eq!(report.reference_images, None);
    assert!(report.kid.is_none() && report.precision_recall.is_none());
    assert!(report.inception_score.is_some());
    assert!(
        report.notes.len() == 1 && report.notes[0].contains("only mu/sigma"),
        "{:?}",
        report.notes
    );

    // Weights without the classifier: no IS, one note naming the file.
    let plain = tmp.path().join("plain.safetensors");
    write_tensors(&plain, &inception_tensors(Layout::PytorchFid), Dtype::F32);
    let no_fc = Inception::load(&plain, &dev).unwrap();
    assert!(!no_fc.has_classifier());
    let report = evaluate_images(&gen_dir, &reference, &no_fc, &opts).unwrap();
    assert!(report.inception_score.is_none());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("Inception Score left out") && n.contains("plain.safetensors")),
        "{:?}",
        report.notes
    );

    // Bad input: one line naming the file.
    let one_line = |r: flowalign::Result<GenMetricsReport>, needles: &[&str]| {
        let msg = r.unwrap_err().to_string();
        assert_eq!(msg.lines().count(), 1, "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{msg} lacks {n}");
        }
    };
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    one_line(
        evaluate_images(&empty, &reference, &net, &opts),
        &["empty", "no .png"],
    );
    let broken = tmp.path().join("broken");
    write_pngs(&broken, 3, generated_image);
    std::fs::write(broken.join("000.png"), b"not a png").unwrap();
    one_line(
        evaluate_images(&broken, &reference, &net, &opts),
        &["000.png", "not a readable image"],
    );
    let nothing = tmp.path().join("nothing.npz");
    {
        // An .npz with other arrays only.
        use npyz::WriterBuilder as _;
        let mut npz = npyz::npz::NpzWriter::create(&nothing).unwrap();
        let mut w = npz
            .array::<f32>("feats", Default::default())
            .unwrap()
            .default_dtype()
            .shape(&[2])
            .begin_nd()
            .unwrap();
        w.extend([1.0f32, 2.0]).unwrap();
        w.finish().unwrap();
    }
    let msg = Reference::open(&nothing, false).unwrap_err().to_string();
    assert!(
        msg.contains("nothing.npz") && msg.contains("neither mu/sigma nor arr_0"),
        "{msg}"
    );
    let small = tmp.path().join("small.npz");
    write_adm_npz(&small, &[0.0; 10], &[0.0; 100], None);
    let msg = Reference::open(&small, false).unwrap_err().to_string();
    assert!(
        msg.contains("small.npz") && msg.contains("[10]") && msg.contains("[2048]"),
        "{msg}"
    );
    let msg = Reference::open(&tmp.path().join("missing"), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing") && msg.contains("does not exist"),
        "{msg}"
    );
    // Too few images for a metric: refused before any image is read, naming the set and the option.
    let two = tmp.path().join("two");
    write_pngs(&two, 2, generated_image);
    let refs = Reference::open(&ref_dir, false).unwrap();
    one_line(
        evaluate_images(&two, &refs, &net, &opts),
        &["two", "has 2 images", "3 splits", "isc_splits"],
    );
    let no_is = GenMetricsOptions {
        isc: false,
        ..opts.clone()
    };
    one_line(
        evaluate_images(&two, &refs, &net, &no_is),
        &["reference", "k = 2", "2 generated, 4 reference"],
    );
}
