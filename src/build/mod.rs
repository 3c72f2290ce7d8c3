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

    /// Where a derivation is about to be built and why not elsewhere
    /// (build-farm routing, `--explain`). Ignored unless overridden.
    fn placed(&self, _placement: &Placement) {}
}

/// A machine passed over for a derivation, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rejection {
    /// `local`, or a builder's name.
    pub machine: String,
    pub reason: String,
}

/// Where one derivation was (or is to be) built, and why every other
/// candidate was not chosen.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Placement {
    pub module: String,
    pub name: String,
    pub system: String,
    /// `local`, or the builder's name.
    pub machine: String,
    /// How it is reached: `this machine` or the builder's URL.
    pub via: String,
    /// Why this one: `first choice`, or its place in the ranking.
    pub why: String,
    /// The other candidates, in the order they were considered.
    pub rejected: Vec<Rejection>,
}

impl Placement {
    /// The `--explain` lines: the choice, then each rejected machine.
    pub fn explain(&self) -> String {
        let short = self.name.get(33..).unwrap_or(&self.name);
        let mut s = if self.machine == "cache" {
            format!(
                "{module} ({short}, {system}): fetched from the cache {via}: {why}",
                module = self.module,
                system = self.system,
                via = self.via,
                why = self.why
            )
        } else {
            format!(
                "{module} ({short}, {system}): built on {machine} ({via}): {why}",
                module = self.module,
                system = self.system,
                machine = self.machine,
                via = self.via,
                why = self.why
            )
        };
        for r in &self.rejected {
            s.push_str(&format!(
                "\n  - not {}: {}",
                r.machine,
                indent_lines(r.reason.trim_end())
            ));
        }
        s
    }
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
    #[error("{}", no_machine(.system, .modules, .rejected, .registry.as_deref()))]
    NoMachine {
        system: String,
        /// The packages that need such a machine.
        modules: Vec<String>,
        /// This machine and every registered builder, with the reason.
        rejected: Vec<Rejection>,
        /// The builder registry that was read, for the message.
        registry: Option<PathBuf>,
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

/// Continuation lines of a list item, indented under it.
fn indent_lines(text: &str) -> String {
    text.lines()
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n      ")
}

/// The message of [`BuildError::NoMachine`].
fn no_machine(
    system: &str,
    modules: &[String],
    rejected: &[Rejection],
    registry: Option<&Path>,
) -> String {
    let host = crate::platform::System::host().to_string();
    let what = format!("{} package(s): {}", modules.len(), modules.join(", "));
    let mut s = if host != system {
        format!(
            "building for `{system}` needs a machine of that system, and this one is `{host}` ({what}); no registered builder can take it"
        )
    } else {
        format!("no machine can build for `{system}` ({what})")
    };
    for r in rejected {
        if host != system && r.machine == "local" && r.reason.starts_with("wrong system") {
            continue;
        }
        s.push_str(&format!(
            "\n  - {}: {}",
            r.machine,
            indent_lines(r.reason.trim_end())
        ));
    }
    let builders = rejected.iter().filter(|r| r.machine != "local").count();
    if builders == 0 {
        match registry {
            Some(p) => s.push_str(&format!(
                "\n  - no builders are registered (in `{}`)",
                p.display()
            )),
            None => s.push_str("\n  - no builders are registered"),
        }
    }
    if rejected.iter().any(|r| r.reason.contains("feature(s)")) {
        s.push_str("\n  hint: list the features a machine offers: this one's under `features` in ~/.config/punix/config.toml, a builder's with `punix builders add NAME URL --features a,b`");
    }
    s.push_str(&format!(
        "\n  hint: register a machine that builds for `{system}`: `punix builders add NAME ssh://USER@HOST` (see docs/build-farm.md), or build on CI runners of that architecture with `punix ci matrix` and import the result (docs/cross-arch.md); emulation (QEMU) is never used silently"
    ));
    s
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
