//! Binary caches: store entries as compressed archives in a directory or
//! behind an HTTP(S) server, written by `punix store export`, read by
//! `punix store import` and by routing, which uses caches as substituters.
//!
//! # Layout
//!
//! ```text
//! <cache>/punix-cache.json          {"format":1,"store_root":"/…/store","compression":"zstd"}
//! <cache>/punix-index.txt           the entry names, one a line (for HTTP readers)
//! <cache>/<name>.json               an entry's metadata (see format::EntryInfo)
//! <cache>/<name>.tar.zst            an entry's archive (see the archive module)
//! ```
//!
//! A cache holds entries for one store root, the one in `punix-cache.json`
//! (the root is part of every derivation, so an entry is valid only under
//! it). An entry's metadata names its content hash, its archive's size and
//! sha256, its unpacked size, its references (the derivation's inputs),
//! its system and its derivation.
//!
//! # Writing (export)
//!
//! Only to a directory (a path or `file://`). Each archive streams from the
//! store into a unique temporary in the cache directory (tar → zstd →
//! file, with the sha256 and the tree's content hash computed on the way),
//! is synced and renamed to `<name>.tar.zst`; then `<name>.json` is
//! written atomically (temporary, fsync, rename, fsync of the directory).
//! So a metadata file exists only for a complete archive, a crash leaves
//! at most a stray `.<name>.tar.zst.tmp-…` file, and readers never see a
//! half-written file under a final name. Entries are written references
//! first, so the metadata present always forms closed sets. An entry whose
//! metadata is already there is skipped. An entry whose bytes no longer
//! match its `built` marker is refused, not exported. Packing runs on the
//! calling thread while a second one syncs, renames and writes metadata
//! for the entry before, in order. Last, the index is
//! rebuilt from the directory's metadata files under an exclusive lock
//! (`.punix-cache.lock`), so concurrent exports never lose each other's
//! entries from it.
//!
//! # Reading (import, substitution)
//!
//! From a directory, `file://` or `http(s)://` (see the location module:
//! time-outs, retries with back-off). The wanted names and, through the
//! metadata's references, their closure are fetched, references first
//! (entries whose references are in place several at once), skipping
//! entries already valid in the store. For each entry, under the
//! store's entry lock and the shared gc lock: the archive streams (file →
//! zstd → tar → files) into a temporary sibling of the entry exactly as
//! long as its final name, every member checked before it is written;
//! then the archive's size and sha256 must equal the metadata's, its
//! `derivation.json` must equal the metadata's derivation and hash to the
//! entry's name, and [`Store::install`] recomputes the tree's content
//! hash and compares it with the metadata's before it writes `built` and
//! renames the temporary into place. The metadata is never trusted alone.
//! Any failure removes the temporary and names the archive; nothing
//! invalid lands under a final name. A transfer that breaks off is retried
//! from the start of the archive.
//!
//! # API for substituters
//!
//! ```no_run
//! # fn f(store: &punix::store::Store) -> Result<(), punix::cache::CacheError> {
//! use punix::cache::{Cache, Silent};
//! let cache = Cache::open("http://127.0.0.1:8080/cache")?; // parses, no I/O
//! let wanted = ["0123456789abcdef0123456789abcdef-hello-1.0".to_string()];
//! let there = cache.has_many(&wanted)?; // one batched query
//! let report = cache.fetch_into(store, &there, &Silent)?; // + closure, verified
//! # Ok(()) }
//! ```
//!
//! [`Cache::has_many`] costs one query: a `stat` per name for a
//! directory, one GET of `punix-index.txt` over HTTP.
//! [`Cache::fetch_into`] checks `punix-cache.json` (format, store root),
//! then imports as above and reports what it fetched. [`Observer`] hears
//! progress (bytes), retries, and each entry's start and end.

pub mod archive;
pub mod export;
pub mod format;
pub mod import;
mod location;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::build::BuildError;
use crate::files::FileError;
use crate::recipe::RecipeError;
use crate::store::{Store, StoreError};
use format::{CACHE_INFO, CacheInfo, EntryInfo, FORMAT};
use location::Location;

pub use export::ExportReport;
pub use import::FetchReport;

/// Errors of binary caches. Each names the cache, file or entry.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "`{url}` is not a binary cache location: {reason}\n  hint: give a directory, a `file:///abs/path` URL or an `http(s)://` URL"
    )]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot export to `{url}`: punix writes caches to a directory or a `file://` URL\n  hint: export to a directory and serve it with any static web server, e.g. `python3 -m http.server --directory DIR`"
    )]
    ReadOnly { url: String },
    #[error("`{url}` is not a punix binary cache: {reason}\n  hint: {hint}")]
    NotACache {
        url: String,
        reason: String,
        hint: String,
    },
    #[error(
        "the cache `{url}` has format {found}, and this punix reads format {supported}\n  hint: use the punix that wrote it, or export into a new directory"
    )]
    Format {
        url: String,
        found: u32,
        supported: u32,
    },
    #[error(
        "the cache `{url}` holds entries for the store root `{cache_root}`, and this store's root is `{store_root}`; a path built under one root is not valid under another\n  hint: pass `--store-root {cache_root}`, or use a cache made for `{store_root}`"
    )]
    OtherRoot {
        url: String,
        cache_root: String,
        store_root: String,
    },
    #[error("`{name}` is not a store entry name (`<32 hex>-<pname>-<version>`) nor a path to one")]
    BadName { name: String },
    #[error(
        "the cache `{url}` has no {}: {}\n  hint: `punix store export ... --to DIR` writes them; check the names with `ls` on the cache, or its `punix-index.txt`",
        if .names.len() == 1 { "entry" } else { "entries" },
        .names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )]
    NotInCache { url: String, names: Vec<String> },
    #[error(
        "the cache `{url}` has `{name}` but not `{reference}`, which it needs; nothing was imported\n  hint: export the whole closure to the cache again (`punix store export` writes references too)"
    )]
    MissingReference {
        url: String,
        name: String,
        reference: String,
    },
    #[error("the metadata `{file}` is invalid: {reason}; nothing was imported from it")]
    BadMetadata { file: String, reason: String },
    #[error("the archive `{archive}` is corrupt or truncated: {reason}; `{name}` was not imported")]
    BadArchive {
        archive: String,
        name: String,
        reason: String,
    },
    #[error(
        "the archive `{archive}` holds an unsafe member `{member}`: {reason}; `{name}` was not imported"
    )]
    UnsafeMember {
        archive: String,
        name: String,
        member: String,
        reason: String,
    },
    #[error(
        "the archive `{archive}` does not match its metadata: {reason}; `{name}` was not imported"
    )]
    Mismatch {
        archive: String,
        name: String,
        reason: String,
    },
    #[error(
        "content hash mismatch for `{name}` from `{archive}`: the metadata says {expected}, the unpacked tree hashes to {actual}; the entry was rejected"
    )]
    HashMismatch {
        archive: String,
        name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "cannot fetch `{url}`: {reason} ({attempts} attempt(s))\n  hint: check that the cache server is up and that the URL is right"
    )]
    Http {
        url: String,
        reason: String,
        attempts: u32,
    },
    #[error(
        "{} not in the store for {system}: {}\n  hint: build {} first: `{command}`",
        if .missing.len() == 1 { "1 path is" } else { "some paths are" },
        .missing.join(", "),
        if .missing.len() == 1 { "it" } else { "them" }
    )]
    NotBuilt {
        system: String,
        /// `Module (store name)` of each missing entry.
        missing: Vec<String>,
        command: String,
    },
    #[error(
        "`{name}` is neither a stack nor a package of the recipes{}",
        .hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default()
    )]
    UnknownItem { name: String, hint: Option<String> },
    #[error(
        "the entry `{name}` changed after it was built (its content hash is {actual}, {expected} was recorded); it was not exported\n  hint: `punix store verify --repair` discards it; build it again, then export"
    )]
    Damaged {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("cannot write the archive of `{name}` to `{path}`: {source}")]
    Write {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Build(Box<BuildError>),
}

impl From<BuildError> for CacheError {
    fn from(e: BuildError) -> Self {
        CacheError::Build(Box::new(e))
    }
}

impl CacheError {
    /// Failures to reach or read the cache, or to read and write local
    /// files (exit code 3); the rest are the user's to fix (exit code 1).
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            CacheError::Http { .. }
                | CacheError::File(_)
                | CacheError::Write { .. }
                | CacheError::Store(StoreError::File(_))
        )
    }
}

/// What a cache operation reports while it runs.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// What will move: `entries` to transfer (`bytes` in all: archive
    /// bytes for a fetch, file bytes for an export), `present` already at
    /// the destination and skipped.
    Planned {
        entries: usize,
        present: usize,
        bytes: u64,
    },
    /// One entry starts (`bytes` as in `Planned`).
    Started { name: &'a str, bytes: u64 },
    /// More bytes moved (from any thread).
    Progress { bytes: u64 },
    /// One entry is done: in the store (fetch) or in the cache (export).
    Finished { name: &'a str, bytes: u64 },
    /// A request failed and will be tried again after `wait`.
    Retrying {
        url: &'a str,
        attempt: u32,
        wait: Duration,
        reason: &'a str,
    },
}

/// Hears [`Event`]s; called from the worker threads too.
pub trait Observer: Sync {
    fn event(&self, _event: Event<'_>) {}
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {}

/// An opened binary cache. Opening parses the URL and does no I/O.
pub struct Cache {
    url: String,
    location: Location,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("url", &self.url).finish()
    }
}

impl Cache {
    /// A cache at a directory path, `file:///…` or `http(s)://…` URL.
    pub fn open(url: &str) -> Result<Cache, CacheError> {
        Ok(Cache {
            url: url.to_string(),
            location: Location::parse(url)?,
        })
    }

    /// The URL (or path) it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Is it a local directory (which export can write)?
    pub fn is_local(&self) -> bool {
        self.location.dir().is_some()
    }

    /// Read `punix-cache.json` (one request): whether the cache answers,
    /// and what it holds.
    pub fn info(&self) -> Result<CacheInfo, CacheError> {
        self.info_observed(&Silent)
    }

    fn info_observed(&self, observer: &dyn Observer) -> Result<CacheInfo, CacheError> {
        let file = self.location.describe(CACHE_INFO);
        let bytes = self
            .location
            .read_small(CACHE_INFO, observer)?
            .ok_or_else(|| CacheError::NotACache {
                url: self.url.clone(),
                reason: format!("it has no `{CACHE_INFO}`"),
                hint: "check the URL; `punix store export --to DIR` makes a cache".into(),
            })?;
        let info: CacheInfo =
            serde_json::from_slice(&bytes).map_err(|e| CacheError::BadMetadata {
                file,
                reason: e.to_string(),
            })?;
        if info.format != FORMAT {
            return Err(CacheError::Format {
                url: self.url.clone(),
                found: info.format,
                supported: FORMAT,
            });
        }
        Ok(info)
    }

    /// [`Cache::info`], and refuse a cache made for another store root.
    pub fn check(&self, store_root: &Path) -> Result<CacheInfo, CacheError> {
        self.check_observed(store_root, &Silent)
    }

    fn check_observed(
        &self,
        store_root: &Path,
        observer: &dyn Observer,
    ) -> Result<CacheInfo, CacheError> {
        let info = self.info_observed(observer)?;
        if Path::new(&info.store_root) != store_root {
            return Err(CacheError::OtherRoot {
                url: self.url.clone(),
                cache_root: info.store_root,
                store_root: store_root.display().to_string(),
            });
        }
        Ok(info)
    }

    /// Which of `names` the cache has, in one batched query. Names that
    /// are not store names are simply not there.
    pub fn has_many<I, S>(&self, names: I) -> Result<BTreeSet<String>, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names: BTreeSet<String> = names
            .into_iter()
            .map(|n| n.as_ref().to_string())
            .filter(|n| crate::store::derivation::is_store_name(n))
            .collect();
        if names.is_empty() {
            return Ok(names);
        }
        self.location.has_many(&names, &Silent)
    }

    /// Every entry the cache lists.
    pub fn names(&self) -> Result<BTreeSet<String>, CacheError> {
        self.location.list(&Silent)
    }

    /// The metadata of `name`, checked for shape (format, name, archive
    /// file, references, the derivation's hash); `None` when the cache
    /// has no such entry.
    pub fn entry(&self, name: &str) -> Result<Option<EntryInfo>, CacheError> {
        import::read_entry(self, name, &Silent)
    }

    /// Fetch `names` and their closure into `store`, verified; entries
    /// already valid there are skipped.
    pub fn fetch_into<I, S>(
        &self,
        store: &Store,
        names: I,
        observer: &dyn Observer,
    ) -> Result<FetchReport, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names: Vec<String> = names.into_iter().map(|n| n.as_ref().to_string()).collect();
        import::fetch(self, store, Some(&names), observer)
    }

    /// Fetch every entry of the cache into `store`, verified.
    pub fn fetch_all(
        &self,
        store: &Store,
        observer: &dyn Observer,
    ) -> Result<FetchReport, CacheError> {
        import::fetch(self, store, None, observer)
    }

    /// Write `names` and their closure from `store` into this cache (a
    /// directory); entries already in it are skipped.
    pub fn export_from<I, S>(
        &self,
        store: &Store,
        names: I,
        observer: &dyn Observer,
    ) -> Result<ExportReport, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        export::export(self, store, names, observer)
    }
}
