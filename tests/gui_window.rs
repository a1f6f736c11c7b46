//! The real window: `flowalign gui --screenshot` under Xvfb with Mesa's software OpenGL, and the
//! one-line refusal where no display exists.
#![cfg(feature = "gui")]

use std::path::Path;
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flowalign")
}

fn xvfb_run() -> Option<&'static str> {
    let found = Command::new("sh")
        .args(["-c", "command -v xvfb-run"])
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some("xvfb-run")
}

/// RGB pixels and size of a PNG.
fn read_png(path: &Path) -> (Vec<[u8; 3]>, (u32, u32)) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (pixels, (info.width, info.height))
}

fn near(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= tol)
}

#[test]
fn the_real_window_renders_trains_and_saves_a_screenshot() {
    let Some(xvfb) = xvfb_run() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "xvfb-run is missing on CI: .ci/run installs xvfb and Mesa"
        );
        eprintln!("skipping: xvfb-run is not installed (apt-get install xvfb libgl1-mesa-dri)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("shots/spiral.png");
    let stats = dir.path().join("stats.json");
    let out = Command::new(xvfb)
        .args(["-a", "-s", "-screen 0 1600x1000x24", bin(), "gui"])
        // 100 prior steps take about 2 s on 2 quiet cores; the 25 s leave room for a loaded
        // machine (the software renderer shares the cores with training).
        .args(["--target", "spiral", "--autostart", "--prior-steps", "100"])
        .args(["--align-steps", "100000", "--exit-after", "25"])
        .arg("--screenshot")
        .arg(&shot)
        .arg("--stats")
        .arg(&stats)
        .env("LIBGL_ALWAYS_SOFTWARE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gui failed: {stderr}");

    let (pixels, (w, h)) = read_png(&shot);
    assert_eq!((w, h), (1500, 950), "the screenshot is the whole window");
    let mut colours: Vec<[u8; 3]> = pixels.clone();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 500,
        "a blank render: {} colours",
        colours.len()
    );
    // The heatmaps are viridis: deep purple (low) and yellow (high) must both cover real area.
    let purple = pixels.iter().filter(|&&p| near(p, [68, 1, 84], 40)).count();
    let yellow = pixels
        .iter()
        .filter(|&&p| near(p, [253, 231, 37], 40))
        .count();
    assert!(
        purple > 5_000 && yellow > 5_000,
        "no heatmaps: {purple} purple, {yellow} yellow px"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(stats["frames"].as_u64().unwrap() > 10, "{stats}");
    assert_eq!(stats["prior_steps"].as_u64(), Some(100), "{stats}");
    assert!(stats["align_steps"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["landscape_refreshes"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

#[test]
fn without_a_display_the_gui_says_so_in_one_line() {
    let out = Command::new(bin())
        .arg("gui")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("no display") && lines[0].contains("flowalign toy"),
        "{stderr}"
    );
}
