//! Plain 2D data shared by the toy, the figures and the window: points and values on a regular grid.

use serde::Serialize;

/// A point of the 2D toy, `[x, y]` in normalised coordinates.
pub type Point = [f32; 2];

/// An axis-aligned plotting range: `((x_min, x_max), (y_min, y_max))`.
pub type Range2 = ((f32, f32), (f32, f32));

/// Values on a regular 2D grid: `values[iy * xs.len() + ix]` belongs to `(xs[ix], ys[iy])`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Heatmap {
    pub xs: Vec<f32>,
    pub ys: Vec<f32>,
    pub values: Vec<f32>,
}

impl Heatmap {
    /// The grid's points in `values` order.
    pub fn points(xs: &[f32], ys: &[f32]) -> Vec<Point> {
        ys.iter()
            .flat_map(|&y| xs.iter().map(move |&x| [x, y]))
            .collect()
    }

    /// `((x_min, x_max), (y_min, y_max))` of the grid.
    pub fn extent(&self) -> Range2 {
        let (x0, x1) = (self.xs[0], *self.xs.last().unwrap_or(&self.xs[0]));
        let (y0, y1) = (self.ys[0], *self.ys.last().unwrap_or(&self.ys[0]));
        ((x0, x1), (y0, y1))
    }

    /// The colour range: the 2nd to 98th percentile, so a few extreme cells do not wash out the map.
    pub fn colour_range(&self) -> (f32, f32) {
        let mut v: Vec<f32> = self
            .values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return (0.0, 1.0);
        }
        v.sort_by(f32::total_cmp);
        let q = |p: f32| v[((v.len() - 1) as f32 * p).round() as usize];
        let (lo, hi) = (q(0.0), q(0.98));
        if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
    }
}

/// `count` values evenly spaced over `[lo, hi]` (like numpy's linspace).
pub fn linspace(lo: f32, hi: f32, count: usize) -> Vec<f32> {
    if count == 1 {
        return vec![lo];
    }
    (0..count)
        .map(|i| lo + (hi - lo) * i as f32 / (count - 1) as f32)
        .collect()
}

/// Flat rows `[x0, y0, x1, y1, ...]` as points.
pub fn to_points(rows: &[f32]) -> Vec<Point> {
    rows.chunks_exact(2).map(|c| [c[0], c[1]]).collect()
}
