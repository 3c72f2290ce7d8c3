//! Deploys: compose a stack, resolve its secrets, build its closure for the
//! target's system, push what the target lacks, write its files and a new
//! generation, flip `current`, and optionally activate the units.
//!
//! The pipeline, with its round trips over one SSH connection:
//!
//! 1. load and check the recipes, compose the stack (local, pure);
//! 2. resolve secrets (local); all missing ones fail together, before any
//!    byte reaches the target;
//! 3. probe the target (1 round trip): `uname -m`/`-s`, home, tools;
//! 4. realise the closure for the target's system (local store, local
//!    build when the systems match; a closure for another system is never
//!    pushed);
//! 5. take the stack's lock on the target (1) and query its state (1):
//!    missing store paths, current generation, the files as they are;
//!    an unchanged stack on an undrifted target stops here;
//! 6. push every missing path in one rsync run (1) into a temporary
//!    directory;
//! 7. commit (1): stage files, write the journal, run it detached (see
//!    [`remote`]);
//! 8. with `--activate`, reload and restart what changed (1), check the
//!    units, roll back automatically when one is not active.
//!
//! Every step is planned first (`DeployReport::plan`, a line per step);
//! `--dry-run` prints the plan.

pub mod generation;
pub mod remote;
pub mod render;
pub mod secrets;

mod pipeline;
pub mod targets;

pub use pipeline::{
    Closure, Connector, DeployOptions, DeployReport, FleetObserver, GcTargetReport, Prepared,
    Probed, RollbackOptions, StatusReport, TargetEvent, TargetResult, deploy, deploy_fleet,
    gc_target, prepare, probe_target, rollback, status,
};

use std::path::PathBuf;

use crate::build::BuildError;
use crate::recipe::RecipeError;
use crate::store::StoreError;
use crate::transport::TransportError;

/// Errors of deploying, rolling back and reading status.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Build(#[from] Box<BuildError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{} secret(s) of stack `{stack}` cannot be resolved; nothing was sent to any target:\n{}\n  hint: set the environment variables or create the files, then deploy again", .missing.len(), .missing.join("\n"))]
    MissingSecrets { stack: String, missing: Vec<String> },
    #[error("`{target}`: cannot write `{path}`\n  hint: {hint}")]
    Unwritable {
        target: String,
        path: String,
        hint: String,
    },
    #[error("`{target}`: refusing to write `{path}`: {why}")]
    UnsafePath {
        target: String,
        path: String,
        why: String,
    },
    #[error(
        "`{file}` is an `{file_arch}` binary, and `{target}` is `{target_system}`; refusing to push it\n  hint: the package's script produced (or copied) a binary for another machine; build it on, or for, `{target_system}`"
    )]
    ForeignBinary {
        target: String,
        file: String,
        file_arch: String,
        target_system: String,
    },
    #[error(
        "`{target}` has no `rsync`\n  hint: install it on the target (Debian: `apt-get install rsync`)"
    )]
    NoRsync { target: String },
    #[error("`{target}`: {message}")]
    Target { target: String, message: String },
    /// The error of another target of the same system, told for this one
    /// (with the exit code of the original).
    #[error("`{target}`: {message}")]
    Repeated {
        target: String,
        message: String,
        code: i32,
    },
    #[error("nothing to roll back to for stack `{stack}` on `{target}`: {reason}")]
    NothingToRollBack {
        stack: String,
        target: String,
        reason: String,
    },
    #[error("generation {number} of stack `{stack}` on `{target}` pins {count} store path(s) that are gone from the target (garbage-collected?): {paths}\n  hint: deploy the stack again instead of rolling back to it", count = .missing.len(), paths = .missing.join(", "))]
    RollbackMissingPaths {
        stack: String,
        target: String,
        number: u64,
        missing: Vec<String>,
    },
    #[error("activation failed on `{target}`: {failed}; {outcome}{}", if .logs.is_empty() { String::new() } else { format!("\n{}", .logs) }, failed = .failed.join(", "))]
    ActivationFailed {
        target: String,
        failed: Vec<String>,
        /// What happened next, in words: rolled back, or kept.
        outcome: String,
        logs: String,
    },
    #[error(
        "`{target}` does not run systemd (no `/run/systemd/system`), so `--activate` cannot start units there\n  hint: deploy without `--activate`, or to a host booted with systemd"
    )]
    NoSystemd { target: String },
    #[error("cannot render the files of stack `{stack}`: {message}")]
    Render { stack: String, message: String },
    #[error("{0}")]
    Io(#[from] crate::files::FileError),
    #[error(transparent)]
    Targets(#[from] targets::TargetsError),
    #[error("damaged generation file `{path}` on `{target}`: {message}")]
    BadGeneration {
        target: String,
        path: PathBuf,
        message: String,
    },
}

impl From<BuildError> for DeployError {
    fn from(e: BuildError) -> Self {
        DeployError::Build(Box::new(e))
    }
}
