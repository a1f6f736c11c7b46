//! The latent cache a generator trains on (METHOD.md section 7): an autoencoder's latents of every
//! image (and of its horizontal flip), sharded safetensors with the class labels and the
//! statistics that scale them; reading the cache back; and decoding latents into PNGs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::data::ImageFolder;
use super::eval::read_centre;
use super::model::Autoencoder;
use crate::error::{Error, Result};
use crate::files::{write_atomic, write_json};

/// Samples whose variance sets the generator's scale factor (METHOD.md section 7: 10k latents).
pub const SCALE_SAMPLES: usize = 10_000;

/// Statistics of cached latents, for scaling them before a generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentStats {
    pub images: usize,
    pub tokens: usize,
    pub dim: usize,
    /// Mean and std over every entry.
    pub mean: f64,
    pub std: f64,
    /// Per latent channel.
    pub channel_mean: Vec<f64>,
    pub channel_std: Vec<f64>,
    /// The generator's scale factor: `1 / sqrt(mean per-sample variance)` over the first 10k
    /// latents (METHOD.md section 7; 1.7052 for the paper's Qwen-aligned autoencoder).
    #[serde(default)]
    pub scale: f64,
    /// Whether each shard also holds the latents of the horizontally flipped images.
    #[serde(default)]
    pub flipped: bool,
    pub shards: Vec<String>,
}

/// Running sums behind [`LatentStats`].
#[derive(Default)]
struct Sums {
    sum: f64,
    sq: f64,
    entries: usize,
    channel: Vec<(f64, f64)>,
    sample_var: Vec<f64>,
}

impl Sums {
    fn add(&mut self, latents: &[f32], per_sample: usize, dim: usize) {
        if self.channel.is_empty() {
            self.channel = vec![(0.0, 0.0); dim];
        }
        for sample in latents.chunks(per_sample) {
            let (mut s, mut q) = (0.0f64, 0.0f64);
            for (k, &v) in sample.iter().enumerate() {
                let v = f64::from(v);
                s += v;
                q += v * v;
                let c = &mut self.channel[k % dim];
                c.0 += v;
                c.1 += v * v;
            }
            self.sum += s;
            self.sq += q;
            self.entries += sample.len();
            if self.sample_var.len() < SCALE_SAMPLES {
                let n = sample.len() as f64;
                self.sample_var.push((q / n - (s / n).powi(2)).max(0.0));
            }
        }
    }
}

/// How [`encode_folder`] writes its cache.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// Images per shard file.
    pub shard_size: usize,
    /// Images per forward pass.
    pub batch: usize,
    /// Also store the latents of each image's horizontal flip.
    pub flip: bool,
}

/// Encodes every readable image of `folder` (centre crops) into `out/latents-NNNNN.safetensors`
/// shards of `shard_size` images (`latents` f32 `[n, tokens, dim]`, with `flip` also
/// `latents_flip`, the latents of the mirrored images, and `labels` i64 `[n]`), and writes
/// `stats.json` and `classes.txt`.
pub fn encode_folder(
    model: &Autoencoder,
    folder: &ImageFolder,
    size: usize,
    out: &Path,
    opts: EncodeOptions,
    device: &Device,
) -> Result<LatentStats> {
    let EncodeOptions {
        shard_size,
        batch,
        flip,
    } = opts;
    let mut cache = CacheWriter::create(out, flip)?;
    let indices: Vec<usize> = (0..folder.len()).collect();
    for shard in indices.chunks(shard_size.max(1)) {
        let (mut lat, mut lat_flip, mut labels) =
            (Vec::<f32>::new(), Vec::<f32>::new(), Vec::new());
        let (mut tokens, mut dim) = (0, 0);
        for chunk in shard.chunks(batch.max(1)) {
            let (pixels, kept) = read_centre(folder, chunk, size);
            if kept.is_empty() {
                continue;
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(pixels, [kept.len(), 3, size, size]),
                device,
            );
            if flip {
                let z = model.encode(x.clone().flip([3])); // mirrored along the width
                lat_flip.extend(z.try_into_vec_as::<f32>().expect("f32 readback"));
            }
            let z = model.encode(x);
            [_, tokens, dim] = z.dims();
            lat.extend(z.try_into_vec_as::<f32>().expect("f32 readback"));
            labels.extend(kept.iter().map(|&i| i64::from(folder.labels[i])));
        }
        if !labels.is_empty() {
            cache.write_shard(&lat, flip.then_some(&lat_flip[..]), &labels, tokens, dim)?;
        }
    }
    if cache.images == 0 {
        return Err(Error::input(&folder.root, "no readable images to encode"));
    }
    cache.finish(&folder.classes)
}

/// Writes a latent cache shard by shard, as `ae encode` does: `latents-NNNNN.safetensors`
/// shards, then `stats.json` and `classes.txt`. Latents from another encoder written this way
/// train a generator like `ae encode`'s.
pub struct CacheWriter {
    out: PathBuf,
    flip: bool,
    sums: Sums,
    tokens: usize,
    dim: usize,
    images: usize,
    shards: Vec<String>,
}

impl CacheWriter {
    /// A cache in the folder `out` (created); with `flip`, every shard also holds the latents of
    /// the mirrored images.
    pub fn create(out: &Path, flip: bool) -> Result<CacheWriter> {
        std::fs::create_dir_all(out)
            .map_err(|e| Error::io(out, "choose an output folder you can write to", e))?;
        Ok(CacheWriter {
            out: out.to_path_buf(),
            flip,
            sums: Sums::default(),
            tokens: 0,
            dim: 0,
            images: 0,
            shards: Vec::new(),
        })
    }

    /// Writes the next shard.
    ///
    /// # Shapes
    /// - `latents`, `flipped`: `[n, tokens, dim]` flat
    /// - `labels`: `[n]`, class indices into the `classes` given to [`CacheWriter::finish`]
    pub fn write_shard(
        &mut self,
        latents: &[f32],
        flipped: Option<&[f32]>,
        labels: &[i64],
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let name = format!("latents-{:05}.safetensors", self.shards.len());
        let path = self.out.join(&name);
        let n = labels.len();
        if n == 0 || tokens * dim == 0 || latents.len() != n * tokens * dim {
            return Err(Error::input(
                &path,
                format!(
                    "{} latent values for {n} labels of {tokens} x {dim}",
                    latents.len()
                ),
            ));
        }
        if self.images > 0 && (tokens, dim) != (self.tokens, self.dim) {
            return Err(Error::input(
                &path,
                format!(
                    "latents of {tokens} x {dim} after shards of {} x {}",
                    self.tokens, self.dim
                ),
            ));
        }
        if flipped.is_some() != self.flip || flipped.is_some_and(|f| f.len() != latents.len()) {
            return Err(Error::input(
                &path,
                "every shard of a flipped cache needs as many flipped latents as latents",
            ));
        }
        if let Some(bad) = latents
            .iter()
            .chain(flipped.unwrap_or(&[]))
            .find(|v| !v.is_finite())
        {
            return Err(Error::input(&path, format!("a latent is {bad}")));
        }
        write_shard(&path, latents, flipped, labels, tokens, dim)?;
        self.sums.add(latents, tokens * dim, dim);
        (self.tokens, self.dim) = (tokens, dim);
        self.images += n;
        self.shards.push(name);
        Ok(())
    }

    /// Writes `stats.json` and `classes.txt` (one name per class index).
    pub fn finish(self, classes: &[String]) -> Result<LatentStats> {
        let (sums, dim) = (&self.sums, self.dim);
        if self.images == 0 {
            return Err(Error::input(&self.out, "no latents were written"));
        }
        let n = sums.entries as f64;
        let per = (sums.entries / dim) as f64;
        let mean = sums.sum / n;
        let sample_var = sums.sample_var.iter().sum::<f64>() / sums.sample_var.len() as f64;
        let stats = LatentStats {
            images: self.images,
            tokens: self.tokens,
            dim,
            mean,
            std: (sums.sq / n - mean * mean).max(0.0).sqrt(),
            channel_mean: sums.channel.iter().map(|c| c.0 / per).collect(),
            channel_std: sums
                .channel
                .iter()
                .map(|c| (c.1 / per - (c.0 / per).powi(2)).max(0.0).sqrt())
                .collect(),
            scale: 1.0 / sample_var.max(1e-12).sqrt(),
            flipped: self.flip,
            shards: self.shards,
        };
        write_json(&self.out.join("stats.json"), &stats)?;
        write_atomic(
            &self.out.join("classes.txt"),
            (classes.join("\n") + "\n").as_bytes(),
        )?;
        Ok(stats)
    }
}

fn write_shard(
    path: &Path,
    latents: &[f32],
    flipped: Option<&[f32]>,
    labels: &[i64],
    tokens: usize,
    dim: usize,
) -> Result<()> {
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let lat = bytes(latents);
    let flip = flipped.map(bytes);
    let lab: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = vec![labels.len(), tokens, dim];
    fn view(
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data: &[u8],
    ) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(dtype, shape, data).expect("consistent shape")
    }
    let mut views = HashMap::from([
        (
            "latents".to_string(),
            view(safetensors::Dtype::F32, shape.clone(), &lat),
        ),
        (
            "labels".to_string(),
            view(safetensors::Dtype::I64, vec![labels.len()], &lab),
        ),
    ]);
    if let Some(f) = &flip {
        views.insert(
            "latents_flip".into(),
            view(safetensors::Dtype::F32, shape, f),
        );
    }
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::input(path, format!("could not encode: {e}")))?;
    write_atomic(path, &bytes)
}

/// A latent cache read back into memory: what a generator trains on.
#[derive(Debug, Clone)]
pub struct LatentSet {
    pub stats: LatentStats,
    /// `[n, tokens, dim]`, flat.
    pub latents: Vec<f32>,
    /// The mirrored images' latents, same layout, when the cache holds them.
    pub flipped: Option<Vec<f32>>,
    /// Class of each latent.
    pub labels: Vec<u32>,
    /// Class names, by label.
    pub classes: Vec<String>,
}

impl LatentSet {
    /// Reads the cache `ae encode` wrote into `dir`.
    pub fn read(dir: &Path) -> Result<LatentSet> {
        let stats_path = dir.join("stats.json");
        let text = std::fs::read_to_string(&stats_path).map_err(|e| {
            Error::io(
                &stats_path,
                "give the folder `flowalign ae encode` wrote (it holds stats.json)",
                e,
            )
        })?;
        let stats: LatentStats = serde_json::from_str(&text)
            .map_err(|e| Error::input(&stats_path, format!("not a latent cache's stats: {e}")))?;
        let per = stats.tokens * stats.dim;
        let (mut latents, mut flipped, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for name in &stats.shards {
            let path: PathBuf = dir.join(name);
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::io(&path, "the cache is incomplete: encode it again", e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::input(&path, format!("unreadable or truncated shard: {e}")))?;
            let f32s = |name: &str| -> Result<Vec<f32>> {
                let t = st
                    .tensor(name)
                    .map_err(|_| Error::input(&path, format!("holds no `{name}` tensor")))?;
                if t.dtype() != safetensors::Dtype::F32
                    || t.shape().iter().product::<usize>() % per != 0
                {
                    return Err(Error::input(
                        &path,
                        format!(
                            "`{name}` is {:?} {:?}, not f32 [n, {}, {}]",
                            t.dtype(),
                            t.shape(),
                            stats.tokens,
                            stats.dim
                        ),
                    ));
                }
                Ok(t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            let lat = f32s("latents")?;
            let lab = st
                .tensor("labels")
                .map_err(|_| Error::input(&path, "holds no `labels` tensor"))?;
            let shard_labels: Vec<u32> = lab
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")).max(0) as u32)
                .collect();
            if shard_labels.len() * per != lat.len() {
                return Err(Error::input(
                    &path,
                    format!(
                        "{} labels for {} latents",
                        shard_labels.len(),
                        lat.len() / per
                    ),
                ));
            }
            if stats.flipped {
                flipped.extend(f32s("latents_flip")?);
            }
            latents.extend(lat);
            labels.extend(shard_labels);
        }
        let classes_path = dir.join("classes.txt");
        let classes = std::fs::read_to_string(&classes_path)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        if latents.is_empty() {
            return Err(Error::input(dir, "the latent cache holds no latents"));
        }
        Ok(LatentSet {
            flipped: stats.flipped.then_some(flipped),
            stats,
            latents,
            labels,
            classes,
        })
    }

    /// Number of latents.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (one more than the largest label).
    pub fn num_classes(&self) -> usize {
        self.labels
            .iter()
            .max()
            .map_or(0, |m| *m as usize + 1)
            .max(self.classes.len())
    }
}

/// The `latents` tensor `[n, tokens, dim]` of a .safetensors file (f32), flat, with its tokens and
/// dim: what `gen sample` writes.
pub fn read_latents_file(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(path, "check the latents file's path", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::input(path, format!("not a readable .safetensors file: {e}")))?;
    let t = st
        .tensor("latents")
        .map_err(|_| Error::input(path, "holds no `latents` tensor"))?;
    match (t.dtype(), t.shape()) {
        (safetensors::Dtype::F32, &[_, tokens, dim]) => Ok((
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            tokens,
            dim,
        )),
        (dtype, shape) => Err(Error::input(
            path,
            format!("`latents` is {dtype:?} {shape:?}, not f32 [n, tokens, dim]"),
        )),
    }
}

/// Decodes `latents` (`[n, tokens, dim]`, flat, the autoencoder's own scale) with `model` into
/// PNGs `out/NNNNNN.png` numbered from 0, `batch` at a time; pixels are quantised as the
/// evaluation does, `round(clip((x + 1) / 2 * 255))`. Returns the paths written.
pub fn decode_to_pngs(
    model: &Autoencoder,
    latents: &[f32],
    tokens: usize,
    dim: usize,
    out: &Path,
    batch: usize,
    device: &Device,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(out, "choose an output folder you can write to", e))?;
    let per = tokens * dim;
    let mut written = Vec::new();
    for (b, chunk) in latents.chunks(per * batch.max(1)).enumerate() {
        let n = chunk.len() / per;
        let z = Tensor::<3>::from_data(TensorData::new(chunk.to_vec(), [n, tokens, dim]), device);
        let x = model.decode(z); // [n, 3, s, s] in [-1, 1]
        let [_, _, h, w] = x.dims();
        let pixels: Vec<f32> = x.try_into_vec_as::<f32>().expect("f32 readback");
        for i in 0..n {
            let mut rgb = vec![0u8; h * w * 3];
            for c in 0..3 {
                for p in 0..h * w {
                    let v = pixels[(i * 3 + c) * h * w + p];
                    rgb[p * 3 + c] = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
                }
            }
            let path = out.join(format!("{:06}.png", b * batch.max(1) + i));
            crate::report::write_png_rgb(&path, &rgb, (w as u32, h as u32))?;
            written.push(path);
        }
    }
    Ok(written)
}
