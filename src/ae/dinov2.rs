//! Initialising the encoder from DINOv2 weights in the Hugging Face `Dinov2Model` safetensors layout
//! (METHOD.md section 6: the paper starts from DINOv2 ViT-L/14).
//!
//! The patch embedding is resampled from DINOv2's patch (14) to ours (16) by bilinear interpolation
//! of each filter, scaled by `(14 / 16)^2` so a flat patch gives the same response; the position
//! embeddings of the patch grid are bilinearly interpolated to our grid (DINOv2 itself uses bicubic
//! interpolation at other resolutions). The latent tokens, their position embeddings and the output
//! projection keep their fresh initialisation.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use super::discriminator::DinoTrunk;
use super::model::Encoder;
use crate::error::{Error, Result};
use crate::params::{Loaded, read_all};

/// Bilinear resize of a `[h, w]` grid to `[nh, nw]` (half-pixel centres, like PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)`).
pub fn resize_bilinear(src: &[f32], (h, w): (usize, usize), (nh, nw): (usize, usize)) -> Vec<f32> {
    let coord = |i: usize, n: usize, m: usize| -> (usize, usize, f32) {
        let x = ((i as f32 + 0.5) * m as f32 / n as f32 - 0.5).clamp(0.0, (m - 1) as f32);
        let lo = x.floor() as usize;
        (lo, (lo + 1).min(m - 1), x - lo as f32)
    };
    let mut out = vec![0.0; nh * nw];
    for y in 0..nh {
        let (y0, y1, fy) = coord(y, nh, h);
        for x in 0..nw {
            let (x0, x1, fx) = coord(x, nw, w);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out[y * nw + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// Loads the tensors and checks names and shapes.
struct Source<'a> {
    path: &'a Path,
    tensors: BTreeMap<String, Loaded>,
    used: Vec<String>,
}

impl Source<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::input(
                self.path,
                format!("has no tensor {name}; pass a Hugging Face Dinov2Model safetensors file of the encoder's size"),
            )
        })?;
        if t.shape != shape {
            return Err(Error::input(
                self.path,
                format!(
                    "tensor {name} has shape {:?} but the encoder needs {shape:?}; pick the DINOv2 of the --model size",
                    t.shape
                ),
            ));
        }
        self.used.push(name.to_string());
        Ok(t.data)
    }

    /// A PyTorch `Linear` (`weight [out, in]`) as a burn `Linear` (`weight [in, out]`).
    fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let b = self.take(&format!("{prefix}.bias"), &[d_out])?;
        let wt = Tensor::<2>::from_data(TensorData::new(w, [d_out, d_in]), device).transpose();
        Ok(Linear {
            weight: Param::from_tensor(wt),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [d_out]),
                device,
            ))),
        })
    }

    fn vector(&mut self, name: &str, n: usize, device: &Device) -> Result<Param<Tensor<1>>> {
        let v = self.take(name, &[n])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [n]),
            device,
        )))
    }

    fn layer_norm(
        &mut self,
        prefix: &str,
        mut ln: LayerNorm,
        n: usize,
        device: &Device,
    ) -> Result<LayerNorm> {
        ln.gamma = self.vector(&format!("{prefix}.weight"), n, device)?;
        ln.beta = Some(self.vector(&format!("{prefix}.bias"), n, device)?);
        Ok(ln)
    }
}

/// What was loaded.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// Source tensors copied into the encoder.
    pub loaded: Vec<String>,
    /// Source tensors not used (e.g. `embeddings.mask_token`).
    pub unused: Vec<String>,
    /// DINOv2's patch size, found from its patch embedding.
    pub source_patch: usize,
}

/// Replaces the encoder's patch embedding, [CLS] token, position embeddings, blocks and final norm
/// with the DINOv2 weights in `path` (on `device`).
pub fn init_encoder(
    encoder: Encoder,
    path: &Path,
    device: &Device,
) -> Result<(Encoder, InitReport)> {
    let mut src = Source {
        path,
        tensors: read_all(path)?,
        used: Vec::new(),
    };
    let width = encoder.cls_token.dims()[2];
    let p = encoder.patch;
    let conv_name = "embeddings.patch_embeddings.projection.weight";
    let sp = src
        .tensors
        .get(conv_name)
        .map(|t| t.shape.get(2).copied().unwrap_or(0))
        .ok_or_else(|| {
            Error::input(
                path,
                format!(
                    "has no tensor {conv_name}; pass a Hugging Face Dinov2Model safetensors file"
                ),
            )
        })?;
    if sp == 0 {
        return Err(Error::input(
            path,
            format!("tensor {conv_name} is not a [C, 3, p, p] convolution"),
        ));
    }
    let conv = src.take(conv_name, &[width, 3, sp, sp])?;
    let bias = src.take("embeddings.patch_embeddings.projection.bias", &[width])?;
    // Each filter plane resized sp x sp -> p x p, then laid out as our [3 p p, C] linear map.
    let gain = (sp * sp) as f32 / (p * p) as f32;
    let mut w = vec![0.0f32; 3 * p * p * width];
    for c_out in 0..width {
        for c_in in 0..3 {
            let plane = &conv[(c_out * 3 + c_in) * sp * sp..(c_out * 3 + c_in + 1) * sp * sp];
            for (k, v) in resize_bilinear(plane, (sp, sp), (p, p))
                .into_iter()
                .enumerate()
            {
                w[(c_in * p * p + k) * width + c_out] = v * gain;
            }
        }
    }
    let mut enc = encoder;
    enc.patch_embed = Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(w, [3 * p * p, width]),
            device,
        )),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [width]),
            device,
        ))),
    };
    let cls = src.take("embeddings.cls_token", &[1, 1, width])?;
    enc.cls_token = Param::from_tensor(Tensor::from_data(
        TensorData::new(cls, [1, 1, width]),
        device,
    ));
    let pos_name = "embeddings.position_embeddings";
    let src_tokens = src
        .tensors
        .get(pos_name)
        .map(|t| t.shape.get(1).copied().unwrap_or(0))
        .unwrap_or(0);
    let sg = ((src_tokens.saturating_sub(1)) as f64).sqrt() as usize;
    if sg == 0 || sg * sg + 1 != src_tokens {
        return Err(Error::input(
            path,
            format!("tensor {pos_name} is not [1, 1 + g*g, C]"),
        ));
    }
    let pos = src.take(pos_name, &[1, src_tokens, width])?;
    let n = enc.pos_embed.dims()[1] - 1;
    let g = (n as f64).sqrt() as usize;
    let mut new_pos = pos[..width].to_vec(); // [CLS]
    let mut grid = vec![0.0f32; n * width];
    for c in 0..width {
        let plane: Vec<f32> = (0..sg * sg).map(|i| pos[(1 + i) * width + c]).collect();
        for (i, v) in resize_bilinear(&plane, (sg, sg), (g, g))
            .into_iter()
            .enumerate()
        {
            grid[i * width + c] = v;
        }
    }
    new_pos.extend(grid);
    enc.pos_embed = Param::from_tensor(Tensor::from_data(
        TensorData::new(new_pos, [1, 1 + n, width]),
        device,
    ));
    let blocks = std::mem::take(&mut enc.blocks);
    for (i, mut b) in blocks.into_iter().enumerate() {
        let pre = format!("encoder.layer.{i}");
        b.norm1 = src.layer_norm(&format!("{pre}.norm1"), b.norm1, width, device)?;
        b.attn.query = src.linear(
            &format!("{pre}.attention.attention.query"),
            width,
            width,
            device,
        )?;
        b.attn.key = src.linear(
            &format!("{pre}.attention.attention.key"),
            width,
            width,
            device,
        )?;
        b.attn.value = src.linear(
            &format!("{pre}.attention.attention.value"),
            width,
            width,
            device,
        )?;
        b.attn.output = src.linear(
            &format!("{pre}.attention.output.dense"),
            width,
            width,
            device,
        )?;
        b.ls1 = src.vector(&format!("{pre}.layer_scale1.lambda1"), width, device)?;
        b.norm2 = src.layer_norm(&format!("{pre}.norm2"), b.norm2, width, device)?;
        b.fc1 = src.linear(&format!("{pre}.mlp.fc1"), width, 4 * width, device)?;
        b.fc2 = src.linear(&format!("{pre}.mlp.fc2"), 4 * width, width, device)?;
        b.ls2 = src.vector(&format!("{pre}.layer_scale2.lambda1"), width, device)?;
        enc.blocks.push(b);
    }
    enc.norm = src.layer_norm("layernorm", enc.norm, width, device)?;
    let report = InitReport {
        loaded: src.used,
        unused: src.tensors.keys().cloned().collect(),
        source_patch: sp,
    };
    Ok((enc, report))
}

/// Replaces the discriminator's frozen trunk (patch embedding, [CLS], position embeddings, blocks)
/// with the DINOv2 weights in `path`, exactly as [`init_encoder`] does for the encoder; the file's
/// blocks past the trunk's last tap and its final norm are reported unused.
pub fn init_trunk(
    trunk: DinoTrunk,
    path: &Path,
    device: &Device,
) -> Result<(DinoTrunk, InitReport)> {
    let width = trunk.cls_token.dims()[2];
    // The encoder's latent-token parts are placeholders: init_encoder leaves them untouched.
    let encoder = Encoder {
        patch_embed: trunk.patch_embed,
        cls_token: trunk.cls_token,
        pos_embed: trunk.pos_embed,
        latent_tokens: Param::from_tensor(Tensor::zeros([1, 1, width], device)),
        latent_pos: Param::from_tensor(Tensor::zeros([1, 1, width], device)),
        blocks: trunk.blocks,
        norm: burn::nn::LayerNormConfig::new(width).init(device),
        to_latent: burn::nn::LinearConfig::new(width, 1).init(device),
        patch: trunk.patch,
    };
    let (enc, mut report) = init_encoder(encoder, path, device)?;
    report.loaded.retain(|n| !n.starts_with("layernorm."));
    report
        .unused
        .extend(["layernorm.weight".to_string(), "layernorm.bias".to_string()]);
    report.unused.sort();
    Ok((
        DinoTrunk {
            patch_embed: enc.patch_embed,
            cls_token: enc.cls_token,
            pos_embed: enc.pos_embed,
            blocks: enc.blocks,
            patch: enc.patch,
            taps: trunk.taps,
        },
        report,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ae::model::{AeModelConfig, VitSize};
    use crate::rng::{Stream, rng_for};
    use std::collections::HashMap;

    /// A DINOv2-named file for the tiny encoder (width 64, 2 layers), patch 4, grid 3 x 3.
    pub(crate) fn write_dinov2(path: &Path, width: usize) {
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.cls_token".into(), vec![1, 1, width]),
            ("embeddings.mask_token".into(), vec![1, width]),
            ("embeddings.position_embeddings".into(), vec![1, 10, width]),
            (
                "embeddings.patch_embeddings.projection.weight".into(),
                vec![width, 3, 4, 4],
            ),
            (
                "embeddings.patch_embeddings.projection.bias".into(),
                vec![width],
            ),
            ("layernorm.weight".into(), vec![width]),
            ("layernorm.bias".into(), vec![width]),
        ];
        for i in 0..2 {
            let p = format!("encoder.layer.{i}");
            for n in ["norm1", "norm2"] {
                tensors.push((format!("{p}.{n}.weight"), vec![width]));
                tensors.push((format!("{p}.{n}.bias"), vec![width]));
            }
            for n in [
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
                "attention.output.dense",
            ] {
                tensors.push((format!("{p}.{n}.weight"), vec![width, width]));
                tensors.push((format!("{p}.{n}.bias"), vec![width]));
            }
            tensors.push((format!("{p}.mlp.fc1.weight"), vec![4 * width, width]));
            tensors.push((format!("{p}.mlp.fc1.bias"), vec![4 * width]));
            tensors.push((format!("{p}.mlp.fc2.weight"), vec![width, 4 * width]));
            tensors.push((format!("{p}.mlp.fc2.bias"), vec![width]));
            tensors.push((format!("{p}.layer_scale1.lambda1"), vec![width]));
            tensors.push((format!("{p}.layer_scale2.lambda1"), vec![width]));
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let n: usize = shape.iter().product();
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| (((i * 31 + k * 7) % 97) as f32 / 97.0 - 0.5).to_le_bytes())
                    .collect();
                (name, shape, data)
            })
            .collect();
        let views: HashMap<String, safetensors::tensor::TensorView> = bytes
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
    fn loads_hugging_face_dinov2_names_and_refuses_a_wrong_size() {
        let dev = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dinov2.safetensors");
        write_dinov2(&file, 64);
        let cfg = AeModelConfig {
            size: VitSize::Tiny,
            image_size: 32,
            patch: 8,
            latent_tokens: 4,
            latent_dim: 3,
        };
        let ae = cfg.init(&mut rng_for(0, Stream::Init, 0), &dev);
        let (enc, report) = init_encoder(ae.encoder, &file, &dev).unwrap();
        assert_eq!(report.source_patch, 4);
        assert_eq!(report.unused, vec!["embeddings.mask_token".to_string()]);
        assert_eq!(report.loaded.len(), 6 + 2 * 18);
        // fc1 is the source's [256, 64] weight transposed.
        let all = read_all(&file).unwrap();
        let src = &all["encoder.layer.1.mlp.fc1.weight"].data;
        let got: Vec<f32> = enc.blocks[1]
            .fc1
            .weight
            .val()
            .try_into_vec_as::<f32>()
            .unwrap();
        assert_eq!(got[5 * 256 + 7], src[7 * 64 + 5]);
        let ls: Vec<f32> = enc.blocks[0].ls2.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(ls, all["encoder.layer.0.layer_scale2.lambda1"].data);
        assert_eq!(enc.pos_embed.dims(), [1, 17, 64]);
        assert_eq!(enc.patch_embed.weight.dims(), [192, 64]);
        // The encoder still runs.
        let x = Tensor::<4>::zeros([1, 3, 32, 32], &dev);
        assert_eq!(enc.forward(x).dims(), [1, 4, 3]);
        // A file of another width is refused, naming the tensor.
        let other = dir.path().join("wide.safetensors");
        write_dinov2(&other, 32);
        let ae = cfg.init(&mut rng_for(0, Stream::Init, 0), &dev);
        let err = init_encoder(ae.encoder, &other, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("embeddings.patch_embeddings.projection.weight")
                && err.contains("[32, 3, 4, 4]"),
            "{err}"
        );
    }

    #[test]
    fn the_discriminator_trunk_loads_the_same_file() {
        let dev = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dinov2.safetensors");
        write_dinov2(&file, 64);
        // Taps up to block 0: block 1 and the final norm stay in the file.
        let cfg = crate::ae::discriminator::DiscModelConfig {
            taps: vec![0],
            ..crate::ae::discriminator::tests::tiny()
        };
        let trunk = cfg.init_trunk(16, &mut rng_for(0, Stream::DiscInit, 1), &dev);
        let (trunk, report) = init_trunk(trunk, &file, &dev).unwrap();
        assert_eq!(trunk.blocks.len(), 1);
        assert!(
            report
                .unused
                .contains(&"encoder.layer.1.mlp.fc1.weight".to_string())
        );
        assert!(report.unused.contains(&"layernorm.weight".to_string()));
        let all = read_all(&file).unwrap();
        let got: Vec<f32> = trunk.blocks[0].ls1.val().try_into_vec_as::<f32>().unwrap();
        assert_eq!(got, all["encoder.layer.0.layer_scale1.lambda1"].data);
        assert_eq!(trunk.pos_embed.dims(), [1, 17, 64]);
        assert_eq!(trunk.features(Tensor::zeros([1, 3, 16, 16], &dev)).len(), 2);
    }

    #[test]
    fn bilinear_resize_keeps_constants_and_matches_torch_on_a_ramp() {
        let flat = vec![2.0f32; 9];
        assert!(
            resize_bilinear(&flat, (3, 3), (4, 4))
                .iter()
                .all(|&v| (v - 2.0).abs() < 1e-6)
        );
        // torch: F.interpolate(tensor([[0., 1.]]).view(1,1,1,2), size=(1,4), mode="bilinear") =
        // [0, 0.25, 0.75, 1].
        let ramp = resize_bilinear(&[0.0, 1.0], (1, 2), (1, 4));
        assert_eq!(ramp, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
