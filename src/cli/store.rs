//! `punix store path|ls|verify|gc|hash`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde_json::json;

use super::build::parse_system;
use super::{Context, print_json, recipes_path};
use punix::Error;
use punix::build::plan::plan;
use punix::recipe;
use punix::store::{Store, content_hash, gc};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Print the store path a package will have, without building it.
    Path(PathArgs),
    /// List the valid entries of the store.
    Ls(LsArgs),
    /// Re-hash entries and report those whose content changed.
    Verify(VerifyArgs),
    /// Delete entries no root reaches (generations, `.roots/` links).
    Gc(GcArgs),
    /// Print the content hash of any file or directory tree.
    Hash(HashArgs),
}

#[derive(Debug, Args)]
pub struct PathArgs {
    /// A recipe file or a directory of `*.toml` recipe files.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The system to compute the path for [default: this machine's].
    #[arg(long, value_name = "SYSTEM")]
    pub system: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Packages [default: all].
    #[arg(value_name = "PACKAGE")]
    pub modules: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Also show the system, the content hash and the size.
    #[arg(long, short = 'l')]
    pub long: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub json: bool,
    /// Entry names to verify [default: all].
    #[arg(value_name = "ENTRY")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only show what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Where generations live; their store paths are roots
    /// [default: `deployments-root` in config.toml, else ~/.punix/deployments]
    #[arg(long, env = "PUNIX_DEPLOYMENTS_ROOT", value_name = "DIR")]
    pub deployments_root: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Collect garbage on a target instead of here: keep every path that a
    /// generation of any stack there pins.
    #[command(flatten)]
    pub target: super::service::TargetArgs,
}

#[derive(Debug, Args)]
pub struct HashArgs {
    pub paths: Vec<PathBuf>,
}

pub fn run(cx: &Context, cmd: StoreCommand) -> Result<(), Error> {
    let store = Store::new(&cx.store_root)?;
    match cmd {
        StoreCommand::Path(a) => {
            let path = recipes_path(a.file.as_deref())?;
            let recipes = recipe::load(&path)?;
            let system = parse_system(a.system.as_deref())?;
            let plan = plan(&recipes, store.root(), &system, &a.modules)?;
            if a.json {
                let map: serde_json::Map<_, _> = plan
                    .roots
                    .iter()
                    .map(|(m, n)| (m.clone(), json!(plan.entry_path(n))))
                    .collect();
                print_json(&json!(map));
            } else {
                for name in plan.roots.values() {
                    println!("{}", plan.entry_path(name).display());
                }
            }
            Ok(())
        }
        StoreCommand::Ls(a) => {
            let names = store.list()?;
            if a.json || a.long {
                let rows: Vec<serde_json::Value> = names
                    .iter()
                    .map(|n| {
                        let drv = store.derivation(n).ok();
                        let built = store.built(n).ok();
                        json!({
                            "path": store.entry_path(n),
                            "name": n,
                            "system": drv.as_ref().map(|d| d.system.clone()),
                            "content_hash": built.map(|b| b.content_hash),
                            "inputs": drv.map(|d| d.inputs).unwrap_or_default(),
                        })
                    })
                    .collect();
                if a.json {
                    print_json(&json!(rows));
                } else {
                    for r in rows {
                        println!(
                            "{}  {}  {}",
                            r["path"].as_str().unwrap_or_default(),
                            r["system"].as_str().unwrap_or("?"),
                            r["content_hash"].as_str().unwrap_or("?"),
                        );
                    }
                }
            } else {
                for n in names {
                    println!("{}", store.entry_path(&n).display());
                }
            }
            Ok(())
        }
        StoreCommand::Verify(a) => {
            let names = if a.names.is_empty() {
                store.list()?
            } else {
                a.names
                    .iter()
                    .map(|n| {
                        PathBuf::from(n)
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_else(|| n.clone())
                    })
                    .collect()
            };
            let results: Vec<(String, Result<(), String>)> = names
                .par_iter()
                .map(|n| (n.clone(), store.verify_entry(n).map_err(|e| e.to_string())))
                .collect();
            let failed: Vec<String> = results
                .iter()
                .filter(|(_, r)| r.is_err())
                .map(|(n, _)| n.clone())
                .collect();
            if a.json {
                print_json(&json!({
                    "checked": results.len(),
                    "failed": results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| json!({"name": n, "error": e}))).collect::<Vec<_>>(),
                }));
            } else {
                for (_, r) in &results {
                    if let Err(e) = r {
                        eprintln!("FAILED: {e}");
                    }
                }
                eprintln!(
                    "verified {} entries: {} ok, {} failed",
                    results.len(),
                    results.len() - failed.len(),
                    failed.len()
                );
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Error::VerifyFailed {
                    failed,
                    total: results.len(),
                })
            }
        }
        StoreCommand::Gc(a) if a.target.given() => {
            let t = a.target.open()?;
            let report = punix::deploy::gc_target(
                t.as_ref(),
                store.root(),
                a.deployments_root.as_deref(),
                a.dry_run,
                std::time::Duration::from_secs(a.target.timeout),
            )?;
            if a.json {
                print_json(&serde_json::to_value(&report).unwrap_or_default());
                return Ok(());
            }
            let verb = if a.dry_run { "would delete" } else { "deleted" };
            for n in &report.deleted {
                println!("{verb} {}", store.entry_path(n).display());
            }
            eprintln!(
                "{verb} {} entries on {}, kept {} ({} pinned by generations)",
                report.deleted.len(),
                report.target,
                report.kept,
                report.pinned
            );
            Ok(())
        }
        StoreCommand::Gc(a) => {
            let dep_root = cx.config.deployments_root(a.deployments_root.as_deref())?;
            let report = gc::collect(&store, Some(&dep_root), a.dry_run)?;
            if a.json {
                print_json(&serde_json::to_value(&report).unwrap_or_default());
                return Ok(());
            }
            for r in &report.missing_roots {
                eprintln!(
                    "note: root `{}` names `{}`, which is not in the store",
                    r.source.display(),
                    r.name
                );
            }
            let verb = if a.dry_run { "would delete" } else { "deleted" };
            for n in &report.deleted {
                println!("{verb} {}", store.entry_path(n).display());
            }
            eprintln!(
                "{verb} {} entries ({}), kept {} reachable from {} root(s)",
                report.deleted.len(),
                human_bytes(report.freed_bytes),
                report.kept,
                report.roots.len()
            );
            Ok(())
        }
        StoreCommand::Hash(a) => {
            for p in &a.paths {
                let h = content_hash::hash_tree(p).map_err(punix::store::StoreError::from)?;
                println!("{h}  {}", p.display());
            }
            Ok(())
        }
    }
}

fn human_bytes(n: u64) -> String {
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
