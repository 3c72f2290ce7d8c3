//! `punix store`: path, ls, verify, gc, hash.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::common::{Test, repo};

fn build_examples(t: &Test) -> Vec<String> {
    let examples = repo().join("examples");
    let r = t
        .run(&["build", "--file", examples.to_str().unwrap()])
        .success();
    r.stdout.lines().map(str::to_string).collect()
}

#[test]
fn store_path_matches_the_built_path() {
    let t = Test::new();
    let examples = repo().join("examples");
    let predicted = t
        .run(&[
            "store",
            "path",
            "--file",
            examples.to_str().unwrap(),
            "Hello",
        ])
        .success();
    let built = build_examples(&t);
    assert!(built.contains(&predicted.stdout.trim().to_string()));
}

#[test]
fn verify_finds_a_changed_file() {
    let t = Test::new();
    let paths = build_examples(&t);
    t.run(&["store", "verify"]).success();
    let site = paths.iter().find(|p| p.ends_with("-site-2024.1")).unwrap();
    let f = format!("{site}/index.html");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&f, "tampered").unwrap();
    let r = t.run(&["store", "verify"]).failure(1);
    assert!(r.stderr.contains("content hash mismatch"), "{}", r.stderr);
    assert!(r.stderr.contains("-site-2024.1"), "{}", r.stderr);
    assert!(
        r.stderr.contains("4 entries: 3 ok, 1 failed"),
        "{}",
        r.stderr
    );
}

#[test]
fn gc_keeps_roots_and_their_closure() {
    let t = Test::new();
    let examples = repo().join("examples");
    let paths = build_examples(&t);
    // An explicit root for Hello (and so Libgreet), a generation for Site.
    t.run(&[
        "build",
        "--file",
        examples.to_str().unwrap(),
        "--add-root",
        "Hello",
    ])
    .success();
    let site = paths.iter().find(|p| p.ends_with("-site-2024.1")).unwrap();
    let gen_dir = t.path().join("home/.punix/deployments/Web");
    fs::create_dir_all(&gen_dir).unwrap();
    fs::write(
        gen_dir.join("gen-001.json"),
        serde_json::json!({ "number": 1, "store_paths": [site] }).to_string(),
    )
    .unwrap();

    let dry = t.run(&["store", "gc", "--dry-run"]).success();
    assert!(dry.stdout.contains("would delete"), "{}", dry.stdout);
    assert_eq!(dry.stdout.lines().count(), 1, "{}", dry.stdout);
    assert!(dry.stdout.contains("-counter-0.3"), "{}", dry.stdout);

    let r = t.run(&["store", "gc"]).success();
    assert!(r.stderr.contains("deleted 1 entries"), "{}", r.stderr);
    let ls = t.run(&["store", "ls"]).success();
    let left: Vec<&str> = ls.stdout.lines().collect();
    assert_eq!(left.len(), 3, "{}", ls.stdout);
    for keep in ["-hello-1.0", "-libgreet-1.0", "-site-2024.1"] {
        assert!(left.iter().any(|l| l.ends_with(keep)), "{keep} kept");
    }
    assert!(!t.store_dirs().iter().any(|d| d.ends_with("-counter-0.3")));
    t.run(&["store", "verify"]).success();
}

#[test]
fn hash_of_a_tree_is_stable_and_content_sensitive() {
    let t = Test::new();
    let d = t.path().join("tree");
    fs::create_dir_all(d.join("sub")).unwrap();
    fs::write(d.join("sub/f"), "x").unwrap();
    let a = t.run(&["store", "hash", d.to_str().unwrap()]).success();
    let b = t.run(&["store", "hash", d.to_str().unwrap()]).success();
    assert_eq!(a.stdout, b.stdout);
    assert!(a.stdout.starts_with("sha256:"));
    fs::write(d.join("sub/f"), "y").unwrap();
    let c = t.run(&["store", "hash", d.to_str().unwrap()]).success();
    assert_ne!(a.stdout, c.stdout);
}

#[test]
fn an_unwritable_store_root_is_reported_with_a_fix() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let file = t.path().join("not-a-dir");
    fs::write(&file, "").unwrap();
    let root = file.join("store");
    let pkgs = t.pkgs();
    let r = t
        .run(&[
            "build",
            "--store-root",
            root.to_str().unwrap(),
            "--file",
            pkgs.to_str().unwrap(),
        ])
        .failure(1);
    assert!(
        r.stderr.contains("cannot create or write the store root"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--store-root"), "{}", r.stderr);
}
