//! The recipe loader never panics, whatever the text: arbitrary strings,
//! arbitrary bytes (made UTF-8 lossily), and valid recipes with random
//! TOML-significant characters inserted and deleted. When it rejects a
//! text, every diagnostic still has a sane location and a hint.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use punix::recipe::{RecipeError, SourceText, load_sources};

/// Two valid recipe files that use every key, with the directories their
/// `src` keys name, in a directory under Cargo's scratch directory for
/// integration tests.
struct Valid {
    dir: PathBuf,
    files: [(&'static str, &'static str); 2],
}

const MAIN: &str = r#"# The main recipes.
[package.Libfoo]
pname = "libfoo"
version = "1.2.3"
description = "a small library"
builder = "make"
src = "libfoo"
args = ["PREFIX=/", "install"]
env = { CFLAGS = "-O2", "QUOTED_KEY" = 'literal' }
systems = ["x86_64-linux", "aarch64-linux"]
features = ["big-parallel"]

[package.Api]
pname = "api"
version = "1.0"
deps = ["Libfoo", "Assets"]
src = "api"
script = '''
mkdir -p "$out/bin"
cc -O2 -o "$out/bin/api" main.c
'''

[package.Api.env]
LOG_LEVEL = "info"
"#;

const MORE: &str = r#"package.Assets = { pname = "assets", version = "0.1", builder = "copy", src = "assets" }

[package.Tool]
pname = "tool"
version = "2024.01.01"
deps = ["Api"]
script = "echo \"tool\" > $out"
systems = ["riscv64-linux"]
"#;

fn valid() -> &'static Valid {
    static VALID: OnceLock<Valid> = OnceLock::new();
    VALID.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("recipe_fuzz");
        for d in ["libfoo", "api", "assets"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
            std::fs::write(dir.join(d).join("file.txt"), d).unwrap();
        }
        Valid {
            dir,
            files: [("main.toml", MAIN), ("more.toml", MORE)],
        }
    })
}

/// Load texts as files of `dir`; check the result's invariants.
fn check(dir: &Path, texts: &[String]) -> Result<(), TestCaseError> {
    let sources: Vec<SourceText> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| SourceText::new(dir.join(format!("r{i}.toml")), t.clone()))
        .collect();
    match load_sources(&sources) {
        Ok(recipes) => {
            for (name, pkg) in &recipes.packages {
                prop_assert_eq!(name, &pkg.name);
                for d in &pkg.deps {
                    prop_assert!(recipes.packages.contains_key(d), "unknown dep {d}");
                }
            }
        }
        Err(RecipeError::Invalid(diags)) => {
            prop_assert!(!diags.is_empty());
            for d in &diags {
                let src = sources.iter().find(|s| s.path == d.file);
                prop_assert!(src.is_some(), "diagnostic names no input: {d}");
                let lines = src.unwrap().text.split('\n').count();
                prop_assert!(d.line >= 1 && d.line <= lines, "bad line: {d}");
                prop_assert!(d.col >= 1, "bad column: {d}");
                prop_assert!(!d.message.is_empty(), "empty message: {d:?}");
                prop_assert!(
                    d.hint.as_ref().is_some_and(|h| !h.is_empty()),
                    "no hint: {d}"
                );
            }
            // Rendering the whole report must not panic either.
            let _ = RecipeError::Invalid(diags).to_string();
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    }
    Ok(())
}

/// One edit of a text: insert a TOML-significant character or delete one.
#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, char),
    Delete(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let significant: Vec<char> = "[]=\".,{}\n'#\\ ab1-_".chars().collect();
    prop_oneof![
        (any::<usize>(), proptest::sample::select(significant))
            .prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Delete),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    // The recipes are ASCII and so are the inserted characters: every byte
    // offset is a character boundary.
    let mut t = text.to_string();
    for e in edits {
        match *e {
            Edit::Insert(i, c) => t.insert(i % (t.len() + 1), c),
            Edit::Delete(i) if !t.is_empty() => {
                t.remove(i % t.len());
            }
            Edit::Delete(_) => {}
        }
    }
    t
}

/// Strings made mostly of the characters TOML cares about.
fn tomlish() -> impl Strategy<Value = String> {
    "([\\[\\]=\"'.,{}#\\n ]|package|pname|version|deps|src|script|builder|[a-z0-9_-]){0,80}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(a in any::<String>(), b in tomlish()) {
        check(&valid().dir, &[a])?;
        check(&valid().dir, &[b])?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        check(&valid().dir, &[text])?;
    }

    #[test]
    fn mutated_recipes_never_panic(
        main_edits in proptest::collection::vec(edit(), 1..8),
        more_edits in proptest::collection::vec(edit(), 0..4),
    ) {
        let v = valid();
        let texts = [apply(v.files[0].1, &main_edits), apply(v.files[1].1, &more_edits)];
        check(&v.dir, &texts)?;
    }
}

#[test]
fn the_unmutated_recipes_are_valid() {
    let v = valid();
    let sources: Vec<SourceText> = v
        .files
        .iter()
        .map(|(name, text)| SourceText::new(v.dir.join(name), text.to_string()))
        .collect();
    let recipes = load_sources(&sources).unwrap();
    let names: Vec<&str> = recipes.packages.keys().map(String::as_str).collect();
    assert_eq!(names, ["Api", "Assets", "Libfoo", "Tool"]);
    assert_eq!(recipes.packages["Api"].env["LOG_LEVEL"], "info");
    assert_eq!(recipes.packages["Libfoo"].features, ["big-parallel"]);
}
