//! The 2D target distributions of METHOD.md section 5: samplers, the global normalisation and the user's points.

use std::f32::consts::PI;
use std::path::Path;

use rand::RngExt;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::grid::Point;
use crate::rng::{Rng, Stream, rng_for};

/// The built-in targets of METHOD.md section 5 (paper Fig. 3 and 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// 5 Gaussians (std 0.3) on a circle of radius 3.
    Mog,
    /// 4 x 4 Gaussians (std 0.1) on linspace(-1.5, 1.5, 4)^2.
    Grid,
    /// Two interleaved half circles.
    Moons,
    /// Three concentric rings.
    Rings,
    /// One spiral arm of three half turns.
    Spiral,
    /// A Swiss roll of three turns.
    Swissroll,
}

impl TargetKind {
    /// All built-in targets, in the order of the paper's Fig. 5 rows.
    pub const ALL: [TargetKind; 6] = [
        TargetKind::Mog,
        TargetKind::Grid,
        TargetKind::Moons,
        TargetKind::Rings,
        TargetKind::Spiral,
        TargetKind::Swissroll,
    ];

    /// The lowercase name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Mog => "mog",
            TargetKind::Grid => "grid",
            TargetKind::Moons => "moons",
            TargetKind::Rings => "rings",
            TargetKind::Spiral => "spiral",
            TargetKind::Swissroll => "swissroll",
        }
    }

    /// Gaussian-mixture parameters `(means, std)` in raw coordinates, for the analytic targets.
    pub fn mixture(self) -> Option<(Vec<Point>, f32)> {
        match self {
            TargetKind::Mog => {
                let means = (0..5)
                    .map(|k| {
                        let a = 2.0 * PI * k as f32 / 5.0;
                        [3.0 * a.cos(), 3.0 * a.sin()]
                    })
                    .collect();
                Some((means, 0.3))
            }
            TargetKind::Grid => {
                let c: Vec<f32> = (0..4).map(|i| -1.5 + i as f32).collect();
                let means = c
                    .iter()
                    .flat_map(|&x| c.iter().map(move |&y| [x, y]))
                    .collect();
                Some((means, 0.1))
            }
            _ => None,
        }
    }

    /// One raw (un-normalised) sample; `slot` in `0..n` of a batch of `n` picks the component
    /// where METHOD.md asks for equal counts (moons halves, rings).
    fn raw_sample(self, rng: &mut Rng, slot: usize, n: usize) -> Point {
        let normal = |rng: &mut Rng| -> f32 { rng.sample(StandardNormal) };
        match self {
            TargetKind::Mog | TargetKind::Grid => {
                let (means, std) = self.mixture().expect("mixture target");
                let m = means[rng.random_range(0..means.len())];
                [m[0] + std * normal(rng), m[1] + std * normal(rng)]
            }
            TargetKind::Moons => {
                let (x, y) = if slot < n / 2 {
                    let th = rng.random::<f32>() * PI;
                    (2.0 * th.cos(), 2.0 * th.sin())
                } else {
                    let th = PI + rng.random::<f32>() * PI;
                    (2.0 * th.cos() + 2.0, 2.0 * th.sin() - 0.5)
                };
                [x + 0.1 * normal(rng), y + 0.1 * normal(rng)]
            }
            TargetKind::Rings => {
                let ring = slot * 3 / n.max(1);
                let radius = 4.0 / 3.0 + ring as f32 * (4.0 - 4.0 / 3.0) / 2.0;
                let th = 2.0 * PI * rng.random::<f32>();
                let r = radius + 0.1 * normal(rng);
                [r * th.cos(), r * th.sin()]
            }
            TargetKind::Spiral => {
                let th = 3.0 * PI * rng.random::<f32>();
                let r = (0.5 + th / (2.0 * PI)).min(3.0);
                [
                    r * th.cos() + 0.1 * normal(rng),
                    r * th.sin() + 0.1 * normal(rng),
                ]
            }
            TargetKind::Swissroll => {
                let s = 6.0 * PI * rng.random::<f32>();
                let k = 2.0 * s / (2.0 * PI);
                [
                    k * s.cos() + 0.1 * normal(rng),
                    k * s.sin() + 0.1 * normal(rng),
                ]
            }
        }
    }

    /// The normalisation scale of METHOD.md section 5: the std over all coordinates of a large sample.
    ///
    /// Analytic for the mixtures; for the others a fixed-seed sample of 2,000,000 points, so the
    /// value is the same on every run and machine.
    pub fn scale(self) -> f32 {
        match self {
            TargetKind::Mog => (9.0f64 / 2.0 + 0.09).sqrt() as f32,
            // Means take +-0.5 and +-1.5 with equal weight: E[m^2] = 1.25, plus 0.1^2.
            TargetKind::Grid => (1.25f64 + 0.01).sqrt() as f32,
            _ => {
                let n = 2_000_000;
                let mut rng = rng_for(0, Stream::Reference, self as u64 + 1000);
                let pts: Vec<Point> = (0..n).map(|i| self.raw_sample(&mut rng, i, n)).collect();
                global_std(&pts)
            }
        }
    }
}

/// The std over all coordinates of `points` (one scalar, f64 accumulation).
pub fn global_std(points: &[Point]) -> f32 {
    let flat = points.as_flattened();
    let n = flat.len() as f64;
    let mean = flat.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = flat.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    var.sqrt() as f32
}

/// A target distribution in normalised coordinates (METHOD.md section 5: divided by one global std).
#[derive(Debug, Clone)]
pub struct Target {
    /// Name used in files and plots.
    pub name: String,
    /// The global std the raw data was divided by.
    pub scale: f32,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Builtin(TargetKind),
    /// Normalised user points; sampling draws rows with replacement.
    Points(Vec<Point>),
}

impl Target {
    /// A built-in target.
    pub fn builtin(kind: TargetKind) -> Self {
        Target {
            name: kind.name().to_string(),
            scale: kind.scale(),
            source: Source::Builtin(kind),
        }
    }

    /// A target made of the user's raw points, normalised by their global std.
    pub fn from_points(name: impl Into<String>, raw: &[Point]) -> Result<Self> {
        if raw.len() < 2 {
            return Err(Error::setting(
                "points",
                format!("a custom target needs at least 2 points, got {}", raw.len()),
            ));
        }
        let scale = global_std(raw);
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::setting(
                "points",
                "the custom target's points all coincide (std is 0); give points that spread out",
            ));
        }
        let pts = raw.iter().map(|p| [p[0] / scale, p[1] / scale]).collect();
        Ok(Target {
            name: name.into(),
            scale,
            source: Source::Points(pts),
        })
    }

    /// Reads a 2-column CSV of raw points (header optional) and normalises it.
    pub fn from_csv(path: &Path) -> Result<Self> {
        let raw = read_points_csv(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Target::from_points(name, &raw).map_err(|e| Error::input(path, e.to_string()))
    }

    /// The built-in kind, if any.
    pub fn kind(&self) -> Option<TargetKind> {
        match self.source {
            Source::Builtin(k) => Some(k),
            Source::Points(_) => None,
        }
    }

    /// The user's normalised points, for a custom target.
    pub fn points(&self) -> Option<&[Point]> {
        match &self.source {
            Source::Points(p) => Some(p),
            Source::Builtin(_) => None,
        }
    }

    /// `n` fresh samples in normalised coordinates.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<Point> {
        match &self.source {
            Source::Builtin(kind) => (0..n)
                .map(|i| {
                    let p = kind.raw_sample(rng, i, n);
                    [p[0] / self.scale, p[1] / self.scale]
                })
                .collect(),
            Source::Points(pts) => (0..n)
                .map(|_| pts[rng.random_range(0..pts.len())])
                .collect(),
        }
    }
}

/// Reads a CSV of 2D points: two numeric columns (extra columns are an error), header optional.
pub fn read_points_csv(path: &Path) -> Result<Vec<Point>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "check the path of the points file", e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut points = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let line = i + 1;
        let rec = rec.map_err(|e| Error::input(path, format!("line {line}: {e}")))?;
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        if rec.len() < 2 {
            return Err(Error::input(
                path,
                format!(
                    "line {line} has {} column(s); the file needs 2 columns x,y",
                    rec.len()
                ),
            ));
        }
        if rec.len() > 2 {
            return Err(Error::input(
                path,
                format!(
                    "line {line} has {} columns; the file needs exactly 2 columns x,y",
                    rec.len()
                ),
            ));
        }
        let parsed: Vec<Result<f32, _>> = rec.iter().map(str::parse::<f32>).collect();
        match (&parsed[0], &parsed[1]) {
            (Ok(x), Ok(y)) => {
                if !x.is_finite() || !y.is_finite() {
                    return Err(Error::input(
                        path,
                        format!(
                            "line {line} holds a non-finite value ({x}, {y}); remove or fix that row"
                        ),
                    ));
                }
                points.push([*x, *y]);
            }
            // A non-numeric first row is a header.
            _ if line == 1 => continue,
            _ => {
                return Err(Error::input(
                    path,
                    format!(
                        "line {line} is not two numbers: {:?}; every row after the header must be x,y",
                        rec.iter().collect::<Vec<_>>()
                    ),
                ));
            }
        }
    }
    if points.len() < 2 {
        return Err(Error::input(
            path,
            format!(
                "holds {} point(s); a custom target needs at least 2 rows of x,y",
                points.len()
            ),
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_constants_match_spec() {
        // METHOD.md section 5 reference values.
        let expect = [
            (TargetKind::Mog, 2.1424, 1e-4),
            (TargetKind::Grid, 1.1226, 1e-3),
            (TargetKind::Moons, 1.803, 5e-3),
            (TargetKind::Rings, 2.038, 5e-3),
            (TargetKind::Spiral, 0.934, 5e-3),
            (TargetKind::Swissroll, 2.446, 5e-3),
        ];
        for (kind, want, tol) in expect {
            let got = kind.scale();
            assert!(
                (got - want).abs() < tol,
                "{}: scale {got} vs METHOD.md {want}",
                kind.name()
            );
        }
    }

    #[test]
    fn samples_are_normalised_to_unit_std() {
        for kind in TargetKind::ALL {
            let t = Target::builtin(kind);
            let mut rng = rng_for(7, Stream::Prior, 0);
            let s = t.sample(200_000, &mut rng);
            let std = global_std(&s);
            assert!((std - 1.0).abs() < 0.02, "{}: std {std}", kind.name());
        }
    }

    #[test]
    fn mixture_sampler_matches_empirical_scale() {
        let mut rng = rng_for(3, Stream::Reference, 0);
        let n = 400_000;
        let raw: Vec<Point> = (0..n)
            .map(|i| TargetKind::Grid.raw_sample(&mut rng, i, n))
            .collect();
        assert!((global_std(&raw) - TargetKind::Grid.scale()).abs() < 5e-3);
    }
}
