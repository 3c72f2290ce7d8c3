//! Builds: from recipes to derivations ([`plan`]), one build on this
//! machine ([`local`]), and the parallel scheduler ([`scheduler`]).

pub mod builders;
pub mod local;
pub mod plan;
pub mod scheduler;

use std::io;
use std::path::{Path, PathBuf};

use crate::files::FileError;
use crate::recipe::RecipeError;
use crate::store::StoreError;
use crate::store::content_hash::HashError;

/// What a build run tells its observer (the terminal renderer, a log).
#[derive(Debug)]
pub enum Event<'a> {
    /// The plan is known: these entries will be built, `present` are there.
    Planned {
        to_build: &'a [String],
        present: usize,
    },
    Started {
        module: &'a str,
        name: &'a str,
    },
    Finished {
        module: &'a str,
        name: &'a str,
        seconds: f64,
        /// Another process built it while this one waited.
        elsewhere: bool,
    },
    Failed {
        module: &'a str,
        name: &'a str,
        error: &'a BuildError,
    },
}

/// Receives build events; called from worker threads.
pub trait Observer: Sync {
    fn event(&self, event: Event<'_>);
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// Errors of planning and running builds.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot hash the source tree of package `{module}`: {source}")]
    Source { module: String, source: HashError },
    #[error("package `{module}` ({origin}) is built only for {}, not for `{system}`\n  hint: add `{system}` to its `systems`, or build for one of those", .systems.join(", "))]
    UnsupportedSystem {
        module: String,
        system: String,
        systems: Vec<String>,
        origin: String,
    },
    #[error("building for `{system}` needs a machine of that system, and this one is `{host}` ({count} package(s) to build: {modules})\n  hint: build on an `{system}` machine (or a CI runner of that architecture), or pick `--system {host}`; emulation is never used silently", count = .modules.len(), modules = .modules.join(", "))]
    NeedsMachine {
        system: String,
        host: String,
        modules: Vec<String>,
    },
    #[error("package `{module}` needs the machine feature(s) {missing}, which this machine does not offer\n  hint: list the features this machine has under `features` in ~/.config/punix/config.toml", missing = .missing.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "))]
    MissingFeatures {
        module: String,
        missing: Vec<String>,
    },
    #[error("package `{module}` uses the unknown builder `{kind}`")]
    UnknownBuilder { module: String, kind: String },
    #[error("the input `{input}` of package `{module}` is not in the store")]
    MissingInput { module: String, input: String },
    #[error("cannot start the builder of package `{module}`: {source}")]
    Spawn { module: String, source: io::Error },
    #[error("building package `{module}` ({name}) failed: {reason}\n--- last lines of {log} ---\n{tail}\n---\n  hint: the whole log is in `{log}`", log = .log.display())]
    Failed {
        module: String,
        name: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{}", output_rejected(.module, .source, .log))]
    Output {
        module: String,
        log: PathBuf,
        /// Boxed: a store error is large, and this variant is rare.
        source: Box<StoreError>,
    },
    #[error("{} build(s) failed{}:\n{}", .failures.len(), if *.skipped > 0 { format!(", {} skipped because an input failed", .skipped) } else { String::new() }, .failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n"))]
    Several {
        failures: Vec<BuildError>,
        skipped: usize,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The message of a rejected output.
fn output_rejected(module: &str, source: &StoreError, log: &Path) -> String {
    match source {
        StoreError::SpecialFile { file, kind, .. } => format!(
            "`{}` in the output of `{module}` is a {kind}; a store tree may hold only files, directories and symlinks\n  hint: remove it before the script ends (a program can make it when it runs); the build log is in `{}`",
            file.display(),
            log.display()
        ),
        other => format!(
            "the output of package `{module}` was rejected: {other}\n  hint: the build log is in `{}`",
            log.display()
        ),
    }
}
