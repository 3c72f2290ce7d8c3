//! The standard builder scripts (POSIX `sh`, in `builders/`), embedded into
//! the binary and shipped with every build, so a build host needs only
//! `sh`, coreutils and rsync. A builder's sha256 is part of every
//! derivation that uses it: editing a script changes those store paths.

use crate::store::content_hash::sha256_hex;

/// Builder kinds and their scripts.
pub const KINDS: &[(&str, &str)] = &[
    ("shell", include_str!("../../builders/shell.sh")),
    ("make", include_str!("../../builders/make.sh")),
    ("copy", include_str!("../../builders/copy.sh")),
];

/// The script of a builder kind.
pub fn script(kind: &str) -> Option<&'static str> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, s)| *s)
}

/// The sha256 (hex) of a builder kind's script.
pub fn script_sha256(kind: &str) -> Option<String> {
    script(kind).map(|s| sha256_hex(s.as_bytes()))
}
