//! `llm-merging fetch-data`: the official validation and test CSVs, checked by sha256.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use sha2::{Digest, Sha256};

/// The starter kit's repository and the commit the files are pinned to.
pub const KIT_REPO: &str = "llm-merging/LLM-Merging";
/// Commit of the starter kit the files come from.
pub const KIT_COMMIT: &str = "c260fc5edb6bab9794cf2ac383948b5de0ed08fc";
/// Where raw files of that repository are served.
pub const DEFAULT_BASE_URL: &str = "https://raw.githubusercontent.com";

/// The official files: path under `data/`, sha256.
pub const FILES: [(&str, &str); 3] = [
    (
        "validation/cosmos_qa.csv",
        "460259d829c40cbacde084ea4f03c2adc8a74b546af927fabdfb4acd70e9e5e0",
    ),
    (
        "validation/xsum.csv",
        "7eb66b63e5c9730e4c8ccbee0737746ae8d853a6570241aeb90cdd2ff33b24dc",
    ),
    (
        "test.csv",
        "3276785cd36602635a483856c18967999f37c91f0d7cf7df252f2aea5cfbb97f",
    ),
];

/// Arguments of `llm-merging fetch-data`.
#[derive(Args, Debug)]
pub struct FetchDataArgs {
    /// Where to put the files (default: `data/` of the workspace, or `LLM_MERGING_DATA`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Server of raw repository files (default: GitHub's; `LLM_MERGING_DATA_URL` also sets it).
    #[arg(long)]
    pub base_url: Option<String>,
}

/// The default data directory: `LLM_MERGING_DATA`, else `<workspace>/data`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var("LLM_MERGING_DATA") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            crate::entry::workspace_root(&std::env::current_dir().unwrap_or_default()).join("data")
        }
    }
}

/// Run `llm-merging fetch-data`.
pub fn run(args: FetchDataArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(default_data_dir);
    let base = args
        .base_url
        .or_else(|| {
            std::env::var("LLM_MERGING_DATA_URL")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    fetch_files(&base, &dir, &FILES)
}

/// Download `files` (path under `data/` of the kit repository, sha256) from `base` into
/// `dir`, skipping files already present with the right hash. A file whose download fails or
/// whose hash differs is not written.
pub fn fetch_files(base: &str, dir: &Path, files: &[(&str, &str)]) -> Result<()> {
    for (rel, sha) in files {
        let dest = dir.join(rel);
        if dest.is_file() && crate::package::sha256_file(&dest)? == *sha {
            println!("{}: present, sha256 ok", dest.display());
            continue;
        }
        let url = format!(
            "{}/{KIT_REPO}/{KIT_COMMIT}/data/{rel}",
            base.trim_end_matches('/')
        );
        let bytes = match download(&url) {
            Ok(b) => b,
            Err(e) => bail!(
                "cannot download {url} ({e:#}). Without network, copy the official files from a checkout of \
                 github.com/{KIT_REPO} at commit {KIT_COMMIT} by hand: data/validation/cosmos_qa.csv, \
                 data/validation/xsum.csv and data/test.csv into {}",
                dir.display()
            ),
        };
        let got = format!("{:x}", Sha256::digest(&bytes));
        if got != *sha {
            bail!("{url}: sha256 {got} does not match the pinned {sha}; nothing written");
        }
        let parent = dest.parent().expect("file under dir");
        std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
        std::io::Write::write_all(&mut tmp, &bytes)?;
        tmp.persist(&dest)
            .with_context(|| format!("{}", dest.display()))?;
        println!("{}: downloaded, sha256 ok", dest.display());
    }
    Ok(())
}

fn download(url: &str) -> Result<Vec<u8>> {
    let resp = ureq::get(url)
        .timeout(std::time::Duration::from_secs(60))
        .call()?;
    let mut bytes = Vec::new();
    resp.into_reader().take(64 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw-file server on 127.0.0.1 serving `files` (URL path → bytes).
    fn serve(files: Vec<(String, Vec<u8>)>) -> (String, std::thread::JoinHandle<()>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let handle = std::thread::spawn(move || {
            for _ in 0..files.len() + 2 {
                let Ok(Some(req)) = server.recv_timeout(std::time::Duration::from_secs(5)) else {
                    return;
                };
                let body = files
                    .iter()
                    .find(|(p, _)| p == req.url())
                    .map(|(_, b)| b.clone());
                let _ = match body {
                    Some(b) => req.respond(tiny_http::Response::from_data(b)),
                    None => req.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        (format!("http://127.0.0.1:{port}"), handle)
    }

    #[test]
    fn downloads_verifies_and_skips_present_files() {
        let tmp = tempfile::tempdir().unwrap();
        let good = b"id,input,target,answer_choices,eval_type\n".to_vec();
        let sha = format!("{:x}", Sha256::digest(&good));
        let (base, h) = serve(vec![(
            format!("/{KIT_REPO}/{KIT_COMMIT}/data/validation/x.csv"),
            good.clone(),
        )]);
        let files = [("validation/x.csv", sha.as_str())];
        fetch_files(&base, tmp.path(), &files).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("validation/x.csv")).unwrap(),
            good
        );
        // Present with the right hash: no request needed (the server may be gone).
        drop(h);
        fetch_files("http://127.0.0.1:9", tmp.path(), &files).unwrap();
    }

    #[test]
    fn wrong_bytes_are_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, _h) = serve(vec![(
            format!("/{KIT_REPO}/{KIT_COMMIT}/data/test.csv"),
            b"tampered".to_vec(),
        )]);
        let err = fetch_files(&base, tmp.path(), &[("test.csv", FILES[2].1)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the pinned"), "{err}");
        assert!(!tmp.path().join("test.csv").exists());
    }

    #[test]
    fn offline_says_where_to_put_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            fetch_files("http://127.0.0.1:9", tmp.path(), &FILES).unwrap_err()
        );
        assert!(err.contains("by hand") && err.contains(KIT_COMMIT), "{err}");
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");
    }
}
