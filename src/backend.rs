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

/// `count` devices of the kind `choice` resolves to, for data-parallel training: CUDA devices
/// 0..count, the first `count` hardware wgpu adapters, or the one CPU device `count` times (the
/// replicas then share it: this exercises the data-parallel step, it does not speed it up).
pub fn select_many(choice: DeviceChoice, count: usize) -> Result<(Vec<Device>, String)> {
    let (first, name) = select(choice)?;
    if count <= 1 {
        return Ok((vec![first], name));
    }
    if name.starts_with("cuda") {
        return Ok((
            (0..count).map(cuda_index).collect(),
            format!("cuda:0..{}", count - 1),
        ));
    }
    if name.starts_with("wgpu") {
        let all = hardware_wgpu_all();
        if all.len() < count {
            return Err(Error::Device(format!(
                "--gpus {count} asks for more hardware wgpu adapters than the {} found",
                all.len()
            )));
        }
        return Ok((
            all.into_iter().take(count).collect(),
            format!("{count} x {name}"),
        ));
    }
    tracing::warn!(
        "--gpus {count} on the CPU: the replicas share one device (a check of the data-parallel step, not a speed-up)"
    );
    Ok((vec![first; count], format!("{count} replicas on {name}")))
}

/// The device number `index` of the kind `choice` resolves to (one process per GPU picks its own
/// by its rank on the machine); on the CPU every index is the one CPU device.
pub fn select_at(choice: DeviceChoice, index: usize) -> Result<(Device, String)> {
    let (first, name) = select(choice)?;
    if index == 0 {
        return Ok((first, name));
    }
    if name.starts_with("cuda") {
        return Ok((cuda_index(index), format!("cuda:{index}")));
    }
    if name.starts_with("wgpu") {
        let all = hardware_wgpu_all();
        let found = all.len();
        return all.into_iter().nth(index).map(|d| (d, format!("{name} #{index}"))).ok_or_else(|| {
            Error::Device(format!(
                "this rank wants hardware wgpu adapter #{index} but {found} were found; start at most {found} ranks per machine or use --layout per-machine"
            ))
        });
    }
    Ok((first, name))
}

#[cfg(feature = "cuda")]
fn cuda_index(i: usize) -> Device {
    Device::cuda(i)
}

#[cfg(not(feature = "cuda"))]
fn cuda_index(_: usize) -> Device {
    unreachable!("a CUDA device was selected in a build without CUDA")
}

#[cfg(feature = "wgpu")]
fn hardware_wgpu_all() -> Vec<Device> {
    use burn::tensor::DeviceType;
    Device::enumerate(DeviceType::Wgpu)
        .iter()
        .filter(|d| d.identity().is_some_and(|id| id.physical.is_some()))
        .cloned()
        .collect()
}

#[cfg(not(feature = "wgpu"))]
fn hardware_wgpu_all() -> Vec<Device> {
    Vec::new()
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
