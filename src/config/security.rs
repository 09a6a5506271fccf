//! `[tls]` and `[auth]`: transport security and API keys. Keys are secrets: they come from a
//! file or the `LMSERVE_API_KEYS` environment variable and never show in logs or `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The environment variable holding API keys, as `scope:key` pairs separated by commas.
pub const API_KEYS_ENV: &str = "LMSERVE_API_KEYS";

/// TLS for the gRPC listeners (rustls); enabled when a certificate is configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the server.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a certificate they signed
    /// (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some() || self.client_ca_file.is_some()
    }
}

/// API keys: with any configured, every call but health needs `authorization: Bearer <key>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A file of keys, one `scope key` pair a line (`#` starts a comment); scopes are
    /// `inference` (inference and reading models and routes) and `admin` (everything).
    pub keys_file: Option<PathBuf>,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Inference, reading models and routes.
    Inference,
    /// Everything, model management and routes included.
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "inference" => Some(Scope::Inference),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
        })
    }
}

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub scope: Scope,
    pub key: Secret,
}

/// Keys shorter than this are refused: they would be guessable.
const MIN_KEY_CHARS: usize = 16;

/// The configured keys: the file's, then the environment's. Empty: authentication is off.
pub fn api_keys(config: &AuthConfig) -> anyhow::Result<Vec<ApiKey>> {
    let mut keys = Vec::new();
    if let Some(path) = &config.keys_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading auth.keys_file {}", path.display()))?;
        keys.extend(parse_lines(&text, path)?);
    }
    if let Ok(text) = std::env::var(API_KEYS_ENV) {
        keys.extend(api_keys_from_pairs(&text)?);
    }
    Ok(keys)
}

/// Keys written as `scope:key` pairs separated by commas (the form of `LMSERVE_API_KEYS`).
pub fn api_keys_from_pairs(text: &str) -> anyhow::Result<Vec<ApiKey>> {
    let pairs = text.split(',').map(str::trim).filter(|p| !p.is_empty());
    pairs
        .enumerate()
        .map(|(index, pair)| {
            let place = format!("{API_KEYS_ENV} entry {index}");
            let (scope, key) = pair
                .split_once(':')
                .with_context(|| format!("{place} is not scope:key (scopes: inference, admin)"))?;
            key_of(scope.trim(), key.trim(), &place)
        })
        .collect()
}

fn parse_lines(text: &str, path: &Path) -> anyhow::Result<Vec<ApiKey>> {
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let place = format!("{} line {}", path.display(), number + 1);
        let mut parts = line.split_whitespace();
        let (Some(scope), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!("{place}: expected `scope key` (scopes: inference, admin)");
        };
        keys.push(key_of(scope, key, &place)?);
    }
    Ok(keys)
}

fn key_of(scope: &str, key: &str, place: &str) -> anyhow::Result<ApiKey> {
    // The scope is not repeated: written the wrong way round, it would be the key, in the log.
    let scope = Scope::parse(scope).with_context(|| {
        format!("{place}: the scope, which comes first, is not one of inference, admin")
    })?;
    if key.chars().count() < MIN_KEY_CHARS || !key.chars().all(|c| c.is_ascii_graphic()) {
        bail!("{place}: a key needs at least {MIN_KEY_CHARS} visible ASCII characters");
    }
    Ok(ApiKey {
        scope,
        key: Secret(key.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scoped_keys_and_hides_them() {
        let keys = parse_lines(
            "# keys\nadmin  0123456789abcdefXYZ\ninference fedcba9876543210abc # reader\n",
            Path::new("keys"),
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].scope, Scope::Admin);
        assert_eq!(keys[1].key.expose(), "fedcba9876543210abc");
        let shown = format!("{keys:?}");
        assert!(
            !shown.contains("0123456789") && shown.contains("***"),
            "{shown}"
        );
    }

    #[test]
    fn refuses_bad_lines_naming_the_place_not_the_key() {
        for (text, needle) in [
            ("root 0123456789abcdefXYZ", "not one of inference, admin"),
            // The key first: its error must not print it.
            ("0123456789abcdefXYZ admin", "not one of inference, admin"),
            ("admin short", "at least 16"),
            ("admin a b", "expected `scope key`"),
        ] {
            let error = format!("{:#}", parse_lines(text, Path::new("keys")).unwrap_err());
            assert!(
                error.contains(needle) && error.contains("keys line 1"),
                "{error}"
            );
            assert!(!error.contains("0123456789"), "{error}");
        }
        let error = format!(
            "{:#}",
            api_keys_from_pairs("0123456789abcdefXYZ:admin").unwrap_err()
        );
        assert!(!error.contains("0123456789"), "{error}");
    }
}
