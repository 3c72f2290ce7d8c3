//! The user's settings: `~/.config/punix/config.toml` (or
//! `$XDG_CONFIG_HOME/punix/config.toml`, or `$PUNIX_CONFIG`).
//!
//! ```toml
//! store-root = "/var/lib/punix/store"        # default ~/.punix/store
//! deployments-root = "/var/lib/punix/deployments"
//! features = ["big-parallel"]                # what this machine offers
//! ```
//!
//! Command-line flags and their environment variables win over this file.
//! The roots in it must be absolute or start with `~/`: a relative path
//! would mean another store in every working directory.
//!
//! `HOME` is needed only for what is derived from it: without `HOME`,
//! `XDG_CONFIG_HOME` and `PUNIX_CONFIG` there is no config file to read,
//! and a root given on the command line needs no `HOME` at all.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::recipe::SourceText;

/// A bad config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {message}\n  hint: see docs/reference.md for the keys of config.toml", file = .file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "{file}:{line}:{col}: `{key}` must be an absolute path, not `{value}`\n  hint: write an absolute path such as `/var/lib/punix/{leaf}`, or one in your home directory such as `~/.punix/{leaf}`",
        file = .file.display(),
        leaf = .key.strip_suffix("-root").unwrap_or("store")
    )]
    RelativeRoot {
        file: PathBuf,
        line: usize,
        col: usize,
        key: &'static str,
        value: String,
    },
    #[error(
        "cannot tell the home directory: `HOME` is not set\n  hint: set `HOME`, or pass `--store-root` and `--deployments-root`"
    )]
    NoHome,
}

/// Settings from the config file.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub store_root: Option<PathBuf>,
    pub deployments_root: Option<PathBuf>,
    pub features: Vec<String>,
}

/// The file as written, with the places of its values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    store_root: Option<Spanned<PathBuf>>,
    deployments_root: Option<Spanned<PathBuf>>,
    #[serde(default)]
    features: Vec<String>,
}

/// The user's home directory.
pub fn home() -> Result<PathBuf, ConfigError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or(ConfigError::NoHome)
}

/// Where the config file is looked for: `$PUNIX_CONFIG`, else
/// `$XDG_CONFIG_HOME/punix/config.toml`, else
/// `~/.config/punix/config.toml`; `None` when none of those variables is
/// set (then there is no config file).
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PUNIX_CONFIG") {
        return Some(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("punix/config.toml"));
    }
    home().ok().map(|h| h.join(".config/punix/config.toml"))
}

impl Config {
    /// Read the config file; a missing file (or no place to look for one)
    /// is an empty config.
    pub fn load() -> Result<Config, ConfigError> {
        match config_path() {
            Some(path) => Self::load_from(&path),
            None => Ok(Config::default()),
        }
    }

    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let src = SourceText::new(path, text.clone());
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            let (line, col) = src.line_col(e.span().map(|s| s.start).unwrap_or(0));
            ConfigError::Invalid {
                file: path.to_path_buf(),
                line,
                col,
                message: e.message().trim().to_string(),
            }
        })?;
        let root = |key: &'static str, v: Option<Spanned<PathBuf>>| match v {
            Some(v) if !v.get_ref().is_absolute() && !v.get_ref().starts_with("~") => {
                let (line, col) = src.line_col(v.span().start);
                Err(ConfigError::RelativeRoot {
                    file: path.to_path_buf(),
                    line,
                    col,
                    key,
                    value: v.get_ref().display().to_string(),
                })
            }
            other => Ok(other.map(Spanned::into_inner)),
        };
        Ok(Config {
            store_root: root("store-root", raw.store_root)?,
            deployments_root: root("deployments-root", raw.deployments_root)?,
            features: raw.features,
        })
    }

    /// The store root: the flag (or `PUNIX_STORE_DIR`), else the config,
    /// else `~/.punix/store`; made absolute.
    pub fn store_root(&self, flag: Option<&Path>) -> Result<PathBuf, ConfigError> {
        let p = match flag.or(self.store_root.as_deref()) {
            Some(p) => expand_home(p)?,
            None => home()?.join(".punix/store"),
        };
        Ok(absolute(&p))
    }

    /// The deployments root: the flag, else the config, else
    /// `~/.punix/deployments`; made absolute.
    pub fn deployments_root(&self, flag: Option<&Path>) -> Result<PathBuf, ConfigError> {
        let p = match flag.or(self.deployments_root.as_deref()) {
            Some(p) => expand_home(p)?,
            None => home()?.join(".punix/deployments"),
        };
        Ok(absolute(&p))
    }
}

/// `~/x` -> `$HOME/x`.
pub fn expand_home(p: &Path) -> Result<PathBuf, ConfigError> {
    match p.strip_prefix("~") {
        Ok(rest) => Ok(home()?.join(rest)),
        Err(_) => Ok(p.to_path_buf()),
    }
}

/// An absolute, lexically normalised path (`.` and `..` resolved without
/// following symlinks), so the store root is one string everywhere.
pub fn absolute(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_normalises() {
        assert_eq!(absolute(Path::new("/a/./b/../c/")), PathBuf::from("/a/c"));
    }

    #[test]
    fn bad_config_names_file_line_col() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("config.toml");
        std::fs::write(&p, "store-root = \"/x\"\nstor-root = 1\n").expect("write");
        let e = Config::load_from(&p).expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains("config.toml:2:1:"), "{msg}");
        assert!(msg.contains("stor-root"), "{msg}");
    }

    #[test]
    fn relative_roots_are_rejected_with_their_place() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("config.toml");
        std::fs::write(
            &p,
            "store-root = \"~/s\"\ndeployments-root = \"deploy/here\"\n",
        )
        .expect("write");
        let msg = Config::load_from(&p).expect_err("must fail").to_string();
        assert!(
            msg.contains(
                "config.toml:2:20: `deployments-root` must be an absolute path, not `deploy/here`"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("hint:") && msg.contains("`~/.punix/deployments`"),
            "{msg}"
        );
        for ok in ["/abs/store", "~/store", "~"] {
            std::fs::write(&p, format!("store-root = \"{ok}\"\n")).expect("write");
            let c = Config::load_from(&p).expect("loads");
            assert_eq!(c.store_root, Some(PathBuf::from(ok)));
        }
        std::fs::write(&p, "store-root = \"~me/store\"\n").expect("write");
        assert!(
            Config::load_from(&p).is_err(),
            "`~me` is not the home directory"
        );
    }
}
