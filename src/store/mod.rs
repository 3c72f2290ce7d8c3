//! The content-addressed store.
//!
//! Layout under the store root (one absolute path, the same on every
//! machine):
//!
//! ```text
//! <root>/<hash>-<pname>-<version>/   an entry: the output tree, plus
//!        derivation.json             the derivation it was built from
//!        built                       marker written last: {"content_hash": ...}
//! <root>/.tmp-<suffix>-<name>/       an entry being made (never valid)
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
//! build one path at once; a temporary whose lock is free is stale and is
//! swept.

pub mod content_hash;
pub mod derivation;
pub mod gc;
pub mod lock;

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError, ctx};
use content_hash::{HashError, STORE_METADATA, hash_entry};
use derivation::{Derivation, is_store_name};
use lock::{FileLock, LockMode};

const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store root `{0}` is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error(
        "cannot create or write the store root `{path}`: {source}\n  hint: pass `--store-root DIR` with a directory you can write, or create it: `mkdir -p {path}`"
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

    /// A fresh temporary sibling for making `name` (not created).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.root
            .join(format!("{TMP_PREFIX}{}-{name}", files::unique_suffix()))
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
        let content_hash = hash_entry(temp)?;
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

    /// Remove temporaries left by killed processes: `.tmp-` trees whose
    /// entry lock is free and `.del-` trees. Returns how many were removed.
    pub fn sweep(&self) -> Result<usize, StoreError> {
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
            if let Some(rest) = file_name.strip_prefix(TMP_PREFIX) {
                // `<pid>-<nanos>-<counter>-<name>`
                let Some(name) = rest.splitn(4, '-').nth(3) else {
                    continue;
                };
                let lock_path = self.locks_dir().join(format!("{name}.lock"));
                let free = FileLock::try_acquire(&lock_path, LockMode::Exclusive)
                    .map_err(ctx("cannot lock", &lock_path))?;
                if free.is_some() {
                    files::remove_tree(&entry.path())?;
                    removed += 1;
                }
            } else if file_name.starts_with(DEL_PREFIX) {
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
            return Err(StoreError::HashMismatch {
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
