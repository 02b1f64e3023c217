//! Submitted tars are untrusted input: checked whole before anything is written, then unpacked
//! into a fresh directory that is renamed into place only when complete.
//!
//! Refused (with the entry named): absolute paths, `..` components, symbolic or hard links
//! that point outside the tree (or through another link), device files, FIFOs and other
//! special entries, a total unpacked size or a file count over the limits, and a truncated or
//! corrupt archive. Regular files are written with mode 0644 (0755 when executable); nothing
//! from the archive is ever executed.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Limits on what a submission may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest total size of the files, in bytes.
    pub max_bytes: u64,
    /// Most entries (files, directories and links).
    pub max_entries: usize,
}

impl Default for Limits {
    /// 2 GB and 100,000 entries: a repository with code and configs, not weights.
    fn default() -> Self {
        Limits {
            max_bytes: 2_000_000_000,
            max_entries: 100_000,
        }
    }
}

/// One checked entry.
enum Item {
    Dir(PathBuf),
    /// Its bytes are read again when unpacking (the archive is checked first, whole).
    File {
        path: PathBuf,
        executable: bool,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// A hard link: written as a copy of the earlier file it names.
    HardLink {
        path: PathBuf,
        target: PathBuf,
    },
}

/// A relative path with only normal components, or an error naming `what`.
fn safe_relative(raw: &Path, what: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => bail!("{what} `{}` has a `..` component", raw.display()),
            Component::RootDir | Component::Prefix(_) => {
                bail!("{what} `{}` is an absolute path", raw.display())
            }
        }
    }
    if out.as_os_str().is_empty() {
        bail!("{what} `{}` is empty", raw.display());
    }
    Ok(out)
}

/// Where a symbolic link at `link` pointing at `target` lands, if inside the tree.
fn link_destination(link: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut out: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(p) => Some(p),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            _ => return None,
        }
    }
    Some(out.iter().collect())
}

fn open(path: &Path) -> Result<tar::Archive<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    Ok(tar::Archive::new(std::io::BufReader::new(file)))
}

/// Whether the reader handles an entry itself (pax/GNU metadata), so it is not an item.
fn is_metadata(kind: tar::EntryType) -> bool {
    matches!(
        kind,
        tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
    )
}

/// Reads and checks every entry of the archive at `path` (nothing is written).
fn check(path: &Path, limits: Limits) -> Result<Vec<Item>> {
    let mut archive = open(path)?;
    let mut items = Vec::new();
    let mut links = BTreeSet::new();
    let mut files = BTreeSet::new();
    let mut total = 0u64;
    for entry in archive.entries().context("not a tar archive")? {
        let mut entry = entry.context("corrupt or truncated tar")?;
        if items.len() >= limits.max_entries {
            bail!("more than {} entries (the limit)", limits.max_entries);
        }
        let raw = entry
            .path()
            .context("an entry has an unreadable path")?
            .into_owned();
        let rel = safe_relative(&raw, "entry")?;
        // Nothing may be written through a link the archive itself created.
        if let Some(l) = rel.ancestors().skip(1).find(|a| links.contains(*a)) {
            bail!(
                "entry `{}` goes through the link `{}`",
                raw.display(),
                l.display()
            );
        }
        let kind = entry.header().entry_type();
        let item = match kind {
            tar::EntryType::Directory => Item::Dir(rel),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().context("an entry has no size")?;
                total = total.saturating_add(size);
                if total > limits.max_bytes {
                    bail!(
                        "unpacks to more than {} bytes (the limit) at `{}`",
                        limits.max_bytes,
                        raw.display()
                    );
                }
                // Read through the data now, so a truncated archive fails before any write.
                let read = std::io::copy(&mut entry, &mut std::io::sink())
                    .with_context(|| format!("corrupt or truncated tar at `{}`", raw.display()))?;
                if read != size {
                    bail!("corrupt or truncated tar at `{}`", raw.display());
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                files.insert(rel.clone());
                Item::File {
                    path: rel,
                    executable: mode & 0o111 != 0,
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .context("a link has an unreadable target")?
                    .with_context(|| format!("link `{}` has no target", raw.display()))?
                    .into_owned();
                if link_destination(&rel, &target).is_none() {
                    bail!(
                        "symbolic link `{}` points outside the tree (to `{}`)",
                        raw.display(),
                        target.display()
                    );
                }
                links.insert(rel.clone());
                Item::Symlink { path: rel, target }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .context("a link has an unreadable target")?
                    .with_context(|| format!("link `{}` has no target", raw.display()))?
                    .into_owned();
                let target = safe_relative(&target, "hard link target").with_context(|| {
                    format!("hard link `{}` points outside the tree", raw.display())
                })?;
                if !files.contains(&target) {
                    bail!(
                        "hard link `{}` points outside the tree (to `{}`, not a file of the archive)",
                        raw.display(),
                        target.display()
                    );
                }
                files.insert(rel.clone());
                Item::HardLink { path: rel, target }
            }
            k if is_metadata(k) => continue,
            other => bail!(
                "entry `{}` is a {} (only files, directories and links are allowed)",
                raw.display(),
                match other {
                    tar::EntryType::Char | tar::EntryType::Block => "device file",
                    tar::EntryType::Fifo => "FIFO",
                    _ => "special entry",
                }
            ),
        };
        items.push(item);
    }
    if items.is_empty() {
        bail!("the archive is empty");
    }
    Ok(items)
}

/// Checks the archive at `tar`, then unpacks it into `dest` (which must not exist yet):
/// into a temporary directory beside it first, renamed when complete, so a refused or broken
/// archive leaves nothing.
pub fn unpack(tar: &Path, dest: &Path, limits: Limits) -> Result<()> {
    let items = check(tar, limits)?;
    let parent = dest.parent().context("destination has no parent")?;
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(parent)?;
    let root = tmp.path();
    // The second pass reads the same entries in the same order as the check.
    let mut archive = open(tar)?;
    let mut entries = archive.entries()?.filter(|e| {
        !e.as_ref()
            .is_ok_and(|e| is_metadata(e.header().entry_type()))
    });
    for item in &items {
        let mut entry = entries
            .next()
            .context("the archive changed while unpacking")??;
        match item {
            Item::Dir(p) => std::fs::create_dir_all(root.join(p))?,
            Item::File { path, executable } => {
                write_file(root, path, &mut entry, *executable)?;
            }
            Item::Symlink { path, target } => {
                mkdirs_for(root, path)?;
                std::os::unix::fs::symlink(target, root.join(path))
                    .with_context(|| format!("creating link `{}`", path.display()))?;
            }
            Item::HardLink { path, target } => {
                let mut original = std::fs::File::open(root.join(target))?;
                write_file(root, path, &mut original, false)?;
            }
        }
    }
    std::fs::rename(tmp.path(), dest).with_context(|| format!("moving into {}", dest.display()))?;
    // Renamed away: nothing is left for the guard to remove.
    let _ = tmp.keep();
    Ok(())
}

fn mkdirs_for(root: &Path, rel: &Path) -> Result<()> {
    if let Some(p) = rel.parent() {
        std::fs::create_dir_all(root.join(p))?;
    }
    Ok(())
}

fn write_file(
    root: &Path,
    rel: &Path,
    data: &mut impl std::io::Read,
    executable: bool,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    mkdirs_for(root, rel)?;
    // create_new: never write through something already there (a link, a second entry).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if executable { 0o755 } else { 0o644 })
        .open(root.join(rel))
        .with_context(|| format!("writing `{}` (a duplicate entry?)", rel.display()))?;
    std::io::copy(data, &mut f).with_context(|| format!("writing `{}`", rel.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry written byte by byte, so paths the tar crate's builder would refuse
    /// (`..`, absolute) can be made.
    fn raw_entry(out: &mut Vec<u8>, path: &str, kind: u8, link: &str, data: &[u8]) {
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut t: Vec<u8>) -> Vec<u8> {
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    /// Unpacks `bytes` as a tar into a fresh directory: the error text, after checking that
    /// nothing was written anywhere.
    fn refused(bytes: &[u8], limits: Limits) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let tar = tmp.path().join("s.tar");
        std::fs::write(&tar, bytes).unwrap();
        let parent = tmp.path().join("out");
        std::fs::create_dir(&parent).unwrap();
        let err = unpack(&tar, &parent.join("s"), limits).unwrap_err();
        let left: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        format!("{err:#}")
    }

    #[test]
    fn a_good_tree_unpacks_with_links_inside_it() {
        let mut t = Vec::new();
        raw_entry(&mut t, "LLM-Merging/", b'5', "", b"");
        raw_entry(&mut t, "LLM-Merging/a.txt", b'0', "", b"hello");
        raw_entry(&mut t, "LLM-Merging/dir/b.txt", b'0', "", b"world");
        raw_entry(&mut t, "LLM-Merging/dir/link", b'2', "../a.txt", b"");
        raw_entry(&mut t, "LLM-Merging/hard", b'1', "LLM-Merging/a.txt", b"");
        let tmp = tempfile::tempdir().unwrap();
        let tar = tmp.path().join("s.tar");
        std::fs::write(&tar, finish(t)).unwrap();
        let dest = tmp.path().join("s");
        unpack(&tar, &dest, Limits::default()).unwrap();
        let read = |p: &str| std::fs::read_to_string(dest.join(p)).unwrap();
        assert_eq!(read("LLM-Merging/a.txt"), "hello");
        assert_eq!(read("LLM-Merging/dir/b.txt"), "world");
        assert_eq!(read("LLM-Merging/dir/link"), "hello");
        assert_eq!(read("LLM-Merging/hard"), "hello");
        // The destination exists now: a second unpack does not write into it.
        assert!(unpack(&tar, &dest, Limits::default()).is_err());
    }

    #[test]
    fn hostile_archives_are_refused_and_leave_nothing() {
        let one = |path: &str, kind: u8, link: &str| {
            let mut t = Vec::new();
            raw_entry(&mut t, "ok.txt", b'0', "", b"fine");
            raw_entry(
                &mut t,
                path,
                kind,
                link,
                if kind == b'0' { b"x" } else { b"" },
            );
            finish(t)
        };
        let d = Limits::default();
        let e = refused(&one("../escape.txt", b'0', ""), d);
        assert!(e.contains("`../escape.txt` has a `..` component"), "{e}");
        let e = refused(&one("/etc/cron.d/x", b'0', ""), d);
        assert!(e.contains("`/etc/cron.d/x` is an absolute path"), "{e}");
        let e = refused(&one("passwd", b'2', "/etc/passwd"), d);
        assert!(
            e.contains("symbolic link `passwd` points outside the tree (to `/etc/passwd`)"),
            "{e}"
        );
        let e = refused(&one("up", b'2', "../../x"), d);
        assert!(
            e.contains("symbolic link `up` points outside the tree"),
            "{e}"
        );
        let e = refused(&one("shadow", b'1', "/etc/shadow"), d);
        assert!(
            e.contains("hard link `shadow` points outside the tree"),
            "{e}"
        );
        let e = refused(&one("other", b'1', "not/in/archive"), d);
        assert!(
            e.contains("hard link `other` points outside the tree"),
            "{e}"
        );
        let e = refused(&one("sda", b'4', ""), d);
        assert!(e.contains("`sda` is a device file"), "{e}");
        let e = refused(&one("pipe", b'6', ""), d);
        assert!(e.contains("`pipe` is a FIFO"), "{e}");

        // Writing through a link the archive made.
        let mut t = Vec::new();
        raw_entry(&mut t, "d", b'2', ".", b"");
        raw_entry(&mut t, "d/x", b'0', "", b"x");
        let e = refused(&finish(t), d);
        assert!(e.contains("goes through the link `d`"), "{e}");

        // Limits.
        let mut t = Vec::new();
        raw_entry(&mut t, "big", b'0', "", &[7u8; 3000]);
        let t = finish(t);
        let small = Limits {
            max_bytes: 2000,
            max_entries: 10,
        };
        let e = refused(&t, small);
        assert!(e.contains("more than 2000 bytes"), "{e}");
        let mut many = Vec::new();
        for i in 0..4 {
            raw_entry(&mut many, &format!("f{i}"), b'0', "", b"x");
        }
        let few = Limits {
            max_bytes: 1 << 20,
            max_entries: 3,
        };
        let e = refused(&finish(many), few);
        assert!(e.contains("more than 3 entries"), "{e}");

        // Truncated in the middle of a file's data, and not a tar at all.
        let e = refused(&t[..512 + 1000], d);
        assert!(e.contains("truncated"), "{e}");
        let e = refused(b"this is not a tar archive at all, just text", d);
        assert!(e.contains("corrupt") || e.contains("empty"), "{e}");
    }
}
