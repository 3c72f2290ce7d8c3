//! Secrets: references resolved on the deploying machine, all missing ones
//! reported together, before any byte reaches a target.
//!
//! A resolved value lives only in memory here and in a 0600 file on the
//! target. [`Secret`] never prints its value (`Debug` and `Display` show
//! `<secret>`), so it cannot slip into a log, a plan or `--json`.

use std::collections::BTreeMap;
use std::fmt;

use crate::recipe::stack::{SecretRef, Stack};

/// A secret value. Its `Debug`/`Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// Every secret of a stack, by reference.
pub type Secrets = BTreeMap<SecretRef, Secret>;

/// A secret reference that could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub reference: SecretRef,
    pub reason: String,
}

/// Resolve every secret of `stack`; report all missing ones together.
pub fn resolve(stack: &Stack) -> Result<Secrets, Vec<Missing>> {
    resolve_refs(&stack.secret_refs())
}

/// Resolve `refs`; report all missing ones together.
pub fn resolve_refs(refs: &[SecretRef]) -> Result<Secrets, Vec<Missing>> {
    let mut out = Secrets::new();
    let mut missing = Vec::new();
    for r in refs {
        match r {
            SecretRef::FromEnv(var) => match std::env::var_os(var) {
                Some(v) => {
                    out.insert(
                        r.clone(),
                        Secret(std::os::unix::ffi::OsStringExt::into_vec(v)),
                    );
                }
                None => missing.push(Missing {
                    reference: r.clone(),
                    reason: "not set".into(),
                }),
            },
            SecretRef::FromFile(path) => match std::fs::read(path) {
                Ok(bytes) => {
                    out.insert(r.clone(), Secret(bytes));
                }
                Err(e) => missing.push(Missing {
                    reference: r.clone(),
                    reason: e.to_string(),
                }),
            },
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_their_value() {
        let s = Secret(b"hunter2".to_vec());
        assert_eq!(format!("{s} {s:?}"), "<secret> <secret>");
    }

    #[test]
    fn all_missing_references_are_reported() {
        let refs = vec![
            SecretRef::FromEnv("PUNIX_TEST_SURELY_UNSET_1".into()),
            SecretRef::FromEnv("PATH".into()),
            SecretRef::FromFile("/nonexistent/punix/secret".into()),
        ];
        let missing = resolve_refs(&refs).expect_err("two are missing");
        assert_eq!(missing.len(), 2);
    }
}
