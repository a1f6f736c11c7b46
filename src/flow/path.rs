//! The linear (rectified-flow) path of METHOD.md section 1: `z_t = (1 - t) eps + t x`, target `u = x - eps`.

use burn::prelude::*;
use rand::RngExt;
use rand_distr::StandardNormal;

use crate::rng::Rng;

/// One (t, eps) draw per row: t ~ U[0, 1], eps ~ N(0, I) (METHOD.md section 1).
#[derive(Debug, Clone)]
pub struct PathDraws {
    /// `[batch]`
    pub t: Tensor<1>,
    /// `[batch, d]`
    pub eps: Tensor<2>,
}

impl PathDraws {
    /// Draws `batch` pairs of dimension `d` from `rng` (on the host, so every backend sees the same numbers).
    pub fn sample(rng: &mut Rng, batch: usize, d: usize, device: &Device) -> Self {
        let t: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
        Self::with_times(rng, t, d, device)
    }

    /// Draws eps for the given times.
    pub fn with_times(rng: &mut Rng, t: Vec<f32>, d: usize, device: &Device) -> Self {
        let batch = t.len();
        let eps = normal_rows(rng, batch, d);
        PathDraws {
            t: Tensor::from_data(TensorData::new(t, [batch]), device),
            eps: Tensor::from_data(TensorData::new(eps, [batch, d]), device),
        }
    }
}

/// `mc` (t, eps) draws for each of `n` rows, on the host, in the order [`PathDraws::sample`] draws
/// them for the rows repeated `mc` times (`repeat_dim(0, mc)`: draw `c * n + r` belongs to copy `c`
/// of row `r`), so any contiguous range of rows can take its own draws to another device.
#[derive(Debug, Clone)]
pub struct HostDraws {
    pub n: usize,
    pub d: usize,
    pub mc: usize,
    t: Vec<f32>,
    eps: Vec<f32>,
}

impl HostDraws {
    pub fn sample(rng: &mut Rng, n: usize, d: usize, mc: usize) -> HostDraws {
        let t: Vec<f32> = (0..n * mc).map(|_| rng.random::<f32>()).collect();
        let eps = normal_rows(rng, n * mc, d);
        HostDraws { n, d, mc, t, eps }
    }

    /// The draws of rows `rows` (all `mc` copies, copy-major) on `device`.
    pub fn shard(&self, rows: std::ops::Range<usize>, device: &Device) -> PathDraws {
        let (n, d) = (self.n, self.d);
        let (mut ts, mut es) = (Vec::new(), Vec::new());
        for c in 0..self.mc {
            ts.extend_from_slice(&self.t[c * n + rows.start..c * n + rows.end]);
            es.extend_from_slice(&self.eps[(c * n + rows.start) * d..(c * n + rows.end) * d]);
        }
        let m = rows.len() * self.mc;
        PathDraws {
            t: Tensor::from_data(TensorData::new(ts, [m]), device),
            eps: Tensor::from_data(TensorData::new(es, [m, d]), device),
        }
    }
}

/// `n x d` standard normal values, row-major.
pub fn normal_rows(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    (0..n * d).map(|_| rng.sample(StandardNormal)).collect()
}

/// The point on the path at time t.
///
/// # Shapes
/// - `x`, `eps`: `[batch, d]`; `t`: `[batch]`
/// - output: `[batch, d]`
pub fn interpolate(x: Tensor<2>, eps: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
    let t = t.unsqueeze_dim::<2>(1); // [batch, 1]
    eps * (-t.clone() + 1.0) + x * t
}

/// The target velocity `x - eps` of the linear path (independent of t).
pub fn target_velocity(x: Tensor<2>, eps: Tensor<2>) -> Tensor<2> {
    x - eps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tensor_to_rows;

    #[test]
    fn path_endpoints_are_noise_and_data() {
        let dev = Device::flex();
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]), &dev);
        let eps =
            Tensor::<2>::from_data(TensorData::new(vec![-1.0f32, 0.5, 0.0, 7.0], [2, 2]), &dev);
        let t0 = Tensor::<1>::zeros([2], &dev);
        let t1 = Tensor::<1>::ones([2], &dev);
        assert_eq!(
            tensor_to_rows(interpolate(x.clone(), eps.clone(), t0)),
            vec![-1.0, 0.5, 0.0, 7.0]
        );
        assert_eq!(
            tensor_to_rows(interpolate(x.clone(), eps.clone(), t1)),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let th = Tensor::<1>::from_data(TensorData::new(vec![0.25f32, 0.5], [2]), &dev);
        let mid = tensor_to_rows(interpolate(x.clone(), eps.clone(), th));
        assert_eq!(mid, vec![-0.5, 0.875, 1.5, 5.5]);
        // The path's time derivative is the target velocity.
        assert_eq!(
            tensor_to_rows(target_velocity(x, eps)),
            vec![2.0, 1.5, 3.0, -3.0]
        );
    }
}
