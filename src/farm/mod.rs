//! The build farm: registered builders ([`registry`]), probing them
//! ([`probe`](mod@probe)), building on them over SSH ([`remote`]) and choosing where
//! each derivation is built ([`route`]).
//!
//! A builder is any SSH host with `sh`, coreutils and rsync: builds are
//! agentless. The standard builder scripts travel with every build; inputs
//! and the source tree are pushed, the output's content hash is computed on
//! the builder and checked again here after the pull.

pub mod probe;
pub mod registry;
pub mod remote;
pub mod route;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;
use crate::files::FileError;
use crate::platform::System;
use crate::recipe::Diagnostic;
use crate::transport::TransportError;
use crate::transport::ssh::{SshOptions, SshTarget};

pub use probe::{BuilderStatus, probe, probe_all};
pub use registry::Registry;

/// One registered builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Builder {
    pub name: String,
    /// `ssh://USER@HOST[:PORT]`.
    pub url: String,
    pub key: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    /// Systems it builds for (from `uname` when added).
    pub systems: Vec<System>,
    /// Builds it runs at once.
    pub max_jobs: usize,
    /// Relative speed; higher is preferred.
    pub speed_factor: f64,
    /// Features it offers (`big-parallel`, `kvm`, ...).
    pub features: Vec<String>,
}

/// `max-jobs` when the registry does not say.
pub const DEFAULT_MAX_JOBS: usize = 1;
/// `speed-factor` when the registry does not say.
pub const DEFAULT_SPEED_FACTOR: f64 = 1.0;

impl Builder {
    /// A builder with the defaults: no key or known_hosts file of its own,
    /// no systems, one job, speed factor 1, no features.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Builder {
        Builder {
            name: name.into(),
            url: url.into(),
            key: None,
            known_hosts: None,
            systems: Vec::new(),
            max_jobs: DEFAULT_MAX_JOBS,
            speed_factor: DEFAULT_SPEED_FACTOR,
            features: Vec::new(),
        }
    }

    /// The builder's URL, parsed.
    pub fn target(&self) -> Result<SshTarget, FarmError> {
        SshTarget::parse(&self.url).map_err(|reason| FarmError::BadUrl {
            builder: self.name.clone(),
            reason,
        })
    }

    /// How to reach it: its key and known_hosts file (`~/` expanded),
    /// strict host-key checking as always.
    pub fn ssh_options(&self, connect_timeout: Duration) -> SshOptions {
        let expand = |p: &PathBuf| crate::config::expand_home(p).unwrap_or_else(|_| p.clone());
        SshOptions {
            key: self.key.as_ref().map(expand),
            known_hosts: self.known_hosts.as_ref().map(expand),
            connect_timeout,
            ..SshOptions::default()
        }
    }

    /// Whether it builds for `system`.
    pub fn serves(&self, system: &System) -> bool {
        self.systems.contains(system)
    }
}

/// Whether `name` can name a builder: letters, digits, `.`, `_` and `-`,
/// starting with a letter or digit, at most 64 characters.
pub fn valid_builder_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 64 {
        return Err("it is longer than 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("use letters, digits, `.`, `_` and `-` only");
    }
    Ok(())
}

/// Errors of the build farm.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    /// The registry file exists but cannot be read.
    #[error("cannot read the builders registry `{path}`: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Mistakes in the registry file, each with `file:line:col`.
    #[error("{}", DiagList(.0))]
    Invalid(Vec<Diagnostic>),
    /// The registry could not be written.
    #[error("cannot save the builders registry: {0}")]
    Write(#[from] FileError),
    /// `HOME` is needed for the default registry path.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "bad builder name `{name}`: {reason}\n  hint: name builders with letters, digits, `.`, `_` and `-`, e.g. `arm-1`"
    )]
    BadName { name: String, reason: String },
    #[error("bad URL for builder `{builder}`: {reason}")]
    BadUrl { builder: String, reason: String },
    #[error("a builder named `{name}` is already in `{path}`\n  hint: pick another name, or `punix builders remove {name}` first", path = .path.display())]
    Duplicate { name: String, path: PathBuf },
    #[error("no builder named `{name}` in `{path}`{}", hint_suffix(.hint), path = .path.display())]
    Unknown {
        name: String,
        path: PathBuf,
        hint: Option<String>,
    },
    /// Reaching the builder failed (unreachable, host key, ...).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Reaching a named builder failed.
    #[error("builder `{builder}`: {source}")]
    Reach {
        builder: String,
        source: Box<TransportError>,
    },
    /// The builder was reached but cannot serve as one.
    #[error("`{builder}` ({url}) cannot be used as a builder:{}", problems_list(.problems))]
    Unsuitable {
        builder: String,
        url: String,
        /// Each problem, with its hint on the following lines.
        problems: Vec<String>,
    },
    #[error("{0}")]
    Other(String),
}

impl FarmError {
    /// Whether this is a failure to reach or use a host (exit code 3)
    /// rather than a mistake of the user's (exit code 1).
    pub fn is_transport(&self) -> bool {
        matches!(self, FarmError::Transport(_) | FarmError::Reach { .. })
    }
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref()
        .map(|h| format!("\n  hint: {h}"))
        .unwrap_or_default()
}

fn problems_list(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  - {}", p.replace("\n  ", "\n    ")))
        .collect()
}

struct DiagList<'a>(&'a [Diagnostic]);

impl fmt::Display for DiagList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\nerror: ")?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > 1 {
            write!(
                f,
                "\nerror: {} problems in the builders registry",
                self.0.len()
            )?;
        }
        Ok(())
    }
}
