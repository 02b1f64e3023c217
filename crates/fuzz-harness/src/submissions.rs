//! What participants and organizers exchange: entries (`entry.toml`) and submitted tars.
//!
//! Both readers live in the `llm-merging` binary's crate, which has no library target; their
//! source files are compiled in here as they are (`#[path]`), so the harness runs the very
//! code the binary runs.

use std::path::Path;

use crate::fixtures::with_file;

#[allow(dead_code)]
#[path = "../../submit/src/entry.rs"]
mod entry;

#[allow(dead_code)]
#[path = "../../submit/src/organizer/untrusted_tar.rs"]
mod untrusted_tar;

/// An entry's `entry.toml` in a workspace, loaded and checked as `run` does, its paths
/// expanded; its `[search]` table checked against the merge as `search` does before any model
/// loads (the space built, the budget read, its starting point turned into a recipe).
pub fn entry_toml(data: &[u8]) {
    with_file("ws/submissions/fuzzed/entry.toml", data, |path| {
        let dir = path.parent().expect("entry dir");
        let ws = dir.ancestors().nth(2).expect("workspace");
        std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").expect("scratch");
        if let Ok(e) = entry::Entry::load(dir) {
            let _ = (
                e.datasets(),
                e.test_file(),
                e.path_in_workspace(),
                e.dist_dir(),
            );
            if let Some(spec) = &e.file.search {
                let _ = (spec.budget(), spec.identity());
                if let Ok(space) = search::Space::new(spec, &e.file.merge) {
                    // The entry's own recipe: its method, every expert, its values.
                    let entry = search::Point {
                        method: 0,
                        include: vec![true; space.selectable().len()],
                        unit: space.entry_unit(),
                    };
                    let _ = space.recipe(&entry);
                }
            }
        }
    });
}

/// A submitted tar, unpacked as untrusted input (small limits); whatever it unpacks to must
/// lie inside the destination, links included.
pub fn submission_tar(data: &[u8]) {
    with_file("sub.tar", data, |path| {
        let dest = path.with_file_name("unpacked");
        let limits = untrusted_tar::Limits {
            max_bytes: 1 << 20,
            max_entries: 1000,
        };
        if untrusted_tar::unpack(path, &dest, limits).is_ok() {
            let root = dest.canonicalize().expect("unpacked into place");
            assert_inside(&root, &root);
        }
    });
}

/// Every entry under `dir`, links resolved, lies under `root`.
fn assert_inside(root: &Path, dir: &Path) {
    for e in std::fs::read_dir(dir).expect("readable").flatten() {
        let p = e.path();
        if let Ok(real) = p.canonicalize() {
            assert!(
                real.starts_with(root),
                "{} escapes to {}",
                p.display(),
                real.display()
            );
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            assert_inside(root, &p);
        }
    }
}
