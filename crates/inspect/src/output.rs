//! Writing an inspection: `inspect.json` and the SVG heatmaps into a directory, atomically
//! (a temporary directory beside it, renamed into place), replacing only an earlier inspect
//! output.

use std::path::Path;

use crate::error::{Error, Result};
use crate::{Inspection, JSON};

impl Inspection {
    /// Writes `inspect.json` and the heatmaps into `out` (created; an earlier inspect output
    /// there is replaced, any other non-empty directory is refused). Returns the file names.
    pub fn write(&self, out: &Path) -> Result<Vec<String>> {
        if out.exists() {
            let empty = std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_none();
            if !empty && !out.join(JSON).is_file() {
                return Err(Error::OutExists(out.to_path_buf()));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = out
            .file_name()
            .map_or("inspect".into(), |n| n.to_string_lossy().into_owned());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut files = vec![JSON.to_string()];
            let json = serde_json::to_string_pretty(self).expect("an inspection serialises");
            std::fs::write(tmp.join(JSON), json + "\n")
                .map_err(|e| Error::io(tmp.join(JSON), e))?;
            for (file, svg) in self.heatmaps() {
                std::fs::write(tmp.join(&file), svg).map_err(|e| Error::io(tmp.join(&file), e))?;
                files.push(file);
            }
            if out.exists() {
                std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
            }
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
            Ok(files)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Reads an `inspect.json` written by [`Inspection::write`].
    pub fn read(path: &Path) -> Result<Inspection> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            )
        })
    }
}
