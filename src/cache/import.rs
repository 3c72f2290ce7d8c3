//! Fetching entries from a cache into the store, verified before they
//! are renamed into place (see the module docs of [`crate::cache`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::Serialize;

use super::archive::{self, Limits, UnpackError};
use super::format::{EntryInfo, FORMAT, archive_file, meta_file};
use super::location::{HTTP_ATTEMPTS, HTTP_FIRST_BACKOFF};
use super::{Cache, CacheError, Event, Observer};
use crate::files;
use crate::store::derivation::{Derivation, is_store_name};
use crate::store::lock::LockMode;
use crate::store::{Store, StoreError};

/// What a fetch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FetchReport {
    /// Entries fetched into the store, references first.
    pub fetched: Vec<String>,
    /// Entries of the closure that were already valid in the store.
    pub present: Vec<String>,
    /// Archive bytes transferred.
    pub bytes: u64,
}

/// Read and check the metadata of `name`.
pub(super) fn read_entry(
    cache: &Cache,
    name: &str,
    observer: &dyn Observer,
) -> Result<Option<EntryInfo>, CacheError> {
    if !is_store_name(name) {
        return Err(CacheError::BadName { name: name.into() });
    }
    let file = meta_file(name);
    let shown = cache.location.describe(&file);
    let Some(bytes) = cache.location.read_small(&file, observer)? else {
        return Ok(None);
    };
    let bad = |reason: String| CacheError::BadMetadata {
        file: shown.clone(),
        reason,
    };
    let info: EntryInfo = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if info.format != FORMAT {
        return Err(bad(format!(
            "it has format {}, and this punix reads format {FORMAT}",
            info.format
        )));
    }
    if info.name != name {
        return Err(bad(format!("it describes `{}`", info.name)));
    }
    if info.archive != archive_file(name) {
        return Err(bad(format!(
            "its archive is `{}`, not `{}`",
            info.archive,
            archive_file(name)
        )));
    }
    if let Some(r) = info.references.iter().find(|r| !is_store_name(r)) {
        return Err(bad(format!("its reference `{r}` is not a store name")));
    }
    if info.references.iter().any(|r| r == name) {
        return Err(bad("it lists itself as a reference".into()));
    }
    let drv_name = info.derivation.store_name();
    if drv_name != name {
        return Err(bad(format!("its derivation hashes to `{drv_name}`")));
    }
    if info.derivation.inputs != info.references {
        return Err(bad(
            "its references are not its derivation's inputs".to_string()
        ));
    }
    if info.derivation.system != info.system {
        return Err(bad(format!(
            "it says system `{}`, its derivation `{}`",
            info.system, info.derivation.system
        )));
    }
    Ok(Some(info))
}

/// Fetch `wanted` (every entry when `None`) and their closure.
pub(super) fn fetch(
    cache: &Cache,
    store: &Store,
    wanted: Option<&[String]>,
    observer: &dyn Observer,
) -> Result<FetchReport, CacheError> {
    cache.check_observed(store.root(), observer)?;
    let roots: Vec<String> = match wanted {
        Some(w) => {
            for n in w {
                if !is_store_name(n) {
                    return Err(CacheError::BadName { name: n.clone() });
                }
            }
            w.to_vec()
        }
        None => cache.location.list(observer)?.into_iter().collect(),
    };

    // The closure, through the metadata's references; an entry valid in
    // the store stands for its own closure.
    let mut metas: BTreeMap<String, EntryInfo> = BTreeMap::new();
    let mut present = BTreeSet::new();
    let mut absent = Vec::new();
    let mut needed_by: BTreeMap<String, String> = BTreeMap::new();
    let mut queue: Vec<String> = roots.iter().rev().cloned().collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if store.is_valid(&name) {
            present.insert(name);
            continue;
        }
        match read_entry(cache, &name, observer)? {
            Some(info) => {
                for r in info.references.iter().rev() {
                    needed_by.entry(r.clone()).or_insert_with(|| name.clone());
                    queue.push(r.clone());
                }
                metas.insert(name, info);
            }
            None => match needed_by.get(&name) {
                Some(parent) => {
                    return Err(CacheError::MissingReference {
                        url: cache.url.clone(),
                        name: parent.clone(),
                        reference: name,
                    });
                }
                None => absent.push(name),
            },
        }
    }
    if !absent.is_empty() {
        return Err(CacheError::NotInCache {
            url: cache.url.clone(),
            names: absent,
        });
    }
    let order = references_first(&metas).map_err(|name| CacheError::BadMetadata {
        file: cache.location.describe(&meta_file(&name)),
        reason: "its references form a cycle".into(),
    })?;

    let mut report = FetchReport {
        present: present.into_iter().collect(),
        ..FetchReport::default()
    };
    observer.event(Event::Planned {
        entries: order.len(),
        present: report.present.len(),
        bytes: metas.values().map(|m| m.archive_size).sum(),
    });
    if order.is_empty() {
        return Ok(report);
    }
    store.ensure_writable()?;
    // Builds hold this lock shared too; gc, which removes every
    // temporary, holds it exclusively.
    let _gc = store.lock_gc(LockMode::Shared, true)?;
    for level in levels(&order, &metas) {
        let results = import_level(cache, store, &level, &metas, observer);
        let mut first_err = None;
        for (name, result) in level.iter().zip(results) {
            match result {
                Some(Ok(true)) => {
                    report.bytes += metas[name].archive_size;
                    report.fetched.push(name.clone());
                }
                Some(Ok(false)) => report.present.push(name.clone()),
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                None => {}
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
    }
    report.present.sort();
    Ok(report)
}

/// Entries imported at once: one per core, at least two. Each import
/// alternates between the CPU (decompressing, hashing) and waiting
/// (creating files, syncing before the rename), so a second one keeps a
/// core busy while the first waits (measured on 2 cores: 10-35% faster
/// than one at a time); each costs a few MiB.
fn import_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().clamp(2, 8))
        .unwrap_or(2)
}

/// `order` cut into levels: an entry comes in the level after the last
/// of its references in `metas`, so each level needs only the ones before.
fn levels(order: &[String], metas: &BTreeMap<String, EntryInfo>) -> Vec<Vec<String>> {
    let mut level_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut levels: Vec<Vec<String>> = Vec::new();
    for name in order {
        let l = metas[name]
            .references
            .iter()
            .filter_map(|r| level_of.get(r.as_str()).map(|l| l + 1))
            .max()
            .unwrap_or(0);
        level_of.insert(name, l);
        if levels.len() <= l {
            levels.resize(l + 1, Vec::new());
        }
        levels[l].push(name.clone());
    }
    levels
}

/// Import the entries of one level, [`import_jobs`] at a time; after a
/// failure, no new one starts (`None` for those).
fn import_level(
    cache: &Cache,
    store: &Store,
    level: &[String],
    metas: &BTreeMap<String, EntryInfo>,
    observer: &dyn Observer,
) -> Vec<Option<Result<bool, CacheError>>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<bool, CacheError>>>> =
        Mutex::new((0..level.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..import_jobs().min(level.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= level.len() || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let info = &metas[&level[i]];
                    observer.event(Event::Started {
                        name: &info.name,
                        bytes: info.archive_size,
                    });
                    let r = import_entry(cache, store, info, observer);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    } else {
                        observer.event(Event::Finished {
                            name: &info.name,
                            bytes: info.archive_size,
                        });
                    }
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// The names of `metas`, each after the references it has in `metas`;
/// `Err(name)` for a name on a cycle.
fn references_first(metas: &BTreeMap<String, EntryInfo>) -> Result<Vec<String>, String> {
    fn visit(
        name: &str,
        metas: &BTreeMap<String, EntryInfo>,
        state: &mut BTreeMap<String, bool>,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => return Err(name.to_string()),
            None => {}
        }
        state.insert(name.to_string(), false);
        if let Some(info) = metas.get(name) {
            for r in &info.references {
                if metas.contains_key(r) {
                    visit(r, metas, state, out)?;
                }
            }
        }
        state.insert(name.to_string(), true);
        out.push(name.to_string());
        Ok(())
    }
    let mut state = BTreeMap::new();
    let mut out = Vec::new();
    for name in metas.keys() {
        visit(name, metas, &mut state, &mut out)?;
    }
    Ok(out)
}

/// Import one entry; `false` when it became valid meanwhile (made by
/// another process). Transfers that break off are tried again.
fn import_entry(
    cache: &Cache,
    store: &Store,
    info: &EntryInfo,
    observer: &dyn Observer,
) -> Result<bool, CacheError> {
    let name = info.name.as_str();
    let _lock = store.lock_entry(name)?;
    if store.is_valid(name) {
        return Ok(false);
    }
    if Some(info.derivation.store_root.as_str()) != store.root().to_str() {
        return Err(CacheError::OtherRoot {
            url: cache.url.clone(),
            cache_root: info.derivation.store_root.clone(),
            store_root: store.root().display().to_string(),
        });
    }
    let archive = cache.location.describe(&info.archive);
    let entry_path = store.entry_path(name);
    let references: Vec<PathBuf> = info
        .references
        .iter()
        .map(|r| store.entry_path(r))
        .collect();
    let limits = Limits {
        entry_path: &entry_path,
        references: &references,
        archive_size: info.archive_size,
        unpacked_size: info.unpacked_size,
    };
    let mut wait = HTTP_FIRST_BACKOFF;
    let mut attempt = 1;
    let (temp, unpacked) = loop {
        let src = cache
            .location
            .open(&info.archive, observer)?
            .ok_or_else(|| CacheError::NotInCache {
                url: cache.url.clone(),
                names: vec![info.archive.clone()],
            })?;
        let temp = store.temp_path(name);
        let result = archive::unpack(src, &temp, &limits, observer);
        match result {
            Ok(u) => break (temp, u),
            Err(e) => {
                let _ = files::remove_tree(&temp);
                let err = match e {
                    UnpackError::Transfer(reason) if attempt < HTTP_ATTEMPTS => {
                        observer.event(Event::Retrying {
                            url: &archive,
                            attempt,
                            wait,
                            reason: &reason,
                        });
                        std::thread::sleep(wait);
                        wait *= 2;
                        attempt += 1;
                        continue;
                    }
                    UnpackError::Transfer(reason) => CacheError::Http {
                        url: archive.clone(),
                        reason,
                        attempts: attempt,
                    },
                    UnpackError::Corrupt(reason) => CacheError::BadArchive {
                        archive: archive.clone(),
                        name: name.into(),
                        reason,
                    },
                    UnpackError::TooLarge(reason) => CacheError::Mismatch {
                        archive: archive.clone(),
                        name: name.into(),
                        reason,
                    },
                    UnpackError::Unsafe { member, reason } => CacheError::UnsafeMember {
                        archive: archive.clone(),
                        name: name.into(),
                        member,
                        reason,
                    },
                    UnpackError::Local(f) => CacheError::File(f),
                };
                return Err(err);
            }
        }
    };
    let reject = |reason: String| {
        let _ = files::remove_tree(&temp);
        CacheError::Mismatch {
            archive: archive.clone(),
            name: name.into(),
            reason,
        }
    };
    if unpacked.archive_size != info.archive_size {
        return Err(reject(format!(
            "it has {} bytes, the metadata says {}",
            unpacked.archive_size, info.archive_size
        )));
    }
    if unpacked.archive_sha256 != info.archive_sha256 {
        return Err(reject(format!(
            "its sha256 is {}, the metadata says {}",
            unpacked.archive_sha256, info.archive_sha256
        )));
    }
    let Some(drv_bytes) = unpacked.derivation else {
        return Err(reject("it has no `derivation.json`".into()));
    };
    let drv: Derivation = serde_json::from_slice(&drv_bytes)
        .map_err(|e| reject(format!("its `derivation.json` is unreadable: {e}")))?;
    if drv.store_name() != name {
        return Err(reject(format!(
            "its `derivation.json` hashes to `{}`",
            drv.store_name()
        )));
    }
    if drv != info.derivation {
        return Err(reject(
            "its `derivation.json` differs from the metadata's derivation".into(),
        ));
    }
    // Hashes the tree again and compares before `built` and the rename;
    // removes the temporary on any failure.
    match store.install(name, &temp, &drv, Some(&info.content_hash)) {
        Ok(_) => Ok(true),
        Err(StoreError::HashMismatch {
            expected, actual, ..
        }) => Err(CacheError::HashMismatch {
            archive,
            name: name.into(),
            expected,
            actual,
        }),
        Err(e @ (StoreError::SpecialFile { .. } | StoreError::ReservedName { .. })) => {
            Err(CacheError::Mismatch {
                archive,
                name: name.into(),
                reason: e.to_string(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::derivation::{BuilderRef, DERIVATION_FORMAT};

    fn info(pname: &str, inputs: &[&EntryInfo]) -> EntryInfo {
        let drv = Derivation {
            format: DERIVATION_FORMAT,
            pname: pname.into(),
            version: "1".into(),
            system: "x86_64-linux".into(),
            store_root: "/s".into(),
            builder: BuilderRef {
                kind: "shell".into(),
                script_sha256: "0".into(),
            },
            script: None,
            args: vec![],
            env: Default::default(),
            src_sha256: None,
            inputs: inputs.iter().map(|i| i.name.clone()).collect(),
            features: vec![],
        };
        let name = drv.store_name();
        EntryInfo {
            format: FORMAT,
            archive: archive_file(&name),
            name,
            content_hash: String::new(),
            archive_size: 0,
            archive_sha256: String::new(),
            unpacked_size: 0,
            references: drv.inputs.clone(),
            system: drv.system.clone(),
            derivation: drv,
        }
    }

    #[test]
    fn references_come_first() {
        let a = info("a", &[]);
        let b = info("b", &[&a]);
        let c = info("c", &[&b, &a]);
        let metas: BTreeMap<String, EntryInfo> = [&c, &a, &b]
            .iter()
            .map(|i| (i.name.clone(), (*i).clone()))
            .collect();
        let order = references_first(&metas).expect("order");
        let pos = |n: &str| order.iter().position(|x| x == n).expect("in order");
        assert!(pos(&a.name) < pos(&b.name) && pos(&b.name) < pos(&c.name));
        let d = info("d", &[]);
        let mut with_d = metas.clone();
        with_d.insert(d.name.clone(), d.clone());
        let order = references_first(&with_d).expect("order");
        let mut first = vec![a.name.clone(), d.name.clone()];
        first.sort();
        assert_eq!(
            levels(&order, &with_d),
            vec![first, vec![b.name.clone()], vec![c.name.clone()]]
        );
        let mut cyclic = metas.clone();
        if let Some(x) = cyclic.get_mut(&a.name) {
            x.references = vec![c.name.clone()];
        }
        assert!(references_first(&cyclic).is_err());
    }
}
