//! Small statistics used in reports: correlations and smoothing.

/// Pearson correlation of two equally long series (f64 accumulation); NaN when either is constant.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "pearson needs series of equal length");
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// Ranks starting at 0, ties sharing their average rank.
pub fn ranks(v: &[f32]) -> Vec<f32> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0f32; v.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && v[idx[end]] == v[idx[start]] {
            end += 1;
        }
        let avg = (start + end - 1) as f32 / 2.0;
        for &i in &idx[start..end] {
            out[i] = avg;
        }
        start = end;
    }
    out
}

/// Spearman rank correlation (Pearson of average ranks).
pub fn spearman(a: &[f32], b: &[f32]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Centred moving average of odd `window`, shrinking at the ends so the output keeps the input's length.
pub fn moving_average(v: &[f32], window: usize) -> Vec<f32> {
    let half = window / 2;
    let mut prefix = vec![0.0f64; v.len() + 1];
    for (i, &x) in v.iter().enumerate() {
        prefix[i + 1] = prefix[i] + x as f64;
    }
    (0..v.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(v.len());
            ((prefix[hi] - prefix[lo]) / (hi - lo) as f64) as f32
        })
        .collect()
}

/// Mean and standard error of the mean.
pub fn mean_sem(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_on_known_series() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [2.0, 4.0, 6.0, 8.0, 10.0];
        assert!((pearson(&a, &b) - 1.0).abs() < 1e-12);
        let c = [1.0, 8.0, 27.0, 64.0, 125.0];
        assert!((spearman(&a, &c) - 1.0).abs() < 1e-12);
        assert!(pearson(&a, &c) < 0.99);
        let d = [5.0, 4.0, 3.0, 2.0, 1.0];
        assert!((spearman(&a, &d) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn ties_share_average_rank() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![2.5, 0.0, 2.5, 1.0]);
    }

    #[test]
    fn moving_average_keeps_length_and_smooths() {
        let v: Vec<f32> = (0..40)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let s = moving_average(&v, 17);
        assert_eq!(s.len(), v.len());
        assert!(s[20].abs() < 0.1);
    }
}
