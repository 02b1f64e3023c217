//! Downloads through a hub that misbehaves on purpose (testkit's server with faults): what is
//! transient is retried, nothing corrupt is left in the cache for a later run to trust, and
//! a failure names the file.

use std::path::{Path, PathBuf};

use merge_core::checkpoint::Checkpoint;
use merge_core::source::{ModelRef, Resolver};
use testkit::hub::{Fault, HubServer, Repo};
use testkit::models::TinyLlama;
use testkit::resolver::settings;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

struct Hub {
    _tmp: tempfile::TempDir,
    server: HubServer,
    cache: PathBuf,
    source: PathBuf,
}

fn hub() -> Hub {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("src");
    TinyLlama::default().write(&source, 7, 1);
    let server = HubServer::serve("org/tiny", Repo::single(SHA, Repo::files_from_dir(&source)));
    Hub {
        cache: tmp.path().join("cache"),
        source,
        server,
        _tmp: tmp,
    }
}

impl Hub {
    /// Resolves and opens the model, as a merge does; `Ok` holds the snapshot directory.
    fn open(&self) -> Result<PathBuf, String> {
        let resolver = Resolver::new(settings(&self.server.endpoint, &self.cache, None, false));
        let files = resolver
            .resolve(&ModelRef::new("org/tiny"))
            .map_err(|e| e.to_string())?;
        let ckpt = Checkpoint::open(&files).map_err(|e| e.to_string())?;
        Ok(ckpt.weight_files()[0].parent().unwrap().to_path_buf())
    }

    fn downloads_of(&self, file: &str) -> usize {
        let suffix = format!("/resolve/{SHA}/{file}");
        self.server
            .requests()
            .iter()
            .filter(|r| r.ends_with(&suffix))
            .count()
    }

    /// Every cached file of the model equals the served one.
    fn assert_cache_intact(&self, snapshot: &Path) {
        for f in ["config.json", "model.safetensors"] {
            assert_eq!(
                std::fs::read(snapshot.join(f)).unwrap(),
                std::fs::read(self.source.join(f)).unwrap(),
                "{f} in the cache differs from the hub's"
            );
        }
    }

    /// Every file anywhere in the cache, and where it points.
    fn cached_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.cache.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(&self.cache).unwrap().display().to_string());
                }
            }
        }
        out
    }
}

#[test]
fn a_connection_dropped_mid_file_is_resumed() {
    let h = hub();
    h.server
        .fault("model.safetensors", Fault::DropAfter(100), 1);
    let snapshot = h.open().unwrap();
    h.assert_cache_intact(&snapshot);
    // The probe, the cut-off download, then the rest from byte 100 on.
    assert!(h.downloads_of("model.safetensors") >= 3);
}

#[test]
fn http_500_then_success_is_retried() {
    let h = hub();
    h.server.fault("config.json", Fault::Status(500), 2);
    h.server.fault("model.safetensors", Fault::Status(503), 1);
    let snapshot = h.open().unwrap();
    h.assert_cache_intact(&snapshot);
}

#[test]
fn a_truncated_body_with_a_matching_content_length_is_refetched() {
    let h = hub();
    h.server.fault("model.safetensors", Fault::Truncate, 1);
    h.server.fault("config.json", Fault::Truncate, 1);
    let snapshot = h.open().unwrap();
    h.assert_cache_intact(&snapshot);
}

#[test]
fn a_corrupt_body_is_never_left_in_the_cache_and_a_later_run_fetches_it_again() {
    for file in ["model.safetensors", "config.json"] {
        let h = hub();
        // Every attempt (the first and two retries) gets a body that does not match.
        h.server.fault(file, Fault::Corrupt, 3);
        let err = h.open().unwrap_err();
        assert!(
            err.contains(&format!("org/tiny@{SHA}"))
                && err.contains(file)
                && err.contains("does not match the hub's ETag")
                && err.contains("removed from the cache"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let left = h.cached_files();
        assert!(
            !left.iter().any(|f| f.ends_with(file)),
            "{file} left in the cache: {left:?}"
        );
        // The hub behaves again: the next run downloads the file and reads it.
        let snapshot = h.open().unwrap();
        h.assert_cache_intact(&snapshot);
    }
}

#[test]
fn a_failure_that_persists_names_the_file() {
    let h = hub();
    h.server.fault("model.safetensors", Fault::Status(500), 3);
    let err = h.open().unwrap_err();
    assert!(
        err.contains("model.safetensors") && err.contains("HTTP 500"),
        "{err}"
    );
    // A client error is not retried.
    let h = hub();
    h.server.fault("model.safetensors", Fault::Status(403), 3);
    let err = h.open().unwrap_err();
    assert!(
        err.contains("model.safetensors") && err.contains("needs a token"),
        "{err}"
    );
    assert_eq!(h.downloads_of("model.safetensors"), 1);
}
