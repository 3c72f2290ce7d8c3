//! The top-level error and its exit code, mapped in one place.
//!
//! Exit codes: 0 success; 1 a reported user-level error (bad file, missing
//! secret, no builder, nothing to roll back, a damaged store); 2 usage
//! error (from the command-line parser); 3 a build or transport failure.

use crate::build::BuildError;
use crate::cache::CacheError;
use crate::config::ConfigError;
use crate::deploy::DeployError;
use crate::farm::FarmError;
use crate::files::FileError;
use crate::platform::SystemError;
use crate::recipe::RecipeError;
use crate::store::StoreError;
use crate::transport::TransportError;

/// Any error punix reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Build(Box<BuildError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Deploy(Box<DeployError>),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    Farm(#[from] FarmError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Usage(String),
    #[error("{failed} of {total} target(s) failed")]
    Fleet {
        failed: usize,
        total: usize,
        code: i32,
    },
    #[error("{count} of {total} store entries failed verification", count = .failed.len())]
    VerifyFailed { failed: Vec<String>, total: usize },
}

impl From<DeployError> for Error {
    fn from(e: DeployError) -> Self {
        Error::Deploy(Box::new(e))
    }
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Self {
        Error::Build(Box::new(e))
    }
}

/// Exit codes.
pub const EXIT_USER: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_FAILURE: i32 = 3;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::System(_) => EXIT_USAGE,
            Error::Fleet { code, .. } => *code,
            Error::Build(b) => build_exit_code(b),
            Error::Deploy(d) => deploy_exit_code(d),
            Error::Transport(_) => EXIT_FAILURE,
            Error::Farm(f) if f.is_transport() => EXIT_FAILURE,
            Error::Cache(c) if c.is_transport() => EXIT_FAILURE,
            Error::Store(StoreError::File(_)) | Error::File(_) => EXIT_FAILURE,
            _ => EXIT_USER,
        }
    }
}

fn build_exit_code(e: &BuildError) -> i32 {
    match e {
        BuildError::Failed { .. }
        | BuildError::Spawn { .. }
        | BuildError::Output { .. }
        | BuildError::File(_)
        | BuildError::Internal(_) => EXIT_FAILURE,
        BuildError::Store(StoreError::File(_)) => EXIT_FAILURE,
        BuildError::Several { failures, .. } => failures
            .iter()
            .map(build_exit_code)
            .max()
            .unwrap_or(EXIT_FAILURE),
        _ => EXIT_USER,
    }
}

/// The exit code of one deploy error.
pub fn deploy_exit_code(e: &DeployError) -> i32 {
    match e {
        DeployError::Build(b) => build_exit_code(b),
        DeployError::Repeated { code, .. } => *code,
        DeployError::Transport(_)
        | DeployError::ActivationFailed { .. }
        | DeployError::Io(_)
        | DeployError::Store(StoreError::File(_)) => EXIT_FAILURE,
        _ => EXIT_USER,
    }
}
