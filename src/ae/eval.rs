//! Using a trained autoencoder: loading it from its run folder and its reconstruction quality
//! (PSNR, SSIM, rFID). Caching latents for a generator is [`super::latents`].

use std::path::Path;

use burn::prelude::*;
use serde::Serialize;

use super::config::AeConfig;
use super::data::{ImageFolder, load_image};
use super::model::Autoencoder;
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::metrics::fid::{FeatureStats, fid};
use crate::metrics::inception::{FEATURES, Inception};
use crate::rng::{Stream, rng_for};

/// The autoencoder of an `ae train` run folder: EMA weights when the run kept them.
pub fn load_autoencoder(dir: &Path, device: &Device) -> Result<(AeConfig, Autoencoder, usize)> {
    let cfg: AeConfig = checkpoint::read_config(dir, "ae train")?;
    cfg.validate()?;
    let Some((manifest, state)) = checkpoint::load::<super::data::ImageInfo>(dir)? else {
        return Err(Error::Checkpoint {
            path: dir.join(checkpoint::MANIFEST),
            msg: "not found; the run has not written a checkpoint yet".into(),
        });
    };
    let mut model = cfg.model.init(&mut rng_for(0, Stream::Init, 0), device);
    let bytes = state.ema.as_ref().unwrap_or(&state.model);
    crate::params::load_module_bytes(&mut model, bytes, "autoencoder")?;
    Ok((cfg, model, manifest.step))
}

/// Reads images `indices` of `folder` as centre crops, skipping unreadable files with a warning.
/// Returns the pixels `[n, 3, size, size]` and the indices that were read.
pub fn read_centre(folder: &ImageFolder, indices: &[usize], size: usize) -> (Vec<f32>, Vec<usize>) {
    use rayon::prelude::*;
    let items: Vec<(usize, std::result::Result<Vec<f32>, String>)> = indices
        .par_iter()
        .map(|&i| {
            // A centre crop draws nothing; the generator only satisfies the signature.
            let mut rng = rng_for(0, Stream::Eval, i as u64);
            let r = load_image(&folder.paths[i], size, super::data::Crop::Centre, &mut rng);
            (i, r.map(|(p, _)| p))
        })
        .collect();
    let mut pixels = Vec::new();
    let mut kept = Vec::new();
    for (i, r) in items {
        match r {
            Ok(p) => {
                pixels.extend(p);
                kept.push(i);
            }
            Err(e) => tracing::warn!(
                "skipping unreadable image {}: {e}",
                folder.paths[i].display()
            ),
        }
    }
    (pixels, kept)
}

/// The structural similarity of two `size x size` single-channel images with values in [0, 1]
/// (Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged over the
/// valid window positions.
pub fn ssim(a: &[f32], b: &[f32], size: usize) -> f64 {
    const W: usize = 11;
    if size < W {
        // Too small for the window: the global statistics.
        return ssim_stats(
            a,
            b,
            &vec![1.0 / (size * size) as f64; size * size],
            size,
            size,
            0,
            0,
        );
    }
    let g: Vec<f64> = (0..W)
        .map(|i| (-((i as f64 - 5.0).powi(2)) / (2.0 * 1.5f64.powi(2))).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / sum).collect();
    let mut window = vec![0.0; W * W];
    for y in 0..W {
        for x in 0..W {
            window[y * W + x] = g[y] * g[x];
        }
    }
    let n = size - W + 1;
    let mut total = 0.0;
    for y0 in 0..n {
        for x0 in 0..n {
            total += ssim_stats(a, b, &window, size, W, x0, y0);
        }
    }
    total / (n * n) as f64
}

fn ssim_stats(
    a: &[f32],
    b: &[f32],
    w: &[f64],
    size: usize,
    ws: usize,
    x0: usize,
    y0: usize,
) -> f64 {
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for y in 0..ws {
        for x in 0..ws {
            let k = w[y * ws + x];
            let (va, vb) = (
                f64::from(a[(y0 + y) * size + x0 + x]),
                f64::from(b[(y0 + y) * size + x0 + x]),
            );
            ma += k * va;
            mb += k * vb;
            saa += k * va * va;
            sbb += k * vb * vb;
            sab += k * va * vb;
        }
    }
    let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
    ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
}

/// What `ae eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct AeEvalReport {
    pub images: usize,
    /// Mean PSNR in dB (images in [0, 1]).
    pub psnr: f64,
    /// Mean SSIM over images and RGB channels.
    pub ssim: f64,
    /// FID between the centre-cropped originals and their reconstructions (FID Inception-v3
    /// pool3 features), when Inception weights were given. Biased high below ~10k images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rfid: Option<f64>,
    /// The number of image pairs behind `rfid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rfid_images: Option<usize>,
    /// The checkpoint step evaluated.
    pub step: usize,
}

/// Reconstructs up to `max_images` of `folder` (centre crops, in order) and scores them; with
/// `inception`, also the rFID of originals against reconstructions, from statistics streamed batch by
/// batch (memory does not grow with the folder). Also returns the first 8 originals and
/// reconstructions for a grid.
pub fn evaluate(
    model: &Autoencoder,
    inception: Option<&Inception>,
    folder: &ImageFolder,
    size: usize,
    max_images: usize,
    batch: usize,
    device: &Device,
) -> Result<(AeEvalReport, Vec<f32>, Vec<f32>)> {
    let n = folder.len().min(max_images);
    let (mut psnr_sum, mut ssim_sum, mut count) = (0.0, 0.0, 0usize);
    let (mut real_stats, mut rec_stats) =
        (FeatureStats::new(FEATURES), FeatureStats::new(FEATURES));
    let (mut first, mut first_rec) = (Vec::new(), Vec::new());
    let px = 3 * size * size;
    for start in (0..n).step_by(batch.max(1)) {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let (pixels, kept) = read_centre(folder, &idx, size);
        if kept.is_empty() {
            continue;
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(pixels.clone(), [kept.len(), 3, size, size]),
            device,
        );
        let rec = model.decode(model.encode(x.clone())).clamp(-1.0, 1.0);
        if let Some(net) = inception {
            // Inception takes [0, 1]; the autoencoder works in [-1, 1].
            let unit = |t: Tensor<4>| (t + 1.0) * 0.5;
            let features = |t: Tensor<4>| -> Vec<f32> {
                net.features(unit(t))
                    .try_into_vec_as::<f32>()
                    .expect("f32 readback")
            };
            real_stats.add(&features(x));
            rec_stats.add(&features(rec.clone()));
        }
        let rec: Vec<f32> = rec.try_into_vec_as::<f32>().expect("f32 readback");
        for i in 0..kept.len() {
            let (a, b) = (&pixels[i * px..(i + 1) * px], &rec[i * px..(i + 1) * px]);
            let mse = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
                / px as f64;
            psnr_sum += super::loss::psnr(mse);
            let to01 = |v: &[f32]| v.iter().map(|x| (x + 1.0) / 2.0).collect::<Vec<f32>>();
            let (a01, b01) = (to01(a), to01(b));
            let plane = size * size;
            ssim_sum += (0..3)
                .map(|c| {
                    ssim(
                        &a01[c * plane..(c + 1) * plane],
                        &b01[c * plane..(c + 1) * plane],
                        size,
                    )
                })
                .sum::<f64>()
                / 3.0;
            count += 1;
            if first.len() < 8 * px {
                first.extend_from_slice(a);
                first_rec.extend_from_slice(b);
            }
        }
    }
    if count == 0 {
        return Err(Error::input(&folder.root, "no readable images to evaluate"));
    }
    let rfid = match inception {
        Some(_) if count < 2 => {
            return Err(Error::input(
                &folder.root,
                "rFID needs at least 2 readable images; add images or leave out --inception",
            ));
        }
        Some(_) => Some(fid(&real_stats, &rec_stats)?),
        None => None,
    };
    Ok((
        AeEvalReport {
            images: count,
            psnr: psnr_sum / count as f64,
            ssim: ssim_sum / count as f64,
            rfid,
            rfid_images: rfid.map(|_| count),
            step: 0,
        },
        first,
        first_rec,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_equal_images_and_falls_with_noise() {
        let size = 24;
        let a: Vec<f32> = (0..size * size)
            .map(|i| ((i * 37) % 100) as f32 / 100.0)
            .collect();
        assert!((ssim(&a, &a, size) - 1.0).abs() < 1e-12);
        let small: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.02 } else { -0.02 })
            .collect();
        let large: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.2 } else { -0.2 })
            .collect();
        let (s1, s2) = (ssim(&a, &small, size), ssim(&a, &large, size));
        assert!(1.0 > s1 && s1 > s2 && s2 > 0.0, "{s1} {s2}");
        // A constant shift of the mean: the luminance term alone, (2 m1 m2 + c1) / (m1^2 + m2^2 + c1).
        let flat = vec![0.5f32; size * size];
        let shifted = vec![0.6f32; size * size];
        let want = (2.0 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4);
        assert!((ssim(&flat, &shifted, size) - want).abs() < 1e-6);
    }
}
