//! The build farm: registered builders ([`registry`]), probing them
//! ([`probe`]), building on them over SSH ([`remote`]) and choosing where
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

use std::path::PathBuf;

use crate::platform::System;

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

/// Errors of the build farm.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("{0}")]
    Other(String),
}
