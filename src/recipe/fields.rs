//! Typed access to the keys of one TOML table, collecting diagnostics with
//! locations for unknown keys, wrong types and bad values.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Diagnostic, SourceText, closest};

/// A string with the span it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// The keys of one table, checked against a schema as they are taken.
pub struct Fields<'a, 'i> {
    pub src: &'a SourceText,
    pub table: &'a DeTable<'i>,
    /// What the table is, for messages: "package `Api`".
    pub what: String,
    /// Where to point when a required key is missing.
    pub header: Range<usize>,
    pub diags: &'a mut Vec<Diagnostic>,
    /// Allowed keys that an unknown key was taken for ("did you mean
    /// `version`?"): such a key is not reported again as missing.
    pub suggested: Vec<String>,
}

pub fn type_name(v: &DeValue<'_>) -> &'static str {
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

impl<'a, 'i> Fields<'a, 'i> {
    /// Report every key that is not in `allowed`.
    pub fn deny_unknown(&mut self, allowed: &[&str]) {
        for key in self.table.keys() {
            let k: &str = key.get_ref();
            if !allowed.contains(&k) {
                let near = closest(k, allowed.iter().copied());
                if let Some(near) = near {
                    self.suggested.push(near.to_string());
                }
                let hint = near
                    .map(|c| format!("did you mean `{c}`?"))
                    .unwrap_or_else(|| {
                        format!(
                            "the keys of {} are: {}",
                            self.what,
                            allowed
                                .iter()
                                .map(|a| format!("`{a}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                self.diags.push(
                    self.src
                        .diag(key.span(), format!("unknown key `{k}` in {}", self.what))
                        .with_hint(hint),
                );
            }
        }
    }

    fn get(
        &self,
        key: &str,
    ) -> Option<(
        &'a Spanned<std::borrow::Cow<'i, str>>,
        &'a Spanned<DeValue<'i>>,
    )> {
        self.table.get_key_value(key)
    }

    /// A number or boolean written where a string belongs, quoted: the
    /// example to show for it (`"1"` for `version = 1`).
    fn quoted(&self, v: &Spanned<DeValue<'_>>) -> Option<String> {
        if !matches!(
            v.get_ref(),
            DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_)
        ) {
            return None;
        }
        let raw = self.src.text.get(v.span())?;
        (!raw.is_empty() && raw.len() <= 64 && !raw.contains(['\n', '"', '`']))
            .then(|| format!("\"{raw}\""))
    }

    fn wrong_type(&mut self, key: &str, v: &Spanned<DeValue<'_>>, expected: &str, example: &str) {
        let example = match expected {
            "a string" => self.quoted(v).unwrap_or_else(|| example.to_string()),
            _ => example.to_string(),
        };
        self.diags.push(
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

    /// Report a missing required key, unless an unknown key was already
    /// reported as a misspelling of it.
    pub fn missing(&mut self, key: &str, example: &str) {
        if self.suggested.iter().any(|s| s == key) {
            return;
        }
        self.diags.push(
            self.src
                .diag(self.header.clone(), format!("{} has no `{key}`", self.what))
                .with_hint(format!("add `{key} = {example}`")),
        );
    }

    /// An optional string.
    pub fn string(&mut self, key: &str, example: &str) -> Option<Located<String>> {
        let (_, v) = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(Located {
                value: s.to_string(),
                span: v.span(),
            }),
            _ => {
                self.wrong_type(key, v, "a string", example);
                None
            }
        }
    }

    /// A required string.
    pub fn required_string(&mut self, key: &str, example: &str) -> Option<Located<String>> {
        if self.get(key).is_none() {
            self.missing(key, example);
            return None;
        }
        self.string(key, example)
    }

    /// An optional array of strings (missing = empty).
    pub fn string_list(&mut self, key: &str, example: &str) -> Vec<Located<String>> {
        let Some((_, v)) = self.get(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, "an array of strings", example);
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(Located {
                    value: s.to_string(),
                    span: item.span(),
                }),
                other => self.diags.push(
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

    /// An optional table of strings (missing = empty), keyed with spans.
    pub fn string_table(
        &mut self,
        key: &str,
        example: &str,
    ) -> BTreeMap<String, (Located<String>, Range<usize>)> {
        let mut out = BTreeMap::new();
        let Some((_, v)) = self.get(key) else {
            return out;
        };
        let DeValue::Table(t) = v.get_ref() else {
            self.wrong_type(key, v, "a table of strings", example);
            return out;
        };
        for (k, item) in t.iter() {
            match item.get_ref() {
                DeValue::String(s) => {
                    out.insert(
                        k.get_ref().to_string(),
                        (
                            Located {
                                value: s.to_string(),
                                span: item.span(),
                            },
                            k.span(),
                        ),
                    );
                }
                other => {
                    let hint = match self.quoted(item) {
                        Some(q) => format!("write it as `{} = {q}`", k.get_ref()),
                        None => format!("write it as `{key} = {example}`"),
                    };
                    self.diags.push(
                        self.src
                            .diag(
                                item.span(),
                                format!(
                                    "`{key}.{}` in {} must be a string, not {}",
                                    k.get_ref(),
                                    self.what,
                                    type_name(other)
                                ),
                            )
                            .with_hint(hint),
                    )
                }
            }
        }
        out
    }
}
