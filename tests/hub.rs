//! A local server on 127.0.0.1 that speaks the part of the Hugging Face Hub's HTTP API the
//! kit uses: revision resolution (`GET /api/models/{id}/revision/{rev}`), file download
//! (`GET /{id}/resolve/{rev}/{file}` with `Range`, `ETag`, `X-Repo-Commit`), model info with
//! safetensors parameter counts and dates, and gated repositories that answer 401 without a
//! token. It records every request so tests can assert what was (not) downloaded.
//!
//! ETags are the hub's: the sha256 of the content for LFS files (weights, also sent as
//! `X-Linked-Etag`), the git blob sha1 for the others. Tests make it misbehave on purpose
//! with [`HubServer::fault`]: an HTTP error, a connection dropped mid-body, a body truncated
//! with a Content-Length that matches it, or a corrupt body.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha1::Sha1;
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

/// A way the server misbehaves on a file's next requests (see [`HubServer::fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer every request for the file (size probes included) with this HTTP status.
    Status(u16),
    /// Redirect the download (as the hub redirects to its CDN) to a server that promises the
    /// whole body (its Content-Length) but sends only this many bytes, then closes the
    /// connection.
    DropAfter(usize),
    /// Send the first half of the body with a Content-Length of that half: a clean response
    /// that is simply short.
    Truncate,
    /// Send the body with every byte inverted: the right length, the wrong content.
    Corrupt,
}

type Faults = Arc<Mutex<Vec<(String, Fault, usize)>>>;

/// The running server.
pub struct HubServer {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    repos: Arc<Mutex<BTreeMap<String, Repo>>>,
    faults: Faults,
    log: Arc<Mutex<Vec<String>>>,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    /// Held for its thread: stopped when the server is dropped.
    _dropper: Dropper,
}

/// A raw TCP server standing in for the CDN a hub redirects downloads to, for
/// [`Fault::DropAfter`]: it answers each connection with the next prepared response (headers
/// promising more than follows) and closes it. tiny_http cannot close a connection mid-body
/// (it keeps the socket open for the next request, so the client would wait forever).
struct Dropper {
    port: u16,
    pending: Arc<Mutex<std::collections::VecDeque<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dropper {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let pending: Arc<Mutex<std::collections::VecDeque<Vec<u8>>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (p, st) = (pending.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                // The request, up to the blank line ending its headers.
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0)
                    && line != "\r\n"
                {
                    line.clear();
                }
                let response = p.lock().unwrap().pop_front().unwrap_or_default();
                let _ = conn.write_all(&response);
                let _ = conn.flush();
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        });
        Dropper {
            port,
            pending,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dropper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HubServer {
    /// Start serving `repos` (id → repo) on a free port of 127.0.0.1.
    pub fn start(repos: BTreeMap<String, Repo>) -> Self {
        let server = Arc::new(Server::http("127.0.0.1:0").expect("bind 127.0.0.1"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let repos = Arc::new(Mutex::new(repos));
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults: Faults = Arc::default();
        let dropper = Dropper::start();
        let (s, r, l, f) = (server.clone(), repos.clone(), log.clone(), faults.clone());
        let (dport, dpending) = (dropper.port, dropper.pending.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                let resp = handle(&req, &r.lock().unwrap());
                l.lock()
                    .unwrap()
                    .push(format!("{} {}", req.method(), req.url()));
                let _ = match take_fault(&f, &req) {
                    Some(fault) => misbehave(req, resp, fault, (dport, &dpending)),
                    None => req.respond(resp),
                };
            }
        });
        HubServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            repos,
            faults,
            log,
            server,
            thread: Some(thread),
            _dropper: dropper,
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

    /// Misbehave with `fault` on the next `times` requests for files named `file` (in any
    /// repository): downloads only, except [`Fault::Status`], which also answers the size
    /// probe (`Range: bytes=0-0`) a download starts with.
    pub fn fault(&self, file: &str, fault: Fault, times: usize) {
        self.faults
            .lock()
            .unwrap()
            .push((file.to_string(), fault, times));
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

/// The fault to apply to `req`, if one is pending for its file (and counts it).
fn take_fault(faults: &Faults, req: &tiny_http::Request) -> Option<Fault> {
    let url = req.url();
    if !url.contains("/resolve/") {
        return None;
    }
    let probe = req
        .headers()
        .iter()
        .any(|h| h.field.equiv("Range") && h.value.as_str() == "bytes=0-0");
    let mut faults = faults.lock().unwrap();
    let (_, fault, times) = faults.iter_mut().find(|(file, fault, times)| {
        *times > 0
            && url.ends_with(&format!("/{file}"))
            && (!probe || matches!(fault, Fault::Status(_)))
    })?;
    *times -= 1;
    Some(*fault)
}

/// Answers `req` as `fault` says, from the good response `resp`.
fn misbehave(
    req: tiny_http::Request,
    resp: Resp,
    fault: Fault,
    (drop_port, drop_pending): (u16, &Mutex<std::collections::VecDeque<Vec<u8>>>),
) -> std::io::Result<()> {
    let status = resp.status_code();
    let headers = resp.headers().to_vec();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)?;
    match fault {
        Fault::Status(code) => req.respond(error(code, "Injected", "injected failure")),
        Fault::Corrupt => {
            body.iter_mut().for_each(|b| *b = !*b);
            req.respond(Response::new(
                status,
                headers,
                &body[..],
                Some(body.len()),
                None,
            ))
        }
        Fault::Truncate => {
            let half = &body[..body.len() / 2];
            req.respond(Response::new(status, headers, half, Some(half.len()), None))
        }
        Fault::DropAfter(n) => {
            // Headers promising the whole body, then part of it, then the connection closes:
            // sent by the dropper, which the download is redirected to (as the hub redirects
            // to its CDN).
            let mut head = format!("HTTP/1.1 {} Injected\r\n", status.0);
            for h in headers.iter().filter(|h| !h.field.equiv("Content-Length")) {
                head.push_str(&format!("{}: {}\r\n", h.field, h.value));
            }
            head.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&body[..n.min(body.len())]);
            drop_pending.lock().unwrap().push_back(bytes);
            let location = format!("http://127.0.0.1:{drop_port}/dropped");
            req.respond(Response::empty(302).with_header(header("Location", &location)))
        }
    }
}

/// The hub's ETag of a file: the sha256 of LFS files (weights), the git blob sha1 of others.
fn etag(file: &str, bytes: &[u8]) -> (String, bool) {
    let lfs = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".onnx",
        ".msgpack",
    ]
    .iter()
    .any(|e| file.ends_with(e));
    if lfs {
        (format!("{:x}", Sha256::digest(bytes)), true)
    } else {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", bytes.len()).as_bytes());
        h.update(bytes);
        (format!("{:x}", h.finalize()), false)
    }
}

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
        let (etag, lfs) = etag(&file, bytes);
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
            .with_header(header("ETag", &format!("\"{etag}\"")))
            .with_header(header("X-Repo-Commit", &commit.sha))
            .with_header(header("Accept-Ranges", "bytes"));
        if lfs {
            resp = resp.with_header(header("X-Linked-Etag", &format!("\"{etag}\"")));
        }
        if let Some(cr) = content_range {
            resp = resp.with_header(header("Content-Range", &cr));
        }
        return resp;
    }
    error(404, "NotFound", &format!("no route for {url}"))
}
