//! `llm-merging check --entry DIR`: the competition's rules on the models an entry uses,
//! checked from the hub's metadata before anyone spends a GPU hour.
//!
//! - every hub model pinned to a full commit sha;
//! - at most 8B parameters per model (the hub's safetensors metadata, else the safetensors
//!   headers read with HTTP range requests: no weights are downloaded);
//! - the pinned revision dated on or before 2024-05-31;
//! - the licence shown.

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::Args;
use merge_core::source::{is_commit_sha, HubSettings, ModelRef};

use crate::entry::Entry;

/// The parameter limit per model.
pub const MAX_PARAMETERS: u64 = 8_000_000_000;
/// The last allowed revision date (inclusive), ISO.
pub const LAST_DATE: &str = "2024-05-31";

/// Arguments of `llm-merging check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The entry directory (or its name under submissions/).
    #[arg(long)]
    pub entry: std::path::PathBuf,
}

/// One model's verdicts.
#[derive(Debug, Clone)]
pub struct ModelCheck {
    /// Role in the entry (base, model 1, adapter base, ...).
    pub role: String,
    /// The reference.
    pub reference: ModelRef,
    /// `None` for local directories (not on the hub: rules cannot be checked).
    pub hub: Option<HubFacts>,
}

/// What the hub says about a model at its revision.
#[derive(Debug, Clone)]
pub struct HubFacts {
    /// The commit the revision resolves to.
    pub sha: String,
    /// Parameter count, if known.
    pub parameters: Option<u64>,
    /// Date of the revision (ISO 8601).
    pub date: Option<String>,
    /// Licence, if declared.
    pub license: Option<String>,
    /// The adapter's base model, when the repo is a PEFT adapter.
    pub adapter_base: Option<ModelRef>,
}

impl ModelCheck {
    /// Rule verdicts: (pinned, size, date); `None` where the rule does not apply.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let Some(h) = &self.hub else {
            return v;
        };
        let who = &self.reference.model;
        match &self.reference.revision {
            Some(r) if is_commit_sha(r) => {}
            Some(r) => v.push(format!(
                "{who}: revision `{r}` is not a full commit sha (pin {})",
                h.sha
            )),
            None => v.push(format!(
                "{who}: no revision; pin it to a commit (now {})",
                h.sha
            )),
        }
        match h.parameters {
            Some(p) if p > MAX_PARAMETERS => v.push(format!(
                "{who}: {:.2}B parameters, over the {}B limit",
                p as f64 / 1e9,
                MAX_PARAMETERS / 1_000_000_000
            )),
            Some(_) => {}
            None => v.push(format!("{who}: parameter count unknown")),
        }
        match &h.date {
            Some(d) if d.get(..10).is_some_and(|day| day > LAST_DATE) => v.push(format!(
                "{who}: revision dated {}, after {LAST_DATE}",
                &d[..10]
            )),
            Some(_) => {}
            None => v.push(format!("{who}: revision date unknown")),
        }
        v
    }
}

fn api_get(settings: &HubSettings, url: &str) -> Result<ureq::Response> {
    let mut req = ureq::get(url).timeout(std::time::Duration::from_secs(30));
    if let Some(t) = &settings.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(401 | 403, _)) => {
            bail!("{url}: needs a token (gated or private repository); set HF_TOKEN")
        }
        Err(ureq::Error::Status(404, _)) => bail!("{url}: not found on the hub"),
        Err(e) => Err(anyhow::anyhow!("{url}: {e}")),
    }
}

fn api_json(settings: &HubSettings, url: &str) -> Result<serde_json::Value> {
    Ok(api_get(settings, url)?.into_json()?)
}

/// Count parameters from the safetensors headers of a repo at `sha`, via range requests.
fn count_from_headers(
    settings: &HubSettings,
    id: &str,
    sha: &str,
    files: &[String],
) -> Result<Option<u64>> {
    let resolve = |f: &str| format!("{}/{id}/resolve/{sha}/{f}", settings.endpoint);
    let mut shards: Vec<String> = Vec::new();
    if files.iter().any(|f| f == "model.safetensors.index.json") {
        let index = api_json(settings, &resolve("model.safetensors.index.json"))?;
        if let Some(map) = index["weight_map"].as_object() {
            for f in map.values().filter_map(|v| v.as_str()) {
                if !shards.iter().any(|s| s == f) {
                    shards.push(f.to_string());
                }
            }
        }
    } else if files.iter().any(|f| f == "model.safetensors") {
        shards.push("model.safetensors".into());
    } else {
        return Ok(None);
    }
    let mut total = 0u64;
    for shard in shards {
        let url = resolve(&shard);
        let range = |r: &str| -> Result<Vec<u8>> {
            let mut req = ureq::get(&url).set("Range", r);
            if let Some(t) = &settings.token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let mut buf = Vec::new();
            req.call()?
                .into_reader()
                .take(100 << 20)
                .read_to_end(&mut buf)?;
            Ok(buf)
        };
        let len_bytes = range("bytes=0-7")?;
        let len = u64::from_le_bytes(
            len_bytes
                .get(..8)
                .context("short safetensors header")?
                .try_into()?,
        );
        if len > 100 << 20 {
            bail!("{url}: implausible safetensors header length {len}");
        }
        let header: serde_json::Value =
            serde_json::from_slice(&range(&format!("bytes=8-{}", 8 + len - 1))?)
                .with_context(|| format!("{url}: invalid safetensors header"))?;
        for (name, info) in header.as_object().context("header is not an object")? {
            if name == "__metadata__" {
                continue;
            }
            let n: u64 = info["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(|d| d.as_u64()).product())
                .unwrap_or(0);
            total += n;
        }
    }
    Ok(Some(total))
}

/// Ask the hub about one model.
pub fn hub_facts(settings: &HubSettings, r: &ModelRef) -> Result<HubFacts> {
    let rev = r.revision.clone().unwrap_or_else(|| "main".into());
    let info = api_json(
        settings,
        &format!(
            "{}/api/models/{}/revision/{}",
            settings.endpoint, r.model, rev
        ),
    )
    .with_context(|| format!("model info of {r}"))?;
    let sha = info["sha"]
        .as_str()
        .context("model info has no sha")?
        .to_string();
    let files: Vec<String> = info["siblings"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|f| f["rfilename"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let license = info["cardData"]["license"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            info["tags"].as_array().and_then(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str())
                    .find_map(|t| t.strip_prefix("license:").map(str::to_string))
            })
        });
    let adapter_base = if files.iter().any(|f| f == "adapter_config.json") {
        let cfg = api_json(
            settings,
            &format!(
                "{}/{}/resolve/{sha}/adapter_config.json",
                settings.endpoint, r.model
            ),
        )?;
        cfg["base_model_name_or_path"].as_str().map(|b| ModelRef {
            model: b.to_string(),
            revision: cfg["revision"].as_str().map(str::to_string),
        })
    } else {
        None
    };
    let parameters = match info["safetensors"]["total"].as_u64() {
        Some(p) => Some(p),
        None if adapter_base.is_some() => Some(0),
        None => count_from_headers(settings, &r.model, &sha, &files)?,
    };
    Ok(HubFacts {
        sha,
        parameters,
        date: info["lastModified"].as_str().map(str::to_string),
        license,
        adapter_base,
    })
}

/// Whether a model is local (a directory, or the demo family built on this machine): not on
/// the hub, so the hub's rules cannot be checked for it.
fn is_local(entry: &Entry, r: &ModelRef) -> bool {
    r.model.starts_with(demo::DEMO_PREFIX)
        || entry.dir.join(&r.model).is_dir()
        || std::path::Path::new(&r.model).is_dir()
}

/// The hub models of an entry not pinned to a full commit sha, each as a violation; needs no
/// network (adapters' own bases are checked by [`check_entry`]).
pub fn unpinned(entry: &Entry) -> Vec<String> {
    let cfg = &entry.file.merge;
    cfg.base_ref()
        .into_iter()
        .chain(cfg.model_refs())
        .filter(|r| !is_local(entry, r))
        .filter_map(|r| match &r.revision {
            Some(rev) if is_commit_sha(rev) => None,
            Some(rev) => Some(format!(
                "{}: revision `{rev}` is not a full commit sha",
                r.model
            )),
            None => Some(format!("{}: no revision; pin it to a commit", r.model)),
        })
        .collect()
}

/// Check every model of an entry.
pub fn check_entry(entry: &Entry, settings: &HubSettings) -> Result<Vec<ModelCheck>> {
    let cfg = &entry.file.merge;
    let mut refs: Vec<(String, ModelRef)> = Vec::new();
    if let Some(b) = cfg.base_ref() {
        refs.push(("base".into(), b));
    }
    for (i, m) in cfg.model_refs().into_iter().enumerate() {
        refs.push((format!("model {}", i + 1), m));
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < refs.len() {
        let (role, r) = refs[i].clone();
        i += 1;
        if is_local(entry, &r) || settings.offline {
            out.push(ModelCheck {
                role,
                reference: r,
                hub: None,
            });
            continue;
        }
        let facts = hub_facts(settings, &r)?;
        if let Some(base) = &facts.adapter_base {
            // An adapter's base is a model of the entry too (unless the config names it).
            if cfg.base_model.is_none() && !refs.iter().any(|(_, x)| x.model == base.model) {
                refs.push((format!("base of {}", r.model), base.clone()));
            }
        }
        out.push(ModelCheck {
            role,
            reference: r,
            hub: Some(facts),
        });
    }
    Ok(out)
}

/// 8.03B, 1.03M, 512.
fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

/// Print the table and return the violations.
pub fn report(checks: &[ModelCheck]) -> Vec<String> {
    println!(
        "{:<16} {:<48} {:<8} {:>10} {:<12} {:<14} verdict",
        "role", "model", "pinned", "params", "date", "licence"
    );
    let mut all = Vec::new();
    for c in checks {
        let (pinned, params, date, license) = match &c.hub {
            None => (
                "local".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ),
            Some(h) => (
                if c.reference.revision.as_deref().is_some_and(is_commit_sha) {
                    "yes".into()
                } else {
                    "NO".into()
                },
                h.parameters.map(human_count).unwrap_or_else(|| "?".into()),
                h.date
                    .as_deref()
                    .map(|d| d.chars().take(10).collect())
                    .unwrap_or_else(|| "?".into()),
                h.license.clone().unwrap_or_else(|| "unknown".into()),
            ),
        };
        let v = c.violations();
        let verdict = if c.hub.is_none() {
            "not on the hub (not checked)".to_string()
        } else if v.is_empty() {
            "ok".to_string()
        } else {
            "VIOLATION".to_string()
        };
        println!(
            "{:<16} {:<48} {:<8} {:>10} {:<12} {:<14} {}",
            c.role, c.reference.model, pinned, params, date, license, verdict
        );
        all.extend(v);
    }
    all
}

/// Run `llm-merging check`.
pub fn run(args: CheckArgs) -> Result<()> {
    let entry = Entry::load(&args.entry)?;
    let settings = HubSettings::from_env();
    let checks = check_entry(&entry, &settings)?;
    let violations = report(&checks);
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("violation: {v}");
        }
        bail!(
            "{} rule violation(s) in entry {}",
            violations.len(),
            entry.name
        );
    }
    println!("entry {}: every rule holds", entry.name);
    Ok(())
}
