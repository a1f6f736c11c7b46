//! Models named by their hub id (`hf:ORG/NAME...`) resolve offline in a cache laid out as the
//! Hugging Face hub lays it out (`models--ORG--NAME/refs/main`, `snapshots/COMMIT/`, files linked
//! to `blobs/`), found through `HF_HOME`; a model that is not there is one line.

use std::path::Path;

use flowalign::hub::resolve_in;

mod common;
use common::{one_line_error, prior_args, write_table};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Puts `files` (name, source file) into `hub/models--ORG--NAME` at `COMMIT` as the hub does: the
/// bytes in `blobs/`, a link in `snapshots/COMMIT/`, the commit in `refs/main`.
fn cache_model(hub: &Path, repo: &str, files: &[(&str, &Path)]) {
    let root = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    for (i, (name, src)) in files.iter().enumerate() {
        let blob = root.join("blobs").join(format!("blob{i}"));
        std::fs::copy(src, &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snapshot.join(name)).unwrap();
    }
}

#[test]
fn hub_ids_resolve_offline_from_a_hub_layout_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");
    let hub = home.join("hub");
    // A sharded checkpoint like Qwen2.5's: the embedding table sits in the second shard.
    let shard1 = tmp.path().join("s1.safetensors");
    let shard2 = tmp.path().join("s2.safetensors");
    write_table(&shard1, 16, 4);
    write_table(&shard2, 3000, 48);
    let index = tmp.path().join("index.json");
    std::fs::write(
        &index,
        r#"{"metadata": {"total_size": 1}, "weight_map": {
            "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
            "ids": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    cache_model(
        &hub,
        "Qwen/Qwen2.5-0.5B",
        &[
            ("model.safetensors.index.json", &index),
            ("model-00001-of-00002.safetensors", &shard1),
            ("model-00002-of-00002.safetensors", &shard2),
        ],
    );
    // A one-file model (an encoder init).
    cache_model(
        &hub,
        "facebook/dinov2-small",
        &[("model.safetensors", &shard1)],
    );

    let cache = hf_hub::Cache::new(hub.clone());
    let (path, tensor) =
        resolve_in(&cache, "hf:Qwen/Qwen2.5-0.5B:model.embed_tokens.weight").unwrap();
    assert!(path.ends_with(format!(
        "snapshots/{COMMIT}/model-00002-of-00002.safetensors"
    )));
    assert_eq!(tensor.as_deref(), Some("model.embed_tokens.weight"));
    let (path, _) = resolve_in(&cache, "hf:facebook/dinov2-small").unwrap();
    assert!(path.ends_with("model.safetensors") && path.is_file());
    let (path, _) = resolve_in(&cache, &format!("hf:facebook/dinov2-small@{COMMIT}")).unwrap();
    assert!(path.is_file(), "a commit hash names its snapshot");
    let (path, _) = resolve_in(
        &cache,
        "hf:Qwen/Qwen2.5-0.5B/model-00001-of-00002.safetensors",
    )
    .unwrap();
    assert!(path.ends_with("model-00001-of-00002.safetensors"));
    let err = resolve_in(&cache, "hf:Qwen/Qwen2.5-0.5B")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sharded") && err.contains("TENSOR"), "{err}");
    let err = resolve_in(&cache, "hf:Qwen/Qwen2.5-0.5B:lm_head.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tensor 'lm_head.weight'"), "{err}");
    let err = resolve_in(&cache, "hf:facebook/dinov2-small@v2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("--revision v2"), "{err}");

    // The CLI finds the cache through HF_HOME: inspect, then train a prior on the hub's table.
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowalign"))
            .args(args)
            .env("HF_HOME", &home)
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    let out = run(&[
        "features",
        "inspect",
        "hf:Qwen/Qwen2.5-0.5B/model-00002-of-00002.safetensors",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("model.embed_tokens.weight"));
    let dir = tmp.path().join("prior");
    let args = prior_args(
        "hf:Qwen/Qwen2.5-0.5B:model.embed_tokens.weight",
        dir.to_str().unwrap(),
        "20",
    );
    let out = run(&args);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3000 rows x 48"), "{stderr}");
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        config.contains("hf:Qwen/Qwen2.5-0.5B:model.embed_tokens.weight"),
        "{config}"
    );

    // A model that is not in the cache is one line naming the command that fetches it.
    let missing = tmp.path().join("missing");
    let args = prior_args(
        "hf:Qwen/Qwen2.5-7B:model.embed_tokens.weight",
        missing.to_str().unwrap(),
        "20",
    );
    let err = one_line_error(&run(&args));
    assert!(
        err.contains("hf:Qwen/Qwen2.5-7B")
            && err.contains("huggingface-cli download Qwen/Qwen2.5-7B"),
        "{err}"
    );
    assert!(!missing.join("checkpoint.toml").exists());
}
