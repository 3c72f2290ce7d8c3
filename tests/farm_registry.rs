//! The builder registry and `punix builders add|list|remove`, run as the
//! real binary against the real testbed hosts (`TB_DIR`): `h1` (amd64)
//! and `arm1` (aarch64 through qemu-user), an unknown host key, a closed
//! port. Registry-file tests need no testbed.
//!
//! Each test has its own HOME, registry file and store root
//! (`/srv/deploy/<id>/store` on the hosts, which `tbdeploy` owns), so the
//! tests run in parallel against one testbed.
#![allow(clippy::unwrap_used)]

#[path = "support/testbed.rs"]
mod testbed;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use punix::farm::{FarmError, Registry};
use testbed::{Host, Testbed, host_or_skip};

struct Ctx {
    dir: tempfile::TempDir,
    id: String,
}

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    #[track_caller]
    fn success(self) -> Run {
        assert!(
            self.out.status.success(),
            "punix failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn failure(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Ctx {
    fn new(test: &str) -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        let id = format!(
            "farm-{}-{}",
            test.replace('_', "-").chars().take(24).collect::<String>(),
            std::process::id()
        );
        Ctx { dir, id }
    }

    fn registry(&self) -> PathBuf {
        self.dir.path().join("builders.toml")
    }

    /// The store root, the same path here and on the hosts.
    fn store(&self) -> PathBuf {
        PathBuf::from(format!("/srv/deploy/{}/store", self.id))
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_punix"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("PUNIX_STORE_DIR", self.store())
            .current_dir(self.dir.path());
        c
    }

    fn run_with(&self, mut c: Command, args: &[&str]) -> Run {
        let out = c.args(args).output().unwrap();
        Run {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
        }
    }

    /// `punix builders ARGS... --builders REGISTRY`
    fn builders(&self, args: &[&str]) -> Run {
        let reg = self.registry();
        let mut all = vec!["builders"];
        all.extend_from_slice(args);
        all.extend(["--builders", reg.to_str().unwrap()]);
        self.run_with(self.cmd(), &all)
    }

    /// `punix builders add NAME URL` with the testbed's key and known_hosts.
    fn add(&self, tb: &Testbed, name: &str, url: &str, extra: &[&str]) -> Run {
        let mut args = vec![
            "add",
            name,
            url,
            "--key",
            tb.key.to_str().unwrap(),
            "--known-hosts",
            tb.known_hosts.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.builders(&args)
    }

    fn load(&self) -> Registry {
        Registry::load(&self.registry()).unwrap()
    }
}

impl Drop for Ctx {
    /// Best effort: remove this test's directory on every testbed host.
    fn drop(&mut self) {
        if let Ok(Some(tb)) = Testbed::from_env() {
            let dir = PathBuf::from(format!("/srv/deploy/{}", self.id));
            for h in &tb.hosts {
                let _ = fs::remove_dir_all(h.local_path(&dir));
            }
        }
    }
}

fn url(tb: &Testbed, h: &Host) -> String {
    h.url(&tb.user)
}

/// The row of `name` in a `builders list` table, split on blanks.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for `{name}` in:\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn add_list_remove_on_real_hosts() {
    let Some((tb, h1)) = host_or_skip("add_list_remove_on_real_hosts", "h1") else {
        return;
    };
    let arm1 = tb.host("arm1").expect("testbed host arm1").clone();
    let cx = Ctx::new("add-list-remove");

    let r = cx.add(&tb, "h1", &url(&tb, &h1), &[]).success();
    assert!(
        r.stdout.starts_with(&format!(
            "added builder `h1` ({}): x86_64-linux, 1 job",
            url(&tb, &h1)
        )),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("sh and rsync present"), "{}", r.stdout);
    let r = cx
        .add(
            &tb,
            "arm1",
            &url(&tb, &arm1),
            &[
                "--max-jobs",
                "2",
                "--speed-factor",
                "0.5",
                "--features",
                "big-parallel,kvm",
            ],
        )
        .success();
    assert!(
        r.stdout
            .contains("aarch64-linux, 2 jobs, speed factor 0.5, features: big-parallel, kvm"),
        "{}",
        r.stdout
    );

    // The probe created the store root on each host.
    assert!(h1.local_path(&cx.store()).is_dir());
    assert!(arm1.local_path(&cx.store()).is_dir());

    // The registry holds what was detected.
    let reg = cx.load();
    let names: Vec<&str> = reg.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["h1", "arm1"]);
    assert_eq!(reg.builders[0].systems[0].to_string(), "x86_64-linux");
    assert_eq!(reg.builders[1].systems[0].to_string(), "aarch64-linux");
    assert_eq!(reg.builders[1].max_jobs, 2);
    assert_eq!(reg.builders[1].speed_factor, 0.5);
    assert_eq!(reg.builders[1].features, ["big-parallel", "kvm"]);
    assert_eq!(
        reg.builders[0].known_hosts.as_deref(),
        Some(tb.known_hosts.as_path())
    );

    // The table, with live status.
    let r = cx.builders(&["list"]).success();
    let header = row(&r.stdout, "NAME");
    assert_eq!(
        header,
        [
            "NAME", "URL", "SYSTEMS", "JOBS", "SPEED", "FEATURES", "STATUS", "LATENCY", "LOAD",
            "FREE"
        ]
    );
    let h1_row = row(&r.stdout, "h1");
    assert_eq!(
        &h1_row[..7],
        [
            "h1",
            url(&tb, &h1).as_str(),
            "x86_64-linux",
            "1",
            "1",
            "-",
            "ok"
        ]
    );
    assert_eq!(h1_row[8], "ms", "{}", r.stdout);
    assert!(h1_row[9].parse::<f64>().is_ok(), "load: {}", r.stdout);
    let arm_row = row(&r.stdout, "arm1");
    assert_eq!(
        &arm_row[2..7],
        ["aarch64-linux", "2", "0.5", "big-parallel,kvm", "ok"]
    );

    // The same as JSON.
    let r = cx.builders(&["list", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["registry"], cx.registry().to_str().unwrap());
    let b = v["builders"].as_array().unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b[1]["name"], "arm1");
    assert_eq!(b[1]["systems"][0], "aarch64-linux");
    assert_eq!(b[1]["max_jobs"], 2);
    for (b, sys) in b.iter().zip(["x86_64-linux", "aarch64-linux"]) {
        let s = &b["status"];
        assert_eq!(s["reachable"], true, "{s}");
        assert_eq!(s["usable"], true, "{s}");
        assert_eq!(s["system"], sys);
        assert_eq!(s["has_rsync"], true);
        assert_eq!(s["store_writable"], true);
        assert!(s["latency_ms"].as_f64().unwrap() > 0.0);
        assert!(s["load"].as_f64().is_some());
        assert!(s["free_disk_bytes"].as_u64().unwrap() > 0);
        assert_eq!(s["error"], serde_json::Value::Null);
    }

    // Without probing: no status columns, `status: null`.
    let r = cx.builders(&["list", "--no-probe"]).success();
    assert_eq!(row(&r.stdout, "NAME").len(), 6, "{}", r.stdout);
    let r = cx.builders(&["list", "--no-probe", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["builders"][0]["status"], serde_json::Value::Null);

    // A second builder of the same name is refused before connecting.
    let r = cx.add(&tb, "h1", &url(&tb, &h1), &[]).failure(1);
    assert!(
        r.stderr.contains("a builder named `h1` is already in"),
        "{}",
        r.stderr
    );

    // Remove, and a typo gets a suggestion.
    let r = cx.builders(&["remove", "arm"]).failure(1);
    assert!(
        r.stderr.contains("no builder named `arm` in") && r.stderr.contains("did you mean `arm1`?"),
        "{}",
        r.stderr
    );
    let r = cx.builders(&["remove", "arm1"]).success();
    assert!(
        r.stdout.starts_with("removed builder `arm1`"),
        "{}",
        r.stdout
    );
    let names: Vec<String> = cx.load().builders.into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["h1"]);
}

#[test]
fn unknown_host_key_is_refused_and_nothing_recorded() {
    let Some((tb, h1)) = host_or_skip("unknown_host_key_is_refused", "h1") else {
        return;
    };
    let cx = Ctx::new("host-key");
    let empty = cx.dir.path().join("empty_known_hosts");
    fs::write(&empty, "").unwrap();
    let r = cx
        .builders(&[
            "add",
            "h1",
            &url(&tb, &h1),
            "--key",
            tb.key.to_str().unwrap(),
            "--known-hosts",
            empty.to_str().unwrap(),
        ])
        .failure(3);
    assert!(
        r.stderr.contains("error: builder `h1`: cannot connect to"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Host key verification failed"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "hint: `{}` has no key for `{}`",
            empty.display(),
            h1.addr
        )) && r.stderr.contains("ssh-keyscan -p 22"),
        "{}",
        r.stderr
    );
    assert!(
        !cx.registry().exists(),
        "a refused builder must not be recorded"
    );
}

#[test]
fn unreachable_host_is_refused_quickly_and_nothing_recorded() {
    let Some((tb, h1)) = host_or_skip("unreachable_host_is_refused", "h1") else {
        return;
    };
    let cx = Ctx::new("unreachable");
    // A registry that exists already must stay as it was.
    cx.builders(&["add", "other", "ssh://u@other.invalid", "--no-probe"])
        .success();
    let before = fs::read(cx.registry()).unwrap();
    let closed = format!("ssh://{}@{}:2", tb.user, h1.bracketed());
    let started = Instant::now();
    let r = cx
        .add(&tb, "dead", &closed, &["--connect-timeout", "2"])
        .failure(3);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        r.stderr.contains(&format!(
            "error: builder `dead`: cannot connect to `{closed}`"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("Connection refused"), "{}", r.stderr);
    assert!(
        r.stderr.contains("hint: nothing listens on port 2 of"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(cx.registry()).unwrap(), before);
}

#[test]
fn unsuitable_host_is_refused_and_nothing_recorded() {
    let Some((tb, h1)) = host_or_skip("unsuitable_host_is_refused", "h1") else {
        return;
    };
    let cx = Ctx::new("unsuitable");
    let reg = cx.registry();
    let key = tb.key.to_str().unwrap();
    let kh = tb.known_hosts.to_str().unwrap();
    let u = url(&tb, &h1);
    // A store root the login user cannot create.
    let mut c = cx.cmd();
    c.env("PUNIX_STORE_DIR", "/var/lib/punix-farm-test/store");
    let args = [
        "builders",
        "add",
        "h1",
        &u,
        "--key",
        key,
        "--known-hosts",
        kh,
        "--builders",
        reg.to_str().unwrap(),
    ];
    let r = cx.run_with(c, &args).failure(1);
    assert!(
        r.stderr.contains(&format!("error: `h1` ({u}) cannot be used as a builder:\n  - the store root `/var/lib/punix-farm-test/store` cannot be created or written by `{}`", tb.user)),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "sudo chown {} /var/lib/punix-farm-test/store",
            tb.user
        )),
        "{}",
        r.stderr
    );
    // Systems that are not what `uname` says.
    let r = cx
        .add(&tb, "h1", &u, &["--systems", "aarch64-linux"])
        .failure(1);
    assert!(
        r.stderr
            .contains("`uname` says it is `x86_64-linux`, but `--systems` lists `aarch64-linux`"),
        "{}",
        r.stderr
    );
    assert!(!reg.exists(), "a refused builder must not be recorded");
    // Extra systems are fine when they include the detected one.
    cx.add(&tb, "h1", &u, &["--systems", "i686-linux,x86_64-linux"])
        .success();
    let systems: Vec<String> = cx.load().builders[0]
        .systems
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(systems, ["i686-linux", "x86_64-linux"]);
}

#[test]
fn list_reports_each_builder_that_cannot_be_reached() {
    let Some((tb, h1)) = host_or_skip("list_reports_unreachable", "h1") else {
        return;
    };
    let h2 = tb.host("h2").expect("testbed host h2").clone();
    let cx = Ctx::new("list-down");
    let empty = cx.dir.path().join("empty_known_hosts");
    fs::write(&empty, "").unwrap();
    let closed = format!("ssh://{}@{}:2", tb.user, h1.bracketed());
    fs::write(
        cx.registry(),
        format!(
            r#"[[builder]]
name = "h1"
url = "{}"
key = "{key}"
known-hosts = "{kh}"
systems = ["x86_64-linux"]

[[builder]]
name = "closed"
url = "{closed}"
key = "{key}"
known-hosts = "{kh}"
systems = ["x86_64-linux"]

[[builder]]
name = "stranger"
url = "{}"
key = "{key}"
known-hosts = "{empty}"
systems = ["x86_64-linux"]

[[builder]]
name = "liar"
url = "{}"
key = "{key}"
known-hosts = "{kh}"
systems = ["aarch64-linux"]
"#,
            url(&tb, &h1),
            url(&tb, &h2),
            url(&tb, &h2),
            key = tb.key.display(),
            kh = tb.known_hosts.display(),
            empty = empty.display(),
        ),
    )
    .unwrap();
    let r = cx.builders(&["list", "--connect-timeout", "2"]).success();
    assert_eq!(row(&r.stdout, "h1")[6], "ok", "{}", r.stdout);
    assert_eq!(row(&r.stdout, "closed")[6], "unreachable", "{}", r.stdout);
    assert_eq!(
        &row(&r.stdout, "stranger")[6..8],
        ["host", "key"],
        "{}",
        r.stdout
    );
    assert_eq!(
        &row(&r.stdout, "liar")[6..8],
        ["wrong", "system"],
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("closed: cannot connect to") && r.stdout.contains("Connection refused"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("stranger: cannot connect to")
            && r.stdout.contains("Host key verification failed"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "liar: `uname` says `x86_64-linux`, which is not among its registered systems"
        ),
        "{}",
        r.stdout
    );

    let r = cx
        .builders(&["list", "--json", "--connect-timeout", "2"])
        .success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let b = v["builders"].as_array().unwrap();
    assert_eq!(b[0]["status"]["reachable"], true);
    assert_eq!(b[1]["status"]["reachable"], false);
    assert!(
        b[1]["status"]["error"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{}",
        b[1]
    );
    assert!(
        b[2]["status"]["error"]
            .as_str()
            .unwrap()
            .contains("Host key verification failed"),
        "{}",
        b[2]
    );
}

#[test]
fn no_probe_records_without_connecting() {
    let cx = Ctx::new("no-probe");
    let r = cx
        .builders(&[
            "add",
            "later",
            "ssh://builder@later.invalid:2222",
            "--no-probe",
        ])
        .success();
    assert!(
        r.stdout.contains("added builder `later` (ssh://builder@later.invalid:2222) without probing it: no systems"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("note: no systems recorded"),
        "{}",
        r.stdout
    );
    let r = cx
        .builders(&[
            "add",
            "arm",
            "ssh://builder@arm.invalid",
            "--no-probe",
            "--systems",
            "aarch64-linux,arm64-linux,armv7l-linux",
            "--max-jobs",
            "8",
            "--features",
            "big-parallel",
        ])
        .success();
    assert!(!r.stdout.contains("note:"), "{}", r.stdout);
    let reg = cx.load();
    assert_eq!(reg.builders.len(), 2);
    assert!(reg.builders[0].systems.is_empty());
    let systems: Vec<String> = reg.builders[1]
        .systems
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(systems, ["aarch64-linux", "armv7l-linux"]);
    assert_eq!(reg.builders[1].max_jobs, 8);

    // Mistakes on the command line.
    let r = cx
        .builders(&["add", "x", "builder@x", "--no-probe"])
        .failure(2);
    assert!(
        r.stderr.contains("`builder@x` is not an ssh URL"),
        "{}",
        r.stderr
    );
    let r = cx
        .builders(&[
            "add",
            "x",
            "ssh://b@x",
            "--no-probe",
            "--systems",
            "vax-linux",
        ])
        .failure(2);
    assert!(
        r.stderr.contains("unknown architecture `vax`"),
        "{}",
        r.stderr
    );
    let r = cx
        .builders(&["add", "-x", "ssh://b@x", "--no-probe"])
        .failure(2);
    assert!(!r.stderr.is_empty());
    let r = cx
        .builders(&["add", "a/b", "ssh://b@x", "--no-probe"])
        .failure(1);
    assert!(r.stderr.contains("bad builder name `a/b`"), "{}", r.stderr);
    let r = cx
        .builders(&["add", "x", "ssh://b@x", "--no-probe", "--max-jobs", "0"])
        .failure(2);
    assert!(r.stderr.contains("--max-jobs"), "{}", r.stderr);
    assert_eq!(
        cx.load().builders.len(),
        2,
        "nothing recorded by the failures"
    );
}

#[test]
fn registry_path_flag_then_env_then_home() {
    let cx = Ctx::new("path");
    let home_reg = cx.dir.path().join("home/.punix/builders.toml");
    let env_reg = cx.dir.path().join("env.toml");
    let add = |c: Command, name: &str| {
        cx.run_with(
            c,
            &["builders", "add", name, "ssh://b@h.invalid", "--no-probe"],
        )
        .success()
    };
    add(cx.cmd(), "in-home");
    let mut c = cx.cmd();
    c.env("PUNIX_BUILDERS", &env_reg);
    add(c, "in-env");
    let mut c = cx.cmd();
    c.env("PUNIX_BUILDERS", &env_reg);
    let flag_reg = cx.registry();
    c.args([
        "builders",
        "add",
        "in-flag",
        "ssh://b@h.invalid",
        "--no-probe",
    ])
    .args(["--builders", flag_reg.to_str().unwrap()]);
    let out = c.output().unwrap();
    assert!(out.status.success());
    let names = |p: &Path| -> Vec<String> {
        Registry::load(p)
            .unwrap()
            .builders
            .into_iter()
            .map(|b| b.name)
            .collect()
    };
    assert_eq!(names(&home_reg), ["in-home"]);
    assert_eq!(names(&env_reg), ["in-env"]);
    assert_eq!(names(&flag_reg), ["in-flag"]);
}

/// `builders list --no-probe` on a registry with `text`: the error lines.
fn list_errors(text: &str) -> String {
    let cx = Ctx::new("bad-file");
    fs::write(cx.registry(), text).unwrap();
    let r = cx.builders(&["list", "--no-probe"]).failure(1);
    r.stderr.replace(cx.registry().to_str().unwrap(), "REG")
}

#[test]
fn bad_registry_files_are_reported_with_locations() {
    // An unknown key, with a suggestion.
    assert_eq!(
        list_errors("[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\nmax_jobs = 2\n"),
        "error: REG:4:1: unknown key `max_jobs` in a `[[builder]]` table\n  hint: did you mean `max-jobs`?\n"
    );
    // Wrong types and a bad system, all at once.
    assert_eq!(
        list_errors(
            "[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\nsystems = [\"x86_64-linux\", \"mips9-linux\"]\nmax-jobs = \"4\"\nspeed-factor = -1\nfeatures = \"kvm\"\n"
        ),
        "error: REG:4:28: unknown architecture `mips9` (known: x86_64, aarch64, armv7l, i686, riscv64, powerpc64le, ...)\n  \
         hint: systems look like `x86_64-linux` or `aarch64-linux`; `punix builders add` detects them with `uname`\n\
         error: REG:5:12: `max-jobs` in builder #1 (line 1) must be a whole number, not a string\n  hint: write it as `max-jobs = 4`\n\
         error: REG:6:16: `speed-factor` in builder #1 (line 1) must be a number above 0\n  hint: write it as `speed-factor = 1.5` (1.0 is the default; higher is preferred)\n\
         error: REG:7:12: `features` in builder #1 (line 1) must be an array of strings, not a string\n  hint: write it as `features = [\"big-parallel\"]`\n\
         error: 4 problems in the builders registry\n"
    );
    // Duplicate names, a bad URL, a missing key.
    assert_eq!(
        list_errors(
            "[[builder]]\nname = \"a\"\nurl = \"ssh://u@h\"\n\n[[builder]]\nname = \"a\"\nurl = \"http://h\"\n\n[[builder]]\nurl = \"ssh://u@h\"\n"
        ),
        "error: REG:6:8: a builder named `a` is already defined on line 2\n  hint: builder names must be unique: rename one or remove it\n\
         error: REG:7:7: unsupported scheme `http://` in `http://h`: targets are reached over SSH, write `ssh://USER@HOST[:PORT]`\n  hint: a builder's URL is `ssh://USER@HOST[:PORT]`\n\
         error: REG:9:1: builder #3 (line 9) has no `name`\n  hint: add `name = \"arm-1\"`\n\
         error: 3 problems in the builders registry\n"
    );
    // A table where an array of tables belongs; an unknown top-level key.
    assert_eq!(
        list_errors("builders = 1\n[builder]\nname = \"a\"\n"),
        "error: REG:1:1: unknown key `builders` in the builders registry\n  hint: did you mean `builder`?\n\
         error: REG:2:2: `builder` must be an array of tables, not one table\n  hint: start each entry with a `[[builder]]` line\n\
         error: 2 problems in the builders registry\n"
    );
    // TOML syntax.
    assert_eq!(
        list_errors("[[builder]]\nname = \"a\nurl = \"ssh://u@h\"\n"),
        "error: REG:2:10: invalid TOML: invalid basic string, expected `\"`\n  hint: fix the TOML syntax (https://toml.io); each builder is a `[[builder]]` table\n"
    );
}

#[test]
fn registry_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("builders.toml");
    fs::write(
        &path,
        r#"# hand-written
[[builder]]
features = ["kvm", "big-parallel"]
url = "ssh://b@[fd00::1]:2222"
name = "arm-1"
systems = ["arm64-linux", "armv7l-linux"]
speed-factor = 3
max-jobs = 0x10
key = "keys/id"
known-hosts = "~/.ssh/farm_hosts"

[[builder]]
name = "x1"
url = "ssh://b@x1.example.org"

[[cache]]
url = "https://cache.example.org"
"#,
    )
    .unwrap();
    let first = Registry::load(&path).unwrap();
    assert_eq!(first.builders[0].systems[0].to_string(), "aarch64-linux");
    assert_eq!(first.builders[0].max_jobs, 16);
    assert_eq!(
        first.builders[0].key.as_deref(),
        Some(dir.path().join("keys/id").as_path())
    );
    assert_eq!(first.caches, ["https://cache.example.org"]);
    first.save().unwrap();
    let saved = fs::read_to_string(&path).unwrap();
    let second = Registry::load(&path).unwrap();
    assert_eq!(second, first);
    second.save().unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        saved,
        "saving is deterministic"
    );
    assert!(
        saved.contains("systems = [\"aarch64-linux\", \"armv7l-linux\"]"),
        "{saved}"
    );
    // No temporary file is left beside it.
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("builders.toml")]);

    // A missing file is an empty registry; an unknown name is an error.
    let mut empty = Registry::load(&dir.path().join("none.toml")).unwrap();
    assert!(empty.builders.is_empty());
    assert!(matches!(empty.remove("x"), Err(FarmError::Unknown { .. })));
}
