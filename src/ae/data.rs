//! ImageNet-style image folders (`class/xxx.JPEG`, any depth; JPEG or PNG): scanning, decoding and the
//! augmentation of METHOD.md section 6 (resize the shorter side, random crop, horizontal flip), in
//! parallel and ahead of the training step.
//!
//! Every batch is a pure function of (seed, step), so a resumed run sees the same images and crops.
//! An unreadable image is skipped with one warning naming it, replaced by the next image, and
//! counted; so is a truncated one, which the decoder would otherwise fill in without a word
//! (PyTorch's usual loader, PIL, refuses it too).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::imageops::FilterType;
use rand::RngExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{Rng, Stream, rng_for};

/// What an autoencoder checkpoint records about its images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    pub images: usize,
    pub classes: usize,
}

/// The images under a folder with their class labels.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Image files, sorted.
    pub paths: Vec<PathBuf>,
    /// Class index of each image: its first folder under the root, in sorted order.
    pub labels: Vec<u32>,
    /// Class names (the first-level folder names; "" for images directly under the root).
    pub classes: Vec<String>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

impl ImageFolder {
    /// Lists every JPEG and PNG file under `root`, at any depth.
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        if !root.is_dir() {
            return Err(Error::input(
                root,
                "not a folder; pass --data an ImageNet-style folder (class/xxx.JPEG)",
            ));
        }
        let mut paths: Vec<PathBuf> = walkdir::WalkDir::new(root)
            .follow_links(true)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file() && is_image(e.path()))
            .map(|e| e.into_path())
            .collect();
        if paths.is_empty() {
            return Err(Error::input(
                root,
                "holds no .jpg, .jpeg or .png images; pass --data an ImageNet-style folder (class/xxx.JPEG)",
            ));
        }
        paths.sort();
        let class_of = |p: &Path| -> String {
            let rel = p.strip_prefix(root).unwrap_or(p);
            let mut parts = rel.components();
            match (parts.next(), parts.next()) {
                (Some(first), Some(_)) => first.as_os_str().to_string_lossy().into_owned(),
                _ => String::new(),
            }
        };
        let mut classes: Vec<String> = paths.iter().map(|p| class_of(p)).collect();
        classes.sort();
        classes.dedup();
        let labels = paths
            .iter()
            .map(|p| classes.binary_search(&class_of(p)).expect("listed class") as u32)
            .collect();
        Ok(ImageFolder {
            root: root.to_path_buf(),
            paths,
            labels,
            classes,
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// How an image becomes a training or evaluation input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// Resize the shorter side to the size, take a random square, flip half of the time.
    Train,
    /// Resize the shorter side to the size, take the centre square.
    Centre,
}

/// Decodes `path` and returns `[3, size, size]` values in [-1, 1], channel-major, and whether the
/// image was smaller than `size` (it is then upscaled).
pub fn load_image(
    path: &Path,
    size: usize,
    crop: Crop,
    rng: &mut Rng,
) -> std::result::Result<(Vec<f32>, bool), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let format = image::guess_format(&bytes).map_err(|e| e.to_string())?;
    check_complete(&bytes, format)?;
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let small = (w.min(h) as usize) < size;
    let s = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * s).round() as u32).max(size as u32),
        ((h as f64 * s).round() as u32).max(size as u32),
    );
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    let (x0, y0, flip) = match crop {
        Crop::Train => (
            rng.random_range(0..=nw - size as u32),
            rng.random_range(0..=nh - size as u32),
            rng.random::<bool>(),
        ),
        Crop::Centre => ((nw - size as u32) / 2, (nh - size as u32) / 2, false),
    };
    let mut out = vec![0.0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let sx = if flip { size - 1 - x } else { x };
            let px = resized.get_pixel(x0 + sx as u32, y0 + y as u32);
            for c in 0..3 {
                out[c * size * size + y * size + x] = px[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok((out, small))
}

/// Refuses a file that ends before its image does. The JPEG decoder fills a cut-off scan with grey
/// and reports success, so a JPEG must hold an end-of-image marker (FF D9) after its first
/// start-of-scan: inside entropy-coded data every FF byte is stuffed (FF 00) or a restart marker,
/// so FF D9 there is the real end, and an EXIF thumbnail's own FF D9 comes before the scan. A PNG
/// must hold its IEND chunk.
pub fn check_complete(bytes: &[u8], format: image::ImageFormat) -> std::result::Result<(), String> {
    let truncated = || {
        Err(format!(
            "is truncated ({} bytes; the image data ends early)",
            bytes.len()
        ))
    };
    match format {
        image::ImageFormat::Jpeg => {
            let Some(scan) = jpeg_first_scan(bytes) else {
                return truncated();
            };
            if bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
                Ok(())
            } else {
                truncated()
            }
        }
        image::ImageFormat::Png => {
            if bytes.windows(4).rev().take(64).any(|w| w == b"IEND") {
                Ok(())
            } else {
                truncated()
            }
        }
        _ => Ok(()),
    }
}

/// The offset just past the first start-of-scan (FF DA) segment header of a JPEG, walking the
/// marker segments from the start; `None` when the file ends before one.
fn jpeg_first_scan(b: &[u8]) -> Option<usize> {
    let mut i = 2; // after SOI (FF D8)
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if (0xD0..=0xD8).contains(&marker) || marker == 0x01 {
            i += 2; // standalone markers carry no length
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        let end = i + 2 + len;
        if marker == 0xDA {
            return (end <= b.len()).then_some(end);
        }
        i = end;
    }
    None
}

/// A batch of images.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `[batch, 3, size, size]` in [-1, 1], flat.
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    pub size: usize,
    /// Where these images start in their step's global batch (a rank of a multi-process run
    /// loads only its share).
    pub first: usize,
    /// Images in the step's global batch.
    pub total: usize,
}

impl ImageBatch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What to do with an image whose shorter side is below the crop.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SmallImages {
    /// Upscale it to the crop (one warning, then counted). ImageNet holds a few such images.
    #[default]
    Upscale,
    /// Skip it like an unreadable file (replaced by the next image, counted).
    Skip,
    /// Stop with an error naming it.
    Error,
}

/// Draws augmented batches from an [`ImageFolder`], decoding in parallel (rayon).
pub struct ImageLoader {
    pub folder: ImageFolder,
    pub size: usize,
    seed: u64,
    crop: Crop,
    small: SmallImages,
    /// Images that could not be read, by path (each warned about once).
    bad: Mutex<HashSet<PathBuf>>,
    skipped: AtomicUsize,
    upscaled: AtomicUsize,
}

impl ImageLoader {
    pub fn new(folder: ImageFolder, size: usize, seed: u64, crop: Crop) -> ImageLoader {
        ImageLoader {
            folder,
            size,
            seed,
            crop,
            small: SmallImages::Upscale,
            bad: Mutex::new(HashSet::new()),
            skipped: AtomicUsize::new(0),
            upscaled: AtomicUsize::new(0),
        }
    }

    /// Handles images smaller than the crop by `policy` (default: upscale).
    pub fn with_small_images(mut self, policy: SmallImages) -> Self {
        self.small = policy;
        self
    }

    /// Reads skipped so far (unreadable or corrupt files, and small ones under `SmallImages::Skip`).
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Reads of images smaller than the crop (upscaled).
    pub fn upscaled(&self) -> usize {
        self.upscaled.load(Ordering::Relaxed)
    }

    /// Image `i` augmented with `rng`; an unreadable one is replaced by the next readable image.
    fn read(&self, mut i: usize, rng: &mut Rng) -> Result<(Vec<f32>, u32)> {
        let n = self.folder.len();
        for _ in 0..n.min(64) {
            let path = &self.folder.paths[i];
            let read =
                load_image(path, self.size, self.crop, rng).and_then(|(pixels, small)| {
                    match (small, self.small) {
                        (true, SmallImages::Skip) => {
                            Err(format!("smaller than the {}-pixel crop", self.size))
                        }
                        _ => Ok((pixels, small)),
                    }
                });
            match read {
                Ok((pixels, small)) => {
                    if small && self.small == SmallImages::Error {
                        return Err(Error::input(
                            path,
                            format!(
                                "is smaller than the {}-pixel crop; remove it, or pass --small-images upscale or skip",
                                self.size
                            ),
                        ));
                    }
                    if small && self.upscaled.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            "{} is smaller than the {}-pixel crop and is upscaled (further ones are counted)",
                            path.display(),
                            self.size
                        );
                    }
                    return Ok((pixels, self.folder.labels[i]));
                }
                Err(e) => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    let mut bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
                    if bad.insert(path.clone()) {
                        tracing::warn!("skipping unreadable image {}: {e}", path.display());
                    }
                    i = (i + 1) % n;
                }
            }
        }
        Err(Error::input(
            &self.folder.root,
            "64 images in a row could not be read; check the files under --data",
        ))
    }

    /// The batch of `batch` images for `step`: indices and crops are a function of (seed, step).
    pub fn batch(&self, step: u64, batch: usize) -> Result<ImageBatch> {
        self.batch_part(step, batch, 0..batch)
    }

    /// The images `part` of [`ImageLoader::batch`]`(step, batch)`, reading only those files: the
    /// same pixels whatever the split.
    pub fn batch_part(
        &self,
        step: u64,
        batch: usize,
        part: std::ops::Range<usize>,
    ) -> Result<ImageBatch> {
        let mut rng = rng_for(self.seed, Stream::Data, step);
        let picks: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..self.folder.len()))
            .collect();
        let mut out = self.gather_at(&picks[part.clone()], step, part.start)?;
        out.total = batch;
        Ok(out)
    }

    /// Images `indices` (e.g. for evaluation, in order), augmented as the loader's crop says.
    pub fn gather(&self, indices: &[usize], step: u64) -> Result<ImageBatch> {
        self.gather_at(indices, step, 0)
    }

    /// [`ImageLoader::gather`] for images at positions `first..` of a batch (each position has its
    /// own augmentation draws).
    fn gather_at(&self, indices: &[usize], step: u64, first: usize) -> Result<ImageBatch> {
        let items: Vec<Result<(Vec<f32>, u32)>> = indices
            .par_iter()
            .enumerate()
            .map(|(k, &i)| {
                let k = first + k;
                let mut rng = rng_for(self.seed ^ (k as u64) << 32, Stream::Augment, step);
                self.read(i, &mut rng)
            })
            .collect();
        let mut pixels = Vec::with_capacity(indices.len() * 3 * self.size * self.size);
        let mut labels = Vec::with_capacity(indices.len());
        for item in items {
            let (p, l) = item?;
            pixels.extend(p);
            labels.push(l);
        }
        Ok(ImageBatch {
            pixels,
            labels,
            size: self.size,
            first,
            total: indices.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, colour: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(colour))
            .save(path)
            .unwrap();
    }

    #[test]
    fn scans_classes_and_skips_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("cat/a.png"), 40, 30, [255, 0, 0]);
        write_png(&root.join("dog/deep/b.PNG"), 20, 50, [0, 0, 255]);
        image::RgbImage::from_pixel(24, 24, image::Rgb([0, 255, 0]))
            .save(root.join("dog/c.jpg"))
            .unwrap();
        std::fs::write(root.join("cat/broken.jpeg"), b"not a jpeg").unwrap();
        std::fs::write(root.join("notes.txt"), b"ignored").unwrap();
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.len(), 4);
        assert_eq!(folder.classes, vec!["cat", "dog"]);
        let loader = ImageLoader::new(folder, 16, 0, Crop::Centre);
        let all = loader.gather(&[0, 1, 2, 3], 0).unwrap();
        assert_eq!(all.pixels.len(), 4 * 3 * 16 * 16);
        // a.png is pure red: channel 0 at +1, the others at -1.
        assert_eq!(all.pixels[0], 1.0);
        assert_eq!(all.pixels[16 * 16], -1.0);
        assert_eq!(loader.skipped(), 1, "broken.jpeg is skipped");
        // Sorted: cat/a, cat/broken (replaced by the next image, dog/c), dog/c, dog/deep/b.
        assert_eq!(all.labels, vec![0, 1, 1, 1]);
        assert_eq!(loader.upscaled(), 0);
        // dog/deep/b.PNG is 20 x 50 and c.jpg 24 x 24: below a 22-pixel crop only b.PNG is.
        let folder = ImageFolder::scan(root).unwrap();
        let up = ImageLoader::new(folder.clone(), 22, 0, Crop::Centre);
        up.gather(&[3], 0).unwrap();
        assert_eq!((up.upscaled(), up.skipped()), (1, 0));
        let skip = ImageLoader::new(folder.clone(), 22, 0, Crop::Centre)
            .with_small_images(SmallImages::Skip);
        let b = skip.gather(&[3], 0).unwrap();
        assert_eq!((skip.skipped(), b.labels), (1, vec![0])); // replaced by cat/a.png
        let strict =
            ImageLoader::new(folder, 22, 0, Crop::Centre).with_small_images(SmallImages::Error);
        let err = strict.gather(&[3], 0).unwrap_err().to_string();
        assert!(
            err.contains("b.PNG") && err.contains("--small-images"),
            "{err}"
        );
        // Training batches are a function of (seed, step).
        let train = ImageLoader::new(ImageFolder::scan(root).unwrap(), 16, 3, Crop::Train);
        let a = train.batch(5, 6).unwrap();
        let b = train.batch(5, 6).unwrap();
        // A rank's share is the same images with the same crops.
        let part = train.batch_part(5, 6, 2..5).unwrap();
        let px = 3 * train.size * train.size;
        assert_eq!(part.pixels, a.pixels[2 * px..5 * px]);
        assert_eq!((part.first, part.total, part.len()), (2, 6, 3));
        assert_eq!(a.pixels, b.pixels);
        assert!(a.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    /// A photo-like JPEG (smooth gradients and fine texture, so it compresses like a photo).
    fn photo_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let t = ((x * 7 + y * 13) % 23) as u8;
            image::Rgb([
                (x * 255 / w) as u8 ^ t,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8 ^ (t << 2),
            ])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_truncated_image_is_skipped_and_counted_like_an_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let whole = photo_jpeg(320, 240);
        assert!(whole.len() > 10_000, "{} bytes", whole.len());
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/0-whole.jpg"), &whole).unwrap();
        std::fs::write(root.join("a/1-cut.jpg"), &whole[..3_000]).unwrap();
        // The decoder alone accepts the cut file and fills in what is missing: the reason for
        // the check.
        let filled = image::load_from_memory(&whole[..3_000]);
        assert!(
            filled.is_ok(),
            "the decoder refused it by itself: {filled:?}"
        );
        // A PNG cut short is refused too.
        let mut png = Vec::new();
        image::RgbImage::from_pixel(64, 64, image::Rgb([9, 99, 199]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(root.join("a/2-cut.png"), &png[..png.len() - 20]).unwrap();
        write_png(&root.join("a/3-ok.png"), 40, 40, [1, 2, 3]);

        let jpeg = image::ImageFormat::Jpeg;
        assert!(check_complete(&whole, jpeg).is_ok());
        let err = check_complete(&whole[..3_000], jpeg).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(check_complete(&whole[..whole.len() - 2], jpeg).is_err());
        assert!(
            check_complete(&whole[..100], jpeg).is_err(),
            "cut before the scan"
        );

        let loader = ImageLoader::new(ImageFolder::scan(root).unwrap(), 32, 0, Crop::Centre);
        let b = loader.gather(&[0, 1, 2, 3], 0).unwrap();
        // Reads skipped: 1-cut and then 2-cut for image 1, 2-cut again for image 2; each is
        // replaced by the next readable image, 3-ok.
        assert_eq!(loader.skipped(), 3);
        assert_eq!(b.len(), 4);
        let px = 3 * 32 * 32;
        assert_eq!(b.pixels[px..2 * px], b.pixels[3 * px..4 * px]);
        assert_eq!(b.pixels[2 * px..3 * px], b.pixels[3 * px..4 * px]);
        assert_ne!(b.pixels[..px], b.pixels[3 * px..4 * px]);
    }

    #[test]
    fn an_empty_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.txt"), b"").unwrap();
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no .jpg"), "{err}");
    }
}
