//! Files written atomically (a temporary file in the same folder, then a rename), so a run killed at
//! any moment leaves either the old file or the new one: the bytes, CSV and JSON.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let hint = "choose a folder you can write to";
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, hint, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| Error::io(path, hint, e))?;
    // Temporary files are private (0600); outputs are ordinary files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, hint, e))?;
    }
    tmp.persist(path)
        .map_err(|e| Error::io(path, hint, e.error))?;
    Ok(())
}

/// Writes rows of a CSV file atomically; `header` names the columns.
pub fn write_csv(
    path: &Path,
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<()> {
    let mut text = header.join(",");
    text.push('\n');
    for row in rows {
        text.push_str(&row.join(","));
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Writes a value as pretty JSON atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("report values serialise to JSON");
    write_atomic(path, text.as_bytes())
}
