//! Target feature tables (METHOD.md section 6, stage 1): a 2-D float tensor read from `.safetensors`, `.npy`
//! or `.npz` (f32, f16, bf16 or f64), checked, scaled by 1/std and projected to the latent dimension.
//!
//! Files are memory-mapped and converted to f32 in one pass, so a table costs one f32 copy in memory.

pub mod projection;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One tensor of a file: name, shape and dtype (as the file names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// A feature table: `rows` vectors of dimension `cols`, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTable {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl FeatureTable {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The standard deviation of all entries (f64 accumulation).
    pub fn std(&self) -> f64 {
        let n = self.data.len().max(1) as f64;
        let mean = self.data.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = self
            .data
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        var.sqrt()
    }

    /// Multiplies every entry by `s`.
    pub fn scale(&mut self, s: f32) {
        self.data.iter_mut().for_each(|v| *v *= s);
    }
}

/// Writes flat f32 rows `[rows, cols]` as a `.npy` file, atomically.
pub fn write_npy(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    use npyz::WriterBuilder as _;
    let mut bytes = Vec::new();
    let encode = |e: std::io::Error| Error::io(path, "encoding .npy failed", e);
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[rows as u64, cols as u64])
        .writer(&mut bytes)
        .begin_nd()
        .map_err(encode)?;
    w.extend(data.iter().copied()).map_err(encode)?;
    w.finish().map_err(encode)?;
    crate::files::write_atomic(path, &bytes)
}

/// What to do with rows holding NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// Refuse the table, naming how many rows and where.
    Refuse,
    /// Drop those rows with a warning.
    Drop,
}

/// The file format, from the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    Npy,
    Npz,
}

fn format(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") => Ok(Format::Safetensors),
        Some("npy") => Ok(Format::Npy),
        Some("npz") => Ok(Format::Npz),
        _ => Err(Error::input(
            path,
            "unknown feature file type; use .safetensors, .npy or .npz",
        )),
    }
}

/// The file and tensor a feature spec names: `FILE[:TENSOR]`, or a model on the Hugging Face hub,
/// `hf:ORG/NAME[@REV][/FILE][:TENSOR]`, resolved offline in the local hub cache (see [`crate::hub`]).
pub fn resolve_spec(spec: &str) -> Result<(PathBuf, Option<String>)> {
    if crate::hub::is_hub_id(spec) {
        crate::hub::resolve(spec)
    } else {
        Ok(parse_spec(spec))
    }
}

/// Splits `FILE[:TENSOR]`. A colon belongs to the file name when the whole string is an existing file.
pub fn parse_spec(spec: &str) -> (PathBuf, Option<String>) {
    if !Path::new(spec).exists()
        && let Some((file, tensor)) = spec.rsplit_once(':')
        && !file.is_empty()
    {
        return (PathBuf::from(file), Some(tensor.to_string()));
    }
    (PathBuf::from(spec), None)
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(path, "check the feature file's path", e))
}

/// Maps `path` into memory read-only.
fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = open(path)?;
    // SAFETY: the map is read-only and lives only while the table is converted; a file changed
    // underneath by another process would give wrong numbers, not memory unsafety in safe code we run
    // afterwards, since every value is copied out before the map is dropped.
    unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io(path, "check the feature file's path", e))
}

fn safetensors_dtype(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

fn npy_dtype(dtype: &npyz::DType) -> String {
    dtype.descr().trim_matches('\'').to_string()
}

/// Lists the tensors of a `.safetensors`, `.npy` or `.npz` file.
pub fn inspect(path: &Path) -> Result<Vec<TensorInfo>> {
    match format(path)? {
        Format::Safetensors => {
            let mmap = map(path)?;
            let st = parse_safetensors(path, &mmap)?;
            let mut out: Vec<TensorInfo> = st
                .iter()
                .map(|(name, view)| TensorInfo {
                    name: name.to_string(),
                    shape: view.shape().to_vec(),
                    dtype: safetensors_dtype(view.dtype()),
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        }
        Format::Npy => {
            let mmap = map(path)?;
            let npy = npyz::NpyFile::new(&mmap[..]).map_err(|e| bad_npy(path, e))?;
            Ok(vec![npy_info("(array)", &npy)])
        }
        Format::Npz => {
            let mut npz = open_npz(path)?;
            let names: Vec<String> = npz.array_names().map(str::to_string).collect();
            let mut out = Vec::new();
            for name in names {
                let npy = npz
                    .by_name(&name)
                    .map_err(|e| bad_npy(path, e))?
                    .ok_or_else(|| Error::input(path, format!("array {name} vanished")))?;
                out.push(npy_info(&name, &npy));
            }
            Ok(out)
        }
    }
}

fn npy_info<R: Read>(name: &str, npy: &npyz::NpyFile<R>) -> TensorInfo {
    TensorInfo {
        name: name.to_string(),
        shape: npy.shape().iter().map(|&d| d as usize).collect(),
        dtype: npy_dtype(&npy.dtype()),
    }
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::input(
            path,
            format!("not a readable safetensors file ({e}); is it truncated? download it again"),
        )
    })
}

fn bad_npy(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input(
        path,
        format!("not a readable numpy file ({e}); is it truncated? save it again with numpy.save"),
    )
}

fn open_npz(path: &Path) -> Result<npyz::npz::NpzArchive<std::io::BufReader<File>>> {
    open(path)?;
    npyz::npz::NpzArchive::open(path).map_err(|e| {
        Error::input(
            path,
            format!(
                "not a readable .npz archive ({e}); is it truncated? save it again with numpy.savez"
            ),
        )
    })
}

/// Picks the tensor to read: the one named, or the only 2-D one.
fn choose(path: &Path, infos: &[TensorInfo], name: Option<&str>) -> Result<String> {
    let list = || {
        infos
            .iter()
            .map(|t| format!("{} {:?} {}", t.name, t.shape, t.dtype))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) if infos.iter().any(|t| t.name == n) => Ok(n.to_string()),
        Some(n) => Err(Error::input(
            path,
            format!("no tensor named '{n}'; the file has: {}", list()),
        )),
        None => {
            let two_d: Vec<&TensorInfo> = infos.iter().filter(|t| t.shape.len() == 2).collect();
            match two_d.as_slice() {
                [one] => Ok(one.name.clone()),
                _ if infos.len() == 1 => Ok(infos[0].name.clone()),
                _ => Err(Error::input(
                    path,
                    format!(
                        "{} tensors; name one as FILE:TENSOR (the file has: {})",
                        infos.len(),
                        list()
                    ),
                )),
            }
        }
    }
}

fn check_shape(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [rows, cols] if rows > 0 && cols > 0 => Ok((rows, cols)),
        [_, _] => Err(Error::input(
            path,
            format!("tensor '{name}' is empty (shape {shape:?})"),
        )),
        _ => Err(Error::input(
            path,
            format!(
                "tensor '{name}' has shape {shape:?}; feature tables are 2-D [rows, dim]: reshape it \
                 (e.g. numpy x.reshape(-1, x.shape[-1])) and save it again"
            ),
        )),
    }
}

fn integer_dtype(path: &Path, name: &str, dtype: &str) -> Error {
    Error::input(
        path,
        format!(
            "tensor '{name}' has dtype {dtype}; features must be floating point (f32, f16, bf16 or f64)"
        ),
    )
}

/// Decodes little-endian floats of `dtype` into f32.
fn decode(bytes: &[u8], dtype: &str) -> Option<Vec<f32>> {
    Some(match dtype {
        "f32" | "<f4" => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "f16" | "<f2" => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "bf16" => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "f64" | "<f8" => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// Reads the 2-D float tensor `name` (or the file's only 2-D tensor) as f32 rows.
pub fn load(path: &Path, name: Option<&str>, non_finite: NonFinite) -> Result<FeatureTable> {
    let table = match format(path)? {
        Format::Safetensors => {
            let mmap = map(path)?;
            let st = parse_safetensors(path, &mmap)?;
            let infos: Vec<TensorInfo> = st
                .iter()
                .map(|(n, v)| TensorInfo {
                    name: n.to_string(),
                    shape: v.shape().to_vec(),
                    dtype: safetensors_dtype(v.dtype()),
                })
                .collect();
            let name = choose(path, &infos, name)?;
            let view = st
                .tensor(&name)
                .map_err(|e| Error::input(path, e.to_string()))?;
            let (rows, cols) = check_shape(path, &name, view.shape())?;
            let dtype = safetensors_dtype(view.dtype());
            let data =
                decode(view.data(), &dtype).ok_or_else(|| integer_dtype(path, &name, &dtype))?;
            FeatureTable { rows, cols, data }
        }
        Format::Npy => {
            let mmap = map(path)?;
            let npy = npyz::NpyFile::new(&mmap[..]).map_err(|e| bad_npy(path, e))?;
            read_npy(path, "(array)", npy)?
        }
        Format::Npz => {
            let infos = inspect(path)?;
            let name = choose(path, &infos, name)?;
            let mut npz = open_npz(path)?;
            let npy = npz
                .by_name(&name)
                .map_err(|e| bad_npy(path, e))?
                .ok_or_else(|| Error::input(path, format!("array {name} vanished")))?;
            read_npy(path, &name, npy)?
        }
    };
    check_finite(path, table, non_finite)
}

fn read_npy<R: Read>(path: &Path, name: &str, npy: npyz::NpyFile<R>) -> Result<FeatureTable> {
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let (rows, cols) = check_shape(path, name, &shape)?;
    let dtype = npy_dtype(&npy.dtype());
    let fortran = npy.order() == npyz::Order::Fortran;
    let data = match dtype.as_str() {
        "<f4" => npy.into_vec::<f32>(),
        "<f2" => npy
            .into_vec::<f16>()
            .map(|v| v.into_iter().map(f16::to_f32).collect()),
        "<f8" => npy
            .into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        other => return Err(integer_dtype(path, name, other)),
    }
    .map_err(|e| bad_npy(path, e))?;
    if data.len() != rows * cols {
        return Err(bad_npy(path, "fewer values than the header says"));
    }
    let data = if fortran {
        // Column-major on disk: transpose to rows.
        let mut t = vec![0.0; data.len()];
        for c in 0..cols {
            for r in 0..rows {
                t[r * cols + c] = data[c * rows + r];
            }
        }
        t
    } else {
        data
    };
    Ok(FeatureTable { rows, cols, data })
}

/// Refuses (or drops) rows with NaN or infinity, naming how many and the first few.
fn check_finite(path: &Path, table: FeatureTable, non_finite: NonFinite) -> Result<FeatureTable> {
    let bad: Vec<usize> = (0..table.rows)
        .filter(|&r| table.row(r).iter().any(|v| !v.is_finite()))
        .collect();
    if bad.is_empty() {
        return Ok(table);
    }
    let first: Vec<String> = bad.iter().take(5).map(usize::to_string).collect();
    let what = format!(
        "{} of {} rows hold NaN or infinity (rows {}{})",
        bad.len(),
        table.rows,
        first.join(", "),
        if bad.len() > 5 { ", ..." } else { "" }
    );
    match non_finite {
        NonFinite::Refuse => Err(Error::input_fixed_by(
            path,
            format!("{what}; fix the file or drop such rows (data.drop_nonfinite)"),
            "data.drop_nonfinite",
        )),
        NonFinite::Drop => {
            tracing::warn!("{}: {what}; dropping them", path.display());
            let mut keep = Vec::with_capacity(table.data.len());
            let mut rows = 0;
            for r in 0..table.rows {
                if bad.binary_search(&r).is_err() {
                    keep.extend_from_slice(table.row(r));
                    rows += 1;
                }
            }
            if rows == 0 {
                return Err(Error::input(path, "every row holds NaN or infinity"));
            }
            Ok(FeatureTable {
                rows,
                cols: table.cols,
                data: keep,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use npyz::WriterBuilder as _;
    use std::collections::HashMap;

    fn table() -> (Vec<f32>, usize, usize) {
        let (rows, cols) = (5, 3);
        (
            (0..rows * cols).map(|i| i as f32 * 0.25 - 1.0).collect(),
            rows,
            cols,
        )
    }

    fn write_npy<T: npyz::AutoSerialize>(
        path: &Path,
        shape: &[u64],
        order: npyz::Order,
        values: impl IntoIterator<Item = T>,
    ) {
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .order(order)
            .writer(File::create(path).unwrap())
            .begin_nd()
            .unwrap();
        w.extend(values).unwrap();
        w.finish().unwrap();
    }

    fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: HashMap<String, safetensors::tensor::TensorView> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn safetensors_f32_f16_bf16_read_back_and_integers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let (v, rows, cols) = table();
        let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16b: Vec<u8> = v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect();
        let i64b: Vec<u8> = (0..15i64).flat_map(|x| x.to_le_bytes()).collect();
        let shape = vec![rows, cols];
        write_safetensors(
            &path,
            &[
                ("a", Dtype::F32, shape.clone(), f32b),
                ("b", Dtype::F16, shape.clone(), f16b),
                ("c", Dtype::BF16, shape.clone(), bf16b),
                ("ids", Dtype::I64, shape.clone(), i64b),
                ("vec", Dtype::F32, vec![3], vec![0; 12]),
            ],
        );
        let infos = inspect(&path).unwrap();
        assert_eq!(infos.len(), 5);
        assert_eq!(infos[1].dtype, "f16");
        for name in ["a", "b", "c"] {
            let t = load(&path, Some(name), NonFinite::Refuse).unwrap();
            assert_eq!((t.rows, t.cols), (rows, cols));
            // Every value here is exact in f16 and bf16 (multiples of 1/4 below 4).
            assert_eq!(t.data, v, "{name}");
        }
        let e = load(&path, Some("ids"), NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("i64") && e.contains("floating point"), "{e}");
        let e = load(&path, Some("vec"), NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape [3]") && e.contains("2-D"), "{e}");
        let e = load(&path, Some("nope"), NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no tensor named 'nope'") && e.contains("a [5, 3] f32"),
            "{e}"
        );
        let e = load(&path, None, NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("FILE:TENSOR"), "{e}");
        // Truncated files are refused, not read half-way.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
        let e = load(&cut, Some("a"), NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn npy_and_npz_read_back_in_f32_f16_f64_and_fortran_order() {
        let dir = tempfile::tempdir().unwrap();
        let (v, rows, cols) = table();
        let shape = [rows as u64, cols as u64];
        let p32 = dir.path().join("a.npy");
        write_npy(&p32, &shape, npyz::Order::C, v.iter().copied());
        assert_eq!(load(&p32, None, NonFinite::Refuse).unwrap().data, v);
        assert_eq!(inspect(&p32).unwrap()[0].dtype, "<f4");

        let p16 = dir.path().join("h.npy");
        write_npy(
            &p16,
            &shape,
            npyz::Order::C,
            v.iter().map(|&x| f16::from_f32(x)),
        );
        assert_eq!(load(&p16, None, NonFinite::Refuse).unwrap().data, v);

        // Column-major on disk: the same table.
        let pf = dir.path().join("f.npy");
        let colmajor = (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r, c)))
            .map(|(r, c)| f64::from(v[r * cols + c]));
        write_npy(&pf, &shape, npyz::Order::Fortran, colmajor);
        assert_eq!(load(&pf, None, NonFinite::Refuse).unwrap().data, v);

        let pz = dir.path().join("z.npz");
        let mut npz = npyz::npz::NpzWriter::create(&pz).unwrap();
        let mut w = npz
            .array::<f32>("feats", Default::default())
            .unwrap()
            .default_dtype()
            .shape(&shape)
            .begin_nd()
            .unwrap();
        w.extend(v.iter().copied()).unwrap();
        w.finish().unwrap();
        let mut w = npz
            .array::<i32>("labels", Default::default())
            .unwrap()
            .default_dtype()
            .shape(&[rows as u64])
            .begin_nd()
            .unwrap();
        w.extend(0..rows as i32).unwrap();
        w.finish().unwrap();
        drop(npz);
        let names: Vec<String> = inspect(&pz).unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"feats".to_string()));
        // The only 2-D array is chosen without a name.
        assert_eq!(load(&pz, None, NonFinite::Refuse).unwrap().data, v);
        let e = load(&pz, Some("labels"), NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2-D"), "{e}");
    }

    #[test]
    fn non_finite_rows_are_refused_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.npy");
        let (mut v, rows, cols) = table();
        v[4] = f32::NAN; // row 1
        v[13] = f32::INFINITY; // row 4
        let shape = [rows as u64, cols as u64];
        write_npy(&path, &shape, npyz::Order::C, v.iter().copied());
        let e = load(&path, None, NonFinite::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 of 5 rows") && e.contains("rows 1, 4"), "{e}");
        assert!(e.contains("data.drop_nonfinite"), "{e}");
        let t = load(&path, None, NonFinite::Drop).unwrap();
        assert_eq!(t.rows, 3);
        assert!(t.data.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn feature_specs_split_at_the_last_colon() {
        assert_eq!(
            parse_spec("model.safetensors:model.embed_tokens.weight"),
            (
                PathBuf::from("model.safetensors"),
                Some("model.embed_tokens.weight".to_string())
            )
        );
        assert_eq!(parse_spec("feats.npy"), (PathBuf::from("feats.npy"), None));
    }
}
