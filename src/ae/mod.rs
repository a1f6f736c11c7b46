//! Stage 2 of the ImageNet recipe (METHOD.md section 6): an image autoencoder whose latents are aligned to
//! a frozen flow prior.

pub mod adversarial;
pub mod config;
pub mod data;
pub mod dinov2;
pub mod discriminator;
pub mod eval;
pub mod latents;
pub mod loss;
pub mod lpips;
pub mod model;
pub mod train;
