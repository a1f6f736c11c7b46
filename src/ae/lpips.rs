//! The LPIPS perceptual distance (Zhang et al. 2018) with its VGG16 backbone, loaded from a
//! user-supplied safetensors file and frozen (METHOD.md section 6: LPIPS-VGG, weight 1.0).
//!
//! Expected names are those of the `lpips` package's `LPIPS(net="vgg").state_dict()`:
//! `net.slice{1..5}.{i}.weight|bias` for torchvision's `vgg16().features[i]` convolutions and
//! `lin{0..4}.model.1.weight` (`[1, C, 1, 1]`) for the linear heads. torchvision's own
//! `features.{i}.weight` names are accepted for the backbone too.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};

use crate::error::{Error, Result};

/// torchvision `vgg16().features` indices of the convolutions, with (in, out) channels, grouped by
/// the five LPIPS slices (a 2x2 max pool starts every slice after the first).
const SLICES: [&[(usize, usize, usize)]; 5] = [
    &[(0, 3, 64), (2, 64, 64)],
    &[(5, 64, 128), (7, 128, 128)],
    &[(10, 128, 256), (12, 256, 256), (14, 256, 256)],
    &[(17, 256, 512), (19, 512, 512), (21, 512, 512)],
    &[(24, 512, 512), (26, 512, 512), (28, 512, 512)],
];

/// LPIPS's input normalisation of [-1, 1] images.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// A frozen LPIPS-VGG network (plain tensors, no autodiff parameters).
#[derive(Debug, Clone)]
pub struct Lpips {
    /// Per slice: (weight `[out, in, 3, 3]`, bias `[out]`) of each convolution.
    convs: Vec<Vec<(Tensor<4>, Tensor<1>)>>,
    /// Per slice: the linear head `[1, C, 1, 1]`.
    lins: Vec<Tensor<4>>,
    shift: Tensor<4>,
    scale: Tensor<4>,
}

impl Lpips {
    /// Reads the weights from `path` onto `device`, checking every name and shape.
    pub fn load(path: &Path, device: &Device) -> Result<Lpips> {
        let mut tensors = crate::params::read_all(path)?;
        let mut take = |names: &[String], shape: &[usize]| -> Result<Vec<f32>> {
            let name = names
                .iter()
                .find(|n| tensors.contains_key(n.as_str()))
                .ok_or_else(|| {
                    Error::input(
                        path,
                        format!(
                            "has no tensor {}; pass the lpips package's LPIPS(net=\"vgg\") weights as safetensors",
                            names[0]
                        ),
                    )
                })?
                .clone();
            let t = tensors.remove(&name).expect("found above");
            if t.shape != shape {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor {name} has shape {:?}, LPIPS-VGG needs {shape:?}",
                        t.shape
                    ),
                ));
            }
            Ok(t.data)
        };
        let mut convs = Vec::new();
        let mut lins = Vec::new();
        for (k, slice) in SLICES.iter().enumerate() {
            let mut layers = Vec::new();
            for &(i, c_in, c_out) in slice.iter() {
                let names = |p: &str| {
                    vec![
                        format!("net.slice{}.{i}.{p}", k + 1),
                        format!("features.{i}.{p}"),
                    ]
                };
                let w = take(&names("weight"), &[c_out, c_in, 3, 3])?;
                let b = take(&names("bias"), &[c_out])?;
                layers.push((
                    Tensor::from_data(TensorData::new(w, [c_out, c_in, 3, 3]), device),
                    Tensor::from_data(TensorData::new(b, [c_out]), device),
                ));
            }
            let c = slice.last().expect("non-empty slice").2;
            let lin = take(&[format!("lin{k}.model.1.weight")], &[1, c, 1, 1])?;
            lins.push(Tensor::from_data(
                TensorData::new(lin, [1, c, 1, 1]),
                device,
            ));
            convs.push(layers);
        }
        let per_channel =
            |v: [f32; 3]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 3, 1, 1]), device);
        Ok(Lpips {
            convs,
            lins,
            shift: per_channel(SHIFT),
            scale: per_channel(SCALE),
        })
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Lpips {
        Lpips {
            convs: self
                .convs
                .iter()
                .map(|slice| {
                    slice
                        .iter()
                        .map(|(w, b)| (w.clone().to_device(device), b.clone().to_device(device)))
                        .collect()
                })
                .collect(),
            lins: self
                .lins
                .iter()
                .map(|l| l.clone().to_device(device))
                .collect(),
            shift: self.shift.clone().to_device(device),
            scale: self.scale.clone().to_device(device),
        }
    }

    /// The five feature maps of `x` after LPIPS's scaling.
    fn features(&self, x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut h = (x - self.shift.clone()) / self.scale.clone();
        let mut taps = Vec::new();
        for (k, slice) in self.convs.iter().enumerate() {
            if k > 0 {
                h = max_pool2d(h, MaxPoolOptions::new([2, 2]));
            }
            for (w, b) in slice {
                h = relu(conv2d(
                    h,
                    w.clone(),
                    Some(b.clone()),
                    ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
                ));
            }
            taps.push(h.clone());
        }
        taps
    }

    /// The LPIPS distance of each pair of images (gradients flow to the inputs, not the network).
    ///
    /// # Shapes
    /// - `a`, `b`: `[batch, 3, H, W]` in [-1, 1] with H, W at least 16; output `[batch]`
    pub fn distance(&self, a: Tensor<4>, b: Tensor<4>) -> Tensor<1> {
        let n = a.dims()[0];
        let taps = self.features(Tensor::cat(vec![a, b], 0));
        let mut total: Option<Tensor<1>> = None;
        for (f, lin) in taps.into_iter().zip(&self.lins) {
            let unit = |t: Tensor<4>| {
                let norm = (t.clone() * t.clone()).sum_dim(1).sqrt() + 1e-10; // [2n, 1, h, w]
                t / norm
            };
            let f = unit(f);
            let [_, c, h, w] = f.dims();
            let fa = f.clone().slice([0..n, 0..c, 0..h, 0..w]);
            let fb = f.slice([n..2 * n, 0..c, 0..h, 0..w]);
            let d = (fa - fb).powi_scalar(2) * lin.clone(); // [n, c, h, w]
            let per = d.sum_dim(1).mean_dim(2).mean_dim(3).reshape([n]);
            total = Some(match total {
                Some(t) => t + per,
                None => per,
            });
        }
        total.expect("five slices")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Writes an LPIPS-VGG file with deterministic He-scaled weights.
    pub(crate) fn write_lpips(path: &Path) {
        let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (k, slice) in SLICES.iter().enumerate() {
            for &(i, c_in, c_out) in slice.iter() {
                let scale = (6.0 / (9 * c_in) as f32).sqrt() * 2.0;
                let w: Vec<u8> = (0..c_out * c_in * 9)
                    .flat_map(|_| (next() * scale).to_le_bytes())
                    .collect();
                let b: Vec<u8> = (0..c_out).flat_map(|_| 0.01f32.to_le_bytes()).collect();
                entries.push((
                    format!("net.slice{}.{i}.weight", k + 1),
                    vec![c_out, c_in, 3, 3],
                    w,
                ));
                entries.push((format!("net.slice{}.{i}.bias", k + 1), vec![c_out], b));
            }
            let c = slice.last().unwrap().2;
            let lin: Vec<u8> = (0..c).flat_map(|_| (next() + 0.5).to_le_bytes()).collect();
            entries.push((format!("lin{k}.model.1.weight"), vec![1, c, 1, 1], lin));
        }
        let views: HashMap<String, safetensors::tensor::TensorView> = entries
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn lpips_is_zero_on_equal_images_symmetric_and_grows_with_distortion() {
        let dev = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lpips.safetensors");
        write_lpips(&file);
        let lpips = Lpips::load(&file, &dev).unwrap();
        let img: Vec<f32> = (0..2 * 3 * 32 * 32)
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect();
        let a = Tensor::<4>::from_data(TensorData::new(img.clone(), [2, 3, 32, 32]), &dev);
        let near = a.clone() * 0.95;
        let far = a.clone() * 0.3;
        let d = |x: Tensor<4>, y: Tensor<4>| -> Vec<f32> {
            lpips.distance(x, y).try_into_vec_as::<f32>().unwrap()
        };
        assert!(d(a.clone(), a.clone()).iter().all(|v| v.abs() < 1e-6));
        let (dn, df) = (d(a.clone(), near.clone()), d(a.clone(), far));
        assert!(
            dn.iter().zip(&df).all(|(n, f)| 0.0 < *n && n < f),
            "{dn:?} {df:?}"
        );
        let back = d(near, a);
        assert!(dn.iter().zip(&back).all(|(x, y)| (x - y).abs() < 1e-5));
        // A file without the heads is refused, naming what is missing.
        let st = std::fs::read(&file).unwrap();
        let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
        let kept: HashMap<String, safetensors::tensor::TensorView> = parsed
            .tensors()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("lin3"))
            .collect();
        let partial = dir.path().join("partial.safetensors");
        safetensors::serialize_to_file(kept, None, &partial).unwrap();
        let err = Lpips::load(&partial, &dev).err().unwrap().to_string();
        assert!(err.contains("lin3.model.1.weight"), "{err}");
    }
}
