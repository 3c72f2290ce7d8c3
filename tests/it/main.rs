//! Integration tests: the real `punix` binary against real files and
//! processes.
#![allow(clippy::unwrap_used)]

mod build;
mod common;
mod deploy;
mod store;
