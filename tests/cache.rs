//! Binary caches through the real binary: `punix store export` of the
//! example stack's closure, `punix store import` from a directory, a
//! `file://` URL and a real HTTP server on loopback, and archives that are
//! corrupted, truncated or hostile.

#![allow(clippy::unwrap_used)]

#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Test, repo};
use punix::cache::format::EntryInfo;
use sha2::{Digest, Sha256};

const DEMO_MODULES: [&str; 3] = ["Hello", "Counter", "Site"];

fn examples() -> String {
    repo().join("examples").display().to_string()
}

/// A test whose store holds the example stack `Demo`'s closure.
fn built() -> Test {
    let t = Test::new();
    let mut args = vec!["build", "--file"];
    let ex = examples();
    args.push(&ex);
    args.extend(DEMO_MODULES);
    t.run(&args).success();
    t
}

fn cache_dir(t: &Test) -> PathBuf {
    t.path().join("cache")
}

fn export_demo(t: &Test) -> serde_json::Value {
    let ex = examples();
    let to = cache_dir(t).display().to_string();
    let r = t
        .run(&[
            "store", "export", "--file", &ex, "Demo", "--to", &to, "--json",
        ])
        .success();
    serde_json::from_str(&r.stdout).unwrap()
}

/// `punix store ls --json`: (path, content hash) of every entry.
fn listing(t: &Test) -> Vec<(String, String)> {
    let r = t.run(&["store", "ls", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["content_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Remove the store (its entries are read-only), as on a fresh machine
/// with the same store root.
fn wipe_store(t: &Test) {
    let store = t.store();
    if store.exists() {
        Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&store)
            .status()
            .unwrap();
        fs::remove_dir_all(&store).unwrap();
    }
}

/// Nothing under a final name without `built`, no temporaries left.
#[track_caller]
fn assert_store_clean(t: &Test) {
    for d in t.store_dirs() {
        assert!(!d.starts_with(".tmp"), "a temporary was left: {d}");
        if !d.starts_with('.') {
            assert!(
                t.store().join(&d).join("built").is_file(),
                "`{d}` is in the store without `built`"
            );
        }
    }
    t.run(&["store", "verify"]).success();
}

/// The entry name of a package of the examples.
fn name_of(t: &Test, module: &str) -> String {
    let ex = examples();
    let r = t.run(&["store", "path", "--file", &ex, module]).success();
    Path::new(r.stdout.trim())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn read_meta(t: &Test, name: &str) -> EntryInfo {
    let bytes = fs::read(cache_dir(t).join(format!("{name}.json"))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn export_then_import_into_a_fresh_store() {
    let t = built();
    let before = listing(&t);
    assert_eq!(before.len(), 4, "{before:?}");

    // No secret is needed to export: DEMO_API_TOKEN is not set here.
    let report = export_demo(&t);
    assert_eq!(report["exported"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(report["skipped"].as_array().unwrap().len(), 0);

    let cache = cache_dir(&t);
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.join("punix-cache.json")).unwrap()).unwrap();
    assert_eq!(info["format"], 1);
    assert_eq!(info["store_root"], t.store().display().to_string());
    let index = fs::read_to_string(cache.join("punix-index.txt")).unwrap();
    let hello = name_of(&t, "Hello");
    let libgreet = name_of(&t, "Libgreet");
    for (path, hash) in &before {
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        assert!(index.lines().any(|l| l == name), "{name} not in the index");
        let meta = read_meta(&t, name);
        assert_eq!(&meta.content_hash, hash);
        assert_eq!(meta.name, name);
        assert_eq!(meta.derivation.store_name(), name);
        let archive = fs::read(cache.join(&meta.archive)).unwrap();
        assert_eq!(archive.len() as u64, meta.archive_size);
        assert_eq!(hex::encode(Sha256::digest(&archive)), meta.archive_sha256);
    }
    assert_eq!(read_meta(&t, &hello).references, vec![libgreet.clone()]);
    // No temporaries left in the cache.
    for e in fs::read_dir(&cache).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp-"), "{n}");
    }

    // A second export skips every path and rewrites nothing.
    let archive = cache.join(format!("{hello}.tar.zst"));
    let mtime = fs::metadata(&archive).unwrap().modified().unwrap();
    let again = export_demo(&t);
    assert_eq!(again["exported"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["skipped"].as_array().unwrap().len(), 4, "{again}");
    assert_eq!(fs::metadata(&archive).unwrap().modified().unwrap(), mtime);

    // A fresh store under the same root: import everything.
    wipe_store(&t);
    let r = t
        .run(&["store", "import", cache.to_str().unwrap()])
        .success();
    assert!(r.stderr.contains("imported 4 entries"), "{}", r.stderr);
    assert_store_clean(&t);
    assert_eq!(listing(&t), before);

    // Importing again fetches nothing.
    let r = t
        .run(&["store", "import", cache.to_str().unwrap(), "--json"])
        .success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["fetched"].as_array().unwrap().len(), 0, "{v}");

    // One name and its closure, through a `file://` URL and a store path.
    wipe_store(&t);
    let url = format!("file://{}", cache.display());
    let hello_path = t.store().join(&hello).display().to_string();
    let r = t
        .run(&["store", "import", &url, &hello_path, "--json"])
        .success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["fetched"], serde_json::json!([libgreet, hello]), "{v}");
    assert_store_clean(&t);

    // Explicit store paths export their closure.
    let other = t.path().join("cache2");
    let r = t
        .run(&[
            "store",
            "export",
            "--to",
            other.to_str().unwrap(),
            &hello_path,
            "--json",
        ])
        .success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["exported"], serde_json::json!([libgreet, hello]), "{v}");

    // A store under another root cannot use this cache.
    let elsewhere = t.path().join("other-store");
    let r = t
        .run(&[
            "--store-root",
            elsewhere.to_str().unwrap(),
            "store",
            "import",
            cache.to_str().unwrap(),
        ])
        .failure(1);
    assert!(
        r.stderr.contains("holds entries for the store root") && r.stderr.contains("--store-root"),
        "{}",
        r.stderr
    );
}

#[test]
fn export_refuses_what_is_missing_or_damaged() {
    let t = Test::new();
    let ex = examples();
    let to = cache_dir(&t).display().to_string();
    let r = t
        .run(&[
            "store",
            "export",
            "--file",
            &ex,
            "Demo",
            "--system",
            "aarch64-linux",
            "--to",
            &to,
        ])
        .failure(1);
    for needle in [
        "not in the store for aarch64-linux",
        "Hello (`",
        "Libgreet (`",
        "punix build --file",
        "--system aarch64-linux Counter Hello Site",
    ] {
        assert!(r.stderr.contains(needle), "no `{needle}` in:\n{}", r.stderr);
    }
    assert!(!cache_dir(&t).join("punix-index.txt").exists());
    let r = t
        .run(&["store", "export", "--file", &ex, "Dmeo", "--to", &to])
        .failure(1);
    assert!(r.stderr.contains("did you mean `Demo`?"), "{}", r.stderr);
    let r = t
        .run(&[
            "store",
            "export",
            "--file",
            &ex,
            "Demo",
            "--to",
            "http://127.0.0.1:9/c",
        ])
        .failure(1);
    assert!(
        r.stderr.contains("cannot export to `http://127.0.0.1:9/c`"),
        "{}",
        r.stderr
    );

    // An entry changed after it was built is refused, and nothing of it
    // is left in the cache.
    t.run(&["build", "--file", &ex, "Site"]).success();
    let site = t.store().join(name_of(&t, "Site"));
    let file = fs::read_dir(&site)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file() && !p.ends_with("built") && !p.ends_with("derivation.json"))
        .unwrap();
    Command::new("chmod")
        .arg("u+w")
        .arg(&file)
        .status()
        .unwrap();
    fs::write(&file, "tampered\n").unwrap();
    let r = t
        .run(&["store", "export", "--file", &ex, "Site", "--to", &to])
        .failure(1);
    assert!(
        r.stderr.contains("changed after it was built") && r.stderr.contains("--repair"),
        "{}",
        r.stderr
    );
    let left: Vec<String> = fs::read_dir(cache_dir(&t))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("site"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `python3 -m http.server` serving a directory on a free loopback port,
/// stopped when dropped.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path) -> Option<HttpServer> {
        let have_python = Command::new("python3")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_python {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "python3 is needed for the HTTP cache test and CI=true"
            );
            eprintln!("note: no python3; the HTTP cache test is skipped");
            return None;
        }
        for _ in 0..5 {
            // A port the kernel just gave out and nobody holds now.
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1"])
                .arg(port.to_string())
                .arg("--directory")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(HttpServer { child, port });
                }
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("python3 -m http.server did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn import_over_http_from_a_real_server() {
    let t = built();
    let before = listing(&t);
    export_demo(&t);
    let Some(server) = HttpServer::start(&cache_dir(&t)) else {
        return;
    };
    wipe_store(&t);
    let hello = name_of(&t, "Hello");
    let libgreet = name_of(&t, "Libgreet");
    let r = t
        .run(&["store", "import", &server.url(), &hello, "--json"])
        .success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["fetched"], serde_json::json!([libgreet, hello]), "{v}");
    let r = t.run(&["store", "import", &server.url()]).success();
    assert!(r.stderr.contains("imported 2 entries"), "{}", r.stderr);
    assert!(r.stderr.contains("2 already in the store"), "{}", r.stderr);
    assert_store_clean(&t);
    assert_eq!(listing(&t), before);

    // An entry the cache does not have, and a cache that is not there.
    let missing = format!("{}-nothing-1.0", "0".repeat(32));
    let r = t
        .run(&["store", "import", &server.url(), &missing])
        .failure(1);
    assert!(r.stderr.contains("has no entry"), "{}", r.stderr);
    let port = server.port;
    drop(server);
    let r = t
        .run(&["store", "import", &format!("http://127.0.0.1:{port}/")])
        .failure(3);
    assert!(
        r.stderr
            .contains(&format!("http://127.0.0.1:{port}/punix-cache.json"))
            && r.stderr.contains("4 attempt(s)"),
        "{}",
        r.stderr
    );
}

/// Rewrite the metadata of `name` for a new archive (size, sha256,
/// unpacked size), as a hostile cache would, so that only the members
/// themselves are wrong.
fn plant_archive(t: &Test, name: &str, archive: &[u8], unpacked: u64) {
    let cache = cache_dir(t);
    fs::write(cache.join(format!("{name}.tar.zst")), archive).unwrap();
    let mut meta = read_meta(t, name);
    meta.archive_size = archive.len() as u64;
    meta.archive_sha256 = hex::encode(Sha256::digest(archive));
    meta.unpacked_size = unpacked;
    fs::write(
        cache.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
}

/// A tar header and the member's data.
type Member = (tar::Header, Vec<u8>);

/// A tar member with raw name and link fields (the tar crate refuses
/// `..` and absolute paths, as it should).
fn raw_member(kind: tar::EntryType, path: &str, link: Option<&str>, data: &[u8]) -> Member {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            old.linkname = [0; 100];
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_cksum();
    (h, data.to_vec())
}

/// A compressed tar of the entry's real `derivation.json` plus `members`.
fn hostile_archive(drv: &[u8], members: Vec<Member>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let (h, d) = raw_member(tar::EntryType::Regular, "derivation.json", None, drv);
    b.append(&h, d.as_slice()).unwrap();
    for (h, d) in members {
        b.append(&h, d.as_slice()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    zstd::stream::encode_all(tar.as_slice(), 3).unwrap()
}

#[test]
fn corrupt_truncated_and_hostile_archives_are_refused() {
    let t = built();
    export_demo(&t);
    let cache = cache_dir(&t);
    let cache_s = cache.display().to_string();
    let hello = name_of(&t, "Hello");
    let counter = name_of(&t, "Counter");
    let site = name_of(&t, "Site");
    let site_drv = fs::read(t.store().join(&site).join("derivation.json")).unwrap();
    wipe_store(&t);

    // One byte of Hello's archive flipped.
    let hello_archive = cache.join(format!("{hello}.tar.zst"));
    let good = fs::read(&hello_archive).unwrap();
    let mut bad = good.clone();
    let i = bad.len() / 2;
    bad[i] ^= 0x20;
    fs::write(&hello_archive, &bad).unwrap();
    let r = t.run(&["store", "import", &cache_s, &hello]).failure(1);
    assert!(
        r.stderr.contains(&format!("{hello}.tar.zst")) && r.stderr.contains("was not imported"),
        "{}",
        r.stderr
    );
    assert!(!t.store().join(&hello).exists());
    assert_store_clean(&t);
    fs::write(&hello_archive, &good).unwrap();

    // Counter's archive cut in half.
    let counter_archive = cache.join(format!("{counter}.tar.zst"));
    let full = fs::read(&counter_archive).unwrap();
    fs::write(&counter_archive, &full[..full.len() / 2]).unwrap();
    let r = t.run(&["store", "import", &cache_s, &counter]).failure(1);
    assert!(
        r.stderr.contains(&format!("{counter}.tar.zst"))
            && r.stderr.contains("corrupt or truncated"),
        "{}",
        r.stderr
    );
    assert!(!t.store().join(&counter).exists());
    assert_store_clean(&t);
    fs::write(&counter_archive, &full).unwrap();

    // Hostile members in Site's archive, with metadata that matches them.
    let escape = t.path().join("escaped");
    let abs = escape.join("abs").display().to_string();
    let cases: Vec<(&str, Vec<Member>, &str)> = vec![
        (
            "../../escaped/dotdot",
            vec![raw_member(
                tar::EntryType::Regular,
                "../../escaped/dotdot",
                None,
                b"x",
            )],
            "its path goes up with `..`",
        ),
        (
            &abs,
            vec![raw_member(tar::EntryType::Regular, &abs, None, b"x")],
            "it has an absolute path",
        ),
        (
            "up",
            vec![
                raw_member(tar::EntryType::Symlink, "up", Some("../../escaped"), b""),
                raw_member(tar::EntryType::Regular, "up/through-link", None, b"x"),
            ],
            "escapes the entry",
        ),
        (
            "etc",
            vec![raw_member(
                tar::EntryType::Symlink,
                "etc",
                Some("/etc"),
                b"",
            )],
            "escapes the entry",
        ),
        (
            "passwd",
            vec![raw_member(
                tar::EntryType::Link,
                "passwd",
                Some("/etc/passwd"),
                b"",
            )],
            "hard link to `/etc/passwd`",
        ),
        (
            "pipe",
            vec![raw_member(tar::EntryType::Fifo, "pipe", None, b"")],
            "it is a fifo",
        ),
    ];
    for (member, members, reason) in cases {
        let archive = hostile_archive(&site_drv, members);
        plant_archive(&t, &site, &archive, site_drv.len() as u64 + 1);
        let r = t.run(&["store", "import", &cache_s, &site]).failure(1);
        assert!(
            r.stderr.contains(&format!("{site}.tar.zst"))
                && r.stderr.contains(&format!("unsafe member `{member}`"))
                && r.stderr.contains(reason),
            "{member}: {}",
            r.stderr
        );
        assert!(!escape.exists(), "{member}: something escaped");
        assert!(!t.store().join(&site).exists());
        assert_store_clean(&t);
    }

    // Metadata that lies about the content hash: the tree is hashed again.
    let real = hostile_archive(
        &site_drv,
        vec![raw_member(
            tar::EntryType::Regular,
            "index.html",
            None,
            b"forged\n",
        )],
    );
    plant_archive(&t, &site, &real, site_drv.len() as u64 + 7);
    let r = t.run(&["store", "import", &cache_s, &site]).failure(1);
    assert!(
        r.stderr.contains("content hash mismatch") && r.stderr.contains(&site),
        "{}",
        r.stderr
    );
    assert!(!t.store().join(&site).exists());
    assert_store_clean(&t);

    // An archive whose sha256 differs from the metadata's.
    let mut meta = read_meta(&t, &site);
    meta.archive_sha256 = "0".repeat(64);
    let mut f = fs::File::create(cache.join(format!("{site}.json"))).unwrap();
    f.write_all(&serde_json::to_vec(&meta).unwrap()).unwrap();
    drop(f);
    let r = t.run(&["store", "import", &cache_s, &site]).failure(1);
    assert!(
        r.stderr.contains("does not match its metadata") && r.stderr.contains("sha256"),
        "{}",
        r.stderr
    );
    assert_store_clean(&t);

    // The good entries still import.
    let r = t
        .run(&["store", "import", &cache_s, &hello, &counter])
        .success();
    // (Libgreet came with the first try at Hello, before its archive
    // failed: a valid reference stays.)
    assert!(
        r.stderr.contains("imported 2 entries") && r.stderr.contains("1 already in the store"),
        "{}",
        r.stderr
    );
    assert_store_clean(&t);
}
