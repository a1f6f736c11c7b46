//! Run folders: the resolved config and atomic training checkpoints (feature priors and autoencoders).
//!
//! A checkpoint is three burnpack files named by their step (live weights, EMA, optimiser), the
//! same for each further trainer of the run (a "part", e.g. the discriminator), and a manifest,
//! `checkpoint.toml`, written last and atomically. A run killed at any moment therefore
//! leaves a manifest that names complete files; older files are removed only after the new
//! manifest is in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::one_line;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::train::TrainerState;

/// The manifest file of a run folder.
pub const MANIFEST: &str = "checkpoint.toml";
/// The resolved config of a run folder.
pub const CONFIG: &str = "config.toml";

/// What `checkpoint.toml` records; `D` describes the data the run trains on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest<D> {
    /// Steps taken when the checkpoint was written.
    pub step: usize,
    /// What the run trains on, so a resume can check it sees the same data.
    pub data: D,
    /// File names (in the run folder) of the state.
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<String>,
    pub optim: String,
    /// Small values a resume must continue from (e.g. LeCAM's running means), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
    /// Further trainers saved with the main one, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartFiles>,
}

/// The files of one further trainer's state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartFiles {
    /// That trainer's step counter.
    pub step: usize,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<String>,
    pub optim: String,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes the resolved config of a run.
pub fn write_config(dir: &Path, cfg: &impl Serialize) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(dir, "choose a run folder you can write to", e))?;
    let text = toml::to_string_pretty(cfg).expect("configs serialise");
    write_atomic(&dir.join(CONFIG), text.as_bytes())
}

/// Reads a run folder's config; `command` names what writes such folders, for the error.
pub fn read_config<C: DeserializeOwned>(dir: &Path, command: &str) -> Result<C> {
    let path = dir.join(CONFIG);
    if !path.is_file() {
        return Err(bad(
            &path,
            format!("not found; give the folder of a `flowalign {command}` run"),
        ));
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(&path, "check the run folder", e))?;
    toml::from_str(&text).map_err(|e| {
        Error::input(
            &path,
            format!(
                "not a valid `{command}` config: {}",
                one_line(&e.to_string())
            ),
        )
    })
}

/// Fails with the first `(field, value)` where a resumed run's config (`now`) differs from the one
/// its checkpoint was trained with (`saved`); both list the same fields in the same order.
pub fn check_resumable(now: &[(&str, String)], saved: &[(&str, String)]) -> Result<()> {
    for ((key, want), (_, had)) in now.iter().zip(saved) {
        if want != had {
            return Err(Error::ResumeMismatch {
                key: key.to_string(),
                now: want.clone(),
                saved: had.clone(),
            });
        }
    }
    Ok(())
}

/// A run's latest checkpoint, if it has one.
pub type Saved<D> = Option<(Manifest<D>, TrainerState)>;

/// What a run opening `dir` starts from: with `resume`, the folder's config and its latest
/// checkpoint (none when it was killed before the first); without, nothing, and a folder that
/// already holds a checkpoint is refused rather than overwritten.
pub fn open<C: DeserializeOwned, D: DeserializeOwned>(
    dir: &Path,
    resume: bool,
    command: &str,
) -> Result<(Option<C>, Saved<D>)> {
    let saved = load::<D>(dir)?;
    if !resume {
        if let Some((m, _)) = &saved {
            return Err(Error::RunExists {
                dir: dir.to_path_buf(),
                step: m.step,
            });
        }
        return Ok((None, None));
    }
    if !dir.join(CONFIG).is_file() {
        return Err(Error::NoRun {
            dir: dir.to_path_buf(),
        });
    }
    Ok((Some(read_config(dir, command)?), saved))
}

/// Saves `state` as the run's latest checkpoint.
pub fn save<D: Serialize + Clone>(dir: &Path, data: &D, state: &TrainerState) -> Result<()> {
    save_with(dir, data, state, &[], &[])
}

/// Saves `state` with further trainers' states (`parts`, by name) and named `values` as the run's
/// latest checkpoint: every state file first, then the manifest, then the removal of older files.
pub fn save_with<D: Serialize + Clone>(
    dir: &Path,
    data: &D,
    state: &TrainerState,
    parts: &[(&str, &TrainerState)],
    values: &[(&str, f64)],
) -> Result<()> {
    let write = |prefix: &str, s: &TrainerState| -> Result<PartFiles> {
        let name = |what: &str| format!("{prefix}{what}-{:09}.bpk", state.step);
        let files = PartFiles {
            step: s.step,
            model: name("model"),
            ema: s.ema.as_ref().map(|_| name("ema")),
            optim: name("optim"),
        };
        write_atomic(&dir.join(&files.model), &s.model)?;
        if let (Some(file), Some(bytes)) = (&files.ema, &s.ema) {
            write_atomic(&dir.join(file), bytes)?;
        }
        write_atomic(&dir.join(&files.optim), &s.optim)?;
        Ok(files)
    };
    let main = write("", state)?;
    let mut part_files = BTreeMap::new();
    for (name, s) in parts {
        part_files.insert(name.to_string(), write(&format!("{name}-"), s)?);
    }
    let manifest = Manifest {
        step: state.step,
        data: data.clone(),
        model: main.model,
        ema: main.ema,
        optim: main.optim,
        values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        parts: part_files,
    };
    let text = toml::to_string_pretty(&manifest).expect("a Manifest serialises");
    write_atomic(&dir.join(MANIFEST), text.as_bytes())?;
    // Only now may older state go.
    let mut keep = vec![&manifest.model, &manifest.optim];
    keep.extend(&manifest.ema);
    for p in manifest.parts.values() {
        keep.extend([&p.model, &p.optim]);
        keep.extend(&p.ema);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().to_string();
            if file.ends_with(".bpk") && !keep.iter().any(|k| **k == file) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

fn read_state(dir: &Path, file: &str) -> Result<Vec<u8>> {
    let p: PathBuf = dir.join(file);
    std::fs::read(&p).map_err(|e| {
        bad(
            &p,
            format!("{e}; the checkpoint is incomplete: restore the file or start a new run"),
        )
    })
}

/// The state of the further trainer `name` in the checkpoint `manifest` of `dir` describes, or
/// `None` when the checkpoint holds none.
pub fn load_part<D>(
    dir: &Path,
    manifest: &Manifest<D>,
    name: &str,
) -> Result<Option<TrainerState>> {
    let Some(p) = manifest.parts.get(name) else {
        return Ok(None);
    };
    Ok(Some(TrainerState {
        step: p.step,
        model: read_state(dir, &p.model)?,
        ema: p.ema.as_deref().map(|f| read_state(dir, f)).transpose()?,
        optim: read_state(dir, &p.optim)?,
    }))
}

/// The run's latest checkpoint, or `None` when the folder holds none.
pub fn load<D: DeserializeOwned>(dir: &Path) -> Result<Saved<D>> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e.to_string()))?;
    let manifest: Manifest<D> = toml::from_str(&text)
        .map_err(|e| bad(&path, format!("malformed: {}", one_line(&e.to_string()))))?;
    let read = |file: &str| read_state(dir, file);
    let state = TrainerState {
        step: manifest.step,
        model: read(&manifest.model)?,
        ema: manifest.ema.as_deref().map(read).transpose()?,
        optim: read(&manifest.optim)?,
    };
    Ok(Some((manifest, state)))
}

/// Appends metrics to `metrics.csv` and `metrics.jsonl` in a run folder.
pub struct MetricsLog {
    csv: PathBuf,
    jsonl: PathBuf,
    columns: Vec<String>,
}

impl MetricsLog {
    /// Opens the logs of `dir` with these CSV `columns` (the first must be `step`), keeping only
    /// lines up to `step`: a resumed run rewrites what came after its checkpoint.
    pub fn open(dir: &Path, step: usize, columns: &[&str]) -> Result<MetricsLog> {
        let log = MetricsLog {
            csv: dir.join("metrics.csv"),
            jsonl: dir.join("metrics.jsonl"),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        };
        let keep = |line: &str, step_of: &dyn Fn(&str) -> Option<usize>| {
            step_of(line).is_some_and(|s| s <= step)
        };
        let csv_step = |l: &str| l.split(',').next()?.parse().ok();
        let json_step = |l: &str| {
            serde_json::from_str::<serde_json::Value>(l).ok()?["step"]
                .as_u64()
                .map(|s| s as usize)
        };
        let old_csv = std::fs::read_to_string(&log.csv).unwrap_or_default();
        let mut csv = format!("{}\n", columns.join(","));
        for line in old_csv.lines().filter(|l| keep(l, &csv_step)) {
            csv.push_str(line);
            csv.push('\n');
        }
        write_atomic(&log.csv, csv.as_bytes())?;
        let old_json = std::fs::read_to_string(&log.jsonl).unwrap_or_default();
        let mut json = String::new();
        for line in old_json.lines().filter(|l| keep(l, &json_step)) {
            json.push_str(line);
            json.push('\n');
        }
        write_atomic(&log.jsonl, json.as_bytes())?;
        Ok(log)
    }

    /// Appends one line: the JSON of `row`, and its fields named by the columns as CSV (absent or
    /// null fields are empty).
    pub fn append(&self, row: &impl Serialize) -> Result<()> {
        use std::io::Write;
        let value = serde_json::to_value(row).expect("metrics serialise");
        let cell = |c: &String| match &value[c.as_str()] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let csv = format!(
            "{}\n",
            self.columns.iter().map(cell).collect::<Vec<_>>().join(",")
        );
        let json = format!("{value}\n");
        for (path, line) in [(&self.csv, csv), (&self.jsonl, json)] {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .map_err(|e| Error::io(path, "keep the run folder writable", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prior::data::TableInfo;

    #[test]
    fn a_new_checkpoint_replaces_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let info = TableInfo {
            rows: 10,
            cols: 4,
            std: 1.5,
            scale: 2.0,
        };
        let state = |step: usize| TrainerState {
            step,
            model: vec![step as u8; 3],
            ema: Some(vec![7; 2]),
            optim: vec![1, 2],
        };
        assert!(load::<TableInfo>(dir.path()).unwrap().is_none());
        save(dir.path(), &info, &state(5)).unwrap();
        save(dir.path(), &info, &state(10)).unwrap();
        let (m, s) = load(dir.path()).unwrap().unwrap();
        assert_eq!((m.step, &m.data), (10, &info));
        assert_eq!(s, state(10));
        let bpk = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".bpk")
                })
                .count()
        };
        assert_eq!(bpk(), 3);
        // Further trainers and values travel with the main state; their old files go too.
        let part = |step: usize| TrainerState {
            step,
            model: vec![9; 4],
            ema: None,
            optim: vec![3],
        };
        save_with(
            dir.path(),
            &info,
            &state(15),
            &[("disc", &part(7))],
            &[("x", 0.1)],
        )
        .unwrap();
        save_with(
            dir.path(),
            &info,
            &state(20),
            &[("disc", &part(12))],
            &[("x", 1.0 / 3.0)],
        )
        .unwrap();
        let (m, s) = load::<TableInfo>(dir.path()).unwrap().unwrap();
        assert_eq!(s, state(20));
        assert_eq!(m.values["x"], 1.0 / 3.0, "values round-trip exactly");
        assert_eq!(load_part(dir.path(), &m, "disc").unwrap(), Some(part(12)));
        assert_eq!(load_part(dir.path(), &m, "other").unwrap(), None);
        assert_eq!(bpk(), 5);
        // A manifest naming a missing file is an error, not a silent restart.
        std::fs::remove_file(dir.path().join(&m.optim)).unwrap();
        let err = load::<TableInfo>(dir.path()).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
    }
}
