//! The one place that names concrete burn backends and picks the device at run time.

use burn::prelude::*;

use crate::error::{Error, Result};

/// Which compute device to run on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A hardware GPU when one is compiled in and present, else the CPU.
    #[default]
    Auto,
    /// burn's pure-Rust `flex` CPU backend.
    Cpu,
    /// A hardware GPU through wgpu (needs the `wgpu` cargo feature).
    Wgpu,
    /// An NVIDIA GPU through CUDA (needs the `cuda` cargo feature).
    Cuda,
}

/// The chosen device (without autodiff) and a one-line description of it.
pub fn select(choice: DeviceChoice) -> Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::flex(), "cpu (burn flex)".into())),
        DeviceChoice::Wgpu => hardware_wgpu()?.ok_or_else(|| {
            Error::Device(
                "no hardware GPU adapter found through wgpu (software adapters such as lavapipe are skipped); use --device cpu".into(),
            )
        }),
        DeviceChoice::Cuda => cuda(),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda")
                && let Ok(found) = cuda()
            {
                return Ok(found);
            }
            if let Ok(Some(found)) = hardware_wgpu() {
                return Ok(found);
            }
            if cfg!(any(feature = "wgpu", feature = "cuda")) {
                tracing::info!("no hardware GPU found; running on the CPU (burn flex)");
            }
            Ok((Device::flex(), "cpu (burn flex)".into()))
        }
    }
}

#[cfg(feature = "wgpu")]
fn hardware_wgpu() -> Result<Option<(Device, String)>> {
    use burn::tensor::DeviceType;
    for device in Device::enumerate(DeviceType::Wgpu).iter() {
        // burn's kernels crash on software Vulkan drivers (lavapipe, llvmpipe): only real adapters count.
        if let Some(id) = device.identity()
            && id.physical.is_some()
        {
            return Ok(Some((device.clone(), format!("wgpu ({})", id.name))));
        }
    }
    Ok(None)
}

#[cfg(not(feature = "wgpu"))]
fn hardware_wgpu() -> Result<Option<(Device, String)>> {
    Err(Error::Device(
        "this build has no wgpu backend; rebuild with `cargo build --release --features wgpu` or use --device cpu".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<(Device, String)> {
    Ok((Device::cuda(0), "cuda:0".into()))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<(Device, String)> {
    Err(Error::Device(
        "this build has no CUDA backend; rebuild with `cargo build --release --features cuda` or use --device cpu".into(),
    ))
}
