//! The files of a binary cache: `punix-cache.json`, one `<name>.json` and
//! one `<name>.tar.zst` per store entry, and `punix-index.txt`.
//!
//! All JSON is written with sorted keys (structs in field order, maps as
//! `BTreeMap`) and read leniently: unknown fields are ignored, so that a
//! later punix may add some without breaking older readers. A reader
//! refuses a `format` it does not know.

use serde::{Deserialize, Serialize};

use crate::store::derivation::{Derivation, is_store_name};

/// The version of the cache layout; `punix-cache.json` and every entry's
/// metadata carry it.
pub const FORMAT: u32 = 1;

/// The cache-level description, at the cache's top.
pub const CACHE_INFO: &str = "punix-cache.json";

/// The list of entry names, one a line, for caches read over HTTP (a
/// directory is listed instead).
pub const INDEX: &str = "punix-index.txt";

/// The archive of an entry: `<name>` + this.
pub const ARCHIVE_SUFFIX: &str = ".tar.zst";

/// The metadata of an entry: `<name>` + this.
pub const META_SUFFIX: &str = ".json";

/// The first line of `punix-index.txt`.
pub const INDEX_HEADER: &str = "# punix binary cache index, format 1: one store entry name a line";

/// `punix-cache.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInfo {
    /// [`FORMAT`].
    pub format: u32,
    /// The store root every entry of this cache was built for (it is part
    /// of each derivation, so entries are only valid under it).
    pub store_root: String,
    /// How archives are compressed: `zstd`.
    pub compression: String,
}

impl CacheInfo {
    pub fn new(store_root: &str) -> CacheInfo {
        CacheInfo {
            format: FORMAT,
            store_root: store_root.to_string(),
            compression: "zstd".into(),
        }
    }
}

/// `<name>.json`: what an importer needs to know before and after it
/// fetches the archive. Never trusted alone: the importer recomputes the
/// archive's sha256, the tree's content hash and the derivation's hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// [`FORMAT`].
    pub format: u32,
    /// The store entry name, `<hash>-<pname>-<version>`.
    pub name: String,
    /// The entry's content hash (`sha256:<hex>`), as in its `built` marker.
    pub content_hash: String,
    /// The archive's file name, always `<name>.tar.zst`.
    pub archive: String,
    /// The archive's size in bytes.
    pub archive_size: u64,
    /// The hex sha256 of the archive's bytes.
    pub archive_sha256: String,
    /// The bytes of the regular files in the archive (derivation.json
    /// included): an importer stops unpacking past this.
    pub unpacked_size: u64,
    /// The entry's references: the store entries it needs at run time (its
    /// derivation's inputs), sorted.
    pub references: Vec<String>,
    /// The system it was built for.
    pub system: String,
    /// The derivation it was built from; it hashes to `name`.
    pub derivation: Derivation,
}

/// The archive file of the entry `name`.
pub fn archive_file(name: &str) -> String {
    format!("{name}{ARCHIVE_SUFFIX}")
}

/// The metadata file of the entry `name`.
pub fn meta_file(name: &str) -> String {
    format!("{name}{META_SUFFIX}")
}

/// The entry a file of the cache's top belongs to, if it is an entry's
/// metadata file.
pub fn entry_of_meta_file(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(META_SUFFIX)
        .filter(|name| is_store_name(name))
}

/// The text of `punix-index.txt` for `names` (sorted by the caller).
pub fn render_index<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    let mut text = String::from(INDEX_HEADER);
    text.push('\n');
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    text
}

/// The names in the text of `punix-index.txt`; blank lines and `#`
/// comments are skipped, and so is anything that is not a store name.
pub fn parse_index(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && is_store_name(l))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_skips_junk() {
        let names = vec![
            "0123456789abcdef0123456789abcdef-a-1".to_string(),
            "1123456789abcdef0123456789abcdef-b-2".to_string(),
        ];
        let text = render_index(&names);
        assert!(text.starts_with("# punix binary cache index"));
        assert_eq!(parse_index(&text), names);
        let junk = format!("{text}\n../../etc/passwd\n  \n# c\n");
        assert_eq!(parse_index(&junk), names);
    }

    #[test]
    fn only_entry_metadata_files_name_entries() {
        let n = "0123456789abcdef0123456789abcdef-a-1";
        assert_eq!(entry_of_meta_file(&meta_file(n)), Some(n));
        assert_eq!(entry_of_meta_file(CACHE_INFO), None);
        assert_eq!(entry_of_meta_file(&archive_file(n)), None);
        assert_eq!(entry_of_meta_file("../x.json"), None);
    }
}
