//! Target lists for fleet deploys (`--targets FILE`): one target per line,
//! an `ssh://USER@HOST[:PORT]` URL followed by optional `@tags`; `#` starts
//! a comment.
//!
//! ```text
//! # web servers
//! ssh://deploy@web1.example.com        @web @eu
//! ssh://deploy@[2001:db8::7]:2222      @web @us
//! ssh://deploy@db1.example.com         @db
//! ```

use std::path::{Path, PathBuf};

use crate::transport::ssh::SshTarget;

/// One line of a target list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEntry {
    pub url: String,
    pub tags: Vec<String>,
}

/// A mistake in a target list.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("cannot read the target list `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}\n  hint: {hint}", path = .path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
        hint: String,
    },
    #[error("no target of `{path}` has the tag `{tag}`\n  hint: the tags there are: {known}", path = .path.display())]
    NoMatch {
        path: PathBuf,
        tag: String,
        known: String,
    },
}

/// Parse a target list.
pub fn parse(path: &Path, text: &str) -> Result<Vec<TargetEntry>, TargetsError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default();
        // Words with their 1-based columns.
        let mut words = Vec::new();
        let mut start = None;
        for (b, c) in line.char_indices().chain([(line.len(), ' ')]) {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(b),
                (true, Some(s0)) => {
                    words.push((&line[s0..b], line[..s0].chars().count() + 1));
                    start = None;
                }
                _ => {}
            }
        }
        let mut words = words.into_iter();
        let Some((url, col)) = words.next() else {
            continue;
        };
        let invalid = |col: usize, message: String, hint: &str| TargetsError::Invalid {
            path: path.to_path_buf(),
            line: i + 1,
            col,
            message,
            hint: hint.to_string(),
        };
        SshTarget::parse(url).map_err(|e| {
            invalid(
                col,
                e,
                "each line is `ssh://USER@HOST[:PORT]` followed by optional `@tags`",
            )
        })?;
        let mut tags = Vec::new();
        for (w, wcol) in words {
            let Some(tag) = w.strip_prefix('@').filter(|t| !t.is_empty()) else {
                return Err(invalid(
                    wcol,
                    format!("`{w}` is not a tag"),
                    "tags start with `@`, like `@web`",
                ));
            };
            tags.push(tag.to_string());
        }
        out.push(TargetEntry {
            url: url.to_string(),
            tags,
        });
    }
    Ok(out)
}

/// Read a target list and keep the entries with tag `on` (`@web` or
/// `web`), or all of them.
pub fn load(path: &Path, on: Option<&str>) -> Result<Vec<String>, TargetsError> {
    let text = std::fs::read_to_string(path).map_err(|source| TargetsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let entries = parse(path, &text)?;
    let Some(tag) = on.map(|t| t.trim_start_matches('@')) else {
        return Ok(entries.into_iter().map(|e| e.url).collect());
    };
    let picked: Vec<String> = entries
        .iter()
        .filter(|e| e.tags.iter().any(|t| t == tag))
        .map(|e| e.url.clone())
        .collect();
    if picked.is_empty() {
        let mut known: Vec<String> = entries
            .iter()
            .flat_map(|e| e.tags.iter().map(|t| format!("@{t}")))
            .collect();
        known.sort();
        known.dedup();
        return Err(TargetsError::NoMatch {
            path: path.to_path_buf(),
            tag: format!("@{tag}"),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        });
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_tags_and_comments() {
        let text = "# fleet\nssh://d@web1 @web @eu\n\nssh://d@[2001:db8::7]:2222 @web # us\nssh://d@db1 @db\n";
        let e = parse(Path::new("t"), text).expect("parses");
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].url, "ssh://d@[2001:db8::7]:2222");
        assert_eq!(e[1].tags, vec!["web"]);
    }

    #[test]
    fn mistakes_name_line_and_column() {
        let e = parse(Path::new("t.txt"), "ssh://d@web1\n  http://x @web\n").expect_err("bad");
        let msg = e.to_string();
        assert!(msg.starts_with("t.txt:2:3:"), "{msg}");
        let e = parse(Path::new("t.txt"), "ssh://d@web1 web\n").expect_err("bad");
        assert!(
            e.to_string().contains("t.txt:1:14: `web` is not a tag"),
            "{e}"
        );
    }
}
