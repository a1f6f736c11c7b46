//! torch-fidelity's image input: uint8 RGB pixels, resized to 299 x 299 by TensorFlow 1.x's bilinear
//! rule, then `(x - 128) / 128` (METHOD.md section 8); and the image sets it reads (a folder of
//! PNG/JPEG files, or the `arr_0` images of an ADM-style `.npz`), streamed in batches.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::inception::INPUT_SIZE;
use crate::error::{Error, Result};

/// Float pixels in [0, 1] to uint8 as the paper's sampler saves them, `round(clip(x * 255, 0,
/// 255))` with numpy's rounding (half to even), so an in-memory evaluation sees the bytes of the
/// PNG it would have written.
pub fn unit_to_uint8(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        // NaN clamps to NaN and casts to 0, as numpy's astype(uint8) does on x86.
        .map(|&v| (v * 255.0).clamp(0.0, 255.0).round_ties_even() as u8)
        .collect()
}

/// TensorFlow 1.x's bilinear resize (`tf.image.resize_bilinear`, `align_corners=False`) of one
/// `[channels, h, w]` uint8 image to `[channels, out, out]` f32, as torch-fidelity's
/// `interpolate_bilinear_2d_like_tensorflow1x` computes it (its exact "slow" path), bit for bit.
///
/// Unlike PyTorch's `align_corners=False` there is no half-pixel offset: output pixel `i` samples the
/// input at `src = i * (in / out)` (the scale rounded to f32, the product in f32), between
/// `lo = floor(src)` and `hi = min(lo + 1, in - 1)` with weight `src - lo`; rows then columns are
/// blended as `a + (b - a) * w` in f32. The image is therefore shifted by half an input pixel
/// against a centred resize, and the last output rows repeat the edge when upsampling.
pub fn resize_tf1(image: &[u8], channels: usize, (h, w): (usize, usize), out: usize) -> Vec<f32> {
    assert_eq!(
        image.len(),
        channels * h * w,
        "[{channels}, {h}, {w}] pixels"
    );
    // One axis: (lo, hi, weight) per output index.
    let taps = |n_in: usize| -> Vec<(usize, usize, f32)> {
        // torch-fidelity: scale = in / out in Python floats, then torch.tensor(scale, float32).
        let scale = (n_in as f64 / out as f64) as f32;
        (0..out)
            .map(|i| {
                let src = i as f32 * scale;
                // Non-negative, so the truncation of `.long()` is the floor.
                let lo = src as usize;
                (lo, (lo + 1).min(n_in - 1), src - lo as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h), taps(w));
    let mut result = vec![0.0f32; channels * out * out];
    for c in 0..channels {
        let plane = &image[c * h * w..(c + 1) * h * w];
        let px = |y: usize, x: usize| f32::from(plane[y * w + x]);
        for (oy, &(y0, y1, dy)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, dx)) in tx.iter().enumerate() {
                let (p00, p01) = (px(y0, x0), px(y0, x1));
                let (p10, p11) = (px(y1, x0), px(y1, x1));
                let top = p00 + (p01 - p00) * dx;
                let bottom = p10 + (p11 - p10) * dx;
                result[(c * out + oy) * out + ox] = top + (bottom - top) * dy;
            }
        }
    }
    result
}

/// One uint8 `[3, h, w]` image to the network's input `[3, 299, 299]`: [`resize_tf1`], then
/// `(x - 128) / 128` (torch-fidelity's form, bit-exact with the graph's `(x - 128) * 0.0078125`).
pub fn network_input(image: &[u8], (h, w): (usize, usize)) -> Vec<f32> {
    let mut x = resize_tf1(image, 3, (h, w), INPUT_SIZE);
    for v in &mut x {
        *v = (*v - 128.0) / 128.0;
    }
    x
}

/// A batch of uint8 images `[n, 3, h, w]` (e.g. [`unit_to_uint8`] of decoded samples) to the
/// network's input `[n, 3, 299, 299]` ([`network_input`] per image, in parallel).
pub fn network_batch(images: &[u8], (h, w): (usize, usize)) -> Vec<f32> {
    let per = 3 * h * w;
    assert!(
        per > 0 && images.len().is_multiple_of(per),
        "images of [3, {h}, {w}] pixels"
    );
    images
        .par_chunks(per)
        .flat_map_iter(|img| network_input(img, (h, w)))
        .collect()
}

/// A set of images to score, read in order.
#[derive(Debug, Clone)]
pub enum ImageSet {
    /// PNG/JPEG files, sorted by path (torch-fidelity's order, which fixes its IS and KID draws).
    Files { root: PathBuf, files: Vec<PathBuf> },
    /// The `arr_0` array of an `.npz` (ADM's sample and reference batches): uint8 `[n, h, w, 3]`.
    Npz {
        path: PathBuf,
        count: usize,
        height: usize,
        width: usize,
    },
}

/// The extensions torch-fidelity reads (`samples_find_ext`), compared without case.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

impl ImageSet {
    /// The images of a folder, or of the `arr_0` array of an `.npz`.
    ///
    /// A folder's PNG/JPEG files (any case of `.png`, `.jpg`, `.jpeg`) directly inside it, or with
    /// `recursive` in all its subfolders too (torch-fidelity's `samples_find_deep`), sorted by path.
    pub fn open(path: &Path, recursive: bool) -> Result<ImageSet> {
        if !path.exists() {
            return Err(Error::input(
                path,
                "does not exist; give a folder of PNG/JPEG images or an .npz",
            ));
        }
        if path.is_dir() {
            return ImageSet::folder(path, recursive);
        }
        if path.extension().and_then(|e| e.to_str()) == Some("npz") {
            let (count, height, width) = npz_images_shape(path)?.ok_or_else(|| {
                Error::input(
                    path,
                    "has no arr_0 array of images; give a folder of PNG/JPEG images or an .npz with arr_0 uint8 [n, h, w, 3]",
                )
            })?;
            return Ok(ImageSet::Npz {
                path: path.to_path_buf(),
                count,
                height,
                width,
            });
        }
        Err(Error::input(
            path,
            "is neither a folder nor an .npz; give a folder of PNG/JPEG images or an .npz with arr_0",
        ))
    }

    fn folder(root: &Path, recursive: bool) -> Result<ImageSet> {
        let walker = walkdir::WalkDir::new(root)
            .follow_links(true)
            .max_depth(if recursive { usize::MAX } else { 1 });
        let mut files = Vec::new();
        for entry in walker {
            let entry = entry.map_err(|e| {
                Error::input(
                    root,
                    format!("could not list the folder ({e}); check its permissions"),
                )
            })?;
            let is_image = entry.file_type().is_file()
                && entry
                    .path()
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image {
                files.push(entry.into_path());
            }
        }
        if files.is_empty() {
            let hint = if recursive {
                ""
            } else {
                " (images in subfolders are read only when asked to recurse)"
            };
            return Err(Error::input(
                root,
                format!("holds no .png, .jpg or .jpeg images{hint}"),
            ));
        }
        // Python sorts paths as strings, that is by code point: the order of their UTF-8 bytes.
        files.sort_by(|a, b| {
            a.as_os_str()
                .as_encoded_bytes()
                .cmp(b.as_os_str().as_encoded_bytes())
        });
        Ok(ImageSet::Files {
            root: root.to_path_buf(),
            files,
        })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        match self {
            ImageSet::Files { files, .. } => files.len(),
            ImageSet::Npz { count, .. } => *count,
        }
    }

    /// Whether the set is empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The folder or file the set was opened from.
    pub fn path(&self) -> &Path {
        match self {
            ImageSet::Files { root, .. } => root,
            ImageSet::Npz { path, .. } => path,
        }
    }

    /// Whether any file is a JPEG (decoders differ from PIL's by a grey level here and there).
    pub fn has_lossy(&self) -> bool {
        match self {
            ImageSet::Files { files, .. } => files.iter().any(|f| {
                f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg")
                })
            }),
            ImageSet::Npz { .. } => false,
        }
    }

    /// Calls `each` with consecutive batches of at most `batch` network-ready images
    /// (`[n, 3, 299, 299]` f32, see [`network_input`]), in order. Only one batch of pixels is held at a
    /// time. The first unreadable image stops the pass with an error naming it.
    pub fn for_each_batch(
        &self,
        batch: usize,
        mut each: impl FnMut(Vec<f32>, usize) -> Result<()>,
    ) -> Result<()> {
        let batch = batch.max(1);
        match self {
            ImageSet::Files { files, .. } => {
                for chunk in files.chunks(batch) {
                    let images: Vec<Vec<f32>> = chunk
                        .par_iter()
                        .map(|f| decode_file(f).map(|(px, hw)| network_input(&px, hw)))
                        .collect::<Result<_>>()?;
                    each(images.concat(), chunk.len())?;
                }
            }
            ImageSet::Npz {
                path,
                count,
                height,
                width,
            } => {
                let mut npz = open_npz(path)?;
                let npy = npz
                    .by_name("arr_0")
                    .map_err(|e| bad_npz(path, e))?
                    .ok_or_else(|| Error::input(path, "has no arr_0 array"))?;
                let (h, w) = (*height, *width);
                let per = h * w * 3;
                // Streamed straight from the archive: 10k ImageNet images are 2 GB.
                let mut reader = npy.into_inner();
                let mut raw = vec![0u8; per * batch];
                let mut start = 0;
                while start < *count {
                    let n = batch.min(count - start);
                    reader.read_exact(&mut raw[..n * per]).map_err(|e| {
                        Error::input(
                            path,
                            format!("arr_0 ends early at image {start} of {count} ({e}); is the file truncated?"),
                        )
                    })?;
                    let images: Vec<Vec<f32>> = raw[..n * per]
                        .par_chunks(per)
                        .map(|hwc| network_input(&hwc_to_chw(hwc, h, w), (h, w)))
                        .collect();
                    each(images.concat(), n)?;
                    start += n;
                }
            }
        }
        Ok(())
    }
}

/// `[h, w, 3]` to `[3, h, w]`.
fn hwc_to_chw(hwc: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut chw = vec![0u8; hwc.len()];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * h * w + i] = px[c];
        }
    }
    chw
}

/// Decodes one image file to uint8 RGB `[3, h, w]`, as PIL's `Image.open(path).convert("RGB")`:
/// grey levels are repeated, alpha is dropped (not composited), 16-bit samples are scaled to 8 bits.
pub fn decode_file(path: &Path) -> Result<(Vec<u8>, (usize, usize))> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::input(path, format!("could not open the image ({e})")))?
        .with_guessed_format()
        .map_err(|e| Error::input(path, format!("could not read the image ({e})")))?
        .decode()
        .map_err(|e| {
            Error::input(
                path,
                format!("is not a readable image ({e}); remove or re-encode it"),
            )
        })?
        .into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((hwc_to_chw(img.as_raw(), h, w), (h, w)))
}

pub(super) fn open_npz(path: &Path) -> Result<npyz::npz::NpzArchive<BufReader<File>>> {
    npyz::npz::NpzArchive::open(path).map_err(|e| bad_npz(path, e))
}

pub(super) fn bad_npz(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input(
        path,
        format!(
            "not a readable .npz archive ({e}); is it truncated? save it again with numpy.savez"
        ),
    )
}

/// `(n, h, w)` of an `.npz`'s `arr_0` when it holds uint8 `[n, h, w, 3]` images in C order; `None`
/// when there is no `arr_0`; an error when `arr_0` is something else.
pub(super) fn npz_images_shape(path: &Path) -> Result<Option<(usize, usize, usize)>> {
    let mut npz = open_npz(path)?;
    let Some(npy) = npz.by_name("arr_0").map_err(|e| bad_npz(path, e))? else {
        return Ok(None);
    };
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let is_u8 = matches!(npy.dtype(), npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Uint && t.size_field() == 1);
    match (is_u8, shape.as_slice(), npy.order()) {
        (true, &[n, h, w, 3], npyz::Order::C) if n > 0 && h > 0 && w > 0 => Ok(Some((n, h, w))),
        _ => Err(Error::input(
            path,
            format!(
                "arr_0 has dtype {} and shape {shape:?}; images must be uint8 [n, h, w, 3] in C order (as ADM's batches)",
                npy.dtype().descr()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLANE: usize = INPUT_SIZE * INPUT_SIZE;

    #[test]
    fn uint8_rounds_half_to_even_and_clips() {
        // numpy on float32: np.round(np.clip(x * 255, 0, 255)).astype(np.uint8); 0.3f32 * 255 is
        // exactly 76.5 in f32, so it rounds to 76.
        let x = [
            0.0,
            1.0,
            -0.2,
            1.7,
            0.5 / 255.0,
            1.5 / 255.0,
            2.5 / 255.0,
            0.3,
        ];
        assert_eq!(unit_to_uint8(&x), [0, 255, 0, 255, 0, 2, 2, 76]);
    }

    /// Hand-computed TF1 resizes: 2 -> 4 pixels samples at 0, 0.5, 1, 1.5 (no half-pixel offset, so
    /// the last sample clamps to the edge), where a centred resize would sample at -0.25, 0.25, 0.75,
    /// 1.25.
    #[test]
    fn tf1_resize_has_no_half_pixel_offset() {
        // One row [0, 100] -> [0, 50, 100, 100].
        let row = resize_tf1(&[0, 100, 0, 100], 1, (2, 2), 4);
        assert_eq!(&row[..4], &[0.0, 50.0, 100.0, 100.0]);
        // Rows interpolate the same way: 2 x 2 [[0, 100], [200, 40]] -> row 1 (src 0.5) is the mean
        // of the rows.
        let img = resize_tf1(&[0, 100, 200, 40], 1, (2, 2), 4);
        assert_eq!(&img[4..8], &[100.0, 85.0, 70.0, 70.0]);
        assert_eq!(&img[12..16], &[200.0, 120.0, 40.0, 40.0]);
        // Downsampling 4 -> 2: scale 2, samples at 0 and 2: pixels 0 and 2, no averaging.
        let down = resize_tf1(&[10, 20, 30, 40], 1, (1, 4), 2);
        assert_eq!(down, [10.0, 30.0, 10.0, 30.0]);
        // 3 -> 2: scale 1.5, samples 0 and 1.5: 10 and (20 + 30) / 2.
        let down = resize_tf1(&[10, 20, 30], 1, (1, 3), 2);
        assert_eq!(&down[..2], &[10.0, 25.0]);
        // Same size: the identity.
        let same: Vec<u8> = (0..27).map(|i| (i * 9) as u8).collect();
        let out = resize_tf1(&same, 3, (3, 3), 3);
        assert_eq!(out, same.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    }

    /// 64 -> 299, as torch-fidelity samples it: the scale 64/299 in f32 and products in f32.
    #[test]
    fn tf1_resize_to_299_follows_the_f32_grid() {
        let img: Vec<u8> = (0..64 * 64).map(|i| ((i % 64) * 4) as u8).collect();
        let out = resize_tf1(&img, 1, (64, 64), 299);
        let scale = (64.0f64 / 299.0) as f32;
        for ox in [0usize, 1, 7, 150, 297, 298] {
            let src = ox as f32 * scale;
            let lo = src.floor() as usize;
            let hi = (lo + 1).min(63);
            let (a, b) = ((lo * 4) as f32, (hi * 4) as f32);
            assert_eq!(out[ox], a + (b - a) * (src - lo as f32), "column {ox}");
        }
        // The last column samples 298 * 64/299 = 63.786: past the last pixel centre, so the edge.
        assert_eq!(out[298], 252.0);
        // A flat 2 x 2 image per channel: 128, 0 and 255 map to 0, -1 and 127/128.
        let flat: Vec<u8> = [128u8, 0, 255].iter().flat_map(|&v| [v; 4]).collect();
        let x = network_input(&flat, (2, 2));
        assert_eq!(x.len(), 3 * PLANE);
        assert_eq!((x[0], x[PLANE], x[2 * PLANE]), (0.0, -1.0, 127.0 / 128.0));
        let two: Vec<u8> = flat.iter().chain(&img[..12]).copied().collect();
        let batch = network_batch(&two, (2, 2));
        assert_eq!(&batch[..3 * PLANE], &x[..]);
        assert_eq!(&batch[3 * PLANE..], &network_input(&img[..12], (2, 2))[..]);
    }

    #[test]
    fn folders_list_images_sorted_and_refuse_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        for name in ["b.png", "a.PNG", "c.jpeg", "sub/d.png"] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            img.save_with_format(&p, image::ImageFormat::Png).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let set = ImageSet::open(dir.path(), false).unwrap();
        let ImageSet::Files { files, .. } = &set else {
            panic!("a folder")
        };
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.PNG", "b.png", "c.jpeg"]);
        assert_eq!(ImageSet::open(dir.path(), true).unwrap().len(), 4);
        let (px, hw) = decode_file(&files[0]).unwrap();
        assert_eq!(hw, (2, 3));
        assert_eq!(&px[..6], &[1; 6]);
        assert_eq!(&px[12..], &[3; 6]);

        let empty = tempfile::tempdir().unwrap();
        std::fs::create_dir(empty.path().join("class0")).unwrap();
        let msg = ImageSet::open(empty.path(), false).unwrap_err().to_string();
        assert!(
            msg.contains("no .png") && msg.contains("subfolders"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
    }
}
