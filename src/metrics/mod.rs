//! Generation metrics of the paper's Table 1 as torch-fidelity computes them (METHOD.md section 8): FID,
//! KID, Inception Score, precision and recall of a set of generated images against a reference.
//!
//! The pipeline, torch-fidelity's defaults throughout:
//! - images as uint8 RGB (PNG/JPEG files as decoded; float images quantised by [`input::unit_to_uint8`]),
//!   resized to 299 x 299 by TensorFlow 1.x's bilinear rule (no half-pixel offset), `(x - 128) / 128`
//!   ([`input`]);
//! - the FID Inception-v3 (`pt_inception-2015-12-05`, [`inception`]): pool3 features (2048) for FID,
//!   KID and precision/recall, `pool3 @ fc.weight^T` (1008 logits, no bias) for IS;
//! - FID from f64 means and covariances ([`fid`]); KID with a cubic polynomial kernel over 100 subsets
//!   of 1000 ([`kid`]); IS over 10 splits with softmax in f64 ([`isc`]); precision/recall with k = 3
//!   ([`prc`]); the IS shuffle and the KID subsets are numpy's `RandomState(2020)` draws
//!   ([`numpy_rng`]), so for the same files the numbers are torch-fidelity's.
//!
//! Entry points: [`evaluate_images`] (a folder or `.npz` of generated images against a [`Reference`]),
//! [`cache_reference`] / [`reference_cached`] (a reference folder's statistics once, reused), and the
//! per-metric functions for features already at hand.
//!
//! Calling it, e.g. for a `gen eval` command:
//!
//! ```no_run
//! # fn main() -> flowalign::Result<()> {
//! use std::path::Path;
//! use flowalign::metrics::{self, GenMetricsOptions, Reference, inception::Inception};
//! let device = burn::prelude::Device::flex();
//! let net = Inception::load(Path::new("inception-2015-12-05.safetensors"), &device)?;
//! let opts = GenMetricsOptions::default();
//! // ADM's statistics (FID only), or a folder of reference images, or ADM's reference batch with
//! // its arr_0 images (FID from its mu/sigma, KID and precision/recall from the images).
//! let reference = Reference::open(Path::new("adm_in256_stats.npz"), opts.recursive)?;
//! let report = metrics::evaluate_images(Path::new("samples/"), &reference, &net, &opts)?;
//! println!("{}", serde_json::to_string_pretty(&report).unwrap());
//! # Ok(())
//! # }
//! ```

pub mod fid;
pub mod inception;
pub mod input;
pub mod isc;
pub mod kid;
pub mod numpy_rng;
pub mod prc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

use self::fid::{FeatureStats, fid, fid_to_moments};
use self::inception::{CLASSES, FEATURES, INPUT_SIZE, Inception};
use self::input::{ImageSet, bad_npz, npz_images_shape, open_npz};
use self::isc::{InceptionScore, IsAccumulator};
use self::kid::Kid;
use self::prc::PrecisionRecall;
use crate::error::{Error, Result};

/// What [`evaluate_images`] computes and how; the defaults are torch-fidelity's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenMetricsOptions {
    /// Images per Inception forward.
    pub batch: usize,
    /// Read images in subfolders too (torch-fidelity's `samples_find_deep`; off by default).
    pub recursive: bool,
    /// The Inception Score of the generated images (needs the classifier in the weights).
    pub isc: bool,
    pub isc_splits: usize,
    /// KID (needs reference features: images or cached pool3 rows).
    pub kid: bool,
    pub kid_subsets: usize,
    /// Rows per subset, capped by the smaller set.
    pub kid_subset_size: usize,
    /// Precision and recall (needs reference features, like KID).
    pub prc: bool,
    /// k of the k-NN balls.
    pub prc_neighbourhood: usize,
    /// numpy seed of the IS shuffle and the KID subsets (torch-fidelity's `rng_seed`).
    pub seed: u32,
    /// Shuffle the rows before the IS splits (torch-fidelity's `samples_shuffle`).
    pub shuffle: bool,
}

impl Default for GenMetricsOptions {
    fn default() -> Self {
        GenMetricsOptions {
            batch: 32,
            recursive: false,
            isc: true,
            isc_splits: 10,
            kid: true,
            kid_subsets: 100,
            kid_subset_size: 1000,
            prc: true,
            prc_neighbourhood: 3,
            seed: 2020,
            shuffle: true,
        }
    }
}

/// Every number of one evaluation, with the counts behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenMetricsReport {
    pub generated: PathBuf,
    pub generated_images: usize,
    pub reference: PathBuf,
    /// Images behind the reference's KID and precision/recall features; `None` when it is statistics
    /// only.
    pub reference_images: Option<usize>,
    /// Where the reference's FID statistics came from: `"images"` or `"mu/sigma"` (an `.npz`).
    pub reference_statistics: String,
    pub fid: f64,
    pub inception_score: Option<InceptionScore>,
    pub kid: Option<Kid>,
    pub precision_recall: Option<PrecisionRecall>,
    /// One line per metric left out and why, and caveats (JPEG inputs).
    pub notes: Vec<String>,
    /// [`Inception::fingerprint`] of the weights used, in hex.
    pub inception_fingerprint: String,
    pub seconds: f64,
}

/// Reference statistics from an `.npz`: `mu` `[2048]` and `sigma` `[2048, 2048]` (ADM's
/// `VIRTUAL_imagenet256_labeled.npz`, MAR's `adm_in256_stats.npz`, or a [`cache_reference`] file),
/// with what the file has for KID and precision/recall.
#[derive(Debug, Clone)]
pub struct ReferenceStats {
    pub path: PathBuf,
    pub mu: DVector<f64>,
    pub sigma: DMatrix<f64>,
    /// pool3 rows `[n, 2048]` (row-major), as [`cache_reference`] writes them.
    pub pool3: Option<Vec<f32>>,
    /// The file's `arr_0` images (ADM's reference batches), featurised when needed.
    pub images: Option<ImageSet>,
    /// The [`Inception::fingerprint`] a [`cache_reference`] file was made with.
    pub fingerprint: Option<u64>,
}

/// What generated images are compared with.
#[derive(Debug, Clone)]
pub enum Reference {
    /// Reference images (a folder, or an `.npz` with only `arr_0`), featurised at each evaluation.
    Images(ImageSet),
    /// Statistics from an `.npz`: FID from its `mu`/`sigma`; KID and precision/recall from its
    /// `pool3` rows or `arr_0` images when present, else FID only.
    Stats(ReferenceStats),
}

impl Reference {
    /// A folder of PNG/JPEG images, or an `.npz` with `mu`/`sigma` (and optionally `pool3` rows or
    /// `arr_0` uint8 `[n, h, w, 3]` images), or an `.npz` with only `arr_0`.
    pub fn open(path: &Path, recursive: bool) -> Result<Reference> {
        if !path.exists()
            || path.is_dir()
            || path.extension().and_then(|e| e.to_str()) != Some("npz")
        {
            return ImageSet::open(path, recursive).map(Reference::Images);
        }
        let mut npz = open_npz(path)?;
        let names: Vec<String> = npz.array_names().map(str::to_string).collect();
        let has = |n: &str| names.iter().any(|m| m == n);
        if !(has("mu") && has("sigma")) {
            if has("arr_0") {
                return ImageSet::open(path, recursive).map(Reference::Images);
            }
            return Err(Error::input(
                path,
                format!(
                    "has neither mu/sigma nor arr_0 images (arrays: {}); give ADM's reference .npz, a statistics cache, or a folder of images",
                    names.join(", ")
                ),
            ));
        }
        let (mu, mu_shape) = read_f64(&mut npz, path, "mu")?;
        let (sigma, sigma_shape) = read_f64(&mut npz, path, "sigma")?;
        if mu_shape != [FEATURES] || sigma_shape != [FEATURES, FEATURES] {
            return Err(Error::input(
                path,
                format!(
                    "mu has shape {mu_shape:?} and sigma {sigma_shape:?}; Inception pool3 statistics are mu [{FEATURES}] and sigma [{FEATURES}, {FEATURES}]"
                ),
            ));
        }
        let pool3 = if has("pool3") {
            let npy = npz
                .by_name("pool3")
                .map_err(|e| bad_npz(path, e))?
                .ok_or_else(|| Error::input(path, "lost its pool3 array while reading"))?;
            let shape = npy.shape().to_vec();
            let ok = matches!(shape.as_slice(), &[n, d] if n > 0 && d == FEATURES as u64)
                && npy.order() == npyz::Order::C;
            let rows = if ok { npy.into_vec::<f32>().ok() } else { None };
            Some(rows.ok_or_else(|| {
                Error::input(
                    path,
                    format!("pool3 has shape {shape:?}; it must be f32 [n, {FEATURES}] in C order, as cache_reference writes it"),
                )
            })?)
        } else {
            None
        };
        let fingerprint = if has("inception_fingerprint") {
            let npy = npz
                .by_name("inception_fingerprint")
                .map_err(|e| bad_npz(path, e))?
                .ok_or_else(|| {
                    Error::input(path, "lost its inception_fingerprint while reading")
                })?;
            npy.into_vec::<u64>().ok().and_then(|v| v.first().copied())
        } else {
            None
        };
        drop(npz);
        let images = if has("arr_0") {
            npz_images_shape(path)?.map(|(count, height, width)| ImageSet::Npz {
                path: path.to_path_buf(),
                count,
                height,
                width,
            })
        } else {
            None
        };
        Ok(Reference::Stats(ReferenceStats {
            path: path.to_path_buf(),
            mu: DVector::from_vec(mu),
            sigma: DMatrix::from_row_slice(FEATURES, FEATURES, &sigma),
            pool3,
            images,
            fingerprint,
        }))
    }

    /// The folder or file the reference was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Reference::Images(set) => set.path(),
            Reference::Stats(s) => &s.path,
        }
    }
}

/// A float array of an `.npz` as f64 (C order; a Fortran-order 2-D array is transposed), with its
/// shape.
fn read_f64<R: std::io::Read + std::io::Seek>(
    npz: &mut npyz::npz::NpzArchive<R>,
    path: &Path,
    name: &str,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let npy = npz
        .by_name(name)
        .map_err(|e| bad_npz(path, e))?
        .ok_or_else(|| Error::input(path, format!("has no {name} array")))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let size = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float => t.size_field(),
        _ => 0,
    };
    let bad = |e: std::io::Error| Error::input(path, format!("could not read {name} ({e})"));
    let mut values: Vec<f64> = match size {
        8 => npy.into_vec::<f64>().map_err(bad)?,
        4 => npy
            .into_vec::<f32>()
            .map_err(bad)?
            .into_iter()
            .map(f64::from)
            .collect(),
        _ => {
            return Err(Error::input(
                path,
                format!(
                    "{name} has dtype {}; FID statistics must be float64 or float32",
                    npy.dtype().descr()
                ),
            ));
        }
    };
    if fortran && shape.len() == 2 {
        let m = DMatrix::from_vec(shape[0], shape[1], values);
        values = m.transpose().as_slice().to_vec();
    }
    Ok((values, shape))
}

/// Options of one pass of the network over an image set.
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    pub batch: usize,
    /// Keep every pool3 row (for KID and precision/recall: 8 KB per image).
    pub keep_rows: bool,
    /// Accumulate the Inception Score with `(splits, shuffle seed)`.
    pub isc: Option<(usize, Option<u32>)>,
}

/// What one pass of the network over an image set gives.
#[derive(Debug, Clone)]
pub struct SetFeatures {
    /// Streamed f64 mean and covariance of the pool3 features.
    pub stats: FeatureStats,
    /// Every pool3 row `[n, 2048]`, when asked for.
    pub pool3: Option<Vec<f32>>,
    /// The Inception Score, when asked for.
    pub isc: Option<InceptionScore>,
}

/// Runs the network over `set` batch by batch: pool3 statistics, optionally the rows and the
/// Inception Score. Memory holds one batch of images, the statistics and the kept rows.
pub fn extract_features(
    set: &ImageSet,
    net: &Inception,
    opts: ExtractOptions,
) -> Result<SetFeatures> {
    let device = net.device();
    let n = set.len();
    let mut stats = FeatureStats::new(FEATURES);
    let mut rows = opts.keep_rows.then(|| Vec::with_capacity(n * FEATURES));
    let mut isc = match opts.isc {
        Some((splits, seed)) => Some(IsAccumulator::new(n, CLASSES, splits, seed)?),
        None => None,
    };
    let start = Instant::now();
    let mut last_log = Instant::now();
    let mut done = 0;
    set.for_each_batch(opts.batch, |pixels, count| {
        let x = Tensor::<4>::from_data(
            TensorData::new(pixels, [count, 3, INPUT_SIZE, INPUT_SIZE]),
            &device,
        );
        let pool3 = net.pool3(x);
        if let Some(acc) = isc.as_mut() {
            acc.add(&readback(net.logits(pool3.clone())?)?);
        }
        let features = readback(pool3)?;
        stats.add(&features);
        if let Some(rows) = rows.as_mut() {
            rows.extend_from_slice(&features);
        }
        done += count;
        if last_log.elapsed().as_secs() >= 30 {
            last_log = Instant::now();
            tracing::info!(
                "{}: {done} of {n} images, {:.1} images/s",
                set.path().display(),
                done as f64 / start.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })?;
    Ok(SetFeatures {
        stats,
        pool3: rows,
        isc: isc.map(IsAccumulator::finish).transpose()?,
    })
}

fn readback(t: Tensor<2>) -> Result<Vec<f32>> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| Error::Device(format!("could not read the Inception features back: {e:?}")))
}

/// Scores the generated images at `generated` (a folder of PNG/JPEG images, or an `.npz` with
/// `arr_0`) against `reference`: FID always; IS when the weights have the classifier; KID and
/// precision/recall when the reference has images or pool3 rows. A metric left out is named in the
/// report's `notes`, and logged.
///
/// The reference is featurised first (its errors surface before the long pass), then the generated
/// images in one streamed pass. Errors: an empty folder, an unreadable image, an `.npz` without the
/// arrays needed, statistics of other dimensions or of other Inception weights, fewer images than a
/// metric needs; each one line naming the file.
pub fn evaluate_images(
    generated: &Path,
    reference: &Reference,
    inception: &Inception,
    opts: &GenMetricsOptions,
) -> Result<GenMetricsReport> {
    let start = Instant::now();
    let gen_set = ImageSet::open(generated, opts.recursive)?;
    let mut notes = Vec::new();
    let want_rows = opts.kid || opts.prc;
    check_counts(&gen_set, reference, inception, opts)?;

    // The reference: FID statistics, and rows for KID and precision/recall when it can give them.
    let (ref_fid, ref_rows, ref_source) = match reference {
        Reference::Images(set) => {
            let f = extract_features(
                set,
                inception,
                ExtractOptions {
                    batch: opts.batch,
                    keep_rows: want_rows,
                    isc: None,
                },
            )?;
            (RefFid::Rows(f.stats), f.pool3, "images")
        }
        Reference::Stats(s) => {
            if let Some(fp) = s.fingerprint
                && fp != inception.fingerprint()
            {
                return Err(Error::input(
                    &s.path,
                    format!(
                        "was made with other Inception weights (fingerprint {fp:016x}, these weights {:016x}); rebuild the statistics with these weights",
                        inception.fingerprint()
                    ),
                ));
            }
            let rows = match (&s.pool3, &s.images) {
                _ if !want_rows => None,
                (Some(rows), _) => Some(rows.clone()),
                (None, Some(images)) => {
                    extract_features(
                        images,
                        inception,
                        ExtractOptions {
                            batch: opts.batch,
                            keep_rows: true,
                            isc: None,
                        },
                    )?
                    .pool3
                }
                (None, None) => {
                    notes.push(format!(
                        "KID and precision/recall left out: {} holds only mu/sigma (FID only); give reference images for them",
                        s.path.display()
                    ));
                    None
                }
            };
            (RefFid::Moments(&s.mu, &s.sigma), rows, "mu/sigma")
        }
    };
    let reference_images = ref_rows
        .as_ref()
        .map(|r| r.len() / FEATURES)
        .or(match &ref_fid {
            RefFid::Rows(stats) => Some(stats.count()),
            RefFid::Moments(..) => None,
        });

    let isc = if !opts.isc {
        None
    } else if let Err(e) = inception.require_classifier() {
        notes.push(format!("Inception Score left out: {e}"));
        None
    } else {
        Some((opts.isc_splits, opts.shuffle.then_some(opts.seed)))
    };
    let generated_features = extract_features(
        &gen_set,
        inception,
        ExtractOptions {
            batch: opts.batch,
            keep_rows: ref_rows.is_some(),
            isc,
        },
    )?;
    let n_gen = generated_features.stats.count();
    let ref_set = match reference {
        Reference::Images(set) => Some(set),
        Reference::Stats(_) => None,
    };
    for set in std::iter::once(&gen_set).chain(ref_set) {
        if set.has_lossy() {
            notes.push(format!(
                "{} includes JPEGs: decoders differ from PIL's by a grey level here and there",
                set.path().display()
            ));
        }
    }

    let fid = match &ref_fid {
        RefFid::Rows(stats) => fid(&generated_features.stats, stats)?,
        RefFid::Moments(mu, sigma) => fid_to_moments(&generated_features.stats, mu, sigma)?,
    };
    let (mut kid, mut precision_recall) = (None, None);
    if let (Some(g), Some(r)) = (&generated_features.pool3, &ref_rows) {
        if opts.kid {
            kid = Some(kid::kid(
                g,
                r,
                FEATURES,
                opts.kid_subsets,
                opts.kid_subset_size,
                opts.seed,
            )?);
        }
        if opts.prc {
            precision_recall = Some(prc::precision_recall(
                g,
                r,
                FEATURES,
                opts.prc_neighbourhood,
            )?);
        }
    }
    for note in &notes {
        tracing::warn!("{note}");
    }
    Ok(GenMetricsReport {
        generated: generated.to_path_buf(),
        generated_images: n_gen,
        reference: reference.path().to_path_buf(),
        reference_images,
        reference_statistics: ref_source.into(),
        fid,
        inception_score: generated_features.isc,
        kid,
        precision_recall,
        notes,
        inception_fingerprint: format!("{:016x}", inception.fingerprint()),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Refuses sets too small for the metrics asked for before any image is read, naming the set and the
/// option to change.
fn check_counts(
    generated: &ImageSet,
    reference: &Reference,
    inception: &Inception,
    opts: &GenMetricsOptions,
) -> Result<()> {
    let n_gen = generated.len();
    let too_few = |path: &Path, msg: String| Err(Error::input(path, msg));
    if n_gen < 2 {
        return too_few(
            generated.path(),
            format!("has {n_gen} image; FID needs at least 2"),
        );
    }
    if opts.isc && inception.has_classifier() && n_gen < opts.isc_splits.max(1) {
        return too_few(
            generated.path(),
            format!(
                "has {n_gen} images; the Inception Score over {} splits needs at least as many (lower isc_splits)",
                opts.isc_splits
            ),
        );
    }
    // The reference's image count when it gives rows for KID and precision/recall.
    let n_ref = match reference {
        Reference::Images(set) => {
            if set.len() < 2 {
                return too_few(
                    set.path(),
                    format!("has {} image; FID needs at least 2", set.len()),
                );
            }
            Some(set.len())
        }
        Reference::Stats(s) => s
            .pool3
            .as_ref()
            .map(|r| r.len() / FEATURES)
            .or(s.images.as_ref().map(ImageSet::len)),
    };
    let Some(n_ref) = n_ref else { return Ok(()) };
    let k = opts.prc_neighbourhood;
    if opts.kid && (n_gen.min(n_ref) < 2 || opts.kid_subsets == 0) {
        return too_few(
            reference.path(),
            format!(
                "KID needs at least 2 images per set and one subset: {n_gen} generated, {n_ref} reference images, {} subsets",
                opts.kid_subsets
            ),
        );
    }
    if opts.prc && (n_gen <= k || n_ref <= k || !(1..=7).contains(&k)) {
        return too_few(
            reference.path(),
            format!(
                "precision/recall with k = {k} (1 to 7) need more than k images per set: {n_gen} generated, {n_ref} reference images (lower prc_neighbourhood or turn prc off)"
            ),
        );
    }
    Ok(())
}

/// The reference side of FID.
enum RefFid<'a> {
    Rows(FeatureStats),
    Moments(&'a DVector<f64>, &'a DMatrix<f64>),
}

/// Featurises `images` once and writes `out` (`.npz`): `mu` f64 `[2048]`, `sigma` f64 `[2048, 2048]`
/// (numpy's `cov`, divided by n - 1), `pool3` f32 `[n, 2048]` and `inception_fingerprint` u64 `[1]`.
/// [`Reference::open`] reads it back (FID from mu/sigma, KID and precision/recall from pool3) and
/// refuses it with other weights. The file is written whole or not at all.
pub fn cache_reference(
    images: &ImageSet,
    inception: &Inception,
    batch: usize,
    out: &Path,
) -> Result<ReferenceStats> {
    let f = extract_features(
        images,
        inception,
        ExtractOptions {
            batch,
            keep_rows: true,
            isc: None,
        },
    )?;
    let n = f.stats.count();
    let sigma = f.stats.covariance().ok_or_else(|| {
        Error::input(
            images.path(),
            format!("reference statistics need at least 2 images, found {n}"),
        )
    })?;
    let pool3 = f.pool3.unwrap_or_default();
    let stats = ReferenceStats {
        path: out.to_path_buf(),
        mu: f.stats.mean().clone(),
        sigma,
        pool3: Some(pool3),
        images: None,
        fingerprint: Some(inception.fingerprint()),
    };
    write_stats_npz(&stats, out)?;
    Ok(stats)
}

/// The reference at `images` through the cache file `cache`: read when the cache exists, was made with
/// these weights and counts as many images as the folder holds; otherwise computed by
/// [`cache_reference`] and written.
pub fn reference_cached(
    images: &Path,
    cache: &Path,
    inception: &Inception,
    opts: &GenMetricsOptions,
) -> Result<Reference> {
    let set = ImageSet::open(images, opts.recursive)?;
    if cache.exists() {
        if let Reference::Stats(s) = Reference::open(cache, false)? {
            let count = s.pool3.as_ref().map(|r| r.len() / FEATURES);
            if s.fingerprint == Some(inception.fingerprint()) && count == Some(set.len()) {
                tracing::info!("reference statistics from {}", cache.display());
                return Ok(Reference::Stats(s));
            }
        }
        tracing::info!(
            "{} is stale (other weights or another image count); recomputing it",
            cache.display()
        );
    }
    cache_reference(&set, inception, opts.batch, cache).map(Reference::Stats)
}

fn write_stats_npz(stats: &ReferenceStats, out: &Path) -> Result<()> {
    use npyz::WriterBuilder as _;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let hint = "choose a cache path you can write to";
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, hint, e))?;
    let io = |e: std::io::Error| Error::io(out, hint, e);
    {
        let file = tmp.reopen().map_err(io)?;
        let mut npz = npyz::npz::NpzWriter::new(std::io::BufWriter::new(file));
        let d = FEATURES as u64;
        let mut w = npz
            .array::<f64>("mu", Default::default())
            .map_err(io)?
            .default_dtype()
            .shape(&[d])
            .begin_nd()
            .map_err(io)?;
        w.extend(stats.mu.iter().copied()).map_err(io)?;
        w.finish().map_err(io)?;
        let mut w = npz
            .array::<f64>("sigma", Default::default())
            .map_err(io)?
            .default_dtype()
            .shape(&[d, d])
            .begin_nd()
            .map_err(io)?;
        // Symmetric: column-major storage reads the same as row-major.
        w.extend(stats.sigma.iter().copied()).map_err(io)?;
        w.finish().map_err(io)?;
        if let Some(rows) = &stats.pool3 {
            let mut w = npz
                .array::<f32>("pool3", Default::default())
                .map_err(io)?
                .default_dtype()
                .shape(&[(rows.len() / FEATURES) as u64, d])
                .begin_nd()
                .map_err(io)?;
            w.extend(rows.iter().copied()).map_err(io)?;
            w.finish().map_err(io)?;
        }
        if let Some(fp) = stats.fingerprint {
            let mut w = npz
                .array::<u64>("inception_fingerprint", Default::default())
                .map_err(io)?
                .default_dtype()
                .shape(&[1])
                .begin_nd()
                .map_err(io)?;
            w.push(&fp).map_err(io)?;
            w.finish().map_err(io)?;
        }
        let mut file = npz
            .zip_writer()
            .finish()
            .map_err(|e| Error::io(out, hint, std::io::Error::other(e)))?;
        std::io::Write::flush(&mut file).map_err(io)?;
    }
    tmp.persist(out)
        .map_err(|e| Error::io(out, hint, e.error))?;
    Ok(())
}
