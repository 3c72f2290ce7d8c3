//! `punix ci matrix`: write a GitHub Actions workflow for the CI route.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{Context, recipes_path};
use punix::Error;
use punix::ci::{self, CiError, Install, Matrix, MatrixSpec};
use punix::recipe;

#[derive(Debug, Subcommand)]
pub enum CiCommand {
    /// Write a GitHub Actions workflow that builds a stack's closure
    /// natively on one runner per system, uploads each as a binary cache,
    /// and deploys the stack from the imported caches.
    ///
    /// The store root of every job is `--store-root` (or `PUNIX_STORE_DIR`,
    /// or `store-root` in config.toml), else /var/lib/punix/store.
    /// See docs/ci-matrix.md.
    Matrix(MatrixArgs),
}

#[derive(Debug, Args)]
pub struct MatrixArgs {
    /// The recipes (a file or a directory of `*.toml`), relative to the
    /// repository root, where this command runs.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The stack to build and deploy.
    #[arg(long, value_name = "STACK")]
    pub stack: String,
    /// The systems to build for, each on its own runner (x86_64-linux:
    /// ubuntu-24.04, aarch64-linux: ubuntu-24.04-arm).
    #[arg(
        long,
        value_name = "SYSTEM,...",
        value_delimiter = ',',
        default_value = "x86_64-linux,aarch64-linux"
    )]
    pub systems: Vec<String>,
    /// A target of the deploy job, `ssh://USER@HOST[:PORT]`; repeat for
    /// more. Without one the workflow has no deploy job.
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append)]
    pub deploy_target: Vec<String>,
    /// The punix version the runners install from crates.io (exact)
    /// [default: this punix's version].
    #[arg(long, value_name = "VERSION", conflicts_with = "punix_git")]
    pub punix_version: Option<String>,
    /// Install punix from git instead, at a pinned commit: `URL@REV` with
    /// REV a full commit hash.
    #[arg(long, value_name = "URL@REV")]
    pub punix_git: Option<String>,
    /// Write the workflow to this file (atomically) instead of stdout, for
    /// example `.github/workflows/punix-release.yml`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(cx: &Context, store_root_flag: Option<&Path>, cmd: CiCommand) -> Result<(), Error> {
    match cmd {
        CiCommand::Matrix(a) => matrix(cx, store_root_flag, a),
    }
}

fn matrix(cx: &Context, store_root_flag: Option<&Path>, a: MatrixArgs) -> Result<(), Error> {
    let path = recipes_path(a.file.as_deref())?;
    let file = path
        .to_str()
        .ok_or_else(|| Error::Usage(format!("`--file {}` is not UTF-8", path.display())))?;
    let recipes = recipe::load(&path)?;
    let store_root = match store_root_flag.or(cx.config.store_root.as_deref()) {
        Some(p) => {
            let p = punix::config::expand_home(p)?;
            // Lexically normalised as every punix command does; a relative
            // root stays as written, for Matrix::new to refuse.
            let p = if p.is_absolute() {
                punix::config::absolute(&p)
            } else {
                p
            };
            p.to_str()
                .ok_or_else(|| {
                    Error::Usage(format!("`--store-root {}` is not UTF-8", p.display()))
                })?
                .to_string()
        }
        None => ci::DEFAULT_STORE_ROOT.to_string(),
    };
    let install = match (&a.punix_version, &a.punix_git) {
        (Some(v), _) => Install::version(v),
        (None, Some(g)) => Install::git(g),
        (None, None) => Ok(Install::default()),
    }
    .map_err(ci_error)?;
    let spec = MatrixSpec {
        file: file.to_string(),
        stack: a.stack,
        systems: a.systems,
        deploy_targets: a.deploy_target,
        store_root,
        install,
    };
    let m = Matrix::new(spec, &recipes).map_err(ci_error)?;
    for w in m.warnings() {
        eprintln!("warning: {w}");
    }
    let text = m.workflow();
    match &a.out {
        None => print!("{text}"),
        Some(out) => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(punix::files::ctx("cannot create the directory", dir))?;
            }
            punix::files::write_atomic(out, text.as_bytes(), 0o644)?;
            let jobs: Vec<String> = m
                .systems()
                .iter()
                .map(|(s, r)| format!("{s} on {r}"))
                .collect();
            eprintln!(
                "wrote {}: build {}; {}; store root {}",
                out.display(),
                jobs.join(", "),
                match m.targets().len() {
                    0 => "no deploy job".to_string(),
                    n => format!("deploy {} to {n} target(s)", m.stack()),
                },
                m.store_root()
            );
        }
    }
    Ok(())
}

fn ci_error(e: CiError) -> Error {
    match e {
        CiError::Usage(m) => Error::Usage(m),
        CiError::Recipe(r) => Error::Recipe(r),
        CiError::Build(b) => Error::from(b),
    }
}
