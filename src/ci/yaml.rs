//! A small, deterministic YAML writer for the workflows `punix ci matrix`
//! emits: block mappings and sequences, comments, and three kinds of
//! scalars. No serde, no reordering: what is built is what is written.
//!
//! - [`Scalar::Plain`] is for constants of this crate (`false`, `60`,
//!   `always()`, `Check out the repository`): written as is, so that
//!   booleans and numbers stay booleans and numbers; something that could
//!   not be read back as one plain scalar is quoted instead.
//! - [`Scalar::Quoted`] is for every interpolated value: single-quoted
//!   (`'it''s'`), or double-quoted with escapes when it holds a line break
//!   or a control character.
//! - [`Scalar::Block`] is a literal block scalar (`|`), for shell scripts:
//!   the lines are kept byte for byte.

use std::fmt::Write as _;

/// A YAML node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Scalar(Scalar),
    Map(Vec<Entry>),
    Seq(Vec<Node>),
}

/// A scalar and how it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    Plain(String),
    Quoted(String),
    Block(String),
}

/// One line (or group of lines) of a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `key: value`, with an optional comment after a scalar value.
    Pair {
        key: String,
        value: Node,
        comment: Option<String>,
    },
    /// `# text` on its own line(s), before the next entry.
    Comment(String),
    /// An empty line.
    Blank,
}

/// A constant of this crate: written as is (a boolean or a number stays
/// one).
pub fn plain(s: &str) -> Node {
    Node::Scalar(Scalar::Plain(s.to_string()))
}

/// An interpolated value: always quoted.
pub fn quoted(s: impl Into<String>) -> Node {
    Node::Scalar(Scalar::Quoted(s.into()))
}

/// A script: a literal block scalar.
pub fn block(s: impl Into<String>) -> Node {
    Node::Scalar(Scalar::Block(s.into()))
}

/// A mapping builder.
#[derive(Clone, Debug, Default)]
pub struct Map(Vec<Entry>);

impl Map {
    pub fn new() -> Map {
        Map(Vec::new())
    }

    pub fn pair(mut self, key: &str, value: Node) -> Map {
        self.0.push(Entry::Pair {
            key: key.to_string(),
            value,
            comment: None,
        });
        self
    }

    /// `key: value  # comment` (the comment only shows after a scalar).
    pub fn pair_commented(mut self, key: &str, value: Node, comment: &str) -> Map {
        self.0.push(Entry::Pair {
            key: key.to_string(),
            value,
            comment: Some(comment.to_string()),
        });
        self
    }

    pub fn comment(mut self, text: &str) -> Map {
        self.0.push(Entry::Comment(text.to_string()));
        self
    }

    pub fn blank(mut self) -> Map {
        self.0.push(Entry::Blank);
        self
    }

    pub fn node(self) -> Node {
        Node::Map(self.0)
    }
}

impl From<Map> for Node {
    fn from(m: Map) -> Node {
        m.node()
    }
}

/// Write a document whose top node is a mapping.
pub fn render(top: &Node) -> String {
    let mut out = String::new();
    match top {
        Node::Map(entries) => write_map(&mut out, entries, 0),
        Node::Seq(items) => write_seq(&mut out, items, 0),
        Node::Scalar(s) => {
            write_scalar(&mut out, s, 0);
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_comment(out: &mut String, text: &str, at: usize) {
    for line in text.lines() {
        indent(out, at);
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            let _ = writeln!(out, "# {line}");
        }
    }
}

fn write_map(out: &mut String, entries: &[Entry], at: usize) {
    for e in entries {
        write_entry(out, e, at, true);
    }
}

/// One entry of a mapping at column `at`; when `indent_first` is false the
/// caller already wrote the indentation (a `- ` of a sequence item).
fn write_entry(out: &mut String, e: &Entry, at: usize, indent_first: bool) {
    match e {
        Entry::Comment(text) => write_comment(out, text, at),
        Entry::Blank => out.push('\n'),
        Entry::Pair {
            key,
            value,
            comment,
        } => {
            if indent_first {
                indent(out, at);
            }
            out.push_str(&key_text(key));
            out.push(':');
            write_value(out, value, at, comment.as_deref());
        }
    }
}

/// The value after `key:` (which ends the line so far).
fn write_value(out: &mut String, value: &Node, at: usize, comment: Option<&str>) {
    let trailing = |out: &mut String| {
        if let Some(c) = comment {
            let _ = write!(out, " # {c}");
        }
        out.push('\n');
    };
    match value {
        Node::Scalar(Scalar::Block(text)) => {
            out.push(' ');
            write_block(out, text, at + 2, comment);
        }
        Node::Scalar(s) => {
            out.push(' ');
            write_scalar(out, s, at);
            trailing(out);
        }
        Node::Map(entries) if entries.is_empty() => {
            out.push_str(" {}");
            trailing(out);
        }
        Node::Seq(items) if items.is_empty() => {
            out.push_str(" []");
            trailing(out);
        }
        Node::Map(entries) => {
            trailing(out);
            write_map(out, entries, at + 2);
        }
        Node::Seq(items) => {
            trailing(out);
            write_seq(out, items, at + 2);
        }
    }
}

fn write_seq(out: &mut String, items: &[Node], at: usize) {
    for item in items {
        match item {
            Node::Map(entries) if !entries.is_empty() => {
                // Comments before the first pair go above the dash.
                let first_pair = entries
                    .iter()
                    .position(|e| matches!(e, Entry::Pair { .. }))
                    .unwrap_or(entries.len());
                for e in &entries[..first_pair] {
                    write_entry(out, e, at, true);
                }
                indent(out, at);
                out.push_str("- ");
                if let Some(first) = entries.get(first_pair) {
                    write_entry(out, first, at + 2, false);
                    for e in &entries[first_pair + 1..] {
                        write_entry(out, e, at + 2, true);
                    }
                } else {
                    out.push_str("{}\n");
                }
            }
            Node::Map(_) => {
                indent(out, at);
                out.push_str("- {}\n");
            }
            Node::Seq(inner) if inner.is_empty() => {
                indent(out, at);
                out.push_str("- []\n");
            }
            Node::Seq(inner) => {
                indent(out, at);
                out.push_str("-\n");
                write_seq(out, inner, at + 2);
            }
            Node::Scalar(Scalar::Block(text)) => {
                indent(out, at);
                out.push_str("- ");
                write_block(out, text, at + 2, None);
            }
            Node::Scalar(s) => {
                indent(out, at);
                out.push_str("- ");
                write_scalar(out, s, at);
                out.push('\n');
            }
        }
    }
}

/// `|` (with chomping and, when needed, an indentation indicator), then
/// the lines at column `at`.
fn write_block(out: &mut String, text: &str, at: usize, comment: Option<&str>) {
    let body = text.trim_end_matches('\n');
    let newlines = text.len() - body.len();
    let chomp = match newlines {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let needs_indicator = body.starts_with(' ') || body.starts_with('\n');
    out.push('|');
    if needs_indicator {
        out.push('2');
    }
    out.push_str(chomp);
    if let Some(c) = comment {
        let _ = write!(out, " # {c}");
    }
    out.push('\n');
    for line in body.split('\n') {
        if !line.is_empty() {
            indent(out, at);
            out.push_str(line);
        }
        out.push('\n');
    }
    for _ in 1..newlines {
        out.push('\n');
    }
}

fn write_scalar(out: &mut String, s: &Scalar, at: usize) {
    match s {
        Scalar::Plain(p) if verbatim_ok(p) => out.push_str(p),
        Scalar::Plain(p) | Scalar::Quoted(p) => out.push_str(&quote(p)),
        Scalar::Block(text) => write_block(out, text, at + 2, None),
    }
}

/// Can `s` be written as one plain scalar (whatever type a reader gives
/// it)? No leading indicator, no `: ` or ` #`, no line break, no
/// surrounding blanks.
fn verbatim_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    !"-?:,[]{}#&*!|>'\"%@`".contains(first)
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':')
        && s.trim() == s
        && !s.chars().any(|c| c.is_control())
}

/// A key: plain when it is a simple identifier, else quoted.
fn key_text(key: &str) -> String {
    if plain_safe(key) {
        key.to_string()
    } else {
        quote(key)
    }
}

/// Quote a string for YAML: single quotes, or double quotes with escapes
/// when it holds a line break or another control character (single-quoted
/// scalars fold line breaks and cannot hold control characters).
pub fn quote(s: &str) -> String {
    if s.chars().any(|c| c.is_control() || c == '\u{feff}') {
        let mut q = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                '\n' => q.push_str("\\n"),
                '\t' => q.push_str("\\t"),
                '\r' => q.push_str("\\r"),
                c if c.is_control() || c == '\u{feff}' => {
                    let _ = write!(q, "\\u{:04X}", c as u32);
                }
                c => q.push(c),
            }
        }
        q.push('"');
        q
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Words a YAML 1.1 reader would turn into booleans or nulls.
const SPECIAL: &[&str] = &[
    "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
];

/// Is `s` written as a plain scalar read back as the same string by YAML
/// 1.1 and 1.2 readers? Deliberately narrow: letters, digits and
/// `_ - . / @`, starting with a letter (so never a number), not a
/// boolean or null word. (`on` is a key of every workflow and is written
/// plain, as GitHub documents it; readers of keys keep it a string in
/// YAML 1.2.)
fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    // A leading digit may make a number (1.0, 0x10, 1e5, 1_000, 1:20).
    if !first.is_ascii_alphabetic() {
        return false;
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '@'))
    {
        return false;
    }
    s == "on" || !SPECIAL.contains(&s.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        assert_eq!(quote("${{ x }}"), "'${{ x }}'");
        assert_eq!(quote("\u{7}"), "\"\\u0007\"");
    }

    #[test]
    fn plain_only_when_safe() {
        for ok in [
            "ubuntu-24.04",
            "actions/checkout@v4",
            "bash",
            "on",
            "x86_64",
        ] {
            assert!(plain_safe(ok), "{ok}");
        }
        for bad in [
            "", "yes", "No", "true", "null", "1.0", "0x10", "1e5", "a b", "-x", "a:b", "#",
        ] {
            assert!(!plain_safe(bad), "{bad}");
        }
    }

    #[test]
    fn nested_document() {
        let doc = Map::new()
            .comment("top\n\nmore")
            .pair("name", quoted("x: y"))
            .pair("empty", Map::new().node())
            .blank()
            .pair(
                "steps",
                Node::Seq(vec![
                    Map::new()
                        .comment("first")
                        .pair_commented("uses", plain("a/b@v1"), "v1.0.0")
                        .pair("if", plain("always()"))
                        .pair("num", plain("60"))
                        .pair("bad", plain("-x: y"))
                        .pair("with", Map::new().pair("k", quoted("v")).node())
                        .node(),
                    Map::new().pair("run", block("echo 'a'\n\necho b\n")).node(),
                    quoted("yes"),
                ]),
            )
            .node();
        let text = render(&doc);
        assert_eq!(
            text,
            "# top\n#\n# more\nname: 'x: y'\nempty: {}\n\nsteps:\n  # first\n  - uses: a/b@v1 # v1.0.0\n    if: always()\n    num: 60\n    bad: '-x: y'\n    with:\n      k: 'v'\n  - run: |\n      echo 'a'\n\n      echo b\n  - 'yes'\n"
        );
    }

    #[test]
    fn block_chomping_and_indicator() {
        let t = render(&Map::new().pair("a", block("x")).node());
        assert_eq!(t, "a: |-\n  x\n");
        let t = render(&Map::new().pair("a", block(" x\n\n")).node());
        assert_eq!(t, "a: |2+\n   x\n\n");
    }
}
