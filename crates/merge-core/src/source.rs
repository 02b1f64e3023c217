//! Where a model comes from: a local directory, or a hub repository pinned to a revision.
//!
//! Hub access goes through the `hf-hub` crate and follows the Python tools' conventions, so the
//! cache is shared with them: token from `HF_TOKEN`, else `HF_AUTH_TOKEN`, else the token file
//! (`HF_TOKEN_PATH`, else `$HF_HOME/token`); cache in `HF_HUB_CACHE`, else
//! `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` (default `~/.cache/huggingface/hub`);
//! `HF_ENDPOINT` for the server; `HF_HUB_OFFLINE=1` resolves from the cache only.
//!
//! Aliases registered from outside ([`Resolver::with_alias`]) name local directories by a
//! prefix: the demo crate registers `demo:NAME` for its offline model family.
//!
//! Files are fetched lazily, one by one, when a step asks for them, so a merge downloads
//! config, index and shards, and nothing else.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};

/// A model as a config names it: a local directory or a hub id, with an optional revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ModelRef {
    /// Local directory or hub id (`org/name`).
    pub model: String,
    /// Commit sha, tag or branch (hub only).
    pub revision: Option<String>,
}

impl ModelRef {
    /// A reference without a revision.
    pub fn new(model: impl Into<String>) -> Self {
        ModelRef {
            model: model.into(),
            revision: None,
        }
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{}", self.model, rev),
            None => f.write_str(&self.model),
        }
    }
}

/// Hub settings, read from the environment like the Python tools do.
#[derive(Clone)]
pub struct HubSettings {
    /// Base URL of the hub (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token. Never printed (see the `Debug` impl).
    pub token: Option<String>,
    /// The hub cache directory (`models--org--name/...` lives here).
    pub cache_dir: PathBuf,
    /// Resolve from the cache only.
    pub offline: bool,
    /// Show download progress bars (on a terminal).
    pub progress: bool,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

impl HubSettings {
    /// Settings from the environment (see the module docs for the variables).
    pub fn from_env() -> Self {
        let hf_home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = env("HF_HUB_CACHE")
            .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_path = env("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = env("HF_TOKEN")
            .or_else(|| env("HF_AUTH_TOKEN"))
            .or_else(|| {
                std::fs::read_to_string(token_path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        HubSettings {
            endpoint: env("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://huggingface.co".to_string()),
            token,
            cache_dir,
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// Resolves the rest of an aliased reference (`NAME` of `demo:NAME`) to a local model
/// directory; see [`Resolver::with_alias`].
pub type Alias = Arc<dyn Fn(&str) -> Result<PathBuf> + Send + Sync>;

/// Resolves model references to file providers.
pub struct Resolver {
    settings: HubSettings,
    /// Directory that relative local paths are taken from first (the config's directory).
    base_dir: Option<PathBuf>,
    /// Reference prefixes resolved to local directories by a function.
    aliases: Vec<(String, Alias)>,
    api: std::sync::OnceLock<std::result::Result<Api, String>>,
}

impl Resolver {
    /// A resolver with settings from the environment.
    pub fn from_env() -> Self {
        Self::new(HubSettings::from_env())
    }

    /// A resolver with explicit settings.
    pub fn new(settings: HubSettings) -> Self {
        Resolver {
            settings,
            base_dir: None,
            aliases: Vec::new(),
            api: std::sync::OnceLock::new(),
        }
    }

    /// Relative local paths are looked up in `dir` first, then in the working directory.
    pub fn with_base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// References starting with `prefix` resolve to the local directory `resolve` gives for
    /// the rest of the reference (`demo:base` → `resolve("base")`).
    pub fn with_alias(mut self, prefix: impl Into<String>, resolve: Alias) -> Self {
        self.aliases.push((prefix.into(), resolve));
        self
    }

    /// The directory relative paths are looked up in first, if set.
    pub fn base_dir(&self) -> Option<&Path> {
        self.base_dir.as_deref()
    }

    /// The settings in use.
    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    fn api(&self, repo: &str) -> Result<&Api> {
        self.api
            .get_or_init(|| {
                ApiBuilder::from_cache(hf_hub::Cache::new(self.settings.cache_dir.clone()))
                    .with_endpoint(self.settings.endpoint.clone())
                    .with_token(self.settings.token.clone())
                    .with_progress(self.settings.progress)
                    .with_retries(2)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::Hub {
                repo: repo.to_string(),
                message: format!("cannot start the hub client: {e}"),
            })
    }

    /// Resolve a reference: a local directory as it is, a hub id to a pinned commit.
    pub fn resolve(&self, r: &ModelRef) -> Result<ModelFiles> {
        for (prefix, resolve) in &self.aliases {
            if let Some(rest) = r.model.strip_prefix(prefix.as_str()) {
                return Ok(ModelFiles::local(r.clone(), resolve(rest)?));
            }
        }
        if let Some(dir) = self.local_dir(&r.model)? {
            if r.revision.is_some() {
                tracing::warn!(
                    "{}: a local directory has no revisions; `revision` ignored",
                    r.model
                );
            }
            return Ok(ModelFiles::local(r.clone(), dir));
        }
        validate_repo_id(&r.model)?;
        if self.settings.offline {
            self.resolve_offline(r)
        } else {
            self.resolve_online(r)
        }
    }

    /// `Some(dir)` when the reference names a local directory; an error when it looks like a
    /// path but is not there.
    fn local_dir(&self, model: &str) -> Result<Option<PathBuf>> {
        let expanded = match model.strip_prefix("~/") {
            Some(rest) => env("HOME").map(|h| PathBuf::from(h).join(rest)),
            None => None,
        }
        .unwrap_or_else(|| PathBuf::from(model));
        let mut candidates = Vec::new();
        if expanded.is_relative() {
            if let Some(base) = &self.base_dir {
                candidates.push(base.join(&expanded));
            }
        }
        candidates.push(expanded.clone());
        if let Some(found) = candidates.iter().find(|c| c.is_dir()) {
            return Ok(Some(found.clone()));
        }
        let looks_like_path = model.starts_with('/')
            || model.starts_with("./")
            || model.starts_with("../")
            || model.starts_with('~')
            || model.matches('/').count() > 1;
        if looks_like_path {
            return Err(Error::MissingFile {
                path: candidates.remove(0),
                hint: Some("model directory".into()),
            });
        }
        Ok(None)
    }

    fn resolve_online(&self, r: &ModelRef) -> Result<ModelFiles> {
        let api = self.api(&r.model)?;
        let revision = r.revision.clone().unwrap_or_else(|| "main".to_string());
        let repo = api.repo(Repo::with_revision(
            r.model.clone(),
            RepoType::Model,
            revision.clone(),
        ));
        let info = repo.info().map_err(|e| hub_error(&r.model, &revision, e))?;
        let files: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        // Remember branch/tag → commit like huggingface_hub does, so offline runs find it (a
        // cache that cannot be written only costs that).
        if revision != info.sha {
            let cached = Repo::with_revision(r.model.clone(), RepoType::Model, revision.clone());
            let _ = hf_hub::Cache::new(self.settings.cache_dir.clone())
                .repo(cached)
                .create_ref(&info.sha);
        }
        let pinned = Repo::with_revision(r.model.clone(), RepoType::Model, info.sha.clone());
        Ok(ModelFiles {
            reference: r.clone(),
            commit: Some(info.sha.clone()),
            backend: Backend::Hub(Arc::new(HubRepo {
                repo: api.repo(pinned.clone()),
                cache: hf_hub::Cache::new(self.settings.cache_dir.clone()).repo(pinned),
                files,
            })),
        })
    }

    fn resolve_offline(&self, r: &ModelRef) -> Result<ModelFiles> {
        let repo_dir = self.repo_cache_dir(&r.model);
        let revision = r.revision.clone().unwrap_or_else(|| "main".to_string());
        let sha = if is_commit_sha(&revision) {
            revision.clone()
        } else {
            let refs = repo_dir.join("refs").join(&revision);
            std::fs::read_to_string(&refs)
                .map(|s| s.trim().to_string())
                .map_err(|_| Error::Hub {
                    repo: r.model.clone(),
                    message: format!(
                        "revision `{revision}` is not in the cache {} and HF_HUB_OFFLINE is set; \
                         download it once online or unset HF_HUB_OFFLINE",
                        repo_dir.display()
                    ),
                })?
        };
        let snapshot = repo_dir.join("snapshots").join(&sha);
        if !snapshot.is_dir() {
            return Err(Error::Hub {
                repo: r.model.clone(),
                message: format!(
                    "commit {sha} is not in the cache {} and HF_HUB_OFFLINE is set",
                    repo_dir.display()
                ),
            });
        }
        Ok(ModelFiles {
            reference: r.clone(),
            commit: Some(sha),
            backend: Backend::Local(snapshot),
        })
    }

    /// `<cache>/models--org--name`, the layout huggingface_hub uses.
    pub fn repo_cache_dir(&self, repo_id: &str) -> PathBuf {
        self.settings
            .cache_dir
            .join(format!("models--{}", repo_id.replace('/', "--")))
    }
}

/// A 40-hex-digit commit id.
pub fn is_commit_sha(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_repo_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.matches('/').count() <= 1
        && id.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Hub {
            repo: id.to_string(),
            message: "neither a local directory nor a valid hub id (`org/name`)".into(),
        })
    }
}

fn hub_error(repo: &str, revision: &str, err: ApiError) -> Error {
    Error::Hub {
        repo: repo.to_string(),
        message: hub_message(revision, err),
    }
}

fn hub_message(revision: &str, err: ApiError) -> String {
    match &err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(401, _) | ureq::Error::Status(403, _) => format!(
                "needs a token: the repository is gated or private (HTTP {}); accept its terms on \
                 the hub and set HF_TOKEN",
                match e.as_ref() {
                    ureq::Error::Status(code, _) => *code,
                    _ => 0,
                }
            ),
            ureq::Error::Status(404, _) => {
                format!("not found on the hub (repository, revision `{revision}` or file)")
            }
            ureq::Error::Status(code, _) => format!("the hub answered HTTP {code}"),
            ureq::Error::Transport(t) => format!(
                "cannot reach the hub ({t}); set HF_HUB_OFFLINE=1 to use the local cache only"
            ),
        },
        other => other.to_string(),
    }
}

/// The files of one resolved model, fetched on demand.
#[derive(Clone)]
pub struct ModelFiles {
    /// The reference this was resolved from.
    pub reference: ModelRef,
    /// The commit a hub reference resolved to (`None` for local directories).
    pub commit: Option<String>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Local(PathBuf),
    Hub(Arc<HubRepo>),
}

struct HubRepo {
    repo: hf_hub::api::sync::ApiRepo,
    /// The repository at the pinned commit in the cache.
    cache: hf_hub::CacheRepo,
    /// The repository's file list at the pinned commit.
    files: BTreeSet<String>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelFiles({})", self.describe())
    }
}

/// Files a loadable model needs besides weights, copied from the reference model of
/// a merge, and fetched with a model that is loaded for evaluation.
pub const SIDE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "generation_config.json",
];

impl ModelFiles {
    /// The directory of a model ready to load: a local directory as it is; for a hub model,
    /// the cache snapshot after fetching `config.json` and the [`SIDE_FILES`] it has (the
    /// weights come with opening its checkpoint).
    pub fn model_dir(&self) -> Result<PathBuf> {
        if let Some(d) = self.local_dir() {
            return Ok(d.to_path_buf());
        }
        let config = self.require("config.json")?;
        for f in SIDE_FILES {
            self.get(f)?;
        }
        Ok(config
            .parent()
            .expect("a file in the snapshot directory")
            .to_path_buf())
    }

    /// Files of a local directory.
    pub fn local(reference: ModelRef, dir: PathBuf) -> Self {
        ModelFiles {
            reference,
            commit: None,
            backend: Backend::Local(dir),
        }
    }

    /// `org/name@sha` or the directory, for messages and model cards.
    pub fn describe(&self) -> String {
        match &self.commit {
            Some(c) => format!("{}@{}", self.reference.model, c),
            None => self.reference.model.clone(),
        }
    }

    /// Whether the model has `name` (without downloading it).
    pub fn has(&self, name: &str) -> bool {
        match &self.backend {
            Backend::Local(dir) => dir.join(name).is_file(),
            Backend::Hub(h) => h.files.contains(name),
        }
    }

    /// The local path of `name`, downloading it first from the hub if needed; `Ok(None)` when
    /// the model has no such file.
    pub fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        match &self.backend {
            Backend::Local(dir) => {
                let p = dir.join(name);
                Ok(p.is_file().then_some(p))
            }
            Backend::Hub(h) => {
                if !self.has(name) {
                    return Ok(None);
                }
                tracing::info!("fetching {} from {}", name, self.describe());
                // Retried when transient, checked against the hub's ETag (see hub-download).
                let message = match hub_download::get(&h.repo, &h.cache, name, 2) {
                    Ok(path) => return Ok(Some(path)),
                    Err(hub_download::Failure::Api(e)) => {
                        hub_message(self.commit.as_deref().unwrap_or_default(), e)
                    }
                    Err(corrupt) => corrupt.to_string(),
                };
                Err(Error::Hub {
                    repo: self.describe(),
                    message: format!("{name}: {message}"),
                })
            }
        }
    }

    /// Like [`ModelFiles::get`], but a missing file is an error.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        self.get(name)?.ok_or_else(|| Error::MissingFile {
            path: match &self.backend {
                Backend::Local(dir) => dir.join(name),
                Backend::Hub(_) => PathBuf::from(format!("{}/{}", self.describe(), name)),
            },
            hint: None,
        })
    }

    /// The directory the fetched files live in (a local dir or a cache snapshot).
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(d) => Some(d),
            Backend::Hub(_) => None,
        }
    }

    /// Parse a JSON file of the model, if it has one.
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        let Some(path) = self.get(name)? else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                path,
                message: format!("invalid JSON: {e}"),
            })
    }
}
