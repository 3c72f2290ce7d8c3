//! Integration tests: the real `punix` binary against real files and
//! processes.
#![allow(clippy::unwrap_used)]

mod build;
mod common;
mod deploy;
#[path = "../support/stderr_watch.rs"]
mod stderr_watch;
mod store;
