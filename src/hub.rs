//! Models named by their Hugging Face hub id instead of a file: `hf:ORG/NAME[@REV][/FILE][:TENSOR]`,
//! resolved offline in the hub's own cache layout by Hugging Face's Rust client (`hf-hub`).
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out
//! as the hub lays it out: `models--ORG--NAME/refs/REV` holds a commit, whose files are under
//! `models--ORG--NAME/snapshots/COMMIT/`. Without `/FILE`, the weights are `model.safetensors`,
//! or, for a sharded checkpoint, the shard that `model.safetensors.index.json` names for
//! `TENSOR`. flowalign does not download: a model that is not there is one line naming the
//! command that fetches it.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The prefix that marks a hub id.
pub const PREFIX: &str = "hf:";

/// Whether `spec` names a model on the hub rather than a file.
pub fn is_hub_id(spec: &str) -> bool {
    spec.starts_with(PREFIX)
}

/// A parsed `hf:` id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// A file inside the repository, when named.
    pub file: Option<String>,
    /// A tensor inside the weights, when named.
    pub tensor: Option<String>,
}

impl HubId {
    /// Parses `hf:ORG/NAME[@REV][/FILE][:TENSOR]`.
    pub fn parse(spec: &str) -> Result<HubId> {
        let bad = |msg: &str| Error::Hub {
            id: spec.to_string(),
            msg: format!(
                "{msg}; write hf:ORG/NAME[@REVISION][/FILE][:TENSOR], e.g. hf:Qwen/Qwen2.5-0.5B:model.embed_tokens.weight"
            ),
        };
        let rest = spec
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("not a hub id"))?;
        let (path, tensor) = match rest.split_once(':') {
            Some((p, t)) if !t.is_empty() => (p, Some(t.to_string())),
            Some(_) => return Err(bad("empty tensor name after ':'")),
            None => (rest, None),
        };
        let mut parts = path.splitn(3, '/');
        let (org, name) = match (parts.next(), parts.next()) {
            (Some(o), Some(n)) if !o.is_empty() && !n.is_empty() => (o, n),
            _ => return Err(bad("a model id has the form ORG/NAME")),
        };
        let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.to_string()),
            Some(_) => return Err(bad("empty revision after '@'")),
            None => (name, "main".to_string()),
        };
        Ok(HubId {
            repo: format!("{org}/{name}"),
            revision,
            file,
            tensor,
        })
    }
}

/// The cache the hub's own tools use: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else the default.
pub fn default_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

/// Resolves `spec` to a local file and the tensor it names: a hub id through [`default_cache`],
/// anything else as it is (`None` for the tensor; the caller splits its own `FILE[:TENSOR]`).
pub fn resolve(spec: &str) -> Result<(PathBuf, Option<String>)> {
    resolve_in(&default_cache(), spec)
}

/// [`resolve`] in a given cache.
pub fn resolve_in(cache: &Cache, spec: &str) -> Result<(PathBuf, Option<String>)> {
    if !is_hub_id(spec) {
        return Ok((PathBuf::from(spec), None));
    }
    let id = HubId::parse(spec)?;
    let repo = cache.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let folder = cache
        .path()
        .join(format!("models--{}", id.repo.replace('/', "--")));
    let missing = |what: String| Error::Hub {
        id: spec.to_string(),
        msg: format!(
            "{what} is not in the Hugging Face cache {}; fetch it with `huggingface-cli download {}{}` \
             (or point HF_HOME / HF_HUB_CACHE at the cache that holds it)",
            cache.path().display(),
            id.repo,
            if id.revision == "main" {
                String::new()
            } else {
                format!(" --revision {}", id.revision)
            }
        ),
    };
    // A commit hash names a snapshot directly; a branch or tag goes through refs/.
    let get = |file: &str| -> Option<PathBuf> {
        repo.get(file).or_else(|| {
            let direct = folder.join("snapshots").join(&id.revision).join(file);
            direct.is_file().then_some(direct)
        })
    };
    if !folder.is_dir() {
        return Err(missing(format!("model {}", id.repo)));
    }
    if let Some(file) = &id.file {
        let path = get(file).ok_or_else(|| missing(format!("file {file} of {}", id.repo)))?;
        return Ok((path, id.tensor));
    }
    if let Some(path) = get("model.safetensors") {
        return Ok((path, id.tensor));
    }
    let Some(index) = get("model.safetensors.index.json") else {
        return Err(missing(format!(
            "model.safetensors (or model.safetensors.index.json) of {} at revision {}",
            id.repo, id.revision
        )));
    };
    let Some(tensor) = &id.tensor else {
        return Err(Error::Hub {
            id: spec.to_string(),
            msg: "is sharded (model.safetensors.index.json); name the tensor (hf:ORG/NAME:TENSOR) or the shard (hf:ORG/NAME/FILE)".into(),
        });
    };
    let shard = shard_of(&index, tensor).map_err(|msg| Error::Hub {
        id: spec.to_string(),
        msg,
    })?;
    let path = get(&shard).ok_or_else(|| missing(format!("shard {shard} of {}", id.repo)))?;
    Ok((path, id.tensor))
}

/// The shard file that a `model.safetensors.index.json` names for `tensor`.
fn shard_of(index: &Path, tensor: &str) -> std::result::Result<String, String> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| format!("cannot read {}: {e}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", index.display()))?;
    json["weight_map"][tensor]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the index {} has no tensor '{tensor}'", index.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_revision_file_and_tensor() {
        let id = HubId::parse("hf:Qwen/Qwen2.5-0.5B:model.embed_tokens.weight").unwrap();
        assert_eq!(id.repo, "Qwen/Qwen2.5-0.5B");
        assert_eq!(id.revision, "main");
        assert_eq!(
            (id.file, id.tensor.as_deref()),
            (None, Some("model.embed_tokens.weight"))
        );
        let id = HubId::parse("hf:org/name@v1.0/sub/weights.safetensors").unwrap();
        assert_eq!(id.revision, "v1.0");
        assert_eq!(id.file.as_deref(), Some("sub/weights.safetensors"));
        for bad in [
            "hf:",
            "hf:onlyname",
            "hf:org/",
            "hf:org/name:",
            "hf:org/name@",
        ] {
            let err = HubId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("hf:ORG/NAME"), "{bad}: {err}");
        }
        assert!(!is_hub_id("model.safetensors:hf:x"));
    }
}
