//! The state file: route and load changes made through the API, kept across restarts. Written
//! atomically (temporary file, fsync, rename, fsync of the folder), so a crash mid-write leaves
//! the previous state whole; a file that does not parse stops startup with its path.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::routes::RouteConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    /// The routes set through the API (the config file's are read from the config file).
    #[serde(default)]
    pub api_routes: BTreeMap<String, RouteConfig>,
    /// Versions ("model@version") unloaded through the API: not loaded again at startup.
    #[serde(default)]
    pub unloaded: BTreeSet<String>,
    /// Versions loaded through the API that the version policy would leave out.
    #[serde(default)]
    pub loaded: BTreeSet<String>,
}

/// Reads the state file; `None` when there is none yet.
pub fn read(path: &Path) -> anyhow::Result<Option<PersistedState>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("reading the state file {}", path.display()));
        }
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "the state file {} is corrupt; fix or remove it (it holds routes and loads made through the API)",
            path.display()
        )
    })
}

/// Fails with a message saying what to do when the state file cannot be written where
/// `state.path` says: found at startup, not at the first change someone makes.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let probe = temporary_path(path);
    let written = std::fs::create_dir_all(&folder)
        .and_then(|()| std::fs::File::create(&probe))
        .and_then(|_| std::fs::remove_file(&probe));
    written.with_context(|| {
        format!(
            "state.path {} cannot be written ({}); point state.path at a writable folder (the Helm chart mounts one at /var/lib/lmserve), or set it to \"\" to keep no state",
            path.display(),
            folder.display()
        )
    })
}

/// Replaces the state file with `state`, atomically.
pub fn write(path: &Path, state: &PersistedState) -> std::io::Result<()> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&folder)?;
    let temporary = temporary_path(path);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(
            serde_json::to_string_pretty(state)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    // The rename is durable only once the folder's entry is on disk.
    std::fs::File::open(&folder)?.sync_all()
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_replaces_atomically() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("state.json");
        assert_eq!(read(&path).unwrap(), None);
        let mut state = PersistedState::default();
        state.unloaded.insert("m@1".into());
        write(&path, &state).unwrap();
        assert_eq!(read(&path).unwrap(), Some(state.clone()));
        // A crash that left a half-written temporary file does not disturb the real one.
        std::fs::write(temporary_path(&path), b"{\"unloa").unwrap();
        assert_eq!(read(&path).unwrap(), Some(state));
    }

    #[test]
    fn an_unwritable_place_is_found_before_any_change() {
        let folder = tempfile::tempdir().unwrap();
        assert!(check_writable(&folder.path().join("new/state.json")).is_ok());
        let blocked = folder.path().join("a-file");
        std::fs::write(&blocked, b"x").unwrap();
        let error = format!(
            "{:#}",
            check_writable(&blocked.join("state.json")).unwrap_err()
        );
        assert!(
            error.contains("state.path") && error.contains("writable"),
            "{error}"
        );
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("state.json");
        std::fs::write(&path, b"{\"routes\": {\"chat\": {\"task\": \"emb").unwrap();
        let error = format!("{:#}", read(&path).unwrap_err());
        assert!(
            error.contains("corrupt") && error.contains(&path.display().to_string()),
            "{error}"
        );
    }
}
