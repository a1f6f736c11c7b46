//! Log-densities of the normalised targets (METHOD.md section 5): analytic mixtures and a Gaussian KDE.

use rayon::prelude::*;

use super::targets::{Point, Target};
use crate::rng::{Stream, rng_for};

/// Bandwidth of the KDE in normalised coordinates (METHOD.md section 5).
pub const KDE_BANDWIDTH: f32 = 0.1;
/// Reference samples of the KDE (METHOD.md section 5).
pub const KDE_SAMPLES: usize = 100_000;
/// Floor added to the KDE mean before the log (METHOD.md section 5).
const KDE_FLOOR: f64 = 1e-10;

/// The log-density `log p(x)` of a normalised target.
#[derive(Debug, Clone)]
pub enum Density {
    /// An isotropic Gaussian mixture with equal weights, in normalised coordinates.
    Mixture { means: Vec<Point>, std: f32 },
    /// A Gaussian kernel density estimate.
    Kde(Kde),
}

impl Density {
    /// The density METHOD.md section 5 prescribes for `target`: analytic for mog and grid, else a KDE on
    /// 100,000 normalised samples (the user's own points when there are fewer than that).
    pub fn for_target(target: &Target) -> Self {
        if let Some((means, std)) = target.kind().and_then(|k| k.mixture()) {
            let s = target.scale;
            return Density::Mixture {
                means: means.iter().map(|m| [m[0] / s, m[1] / s]).collect(),
                std: std / s,
            };
        }
        let refs = match target.points() {
            Some(p) if p.len() <= KDE_SAMPLES => p.to_vec(),
            _ => {
                let mut rng = rng_for(0, Stream::Reference, 1);
                target.sample(KDE_SAMPLES, &mut rng)
            }
        };
        Density::Kde(Kde::new(refs, KDE_BANDWIDTH))
    }

    /// Exact `log p(x)` at each point (the KDE sums every reference sample).
    pub fn log_prob(&self, points: &[Point]) -> Vec<f32> {
        match self {
            Density::Mixture { means, std } => points
                .iter()
                .map(|p| mixture_log_prob(p, means, *std))
                .collect(),
            Density::Kde(kde) => kde.log_prob(points),
        }
    }

    /// `log p(x)` for per-step monitoring: exact for mixtures, a binned KDE otherwise
    /// (within 0.03 nats of the exact KDE; see the tests).
    pub fn log_prob_fast(&self, points: &[Point]) -> Vec<f32> {
        match self {
            Density::Kde(kde) => kde.log_prob_binned(points),
            Density::Mixture { .. } => self.log_prob(points),
        }
    }

    /// Mean negative log-likelihood of `points` (exact).
    pub fn mean_nll(&self, points: &[Point]) -> f64 {
        mean_neg(&self.log_prob(points))
    }

    /// Mean negative log-likelihood for per-step monitoring (see [`Density::log_prob_fast`]).
    pub fn mean_nll_fast(&self, points: &[Point]) -> f64 {
        mean_neg(&self.log_prob_fast(points))
    }

    /// A short description of how the NLL is computed, for reports.
    pub fn method(&self) -> String {
        match self {
            Density::Mixture { .. } => {
                "analytic mixture density of the normalised variable (Jacobian included)".into()
            }
            Density::Kde(k) => format!(
                "Gaussian KDE on {} normalised samples, bandwidth {}",
                k.refs.len(),
                k.bandwidth
            ),
        }
    }
}

fn mean_neg(v: &[f32]) -> f64 {
    -v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

fn mixture_log_prob(p: &Point, means: &[Point], std: f32) -> f32 {
    let inv = 1.0 / (2.0 * (std as f64).powi(2));
    let logs: Vec<f64> = means
        .iter()
        .map(|m| {
            let d2 = ((p[0] - m[0]) as f64).powi(2) + ((p[1] - m[1]) as f64).powi(2);
            -d2 * inv
        })
        .collect();
    let max = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logs.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    let norm = (means.len() as f64).ln() + (2.0 * std::f64::consts::PI * (std as f64).powi(2)).ln();
    (lse - norm) as f32
}

/// A Gaussian KDE in 2D (METHOD.md section 5):
/// `log p(x) = log(mean_i exp(-||x - x_i||^2 / (2 h^2)) + 1e-10) - log(2 pi h^2)`.
#[derive(Debug, Clone)]
pub struct Kde {
    refs: Vec<Point>,
    bandwidth: f32,
    cells: CellList,
    binned: BinnedGrid,
}

/// Kernel terms beyond this many bandwidths are below 1e-16 and skipped: against the 1e-10 floor
/// and any nearer sample they change log p by less than 1e-6.
const KDE_CUTOFF: f32 = 8.6;

/// Reference samples bucketed into square cells of one bandwidth, for the truncated exact sum.
#[derive(Debug, Clone)]
struct CellList {
    origin: Point,
    size: f32,
    nx: usize,
    ny: usize,
    /// `points[start[c]..start[c + 1]]` lie in cell `c`.
    start: Vec<usize>,
    points: Vec<Point>,
}

impl CellList {
    fn new(refs: &[Point], size: f32) -> Self {
        let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
        for p in refs {
            for d in 0..2 {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
            }
        }
        let nx = ((hi[0] - lo[0]) / size).floor() as usize + 1;
        let ny = ((hi[1] - lo[1]) / size).floor() as usize + 1;
        let cell = |p: &Point| {
            let ix = (((p[0] - lo[0]) / size) as usize).min(nx - 1);
            let iy = (((p[1] - lo[1]) / size) as usize).min(ny - 1);
            iy * nx + ix
        };
        let mut start = vec![0usize; nx * ny + 1];
        for p in refs {
            start[cell(p) + 1] += 1;
        }
        for c in 0..nx * ny {
            start[c + 1] += start[c];
        }
        let mut fill = start.clone();
        let mut points = vec![[0.0; 2]; refs.len()];
        for p in refs {
            let c = cell(p);
            points[fill[c]] = *p;
            fill[c] += 1;
        }
        CellList {
            origin: lo,
            size,
            nx,
            ny,
            start,
            points,
        }
    }

    /// Sum of `exp(-||p - x_i||^2 * inv)` over samples within `radius` of `p`.
    fn kernel_sum(&self, p: &Point, radius: f32, inv: f32) -> f64 {
        let span = |v: f32, o: f32, n: usize| {
            let lo = ((v - radius - o) / self.size).floor();
            let hi = ((v + radius - o) / self.size).floor();
            if hi < 0.0 || lo > (n - 1) as f32 {
                None
            } else {
                Some((lo.max(0.0) as usize, (hi as usize).min(n - 1)))
            }
        };
        let (Some((x0, x1)), Some((y0, y1))) = (
            span(p[0], self.origin[0], self.nx),
            span(p[1], self.origin[1], self.ny),
        ) else {
            return 0.0;
        };
        let r2 = radius * radius;
        let mut sum = 0.0f64;
        for iy in y0..=y1 {
            let row = iy * self.nx;
            for r in &self.points[self.start[row + x0]..self.start[row + x1 + 1]] {
                let (dx, dy) = (p[0] - r[0], p[1] - r[1]);
                let d2 = dx * dx + dy * dy;
                if d2 < r2 {
                    sum += (-d2 * inv).exp() as f64;
                }
            }
        }
        sum
    }
}

impl Kde {
    /// A KDE over `refs` with bandwidth `h`.
    pub fn new(refs: Vec<Point>, bandwidth: f32) -> Self {
        let binned = BinnedGrid::new(&refs, bandwidth);
        let cells = CellList::new(&refs, bandwidth);
        Kde {
            refs,
            bandwidth,
            cells,
            binned,
        }
    }

    fn log_norm(&self) -> f64 {
        (2.0 * std::f64::consts::PI * (self.bandwidth as f64).powi(2)).ln()
    }

    /// Exact log-density (METHOD.md section 5), parallel over query points. Kernel terms beyond 8.6
    /// bandwidths (below 1e-16 each) are skipped; [`Kde::log_prob_full`] sums every sample.
    pub fn log_prob(&self, points: &[Point]) -> Vec<f32> {
        let inv = 1.0 / (2.0 * self.bandwidth * self.bandwidth);
        let radius = KDE_CUTOFF * self.bandwidth;
        let n = self.refs.len() as f64;
        let log_norm = self.log_norm();
        points
            .par_iter()
            .map(|p| {
                ((self.cells.kernel_sum(p, radius, inv) / n + KDE_FLOOR).ln() - log_norm) as f32
            })
            .collect()
    }

    /// The untruncated sum over every reference sample (the reference for tests).
    pub fn log_prob_full(&self, points: &[Point]) -> Vec<f32> {
        let inv = 1.0 / (2.0 * self.bandwidth * self.bandwidth);
        let n = self.refs.len() as f64;
        let log_norm = self.log_norm();
        points
            .par_iter()
            .map(|p| {
                let sum: f64 = self
                    .refs
                    .iter()
                    .map(|r| {
                        let dx = p[0] - r[0];
                        let dy = p[1] - r[1];
                        (-(dx * dx + dy * dy) * inv).exp() as f64
                    })
                    .sum();
                ((sum / n + KDE_FLOOR).ln() - log_norm) as f32
            })
            .collect()
    }

    /// Log-density from the binned grid: bilinear interpolation of a linearly binned KDE.
    pub fn log_prob_binned(&self, points: &[Point]) -> Vec<f32> {
        let log_norm = self.log_norm();
        points
            .iter()
            .map(|p| ((self.binned.density(p) + KDE_FLOOR).ln() - log_norm) as f32)
            .collect()
    }
}

/// Binned KDE (linear binning onto a lattice of spacing h/16, separable Gaussian convolution
/// truncated at 9 h), holding `mean_i exp(-||x - x_i||^2 / 2h^2)` at each node.
#[derive(Debug, Clone)]
struct BinnedGrid {
    origin: Point,
    step: f32,
    nx: usize,
    ny: usize,
    values: Vec<f64>, // [ny, nx]
}

impl BinnedGrid {
    fn new(refs: &[Point], h: f32) -> Self {
        let step = h / 16.0;
        let margin = 9.0 * h + 2.0 * step;
        let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
        for p in refs {
            for d in 0..2 {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
            }
        }
        let origin = [lo[0] - margin, lo[1] - margin];
        let nx = ((hi[0] - lo[0] + 2.0 * margin) / step).ceil() as usize + 1;
        let ny = ((hi[1] - lo[1] + 2.0 * margin) / step).ceil() as usize + 1;
        let mut counts = vec![0.0f64; nx * ny];
        for p in refs {
            let fx = (p[0] - origin[0]) / step;
            let fy = (p[1] - origin[1]) / step;
            let (ix, iy) = (fx.floor() as usize, fy.floor() as usize);
            let (wx, wy) = ((fx - ix as f32) as f64, (fy - iy as f32) as f64);
            counts[iy * nx + ix] += (1.0 - wx) * (1.0 - wy);
            counts[iy * nx + ix + 1] += wx * (1.0 - wy);
            counts[(iy + 1) * nx + ix] += (1.0 - wx) * wy;
            counts[(iy + 1) * nx + ix + 1] += wx * wy;
        }
        let radius = (9.0 * h / step).ceil() as isize;
        let kernel: Vec<f64> = (-radius..=radius)
            .map(|k| (-((k as f64 * step as f64).powi(2)) / (2.0 * (h as f64).powi(2))).exp())
            .collect();
        let convolve =
            |src: &[f64], stride_along: usize, len: usize, lines: usize, stride_across: usize| {
                let mut out = vec![0.0f64; src.len()];
                for line in 0..lines {
                    for i in 0..len {
                        let mut acc = 0.0;
                        for (k, w) in kernel.iter().enumerate() {
                            let j = i as isize + k as isize - radius;
                            if j >= 0 && (j as usize) < len {
                                acc += w * src[line * stride_across + j as usize * stride_along];
                            }
                        }
                        out[line * stride_across + i * stride_along] = acc;
                    }
                }
                out
            };
        let rows = convolve(&counts, 1, nx, ny, nx);
        let mut values = convolve(&rows, nx, ny, nx, 1);
        let n = refs.len() as f64;
        values.iter_mut().for_each(|v| *v /= n);
        BinnedGrid {
            origin,
            step,
            nx,
            ny,
            values,
        }
    }

    fn density(&self, p: &Point) -> f64 {
        let fx = (p[0] - self.origin[0]) / self.step;
        let fy = (p[1] - self.origin[1]) / self.step;
        if !(fx >= 0.0 && fy >= 0.0) || fx >= (self.nx - 1) as f32 || fy >= (self.ny - 1) as f32 {
            return 0.0;
        }
        let (ix, iy) = (fx as usize, fy as usize);
        let (wx, wy) = ((fx - ix as f32) as f64, (fy - iy as f32) as f64);
        let v = |x: usize, y: usize| self.values[y * self.nx + x];
        (1.0 - wy) * ((1.0 - wx) * v(ix, iy) + wx * v(ix + 1, iy))
            + wy * ((1.0 - wx) * v(ix, iy + 1) + wx * v(ix + 1, iy + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::targets::TargetKind;

    #[test]
    fn kde_converges_to_the_analytic_mixture() {
        // A KDE on many samples of mog approaches the true density convolved with the kernel;
        // where the density is not tiny the two agree closely.
        let target = Target::builtin(TargetKind::Mog);
        let exact = Density::for_target(&target);
        let mut rng = rng_for(11, Stream::Eval, 0);
        let refs = target.sample(100_000, &mut rng);
        let kde = Kde::new(refs, 0.05);
        let probe = target.sample(500, &mut rng);
        let a = exact.log_prob(&probe);
        let b = kde.log_prob(&probe);
        let mean_abs: f32 =
            a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        assert!(mean_abs < 0.1, "mean |log p_kde - log p| = {mean_abs}");
    }

    #[test]
    fn binned_kde_matches_exact_kde() {
        let target = Target::builtin(TargetKind::Moons);
        let Density::Kde(kde) = Density::for_target(&target) else {
            panic!("moons uses a KDE")
        };
        let mut rng = rng_for(5, Stream::Eval, 0);
        // Points on the data and in the empty space around it.
        let mut probe = target.sample(300, &mut rng);
        probe.extend((0..300).map(|i| [-3.0 + 0.02 * i as f32, 1.5 - 0.01 * i as f32]));
        let a = kde.log_prob(&probe);
        let b = kde.log_prob_binned(&probe);
        let max_abs = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max_abs < 0.03, "max |binned - exact| = {max_abs}");
    }

    #[test]
    fn truncated_kde_equals_the_full_sum() {
        let target = Target::builtin(TargetKind::Spiral);
        let Density::Kde(kde) = Density::for_target(&target) else {
            panic!("spiral uses a KDE")
        };
        let mut rng = rng_for(9, Stream::Eval, 0);
        let mut probe = target.sample(200, &mut rng);
        probe.extend((0..200).map(|i| [-4.0 + 0.04 * i as f32, 0.3 * (i as f32 * 0.1).sin()]));
        let a = kde.log_prob_full(&probe);
        let b = kde.log_prob(&probe);
        let max_abs = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max_abs < 1e-4, "max |truncated - full| = {max_abs}");
    }

    #[test]
    fn mixture_density_integrates_to_one() {
        let d = Density::for_target(&Target::builtin(TargetKind::Grid));
        let (lo, hi, n) = (-3.0f32, 3.0f32, 600);
        let step = (hi - lo) / n as f32;
        let pts: Vec<Point> = (0..n * n)
            .map(|k| {
                [
                    lo + (k % n) as f32 * step + step / 2.0,
                    lo + (k / n) as f32 * step + step / 2.0,
                ]
            })
            .collect();
        let mass: f64 = d
            .log_prob(&pts)
            .iter()
            .map(|l| (*l as f64).exp())
            .sum::<f64>()
            * (step as f64).powi(2);
        assert!((mass - 1.0).abs() < 1e-3, "mass {mass}");
    }
}
