//! The command line: one file per command group. This is the only place
//! that knows clap and the terminal.

mod build;
mod builders;
mod ci;
mod progress;
mod service;
mod store;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use punix::Error;
use punix::config::Config;

/// punix: build packages into a content-addressed store and deploy them.
#[derive(Debug, Parser)]
#[command(name = "punix", version, about, max_term_width = 100)]
pub struct Cli {
    /// The store root, one absolute path used on every machine
    /// [default: `store-root` in config.toml, else ~/.punix/store]
    #[arg(long, global = true, env = "PUNIX_STORE_DIR", value_name = "DIR")]
    pub store_root: Option<PathBuf>,

    /// Say more about what happens.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build packages (and their inputs) into the store.
    Build(build::BuildArgs),
    /// Inspect and maintain the store.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Deploy stacks of services, roll them back, show their state.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Manage the build farm: list, add, remove, check and collect builders.
    #[command(subcommand)]
    Builders(builders::BuildersCommand),
    /// Write CI workflows: `punix ci matrix` builds a stack per system on
    /// GitHub-hosted runners and deploys it.
    #[command(subcommand)]
    Ci(ci::CiCommand),
}

pub fn parse() -> Cli {
    Cli::parse()
}

/// What every command needs: settings and the store root.
pub struct Context {
    pub config: Config,
    pub store_root: PathBuf,
    pub verbose: bool,
}

pub fn run(cli: Cli) -> Result<(), Error> {
    let config = Config::load()?;
    let store_root = config.store_root(cli.store_root.as_deref())?;
    let cx = Context {
        config,
        store_root,
        verbose: cli.verbose,
    };
    match cli.command {
        Command::Build(args) => build::run(&cx, args),
        Command::Store(cmd) => store::run(&cx, cmd),
        Command::Service(cmd) => service::run(&cx, cmd),
        Command::Builders(cmd) => builders::run(&cx, cmd),
        Command::Ci(cmd) => ci::run(&cx, cli.store_root.as_deref(), cmd),
    }
}

/// The recipes path: `--file`, else `$PUNIX_FILE` (through clap), else
/// `./punix.toml` when it exists.
pub fn recipes_path(file: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(f) = file {
        return Ok(f.to_path_buf());
    }
    let default = Path::new("punix.toml");
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    Err(Error::Usage(
        "no recipes given: pass `--file FILE_OR_DIR` (or create ./punix.toml)".into(),
    ))
}

/// Print a value as one line of JSON on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// A byte count for people: `512 B`, `36.6 KiB`, `1.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
