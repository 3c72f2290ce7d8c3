//! `punix store`: path, ls, verify, gc, hash.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::build::output;
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
    assert!(
        r.stderr
            .contains("-site-2024.1` changed after it was built"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("rejected"),
        "verify changes nothing: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("4 entries: 3 ok, 1 failed"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("hint: `punix store verify --repair`"),
        "{}",
        r.stderr
    );
    assert!(
        Path::new(site).join("built").exists(),
        "nothing was removed"
    );
}

#[test]
fn verify_repair_discards_damaged_entries_and_the_next_build_remakes_them() {
    let t = Test::new();
    let examples = repo().join("examples");
    let paths = build_examples(&t);
    let site = paths.iter().find(|p| p.ends_with("-site-2024.1")).unwrap();
    let f = format!("{site}/index.html");
    let good = fs::read(&f).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&f, "tampered").unwrap();
    let r = t.run(&["store", "verify", "--repair", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let name = Path::new(site).file_name().unwrap().to_str().unwrap();
    assert_eq!(v["repaired"], serde_json::json!([name]), "{}", r.stdout);
    assert_eq!(v["failed"].as_array().unwrap().len(), 1);
    assert!(!Path::new(site).exists(), "the damaged entry is gone");
    let r = t.run(&["store", "verify"]).success();
    assert!(
        r.stderr.contains("verified 3 entries: 3 ok, 0 failed"),
        "{}",
        r.stderr
    );
    let r = t
        .run(&["build", "--file", examples.to_str().unwrap()])
        .success();
    assert!(r.stderr.contains("built 1 package(s)"), "{}", r.stderr);
    assert_eq!(fs::read(&f).unwrap(), good);
    t.run(&["store", "verify"]).success();
}

#[test]
fn verify_of_a_path_in_another_store_names_both_roots() {
    let t = Test::new();
    let paths = build_examples(&t);
    let name = Path::new(&paths[0]).file_name().unwrap().to_str().unwrap();
    // By path inside this store: fine.
    let r = t.run(&["store", "verify", &paths[0]]).success();
    assert!(r.stderr.contains("verified 1 entry: 1 ok"), "{}", r.stderr);
    let other = t.path().join("other/root").join(name);
    let r = t
        .run(&["store", "verify", other.to_str().unwrap()])
        .failure(1);
    let other_root = t.path().join("other/root");
    assert!(
        r.stderr
            .contains(&format!("is under `{}`", other_root.display()))
            && r.stderr
                .contains(&format!("this store's root is `{}`", t.store().display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--store-root"), "{}", r.stderr);
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
    assert!(r.stderr.contains("deleted 1 entry ("), "{}", r.stderr);
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
    assert!(
        r.stderr
            .contains(&format!("`mkdir -p '{}'`", root.display())),
        "the path is quoted: {}",
        r.stderr
    );
}

#[test]
fn a_store_root_without_permission_suggests_sudo() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let locked = t.path().join("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o555)).unwrap();
    let root = locked.join("store");
    let pkgs = t.pkgs();
    let mut cmd = t.cmd_unprivileged();
    cmd.args([
        "build",
        "--store-root",
        root.to_str().unwrap(),
        "--file",
        pkgs.to_str().unwrap(),
    ]);
    let r = output(&mut cmd).failure(1);
    let q = format!("'{}'", root.display());
    assert!(
        r.stderr
            .contains(&format!("`sudo mkdir -p {q} && sudo chown \"$USER\" {q}`")),
        "{}",
        r.stderr
    );
}

#[test]
fn gc_stops_at_a_bad_generation_file_and_deletes_nothing() {
    let t = Test::new();
    build_examples(&t);
    let gen_dir = t.path().join("home/.punix/deployments/Web");
    fs::create_dir_all(&gen_dir).unwrap();
    let bad = gen_dir.join("gen-002.json");
    for text in ["{not json", r#"{"number": 2}"#, r#"{"store_paths": [1]}"#] {
        fs::write(&bad, text).unwrap();
        let r = t.run(&["store", "gc"]).failure(1);
        assert!(
            r.stderr.contains(&format!(
                "cannot read the generation file `{}`",
                bad.display()
            )),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("gc stopped and deleted nothing")
                && r.stderr.contains("hint: fix")
                && r.stderr.contains("or remove it"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("the entry"), "{}", r.stderr);
        let ls = t.run(&["store", "ls"]).success();
        assert_eq!(ls.stdout.lines().count(), 4, "nothing deleted");
    }
    fs::remove_file(&bad).unwrap();
    let r = t.run(&["store", "gc"]).success();
    assert!(r.stderr.contains("deleted 4 entries"), "{}", r.stderr);
}

#[test]
fn ls_long_prints_the_size() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"; printf 0123456789 > \"$out/f\"'\n",
    );
    t.build(&[]).success();
    let r = t.run(&["store", "ls", "-l"]).success();
    let line = r.stdout.lines().next().unwrap().to_string();
    // The output's 10 bytes plus derivation.json and built.
    let p = t.path_of("A");
    let size: u64 = ["f", "derivation.json", "built"]
        .iter()
        .map(|f| fs::metadata(p.join(f)).unwrap().len())
        .sum();
    assert!(line.ends_with(&format!("  {size} B")), "{line}");
    let r = t.run(&["store", "ls", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["size"], size);
}

#[test]
fn help_describes_every_json_flag_and_hash_needs_paths() {
    let t = Test::new();
    for cmd in [
        &["build"][..],
        &["store", "path"],
        &["store", "ls"],
        &["store", "verify"],
        &["store", "gc"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let r = t.run(&args).success();
        let line = r
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with("--json"))
            .unwrap_or_else(|| panic!("{cmd:?}: {}", r.stdout));
        assert!(
            line.trim_start().trim_start_matches("--json").trim().len() > 10,
            "{cmd:?}: `{line}`"
        );
    }
    let r = t.run(&["store", "hash", "--help"]).success();
    assert!(
        r.stdout.contains("Files or directory trees to hash"),
        "{}",
        r.stdout
    );
    let r = t.run(&["store", "hash"]).failure(2);
    assert!(r.stderr.contains("<PATH>"), "{}", r.stderr);
}

#[test]
fn home_is_needed_only_for_what_comes_from_it() {
    let t = Test::new();
    let store = t.path().join("s");
    let r = t
        .cmd()
        .env_remove("HOME")
        .env_remove("PUNIX_STORE_DIR")
        .args(["--store-root", store.to_str().unwrap(), "store", "ls"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
    // Without a store root the default needs HOME.
    let r = t
        .cmd()
        .env_remove("HOME")
        .env_remove("PUNIX_STORE_DIR")
        .args(["store", "ls"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("`HOME` is not set"), "{stderr}");
    // An explicit config file is still read without HOME.
    let cfg = t.path().join("cfg.toml");
    fs::write(&cfg, format!("store-root = \"{}\"\n", store.display())).unwrap();
    let r = t
        .cmd()
        .env_remove("HOME")
        .env_remove("PUNIX_STORE_DIR")
        .env("PUNIX_CONFIG", &cfg)
        .args(["store", "ls"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
}

#[test]
fn a_relative_root_in_the_config_file_is_refused() {
    let t = Test::new();
    let cfg = t.path().join("home/.config/punix");
    fs::create_dir_all(&cfg).unwrap();
    fs::write(
        cfg.join("config.toml"),
        "features = []\nstore-root = \"store\"\n",
    )
    .unwrap();
    let r = t
        .cmd()
        .env_remove("PUNIX_STORE_DIR")
        .args(["store", "ls"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("config.toml:2:14: `store-root` must be an absolute path, not `store`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint:") && stderr.contains("`~/.punix/store`"),
        "{stderr}"
    );
}

#[test]
fn builders_list_shows_the_registry_caches_and_whether_they_answer() {
    let t = Test::new();
    // A real (empty) cache made by an export of nothing but a built entry.
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    t.build(&[]).success();
    let cache = t.path().join("cache");
    let pkgs = t.pkgs();
    t.run(&[
        "store",
        "export",
        "--file",
        pkgs.to_str().unwrap(),
        "A",
        "--to",
        cache.to_str().unwrap(),
    ])
    .success();
    let reg = t.path().join("builders.toml");
    fs::write(
        &reg,
        format!(
            "[[cache]]\nurl = \"{}\"\n\n[[cache]]\nurl = \"{}\"\n",
            cache.display(),
            t.path().join("missing").display()
        ),
    )
    .unwrap();
    let r = t
        .run(&["builders", "list", "--builders", reg.to_str().unwrap()])
        .success();
    let line = |needle: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no line for {needle}:\n{}", r.stdout))
            .to_string()
    };
    assert!(
        line(cache.to_str().unwrap()).ends_with("ok"),
        "{}",
        r.stdout
    );
    assert!(
        line(t.path().join("missing").to_str().unwrap()).contains("is not a punix binary cache"),
        "{}",
        r.stdout
    );
}
