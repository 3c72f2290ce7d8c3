//! Derivations: everything that decides a build's output, and the store
//! path name derived from it.
//!
//! The name of an entry is `<hash>-<pname>-<version>`, where `<hash>` is the
//! first 32 lowercase hex characters of the sha256 of the derivation's
//! canonical JSON: object keys sorted by their bytes, no whitespace, strings
//! escaped as serde_json escapes them. The same derivation gives the same
//! name on every machine; changing any field changes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::content_hash::sha256_hex;

/// The version of the derivation format; part of every hash.
pub const DERIVATION_FORMAT: u32 = 1;

/// The builder script a derivation runs, named by kind and pinned by hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderRef {
    pub kind: String,
    pub script_sha256: String,
}

/// Everything that decides a build's output. Secret values never enter it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    pub format: u32,
    pub pname: String,
    pub version: String,
    pub system: String,
    pub store_root: String,
    pub builder: BuilderRef,
    /// The recipe's script (shell builder), if any.
    pub script: Option<String>,
    /// Arguments handed to the builder script as `"$@"`.
    pub args: Vec<String>,
    /// Extra environment variables for the build.
    pub env: BTreeMap<String, String>,
    /// The content hash of the source tree, if the recipe has one.
    pub src_sha256: Option<String>,
    /// Store entry names of the inputs, sorted; also the runtime closure.
    pub inputs: Vec<String>,
    /// Features a build machine must offer, sorted.
    pub features: Vec<String>,
}

impl Derivation {
    /// The canonical JSON text that the hash is computed over.
    pub fn canonical_json(&self) -> String {
        // A struct always serialises; fall back to Null only to stay total.
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        canonical_json(&value)
    }

    /// The 32 hex characters that start the entry's name.
    pub fn hash(&self) -> String {
        let mut h = sha256_hex(self.canonical_json().as_bytes());
        h.truncate(32);
        h
    }

    /// The entry name: `<hash>-<pname>-<version>`.
    pub fn store_name(&self) -> String {
        format!("{}-{}-{}", self.hash(), self.pname, self.version)
    }
}

/// Serialise a JSON value canonically: sorted keys, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Is `name` shaped like a store entry name (`<32 hex>-<rest>`)?
pub fn is_store_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 34
        && b[..32]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        && b[32] == b'-'
        && name[33..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv() -> Derivation {
        Derivation {
            format: DERIVATION_FORMAT,
            pname: "api".into(),
            version: "1.0".into(),
            system: "x86_64-linux".into(),
            store_root: "/var/lib/punix/store".into(),
            builder: BuilderRef {
                kind: "shell".into(),
                script_sha256: "00".into(),
            },
            script: Some("echo hi".into()),
            args: vec![],
            env: BTreeMap::new(),
            src_sha256: None,
            inputs: vec![],
            features: vec![],
        }
    }

    #[test]
    fn canonical_json_sorts_keys_without_whitespace() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, {"z":1,"a":"x"}], "a": null}"#).expect("json");
        assert_eq!(canonical_json(&v), r#"{"a":null,"b":[1,{"a":"x","z":1}]}"#);
    }

    #[test]
    fn name_has_the_documented_shape() {
        let name = drv().store_name();
        assert!(is_store_name(&name), "{name}");
        assert!(name.ends_with("-api-1.0"));
        assert_eq!(name.len(), 32 + "-api-1.0".len());
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = drv().hash();
        let mut variants = Vec::new();
        let mut d = drv();
        d.system = "aarch64-linux".into();
        variants.push(d);
        let mut d = drv();
        d.store_root = "/other".into();
        variants.push(d);
        let mut d = drv();
        d.script = Some("echo ho".into());
        variants.push(d);
        let mut d = drv();
        d.builder.script_sha256 = "01".into();
        variants.push(d);
        let mut d = drv();
        d.inputs = vec!["x".into()];
        variants.push(d);
        let mut d = drv();
        d.src_sha256 = Some("sha256:00".into());
        variants.push(d);
        for v in variants {
            assert_ne!(v.hash(), base, "{v:?}");
        }
    }

    #[test]
    fn store_names_are_recognised() {
        assert!(is_store_name("0123456789abcdef0123456789abcdef-a-1"));
        assert!(!is_store_name("0123456789abcdef0123456789abcdeF-a-1"));
        assert!(!is_store_name(".tmp-0123456789abcdef0123456789abcdef-a-1"));
        assert!(!is_store_name("0123456789abcdef0123456789abcdef-"));
        assert!(!is_store_name("0123456789abcdef0123456789abcdef-a/b"));
    }
}
