//! Reads the model repository folder: `<model>/<version>/` with numeric version folders.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

/// One version folder found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionDir {
    pub model: String,
    pub version: u64,
    pub path: PathBuf,
}

/// Every file under a version folder with its size and modification time, in order: compared
/// to tell whether the folder changed, never interpreted. An unreadable entry is left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Contents {
    /// Folders deeper than this (a sentence-transformers layout has one level) are not listed.
    const MAX_DEPTH: usize = 4;

    pub fn of(folder: &Path) -> Self {
        let mut files = Vec::new();
        let mut pending = vec![(folder.to_path_buf(), 0)];
        while let Some((dir, depth)) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // Followed: a version may be links to files elsewhere in the repository.
                let Ok(meta) = std::fs::metadata(entry.path()) else {
                    continue;
                };
                if meta.is_dir() && depth < Self::MAX_DEPTH {
                    pending.push((entry.path(), depth + 1));
                } else if meta.is_file() {
                    files.push((entry.path(), meta.len(), meta.modified().ok()));
                }
            }
        }
        files.sort();
        Self(files)
    }
}

/// Version folders a rescan found, with what each held when first seen so and since when: a
/// folder is settled once it has held the same files (names, sizes, modification times) for a
/// while, as one being copied in does not. Counted by the scans' own clock, so neither another
/// machine's clock on a shared volume nor a copy that keeps the files' times (`cp -a`, rsync)
/// can make a folder that is still changing look settled.
#[derive(Default)]
pub struct Settling(Mutex<HashMap<PathBuf, (Contents, Instant)>>);

impl Settling {
    /// Whether `folder` holds files and has held these same ones for at least `quiet` of the
    /// scans that asked; the first time it is asked about (or after a change), the wait starts.
    pub fn settled(&self, folder: &Path, quiet: Duration) -> bool {
        let now = Contents::of(folder);
        if now.0.is_empty() {
            return false;
        }
        let mut seen = self.0.lock().expect("settling lock");
        // Folders that went away are forgotten.
        seen.retain(|path, _| path.exists());
        match seen.get(folder) {
            Some((contents, since)) if *contents == now => {
                let settled = since.elapsed() >= quiet;
                if settled {
                    seen.remove(folder);
                }
                settled
            }
            _ => {
                seen.insert(folder.to_path_buf(), (now, Instant::now()));
                quiet.is_zero()
            }
        }
    }
}

/// Lists every `<model>/<version>/` under `root`, ordered by model name then version.
/// Folders whose name is not a number are not versions and are skipped with a log line, once
/// each: the repository is scanned at every poll and every ListModels or GetModel call.
pub fn scan(root: &Path) -> anyhow::Result<Vec<VersionDir>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("reading the model repository {}", root.display()))?;
    for model_entry in entries {
        let model_entry = model_entry?;
        if !model_entry.file_type()?.is_dir() {
            continue;
        }
        let Some(model) = model_entry.file_name().to_str().map(str::to_owned) else {
            skipping(
                &model_entry.path(),
                "skipping a model folder whose name is not UTF-8",
            );
            continue;
        };
        if model.starts_with('.') {
            continue;
        }
        for version_entry in std::fs::read_dir(model_entry.path())? {
            let version_entry = version_entry?;
            if !version_entry.file_type()?.is_dir() {
                continue;
            }
            let name = version_entry.file_name();
            match name.to_str().and_then(|name| name.parse::<u64>().ok()) {
                Some(version) => found.push(VersionDir {
                    model: model.clone(),
                    version,
                    path: version_entry.path(),
                }),
                None => skipping(
                    &version_entry.path(),
                    "skipping a folder that is not a numeric version",
                ),
            }
        }
    }
    found.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok(found)
}

/// Logs `why` a folder is skipped, the first time it is.
fn skipping(path: &Path, why: &str) {
    static REPORTED: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);
    let mut reported = REPORTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if reported.insert(path.to_path_buf()) {
        tracing::warn!(path = %path.display(), "{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_settled_once_scans_find_it_unchanged_for_a_while() {
        let folder = tempfile::tempdir().unwrap();
        let settling = Settling::default();
        let quiet = Duration::from_millis(200);
        assert!(!settling.settled(folder.path(), quiet), "empty");
        std::fs::create_dir(folder.path().join("1_Pooling")).unwrap();
        std::fs::write(folder.path().join("1_Pooling/config.json"), "{}").unwrap();
        assert!(!settling.settled(folder.path(), quiet), "first seen");
        std::thread::sleep(quiet);
        // A file that arrives restarts the wait, whatever its modification time.
        std::fs::write(folder.path().join("model.toml"), "").unwrap();
        let long_ago = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(folder.path().join("model.toml"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert!(!settling.settled(folder.path(), quiet), "changed");
        std::thread::sleep(quiet);
        assert!(settling.settled(folder.path(), quiet));
    }

    #[cfg(unix)]
    #[test]
    fn linked_files_count_as_the_files_they_link_to() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("model.onnx"), "graph").unwrap();
        std::fs::create_dir(folder.path().join("2")).unwrap();
        std::os::unix::fs::symlink("../model.onnx", folder.path().join("2/model.onnx")).unwrap();
        let contents = Contents::of(&folder.path().join("2"));
        assert_eq!(contents.0.len(), 1);
        assert_eq!(contents.0[0].1, 5);
    }

    #[test]
    fn finds_numeric_versions_in_order() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["b/2", "b/10", "a/1", "a/notes", ".hidden/1"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("README.md"), "x").unwrap();
        let found: Vec<_> = scan(root.path())
            .unwrap()
            .into_iter()
            .map(|v| format!("{}@{}", v.model, v.version))
            .collect();
        assert_eq!(found, ["a@1", "b@2", "b@10"]);
    }
}
