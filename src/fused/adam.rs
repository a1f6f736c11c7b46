//! Adam and AdamW (METHOD.md sections 5 and 6) in one pass over each parameter on the CPU.
//!
//! burn's optimiser updates a parameter in about a dozen tensor operations, each a pass over
//! memory; here the moments are updated in place and the new parameter written in the same pass,
//! split over the cores. Every value is rounded as burn's `Adam` / `AdamW` round it (same
//! operations in the same order), so the results are identical to theirs, and the state is
//! burn's `AdamState`: checkpoints of either optimiser load into the other.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::optim::{
    AdamConfig, AdamState, AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate,
    Optimizer,
};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::kernels::{Fresh, Out, multiversion};

/// The step's constants, computed as burn computes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta1`, `1 - beta2`.
    pub f1: f32,
    pub f2: f32,
    /// Adam: `m * m_scale / (sqrt(v) + eps_scaled)`; AdamW: `(m / bc1) / (sqrt(v / bc2) + eps)`.
    pub decoupled: bool,
    pub m_scale: f32,
    pub eps_scaled: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    /// The learning rate as f32 and the AdamW decay factor `1 - lr wd` (1 when none).
    pub lr: f32,
    pub decay: Option<f32>,
}

/// The fused update as a backend operation (flex only; optimiser tensors carry no autodiff).
#[backend_extension(Flex)]
pub trait AdamOps: Backend {
    /// Returns the new parameter and moments.
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The values of `t`, in place when it is the only owner, else a copy.
fn owned(t: FlexTensor) -> FlexTensor {
    let mut t = if t.as_slice::<f32>().is_some() && t.is_unique() {
        t
    } else {
        let shape = t.layout().shape().clone();
        let v: Vec<f32> = t
            .to_contiguous()
            .as_slice::<f32>()
            .expect("contiguous")
            .to_vec();
        FlexTensor::from_data(TensorData::new(v, shape))
    };
    // A unique contiguous tensor may still be a view into a larger buffer: keep it exact.
    if t.try_storage_mut::<f32>().map(|s| s.len()) != Some(t.layout().num_elements()) {
        let shape = t.layout().shape().clone();
        let v = t.as_slice::<f32>().expect("contiguous").to_vec();
        t = FlexTensor::from_data(TensorData::new(v, shape));
    }
    t
}

multiversion! {
    /// One chunk of the update: the moments in place, the new parameter into `out`.
    fn update(p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], out: &mut [Out], k: AdamStep) {
        let n = p.len();
        let (g, m, v, out) = (&g[..n], &mut m[..n], &mut v[..n], &mut out[..n]);
        for i in 0..n {
            let gi = g[i];
            let mi = m[i] * k.beta1 + gi * k.f1;
            let vi = v[i] * k.beta2 + (gi * gi) * k.f2;
            m[i] = mi;
            v[i] = vi;
            let u = if k.decoupled {
                (mi / k.bc1) / ((vi / k.bc2).sqrt() + k.eps)
            } else {
                (mi * k.m_scale) / (vi.sqrt() + k.eps_scaled)
            };
            let base = match k.decay {
                Some(d) => p[i] * d,
                None => p[i],
            };
            out[i].write(base - u * k.lr);
        }
    }
}

impl AdamOps for Flex {
    fn adam_update(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        step: AdamStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = param.layout().shape().clone();
        let n = shape.num_elements();
        let param = if param.as_slice::<f32>().is_some() {
            param
        } else {
            param.to_contiguous()
        };
        let grad = if grad.as_slice::<f32>().is_some() {
            grad
        } else {
            grad.to_contiguous()
        };
        let mut m = owned(moment_1);
        let mut v = owned(moment_2);
        let mut out = Fresh::new(n);
        {
            let p = param.as_slice::<f32>().expect("contiguous");
            let g = grad.as_slice::<f32>().expect("contiguous");
            let mm = m.try_storage_mut::<f32>().expect("owned");
            let vv = v.try_storage_mut::<f32>().expect("owned");
            if n >= 2 * CHUNK && rayon::current_num_threads() > 1 {
                out.out()
                    .par_chunks_mut(CHUNK)
                    .zip(mm.par_chunks_mut(CHUNK))
                    .zip(vv.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(i, ((o, mc), vc))| {
                        let r = i * CHUNK..i * CHUNK + o.len();
                        update(&p[r.clone()], &g[r], mc, vc, o, step);
                    });
            } else {
                update(p, g, mm, vv, out.out(), step);
            }
        }
        // SAFETY: the chunks cover every element and `update` writes each.
        let out = unsafe { out.assume_init() };
        (FlexTensor::from_data(TensorData::new(out, shape)), m, v)
    }
}

/// Adam (`weight_decay` 0) or AdamW in one pass per parameter on burn's flex CPU device, and
/// burn's own `Adam` / `AdamW` everywhere else.
#[derive(Clone)]
pub struct FusedAdam {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    adam: burn::optim::Adam,
    adamw: AdamW,
}

impl FusedAdam {
    /// Adam(W) with PyTorch's formulas; `weight_decay` 0 is plain Adam, above 0 AdamW's decoupled
    /// decay (METHOD.md section 6).
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        FusedAdam {
            beta1,
            beta2,
            eps,
            weight_decay,
            adam: AdamConfig::new()
                .with_beta_1(beta1)
                .with_beta_2(beta2)
                .with_epsilon(eps)
                .build(),
            adamw: AdamWConfig::new()
                .with_beta_1(beta1)
                .with_beta_2(beta2)
                .with_epsilon(eps)
                .with_weight_decay(weight_decay)
                .build(),
        }
    }

    /// The constants of step number `time` (1-based), computed in burn's order and precision.
    fn constants(&self, time: usize, lr: LearningRate) -> AdamStep {
        let t = time as i32;
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let decay_rate = lr * self.weight_decay as f64;
        AdamStep {
            beta1: self.beta1,
            beta2: self.beta2,
            f1: 1.0 - self.beta1,
            f2: 1.0 - self.beta2,
            decoupled: self.weight_decay > 0.0,
            m_scale: bc2_sqrt / (1.0 - self.beta1.powi(t)),
            eps_scaled: self.eps * bc2_sqrt,
            bc1: 1f32 - self.beta1.powi(t),
            bc2: 1f32 - self.beta2.powi(t),
            eps: self.eps,
            lr: lr as f32,
            decay: (self.weight_decay > 0.0 && decay_rate != 0.0)
                .then_some((1.0 - decay_rate) as f32),
        }
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        let fusable = super::supports(&tensor.device(), tensor.dtype())
            && grad.dtype() == DType::F32
            && state.as_ref().is_none_or(|s| {
                s.momentum.max_moment_2.is_none()
                    && s.momentum.moment_1.dtype() == DType::F32
                    && s.momentum.moment_2.dtype() == DType::F32
            });
        if !fusable {
            return if self.weight_decay > 0.0 {
                let state = state.map(|s| AdamWState {
                    momentum: s.momentum,
                });
                let (t, s) = self.adamw.step(lr, tensor, grad, state);
                (t, s.map(|s| AdamState::new(s.momentum)))
            } else {
                self.adam.step(lr, tensor, grad, state)
            };
        }
        // A first step is a step from zero moments: `0 * beta + x = x` exactly.
        let (time, m, v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                s.momentum.moment_1,
                s.momentum.moment_2,
            ),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let (p, m, v) = <Dispatch as AdamOps>::adam_update(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            self.constants(time, lr),
        );
        let momentum =
            AdaptiveMomentumState::new(time, Tensor::from_dispatch(m), Tensor::from_dispatch(v));
        (Tensor::from_dispatch(p), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: AdamState<D>, device: &Device) -> AdamState<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
