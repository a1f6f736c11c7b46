//! The time modulation tabulated (METHOD.md section 4): a prior frozen for alignment, and the
//! training step's forward pass.
//!
//! Alignment and the bound estimates call a frozen network at a fresh random t for every row.
//! Each AdaLN block then computes its modulation `(shift, scale, gate)` from that row's time: a
//! `[C, 3C]` product per row and block, more than half of the network's arithmetic. The modulation
//! is a smooth function of the scalar t alone (the time embedding's frequencies are at most 1 over
//! [0, 1]), so a frozen prior computes it once on a grid of times and each row reads the cubic
//! through the four nearest grid points. The grid is refined until the interpolation error,
//! measured against the exact modulation between every pair of grid points, is within
//! [`REL_TOL`] of the largest modulation; past [`MAX_INTERVALS`] the prior stays exact. Only
//! burn's flex CPU device at f32 uses a table (the fused operations read it); elsewhere, and for
//! times outside [0, 1] or that take a gradient, the prior computes the modulation as usual.
//!
//! Training does the same within each step ([`training_velocity`]): the table is built from the
//! live parameters on the autodiff graph (a few dozen rows through the time MLP and the
//! modulations instead of one per batch row), checked against [`REL_TOL`] as above, and the
//! gradient of each table row flows back through the modulation layers and the time MLP. The
//! network trained is the exact one up to that tolerance: the gradient of a modulation weight is
//! the exact gradient of the interpolated network.

use burn::prelude::*;
use burn::tensor::DType;

use super::{VelocityField, VelocityMlp, tensor_to_rows};
use crate::fused::{self, kernels};

/// Largest interpolation error allowed, relative to the largest modulation value. The exact
/// computation's own rounding is about a tenth of it: on the paper's 512 x 4 toy prior after 100
/// steps, the table differs from the exact modulation by 1.4e-7 of 0.13 (1.1e-6) on every grid
/// from 32 to 4,096 intervals, so that difference is f32 rounding, not interpolation.
pub const REL_TOL: f32 = 1e-5;
/// The first grid: intervals over [0, 1].
pub const FIRST_INTERVALS: usize = 32;
/// The finest grid tried before the prior stays exact.
pub const MAX_INTERVALS: usize = 4096;

/// A velocity network whose parameters no longer change, ready to be called at many times.
#[derive(Debug, Clone)]
pub struct FrozenPrior {
    mlp: VelocityMlp,
    table: Option<Table>,
}

/// The modulations on a grid of `k` intervals: one `[k + 3, 3C]` tensor per block, then the final
/// layer's `[k + 3, 2C]` (row `j` at time `(j - 1) / k`).
#[derive(Debug, Clone)]
struct Table {
    k: usize,
    rows: Vec<Tensor<2>>,
    max_error: f32,
}

impl FrozenPrior {
    /// Freezes `mlp` (plain parameters, without autodiff), tabulating its modulation where that
    /// applies and meets [`REL_TOL`].
    pub fn new(mlp: VelocityMlp) -> Self {
        let table = tabulate(&mlp);
        match &table {
            Some(t) => tracing::debug!(
                "frozen prior: modulation tabulated on {} intervals (max error {:.2e})",
                t.k,
                t.max_error
            ),
            None => tracing::debug!("frozen prior: modulation computed per row"),
        }
        FrozenPrior { mlp, table }
    }

    /// Freezes `mlp` without a table: every call computes the modulation.
    pub fn exact(mlp: VelocityMlp) -> Self {
        FrozenPrior { mlp, table: None }
    }

    /// The network.
    pub fn mlp(&self) -> &VelocityMlp {
        &self.mlp
    }

    /// The table's intervals over [0, 1] and its measured largest error, when tabulated.
    pub fn table_info(&self) -> Option<(usize, f32)> {
        self.table.as_ref().map(|t| (t.k, t.max_error))
    }
}

impl VelocityField for FrozenPrior {
    fn velocity(&self, z: Tensor<2>, t: Tensor<1>) -> Tensor<2> {
        if let Some(table) = &self.table
            && !t.is_require_grad()
            && in_unit_interval(&t)
            && let Some(v) = self
                .mlp
                .forward_tabulated(z.clone(), t.clone(), &table.rows)
        {
            return v;
        }
        self.mlp.forward(z, t)
    }

    fn velocity_at(&self, z: Tensor<2>, t: f32) -> Tensor<2> {
        // One time for all rows: the modulation is computed once anyway.
        self.mlp.forward_at(z, t)
    }
}

fn in_unit_interval(t: &Tensor<1>) -> bool {
    let values: Vec<f32> = t
        .clone()
        .try_into_vec_as::<f32>()
        .expect("float tensors read back as f32");
    values.iter().all(|t| (0.0..=1.0).contains(t))
}

/// The fewest rows a training batch needs for a table to pay: building one runs about
/// `2 k + 3` rows through the time MLP and the modulations, for `k` intervals (at least
/// [`FIRST_INTERVALS`]).
pub const TRAINING_MIN_ROWS: usize = 4 * (FIRST_INTERVALS + 3);

/// Whether a training step of `rows` rows with parameters of `dtype` on `device` reads its
/// modulation from a table ([`training_velocity`], for times in [0, 1] and a grid within
/// [`REL_TOL`]): on the fused operations' device and dtype, from [`TRAINING_MIN_ROWS`] rows.
pub fn trains_through_table(device: &Device, dtype: DType, rows: usize) -> bool {
    rows >= TRAINING_MIN_ROWS && fused::supports(device, dtype)
}

/// The velocity of a network in training (parameters that take a gradient) with its modulation
/// read from a table built from the live parameters, on the autodiff graph, for this call; `None`
/// where no table applies (not [`trains_through_table`], times outside [0, 1] or taking a
/// gradient, no grid within [`REL_TOL`]), and the caller computes the velocity as usual.
///
/// # Shapes
/// - `z`: `[batch, d]`; `t`: `[batch]`; output `[batch, d]`
pub(crate) fn training_velocity(
    mlp: &VelocityMlp,
    z: Tensor<2>,
    t: Tensor<1>,
) -> Option<Tensor<2>> {
    let weight = mlp.time_fc1.weight.val();
    if !weight.is_require_grad()
        || t.is_require_grad()
        || !trains_through_table(&weight.device(), weight.dtype(), z.dims()[0])
        || !in_unit_interval(&t)
    {
        return None;
    }
    // The grid rows are computed once, on the graph; the check between them reads the same
    // parameters without autodiff.
    let table = fit(mlp, &mlp.valid())?;
    mlp.forward_tabulated(z, t, &table.rows)
}

/// The times of a table of `k` intervals: row `j` at `(j - 1) / k`.
fn grid(k: usize) -> Vec<f32> {
    (0..k + 3).map(|j| (j as f32 - 1.0) / k as f32).collect()
}

fn times(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device)
}

/// Builds the coarsest table within [`REL_TOL`], or `None` where none applies.
fn tabulate(mlp: &VelocityMlp) -> Option<Table> {
    let weight = mlp.time_fc1.weight.val();
    if weight.is_autodiff() || !fused::supports(&weight.device(), weight.dtype()) {
        return None;
    }
    fit(mlp, mlp)
}

/// The coarsest grid within [`REL_TOL`] (`None` past [`MAX_INTERVALS`] or for a modulation that
/// is not finite): its rows come from `mlp` (on its autodiff graph, if it has one; a grid that
/// fails the check leaves its rows unused), and the exact modulation midway between them from
/// `plain`, the same parameters without autodiff.
fn fit(mlp: &VelocityMlp, plain: &VelocityMlp) -> Option<Table> {
    let device = plain.time_fc1.weight.val().device();
    let mut k = FIRST_INTERVALS;
    while k <= MAX_INTERVALS {
        let mids: Vec<f32> = (0..k).map(|j| (j as f32 + 0.5) / k as f32).collect();
        let rows = mlp.modulations(times(grid(k), &mlp.time_fc1.weight.val().device()));
        let exact = plain.modulations(times(mids.clone(), &device));
        let (mut max_error, mut scale) = (0f32, 0f32);
        for (table, exact) in rows.iter().zip(exact) {
            let width = table.dims()[1];
            let exact = tensor_to_rows(exact);
            let mut interp = kernels::Fresh::new(mids.len() * width);
            kernels::table_rows(&tensor_to_rows(table.clone()), k, &mids, interp.out());
            // SAFETY: `table_rows` writes every element.
            let interp = unsafe { interp.assume_init() };
            for (a, b) in interp.iter().zip(&exact) {
                let error = (a - b).abs();
                if !error.is_finite() {
                    // A diverged prior: its modulation is not finite, so the table is useless.
                    return None;
                }
                max_error = max_error.max(error);
                scale = scale.max(b.abs());
            }
        }
        tracing::trace!("modulation table on {k} intervals: max error {max_error:e} of {scale:e}");
        if max_error <= REL_TOL * scale {
            return Some(Table { k, rows, max_error });
        }
        k *= 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::VelocityMlpConfig;
    use crate::flow::model::tests::{Perturb, SameGrads};
    use crate::flow::path::normal_rows;
    use crate::flow::rows_to_tensor;
    use crate::rng::{Stream, rng_for};
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use rand::RngExt;

    /// A network whose modulation is not zero (as a trained one's is not).
    fn random_prior(width: usize, depth: usize) -> VelocityMlp {
        let dev = Device::flex();
        let mut rng = rng_for(3, Stream::Init, 0);
        VelocityMlpConfig::new(2, width, depth)
            .init(&mut rng, &dev)
            .map(&mut Perturb(rng_for(4, Stream::Init, 0)))
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn the_tabulated_velocity_matches_the_exact_one_at_random_times() {
        if !fused::enabled() {
            return;
        }
        let mlp = random_prior(64, 2);
        let frozen = FrozenPrior::new(mlp.clone());
        let (k, err) = frozen
            .table_info()
            .expect("the flex device at f32 tabulates");
        assert!(k <= MAX_INTERVALS && err.is_finite());
        let dev = Device::flex();
        let mut rng = rng_for(5, Stream::Eval, 0);
        let n = 500;
        let mut t: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
        t[0] = 0.0;
        t[1] = 1.0;
        let z = rows_to_tensor(&normal_rows(&mut rng, n, 2), 2, &dev);
        let tt = Tensor::<1>::from_data(TensorData::new(t, [n]), &dev);
        let exact = tensor_to_rows(mlp.forward(z.clone(), tt.clone()));
        let table = tensor_to_rows(frozen.velocity(z, tt));
        let diff = max_rel_diff(&table, &exact);
        assert!(
            diff < 1e-4,
            "tabulated vs exact velocity: {diff:e} relative"
        );
    }

    #[test]
    fn training_through_a_table_matches_the_exact_network_and_its_gradients() {
        if !fused::enabled() {
            return;
        }
        let ad = Device::flex().autodiff();
        let mlp = VelocityMlpConfig::new(3, 48, 2)
            .init(&mut rng_for(3, Stream::Init, 0), &ad)
            .map(&mut Perturb(rng_for(4, Stream::Init, 0)));
        let mut rng = rng_for(7, Stream::Eval, 0);
        let n = TRAINING_MIN_ROWS + 13;
        let mut t: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
        t[0] = 0.0;
        t[1] = 1.0;
        let z = rows_to_tensor(&normal_rows(&mut rng, n, 3), 3, &ad);
        let tt = Tensor::<1>::from_data(TensorData::new(t, [n]), &ad);
        // One graph at a time: both passes share the parameters.
        let table = training_velocity(&mlp, z.clone(), tt.clone()).expect("a table applies");
        let a = tensor_to_rows(table.clone());
        let ga = GradientsParams::from_grads(table.powi_scalar(2).sum().backward(), &mlp);
        let exact = mlp.forward(z.clone(), tt.clone());
        let b = tensor_to_rows(exact.clone());
        let gb = GradientsParams::from_grads(exact.powi_scalar(2).sum().backward(), &mlp);
        assert!(b.iter().any(|v| v.abs() > 1e-2));
        let diff = max_rel_diff(&a, &b);
        assert!(diff < 1e-4, "table vs exact velocity: {diff:e} relative");
        let mut same = SameGrads {
            fused: &ga,
            plain: &gb,
            checked: 0,
        };
        mlp.visit(&mut same);
        assert_eq!(
            same.checked,
            6 + 2 * 8 + 4,
            "every parameter has a gradient"
        );
        // The trait's velocity takes the table; a small batch, or one outside [0, 1], does not.
        let via_trait = tensor_to_rows(mlp.velocity(z.clone(), tt.clone()));
        assert_eq!(via_trait, a);
        let few = z.clone().slice([0..TRAINING_MIN_ROWS - 1, 0..3]);
        let few_t = tt.clone().narrow(0, 0, TRAINING_MIN_ROWS - 1);
        assert!(training_velocity(&mlp, few, few_t).is_none());
        let outside = tt.add_scalar(0.5);
        assert!(training_velocity(&mlp, z.clone(), outside).is_none());
        let plain = Device::flex();
        let (z, t) = (
            rows_to_tensor(&normal_rows(&mut rng, n, 3), 3, &plain),
            Tensor::zeros([n], &plain),
        );
        assert!(
            training_velocity(&mlp.valid(), z, t).is_none(),
            "frozen parameters: no table"
        );
    }

    #[test]
    fn times_outside_the_unit_interval_and_autodiff_priors_stay_exact() {
        let mlp = random_prior(32, 1);
        let frozen = FrozenPrior::new(mlp.clone());
        let dev = Device::flex();
        let z = rows_to_tensor(&[0.1, -0.2, 0.3, 0.4], 2, &dev);
        let t = Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -0.25], [2]), &dev);
        let a = tensor_to_rows(frozen.velocity(z.clone(), t.clone()));
        let b = tensor_to_rows(mlp.forward(z, t));
        assert_eq!(a, b, "times outside [0, 1] take the exact path");
        let ad = VelocityMlpConfig::new(2, 16, 1)
            .init(&mut rng_for(0, Stream::Init, 0), &dev.autodiff());
        assert!(FrozenPrior::new(ad).table_info().is_none());
    }

    #[test]
    fn the_tabulated_gradient_of_the_input_matches_the_exact_one() {
        if !fused::enabled() {
            return;
        }
        let mlp = random_prior(48, 2);
        let frozen = FrozenPrior::new(mlp.clone());
        assert!(frozen.table_info().is_some());
        let ad = Device::flex().autodiff();
        let mut rng = rng_for(6, Stream::Eval, 0);
        let n = 64;
        let t: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
        let z0 = normal_rows(&mut rng, n, 2);
        let grad = |field: &dyn Fn(Tensor<2>, Tensor<1>) -> Tensor<2>| {
            let z = rows_to_tensor(&z0, 2, &ad).require_grad();
            let tt = Tensor::<1>::from_data(TensorData::new(t.clone(), [n]), &ad);
            let g = field(z.clone(), tt).powi_scalar(2).sum().backward();
            tensor_to_rows(z.grad(&g).expect("z requires grad"))
        };
        let exact = grad(&|z, t| mlp.forward(z, t));
        let table = grad(&|z, t| frozen.velocity(z, t));
        let diff = max_rel_diff(&table, &exact);
        assert!(
            diff < 1e-4,
            "tabulated vs exact input gradient: {diff:e} relative"
        );
    }
}
