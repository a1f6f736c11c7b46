//! The desktop visualizer (eframe + egui_plot): train the prior and align latents live, with the NLL and
//! L_align landscapes side by side.
//!
//! The UI thread only draws; a training thread owns the run ([`worker`]) and reports plain data.

mod app;
mod figures;
mod panels;
mod view;
pub mod worker;

use std::path::PathBuf;

use burn::prelude::Device;

pub use app::{
    Action, Analysis, FlowAlignApp, FrameStats, Launch, Rate, RunState, Settings, Shot, Stamped,
    TargetChoice, prior_params,
};
pub use view::{Layout, layout};

use crate::error::{Error, Result};

/// The window's title and the key of its persisted settings.
pub const APP_NAME: &str = "flowalign";

/// Checks that a window can be opened at all, so a headless machine gets one clear line.
pub fn check_display() -> Result<()> {
    if cfg!(target_os = "linux")
        && std::env::var_os("DISPLAY").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none()
    {
        return Err(Error::Display(
            "no display found (DISPLAY and WAYLAND_DISPLAY are unset): run the visualizer on a desktop \
             or under xvfb-run, or use `flowalign toy` for the same experiment without a window"
                .into(),
        ));
    }
    Ok(())
}

/// Opens the visualizer window and runs it until it is closed.
pub fn run(launch: Launch, device: Device) -> Result<()> {
    check_display()?;
    let options = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("flowalign: aligning latent spaces with flow priors")
            .with_app_id(APP_NAME)
            .with_inner_size([1500.0, 950.0])
            .with_min_inner_size([900.0, 600.0]),
        // Scripted runs (screenshots, CI) start from the defaults, not from the user's last session.
        persistence_path: launch.scripted().then(|| {
            std::env::temp_dir().join(format!("flowalign-scripted-{}", std::process::id()))
        }),
        ..Default::default()
    };
    eframe::run_native(
        APP_NAME,
        options,
        Box::new(move |cc| Ok(Box::new(FlowAlignApp::new(cc, launch, device)))),
    )
    .map_err(|e| {
        Error::Display(format!(
            "could not open the window ({e}); check the display and OpenGL drivers, or use \
             `flowalign toy` for the same experiment without a window"
        ))
    })
}

/// Where scripted exports go when no folder is given.
pub fn default_export_dir() -> PathBuf {
    PathBuf::from("flowalign-export")
}
