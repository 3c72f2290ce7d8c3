//! Snapshot tests of the messages for bad recipe files.
//!
//! Every `tests/fixtures/bad-recipes/NN-name.toml` (or `NN-name/`, a
//! directory of recipe files) holds one mistake; `NN-name.stderr` beside it
//! is exactly what `punix build --file <fixture> --dry-run` prints on
//! stderr, run from the crate root. Rewrite the expected files with
//! `PUNIX_BLESS=1 cargo test --test recipe_errors`, then read the diff.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: &str = "tests/fixtures/bad-recipes";
const SUMMARY_SUFFIX: &str = " problems in the recipe files";

/// The fixtures, relative to the crate root, sorted: `NN-*.toml` files and
/// `NN-*` directories.
fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for entry in fs::read_dir(root.join(FIXTURES)).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let is_dir = entry.file_type().unwrap().is_dir();
        if is_dir || name.ends_with(".toml") {
            out.push(Path::new(FIXTURES).join(name));
        }
    }
    out.sort();
    out
}

fn expected_path(fixture: &Path) -> PathBuf {
    let stem = fixture.file_stem().unwrap().to_string_lossy().into_owned();
    fixture.with_file_name(format!("{stem}.stderr"))
}

/// Run `punix build --file <fixture> --dry-run` with a private store and home.
fn run(fixture: &Path, home: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_punix"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LC_ALL", "C")
        .arg("--store-root")
        .arg(home.join("store"))
        .arg("build")
        .arg("--file")
        .arg(fixture)
        .arg("--dry-run")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The text of the recipe file a location names, if it is one of the
/// fixture's files.
fn located_file(fixture: &Path, file: &str) -> Option<String> {
    let p = Path::new(file);
    if p != fixture && p.parent() != Some(fixture) {
        return None;
    }
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).ok()
}

/// Check that every message has a `file:line:col:` location inside the
/// fixture and a `hint:` line. Returns the problems found.
fn check_shape(fixture: &Path, stderr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let lines: Vec<&str> = stderr.lines().collect();
    let mut messages = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("error: ") else {
            if !line.starts_with("  hint: ") {
                problems.push(format!(
                    "line {}: neither an error nor a hint: {line:?}",
                    i + 1
                ));
            }
            continue;
        };
        if i + 1 == lines.len()
            && i > 0
            && rest.ends_with(SUMMARY_SUFFIX)
            && rest[..rest.len() - SUMMARY_SUFFIX.len()]
                .parse::<usize>()
                .is_ok()
        {
            let n: usize = rest[..rest.len() - SUMMARY_SUFFIX.len()].parse().unwrap();
            if n != messages {
                problems.push(format!(
                    "summary says {n} problems, {messages} were printed"
                ));
            }
            continue;
        }
        messages += 1;
        // `file:line:col: message`; the file has no `:` in these fixtures.
        let mut parts = rest.splitn(4, ':');
        let (file, l, c, msg) = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(file), Some(l), Some(c), Some(msg)) = (file, l, c, msg) else {
            problems.push(format!("no `file:line:col:` location: {line:?}"));
            continue;
        };
        let (Ok(l), Ok(c)) = (l.parse::<usize>(), c.parse::<usize>()) else {
            problems.push(format!("no `file:line:col:` location: {line:?}"));
            continue;
        };
        if !msg.starts_with(' ') || msg.trim().is_empty() {
            problems.push(format!("no message after the location: {line:?}"));
        }
        match located_file(fixture, file) {
            None => problems.push(format!("location is not a file of the fixture: {line:?}")),
            Some(text) => {
                let text_lines: Vec<&str> = text.split('\n').collect();
                match text_lines.get(l.wrapping_sub(1)) {
                    Some(src_line) if c >= 1 && c <= src_line.chars().count() + 1 => {}
                    _ => problems.push(format!("{l}:{c} is outside the file: {line:?}")),
                }
            }
        }
        if !lines
            .get(i + 1)
            .is_some_and(|h| h.starts_with("  hint: ") && h.len() > "  hint: ".len())
        {
            problems.push(format!("no `hint:` line after {line:?}"));
        }
    }
    if messages == 0 {
        problems.push("no error message at all".into());
    }
    problems
}

#[test]
fn bad_recipes_give_the_expected_messages() {
    let bless = std::env::var_os("PUNIX_BLESS").is_some_and(|v| v == "1");
    let fixtures = fixtures();
    assert!(
        fixtures.len() >= 18,
        "expected at least 18 fixtures, found {}",
        fixtures.len()
    );
    let home = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for fixture in &fixtures {
        let (code, stdout, stderr) = run(fixture, home.path());
        let name = fixture.display();
        if code != Some(1) {
            failures.push(format!("{name}: exit code {code:?}, expected 1\n{stderr}"));
        }
        if !stdout.is_empty() {
            failures.push(format!("{name}: unexpected stdout: {stdout:?}"));
        }
        for p in check_shape(fixture, &stderr) {
            failures.push(format!("{name}: {p}\n{stderr}"));
        }
        let expected_file = Path::new(env!("CARGO_MANIFEST_DIR")).join(expected_path(fixture));
        if bless {
            fs::write(&expected_file, &stderr).unwrap();
            continue;
        }
        match fs::read_to_string(&expected_file) {
            Ok(expected) if expected == stderr => {}
            Ok(expected) => failures.push(format!(
                "{name}: stderr differs from {}\n--- expected\n{expected}--- actual\n{stderr}\
                 (re-bless with PUNIX_BLESS=1 after checking the new text)",
                expected_file.display()
            )),
            Err(e) => failures.push(format!(
                "{name}: cannot read {}: {e} (create it with PUNIX_BLESS=1)",
                expected_file.display()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_expected_output_has_a_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = fixtures();
    let wanted: Vec<PathBuf> = fixtures.iter().map(|f| expected_path(f)).collect();
    for entry in fs::read_dir(root.join(FIXTURES)).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".stderr") {
            let rel = Path::new(FIXTURES).join(&name);
            assert!(
                wanted.contains(&rel),
                "{} has no fixture beside it; remove it or add the fixture",
                rel.display()
            );
        }
    }
}

#[test]
fn fixture_names_are_unique_by_number() {
    let mut numbers: Vec<String> = fixtures()
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .split('-')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let n = numbers.len();
    numbers.dedup();
    assert_eq!(numbers.len(), n, "two fixtures share a number");
}
