//! Remote builds and routing against the testbed: `arm1` (aarch64,
//! busybox + dash through qemu-user), `h1` and `h2` (amd64), registered
//! as builders in a registry file of each test's own (`--builders`).
//!
//! Without `TB_DIR` these tests print a note and pass; under `CI=true`
//! they fail instead (see `support/testbed.rs`).

#[path = "support/testbed.rs"]
mod testbed;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use punix::farm::remote::{self, RemoteBuilder, Step};
use punix::store::Store;
use punix::store::content_hash::hash_tree;
use punix::transport::ssh::{SshOptions, SshTarget, SshTransport};
use punix::transport::{Transport, quote_path};

/// Tests that use `h1` or `h2` run one at a time: one of them kills every
/// session of the builder user on `h1`.
static AMD64: Mutex<()> = Mutex::new(());

fn amd64_lock() -> MutexGuard<'static, ()> {
    AMD64.lock().unwrap_or_else(|e| e.into_inner())
}

/// One builder entry of a registry file.
struct Entry {
    name: String,
    url: String,
    systems: &'static str,
    max_jobs: usize,
    speed: f64,
}

/// A test's own HOME, store root (under /tmp: the same path on the
/// builders), recipes and registry.
struct Farm {
    tb: testbed::Testbed,
    dir: tempfile::TempDir,
    /// Hosts whose copy of the store root to remove at the end.
    used: Mutex<Vec<testbed::Host>>,
}

impl Farm {
    fn new(test: &str) -> Option<Farm> {
        let (tb, _) = testbed::host_or_skip(test, "arm1")?;
        for h in ["h1", "h2"] {
            assert!(tb.host(h).is_some(), "the testbed lacks `{h}`");
        }
        let dir = tempfile::Builder::new()
            .prefix("punix-farm-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        fs::create_dir_all(dir.path().join("home")).expect("mkdir");
        fs::create_dir_all(dir.path().join("pkgs")).expect("mkdir");
        Some(Farm {
            tb,
            dir,
            used: Mutex::new(Vec::new()),
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn store_root(&self) -> PathBuf {
        self.path().join("store")
    }

    fn host(&self, name: &str) -> testbed::Host {
        let h = self.tb.host(name).expect("host").clone();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if !used.iter().any(|u| u.name == h.name) {
            used.push(h.clone());
        }
        h
    }

    fn entry(&self, host: &str, systems: &'static str) -> Entry {
        let h = self.host(host);
        Entry {
            name: host.to_string(),
            url: h.url(&self.tb.user),
            systems,
            max_jobs: 1,
            speed: 1.0,
        }
    }

    /// Write the registry `name` with `entries`; its path.
    fn registry(&self, name: &str, entries: &[Entry]) -> PathBuf {
        let mut s = String::new();
        for e in entries {
            s.push_str(&format!(
                "[[builder]]\nname = \"{}\"\nurl = \"{}\"\nkey = \"{}\"\nknown-hosts = \"{}\"\nsystems = [\"{}\"]\nmax-jobs = {}\nspeed-factor = {:.1}\n\n",
                e.name,
                e.url,
                self.tb.key.display(),
                self.tb.known_hosts.display(),
                e.systems,
                e.max_jobs,
                e.speed
            ));
        }
        let p = self.path().join(name);
        fs::write(&p, s).expect("write registry");
        p
    }

    fn recipe(&self, text: &str) {
        fs::write(self.path().join("pkgs/p.toml"), text).expect("write recipe");
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_punix"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path().join("home"))
            .arg("--store-root")
            .arg(self.store_root())
            .stdin(Stdio::null());
        c
    }

    /// `punix build --file pkgs ARGS...`.
    fn build(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.arg("build").arg("--file").arg(self.path().join("pkgs"));
        c.args(args);
        c.output().expect("run punix")
    }

    fn store(&self) -> Store {
        Store::new(self.store_root()).expect("store")
    }

    fn transport(&self, host: &testbed::Host) -> SshTransport {
        let target = SshTarget::parse(&host.url(&self.tb.user)).expect("url");
        SshTransport::connect(
            &target,
            &SshOptions {
                key: Some(self.tb.key.clone()),
                known_hosts: Some(self.tb.known_hosts.clone()),
                connect_timeout: Duration::from_secs(10),
                op_timeout: Duration::from_secs(60),
            },
        )
        .unwrap_or_else(|e| panic!("connect to {}: {e}", host.name))
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        // The builders' copies of this test's store.
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for h in used {
            let target = SshTarget::parse(&h.url(&self.tb.user)).expect("url");
            let opts = SshOptions {
                key: Some(self.tb.key.clone()),
                known_hosts: Some(self.tb.known_hosts.clone()),
                connect_timeout: Duration::from_secs(5),
                op_timeout: Duration::from_secs(30),
            };
            if let Ok(t) = SshTransport::connect(&target, &opts) {
                let d = quote_path(self.dir.path());
                let _ = t.run_script(
                    &format!("chmod -R u+w {d} 2>/dev/null; rm -rf {d}"),
                    Duration::from_secs(60),
                );
            }
        }
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(self.dir.path())
            .status();
    }
}

#[track_caller]
fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "punix failed ({:?})\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[track_caller]
fn fails(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The ELF architecture of a file.
fn elf_arch_of(path: &Path) -> Option<&'static str> {
    let bytes = fs::read(path).expect("read");
    punix::platform::elf_arch(&bytes[..bytes.len().min(64)])
}

const AARCH64_RECIPE: &str = r#"
[package.Machine]
pname = "machine"
version = "1.0"
script = '''
mkdir -p "$out/share" "$out/bin"
uname -m > "$out/share/machine"
echo "$system" > "$out/share/system"
printf '#!/bin/sh\necho %s\n' "$out" > "$out/bin/where"
chmod +x "$out/bin/where"
'''

[package.Busybox]
pname = "busybox-copy"
version = "1.0"
deps = ["Machine"]
script = '''
mkdir -p "$out/bin"
cp /bin/busybox "$out/bin/busybox"
cp "$input_Machine/share/machine" "$out/machine-of-input"
'''
"#;

#[test]
fn builds_for_aarch64_on_the_arm64_builder() {
    let Some(f) = Farm::new("builds_for_aarch64_on_the_arm64_builder") else {
        return;
    };
    f.recipe(AARCH64_RECIPE);
    let reg = f.registry(
        "builders.toml",
        &[
            f.entry("arm1", "aarch64-linux"),
            Entry {
                // Never contacted: it builds for another system.
                name: "x86".into(),
                url: "ssh://nobody@[fd00::dead]:22".into(),
                systems: "x86_64-linux",
                max_jobs: 1,
                speed: 1.0,
            },
        ],
    );
    let out = f.build(&[
        "--system",
        "aarch64-linux",
        "--builders",
        reg.to_str().expect("utf-8"),
        "--explain",
        "--json",
    ]);
    ok(&out);
    let v = json(&out);
    assert_eq!(v["system"], "aarch64-linux");
    assert_eq!(v["built"].as_array().map(Vec::len), Some(2), "{v}");
    for (_, machine) in v["built_on"].as_object().expect("built_on") {
        assert_eq!(machine, "arm1", "{v}");
    }
    // One connection to the builder that built, a few round trips each
    // build (probe, prepare, build, pull, clean up), never one per file.
    let traffic = v["builders"].as_array().expect("builders");
    assert_eq!(traffic.len(), 1, "only arm1 was reachable: {v}");
    assert_eq!(traffic[0]["builder"], "arm1", "{v}");
    assert_eq!(traffic[0]["connections"], 1, "{v}");
    let rt = traffic[0]["round_trips"].as_u64().expect("round trips");
    assert!(
        (4..=2 + 2 * 6).contains(&rt),
        "{rt} round trips for 2 builds: {v}"
    );
    let store = f.store();
    let machine = PathBuf::from(v["packages"]["Machine"].as_str().expect("path"));
    let busybox = PathBuf::from(v["packages"]["Busybox"].as_str().expect("path"));
    // Valid entries, made from aarch64-linux derivations, that pass
    // `punix store verify`.
    for p in [&machine, &busybox] {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        assert!(store.is_valid(&name), "{name}");
        assert_eq!(
            store.derivation(&name).expect("derivation").system,
            "aarch64-linux"
        );
        store.verify_entry(&name).expect("verify");
    }
    ok(&f.cmd().args(["store", "verify"]).output().expect("run"));
    assert_eq!(
        fs::read_to_string(machine.join("share/machine")).expect("read"),
        "aarch64\n"
    );
    assert_eq!(
        fs::read_to_string(machine.join("share/system")).expect("read"),
        "aarch64-linux\n"
    );
    // `$out` was the builder's temporary; it now names the final path.
    assert_eq!(
        fs::read_to_string(machine.join("bin/where")).expect("read"),
        format!("#!/bin/sh\necho {}\n", machine.display())
    );
    assert_eq!(
        fs::metadata(machine.join("bin/where"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o111,
        0o111
    );
    // The builder's own busybox: an aarch64 ELF.
    assert_eq!(elf_arch_of(&busybox.join("bin/busybox")), Some("aarch64"));
    assert_eq!(
        fs::read_to_string(busybox.join("machine-of-input")).expect("read"),
        "aarch64\n"
    );
    // The build logs came back.
    let log = store.log_path(&machine.file_name().expect("n").to_string_lossy());
    assert!(log.is_file(), "{}", log.display());
    // Nothing of the builds is left in the builder's store but entries.
    let arm1 = f.host("arm1");
    let t = f.transport(&arm1);
    let left = t
        .run_checked(
            "ls",
            &format!("ls -A {}", quote_path(&f.store_root())),
            Duration::from_secs(30),
        )
        .expect("ls")
        .stdout;
    assert!(
        left.lines().all(|l| !l.starts_with(".tmp")),
        "temporaries left on the builder:\n{left}"
    );
    // Explain (a human-readable run): the chosen builder and why the
    // others were not. Built already: a new derivation is needed.
    f.recipe(&AARCH64_RECIPE.replace("\"1.0\"", "\"1.1\""));
    let out = f.build(&[
        "--system",
        "aarch64-linux",
        "--builders",
        reg.to_str().expect("utf-8"),
        "--explain",
        "Machine",
    ]);
    let err = ok(&out);
    eprintln!("{err}");
    assert!(
        err.contains("Machine (machine-1.1, aarch64-linux): built on arm1 (ssh://"),
        "{err}"
    );
    assert!(err.contains("ranked first"), "{err}");
    assert!(
        err.contains("  - not local: wrong system: this machine is `x86_64-linux`"),
        "{err}"
    );
    assert!(
        err.contains("  - not x86: wrong system: it builds for `x86_64-linux`"),
        "{err}"
    );
}

#[test]
fn a_failed_remote_build_shows_its_log_and_names_the_builder() {
    let Some(f) = Farm::new("a_failed_remote_build_shows_its_log_and_names_the_builder") else {
        return;
    };
    f.recipe(
        r#"[package.Broken]
pname = "broken"
version = "1.0"
script = '''
echo "compiling on $(uname -m)"
echo "error: it broke" >&2
exit 3
'''
"#,
    );
    let reg = f.registry("builders.toml", &[f.entry("arm1", "aarch64-linux")]);
    let out = f.build(&[
        "--system",
        "aarch64-linux",
        "--builders",
        reg.to_str().expect("utf-8"),
    ]);
    let err = fails(&out, 3);
    assert!(
        err.contains("building package `Broken`")
            && err.contains("failed: the builder exited with status 3 on builder `arm1` (ssh://"),
        "{err}"
    );
    assert!(err.contains("compiling on aarch64"), "{err}");
    assert!(err.contains("error: it broke"), "{err}");
    assert!(err.contains("hint: the whole log is in"), "{err}");
}

#[test]
fn no_builder_for_the_system_is_an_explaining_error() {
    let Some(f) = Farm::new("no_builder_for_the_system_is_an_explaining_error") else {
        return;
    };
    f.recipe(AARCH64_RECIPE);
    let reg = f.registry("builders.toml", &[f.entry("h1", "x86_64-linux")]);
    let out = f.build(&[
        "--system",
        "aarch64-linux",
        "--builders",
        reg.to_str().expect("utf-8"),
    ]);
    let err = fails(&out, 1);
    eprintln!("{err}");
    assert!(
        err.contains("building for `aarch64-linux` needs a machine of that system, and this one is `x86_64-linux` (2 package(s): Machine, Busybox)"),
        "{err}"
    );
    assert!(
        err.contains("  - h1: wrong system: it builds for `x86_64-linux`"),
        "{err}"
    );
    assert!(err.contains("punix builders add"), "{err}");
    assert!(err.contains("punix ci matrix"), "{err}");
    assert!(
        err.contains("emulation (QEMU) is never used silently"),
        "{err}"
    );
    assert!(
        !f.store_root().join(".logs").exists()
            || fs::read_dir(f.store_root().join(".logs"))
                .expect("ls")
                .next()
                .is_none()
    );
    // And with no registry at all.
    let out = f.build(&["--system", "aarch64-linux"]);
    let err = fails(&out, 1);
    assert!(err.contains("no builders are registered (in `"), "{err}");
}

#[test]
fn target_url_builds_for_the_targets_system() {
    let Some(f) = Farm::new("target_url_builds_for_the_targets_system") else {
        return;
    };
    f.recipe(AARCH64_RECIPE);
    let reg = f.registry("builders.toml", &[f.entry("arm1", "aarch64-linux")]);
    let arm1 = f.host("arm1");
    let out = f.build(&[
        "--target",
        &arm1.url(&f.tb.user),
        "--key",
        f.tb.key.to_str().expect("utf-8"),
        "--known-hosts",
        f.tb.known_hosts.to_str().expect("utf-8"),
        "--builders",
        reg.to_str().expect("utf-8"),
        "--json",
        "Machine",
    ]);
    let err = ok(&out);
    assert!(err.contains("runs aarch64-linux"), "{err}");
    let v = json(&out);
    assert_eq!(v["system"], "aarch64-linux");
    let machine = PathBuf::from(v["packages"]["Machine"].as_str().expect("path"));
    assert_eq!(
        fs::read_to_string(machine.join("share/machine")).expect("read"),
        "aarch64\n"
    );
}

const DETERMINISTIC: &str = r#"
[package.Det]
pname = "det"
version = "1.0"
src = "src"
script = '''
mkdir -p "$out/bin" "$out/share/doc" "$out/empty"
cp -R "$src/." "$out/share/doc/"
printf '#!/bin/sh\nexec cat %s/share/doc/readme\n' "$out" > "$out/bin/show"
chmod 755 "$out/bin/show"
ln -s ../share/doc/readme "$out/bin/readme"
ln -s "$out/share" "$out/share-abs"
echo "$SOURCE_DATE_EPOCH $LC_ALL $TZ" > "$out/share/env"
'''
"#;

fn deterministic_sources(f: &Farm) {
    f.recipe(DETERMINISTIC);
    let src = f.path().join("pkgs/src");
    fs::create_dir_all(src.join("sub dir")).expect("mkdir");
    fs::write(src.join("readme"), "a deterministic package\n").expect("write");
    fs::write(src.join("sub dir/a.b"), "x\n").expect("write");
    fs::write(src.join("tool"), "#!/bin/sh\n").expect("write");
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("readme", src.join("link")).expect("ln");
}

#[test]
fn one_package_built_on_h1_and_on_h2_has_one_content_hash() {
    let Some(f) = Farm::new("one_package_built_on_h1_and_on_h2_has_one_content_hash") else {
        return;
    };
    let _amd64 = amd64_lock();
    deterministic_sources(&f);
    let mut hashes = Vec::new();
    for host in ["h1", "h2"] {
        let reg = f.registry(&format!("{host}.toml"), &[f.entry(host, "x86_64-linux")]);
        // `-j 0`: nothing is built on this machine.
        let out = f.build(&[
            "-j",
            "0",
            "--builders",
            reg.to_str().expect("utf-8"),
            "--json",
            "--explain",
        ]);
        ok(&out);
        let v = json(&out);
        let entry = PathBuf::from(v["packages"]["Det"].as_str().expect("path"));
        let name = entry.file_name().expect("n").to_string_lossy().into_owned();
        assert_eq!(v["built_on"][&name], host, "{v}");
        let store = f.store();
        hashes.push(store.built(&name).expect("built").content_hash);
        assert_eq!(
            fs::read_to_string(entry.join("bin/show")).expect("read"),
            format!("#!/bin/sh\nexec cat {}/share/doc/readme\n", entry.display())
        );
        assert_eq!(
            fs::read_link(entry.join("share-abs")).expect("link"),
            entry.join("share")
        );
        store.discard(&name).expect("discard");
    }
    assert_eq!(hashes[0], hashes[1], "h1 and h2 disagree");
    // A local build of the same derivation agrees too.
    let out = f.build(&["--json"]);
    ok(&out);
    let v = json(&out);
    let entry = PathBuf::from(v["packages"]["Det"].as_str().expect("path"));
    let name = entry.file_name().expect("n").to_string_lossy().into_owned();
    assert_eq!(v["built_on"][&name], "local");
    assert_eq!(
        f.store().built(&name).expect("built").content_hash,
        hashes[0]
    );
}

#[test]
fn an_unreachable_first_builder_fails_over_to_the_next() {
    let Some(f) = Farm::new("an_unreachable_first_builder_fails_over_to_the_next") else {
        return;
    };
    let _amd64 = amd64_lock();
    deterministic_sources(&f);
    let h1 = f.host("h1");
    let reg = f.registry(
        "builders.toml",
        &[
            Entry {
                // A closed port on a testbed address; ranked first.
                name: "down".into(),
                url: format!("ssh://{}@{}:1", f.tb.user, h1.bracketed()),
                systems: "x86_64-linux",
                max_jobs: 1,
                speed: 10.0,
            },
            f.entry("h2", "x86_64-linux"),
        ],
    );
    // And one whose host key is not in its known_hosts file.
    let empty = f.path().join("empty_known_hosts");
    fs::write(&empty, "").expect("write");
    let mut text = fs::read_to_string(&reg).expect("read");
    text.push_str(&format!(
        "[[builder]]\nname = \"stranger\"\nurl = \"{}\"\nknown-hosts = \"{}\"\nkey = \"{}\"\nsystems = [\"x86_64-linux\"]\nspeed-factor = 20.0\n",
        h1.url(&f.tb.user),
        empty.display(),
        f.tb.key.display()
    ));
    fs::write(&reg, text).expect("write");
    let out = f.build(&[
        "--builders-only",
        "--builders",
        reg.to_str().expect("utf-8"),
        "--explain",
    ]);
    let err = ok(&out);
    eprintln!("{err}");
    assert!(
        err.contains("Det (det-1.0, x86_64-linux): built on h2"),
        "{err}"
    );
    assert!(err.contains("  - not down: unreachable:"), "{err}");
    assert!(err.contains("nothing listens on port 1"), "{err}");
    assert!(
        err.contains("  - not stranger: host key: cannot connect to"),
        "{err}"
    );
    assert!(err.contains("  - not local: local builds are off"), "{err}");
}

/// The pids of the sshd processes that serve `user`'s connections on a
/// testbed host (found through the host's network namespace).
fn sshd_sessions(host: &testbed::Host, user: &str) -> Vec<u32> {
    let group = host.addr.split(':').nth(2).unwrap_or_default();
    let netns = format!("tb{group}-{}", host.name);
    let out = Command::new("ip")
        .args(["netns", "pids", &netns])
        .output()
        .expect("ip netns pids");
    assert!(out.status.success(), "no netns {netns}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with("sshd")
                && (cmd.contains(&format!("{user} [priv]")) || cmd.contains(&format!("{user}@")))
        })
        .collect()
}

#[test]
fn a_builder_killed_mid_build_fails_over_to_the_next() {
    fail_over_mid_build(
        "a_builder_killed_mid_build_fails_over_to_the_next",
        Cut::Kill,
    );
}

#[test]
fn a_builder_frozen_mid_build_fails_over_to_the_next() {
    fail_over_mid_build(
        "a_builder_frozen_mid_build_fails_over_to_the_next",
        Cut::Stop,
    );
}

/// How a test takes a builder away in the middle of a build.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// SIGKILL its sshd session processes: the connection drops at once.
    Kill,
    /// SIGSTOP every sshd of the host (listener and sessions): nothing
    /// answers, the connection must be given up by its keepalive.
    Stop,
}

/// Sends SIGCONT to stopped processes when dropped (also on a panic), so
/// a failed test never leaves a testbed host frozen.
struct Resume(Vec<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        for p in &self.0 {
            // SAFETY: kill only sends a signal, to a testbed sshd.
            unsafe {
                libc::kill(*p as i32, libc::SIGCONT);
            }
        }
    }
}

fn fail_over_mid_build(test: &str, cut: Cut) {
    let Some(f) = Farm::new(test) else {
        return;
    };
    let _amd64 = amd64_lock();
    let marker = format!(
        "/srv/deploy/punix-farm-started-{}",
        f.path().file_name().expect("n").to_string_lossy()
    );
    // On h1 it says it started, then sleeps; elsewhere it is quick.
    f.recipe(&format!(
        r#"[package.Slow]
pname = "slow"
version = "1.0"
script = '''
mkdir -p "$out"
if [ "$(uname -n)" = h1 ]; then : > {marker}; sleep 60; fi
echo done > "$out/result"
'''
"#
    ));
    let h1 = f.host("h1");
    let reg = f.registry(
        "builders.toml",
        &[
            Entry {
                speed: 10.0,
                ..f.entry("h1", "x86_64-linux")
            },
            f.entry("h2", "x86_64-linux"),
        ],
    );
    let child = f
        .cmd()
        .arg("build")
        .arg("--file")
        .arg(f.path().join("pkgs"))
        .args(["--builders-only", "--explain", "--builders"])
        .arg(&reg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = h1.local_path(Path::new(&marker));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the build never started on h1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (pids, signal) = match cut {
        Cut::Kill => (sshd_sessions(&h1, &f.tb.user), libc::SIGKILL),
        Cut::Stop => (sshd_processes(&h1), libc::SIGSTOP),
    };
    assert!(!pids.is_empty(), "no sshd on h1");
    let resume = Resume(if cut == Cut::Stop {
        pids.clone()
    } else {
        Vec::new()
    });
    for p in &pids {
        // SAFETY: kill only sends a signal, to a testbed sshd.
        unsafe {
            libc::kill(*p as i32, signal);
        }
    }
    let t0 = Instant::now();
    let out = child.wait_with_output().expect("wait");
    let took = t0.elapsed();
    drop(resume);
    let _ = fs::remove_file(&started);
    let err = ok(&out);
    eprintln!("after {took:?}:\n{err}");
    assert!(took < Duration::from_secs(40), "failover took {took:?}");
    assert!(
        err.contains("Slow (slow-1.0, x86_64-linux): built on h2"),
        "{err}"
    );
    assert!(err.contains("  - not h1: lost at the build step:"), "{err}");
    let store = f.store();
    let name = store
        .list()
        .expect("list")
        .into_iter()
        .next()
        .expect("built");
    assert_eq!(
        fs::read_to_string(store.entry_path(&name).join("result")).expect("read"),
        "done\n"
    );
}

/// The pids of every sshd process of a testbed host (listener and
/// sessions).
fn sshd_processes(host: &testbed::Host) -> Vec<u32> {
    let group = host.addr.split(':').nth(2).unwrap_or_default();
    let netns = format!("tb{group}-{}", host.name);
    let out = Command::new("ip")
        .args(["netns", "pids", &netns])
        .output()
        .expect("ip netns pids");
    assert!(out.status.success(), "no netns {netns}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).starts_with("sshd")
        })
        .collect()
}

/// A tree with every kind of node and names that sort trickily (as in the
/// unit test of the sh hash).
fn tricky_tree(root: &Path) {
    let w = |p: &str, b: &[u8], mode: u32| {
        let p = root.join(p);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, b).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    w("a/b", b"in a dir", 0o644);
    w("a.b", b"a file named a.b", 0o644);
    w("a-b/c", b"", 0o600);
    w("bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    w("bin/group-exec", b"x", 0o650);
    w("with space/and  two", b"spaces\n", 0o444);
    w("-dash", b"dash", 0o644);
    w("back\\slash", b"\\", 0o644);
    w("quote'\"$x`", b"quotes", 0o644);
    w("\u{e9}t\u{e9}/caf\u{e9}", "é".as_bytes(), 0o644);
    w("Z", b"upper", 0o644);
    w("deep/er/still/f", &vec![7u8; 300_000], 0o644);
    fs::create_dir_all(root.join("empty/dir")).expect("mkdir");
    fs::create_dir_all(root.join("a0")).expect("mkdir");
    symlink("bin/tool", root.join("link")).expect("ln");
    symlink("/nonexistent/target", root.join("a/dangling")).expect("ln");
    symlink("with space/and  two", root.join("a/spaced link")).expect("ln");
    symlink("trailing\n", root.join("nl-target")).expect("ln");
}

#[test]
fn the_sh_content_hash_agrees_with_hash_tree_on_busybox_and_gnu() {
    let Some(f) = Farm::new("the_sh_content_hash_agrees_with_hash_tree_on_busybox_and_gnu") else {
        return;
    };
    let _amd64 = amd64_lock();
    let local = f.path().join("local");
    fs::create_dir_all(local.join("tree")).expect("mkdir");
    tricky_tree(&local.join("tree"));
    let want = hash_tree(&local.join("tree")).expect("hash");
    for name in ["arm1", "h1"] {
        let host = f.host(name);
        let t = f.transport(&host);
        let dir = f.path().join("remote");
        t.push(&local, &["tree".to_string()], &dir)
            .unwrap_or_else(|e| panic!("push to {name}: {e}"));
        let script = remote::content_hash_script(&dir.join("tree"), &dir.join("scratch"));
        let out = t
            .run_checked("hash", &script, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.stdout.trim(), want, "{name}");
        let kind = t
            .run_checked(
                "sort",
                "readlink -f \"$(command -v sort)\"",
                Duration::from_secs(30),
            )
            .expect("which sort");
        eprintln!("{name}: sort is {}: hash agrees", kind.stdout.trim());
    }
}

#[test]
fn a_remote_build_of_a_trivial_package_takes_few_round_trips() {
    let Some(f) = Farm::new("a_remote_build_of_a_trivial_package_takes_few_round_trips") else {
        return;
    };
    let _amd64 = amd64_lock();
    f.recipe(
        "[package.Tiny]\npname = \"tiny\"\nversion = \"1.0\"\nscript = 'mkdir -p \"$out\"; echo hi > \"$out/hi\"'\n",
    );
    let recipes = punix::recipe::load(&f.path().join("pkgs")).expect("recipes");
    let store = f.store();
    store.ensure_writable().expect("store");
    let plan = punix::build::plan::plan(
        &recipes,
        store.root(),
        &punix::platform::System::host(),
        &[],
    )
    .expect("plan");
    let node = plan.nodes.values().next().expect("node").clone();
    let h1 = f.host("h1");
    let t = Arc::new(f.transport(&h1));
    // A bare round trip, for comparison (warm).
    t.run_checked("true", "true", Duration::from_secs(30))
        .expect("true");
    let t0 = Instant::now();
    for _ in 0..10 {
        t.run_checked("true", "true", Duration::from_secs(30))
            .expect("true");
    }
    let rtt = t0.elapsed() / 10;
    let before = t.counters().round_trips;
    let mut steps = Vec::new();
    let t0 = Instant::now();
    let rb = RemoteBuilder {
        name: "h1",
        url: "h1",
        transport: t.as_ref(),
        max_jobs: 1,
        build_timeout: Duration::from_secs(120),
    };
    let (outcome, report) = remote::build_on(&store, &node, &rb, &mut |s, d| steps.push((s, d)))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = t0.elapsed();
    assert!(matches!(outcome, punix::build::local::Outcome::Built(_)));
    let trips = t.counters().round_trips - before;
    // No inputs, no source: the transfers are the pull only.
    let transfers = 1;
    eprintln!(
        "remote build of a trivial package on h1: {trips} round trips ({} scripts + {transfers} transfer), {:.0} ms; `true`: {:.1} ms; steps: {steps:?}; pulled {} bytes",
        trips - transfers,
        took.as_secs_f64() * 1000.0,
        rtt.as_secs_f64() * 1000.0,
        report.bytes_pulled
    );
    assert!(trips - transfers <= 6, "{trips} round trips");
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![
            Step::Push,
            Step::Build,
            Step::Hash,
            Step::Pull,
            Step::Verify
        ]
    );
}

#[test]
fn builders_check_builds_on_each_builder_and_reports_every_step() {
    let Some(f) = Farm::new("builders_check_builds_on_each_builder_and_reports_every_step") else {
        return;
    };
    let _amd64 = amd64_lock();
    let empty = f.path().join("empty_known_hosts");
    fs::write(&empty, "").expect("write");
    let reg = f.registry(
        "builders.toml",
        &[
            f.entry("arm1", "aarch64-linux"),
            f.entry("h1", "x86_64-linux"),
        ],
    );
    let out = f
        .cmd()
        .args(["builders", "check", "--builders"])
        .arg(&reg)
        .output()
        .expect("run");
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    for step in [
        "connect", "probe", "push", "build", "hash", "pull", "verify",
    ] {
        assert_eq!(
            text.lines()
                .filter(|l| l.trim_start().starts_with(&format!("pass  {step}")))
                .count(),
            2,
            "{step}:\n{text}"
        );
    }
    assert!(text.contains("`uname -m` there says `aarch64`"), "{text}");
    assert!(text.contains("`uname -m` there says `x86_64`"), "{text}");
    // Nothing is left in the store but its bookkeeping.
    let store = f.store();
    assert!(store.list().expect("list").is_empty());
    // One builder by name, as JSON; then one whose host key is unknown and
    // one that is down.
    let out = f
        .cmd()
        .args(["builders", "check", "arm1", "--json", "--builders"])
        .arg(&reg)
        .output()
        .expect("run");
    ok(&out);
    let v = json(&out);
    assert_eq!(v["builders"][0]["name"], "arm1");
    assert_eq!(v["builders"][0]["passed"], true);
    assert_eq!(v["builders"][0]["steps"].as_array().map(Vec::len), Some(7));
    let h2 = f.host("h2");
    let mut text = fs::read_to_string(&reg).expect("read");
    text.push_str(&format!(
        "[[builder]]\nname = \"stranger\"\nurl = \"{}\"\nkey = \"{}\"\nknown-hosts = \"{}\"\nsystems = [\"x86_64-linux\"]\n\n[[builder]]\nname = \"down\"\nurl = \"ssh://{}@{}:1\"\nsystems = [\"x86_64-linux\"]\n",
        h2.url(&f.tb.user),
        f.tb.key.display(),
        empty.display(),
        f.tb.user,
        h2.bracketed()
    ));
    fs::write(&reg, text).expect("write");
    let out = f
        .cmd()
        .args(["builders", "check", "--builders"])
        .arg(&reg)
        .output()
        .expect("run");
    let err = fails(&out, 3);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{err}");
    assert!(
        err.contains(
            "2 of 4 builder(s) failed the check: `stranger` (at `connect`), `down` (at `connect`)"
        ),
        "{err}"
    );
    assert!(text.contains("Host key verification failed"), "{text}");
    assert!(text.contains("ssh-keyscan"), "{text}");
    assert!(text.contains("nothing listens on port 1"), "{text}");
    assert!(text.contains("  skip  build"), "{text}");
}

#[test]
fn stale_temporaries_on_a_builder_are_swept_by_the_next_build() {
    let Some(f) = Farm::new("stale_temporaries_on_a_builder_are_swept_by_the_next_build") else {
        return;
    };
    f.recipe(AARCH64_RECIPE);
    let arm1 = f.host("arm1");
    let t = f.transport(&arm1);
    let s = f.store_root();
    let q = quote_path(&s);
    // Left by lost builds: an old output whose shell is gone (pid 1 in
    // letters is `gggggggh`; pid 2^22+1 cannot exist), an old build
    // directory; kept: a fresh temporary of a dead process, an old one of
    // a live process, and anything that is not a temporary.
    let dead = "gggpoqjh"; // 4194305 in base 20 with g..z
    let script = format!(
        r#"set -e
mkdir -p {q}
cd {q}
mkdir .tmp{dead}mmmmmmmmmmmmmmmmmmmm-old-1.0 .tmp{dead}nnnnnnnnnnnnnnnnnnnn-fresh-1.0
touch -t 202001010000 .tmp{dead}mmmmmmmmmmmmmmmmmmmm-old-1.0
sleep 300 >/dev/null 2>&1 &
p=$!
A=ghijklmnopqrstuvwxyz; l=; i=0
while [ $i -lt 8 ]; do d=$((p % 20)); t=$A; while [ $d -gt 0 ]; do t=${{t#?}}; d=$((d - 1)); done; l=${{t%"${{t#?}}"}}$l; p=$((p / 20)); i=$((i + 1)); done
mkdir ".tmp${{l}}pppppppppppppppppppp-alive-1.0"
touch -t 202001010000 ".tmp${{l}}pppppppppppppppppppp-alive-1.0"
mkdir not-a-temporary
touch -t 202001010000 not-a-temporary
B=$(mktemp -d /tmp/punix-build-XXXXXXXX)
echo 4194305 > "$B/pid"
touch -t 202001010000 "$B"
echo "$B"
echo "$!"
"#
    );
    let out = t
        .run_checked("stage", &script, Duration::from_secs(60))
        .expect("stage");
    let mut lines = out.stdout.lines();
    let build_dir = lines.next().expect("build dir").to_string();
    let sleeper = lines.next().expect("pid").to_string();
    let reg = f.registry("builders.toml", &[f.entry("arm1", "aarch64-linux")]);
    ok(&f.build(&[
        "--system",
        "aarch64-linux",
        "--builders",
        reg.to_str().expect("utf-8"),
        "Machine",
    ]));
    let left = t
        .run_checked(
            "ls",
            &format!(
                "ls -A {q}; [ -e {b} ] && echo build-dir-kept; kill {sleeper}",
                b = quote_path(Path::new(&build_dir))
            ),
            Duration::from_secs(30),
        )
        .expect("ls")
        .stdout;
    eprintln!("left on arm1:\n{left}");
    assert!(!left.contains("-old-1.0"), "{left}");
    assert!(!left.contains("build-dir-kept"), "{left}");
    assert!(left.contains("-fresh-1.0"), "{left}");
    assert!(left.contains("-alive-1.0"), "{left}");
    assert!(left.contains("not-a-temporary"), "{left}");
}

#[test]
fn builder_slots_are_shared_by_concurrent_punix_processes() {
    let Some(f) = Farm::new("builder_slots_are_shared_by_concurrent_punix_processes") else {
        return;
    };
    let _amd64 = amd64_lock();
    let mut entry = f.entry("h1", "x86_64-linux");
    entry.max_jobs = 1;
    let reg = f.registry("builders.toml", &[entry]);
    let run = |pkgs: &str, tag: &str| {
        let dir = f.path().join(pkgs);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("p.toml"),
            format!(
                "[package.S]\npname = \"slow-{tag}\"\nversion = \"1.0\"\nscript = 'sleep 2; mkdir -p \"$out\"'\n"
            ),
        )
        .expect("write");
        f.cmd()
            .arg("build")
            .arg("--file")
            .arg(&dir)
            .args(["-j", "0", "--builders"])
            .arg(&reg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let t0 = Instant::now();
    let a = run("pkgs-a", "a");
    let b = run("pkgs-b", "b");
    ok(&a.wait_with_output().expect("wait"));
    ok(&b.wait_with_output().expect("wait"));
    let one_slot = t0.elapsed();
    assert!(
        one_slot >= Duration::from_secs(4),
        "two 2 s builds on one slot took {one_slot:?}"
    );
    // With two slots they overlap.
    let mut entry = f.entry("h1", "x86_64-linux");
    entry.max_jobs = 2;
    f.registry("builders.toml", &[entry]);
    let t0 = Instant::now();
    let a = run("pkgs-c", "c");
    let b = run("pkgs-d", "d");
    ok(&a.wait_with_output().expect("wait"));
    ok(&b.wait_with_output().expect("wait"));
    let two_slots = t0.elapsed();
    eprintln!("one slot: {one_slot:?}, two slots: {two_slots:?}");
    assert!(two_slots < one_slot, "{two_slots:?} vs {one_slot:?}");
    assert!(
        f.path().join("home/.punix/slots/h1/0.lock").exists(),
        "slot locks live in ~/.punix/slots"
    );
}

#[test]
fn a_builders_store_is_collected_by_store_gc_keeping_what_builds_used_lately() {
    let Some(f) = Farm::new("a_builders_store_is_collected_by_store_gc") else {
        return;
    };
    f.recipe(AARCH64_RECIPE);
    let arm1 = f.host("arm1");
    let reg = f.registry("builders.toml", &[f.entry("arm1", "aarch64-linux")]);
    let reg = reg.to_str().expect("utf-8");
    let build = || {
        ok(&f.build(&["--system", "aarch64-linux", "--builders", reg, "Busybox"]));
    };
    let gc = |extra: &[&str]| {
        let mut c = f.cmd();
        c.args(["store", "gc", "--target", &arm1.url(&f.tb.user)])
            .arg("--key")
            .arg(&f.tb.key)
            .arg("--known-hosts")
            .arg(&f.tb.known_hosts)
            .args(["--deployments-root", "/srv/deploy/no-deployments-here"])
            .args(extra);
        stdout_of(&c.output().expect("run punix"))
    };
    let t = f.transport(&arm1);
    let q = quote_path(&f.store_root());
    // Every entry on arm1 last used long ago.
    let age = || {
        t.run_checked(
            "age",
            &format!("for b in {q}/*/built; do touch -t 202001010000 \"$b\"; done"),
            Duration::from_secs(30),
        )
        .expect("age the markers");
    };
    let on_arm1 = || {
        t.run_checked("ls", &format!("ls -A {q}"), Duration::from_secs(30))
            .expect("ls")
            .stdout
    };
    // Busybox needs Machine: both built on arm1, Machine pushed there as
    // Busybox's input.
    build();
    assert!(on_arm1().contains("-machine-1.0"));
    age();
    // Another Busybox: Machine is on arm1 already; the build marks it.
    f.recipe(&AARCH64_RECIPE.replace("cp /bin/busybox", "cp -p /bin/busybox"));
    build();
    // Nothing is pinned on a builder, but a build used Machine just now.
    let out = gc(&[]);
    assert!(
        out.contains("-machine-1.0 (not pinned, but a deploy or a build used it"),
        "{out}"
    );
    assert!(!out.contains("deleted"), "{out}");
    // An hour and more later, gc takes it.
    age();
    let out = gc(&["--dry-run"]);
    assert!(
        out.contains("would delete") && out.contains("-machine-1.0"),
        "{out}"
    );
    assert!(
        on_arm1().contains("-machine-1.0"),
        "a dry run deletes nothing"
    );
    // `builders gc` does the same with the registry's URL and key.
    let out = stdout_of(
        &f.cmd()
            .args(["builders", "gc", "arm1", "--builders", reg])
            .output()
            .expect("run punix"),
    );
    assert!(
        out.contains("deleted") && out.contains("-machine-1.0 on arm1"),
        "{out}"
    );
    assert!(!on_arm1().contains("-machine-1.0"));
    // The next build that needs it pushes it again.
    f.recipe(&AARCH64_RECIPE.replace("cp /bin/busybox", "cp -pL /bin/busybox"));
    build();
    assert!(on_arm1().contains("-machine-1.0"));
}

/// Standard output of a run that must succeed.
#[track_caller]
fn stdout_of(out: &Output) -> String {
    ok(out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
