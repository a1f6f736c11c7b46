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

/// Appends metrics to `metrics.csv` and `metrics.jsonl` in a run folder, and to a TensorBoard
/// event file beside them.
pub struct MetricsLog {
    csv: PathBuf,
    jsonl: PathBuf,
    columns: Vec<String>,
    events: EventLog,
}

/// A TensorBoard event file (`events.out.tfevents.*`) in a run folder: every number of a metrics
/// line as a scalar, figures as images. `tensorboard --logdir runs/` shows each run folder as a run.
///
/// Each process that opens a run starts a new file; on a resumed run the file begins with a
/// session start at the step after the checkpoint, so TensorBoard drops what the stopped session
/// had logged beyond it.
pub struct EventLog {
    path: PathBuf,
    writer: tfrecord::EventWriter<std::io::BufWriter<std::fs::File>>,
}

impl EventLog {
    /// Starts a new event file in `dir` for a run at `step` (0 for a new run).
    pub fn create(dir: &Path, step: usize) -> Result<EventLog> {
        use tfrecord::protobuf::event::What;
        use tfrecord::protobuf::{SessionLog, session_log::SessionStatus};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // A new name for every open, even two in one second of one process.
        let path = (0..)
            .map(|n| {
                dir.join(format!(
                    "events.out.tfevents.{}.flowalign.{}.{n}",
                    now.as_secs(),
                    std::process::id()
                ))
            })
            .find(|p| !p.exists())
            .expect("some free name");
        let fail = |e: tfrecord::Error| {
            Error::io(
                &path,
                "keep the run folder writable",
                std::io::Error::other(e.to_string()),
            )
        };
        let mut writer =
            tfrecord::EventWriter::create(&path, tfrecord::EventWriterConfig { auto_flush: true })
                .map_err(fail)?;
        let event = |step: usize, what: What| tfrecord::Event {
            wall_time: now.as_secs_f64(),
            step: step as i64,
            what: Some(what),
            source_metadata: None,
        };
        writer
            .write_event(event(0, What::FileVersion("brain.Event:2".into())))
            .map_err(fail)?;
        if step > 0 {
            let start = SessionLog {
                status: SessionStatus::Start as i32,
                checkpoint_path: String::new(),
                msg: format!("resumed at step {step}"),
            };
            writer
                .write_event(event(step + 1, What::SessionLog(start)))
                .map_err(fail)?;
        }
        Ok(EventLog { path, writer })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, e: tfrecord::Error) -> Error {
        Error::io(
            &self.path,
            "keep the run folder writable",
            std::io::Error::other(e.to_string()),
        )
    }

    /// Every number of `row` (a JSON object with a `step`) but the step itself, as a scalar.
    pub fn scalars(&mut self, row: &serde_json::Value) -> Result<()> {
        let step = row["step"].as_i64().unwrap_or(0);
        if let Some(map) = row.as_object() {
            for (tag, v) in map {
                if tag == "step" {
                    continue;
                }
                if let Some(x) = v.as_f64() {
                    self.writer
                        .write_scalar(tag, step, x as f32)
                        .map_err(|e| self.fail(e))?;
                }
            }
        }
        Ok(())
    }

    /// A PNG image (its bytes as written to disk) under `tag` at `step`.
    pub fn image(&mut self, tag: &str, step: usize, png: &[u8]) -> Result<()> {
        let (width, height) = png_size(png)
            .ok_or_else(|| Error::input(&self.path, format!("image '{tag}' is not a PNG")))?;
        let image = tfrecord::protobuf::summary::Image {
            height: height as i32,
            width: width as i32,
            colorspace: 3,
            encoded_image_string: png.to_vec(),
        };
        self.writer
            .write_image(tag, step as i64, image)
            .map_err(|e| self.fail(e))
    }
}

/// A PNG's width and height from its IHDR chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    Some((be(16), be(20)))
}

impl MetricsLog {
    /// Opens the logs of `dir` with these CSV `columns` (the first must be `step`), keeping only
    /// lines up to `step`: a resumed run rewrites what came after its checkpoint.
    pub fn open(dir: &Path, step: usize, columns: &[&str]) -> Result<MetricsLog> {
        let log = MetricsLog {
            csv: dir.join("metrics.csv"),
            jsonl: dir.join("metrics.jsonl"),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            events: EventLog::create(dir, step)?,
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

    /// Appends one line: the JSON of `row`, its fields named by the columns as CSV (absent or
    /// null fields are empty), and its numbers as TensorBoard scalars.
    pub fn append(&mut self, row: &impl Serialize) -> Result<()> {
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
        self.events.scalars(&value)
    }

    /// The run's TensorBoard event file, for images.
    pub fn events(&mut self) -> &mut EventLog {
        &mut self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of every TensorBoard file in `dir`, in file order, read back by tfrecord's reader.
    fn read_events(dir: &Path) -> Vec<tfrecord::Event> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("tfevents"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                tfrecord::EventIter::open(f, Default::default())
                    .unwrap()
                    .map(|e| e.unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn metrics_lines_and_figures_reach_a_tensorboard_file_that_parses() {
        use tfrecord::protobuf::event::What;
        use tfrecord::protobuf::summary::value::Value as V;
        let dir = tempfile::tempdir().unwrap();
        #[derive(Serialize)]
        struct Line {
            step: usize,
            loss: f32,
            val_loss: Option<f32>,
            note: &'static str,
        }
        let mut log = MetricsLog::open(dir.path(), 0, &["step", "loss", "val_loss"]).unwrap();
        for step in [10, 20] {
            log.append(&Line {
                step,
                loss: 1.0 / step as f32,
                val_loss: (step == 20).then_some(0.25),
                note: "text is not a scalar",
            })
            .unwrap();
        }
        let grid = dir.path().join("grid.png");
        crate::report::write_image_grid(&grid, &[0.5; 3 * 4 * 4], &[-0.5; 3 * 4 * 4], 4).unwrap();
        log.events()
            .image("grid", 20, &std::fs::read(&grid).unwrap())
            .unwrap();
        let events = read_events(dir.path());
        assert!(matches!(&events[0].what, Some(What::FileVersion(v)) if v == "brain.Event:2"));
        let mut scalars = Vec::new();
        let mut images = Vec::new();
        for e in &events {
            if let Some(What::Summary(s)) = &e.what {
                for v in &s.value {
                    match &v.value {
                        Some(V::SimpleValue(x)) => scalars.push((v.tag.clone(), e.step, *x)),
                        Some(V::Image(i)) => {
                            images.push((v.tag.clone(), e.step, i.width, i.height))
                        }
                        _ => panic!("unexpected value {v:?}"),
                    }
                }
            }
        }
        scalars.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        assert_eq!(
            scalars,
            vec![
                ("loss".to_string(), 10, 0.1),
                ("loss".to_string(), 20, 0.05),
                ("val_loss".to_string(), 20, 0.25),
            ]
        );
        assert_eq!(images, vec![("grid".to_string(), 20, 4, 8)]);

        // A resumed run starts a new file with a session start after its checkpoint.
        let mut again = MetricsLog::open(dir.path(), 10, &["step", "loss", "val_loss"]).unwrap();
        again
            .append(&Line {
                step: 20,
                loss: 0.07,
                val_loss: None,
                note: "",
            })
            .unwrap();
        let events = read_events(dir.path());
        let start = events
            .iter()
            .position(|e| matches!(e.what, Some(What::SessionLog(_))))
            .expect("a session start");
        assert_eq!(events[start].step, 11);
        assert!(events[start..].iter().any(|e| e.step == 20));
    }
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
