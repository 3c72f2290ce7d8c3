//! The content-addressed store.
//!
//! Layout under the store root (one absolute path, the same on every
//! machine):
//!
//! ```text
//! <root>/<hash>-<pname>-<version>/   an entry: the output tree, plus
//!        derivation.json             the derivation it was built from
//!        built                       marker written last: {"content_hash": ...}
//! <root>/.tmp<28 of g-z>-<pname>-<version>/
//!                                    an entry being made (never valid)
//! <root>/.del-<suffix>-<name>/       an entry being deleted by gc
//! <root>/.locks/<name>.lock          per-entry lock (flock)
//! <root>/.locks/gc.lock              shared by builds, exclusive for gc
//! <root>/.logs/<name>.log            the last build log of an entry
//! <root>/.roots/<link>               explicit gc roots (symlinks to entries)
//! ```
//!
//! Invariants, also after a crash or a kill at any point: an entry appears
//! under its final name only by the rename of a complete temporary sibling
//! whose `built` marker was written (and synced) last, so a directory under
//! a final name either has `built` and is whole, or is not an entry. Only a
//! directory with `built` is valid: listed, reused, pushed, pinned. The
//! per-entry lock is held while an entry is made, so two processes never
//! build one path at once.
//!
//! A temporary is exactly as long as the entry's final name: `.tmp` and 28
//! letters from `g`..`z` (never hex digits, so never a store name) take the
//! place of the 32-character hash. The first 8 letters are the pid of the
//! punix process that makes it, in base 20; the other 20 are random. A
//! build's output may record `$out` (the temporary path) anywhere: before
//! it is hashed, every occurrence in its files and symlink targets is
//! replaced by the final path, which has the same length, so binaries stay
//! valid and two builds of one derivation get the same content hash. A
//! temporary whose process is gone is stale and is swept; gc, which holds
//! the gc lock exclusively, removes every temporary.

pub mod content_hash;
pub mod derivation;
pub mod gc;
pub mod lock;

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files::{self, FileError, ctx};
use content_hash::{HashError, STORE_METADATA, hash_entry};
use derivation::{Derivation, is_store_name};
use lock::{FileLock, LockMode};

const TMP_PREFIX: &str = ".tmp";
const DEL_PREFIX: &str = ".del-";
/// Letters of a temporary's name in place of the hash: `.tmp` and these
/// make 32 characters, like the hash.
const TMP_LETTERS: usize = 28;
/// Of those, the ones that hold the pid.
const TMP_PID_LETTERS: usize = 8;
/// The alphabet of those letters: `g`..`z`, outside the hex digits.
const TMP_ALPHABET: &[u8; 20] = b"ghijklmnopqrstuvwxyz";

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store root `{0}` is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error(
        "cannot create or write the store root `{path}`: {source}\n  hint: pass `--store-root DIR` with a directory you can write, or {fix}",
        path = .path.display(),
        fix = unwritable_fix(.path, .source)
    )]
    Unwritable { path: PathBuf, source: io::Error },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("`{0}` is not a valid entry of this store")]
    NotFound(String),
    #[error("the entry `{name}` is damaged: {reason}")]
    Corrupt { name: String, reason: String },
    #[error(
        "the entry `{name}` changed after it was built: its content hash is {actual}, but {expected} was recorded"
    )]
    Modified {
        name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "`{path}` is not in this store: it is under `{other_root}`, and this store's root is `{root}`\n  hint: pass `--store-root {other_root}` to work on that store",
        path = .path.display(),
        other_root = .other_root.display(),
        root = .root.display()
    )]
    OutsideRoot {
        path: PathBuf,
        other_root: PathBuf,
        root: PathBuf,
    },
    #[error(
        "`{file}` in the output of `{name}` is a {kind}; a store tree may hold only files, directories and symlinks",
        file = .file.display()
    )]
    SpecialFile {
        name: String,
        /// Relative to the output's top.
        file: PathBuf,
        kind: &'static str,
    },
    #[error(
        "cannot read the generation file `{file}`: {reason}; gc stopped and deleted nothing\n  hint: fix `{file}` or remove it: gc must know every store path a generation pins before it deletes anything",
        file = .file.display()
    )]
    BadGeneration { file: PathBuf, reason: String },
    #[error(
        "the builder of `{name}` did not create `$out`\n  hint: the script must create the directory named by `$out`, e.g. `mkdir -p \"$out\"`"
    )]
    NoOutput { name: String },
    #[error(
        "the output of `{name}` holds `{file}` at its top, a name the store keeps for itself; move it into a subdirectory"
    )]
    ReservedName { name: String, file: String },
    #[error(
        "content hash mismatch for `{name}`: expected {expected}, found {actual}; the entry was rejected"
    )]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
}

/// The marker written last into an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Built {
    pub content_hash: String,
}

/// A store at one root.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// The command that makes a store root the user cannot create, quoted
/// for a shell.
fn unwritable_fix(path: &Path, source: &io::Error) -> String {
    let q = shell_quote(path);
    if source.kind() == io::ErrorKind::PermissionDenied {
        format!("create it for yourself: `sudo mkdir -p {q} && sudo chown \"$USER\" {q}`")
    } else {
        format!("create it: `mkdir -p {q}`")
    }
}

/// `path` in single quotes for a POSIX shell.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// The name of a fresh temporary for the entry `name`: as long as `name`,
/// `.tmp`, the pid in 8 letters of base 20, 20 random letters, then
/// `name` without its hash.
fn temp_name(name: &str, pid: u32) -> String {
    let rest = name
        .get(32..)
        .filter(|_| is_store_name(name))
        .unwrap_or(name);
    let mut letters = Vec::with_capacity(TMP_LETTERS);
    let mut p = pid as u64;
    let mut digits = [0u8; TMP_PID_LETTERS];
    for d in digits.iter_mut().rev() {
        *d = TMP_ALPHABET[(p % 20) as usize];
        p /= 20;
    }
    letters.extend_from_slice(&digits);
    // Unique, not secret: pid, time, a counter and the name, hashed.
    let seed = Sha256::digest(format!("{}-{name}", files::unique_suffix()).as_bytes());
    letters.extend(
        seed.iter()
            .take(TMP_LETTERS - TMP_PID_LETTERS)
            .map(|b| TMP_ALPHABET[(*b % 20) as usize]),
    );
    format!("{TMP_PREFIX}{}{rest}", String::from_utf8_lossy(&letters))
}

/// The pid encoded in the name of a temporary: `.tmp<28 letters>-...`,
/// or the older `.tmp-<pid>-<time>-<n>-<name>`. `None` for anything else
/// (deploys stage pushes in `.tmp-push-...`, which are not ours).
fn temp_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix(TMP_PREFIX)?;
    if let Some(old) = rest.strip_prefix('-') {
        let pid = old.split('-').next()?;
        return pid.parse().ok().filter(|_| old.splitn(4, '-').count() == 4);
    }
    let letters = rest.as_bytes().get(..TMP_LETTERS)?;
    if rest.as_bytes().get(TMP_LETTERS) != Some(&b'-')
        || !letters.iter().all(|b| TMP_ALPHABET.contains(b))
    {
        return None;
    }
    let mut pid: u64 = 0;
    for b in &letters[..TMP_PID_LETTERS] {
        pid = pid * 20 + (b - b'g') as u64;
    }
    u32::try_from(pid).ok()
}

/// Is the process `pid` alive? Only `ESRCH` says it is gone; a process of
/// another user (`EPERM`) is alive.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Store {
    /// A store at `root`, which must be absolute. Nothing is created yet.
    pub fn new(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(StoreError::NotAbsolute(root));
        }
        Ok(Store { root })
    }

    /// Create the store's directories, with an error that says what to do
    /// when that is not allowed.
    pub fn ensure_writable(&self) -> Result<(), StoreError> {
        for dir in [self.root.clone(), self.locks_dir(), self.logs_dir()] {
            fs::create_dir_all(&dir).map_err(|source| StoreError::Unwritable {
                path: self.root.clone(),
                source,
            })?;
        }
        let probe = self.root.join(format!(".probe-{}", files::unique_suffix()));
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|source| StoreError::Unwritable {
                path: self.root.clone(),
                source,
            })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join(".locks")
    }

    fn logs_dir(&self) -> PathBuf {
        self.root.join(".logs")
    }

    pub fn roots_dir(&self) -> PathBuf {
        self.root.join(".roots")
    }

    /// Where the build log of `name` goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }

    /// Is `name` a valid (complete) entry?
    pub fn is_valid(&self, name: &str) -> bool {
        is_store_name(name) && self.entry_path(name).join("built").is_file()
    }

    /// The `built` marker of a valid entry.
    pub fn built(&self, name: &str) -> Result<Built, StoreError> {
        let path = self.entry_path(name).join("built");
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(name.into()));
            }
            other => other.map_err(ctx("cannot read", &path))?,
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            name: name.into(),
            reason: format!("unreadable `built` marker: {e}"),
        })
    }

    /// The derivation a valid entry was built from.
    pub fn derivation(&self, name: &str) -> Result<Derivation, StoreError> {
        if !self.is_valid(name) {
            return Err(StoreError::NotFound(name.into()));
        }
        let path = self.entry_path(name).join("derivation.json");
        let bytes = fs::read(&path).map_err(ctx("cannot read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            name: name.into(),
            reason: format!("unreadable derivation.json: {e}"),
        })
    }

    /// Every valid entry, sorted by name.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        let rd = match fs::read_dir(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            other => other.map_err(ctx("cannot list", &self.root))?,
        };
        for entry in rd {
            let entry = entry.map_err(ctx("cannot list", &self.root))?;
            if let Some(name) = entry.file_name().to_str()
                && self.is_valid(name)
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The runtime closure of `names`: the names and, transitively, the
    /// inputs recorded in their derivations.
    pub fn closure<I, S>(&self, names: I) -> Result<BTreeSet<String>, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<String> = names.into_iter().map(Into::into).collect();
        while let Some(name) = queue.pop_front() {
            if seen.contains(&name) {
                continue;
            }
            let drv = self.derivation(&name)?;
            queue.extend(drv.inputs);
            seen.insert(name);
        }
        Ok(seen)
    }

    /// Lock the entry `name` for making it; waits for another holder.
    pub fn lock_entry(&self, name: &str) -> Result<FileLock, StoreError> {
        let path = self.locks_dir().join(format!("{name}.lock"));
        Ok(FileLock::acquire(&path, LockMode::Exclusive).map_err(ctx("cannot lock", &path))?)
    }

    /// The store-wide lock: builds hold it shared, gc exclusive.
    pub fn lock_gc(&self, mode: LockMode, wait: bool) -> Result<Option<FileLock>, StoreError> {
        let path = self.locks_dir().join("gc.lock");
        let lock = if wait {
            Some(FileLock::acquire(&path, mode).map_err(ctx("cannot lock", &path))?)
        } else {
            FileLock::try_acquire(&path, mode).map_err(ctx("cannot lock", &path))?
        };
        Ok(lock)
    }

    /// A fresh temporary sibling for making `name` (not created), exactly
    /// as long as the entry's final path.
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.root.join(temp_name(name, std::process::id()))
    }

    /// Make a freshly built output at the temporary `temp` refer to itself
    /// by its final path: replace the bytes of `temp`'s path by those of
    /// the entry's path (same length) in every file and symlink target.
    /// Returns how many files and links changed.
    pub fn rewrite_output(&self, name: &str, temp: &Path) -> Result<usize, StoreError> {
        use std::os::unix::ffi::OsStrExt;
        let from = temp.as_os_str().as_bytes();
        let final_path = self.entry_path(name);
        let to = final_path.as_os_str().as_bytes();
        if from.len() != to.len() {
            return Err(StoreError::Corrupt {
                name: name.into(),
                reason: format!(
                    "its temporary `{}` is not as long as its final path",
                    temp.display()
                ),
            });
        }
        Ok(files::rewrite_tree(temp, from, to)?)
    }

    /// Add a gc root for the valid entry `name`: the link
    /// `.roots/<name>`. An existing link is left as it is. The caller holds
    /// the gc lock (shared), so gc cannot delete the entry meanwhile.
    pub fn add_root(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !self.is_valid(name) {
            return Err(StoreError::NotFound(name.into()));
        }
        let dir = self.roots_dir();
        fs::create_dir_all(&dir).map_err(ctx("cannot create", &dir))?;
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(self.entry_path(name), &link)
                .map_err(ctx("cannot create the root link", &link))?;
            files::fsync_dir(&dir)?;
        }
        Ok(link)
    }

    /// The bytes of the files (and links) of an entry.
    pub fn entry_size(&self, name: &str) -> u64 {
        tree_size(&self.entry_path(name))
    }

    /// The entry name an argument names: a name, or a path to an entry (or
    /// to something inside one) of this store. A path into another root is
    /// an error that names both roots.
    pub fn resolve_name(&self, arg: &str) -> Result<String, StoreError> {
        if !arg.contains('/') {
            return Ok(arg.to_string());
        }
        let path = crate::config::absolute(Path::new(arg));
        if let Ok(rest) = path.strip_prefix(&self.root)
            && let Some(first) = rest.components().next()
        {
            return Ok(first.as_os_str().to_string_lossy().into_owned());
        }
        // The other root: the directory above the entry-like component.
        let entry_at = path
            .ancestors()
            .find(|a| {
                a.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_store_name)
            })
            .unwrap_or(&path);
        Err(StoreError::OutsideRoot {
            path: path.clone(),
            other_root: entry_at.parent().unwrap_or(Path::new("/")).to_path_buf(),
            root: self.root.clone(),
        })
    }

    /// Turn a finished temporary tree into the entry `name`: check it,
    /// make it read-only, hash it, write `derivation.json` and then `built`,
    /// sync, and rename it into place. The caller holds the entry's lock.
    /// With `expected_hash`, a tree whose content hash differs is removed and
    /// rejected.
    pub fn install(
        &self,
        name: &str,
        temp: &Path,
        drv: &Derivation,
        expected_hash: Option<&str>,
    ) -> Result<Built, StoreError> {
        let result = self.install_inner(name, temp, drv, expected_hash);
        if result.is_err() {
            let _ = files::remove_tree(temp);
        }
        result
    }

    fn install_inner(
        &self,
        name: &str,
        temp: &Path,
        drv: &Derivation,
        expected_hash: Option<&str>,
    ) -> Result<Built, StoreError> {
        match fs::symlink_metadata(temp) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(StoreError::NoOutput { name: name.into() }),
        }
        for reserved in STORE_METADATA {
            if fs::symlink_metadata(temp.join(reserved)).is_ok() {
                return Err(StoreError::ReservedName {
                    name: name.into(),
                    file: (*reserved).into(),
                });
            }
        }
        files::make_read_only(temp)?;
        let content_hash = hash_entry(temp).map_err(|e| match e {
            HashError::Special { path, kind } => StoreError::SpecialFile {
                name: name.into(),
                file: path.strip_prefix(temp).unwrap_or(&path).to_path_buf(),
                kind,
            },
            other => other.into(),
        })?;
        if let Some(expected) = expected_hash
            && expected != content_hash
        {
            return Err(StoreError::HashMismatch {
                name: name.into(),
                expected: expected.into(),
                actual: content_hash,
            });
        }
        let mut drv_json = serde_json::to_string_pretty(drv).unwrap_or_default();
        drv_json.push('\n');
        files::write_synced(&temp.join("derivation.json"), drv_json.as_bytes(), 0o444)?;
        let built = Built { content_hash };
        let mut built_json = serde_json::to_string(&built).unwrap_or_default();
        built_json.push('\n');
        // Everything before the marker must be on disk before the marker is.
        sync_filesystem(temp)?;
        files::write_synced(&temp.join("built"), built_json.as_bytes(), 0o444)?;
        let final_path = self.entry_path(name);
        if let Err(e) = fs::rename(temp, &final_path) {
            if self.is_valid(name) {
                // Made meanwhile by someone who did not take the lock
                // (an older punix, a manual copy): keep theirs.
                files::remove_tree(temp)?;
                return self.built(name);
            }
            if final_path.exists() {
                // An invalid leftover under the final name: replace it.
                self.discard(name)?;
                fs::rename(temp, &final_path).map_err(ctx("cannot rename into", &final_path))?;
            } else {
                return Err(ctx("cannot rename into", &final_path)(e).into());
            }
        }
        files::fsync_dir(&self.root)?;
        let _ = fs::set_permissions(
            &final_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        );
        Ok(built)
    }

    /// Remove the entry `name` (valid or not): rename it away first, so it
    /// vanishes whole, then delete it.
    pub fn discard(&self, name: &str) -> Result<(), StoreError> {
        let path = self.entry_path(name);
        let trash = self
            .root
            .join(format!("{DEL_PREFIX}{}-{name}", files::unique_suffix()));
        // Renaming a directory needs write permission on it.
        let _ = fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        match fs::rename(&path, &trash) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(ctx("cannot remove", &path))?,
        }
        files::fsync_dir(&self.root)?;
        files::remove_tree(&trash)?;
        Ok(())
    }

    /// Remove temporaries left by killed processes: temporaries whose
    /// process is gone, and `.del-` trees. Returns how many were removed.
    pub fn sweep(&self) -> Result<usize, StoreError> {
        self.sweep_where(|pid| !process_alive(pid))
    }

    /// Remove every temporary and `.del-` tree, whoever made it. Only for
    /// gc, which holds the gc lock exclusively: no build of this store runs.
    pub(crate) fn sweep_all(&self) -> Result<usize, StoreError> {
        self.sweep_where(|_| true)
    }

    fn sweep_where(&self, stale: impl Fn(u32) -> bool) -> Result<usize, StoreError> {
        let mut removed = 0;
        let rd = match fs::read_dir(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            other => other.map_err(ctx("cannot list", &self.root))?,
        };
        for entry in rd {
            let entry = entry.map_err(ctx("cannot list", &self.root))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let remove = match temp_pid(&file_name) {
                Some(pid) => stale(pid),
                None => file_name.starts_with(DEL_PREFIX),
            };
            if remove {
                files::remove_tree(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Re-hash a valid entry and compare with its `built` marker.
    pub fn verify_entry(&self, name: &str) -> Result<(), StoreError> {
        let built = self.built(name)?;
        let actual = hash_entry(&self.entry_path(name))?;
        if actual != built.content_hash {
            return Err(StoreError::Modified {
                name: name.into(),
                expected: built.content_hash,
                actual,
            });
        }
        let drv = self.derivation(name)?;
        let expected_name = drv.store_name();
        if expected_name != name {
            return Err(StoreError::Corrupt {
                name: name.into(),
                reason: format!("its derivation.json hashes to `{expected_name}`"),
            });
        }
        Ok(())
    }
}

/// The bytes under `path`: file sizes and link lengths, summed.
pub(crate) fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| tree_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

/// Flush the filesystem that holds `path` (`syncfs(2)`): one call that
/// makes every file of a freshly built tree durable.
fn sync_filesystem(path: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(path).map_err(ctx("cannot open", path))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(ctx("cannot sync", path)(io::Error::last_os_error()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "0123456789abcdef0123456789abcdef-hello-1.0";

    #[test]
    fn temporaries_are_as_long_as_the_name_and_carry_the_pid() {
        for pid in [1, 42, 4_194_304, u32::MAX] {
            let t = temp_name(NAME, pid);
            assert_eq!(t.len(), NAME.len(), "{t}");
            assert!(t.starts_with(".tmp") && t.ends_with("-hello-1.0"), "{t}");
            assert!(!is_store_name(&t));
            assert!(t[4..32].bytes().all(|b| (b'g'..=b'z').contains(&b)), "{t}");
            assert_eq!(temp_pid(&t), Some(pid), "{t}");
        }
        assert_ne!(temp_name(NAME, 7), temp_name(NAME, 7), "random part");
        assert_eq!(temp_pid(".tmp-4242-18eb9b976e42dbe2-3-x-1"), Some(4242));
        for other in [".tmp-push-1-2-3", ".tmpabc-x", ".del-1-2-3-x", NAME, ".tmp"] {
            assert_eq!(temp_pid(other), None, "{other}");
        }
    }

    #[test]
    fn sweep_removes_temporaries_of_dead_processes_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let store = Store::new(t.path()).expect("store");
        // A child that has exited and been reaped: its pid is free.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        let mine = t.path().join(temp_name(NAME, std::process::id()));
        let stale = t.path().join(temp_name(NAME, dead));
        let push = t.path().join(".tmp-push-1-2-3");
        for d in [&mine, &stale, &push] {
            fs::create_dir(d).expect("mkdir");
        }
        if process_alive(dead) {
            return; // the pid was reused at once; nothing to check
        }
        assert_eq!(store.sweep().expect("sweep"), 1);
        assert!(mine.exists() && push.exists() && !stale.exists());
        assert_eq!(store.sweep_all().expect("sweep all"), 1);
        assert!(!mine.exists() && push.exists());
    }

    #[test]
    fn unwritable_hint_quotes_the_path_and_suggests_sudo_for_permissions() {
        let path = PathBuf::from("/var/lib/it's/store");
        let denied = StoreError::Unwritable {
            path: path.clone(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        }
        .to_string();
        assert!(
            denied.contains(
                r#"`sudo mkdir -p '/var/lib/it'\''s/store' && sudo chown "$USER" '/var/lib/it'\''s/store'`"#
            ),
            "{denied}"
        );
        let other = StoreError::Unwritable {
            path,
            source: io::Error::from(io::ErrorKind::NotADirectory),
        }
        .to_string();
        assert!(
            other.contains(r"`mkdir -p '/var/lib/it'\''s/store'`"),
            "{other}"
        );
    }

    #[test]
    fn names_and_paths_resolve_to_entries_of_this_store_only() {
        let store = Store::new("/s/store").expect("store");
        assert_eq!(store.resolve_name(NAME).expect("name"), NAME);
        assert_eq!(
            store
                .resolve_name(&format!("/s/store/{NAME}/bin/x"))
                .expect("path"),
            NAME
        );
        let e = store
            .resolve_name(&format!("/other/root/{NAME}"))
            .expect_err("outside");
        let msg = e.to_string();
        assert!(
            msg.contains("under `/other/root`") && msg.contains("root is `/s/store`"),
            "{msg}"
        );
    }
}
