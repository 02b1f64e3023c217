//! Packaging an entry: the validated `submission.csv`, `scores.json`, `manifest.json` and a
//! deterministic tar of the workspace source, under `dist/<entry>/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Directory names never packed: build outputs, outputs, VCS, caches, environments.
const SKIP_DIRS: [&str; 12] = [
    "target",
    "dist",
    ".git",
    ".cache",
    "__pycache__",
    "node_modules",
    ".venv",
    "venv",
    ".pytest_cache",
    ".mypy_cache",
    ".idea",
    ".vscode",
];

/// File endings of model weights, never packed.
const WEIGHT_ENDINGS: [&str; 8] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".onnx",
    ".msgpack",
];

/// File names of secrets, never packed.
fn is_secret(name: &str) -> bool {
    name == ".env"
        || name.starts_with(".env.")
        || name == "token"
        || name.ends_with(".token")
        || name == ".netrc"
        || name == ".git-credentials"
        || name.starts_with("id_rsa")
        || name.starts_with("id_ed25519")
        || name.ends_with(".pem")
}

/// Whether a path (relative to the workspace) goes into the tar.
pub fn packable(rel: &Path) -> bool {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let Some(name) = parts.last() else {
        return false;
    };
    if parts[..parts.len() - 1]
        .iter()
        .any(|d| SKIP_DIRS.contains(&d.as_str()) || d.starts_with(".venv") || d == ".huggingface")
    {
        return false;
    }
    !(is_secret(name) || WEIGHT_ENDINGS.iter().any(|e| name.ends_with(e)))
}

/// Every packable file under `root`, sorted, as relative paths. Symbolic links are skipped
/// (they would point outside the tree or duplicate it).
pub fn source_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            let child = rel.join(e.file_name());
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                if !(SKIP_DIRS.contains(&name.as_str())
                    || name.starts_with(".venv")
                    || name == ".huggingface")
                {
                    stack.push(child);
                }
            } else if ft.is_file() && packable(&child) {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Write a deterministic tar of `files` (relative to `root`, as [`source_files`] lists them)
/// to `dest`, plus `extra` (name, contents) files written at the top: entries under one
/// top-level directory, mtime fixed, owner 0:0, modes 0644/0755. Refuses (naming the file) if
/// any file contains `secret`. Returns the number of entries.
pub fn write_tar(
    root: &Path,
    files: &[PathBuf],
    top: &str,
    dest: &Path,
    secret: Option<&str>,
    extra: &[(&str, &[u8])],
) -> Result<usize> {
    let parent = dest.parent().context("tar destination has no parent")?;
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::NamedTempFile::new_in(parent)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(tmp.reopen()?));
    builder.mode(tar::HeaderMode::Deterministic);
    let header = |len: usize, executable: bool| {
        let mut header = tar::Header::new_gnu();
        header.set_size(len as u64);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header
    };
    for (name, data) in extra {
        builder
            .append_data(
                &mut header(data.len(), false),
                Path::new(top).join(name),
                *data,
            )
            .with_context(|| format!("adding {name} to the tar"))?;
    }
    for rel in files {
        let path = root.join(rel);
        let data = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        if let Some(s) = secret.filter(|s| s.len() >= 8) {
            if data.windows(s.len()).any(|w| w == s.as_bytes()) {
                bail!(
                    "{} contains the HF token; remove it before packaging (nothing written)",
                    path.display()
                );
            }
        }
        let executable = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&path)?.permissions().mode() & 0o111 != 0
        };
        let name = Path::new(top).join(rel);
        builder
            .append_data(&mut header(data.len(), executable), &name, data.as_slice())
            .with_context(|| format!("adding {} to the tar", rel.display()))?;
    }
    builder.into_inner()?.flush()?;
    tmp.persist(dest)
        .with_context(|| format!("{}", dest.display()))?;
    Ok(files.len() + extra.len())
}

/// One row of the test file, as far as validation needs it.
struct TestRow {
    choices: Option<usize>,
}

/// Check a submission against the test file: header `id,prediction,dummy_field`, every test
/// id exactly once and nothing else, multiple-choice predictions valid choice indices.
pub fn validate_submission(submission: &Path, test_file: &Path) -> Result<usize> {
    let ds = eval_harness::dataset::load(test_file)
        .with_context(|| format!("reading the test file {}", test_file.display()))?;
    let mut rows: BTreeMap<String, TestRow> = BTreeMap::new();
    for ex in &ds.examples {
        rows.insert(
            ex.id.clone(),
            TestRow {
                choices: (ex.eval_type == eval_harness::dataset::EvalType::MultipleChoice)
                    .then_some(ex.answer_choices.len()),
            },
        );
    }
    let mut reader =
        csv::Reader::from_path(submission).with_context(|| format!("{}", submission.display()))?;
    let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
    if header != ["id", "prediction", "dummy_field"] {
        bail!(
            "{}:1: header is {:?}, expected id,prediction,dummy_field",
            submission.display(),
            header.join(",")
        );
    }
    let mut seen = BTreeSet::new();
    for (i, rec) in reader.records().enumerate() {
        let line = i + 2;
        let rec = rec.with_context(|| format!("{}:{line}", submission.display()))?;
        let id = rec.get(0).unwrap_or_default().to_string();
        let pred = rec.get(1).unwrap_or_default();
        let Some(row) = rows.get(&id) else {
            bail!(
                "{}:{line}: id `{id}` is not in the test file",
                submission.display()
            );
        };
        if !seen.insert(id.clone()) {
            bail!("{}:{line}: id `{id}` appears twice", submission.display());
        }
        if let Some(n) = row.choices {
            match pred.parse::<usize>() {
                Ok(k) if k < n => {}
                _ => bail!(
                    "{}:{line}: id `{id}`: prediction `{pred}` is not a choice index 0..{}",
                    submission.display(),
                    n.saturating_sub(1)
                ),
            }
        }
    }
    if let Some(missing) = rows.keys().find(|id| !seen.contains(*id)) {
        bail!(
            "{}: id `{missing}` of the test file has no prediction ({} of {} predicted)",
            submission.display(),
            seen.len(),
            rows.len()
        );
    }
    Ok(seen.len())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The git commit of the workspace, if it is a git checkout.
pub fn git_commit(root: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Write `contents` to `path` atomically.
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    let parent = path.parent().context("no parent")?;
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
    tmp.write_all(contents)?;
    tmp.persist(path)
        .with_context(|| format!("{}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_outputs_weights_caches_and_secrets() {
        for p in [
            "target/debug/x",
            "dist/e/a.tar",
            ".git/HEAD",
            "merged/model.safetensors",
            "m/pytorch_model.bin",
            ".env",
            "x/.env.local",
            "hf/token",
            ".venv-ref/lib/x.py",
            "a/__pycache__/b.pyc",
        ] {
            assert!(!packable(Path::new(p)), "{p}");
        }
        for p in [
            "README.md",
            "crates/submit/src/main.rs",
            "submissions/demo/entry.toml",
            "data/README.md",
        ] {
            assert!(packable(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn tar_is_deterministic_and_refuses_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("ws");
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src/a.rs"), "fn a() {}").unwrap();
        std::fs::write(root.join("README.md"), "hi").unwrap();
        std::fs::write(root.join("model.safetensors"), "weights").unwrap();
        let a = tmp.path().join("a.tar");
        let b = tmp.path().join("b.tar");
        let tar = |dest: &Path, secret: Option<&str>| {
            let files = source_files(&root).unwrap();
            write_tar(
                &root,
                &files,
                "LLM-Merging",
                dest,
                secret,
                &[("m.json", b"{}")],
            )
        };
        assert_eq!(tar(&a, None).unwrap(), 3);
        // Touch a file: content unchanged, mtime changed → same bytes.
        std::fs::write(root.join("README.md"), "hi").unwrap();
        tar(&b, None).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let mut names = Vec::new();
        for e in tar::Archive::new(std::fs::File::open(&a).unwrap())
            .entries()
            .unwrap()
        {
            let e = e.unwrap();
            assert_eq!(e.header().mtime().unwrap(), 0);
            assert_eq!(e.header().uid().unwrap(), 0);
            names.push(e.path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            [
                "LLM-Merging/m.json",
                "LLM-Merging/README.md",
                "LLM-Merging/src/a.rs"
            ]
        );
        std::fs::write(root.join("src/a.rs"), "// hf_abcdefghijkl").unwrap();
        let err = tar(&b, Some("hf_abcdefghijkl")).unwrap_err();
        assert!(err.to_string().contains("src/a.rs"), "{err}");
    }

    #[test]
    fn submission_validation_names_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let test = tmp.path().join("test.csv");
        std::fs::write(
            &test,
            "id,input,answer_choices,eval_type\na,q?,\"['x', 'y']\",multiple_choice\nb,sum,,generation\n",
        )
        .unwrap();
        let sub = tmp.path().join("submission.csv");
        let check = |text: &str| {
            std::fs::write(&sub, text).unwrap();
            validate_submission(&sub, &test).map_err(|e| e.to_string())
        };
        assert_eq!(
            check("id,prediction,dummy_field\na,1,0\nb,some text,0\n"),
            Ok(2)
        );
        let e = check("id,prediction,dummy_field\na,1,0\n").unwrap_err();
        assert!(e.contains("id `b`") && e.contains("no prediction"), "{e}");
        let e = check("id,prediction,dummy_field\na,1,0\na,0,0\nb,t,0\n").unwrap_err();
        assert!(e.contains(":3:") && e.contains("appears twice"), "{e}");
        let e = check("id,prediction,dummy_field\na,2,0\nb,t,0\n").unwrap_err();
        assert!(e.contains("not a choice index 0..1"), "{e}");
        let e = check("id,pred\na,1\n").unwrap_err();
        assert!(e.contains("header"), "{e}");
        let e = check("id,prediction,dummy_field\nzz,1,0\n").unwrap_err();
        assert!(e.contains("`zz` is not in the test file"), "{e}");
    }
}
