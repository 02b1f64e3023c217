//! A local server on 127.0.0.1 that speaks the part of the Hugging Face Hub's HTTP API the
//! kit uses: revision resolution (`GET /api/models/{id}/revision/{rev}`), file download
//! (`GET /{id}/resolve/{rev}/{file}` with `Range`, `ETag`, `X-Repo-Commit`), model info with
//! safetensors parameter counts and dates, and gated repositories that answer 401 without a
//! token. It records every request so tests can assert what was (not) downloaded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};
use tiny_http::{Header, Response, Server};

/// An endpoint where nothing listens (port 9, discard): any hub access fails at once.
pub const CLOSED_ENDPOINT: &str = "http://127.0.0.1:9";

/// One repository revision served by the hub.
#[derive(Debug, Clone, Default)]
pub struct RepoRevision {
    /// Commit sha (40 hex).
    pub sha: String,
    /// File name → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
    /// ISO date of the commit (`lastModified`).
    pub last_modified: String,
}

/// One repository.
#[derive(Debug, Clone, Default)]
pub struct Repo {
    /// Branches and tags → commit sha.
    pub refs: BTreeMap<String, String>,
    /// Commits.
    pub commits: BTreeMap<String, RepoRevision>,
    /// Requests need `Authorization: Bearer <token>` with this token.
    pub gated_token: Option<String>,
    /// Licence reported by model info.
    pub license: Option<String>,
    /// Parameter count reported by model info (`safetensors.total`).
    pub parameters: Option<u64>,
}

impl Repo {
    /// A repo with one commit, `main` pointing at it.
    pub fn single(sha: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let mut r = Repo::default();
        r.refs.insert("main".into(), sha.into());
        r.commits.insert(
            sha.into(),
            RepoRevision {
                sha: sha.into(),
                files,
                last_modified: "2024-04-01T00:00:00.000Z".into(),
            },
        );
        r
    }

    /// Read every file of a local directory (not recursive) into a file map.
    pub fn files_from_dir(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).expect("read model dir") {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        files
    }
}

/// The running server.
pub struct HubServer {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    repos: Arc<Mutex<BTreeMap<String, Repo>>>,
    log: Arc<Mutex<Vec<String>>>,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Start serving `repos` (id → repo) on a free port of 127.0.0.1.
    pub fn start(repos: BTreeMap<String, Repo>) -> Self {
        let server = Arc::new(Server::http("127.0.0.1:0").expect("bind 127.0.0.1"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let repos = Arc::new(Mutex::new(repos));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, r, l) = (server.clone(), repos.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                let resp = handle(&req, &r.lock().unwrap());
                l.lock()
                    .unwrap()
                    .push(format!("{} {}", req.method(), req.url()));
                let _ = req.respond(resp);
            }
        });
        HubServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            repos,
            log,
            server,
            thread: Some(thread),
        }
    }

    /// Start serving one repository, `id`.
    pub fn serve(id: &str, repo: Repo) -> Self {
        Self::start(BTreeMap::from([(id.to_string(), repo)]))
    }

    /// Every request so far, as `METHOD /path`.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Change the served repos.
    pub fn repos(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Repo>> {
        self.repos.lock().unwrap()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Resp = Response<std::io::Cursor<Vec<u8>>>;

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn error(code: u16, kind: &str, message: &str) -> Resp {
    Response::from_string(serde_json::json!({ "error": message }).to_string())
        .with_status_code(code)
        .with_header(header("X-Error-Code", kind))
        .with_header(header("Content-Type", "application/json"))
}

fn authorized(req: &tiny_http::Request, repo: &Repo) -> bool {
    match &repo.gated_token {
        None => true,
        Some(token) => req.headers().iter().any(|h| {
            h.field.equiv("Authorization") && h.value.as_str() == format!("Bearer {token}")
        }),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(req: &tiny_http::Request, repos: &BTreeMap<String, Repo>) -> Resp {
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let parts: Vec<String> = url
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    // /api/models/{org}/{name}[/revision/{rev}]
    if parts.len() >= 4 && parts[0] == "api" && parts[1] == "models" {
        let id = format!("{}/{}", parts[2], parts[3]);
        let Some(repo) = repos.get(&id) else {
            return error(404, "RepoNotFound", &format!("Repository not found: {id}"));
        };
        if !authorized(req, repo) {
            return error(
                401,
                "GatedRepo",
                &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it."),
            );
        }
        let rev = if parts.len() >= 6 && parts[4] == "revision" {
            parts[5..].join("/")
        } else {
            "main".to_string()
        };
        let sha = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
        let Some(commit) = repo.commits.get(&sha) else {
            return error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
        };
        let siblings: Vec<_> = commit
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let mut info = serde_json::json!({
            "id": id,
            "modelId": id,
            "sha": commit.sha,
            "lastModified": commit.last_modified,
            "gated": repo.gated_token.is_some(),
            "private": false,
            "siblings": siblings,
        });
        if let Some(l) = &repo.license {
            info["cardData"] = serde_json::json!({ "license": l });
        }
        if let Some(p) = repo.parameters {
            info["safetensors"] = serde_json::json!({ "total": p, "parameters": { "F32": p } });
        }
        return Response::from_string(info.to_string())
            .with_header(header("Content-Type", "application/json"));
    }
    // /{org}/{name}/resolve/{rev}/{file...}
    if parts.len() >= 5 && parts[2] == "resolve" {
        let id = format!("{}/{}", parts[0], parts[1]);
        let Some(repo) = repos.get(&id) else {
            return error(404, "RepoNotFound", &format!("Repository not found: {id}"));
        };
        if !authorized(req, repo) {
            return error(
                401,
                "GatedRepo",
                &format!("Access to model {id} is restricted."),
            );
        }
        let rev = &parts[3];
        let file = parts[4..].join("/");
        let sha = repo.refs.get(rev).cloned().unwrap_or(rev.clone());
        let Some(commit) = repo.commits.get(&sha) else {
            return error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
        };
        let Some(bytes) = commit.files.get(&file) else {
            return error(404, "EntryNotFound", &format!("{file} does not exist"));
        };
        let etag = format!("\"{:x}\"", Sha256::digest(bytes));
        let total = bytes.len();
        let range = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Range"))
            .map(|h| h.value.as_str().to_string());
        let (status, body, content_range) =
            match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) => {
                    let (a, b) = r.split_once('-').unwrap_or((r, ""));
                    let start: usize = a.parse().unwrap_or(0).min(total);
                    let end: usize = b
                        .parse::<usize>()
                        .map(|e| e + 1)
                        .unwrap_or(total)
                        .min(total);
                    let last = end.max(start + 1) - 1;
                    (
                        206,
                        bytes[start..end.max(start)].to_vec(),
                        Some(format!("bytes {start}-{last}/{total}")),
                    )
                }
                None => (200, bytes.clone(), None),
            };
        let mut resp = Response::from_data(body)
            .with_status_code(status)
            .with_header(header("ETag", &etag))
            .with_header(header("X-Repo-Commit", &commit.sha))
            .with_header(header("Accept-Ranges", "bytes"));
        if let Some(cr) = content_range {
            resp = resp.with_header(header("Content-Range", &cr));
        }
        return resp;
    }
    error(404, "NotFound", &format!("no route for {url}"))
}
