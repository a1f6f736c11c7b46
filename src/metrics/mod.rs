//! Metrics of image quality: the FID Inception-v3 and the FID maths.

pub mod fid;
pub mod inception;
