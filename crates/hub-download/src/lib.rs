//! Downloads from the Hugging Face Hub that a later run can trust.
//!
//! `hf-hub` downloads a file into the cache (`blobs/<etag>`, linked from
//! `snapshots/<commit>/<file>`) and renames it into place without checking it, and a later
//! run takes any file in the cache as good. A connection that drops, a proxy that truncates
//! the body (with a Content-Length that matches what it sent), or a corrupt mirror would leave
//! a file every later run trusts. [`get`] therefore checks each file it downloads against the
//! ETag its blob is named by — the sha256 of an LFS file, the git blob sha1 of any other —
//! and removes a file that does not match (blob and link) before anyone uses it. Transient
//! failures (HTTP 5xx and 429, connections refused, reset or cut short, a body that does not
//! match) are retried.
//!
//! ```no_run
//! use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
//! let cache = Cache::new("/tmp/hf-cache".into());
//! let repo = Repo::with_revision("org/model".into(), RepoType::Model, "main".into());
//! let api = ApiBuilder::from_cache(cache.clone()).build()?;
//! let path = hub_download::get(&api.repo(repo.clone()), &cache.repo(repo), "config.json", 2)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{ApiError, ApiRepo};
use hf_hub::CacheRepo;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Why a file could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The hub client failed (the last attempt's error).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Every download's content differed from the hub's ETag.
    #[error("downloaded content does not match the hub's ETag ({0}); the file was removed from the cache")]
    Corrupt(String),
}

/// The local path of `name`: from the cache if it is there, else downloaded and checked.
/// Transient failures are retried `retries` times (after 0.5 s, 1 s, 2 s ...).
pub fn get(
    repo: &ApiRepo,
    cache: &CacheRepo,
    name: &str,
    retries: u32,
) -> Result<PathBuf, Failure> {
    let mut attempt = 0;
    loop {
        let failure = match cache.get(name) {
            Some(path) => return Ok(path),
            None => match repo.get(name) {
                Ok(path) => match check(&path) {
                    Ok(()) => return Ok(path),
                    Err(e) => {
                        remove(&path);
                        Failure::Corrupt(e)
                    }
                },
                Err(e) => Failure::Api(e),
            },
        };
        if attempt >= retries || !transient(&failure) {
            return Err(failure);
        }
        tracing::warn!("{name}: {failure}; retrying");
        std::thread::sleep(Duration::from_millis(500 << attempt));
        attempt += 1;
    }
}

/// Whether trying again may succeed.
fn transient(f: &Failure) -> bool {
    let api = match f {
        Failure::Corrupt(_) => return true,
        Failure::Api(ApiError::TooManyRetries(e)) => e.as_ref(),
        Failure::Api(e) => e,
    };
    match api {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(code, _) => *code >= 500 || *code == 429,
            ureq::Error::Transport(_) => true,
        },
        ApiError::IoError(_) => true,
        _ => false,
    }
}

/// Checks a cached file against the ETag its blob is named by: 64 hex digits are the sha256
/// of an LFS file, 40 the git blob sha1 (`blob <len>\0` + content) of a regular one. A blob
/// named otherwise is not checked.
pub fn check(path: &Path) -> Result<(), String> {
    let blob = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let digest = match etag.len() {
        64 => hash(&blob, Sha256::new(), None),
        40 => hash(
            &blob,
            Sha1::new(),
            Some(std::fs::metadata(&blob).map_err(|e| e.to_string())?.len()),
        ),
        _ => return Ok(()),
    }
    .map_err(|e| format!("{}: {e}", blob.display()))?;
    if digest == etag {
        Ok(())
    } else {
        Err(format!("expected {etag}, got {digest}"))
    }
}

fn hash<D: Digest>(path: &Path, mut h: D, git_blob_len: Option<u64>) -> std::io::Result<String> {
    if let Some(len) = git_blob_len {
        h.update(format!("blob {len}\0").as_bytes());
    }
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Removes a cached file: its blob and the snapshot link to it.
fn remove(path: &Path) {
    if let Ok(blob) = std::fs::canonicalize(path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(path);
}
