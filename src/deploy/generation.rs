//! Generation files: `<deployments-root>/<stack>/gen-NNN.json`, and the
//! `current -> gen-NNN.json` symlink that is the only mutable state.
//!
//! A generation records what a deploy put on the target: the store paths it
//! pins (the whole runtime closure), the services with their secret
//! *references* (never values), and every file it wrote (config files,
//! units, environment files) with its mode and sha256 and, unless it
//! carries a secret, its bytes, so a rollback restores it exactly.
//!
//! Compatibility: files written by older punix versions must keep parsing;
//! new fields are added with `#[serde(default)]`, and `tests/fixtures/
//! generations/` keeps old files as fixtures.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::{Deserialize, Serialize};

pub use crate::clock::{rfc3339, utc_now};
use crate::recipe::stack::{EnvValue, SecretRef};

/// The current format version.
pub const GENERATION_FORMAT: u32 = 1;

/// How many generations to keep (the live one is never deleted).
pub const KEEP_GENERATIONS: usize = 10;

/// What a written file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A config file declared by the stack.
    Config,
    /// A generated systemd unit.
    Unit,
    /// A generated environment file with secrets (mode 0600).
    Env,
}

/// One file a generation wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenFile {
    pub path: PathBuf,
    pub kind: FileKind,
    /// Octal mode as a string, e.g. `"0644"`.
    pub mode: String,
    /// sha256 of the bytes; `None` for files that carry a secret.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The bytes as UTF-8 text, when they are text and not secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The bytes in base64, when they are not UTF-8 and not secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// The secret this file is rendered from (config files), or `true`
    /// for env files; such files are re-rendered on rollback.
    #[serde(default)]
    pub secret: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// For units and env files: the service they belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl GenFile {
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(self.mode.trim_start_matches("0o"), 8).unwrap_or(0o644)
    }

    /// The recorded bytes, when they were recorded.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        if let Some(c) = &self.content {
            return Some(c.as_bytes().to_vec());
        }
        self.content_base64
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    }

    /// Record `bytes` (text or base64), unless secret.
    pub fn set_bytes(&mut self, bytes: &[u8]) {
        if self.secret {
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => self.content = Some(s.to_string()),
            Err(_) => {
                self.content_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// A service as a generation records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenService {
    pub name: String,
    pub package: String,
    pub store_path: PathBuf,
    pub binary: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Literal values and secret references; never secret values.
    #[serde(default)]
    pub environment: BTreeMap<String, EnvValue>,
    pub unit: String,
}

/// One generation file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    #[serde(default = "one")]
    pub format: u32,
    pub number: u64,
    pub stack: String,
    /// UTC, RFC 3339.
    pub created: String,
    /// sha256 of the recipe files the stack came from.
    #[serde(default)]
    pub source_hash: String,
    #[serde(default = "systemd")]
    pub backend: String,
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub store_root: String,
    /// Absolute store paths, sorted: the whole runtime closure.
    pub store_paths: Vec<String>,
    #[serde(default)]
    pub services: Vec<GenService>,
    #[serde(default)]
    pub files: Vec<GenFile>,
    #[serde(default)]
    pub unit_dir: String,
    /// sha256 over everything above except number and time: equal for two
    /// deploys of the same stack content.
    #[serde(default)]
    pub content_id: String,
}

fn one() -> u32 {
    1
}

fn systemd() -> String {
    "systemd".into()
}

impl Generation {
    /// The file name of generation `n`: `gen-001.json`, `gen-1000.json`.
    pub fn file_name(n: u64) -> String {
        format!("gen-{n:03}.json")
    }

    /// The name a generation gets when its activation failed and the deploy
    /// rolled back: kept for inspection, never a rollback target.
    pub fn failed_file_name(n: u64) -> String {
        format!("gen-{n:03}.failed.json")
    }

    /// Parse a failed generation's number from a file name.
    pub fn failed_number_of(file_name: &str) -> Option<u64> {
        file_name
            .strip_prefix("gen-")?
            .strip_suffix(".failed.json")?
            .parse()
            .ok()
    }

    /// Parse a generation number from a file name.
    pub fn number_of(file_name: &str) -> Option<u64> {
        file_name
            .strip_prefix("gen-")?
            .strip_suffix(".json")?
            .parse()
            .ok()
    }

    /// Compute and set `content_id`.
    pub fn seal(&mut self) {
        let mut v = self.clone();
        v.number = 0;
        v.created = String::new();
        v.content_id = String::new();
        v.source_hash = String::new();
        let json = serde_json::to_value(&v).unwrap_or_default();
        let canon = crate::store::derivation::canonical_json(&json);
        self.content_id = format!(
            "sha256:{}",
            crate::store::content_hash::sha256_hex(canon.as_bytes())
        );
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    pub fn parse(bytes: &[u8]) -> Result<Generation, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_zero_padded_and_grow() {
        assert_eq!(Generation::file_name(1), "gen-001.json");
        assert_eq!(Generation::file_name(999), "gen-999.json");
        assert_eq!(Generation::file_name(1000), "gen-1000.json");
        assert_eq!(Generation::number_of("gen-007.json"), Some(7));
        assert_eq!(Generation::number_of("gen-1000.json"), Some(1000));
        assert_eq!(Generation::number_of("current"), None);
    }

    #[test]
    fn a_minimal_old_file_parses() {
        let g = Generation::parse(
            br#"{"number": 3, "stack": "S", "created": "2026-01-01T00:00:00Z", "store_paths": ["/s/x"]}"#,
        )
        .expect("parse");
        assert_eq!(g.number, 3);
        assert_eq!(g.backend, "systemd");
        assert!(g.files.is_empty());
    }
}
