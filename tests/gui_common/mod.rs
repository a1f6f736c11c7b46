//! Helpers shared by the window's tests (`tests/gui.rs`, `tests/gui_soak.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use eframe::egui;

/// A file dropped on the window, read from disk.
#[derive(Debug)]
pub struct DroppedPath(pub PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// A file of `tests/assets`.
pub fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/assets")
        .join(name)
}
