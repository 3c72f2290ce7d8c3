//! The builder registry: `~/.punix/builders.toml`, or the file named by
//! `--builders FILE` or `PUNIX_BUILDERS`.
//!
//! ```toml
//! [[builder]]
//! name = "arm-1"
//! url = "ssh://builder@arm-1.example.org:22"
//! key = "/home/me/.ssh/id_builder"          # optional; else agent, ~/.ssh/id_*
//! known-hosts = "/home/me/.ssh/farm_hosts"  # optional; else ~/.ssh/known_hosts
//! systems = ["aarch64-linux"]
//! max-jobs = 4                              # default 1
//! speed-factor = 2.0                        # default 1.0; higher is preferred
//! features = ["big-parallel"]               # default none
//!
//! [[cache]]                                 # binary caches (issue 5)
//! url = "https://cache.example.org"
//! ```
//!
//! Contract:
//! - A missing file is an empty registry.
//! - Loading checks the whole file and reports every mistake at once, each
//!   as `file:line:col: message` with a hint: TOML syntax, unknown keys,
//!   wrong types, bad names, URLs and system strings, duplicate names.
//! - A relative `key` or `known-hosts` path is relative to the directory of
//!   the registry file (it is kept as written; `~/` is expanded when used).
//! - [`Registry::save`] writes the file atomically (temporary sibling,
//!   fsync, rename, fsync of the directory): a crash leaves the old
//!   registry or the new one. The output is deterministic: builders and
//!   caches in registry order, keys in a fixed order, defaults written out.
//!   Comments in a hand-written file are not kept.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Builder, DEFAULT_MAX_JOBS, DEFAULT_SPEED_FACTOR, FarmError, valid_builder_name};
use crate::platform::System;
use crate::recipe::diagnostic::{Diagnostic, SourceText, closest, did_you_mean};
use crate::transport::ssh::SshTarget;

/// The environment variable that names the registry file.
pub const ENV_VAR: &str = "PUNIX_BUILDERS";

/// Keys of a `[[builder]]` table, in the order they are written.
const BUILDER_KEYS: &[&str] = &[
    "name",
    "url",
    "key",
    "known-hosts",
    "systems",
    "max-jobs",
    "speed-factor",
    "features",
];
const CACHE_KEYS: &[&str] = &["url"];
const TOP_KEYS: &[&str] = &["builder", "cache"];

/// The most builds one builder may be given at once.
pub const MAX_JOBS_LIMIT: usize = 1024;

/// The registry: its file and the builders in it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Registry {
    /// The file it was loaded from and is saved to.
    pub path: PathBuf,
    /// In file order.
    pub builders: Vec<Builder>,
    /// URLs of `[[cache]]` tables, in file order (used by binary caches).
    pub caches: Vec<String>,
}

impl Registry {
    /// Where the registry lives: `flag` (`--builders FILE`), else
    /// `$PUNIX_BUILDERS`, else `~/.punix/builders.toml`; made absolute.
    pub fn path_from(flag: Option<&Path>) -> Result<PathBuf, FarmError> {
        let env = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty());
        let p = match (flag, env) {
            (Some(f), _) => crate::config::expand_home(f)?,
            (None, Some(e)) => crate::config::expand_home(Path::new(&e))?,
            (None, None) => crate::config::home()?.join(".punix/builders.toml"),
        };
        Ok(crate::config::absolute(&p))
    }

    /// An empty registry that will be saved to `path`.
    pub fn empty(path: impl Into<PathBuf>) -> Registry {
        Registry {
            path: path.into(),
            ..Registry::default()
        }
    }

    /// Read and check the registry at `path`; a missing file is an empty
    /// registry.
    pub fn load(path: &Path) -> Result<Registry, FarmError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Registry::empty(path));
            }
            Err(source) => {
                return Err(FarmError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Registry::parse(path, text)
    }

    /// Check the registry text `text`, as if read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Registry, FarmError> {
        let src = SourceText::new(path, text);
        let mut diags = Vec::new();
        let reg = parse_source(&src, &mut diags);
        if diags.is_empty() {
            Ok(reg)
        } else {
            diags.sort();
            Err(FarmError::Invalid(diags))
        }
    }

    /// The registry as TOML, deterministically.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# The punix builder registry (docs/build-farm.md).\n\
             # Written by `punix builders add|remove`; comments are not kept.\n",
        );
        for b in &self.builders {
            out.push_str("\n[[builder]]\n");
            kv(&mut out, "name", &quote(&b.name));
            kv(&mut out, "url", &quote(&b.url));
            if let Some(k) = &b.key {
                kv(&mut out, "key", &quote(&k.to_string_lossy()));
            }
            if let Some(k) = &b.known_hosts {
                kv(&mut out, "known-hosts", &quote(&k.to_string_lossy()));
            }
            kv(
                &mut out,
                "systems",
                &list(b.systems.iter().map(|s| s.to_string())),
            );
            kv(&mut out, "max-jobs", &b.max_jobs.to_string());
            kv(
                &mut out,
                "speed-factor",
                &toml::Value::Float(b.speed_factor).to_string(),
            );
            kv(&mut out, "features", &list(b.features.iter().cloned()));
        }
        for c in &self.caches {
            out.push_str("\n[[cache]]\n");
            kv(&mut out, "url", &quote(c));
        }
        out
    }

    /// Write the registry to [`Registry::path`] atomically (mode 0644),
    /// creating its directory when needed.
    pub fn save(&self) -> Result<(), FarmError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(crate::files::ctx("cannot create the directory", dir))?;
        }
        crate::files::write_atomic(&self.path, self.to_toml().as_bytes(), 0o644)?;
        Ok(())
    }

    /// The builder named `name`.
    pub fn get(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name == name)
    }

    /// Add `builder` at the end; its name must be valid and new, its URL an
    /// ssh URL.
    pub fn add(&mut self, builder: Builder) -> Result<(), FarmError> {
        valid_builder_name(&builder.name).map_err(|why| FarmError::BadName {
            name: builder.name.clone(),
            reason: why.into(),
        })?;
        builder.target()?;
        if self.get(&builder.name).is_some() {
            return Err(FarmError::Duplicate {
                name: builder.name,
                path: self.path.clone(),
            });
        }
        self.builders.push(builder);
        Ok(())
    }

    /// Remove the builder named `name` and return it.
    pub fn remove(&mut self, name: &str) -> Result<Builder, FarmError> {
        match self.builders.iter().position(|b| b.name == name) {
            Some(i) => Ok(self.builders.remove(i)),
            None => Err(self.unknown(name)),
        }
    }

    /// The error for a builder `name` that is not registered, with a
    /// did-you-mean or the list of names.
    pub fn unknown(&self, name: &str) -> FarmError {
        let names = || self.builders.iter().map(|b| b.name.as_str());
        let hint = did_you_mean(name, names()).or_else(|| {
            if self.builders.is_empty() {
                Some("the registry is empty: add a builder with `punix builders add NAME ssh://USER@HOST`".into())
            } else {
                Some(format!(
                    "the builders are: {}",
                    names().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                ))
            }
        });
        FarmError::Unknown {
            name: name.to_string(),
            path: self.path.clone(),
            hint,
        }
    }
}

fn kv(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str(" = ");
    out.push_str(value);
    out.push('\n');
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.map(|s| quote(&s)).collect();
    format!("[{}]", items.join(", "))
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

type Key<'i> = Spanned<Cow<'i, str>>;

/// Report every key of `table` not in `allowed`.
fn deny_unknown(
    src: &SourceText,
    table: &DeTable<'_>,
    allowed: &[&str],
    what: &str,
    diags: &mut Vec<Diagnostic>,
) {
    for key in table.keys() {
        let k: &str = key.get_ref();
        if allowed.contains(&k) {
            continue;
        }
        let hint = match closest(k, allowed.iter().copied()) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!(
                "the keys of {what} are: {}",
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        diags.push(
            src.diag(key.span(), format!("unknown key `{k}` in {what}"))
                .with_hint(hint),
        );
    }
}

/// The tables of an array of tables `key` (`[[builder]]`), with the span of
/// each; a wrong shape is reported.
fn tables<'a, 'i>(
    src: &SourceText,
    doc: &'a DeTable<'i>,
    key: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
    let Some((k, v)) = doc.get_key_value(key) else {
        return Vec::new();
    };
    let bad = |diags: &mut Vec<Diagnostic>, span: Range<usize>, got: &str| {
        diags.push(
            src.diag(
                span,
                format!("`{key}` must be an array of tables, not {got}"),
            )
            .with_hint(format!("start each entry with a `[[{key}]]` line")),
        );
    };
    match v.get_ref() {
        DeValue::Array(items) => {
            let mut out = Vec::new();
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::Table(t) => out.push((t, item.span())),
                    other => bad(diags, item.span(), type_name(other)),
                }
            }
            out
        }
        DeValue::Table(_) => {
            bad(diags, k.span(), "one table");
            Vec::new()
        }
        other => {
            bad(diags, k.span(), type_name(other));
            Vec::new()
        }
    }
}

/// Typed access to the keys of one `[[builder]]` or `[[cache]]` table.
struct Entry<'a, 'i> {
    src: &'a SourceText,
    table: &'a DeTable<'i>,
    what: String,
    /// Where the table starts, for a missing key.
    span: Range<usize>,
}

impl<'i> Entry<'_, 'i> {
    fn get(&self, key: &str) -> Option<(&Key<'i>, &Spanned<DeValue<'i>>)> {
        self.table.get_key_value(key)
    }

    fn wrong_type(
        &self,
        key: &str,
        v: &Spanned<DeValue<'_>>,
        expected: &str,
        example: &str,
        diags: &mut Vec<Diagnostic>,
    ) {
        diags.push(
            self.src
                .diag(
                    v.span(),
                    format!(
                        "`{key}` in {} must be {expected}, not {}",
                        self.what,
                        type_name(v.get_ref())
                    ),
                )
                .with_hint(format!("write it as `{key} = {example}`")),
        );
    }

    fn string(
        &self,
        key: &str,
        example: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<(String, Range<usize>)> {
        let (_, v) = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), v.span())),
            _ => {
                self.wrong_type(key, v, "a string", example, diags);
                None
            }
        }
    }

    fn required_string(
        &self,
        key: &str,
        example: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<(String, Range<usize>)> {
        if self.get(key).is_none() {
            diags.push(
                self.src
                    .diag(self.span.clone(), format!("{} has no `{key}`", self.what))
                    .with_hint(format!("add `{key} = {example}`")),
            );
            return None;
        }
        self.string(key, example, diags)
    }

    fn strings(
        &self,
        key: &str,
        example: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<(String, Range<usize>)> {
        let Some((_, v)) = self.get(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, "an array of strings", example, diags);
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push((s.to_string(), item.span())),
                other => diags.push(
                    self.src
                        .diag(
                            item.span(),
                            format!(
                                "the items of `{key}` in {} must be strings, not {}",
                                self.what,
                                type_name(other)
                            ),
                        )
                        .with_hint(format!("write it as `{key} = {example}`")),
                ),
            }
        }
        out
    }

    /// A whole number in `1..=max`.
    fn count(&self, key: &str, max: usize, diags: &mut Vec<Diagnostic>) -> Option<usize> {
        let (_, v) = self.get(key)?;
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(key, v, "a whole number", "4", diags);
            return None;
        };
        match usize::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if (1..=max).contains(&n) => Some(n),
            _ => {
                diags.push(
                    self.src
                        .diag(
                            v.span(),
                            format!("`{key}` in {} must be between 1 and {max}", self.what),
                        )
                        .with_hint(format!("write it as `{key} = 4`")),
                );
                None
            }
        }
    }

    /// A positive, finite number (integer or float).
    fn positive(&self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<f64> {
        let (_, v) = self.get(key)?;
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            _ => {
                self.wrong_type(key, v, "a number", "1.5", diags);
                return None;
            }
        };
        match n {
            Some(n) if n.is_finite() && n > 0.0 => Some(n),
            _ => {
                diags.push(
                    self.src
                        .diag(
                            v.span(),
                            format!("`{key}` in {} must be a number above 0", self.what),
                        )
                        .with_hint(format!(
                            "write it as `{key} = 1.5` (1.0 is the default; higher is preferred)"
                        )),
                );
                None
            }
        }
    }
}

fn parse_source(src: &SourceText, diags: &mut Vec<Diagnostic>) -> Registry {
    let mut reg = Registry::empty(src.path());
    let doc = match DeTable::parse(&src.text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim_end().replace('\n', "; ");
            let hint = if message.starts_with("duplicate key") {
                "a key can appear only once in a table: remove one of them"
            } else {
                "fix the TOML syntax (https://toml.io); each builder is a `[[builder]]` table"
            };
            diags.push(
                src.diag(span, format!("invalid TOML: {message}"))
                    .with_hint(hint),
            );
            return reg;
        }
    };
    let doc = doc.get_ref();
    deny_unknown(src, doc, TOP_KEYS, "the builders registry", diags);

    let base = src
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // name -> line of its first definition
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (i, (table, span)) in tables(src, doc, "builder", diags).into_iter().enumerate() {
        let (line, _) = src.line_col(span.start);
        let e = Entry {
            src,
            table,
            what: format!("builder #{} (line {line})", i + 1),
            span: span.clone(),
        };
        deny_unknown(src, table, BUILDER_KEYS, "a `[[builder]]` table", diags);
        let before = diags.len();
        let name = e.required_string("name", "\"arm-1\"", diags);
        if let Some((n, nspan)) = &name {
            if let Err(why) = valid_builder_name(n) {
                diags.push(
                    src.diag(nspan.clone(), format!("bad builder name `{n}`: {why}"))
                        .with_hint(
                            "name builders with letters, digits, `.`, `_` and `-`, e.g. `arm-1`",
                        ),
                );
            } else if let Some((_, first)) = seen.iter().find(|(s, _)| s == n) {
                diags.push(
                    src.diag(
                        nspan.clone(),
                        format!("a builder named `{n}` is already defined on line {first}"),
                    )
                    .with_hint("builder names must be unique: rename one or remove it"),
                );
            } else {
                seen.push((n.clone(), src.line_col(nspan.start).0));
            }
        }
        let url = e.required_string("url", "\"ssh://builder@arm-1.example.org\"", diags);
        if let Some((u, uspan)) = &url
            && let Err(why) = SshTarget::parse(u)
        {
            diags.push(
                src.diag(uspan.clone(), why)
                    .with_hint("a builder's URL is `ssh://USER@HOST[:PORT]`"),
            );
        }
        let path_of = |p: String| {
            let p = PathBuf::from(p);
            if p.is_absolute() || p.starts_with("~") {
                p
            } else {
                base.join(p)
            }
        };
        let key = e
            .string("key", "\"~/.ssh/id_builder\"", diags)
            .map(|(p, _)| path_of(p));
        let known_hosts = e
            .string("known-hosts", "\"~/.ssh/known_hosts\"", diags)
            .map(|(p, _)| path_of(p));
        let mut systems: Vec<System> = Vec::new();
        for (s, sspan) in e.strings("systems", "[\"aarch64-linux\"]", diags) {
            match s.parse::<System>() {
                Ok(sys) if systems.contains(&sys) => diags.push(
                    src.diag(sspan, format!("system `{s}` is listed twice"))
                        .with_hint("list each system once"),
                ),
                Ok(sys) => systems.push(sys),
                Err(err) => diags.push(
                    src.diag(sspan, err.to_string())
                        .with_hint("systems look like `x86_64-linux` or `aarch64-linux`; `punix builders add` detects them with `uname`"),
                ),
            }
        }
        let max_jobs = e
            .count("max-jobs", MAX_JOBS_LIMIT, diags)
            .unwrap_or(DEFAULT_MAX_JOBS);
        let speed_factor = e
            .positive("speed-factor", diags)
            .unwrap_or(DEFAULT_SPEED_FACTOR);
        let mut features: Vec<String> = Vec::new();
        for (f, fspan) in e.strings("features", "[\"big-parallel\"]", diags) {
            if f.is_empty() || f.contains(|c: char| c.is_whitespace() || c == ',') {
                diags.push(
                    src.diag(fspan, format!("bad feature name `{f}`"))
                        .with_hint("a feature is one word such as `big-parallel` or `kvm`"),
                );
            } else if !features.contains(&f) {
                features.push(f);
            }
        }
        if diags.len() == before
            && let (Some((name, _)), Some((url, _))) = (name, url)
        {
            reg.builders.push(Builder {
                name,
                url,
                key,
                known_hosts,
                systems,
                max_jobs,
                speed_factor,
                features,
            });
        }
    }
    for (i, (table, span)) in tables(src, doc, "cache", diags).into_iter().enumerate() {
        let (line, _) = src.line_col(span.start);
        let e = Entry {
            src,
            table,
            what: format!("cache #{} (line {line})", i + 1),
            span,
        };
        deny_unknown(src, table, CACHE_KEYS, "a `[[cache]]` table", diags);
        if let Some((url, _)) = e.required_string("url", "\"https://cache.example.org\"", diags) {
            reg.caches.push(url);
        }
    }
    reg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Registry::parse(Path::new("/r/builders.toml"), text.to_string()) {
            Ok(r) => panic!("expected errors, loaded {r:?}"),
            Err(FarmError::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn full_entry_round_trips() {
        let text = r#"
[[builder]]
name = "arm-1"
url = "ssh://b@[fd00::1]:2222"
key = "keys/id"
known-hosts = "~/.ssh/farm"
systems = ["aarch64-linux", "armv7l-linux"]
max-jobs = 4
speed-factor = 2
features = ["big-parallel", "kvm"]

[[builder]]
name = "x1"
url = "ssh://b@x1"

[[cache]]
url = "file:///srv/cache"
"#;
        let r = Registry::parse(Path::new("/r/builders.toml"), text.into()).expect("ok");
        assert_eq!(r.builders.len(), 2);
        let a = &r.builders[0];
        assert_eq!(a.key.as_deref(), Some(Path::new("/r/keys/id")));
        assert_eq!(a.known_hosts.as_deref(), Some(Path::new("~/.ssh/farm")));
        assert_eq!(a.systems[0].to_string(), "aarch64-linux");
        assert_eq!(a.max_jobs, 4);
        assert_eq!(a.speed_factor, 2.0);
        let x = &r.builders[1];
        assert_eq!((x.max_jobs, x.speed_factor), (1, 1.0));
        assert_eq!(r.caches, vec!["file:///srv/cache".to_string()]);
        let again = Registry::parse(&r.path, r.to_toml()).expect("ok");
        assert_eq!(again, r);
        assert_eq!(again.to_toml(), r.to_toml());
    }

    #[test]
    fn mistakes_have_locations_and_hints() {
        let e = errors("[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\nmax-job = 2\n");
        assert_eq!(
            e,
            vec![
                "/r/builders.toml:4:1: unknown key `max-job` in a `[[builder]]` table\n  hint: did you mean `max-jobs`?"
            ]
        );
        let e = errors(
            "[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\nsystems = [\"zz80-linux\"]\nmax-jobs = \"4\"\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("/r/builders.toml:4:12: unknown architecture `zz80`"),
            "{e:?}"
        );
        assert!(e[1].starts_with("/r/builders.toml:5:12: `max-jobs` in builder #1 (line 1) must be a whole number, not a string"), "{e:?}");
        let e = errors(
            "[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\n[[builder]]\nname = \"a\"\nurl = \"u@h\"\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "/r/builders.toml:5:8: a builder named `a` is already defined on line 2"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("/r/builders.toml:6:7: `u@h` is not an ssh URL"),
            "{e:?}"
        );
        let e = errors("[builder]\nname = \"a\"\n");
        assert!(
            e[0].starts_with("/r/builders.toml:1:2: `builder` must be an array of tables"),
            "{e:?}"
        );
        let e = errors("[[builder]]\nurl = \"ssh://u@h\"\n");
        assert!(
            e[0].starts_with("/r/builders.toml:1:1: builder #1 (line 1) has no `name`"),
            "{e:?}"
        );
    }

    #[test]
    fn add_and_remove() {
        let mut r = Registry::empty("/r/builders.toml");
        r.add(Builder::new("h1", "ssh://u@h1")).expect("ok");
        assert!(matches!(
            r.add(Builder::new("h1", "ssh://u@h1")),
            Err(FarmError::Duplicate { .. })
        ));
        assert!(matches!(
            r.add(Builder::new("-x", "ssh://u@h1")),
            Err(FarmError::BadName { .. })
        ));
        let err = r.remove("h2").expect_err("an error").to_string();
        assert!(err.contains("did you mean `h1`?"), "{err}");
        assert_eq!(r.remove("h1").expect("ok").name, "h1");
        assert!(r.builders.is_empty());
    }
}
