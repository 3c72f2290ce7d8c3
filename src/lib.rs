//! punix: a cross-arch build-and-deploy orchestrator.
//!
//! The library holds everything; the `punix` binary parses the command
//! line, calls into it, renders progress and maps errors to exit codes.
//!
//! - [`recipe`]: recipe files, checked with `file:line:col` diagnostics.
//! - [`store`]: the content-addressed store (layout, derivations, content
//!   hashes, locks, gc).
//! - [`build`]: plans, local builds, the parallel scheduler.
//! - [`platform`]: system strings (`x86_64-linux`, ...).
//! - [`cache`]: binary caches (export, verified import, substitution).
//! - [`ci`]: `punix ci matrix`, GitHub Actions workflows for the CI route.

pub mod build;
pub mod cache;
pub mod ci;
pub mod clock;
pub mod config;
pub mod deploy;
pub mod error;
pub mod farm;
pub mod files;
pub mod platform;
pub mod recipe;
pub mod store;
pub mod trace;
pub mod transport;

pub use error::Error;
