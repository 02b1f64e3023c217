//! Model sources against a local server that speaks the hub's HTTP API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use merge_core::checkpoint::Checkpoint;
use merge_core::source::{is_commit_sha, ModelRef, Resolver};
use testkit::hub::{HubServer, Repo, CLOSED_ENDPOINT};
use testkit::models::TinyLlama;
use testkit::resolver::settings;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SHA2: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// `model` at `revision`.
fn at(model: &str, revision: Option<String>) -> ModelRef {
    ModelRef {
        model: model.into(),
        revision,
    }
}

/// A repo with a tiny model plus files a merge must not download.
fn model_repo(dir: &Path, shards: usize) -> BTreeMap<String, Vec<u8>> {
    TinyLlama::default().write(dir, 7, shards);
    let mut files = Repo::files_from_dir(dir);
    files.insert(
        "pytorch_model.bin".into(),
        b"legacy copy, never needed".to_vec(),
    );
    files.insert("onnx/model.onnx".into(), vec![0; 1000]);
    files.insert("tokenizer.json".into(), b"{}".to_vec());
    files
}

#[test]
fn resolves_branch_to_commit_and_downloads_only_needed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_repo(&tmp.path().join("src"), 1);
    let mut repo = Repo::single(SHA, files);
    repo.refs.insert("v1.0".into(), SHA.into());
    let hub = HubServer::serve("org/tiny", repo);
    let cache = tmp.path().join("cache");
    let resolver = Resolver::new(settings(&hub.endpoint, &cache, None, false));

    for rev in [None, Some("v1.0"), Some(SHA)] {
        let files = resolver
            .resolve(&at("org/tiny", rev.map(str::to_string)))
            .unwrap();
        assert_eq!(files.commit.as_deref(), Some(SHA), "revision {rev:?}");
        let ckpt = Checkpoint::open(&files).unwrap();
        assert_eq!(ckpt.len(), TinyLlama::default().shapes().len());
    }
    let downloads: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("/resolve/"))
        .collect();
    assert!(downloads.iter().any(|r| r.ends_with("/model.safetensors")));
    assert!(downloads.iter().any(|r| r.ends_with("/config.json")));
    for unwanted in ["pytorch_model.bin", "model.onnx", "tokenizer.json"] {
        assert!(
            !downloads.iter().any(|r| r.ends_with(unwanted)),
            "{unwanted} was downloaded: {downloads:?}"
        );
    }
    // Cached in the layout huggingface_hub uses.
    let snapshot = cache.join("models--org--tiny/snapshots").join(SHA);
    assert!(snapshot.join("model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny/refs/main")).unwrap(),
        SHA
    );
}

#[test]
fn sharded_repo_fetches_index_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_repo(&tmp.path().join("src"), 3);
    let hub = HubServer::serve("org/sharded", Repo::single(SHA, files));
    let resolver = Resolver::new(settings(
        &hub.endpoint,
        &tmp.path().join("cache"),
        None,
        false,
    ));
    let files = resolver.resolve(&ModelRef::new("org/sharded")).unwrap();
    let ckpt = Checkpoint::open(&files).unwrap();
    assert_eq!(ckpt.weight_files().len(), 3);
    let shard_downloads = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("/resolve/") && r.contains("-of-00003"))
        .count();
    assert!(shard_downloads >= 3);
}

#[test]
fn gated_repo_needs_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_repo(&tmp.path().join("src"), 1);
    let mut repo = Repo::single(SHA, files);
    repo.gated_token = Some("hf_secret_token".into());
    let hub = HubServer::serve("meta/gated", repo);
    let cache = tmp.path().join("cache");

    let err = Resolver::new(settings(&hub.endpoint, &cache, None, false))
        .resolve(&ModelRef::new("meta/gated"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("meta/gated") && err.contains("needs a token"),
        "{err}"
    );
    assert!(!err.contains('\n'));

    let with_token = Resolver::new(settings(
        &hub.endpoint,
        &cache,
        Some("hf_secret_token"),
        false,
    ));
    let files = with_token.resolve(&ModelRef::new("meta/gated")).unwrap();
    Checkpoint::open(&files).unwrap();
}

#[test]
fn unknown_repo_and_revision_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_repo(&tmp.path().join("src"), 1);
    let hub = HubServer::serve("org/tiny", Repo::single(SHA, files));
    let resolver = Resolver::new(settings(&hub.endpoint, &tmp.path().join("c"), None, false));
    let err = resolver
        .resolve(&ModelRef::new("org/none"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("org/none") && err.contains("not found"),
        "{err}"
    );
    let err = resolver
        .resolve(&at("org/tiny", Some(SHA2.into())))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn offline_mode_uses_the_cache_only() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_repo(&tmp.path().join("src"), 1);
    let hub = HubServer::serve("org/tiny", Repo::single(SHA, files));
    let cache = tmp.path().join("cache");
    let online = Resolver::new(settings(&hub.endpoint, &cache, None, false));
    let first = Checkpoint::open(&online.resolve(&ModelRef::new("org/tiny")).unwrap()).unwrap();
    let before = hub.requests().len();

    // Offline, pointing at a closed port: branch and sha both resolve from the cache.
    let offline = Resolver::new(settings(CLOSED_ENDPOINT, &cache, None, true));
    for rev in [None, Some(SHA)] {
        let files = offline
            .resolve(&at("org/tiny", rev.map(str::to_string)))
            .unwrap();
        assert_eq!(files.commit.as_deref(), Some(SHA));
        let again = Checkpoint::open(&files).unwrap();
        assert_eq!(again.len(), first.len());
    }
    assert_eq!(
        hub.requests().len(),
        before,
        "offline mode touched the server"
    );
    let err = offline
        .resolve(&at("org/tiny", Some("dev".into())))
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn aliases_resolve_to_the_directory_their_function_gives() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("family/base")).unwrap();
    let root = tmp.path().join("family");
    let r =
        Resolver::from_env().with_alias("fam:", Arc::new(move |name: &str| Ok(root.join(name))));
    let f = r.resolve(&ModelRef::new("fam:base")).unwrap();
    assert_eq!(
        f.local_dir(),
        Some(tmp.path().join("family/base").as_path())
    );
    assert_eq!(f.commit, None);
}

#[test]
fn commit_ids_are_recognised() {
    assert!(is_commit_sha("f67f7cf6a907e567552b946699a9b9b45394fc46"));
    assert!(!is_commit_sha("main"));
    assert!(!is_commit_sha("v1.0"));
}

#[test]
fn missing_local_path_is_an_error_and_hub_ids_are_not_paths() {
    let cache = std::env::temp_dir().join("no-such-hub-cache");
    let r = Resolver::new(settings(CLOSED_ENDPOINT, &cache, None, true));
    let err = r.resolve(&ModelRef::new("./nowhere/model")).unwrap_err();
    assert!(err.to_string().contains("file not found"), "{err}");
    let err = r.resolve(&ModelRef::new("org/model")).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn token_is_never_in_debug_output() {
    let s = settings("x", &PathBuf::new(), Some("hf_secret"), false);
    assert!(!format!("{s:?}").contains("hf_secret"));
}
