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

/// Checks that a window can be opened at all, so a headless machine or a desktop without the
/// libraries the window loads at run time gets one clear line instead of a crash.
pub fn check_display() -> Result<()> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let wayland = std::env::var_os("WAYLAND_DISPLAY").is_some();
    if std::env::var_os("DISPLAY").is_none() && !wayland {
        return Err(Error::Display(
            "no display found (DISPLAY and WAYLAND_DISPLAY are unset): run the visualizer on a desktop \
             or under xvfb-run, or use `flowalign toy` for the same experiment without a window"
                .into(),
        ));
    }
    let needed = if wayland {
        WAYLAND_LIBRARIES
    } else {
        X11_LIBRARIES
    };
    missing_libraries(needed, |name| {
        // SAFETY: loading a system library runs its initialisers, as the window itself will.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// The shared libraries the window loads at run time on X11, with the Debian/Ubuntu package of
/// each (eframe opens them with dlopen, so the build succeeds without them).
pub const X11_LIBRARIES: &[(&str, &str)] = &[
    ("libX11.so.6", "libx11-6"),
    ("libX11-xcb.so.1", "libx11-xcb1"),
    ("libXcursor.so.1", "libxcursor1"),
    ("libXrandr.so.2", "libxrandr2"),
    ("libXi.so.6", "libxi6"),
    ("libxkbcommon.so.0", "libxkbcommon0"),
    ("libxkbcommon-x11.so.0", "libxkbcommon-x11-0"),
    (
        "libGL.so.1",
        "libgl1 (and an OpenGL driver: libgl1-mesa-dri)",
    ),
];

/// The same for a Wayland session.
pub const WAYLAND_LIBRARIES: &[(&str, &str)] = &[
    ("libwayland-client.so.0", "libwayland-client0"),
    ("libwayland-egl.so.1", "libwayland-egl1"),
    ("libxkbcommon.so.0", "libxkbcommon0"),
    (
        "libEGL.so.1",
        "libegl1 (and an OpenGL driver: libgl1-mesa-dri)",
    ),
];

/// Fails naming every library of `needed` that `loads` cannot load, with its package.
pub fn missing_libraries(needed: &[(&str, &str)], loads: impl Fn(&str) -> bool) -> Result<()> {
    let missing: Vec<String> = needed
        .iter()
        .filter(|(lib, _)| !loads(lib))
        .map(|(lib, pkg)| format!("{lib} (package {pkg})"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Display(format!(
        "the window needs system libraries that are missing: {}; install them, or use `flowalign toy` \
         for the same experiment without a window",
        missing.join(", ")
    )))
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
            "could not open the window ({e}): OpenGL is missing or broken on this display; install \
             an OpenGL driver (Debian/Ubuntu: libgl1-mesa-dri), or use `flowalign toy` for the same \
             experiment without a window"
        ))
    })
}

/// Where scripted exports go when no folder is given.
pub fn default_export_dir() -> PathBuf {
    PathBuf::from("flowalign-export")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_libraries_are_named_with_their_packages_on_one_line() {
        let err = missing_libraries(X11_LIBRARIES, |lib| !lib.starts_with("libxkbcommon-x11"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("libxkbcommon-x11.so.0 (package libxkbcommon-x11-0)")
                && err.contains("flowalign toy")
                && !err.contains('\n'),
            "{err}"
        );
        assert!(!err.contains("libGL"), "only the missing ones: {err}");
        missing_libraries(WAYLAND_LIBRARIES, |_| true).unwrap();
    }
}
