//! Reads the model repository folder: `<model>/<version>/` with numeric version folders.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
                let Ok(meta) = entry.metadata() else {
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

    /// Whether the folder holds files and none changed within `quiet`: it is not being
    /// written to. A time in the future (another clock's) counts as a change now.
    pub fn settled(&self, quiet: Duration) -> bool {
        let newest = self.0.iter().filter_map(|(_, _, modified)| *modified).max();
        let now = SystemTime::now();
        !self.0.is_empty()
            && newest.is_none_or(|newest| now.duration_since(newest).is_ok_and(|age| age >= quiet))
    }
}

/// Lists every `<model>/<version>/` under `root`, ordered by model name then version.
/// Folders whose name is not a number are not versions and are skipped with a log line.
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
            tracing::warn!(path = %model_entry.path().display(), "skipping a model folder whose name is not UTF-8");
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
                None => {
                    tracing::warn!(path = %version_entry.path().display(), "skipping a folder that is not a numeric version")
                }
            }
        }
    }
    found.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_settled_once_its_files_stop_changing() {
        let folder = tempfile::tempdir().unwrap();
        let quiet = Duration::from_millis(300);
        assert!(!Contents::of(folder.path()).settled(quiet), "empty");
        std::fs::create_dir(folder.path().join("1_Pooling")).unwrap();
        std::fs::write(folder.path().join("1_Pooling/config.json"), "{}").unwrap();
        assert!(!Contents::of(folder.path()).settled(quiet), "just written");
        std::thread::sleep(quiet + Duration::from_millis(50));
        assert!(Contents::of(folder.path()).settled(quiet));
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
