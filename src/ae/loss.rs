//! The autoencoder's loss terms (METHOD.md section 6), shared by its training step and by the
//! discriminator's: the frozen networks they read, the hinge losses, LeCAM, consistency
//! regularisation, and PSNR. The alignment term is [`crate::align::align_loss_with`] itself.

use burn::prelude::*;
use burn::tensor::activation::relu;

use super::discriminator::DinoTrunk;
use super::lpips::Lpips;
use crate::flow::FrozenPrior;

/// The frozen networks of the loss (prior, LPIPS, the discriminator's DINO trunk), replicated on
/// one data-parallel device.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub device: Device,
    pub prior: FrozenPrior,
    pub lpips: Option<Lpips>,
    /// The discriminator's trunk, when the adversarial term is on (no autodiff).
    pub dino: Option<DinoTrunk>,
}

impl Frozen {
    /// Copies of `self` on each of `devices`.
    pub fn replicate(&self, devices: &[Device]) -> Vec<Frozen> {
        devices
            .iter()
            .map(|d| Frozen {
                device: d.clone(),
                prior: FrozenPrior::new(self.prior.mlp().clone().to_device(d)),
                lpips: self.lpips.as_ref().map(|l| l.to_device(d)),
                dino: self.dino.clone().map(|t| t.to_device(d)),
            })
            .collect()
    }
}

/// PSNR in dB of a mean squared error measured on [-1, 1] images.
pub fn psnr(mse: f64) -> f64 {
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// The generator's hinge loss: `-mean D(fake)`.
pub fn generator_hinge(fake: Tensor<2>) -> Tensor<1> {
    fake.mean().neg()
}

/// The discriminator's hinge loss: `mean relu(1 - D(real)) + mean relu(1 + D(fake))`.
pub fn discriminator_hinge(real: Tensor<2>, fake: Tensor<2>) -> Tensor<1> {
    relu(real.neg() + 1.0).mean() + relu(fake + 1.0).mean()
}

/// LeCAM's running means of the discriminator's real and fake logits.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LecamEma {
    pub real: f64,
    pub fake: f64,
}

impl LecamEma {
    /// Blends in one step's mean logits: `ema = decay * ema + (1 - decay) * mean`.
    pub fn update(&mut self, decay: f64, real: f64, fake: f64) {
        self.real = decay * self.real + (1.0 - decay) * real;
        self.fake = decay * self.fake + (1.0 - decay) * fake;
    }
}

/// The LeCAM regulariser: `mean relu(D(real) - ema_fake)^2 + mean relu(ema_real - D(fake))^2`.
pub fn lecam(real: Tensor<2>, fake: Tensor<2>, ema: &LecamEma) -> Tensor<1> {
    relu(real - ema.fake).square().mean() + relu(fake.neg() + ema.real).square().mean()
}

/// Consistency regularisation: the mean of `(D(x) - D(T x))^2` over the real and fake logits
/// together (SoftVQ's `mse_loss` of the concatenation; both have the same size).
pub fn consistency(
    real: Tensor<2>,
    real_t: Tensor<2>,
    fake: Tensor<2>,
    fake_t: Tensor<2>,
) -> Tensor<1> {
    ((real - real_t).square().mean() + (fake - fake_t).square().mean()) * 0.5
}
