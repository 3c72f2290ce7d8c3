//! Writing store entries into a directory cache (see the module docs of
//! [`crate::cache`]), and finding what a stack or package needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::Serialize;

use super::archive;
use super::format::{
    CACHE_INFO, CacheInfo, EntryInfo, FORMAT, INDEX, archive_file, meta_file, render_index,
};
use super::{Cache, CacheError, Event, Observer};
use crate::build::plan::plan;
use crate::files::{self, ctx};
use crate::platform::System;
use crate::recipe::{Recipes, diagnostic};
use crate::store::Store;
use crate::store::lock::{FileLock, LockMode};

/// The lock that serialises index updates of a directory cache.
const LOCK: &str = ".punix-cache.lock";

/// What an export did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    /// Entries written, references first.
    pub exported: Vec<String>,
    /// Entries of the closure the cache already had.
    pub skipped: Vec<String>,
    /// Archive bytes written.
    pub bytes: u64,
    /// File bytes of the entries written.
    pub unpacked: u64,
}

/// The store entries that `items` (stack or package names) need for
/// `system`: every derivation of the plan of their packages, which is
/// their runtime closure. Each must be valid in the store: if some are
/// not, the error lists them and the `punix build` that makes them.
pub fn recipe_closure(
    store: &Store,
    recipes: &Recipes,
    recipes_path: &Path,
    system: &System,
    items: &[String],
) -> Result<BTreeSet<String>, CacheError> {
    let mut modules = BTreeSet::new();
    for item in items {
        if let Some(stack) = recipes.stacks.get(item) {
            modules.extend(stack.modules());
        } else if recipes.packages.contains_key(item) {
            modules.insert(item.clone());
        } else {
            let candidates = recipes
                .stacks
                .keys()
                .chain(recipes.packages.keys())
                .map(String::as_str);
            return Err(CacheError::UnknownItem {
                name: item.clone(),
                hint: diagnostic::did_you_mean(item, candidates.clone()).or_else(|| {
                    Some(format!(
                        "the stacks are: {}; the packages are: {}",
                        list_or_none(recipes.stacks.keys()),
                        list_or_none(recipes.packages.keys())
                    ))
                }),
            });
        }
    }
    let modules: Vec<String> = modules.into_iter().collect();
    let p = plan(recipes, store.root(), system, &modules)?;
    let missing: Vec<String> = p
        .order
        .iter()
        .filter(|n| !store.is_valid(n))
        .map(|n| format!("{} (`{n}`)", p.nodes[n].module))
        .collect();
    if !missing.is_empty() {
        return Err(CacheError::NotBuilt {
            system: system.to_string(),
            missing,
            command: format!(
                "punix build --file {} --system {system} {}",
                shell_word(&recipes_path.display().to_string()),
                modules.join(" ")
            ),
        });
    }
    Ok(p.order.into_iter().collect())
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// `s` quoted for a shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%=,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Export `names` and their closure from `store` into the directory
/// cache `cache`.
pub(super) fn export<I, S>(
    cache: &Cache,
    store: &Store,
    names: I,
    observer: &dyn Observer,
) -> Result<ExportReport, CacheError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let dir = cache.location.dir().ok_or_else(|| CacheError::ReadOnly {
        url: cache.url.clone(),
    })?;
    // The closure and its order first: nothing is written for a store
    // that lacks something.
    let closure = store.closure(names)?;
    let mut inputs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &closure {
        inputs.insert(n.clone(), store.derivation(n)?.inputs);
    }
    let order = references_first(&inputs);

    fs::create_dir_all(dir).map_err(ctx("cannot create the cache directory", dir))?;
    let info_path = dir.join(CACHE_INFO);
    let root = store.root().display().to_string();
    match fs::read(&info_path) {
        Ok(_) => {
            cache.check(store.root())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut text = serde_json::to_string_pretty(&CacheInfo::new(&root)).unwrap_or_default();
            text.push('\n');
            files::write_atomic(&info_path, text.as_bytes(), 0o644)?;
        }
        Err(e) => return Err(ctx("cannot read", &info_path)(e).into()),
    }

    let mut report = ExportReport::default();
    let (todo, skipped): (Vec<String>, Vec<String>) = order
        .into_iter()
        .partition(|n| !(dir.join(meta_file(n)).is_file() && dir.join(archive_file(n)).is_file()));
    report.skipped = skipped;
    let sizes: Vec<u64> = todo.iter().map(|n| store.entry_size(n)).collect();
    observer.event(Event::Planned {
        entries: todo.len(),
        present: report.skipped.len(),
        bytes: sizes.iter().sum(),
    });
    // Two stages: this thread packs entry after entry into temporaries;
    // a second one syncs each, renames it and writes its metadata, in the
    // same order (references first), so waiting for the disk overlaps
    // with packing the next entry.
    let finished = std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Pending>(1);
        let finisher = s.spawn(move || -> Result<Vec<archive::Packed>, CacheError> {
            let mut done = Vec::new();
            for mut p in rx {
                finish(dir, &mut p)?;
                observer.event(Event::Finished {
                    name: &p.name,
                    bytes: p.size,
                });
                done.push(p.packed.clone());
            }
            Ok(done)
        });
        let mut packing = Ok(());
        for (name, size) in todo.iter().zip(sizes) {
            observer.event(Event::Started { name, bytes: size });
            match pack_entry(dir, store, name, size, observer) {
                // A closed queue: the finisher failed and says why.
                Ok(p) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    packing = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let finished = finisher.join().unwrap_or_else(|_| {
            Err(CacheError::Write {
                name: String::new(),
                path: dir.display().to_string(),
                source: std::io::Error::other("the finishing thread panicked"),
            })
        });
        packing.and(finished)
    })?;
    for (name, packed) in todo.iter().zip(finished) {
        report.bytes += packed.archive_size;
        report.unpacked += packed.unpacked_size;
        report.exported.push(name.clone());
    }
    write_index(dir)?;
    Ok(report)
}

/// The names of `inputs`, each after its inputs.
fn references_first(inputs: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        n: &str,
        inputs: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !done.insert(n.to_string()) {
            return;
        }
        for i in inputs.get(n).into_iter().flatten() {
            visit(i, inputs, done, out);
        }
        out.push(n.to_string());
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in inputs.keys() {
        visit(n, inputs, &mut done, &mut out);
    }
    out
}

/// A packed archive in its temporary, waiting to be synced and renamed;
/// dropped unfinished, it removes the temporary.
struct Pending {
    name: String,
    size: u64,
    tmp: PathBuf,
    file: Option<fs::File>,
    packed: archive::Packed,
    info: EntryInfo,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Pack one entry into a temporary of the cache directory and check its
/// content hash against its `built` marker.
fn pack_entry(
    dir: &Path,
    store: &Store,
    name: &str,
    size: u64,
    observer: &dyn Observer,
) -> Result<Pending, CacheError> {
    let built = store.built(name)?;
    let drv = store.derivation(name)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        archive_file(name),
        files::unique_suffix()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(ctx("cannot create", &tmp))?;
    let mut pending = Pending {
        name: name.into(),
        size,
        tmp,
        file: None,
        packed: archive::Packed {
            archive_size: 0,
            archive_sha256: String::new(),
            content_hash: String::new(),
            unpacked_size: 0,
        },
        info: EntryInfo {
            format: FORMAT,
            name: name.into(),
            content_hash: built.content_hash.clone(),
            archive: archive_file(name),
            archive_size: 0,
            archive_sha256: String::new(),
            unpacked_size: 0,
            references: drv.inputs.clone(),
            system: drv.system.clone(),
            derivation: drv,
        },
        done: false,
    };
    let out = BufWriter::with_capacity(256 * 1024, file);
    let (out, packed) = archive::pack(&store.entry_path(name), out, &mut |n| {
        observer.event(Event::Progress { bytes: n })
    })
    .map_err(|source| CacheError::Write {
        name: name.into(),
        path: pending.tmp.display().to_string(),
        source,
    })?;
    let file = out
        .into_inner()
        .map_err(|e| ctx("cannot write", &pending.tmp)(e.into_error()))?;
    if packed.content_hash != built.content_hash {
        return Err(CacheError::Damaged {
            name: name.into(),
            expected: built.content_hash,
            actual: packed.content_hash,
        });
    }
    pending.info.archive_size = packed.archive_size;
    pending.info.archive_sha256 = packed.archive_sha256.clone();
    pending.info.unpacked_size = packed.unpacked_size;
    pending.packed = packed;
    pending.file = Some(file);
    Ok(pending)
}

/// Sync a packed archive, rename it into place, then write its metadata
/// atomically (which also syncs the directory, so the rename is durable
/// before the metadata is).
fn finish(dir: &Path, p: &mut Pending) -> Result<(), CacheError> {
    if let Some(file) = p.file.take() {
        file.sync_all().map_err(ctx("cannot sync", &p.tmp))?;
    }
    let final_archive = dir.join(archive_file(&p.name));
    fs::rename(&p.tmp, &final_archive).map_err(ctx("cannot rename into", &final_archive))?;
    p.done = true;
    let mut text = serde_json::to_string_pretty(&p.info).unwrap_or_default();
    text.push('\n');
    files::write_atomic(&dir.join(meta_file(&p.name)), text.as_bytes(), 0o644)?;
    Ok(())
}

/// Rebuild `punix-index.txt` from the metadata files, under the cache's
/// lock: whoever writes last lists every entry complete before it.
fn write_index(dir: &Path) -> Result<(), CacheError> {
    let lock_path = dir.join(LOCK);
    let _lock = FileLock::acquire(&lock_path, LockMode::Exclusive)
        .map_err(ctx("cannot lock", &lock_path))?;
    let mut names = BTreeSet::new();
    for e in fs::read_dir(dir).map_err(ctx("cannot list", dir))? {
        let e = e.map_err(ctx("cannot list", dir))?;
        if let Some(n) = e
            .file_name()
            .to_str()
            .and_then(super::format::entry_of_meta_file)
        {
            names.insert(n.to_string());
        }
    }
    let text = render_index(&names);
    let path = dir.join(INDEX);
    if fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    files::write_atomic(&path, text.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_come_first_and_words_are_quoted() {
        let inputs: BTreeMap<String, Vec<String>> = [
            ("c".to_string(), vec!["a".to_string(), "b".to_string()]),
            ("b".to_string(), vec!["a".to_string()]),
            ("a".to_string(), vec![]),
        ]
        .into_iter()
        .collect();
        assert_eq!(references_first(&inputs), ["a", "b", "c"]);
        assert_eq!(shell_word("examples/"), "examples/");
        assert_eq!(shell_word("my dir"), "'my dir'");
    }
}
