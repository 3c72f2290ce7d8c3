//! Garbage collection: delete the entries no root reaches.
//!
//! Roots are the store paths pinned by generation files
//! (`<deployments-root>/<stack>/gen-*.json`, field `store_paths`) and the
//! symlinks in `<store-root>/.roots/`. Everything in the runtime closure of a
//! root stays. A generation file that cannot be read or parsed stops gc
//! before it deletes anything, since the paths it pins are unknown. gc holds
//! the store's gc lock exclusively, so no build of this store runs
//! meanwhile, and removes each entry by renaming it away first, so an entry
//! is either whole or gone; it also removes every temporary (`.tmp...`,
//! `.del-...`), which no running build can own.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::derivation::is_store_name;
use super::lock::LockMode;
use super::{Store, StoreError, tree_size};
use crate::files::ctx;

/// Where a root came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Root {
    /// The generation file or root link that pins it.
    pub source: PathBuf,
    /// The entry name it pins.
    pub name: String,
}

/// What gc found and did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub roots: Vec<Root>,
    /// Roots naming entries this store does not hold.
    pub missing_roots: Vec<Root>,
    pub kept: usize,
    pub deleted: Vec<String>,
    pub freed_bytes: u64,
    pub dry_run: bool,
}

/// The entry name a path or name in a root refers to, if it is one of ours.
fn entry_name_of(store: &Store, s: &str) -> Option<String> {
    let path = Path::new(s);
    let name = if path.is_absolute() {
        let rest = path.strip_prefix(store.root()).ok()?;
        rest.components().next()?.as_os_str().to_str()?.to_string()
    } else {
        s.to_string()
    };
    is_store_name(&name).then_some(name)
}

/// Read every root: generation files under `deployments_root` and links in
/// the store's `.roots/`.
pub fn find_roots(store: &Store, deployments_root: Option<&Path>) -> Result<Vec<Root>, StoreError> {
    let mut roots = BTreeSet::new();
    if let Some(dep) = deployments_root {
        for stack_dir in read_dir_sorted(dep)? {
            if !stack_dir.is_dir() {
                continue;
            }
            for file in read_dir_sorted(&stack_dir)? {
                let Some(fname) = file.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if !(fname.starts_with("gen-") && fname.ends_with(".json")) {
                    continue;
                }
                for p in generation_paths(&file)? {
                    if let Some(name) = entry_name_of(store, &p) {
                        roots.insert(Root {
                            source: file.clone(),
                            name,
                        });
                    }
                }
            }
        }
    }
    for link in read_dir_sorted(&store.roots_dir())? {
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        let target = if target.is_absolute() {
            target
        } else {
            store.roots_dir().join(target)
        };
        if let Some(name) = target
            .to_str()
            .and_then(|t| entry_name_of(store, t))
            .or_else(|| {
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .filter(|n| is_store_name(n))
                    .map(str::to_string)
            })
        {
            roots.insert(Root { source: link, name });
        }
    }
    Ok(roots.into_iter().collect())
}

/// The store paths a generation file pins; any doubt is an error, so gc
/// never deletes what an unreadable generation may pin.
fn generation_paths(file: &Path) -> Result<Vec<String>, StoreError> {
    let bad = |reason: String| StoreError::BadGeneration {
        file: file.to_path_buf(),
        reason,
    };
    let bytes = fs::read(file).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let paths = value
        .get("store_paths")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("it has no `store_paths` list".into()))?;
    paths
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`store_paths` holds {v}, not a path")))
        })
        .collect()
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let rd = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(ctx("cannot list", dir))?,
    };
    let mut out = Vec::new();
    for entry in rd {
        out.push(entry.map_err(ctx("cannot list", dir))?.path());
    }
    out.sort();
    Ok(out)
}

/// Collect garbage. With `dry_run`, only report what would go.
pub fn collect(
    store: &Store,
    deployments_root: Option<&Path>,
    dry_run: bool,
) -> Result<GcReport, StoreError> {
    let _lock = if dry_run {
        None
    } else {
        store.ensure_writable()?;
        store.lock_gc(LockMode::Exclusive, true)?
    };
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let mut live_roots = Vec::new();
    for root in find_roots(store, deployments_root)? {
        if store.is_valid(&root.name) {
            live_roots.push(root.name.clone());
            report.roots.push(root);
        } else {
            report.missing_roots.push(root);
        }
    }
    let live = store.closure(live_roots)?;
    for name in store.list()? {
        if live.contains(&name) {
            report.kept += 1;
            continue;
        }
        report.freed_bytes += tree_size(&store.entry_path(&name));
        if !dry_run {
            store.discard(&name)?;
            let _ = fs::remove_file(store.log_path(&name));
        }
        report.deleted.push(name);
    }
    if !dry_run {
        store.sweep_all()?;
    }
    Ok(report)
}
