//! `punix store path|ls|verify|gc|hash|export|import`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;

use super::build::parse_system;
use super::human_bytes;
use super::{Context, print_json, recipes_path};
use punix::Error;
use punix::build::plan::plan;
use punix::cache::{self, Cache, export};
use punix::recipe;
use punix::store::lock::LockMode;
use punix::store::{Store, StoreError, content_hash, gc};

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
    /// Write store paths and their closure to a binary cache (a directory):
    /// a stack's or package's closure for a system, or explicit paths.
    Export(ExportArgs),
    /// Fetch entries and their closure from a binary cache (a directory,
    /// `file://` or `http(s)://`), verified before they enter the store.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct PathArgs {
    /// A recipe file or a directory of `*.toml` recipe files.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The system to compute the path for [default: this machine's].
    #[arg(long, value_name = "SYSTEM")]
    pub system: Option<String>,
    /// Print one JSON object (package name -> store path) on stdout.
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
    /// Print one JSON array of entries (path, name, system, content hash,
    /// size, inputs) on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Discard the damaged entries, so that the next build makes them again.
    #[arg(long)]
    pub repair: bool,
    /// Print one JSON object (checked, failed, repaired) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Entries to verify, by name or store path [default: all].
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
    /// Print one JSON object with what gc found and did on stdout.
    #[arg(long)]
    pub json: bool,
    /// Collect garbage on a target instead of here: keep every path that a
    /// generation of any stack there pins.
    #[command(flatten)]
    pub target: super::service::TargetArgs,
}

#[derive(Debug, Args)]
pub struct HashArgs {
    /// Files or directory trees to hash (any path, in the store or not).
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The cache to write: a directory or a `file://` URL (made if missing).
    #[arg(long, value_name = "DIR")]
    pub to: String,
    /// A recipe file or a directory of `*.toml` recipe files, for the stacks
    /// and packages named.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The system whose closure to export [default: this machine's].
    #[arg(long, value_name = "SYSTEM")]
    pub system: Option<String>,
    /// Print one JSON object (exported, skipped, bytes) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Stacks or packages of the recipes, or store paths (or entry names).
    #[arg(value_name = "STACK|PACKAGE|PATH", required = true)]
    pub items: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The cache: a directory, `file:///…` or `http(s)://…`.
    #[arg(value_name = "FROM")]
    pub from: String,
    /// Print one JSON object (fetched, present, bytes) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Entries to fetch with their closure, by name or store path
    /// [default: everything in the cache].
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
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
                            "size": store.entry_size(n),
                            "inputs": drv.map(|d| d.inputs).unwrap_or_default(),
                        })
                    })
                    .collect();
                if a.json {
                    print_json(&json!(rows));
                } else {
                    for r in rows {
                        println!(
                            "{}  {}  {}  {}",
                            r["path"].as_str().unwrap_or_default(),
                            r["system"].as_str().unwrap_or("?"),
                            r["content_hash"].as_str().unwrap_or("?"),
                            human_bytes(r["size"].as_u64().unwrap_or(0)),
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
        StoreCommand::Verify(a) => verify(&store, a),
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
            print_gc_target(&store, &report, "");
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
                "{verb} {} ({}), kept {} reachable from {} root(s)",
                entries(report.deleted.len()),
                human_bytes(report.freed_bytes),
                report.kept,
                report.roots.len()
            );
            Ok(())
        }
        StoreCommand::Export(a) => export(&store, a),
        StoreCommand::Import(a) => import(&store, a),
        StoreCommand::Hash(a) => {
            for p in &a.paths {
                let h = content_hash::hash_tree(p).map_err(punix::store::StoreError::from)?;
                println!("{h}  {}", p.display());
            }
            Ok(())
        }
    }
}

/// Re-hash entries; with `--repair`, discard the damaged ones.
fn verify(store: &Store, a: VerifyArgs) -> Result<(), Error> {
    let names = if a.names.is_empty() {
        store.list()?
    } else {
        a.names
            .iter()
            .map(|n| store.resolve_name(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    let results: Vec<(String, Result<(), StoreError>)> = names
        .par_iter()
        .map(|n| (n.clone(), store.verify_entry(n)))
        .collect();
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n.clone())
        .collect();
    // Damaged: present but not what was built. A name that is not an entry
    // here, or a read error, is not repaired by deleting.
    let damaged = |e: &StoreError| {
        matches!(
            e,
            StoreError::Modified { .. }
                | StoreError::Corrupt { .. }
                | StoreError::Hash(content_hash::HashError::Special { .. })
        )
    };
    let mut repaired = Vec::new();
    let mut unrepaired = Vec::new();
    if a.repair {
        let to_discard: Vec<&String> = results
            .iter()
            .filter(|(_, r)| r.as_ref().err().is_some_and(damaged))
            .map(|(n, _)| n)
            .collect();
        if !to_discard.is_empty() {
            store.ensure_writable()?;
            let _gc = store.lock_gc(LockMode::Shared, true)?;
            for n in to_discard {
                let _lock = store.lock_entry(n)?;
                store.discard(n)?;
                repaired.push(n.clone());
            }
        }
        unrepaired = failed
            .iter()
            .filter(|n| !repaired.contains(n))
            .cloned()
            .collect();
    }
    if a.json {
        print_json(&json!({
            "checked": results.len(),
            "failed": results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| json!({"name": n, "error": e.to_string()}))).collect::<Vec<_>>(),
            "repaired": repaired,
        }));
    } else {
        for (n, r) in &results {
            if let Err(e) = r {
                eprintln!("FAILED: {e}");
                if repaired.contains(n) {
                    eprintln!("  discarded `{n}`: the next build makes it again");
                }
            }
        }
        eprintln!(
            "verified {}: {} ok, {} failed{}",
            entries(results.len()),
            results.len() - failed.len(),
            failed.len(),
            if a.repair {
                format!(", {} discarded", repaired.len())
            } else {
                String::new()
            }
        );
        if !a.repair
            && failed.iter().any(|n| {
                results
                    .iter()
                    .any(|(m, r)| m == n && r.as_ref().err().is_some_and(damaged))
            })
        {
            eprintln!(
                "  hint: `punix store verify --repair` discards the damaged entries; the next build (or deploy) makes them again"
            );
        }
    }
    let still_failed = if a.repair { unrepaired } else { failed };
    if still_failed.is_empty() {
        Ok(())
    } else {
        Err(Error::VerifyFailed {
            failed: still_failed,
            total: results.len(),
        })
    }
}

/// Is `item` a store path or entry name (not a stack or package)?
fn is_store_item(item: &str) -> bool {
    item.contains('/') || punix::store::derivation::is_store_name(item)
}

fn export(store: &Store, a: ExportArgs) -> Result<(), Error> {
    // Where to write, checked before any recipe is read.
    let cache = Cache::open(&a.to)?;
    if !cache.is_local() {
        return Err(cache::CacheError::ReadOnly { url: a.to.clone() }.into());
    }
    let (paths, recipe_items): (Vec<&String>, Vec<&String>) =
        a.items.iter().partition(|i| is_store_item(i));
    let mut names = BTreeSet::new();
    for p in paths {
        let name = store.resolve_name(p)?;
        if !store.is_valid(&name) {
            return Err(StoreError::NotFound(name).into());
        }
        names.insert(name);
    }
    if !recipe_items.is_empty() {
        let path = recipes_path(a.file.as_deref())?;
        let recipes = recipe::load(&path)?;
        let system = parse_system(a.system.as_deref())?;
        let items: Vec<String> = recipe_items.into_iter().cloned().collect();
        names.extend(export::recipe_closure(
            store, &recipes, &path, &system, &items,
        )?);
    } else if a.system.is_some() {
        return Err(Error::Usage(
            "`--system` chooses the closure of stacks and packages; store paths name theirs already"
                .into(),
        ));
    }
    let progress = CacheProgress::new(a.json, "exporting");
    let result = cache.export_from(store, names, &progress);
    progress.finish();
    let report = result?;
    if a.json {
        print_json(&json!({
            "cache": cache.url(),
            "exported": report.exported,
            "skipped": report.skipped,
            "bytes": report.bytes,
            "unpacked": report.unpacked,
        }));
    } else if report.exported.is_empty() {
        eprintln!(
            "nothing to export: {} already in {}",
            entries(report.skipped.len()),
            cache.url()
        );
    } else {
        eprintln!(
            "exported {} to {} ({} compressed from {}), {} already there",
            entries(report.exported.len()),
            cache.url(),
            human_bytes(report.bytes),
            human_bytes(report.unpacked),
            report.skipped.len()
        );
    }
    Ok(())
}

fn import(store: &Store, a: ImportArgs) -> Result<(), Error> {
    let cache = Cache::open(&a.from)?;
    let progress = CacheProgress::new(a.json, "fetching");
    let result = if a.names.is_empty() {
        cache.fetch_all(store, &progress)
    } else {
        let names = a
            .names
            .iter()
            .map(|n| store.resolve_name(n))
            .collect::<Result<Vec<_>, _>>()?;
        cache.fetch_into(store, &names, &progress)
    };
    progress.finish();
    let report = result?;
    if a.json {
        print_json(&json!({
            "cache": cache.url(),
            "fetched": report.fetched,
            "present": report.present,
            "bytes": report.bytes,
        }));
    } else if report.fetched.is_empty() {
        eprintln!(
            "nothing to import: {} already in the store",
            entries(report.present.len())
        );
    } else {
        for n in &report.fetched {
            println!("{}", store.entry_path(n).display());
        }
        eprintln!(
            "imported {} from {} ({}, every content hash checked), {} already in the store",
            entries(report.fetched.len()),
            cache.url(),
            human_bytes(report.bytes),
            report.present.len()
        );
    }
    Ok(())
}

/// Progress of an export or import: a byte bar on a terminal, one line
/// per entry otherwise, nothing with `--json`.
struct CacheProgress {
    verb: &'static str,
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl CacheProgress {
    fn new(json: bool, verb: &'static str) -> CacheProgress {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "[{elapsed_precise}] {bar:30.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        CacheProgress {
            verb,
            quiet: json,
            bar,
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl cache::Observer for CacheProgress {
    fn event(&self, event: cache::Event<'_>) {
        if self.quiet {
            return;
        }
        match (event, &self.bar) {
            (cache::Event::Planned { bytes, .. }, Some(bar)) => bar.set_length(bytes),
            (cache::Event::Started { name, .. }, Some(bar)) => {
                bar.set_message(name.get(33..).unwrap_or(name).to_string());
            }
            (cache::Event::Progress { bytes }, Some(bar)) => bar.inc(bytes),
            (
                cache::Event::Planned {
                    entries: n,
                    present,
                    bytes,
                },
                None,
            ) if n > 0 => eprintln!(
                "{} {} ({}), {present} already there",
                self.verb,
                entries(n),
                human_bytes(bytes)
            ),
            (cache::Event::Finished { name, bytes }, None) => {
                eprintln!("  {name} ({})", human_bytes(bytes));
            }
            (
                cache::Event::Retrying {
                    url,
                    attempt,
                    wait,
                    reason,
                },
                bar,
            ) => {
                let line = format!(
                    "note: {url}: {reason}; attempt {} in {:.2}s",
                    attempt + 1,
                    wait.as_secs_f64()
                );
                match bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            _ => {}
        }
    }
}

/// "1 entry", "3 entries".
fn entries(n: usize) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}

/// The plain output of a gc on a target: a line per entry on stdout (each
/// ending in `suffix`), the summary on stderr.
pub(super) fn print_gc_target(
    store: &punix::store::Store,
    report: &punix::deploy::GcTargetReport,
    suffix: &str,
) {
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for n in &report.deleted {
        println!("{verb} {}{suffix}", store.entry_path(n).display());
    }
    for p in &report.stale_pushes {
        println!("{verb} {p}{suffix} (a push left by a killed deploy)");
    }
    for n in &report.in_use {
        println!(
            "kept {}{suffix} (not pinned, but a deploy or a build used it within the last {} minutes)",
            store.entry_path(n).display(),
            punix::deploy::remote::IN_USE_MINUTES
        );
    }
    eprintln!(
        "{verb} {} on {}, kept {} ({} pinned by generations)",
        entries(report.deleted.len()),
        report.target,
        report.kept,
        report.pinned
    );
}
