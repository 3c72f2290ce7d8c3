//! The behaviour every transport must have, run against each of them:
//! a [`LocalTransport`] in a temp dir (with both lock methods), and an
//! [`SshTransport`] to the testbed hosts `h1` (amd64) and `arm1` (aarch64,
//! busybox + dash through qemu-user, no `flock`) as the non-root user.
//!
//! Without `TB_DIR` the SSH variants print a note and pass; under
//! `CI=true` they fail instead (see `support/testbed.rs`).

#[path = "support/testbed.rs"]
mod testbed;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use punix::transport::local::LocalTransport;
use punix::transport::ssh::{SshOptions, SshTarget, SshTransport};
use punix::transport::{LockMethod, Transport, TransportError, quote, quote_path};

const T: Duration = Duration::from_secs(60);

/// Which implementation a test runs against.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Local,
    LocalMkdirLock,
    Ssh(&'static str),
}

impl Kind {
    fn env_name(self) -> String {
        match self {
            Kind::Local => "local".into(),
            Kind::LocalMkdirLock => "local-mkdir".into(),
            Kind::Ssh(h) => h.into(),
        }
    }

    fn from_env_name(s: &str) -> Kind {
        match s {
            "local" => Kind::Local,
            "local-mkdir" => Kind::LocalMkdirLock,
            "h1" => Kind::Ssh("h1"),
            "arm1" => Kind::Ssh("arm1"),
            other => panic!("unknown transport kind {other}"),
        }
    }
}

/// One transport and a fresh directory on its target.
struct Fixture {
    kind: Kind,
    t: Arc<dyn Transport>,
    /// A fresh directory on the target, as scripts must name it (rebased).
    dir: PathBuf,
    /// For the local kinds: the transport root.
    root: Option<tempfile::TempDir>,
    /// For the SSH kinds: where to open another connection.
    ssh: Option<(testbed::Testbed, testbed::Host)>,
}

fn unique(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{test}-{}-{:x}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn ssh_options(tb: &testbed::Testbed) -> SshOptions {
    SshOptions {
        key: Some(tb.key.clone()),
        known_hosts: Some(tb.known_hosts.clone()),
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(60),
    }
}

fn connect(tb: &testbed::Testbed, host: &testbed::Host) -> SshTransport {
    let target = SshTarget::parse(&host.url(&tb.user)).expect("testbed url");
    SshTransport::connect(&target, &ssh_options(tb))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", host.name))
}

fn fixture(kind: Kind, test: &str) -> Option<Fixture> {
    let target_dir = PathBuf::from("/srv/deploy").join(unique(test));
    match kind {
        Kind::Local | Kind::LocalMkdirLock => {
            let root = tempfile::tempdir().expect("tempdir");
            let method = match kind {
                Kind::LocalMkdirLock => LockMethod::Mkdir,
                _ => LockMethod::Auto,
            };
            let t = LocalTransport::new(root.path().to_path_buf()).with_lock_method(method);
            let dir = t.rebase(&target_dir);
            Some(Fixture {
                kind,
                t: Arc::new(t),
                dir,
                root: Some(root),
                ssh: None,
            })
        }
        Kind::Ssh(name) => {
            let (tb, host) = testbed::host_or_skip(test, name)?;
            let t = connect(&tb, &host);
            let dir = t.rebase(&target_dir);
            Some(Fixture {
                kind,
                t: Arc::new(t),
                dir,
                root: None,
                ssh: Some((tb, host)),
            })
        }
    }
}

impl Fixture {
    fn sh(&self, script: &str) -> punix::transport::Output {
        self.t
            .run_script(script, T)
            .unwrap_or_else(|e| panic!("{}: {e}\nscript:\n{script}", self.t.name()))
    }

    /// Run `script`, insist on exit 0, return stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert_eq!(
            out.status,
            0,
            "{}: script failed\n{script}\nstdout:\n{}\nstderr:\n{}",
            self.t.name(),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Another connection to the same target (SSH kinds only).
    fn other(&self) -> Option<SshTransport> {
        self.ssh.as_ref().map(|(tb, host)| connect(tb, host))
    }

    /// [`ok`](Self::ok) over another connection to the same target (the
    /// same transport for the local kinds).
    fn other_ok(&self, script: &str) -> String {
        let Some(t) = self.other() else {
            return self.ok(script);
        };
        let out = t
            .run_script(script, T)
            .unwrap_or_else(|e| panic!("{}: {e}\nscript:\n{script}", t.name()));
        assert_eq!(out.status, 0, "{script}: {out:?}");
        out.stdout
    }

    fn q(&self, p: &Path) -> String {
        quote_path(p)
    }

    fn is_root(&self) -> bool {
        self.ok("id -u").trim() == "0"
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let d = quote_path(&self.dir);
        let _ = self.t.run_script(
            &format!("chmod -R u+w {d} 2>/dev/null; rm -rf {d}"),
            Duration::from_secs(60),
        );
        drop(self.root.take());
    }
}

/// One `#[test]` per case and implementation.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod local {
            $( #[test] fn $case() {
                if let Some(f) = super::fixture(super::Kind::Local, stringify!($case)) { super::$case(&f) }
            } )*
        }
        mod local_mkdir_lock {
            $( #[test] fn $case() {
                if let Some(f) = super::fixture(super::Kind::LocalMkdirLock, stringify!($case)) { super::$case(&f) }
            } )*
        }
        mod h1 {
            $( #[test] fn $case() {
                if let Some(f) = super::fixture(super::Kind::Ssh("h1"), stringify!($case)) { super::$case(&f) }
            } )*
        }
        mod arm1 {
            $( #[test] fn $case() {
                if let Some(f) = super::fixture(super::Kind::Ssh("arm1"), stringify!($case)) { super::$case(&f) }
            } )*
        }
    };
}

suite!(
    runs_scripts,
    quotes_hostile_values,
    times_out_and_kills_the_script,
    pushes_entries_then_renames_them_into_place,
    pulls_a_tree_back,
    lock_excludes_then_frees,
    lock_freed_when_holder_killed,
    lock_freed_when_punix_killed,
    measures_round_trips,
    lock_and_run_runs_only_under_the_lock,
);

fn runs_scripts(f: &Fixture) {
    let out = f.sh("echo out; echo err >&2; exit 3");
    assert_eq!(
        (out.status, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    let out = f.sh("");
    assert_eq!((out.status, out.stdout.as_str()), (0, ""));
    // 127 is an exit status like any other (the mux client treats it
    // specially).
    let out = f.sh("punix-no-such-command-xyz");
    assert_eq!(out.status, 127, "{out:?}");
    assert!(out.stderr.contains("not found"), "{out:?}");
    // A script far bigger than a pipe buffer arrives whole.
    let payload = "x".repeat(1 << 20);
    let out = f.sh(&format!("cat <<'EOF' | wc -c\n{payload}\nEOF\n"));
    assert_eq!(out.stdout.trim(), format!("{}", payload.len() + 1));
    // Output bigger than a pipe buffer on both streams.
    let out = f.ok("i=0; while [ $i -lt 2000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; echo e-$i >&2; i=$((i+1)); done");
    assert_eq!(out.lines().count(), 2000);
    // Runs under a POSIX sh: `$(( ))`, functions, `set -e`.
    assert_eq!(f.ok("set -eu\nf() { echo $(( $1 * 2 )); }\nf 21"), "42\n");
}

const HOSTILE: &[&str] = &[
    "plain",
    "with space",
    "  leading and trailing  ",
    "it's",
    "\"double\"",
    "$HOME",
    "$(touch pwned)",
    "`touch pwned`",
    "a;b|c&d>e<f",
    "new\nline",
    "tab\there",
    "back\\slash\\",
    "*",
    "-n",
    "--",
    "ünïcödé ✓",
    "'",
    "''",
    "!bang",
    "#hash",
    "~tilde",
];

fn quotes_hostile_values(f: &Fixture) {
    // As printf arguments.
    let mut script = String::new();
    for v in HOSTILE {
        script.push_str(&format!("printf '%s\\0' {}\n", quote(v)));
    }
    let out = f.ok(&script);
    let got: Vec<&str> = out.split('\0').filter(|s| !s.is_empty()).collect();
    assert_eq!(got, HOSTILE.to_vec());
    // As variable values, file names and file contents.
    let d = f.dir.join("hostile");
    let mut script = format!("set -e\nmkdir -p {0}\ncd {0}\n", f.q(&d));
    for (i, v) in HOSTILE.iter().enumerate() {
        script.push_str(&format!(
            "v={q}\nprintf '%s' \"$v\" > {q}\nprintf '%s' \"$v\" > value-{i}\n",
            q = quote(&format!("name-{v}"))
        ));
    }
    script.push_str("for f in name-*; do printf '%s\\0' \"$f\"; done\n");
    let out = f.ok(&script);
    let mut got: Vec<String> = out
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let mut want: Vec<String> = HOSTILE.iter().map(|v| format!("name-{v}")).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for (i, v) in HOSTILE.iter().enumerate() {
        let content = f.ok(&format!("cat {}", f.q(&d.join(format!("value-{i}")))));
        assert_eq!(content, format!("name-{v}"));
    }
    // Nothing was executed by accident.
    let out = f.ok(&format!("ls -a {} | grep -c '^pwned$' || true", f.q(&d)));
    assert_eq!(out.trim(), "0");
}

fn times_out_and_kills_the_script(f: &Fixture) {
    let d = f.dir.join("timeout");
    f.ok(&format!("mkdir -p {}", f.q(&d)));
    let start = Instant::now();
    let r = f.t.run_script(
        &format!(
            "cd {} || exit 1; sleep 60 & echo $! > pid; wait; echo never",
            f.q(&d)
        ),
        Duration::from_secs(2),
    );
    let took = start.elapsed();
    match r {
        Err(TransportError::Timeout { target, secs, .. }) => {
            assert_eq!(target, f.t.name());
            assert_eq!(secs, 2);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let msg = format!(
        "{}",
        TransportError::Timeout {
            target: f.t.name(),
            what: "sh -s".into(),
            secs: 2
        }
    );
    assert!(msg.contains(&f.t.name()));
    // The script's process group is gone: its background `sleep` too.
    let check = format!(
        "p=$(cat {}); if kill -0 \"$p\" 2>/dev/null; then echo alive; else echo gone; fi",
        f.q(&d.join("pid"))
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let s = f.ok(&check);
        if s.trim() == "gone" {
            break;
        }
        assert!(Instant::now() < until, "the timed-out script still runs");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The transport still works.
    assert_eq!(f.ok("echo still here"), "still here\n");
}

/// A local store with entries like the real store makes them: read-only
/// directories (0555), read-only and executable files, symlinks.
fn make_store() -> (tempfile::TempDir, Vec<String>) {
    let s = tempfile::tempdir().expect("tempdir");
    let root = s.path();
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, PermissionsExt::from_mode(m)).expect("chmod")
    };
    let write = |p: &Path, b: &str, m: u32| {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b).expect("write");
        mode(p, m);
    };
    let a = root.join("0a1b2c3d-app-1.0");
    write(&a.join("bin/app"), "#!/bin/sh\necho app says hi\n", 0o555);
    write(&a.join("share/data file.txt"), "data\n", 0o444);
    write(&a.join("derivation.json"), "{}\n", 0o444);
    write(&a.join("built"), "{}\n", 0o444);
    symlink("share", a.join("lib")).expect("symlink");
    symlink("app", a.join("bin/app-link")).expect("symlink");
    symlink("/nonexistent/punix/target", a.join("dangling")).expect("symlink");
    let b = root.join("4e5f6a7b-lib-2.0");
    write(&b.join("nested/deep/dir/f"), &"y".repeat(100_000), 0o644);
    std::fs::create_dir_all(b.join("empty")).expect("mkdir");
    write(&b.join("built"), "{}\n", 0o444);
    let c = root.join("8c9d0e1f-plain-0.1");
    write(&c.join("readme"), "plain\n", 0o644);
    write(&c.join("built"), "{}\n", 0o444);
    for d in [
        a.join("bin"),
        a.join("share"),
        a.clone(),
        b.join("nested/deep/dir"),
        b.join("nested/deep"),
        b.join("nested"),
        b.join("empty"),
        b.clone(),
    ] {
        mode(&d, 0o555);
    }
    mode(&c, 0o755);
    let names = ["0a1b2c3d-app-1.0", "4e5f6a7b-lib-2.0", "8c9d0e1f-plain-0.1"]
        .map(String::from)
        .to_vec();
    (s, names)
}

/// `ls -ld`-style mode strings, symlink targets and contents of a pushed
/// tree, in one portable listing (busybox and GNU alike).
fn describe(f: &Fixture, dir: &Path) -> String {
    let script = format!(
        r#"cd {} || exit 1
for p in 0a1b2c3d-app-1.0 0a1b2c3d-app-1.0/bin 0a1b2c3d-app-1.0/bin/app 0a1b2c3d-app-1.0/share \
         "0a1b2c3d-app-1.0/share/data file.txt" 0a1b2c3d-app-1.0/lib 0a1b2c3d-app-1.0/bin/app-link \
         0a1b2c3d-app-1.0/dangling 4e5f6a7b-lib-2.0 4e5f6a7b-lib-2.0/nested/deep/dir \
         4e5f6a7b-lib-2.0/nested/deep/dir/f 4e5f6a7b-lib-2.0/empty 8c9d0e1f-plain-0.1 \
         8c9d0e1f-plain-0.1/readme; do
  m=$(ls -ld "$p" | cut -c1-10)
  if [ -L "$p" ]; then echo "$m $p -> $(readlink "$p")"; else echo "$m $p"; fi
done
cat "0a1b2c3d-app-1.0/share/data file.txt"
wc -c < 4e5f6a7b-lib-2.0/nested/deep/dir/f | tr -d ' '
./0a1b2c3d-app-1.0/bin/app-link
"#,
        f.q(dir)
    );
    f.ok(&script)
}

const PUSHED: &str = "dr-xr-xr-x 0a1b2c3d-app-1.0
dr-xr-xr-x 0a1b2c3d-app-1.0/bin
-r-xr-xr-x 0a1b2c3d-app-1.0/bin/app
dr-xr-xr-x 0a1b2c3d-app-1.0/share
-r--r--r-- 0a1b2c3d-app-1.0/share/data file.txt
lrwxrwxrwx 0a1b2c3d-app-1.0/lib -> share
lrwxrwxrwx 0a1b2c3d-app-1.0/bin/app-link -> app
lrwxrwxrwx 0a1b2c3d-app-1.0/dangling -> /nonexistent/punix/target
dr-xr-xr-x 4e5f6a7b-lib-2.0
dr-xr-xr-x 4e5f6a7b-lib-2.0/nested/deep/dir
-rw-r--r-- 4e5f6a7b-lib-2.0/nested/deep/dir/f
dr-xr-xr-x 4e5f6a7b-lib-2.0/empty
drwxr-xr-x 8c9d0e1f-plain-0.1
-rw-r--r-- 8c9d0e1f-plain-0.1/readme
data
100000
app says hi
";

fn pushes_entries_then_renames_them_into_place(f: &Fixture) {
    let (store, names) = make_store();
    // The target directory does not exist yet, nor its parent.
    let incoming = f.dir.join("incoming/push one");
    let stats =
        f.t.push(store.path(), &names, &incoming)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.bytes_sent > 100_000, "{stats:?}");
    // rsync -a keeps modes, exec bits and symlinks; as a non-root user it
    // writes into a 0555 directory by making it writable while it fills
    // it, then sets 0555 at the end.
    assert_eq!(describe(f, &incoming), PUSHED);

    // Renaming a directory to another parent rewrites its `..`, which
    // needs write permission on the directory itself: a non-root user
    // cannot move a 0555 entry out of the push directory as it is.
    let store_dir = f.dir.join("store");
    f.ok(&format!("mkdir -p {}", f.q(&store_dir)));
    let root = f.is_root();
    let naive = f.sh(&format!(
        "mv {} {}",
        f.q(&incoming.join(&names[0])),
        f.q(&store_dir.join(&names[0]))
    ));
    if root {
        assert_eq!(naive.status, 0, "{naive:?}");
        f.ok(&format!(
            "mv {} {}",
            f.q(&store_dir.join(&names[0])),
            f.q(&incoming.join(&names[0]))
        ));
    } else {
        assert_ne!(
            naive.status, 0,
            "a non-root rename of a 0555 dir to another parent"
        );
        assert!(naive.stderr.contains("ermission denied"), "{naive:?}");
    }
    // What works: make the top directory writable for the rename, then
    // put its mode back.
    let mut script = String::from("set -e\n");
    for n in &names {
        let src = f.q(&incoming.join(n));
        let dst = f.q(&store_dir.join(n));
        script.push_str(&format!(
            "if [ -w {src} ]; then mv {src} {dst}; else chmod u+w {src}; mv {src} {dst}; chmod u-w {dst}; fi\n"
        ));
    }
    f.ok(&script);
    assert_eq!(describe(f, &store_dir), PUSHED);

    // The same names again, into a fresh directory.
    let again = f.dir.join("incoming/push2");
    let stats =
        f.t.push(store.path(), &names, &again)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.bytes_sent > 100_000, "{stats:?}");
    assert_eq!(describe(f, &again), PUSHED);
    // And once more into the same one: nothing to send but the file list.
    let stats =
        f.t.push(store.path(), &names, &again)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stats.bytes_sent > 0 && stats.bytes_sent < 10_000,
        "{stats:?}"
    );
    assert_eq!(describe(f, &again), PUSHED);
    // No names: a no-op that still succeeds.
    f.t.push(store.path(), &[], &f.dir.join("incoming/none"))
        .unwrap_or_else(|e| panic!("{e}"));
    // A bad name is refused before anything runs.
    let bad = f.t.push(store.path(), &["../etc".to_string()], &again);
    assert!(matches!(bad, Err(TransportError::Other(_))), "{bad:?}");
}

/// Every node under `root` as `path mode [-> target | size:sha]`, sorted:
/// what a pull must bring back exactly.
fn local_listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
        let meta = std::fs::symlink_metadata(p).expect("stat");
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let t = std::fs::read_link(p).expect("readlink");
            out.push(format!("{rel} link -> {}", t.display()));
        } else if meta.is_dir() {
            out.push(format!("{rel} dir {mode:o}"));
            for e in std::fs::read_dir(p).expect("ls") {
                walk(root, &e.expect("entry").path(), out);
            }
        } else {
            let bytes = std::fs::read(p).expect("read");
            out.push(format!("{rel} file {mode:o} {}", bytes.len()));
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn pulls_a_tree_back(f: &Fixture) {
    let (store, names) = make_store();
    let remote = f.dir.join("pull-src");
    f.t.push(store.path(), &names, &remote)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = f.t.counters().round_trips;
    let local = tempfile::tempdir().expect("tempdir");
    // Into a directory that does not exist yet (its parent does).
    for name in &names {
        let dst = local.path().join(format!("back-{name}"));
        let stats =
            f.t.pull(&remote.join(name), &dst)
                .unwrap_or_else(|e| panic!("pull {name}: {e}"));
        assert_eq!(
            local_listing(&dst),
            local_listing(&store.path().join(name)),
            "{name}"
        );
        if name.contains("lib") {
            assert!(stats.bytes_received > 100_000, "{stats:?}");
        }
        // Owned by this process's user, whoever owns it there.
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert_eq!(std::fs::metadata(&dst).expect("stat").uid(), me);
    }
    // One round trip each.
    assert_eq!(f.t.counters().round_trips - before, names.len() as u64);
    // A missing tree is an error that names the target.
    let e =
        f.t.pull(&remote.join("no-such-entry"), &local.path().join("x"))
            .expect_err("missing remote dir");
    let msg = e.to_string();
    assert!(matches!(e, TransportError::Rsync { .. }), "{e:?}");
    assert!(
        msg.contains(&format!("rsync from `{}` failed", f.t.name())),
        "{msg}"
    );
    // Read-only trees come back too, and can be removed here.
    for e in std::fs::read_dir(local.path()).expect("ls") {
        let p = e.expect("entry").path();
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&p).status();
    }
}

fn holder_pid(e: &TransportError) -> u32 {
    let TransportError::Locked {
        holder: Some(h), ..
    } = e
    else {
        panic!("expected Locked with a holder, got {e:?}");
    };
    h.strip_prefix("pid ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in holder `{h}`"))
}

fn lock_and_run_runs_only_under_the_lock(f: &Fixture) {
    let path = f.dir.join("locks/run.lock");
    let marker = f.q(&f.dir.join("ran"));
    let script = format!(
        "mkdir -p {d} && echo x >> {marker} && cat {marker} | wc -l",
        d = f.q(&f.dir)
    );
    // Held elsewhere (another connection): the script does not run.
    let other = f.other();
    let holder: &dyn Transport = match &other {
        Some(t) => t,
        None => f.t.as_ref(),
    };
    let g = holder
        .lock(&path, Duration::ZERO)
        .unwrap_or_else(|e| panic!("{e}"));
    match f.t.lock_and_run(&path, Duration::ZERO, &script, T) {
        Ok(_) => panic!("ran while another held the lock"),
        Err(e) => assert!(matches!(e, TransportError::Locked { .. }), "{e}"),
    }
    assert_eq!(
        f.ok(&format!("[ -e {marker} ] && echo yes || echo no")),
        "no\n"
    );
    drop(g);
    // Free: the script runs once, under the lock, which is then held.
    let (g, out) =
        f.t.lock_and_run(&path, Duration::from_secs(5), &script, T)
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((out.status, out.stdout.trim()), (0, "1"), "{out:?}");
    match holder.lock(&path, Duration::ZERO) {
        Ok(_) => panic!("the lock was not held"),
        Err(e) => assert!(matches!(e, TransportError::Locked { .. }), "{e}"),
    }
    // A failing script is an answer, and the lock is still released.
    drop(g);
    let (g, out) =
        f.t.lock_and_run(&path, Duration::from_secs(5), "echo no >&2; exit 4", T)
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((out.status, out.stderr.as_str()), (4, "no\n"));
    drop(g);
    drop(
        holder
            .lock(&path, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}")),
    );
}

fn lock_excludes_then_frees(f: &Fixture) {
    let path = f.dir.join("locks/stack.lock");
    let g =
        f.t.lock(&path, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let e = match f.t.lock(&path, Duration::from_secs(2)) {
        Ok(_) => panic!("two holders of {}", path.display()),
        Err(e) => e,
    };
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(20), "waited {waited:?}");
    holder_pid(&e);
    let msg = e.to_string();
    assert!(
        msg.contains(&f.t.name()) && msg.contains("held by another deploy"),
        "{msg}"
    );
    // Another lock is independent.
    let other =
        f.t.lock(&f.dir.join("locks/other.lock"), Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
    drop(other);
    // A waiter gets it as soon as it is released.
    let t2 = f.t.clone();
    let p2 = path.clone();
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let g = t2.lock(&p2, Duration::from_secs(30));
        (g.is_ok(), start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    drop(g);
    let (got, after) = waiter.join().expect("waiter");
    assert!(got, "the waiter did not get the lock");
    assert!(after < Duration::from_secs(15), "{after:?}");
    // Released on drop: free at once.
    let g =
        f.t.lock(&path, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
    drop(g);
    let g =
        f.t.lock(&path, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
    drop(g);
}

fn lock_freed_when_holder_killed(f: &Fixture) {
    let path = f.dir.join("locks/killed.lock");
    let g =
        f.t.lock(&path, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
    let e = match f.t.lock(&path, Duration::ZERO) {
        Ok(_) => panic!("two holders"),
        Err(e) => e,
    };
    let pid = holder_pid(&e);
    // From another connection: the holder may be this transport's own
    // remote shell, which holds the lock itself.
    f.other_ok(&format!("kill -9 {pid}"));
    // With flock the lock dies with the process; with mkdir a waiter sees
    // the recorded pid dead and takes it over.
    let start = Instant::now();
    let g2 =
        f.t.lock(&path, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("not freed by killing the holder: {e}"));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // Scripts still run (over a session of their own when the holder was
    // this transport's agent).
    assert_eq!(f.ok("echo alive"), "alive\n");
    drop(g);
    // Dropping the dead holder's guard does not free the new holder's lock.
    match f.t.lock(&path, Duration::ZERO) {
        Ok(_) => panic!("the new holder lost its lock"),
        Err(e) => assert!(matches!(e, TransportError::Locked { .. }), "{e}"),
    }
    drop(g2);
    drop(
        f.t.lock(&path, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}")),
    );
}

const HELPER_ENV: &str = "PUNIX_TRANSPORT_TEST_HELPER";
const HELD: &str = "PUNIX-TEST-HELD:";

/// Not a test: the lock holder that `lock_freed_when_punix_killed` starts
/// in a child process (this same test binary) and kills with SIGKILL.
#[test]
fn zz_lock_holder_helper() {
    let Ok(kind) = std::env::var(HELPER_ENV) else {
        return;
    };
    let lock = PathBuf::from(std::env::var("PUNIX_TT_LOCK").expect("lock path"));
    let (t, socket): (Box<dyn Transport>, String) = match Kind::from_env_name(&kind) {
        Kind::Ssh(name) => {
            let tb = testbed::Testbed::from_env()
                .expect("testbed")
                .expect("TB_DIR");
            let host = tb.host(name).expect("host").clone();
            let t = connect(&tb, &host);
            let s = t.control_socket().display().to_string();
            (Box::new(t), s)
        }
        k => {
            let root = PathBuf::from(std::env::var("PUNIX_TT_ROOT").expect("root"));
            let method = if matches!(k, Kind::LocalMkdirLock) {
                LockMethod::Mkdir
            } else {
                LockMethod::Auto
            };
            (
                Box::new(LocalTransport::new(root).with_lock_method(method)),
                "-".into(),
            )
        }
    };
    let _g = t.lock(&lock, Duration::ZERO).expect("helper lock");
    println!("\n{HELD}{socket}");
    std::thread::sleep(Duration::from_secs(300));
}

fn lock_freed_when_punix_killed(f: &Fixture) {
    let path = f.dir.join("locks/punix-killed.lock");
    f.ok(&format!("mkdir -p {}", f.q(path.parent().expect("parent"))));
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args([
        "--exact",
        "zz_lock_holder_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, f.kind.env_name())
    .env("PUNIX_TT_LOCK", &path)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(r) = &f.root {
        cmd.env("PUNIX_TT_ROOT", r.path());
    }
    let mut child = cmd.spawn().expect("helper");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let socket = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(HELD) => {
                break l
                    .split_once(HELD)
                    .map(|(_, s)| s.trim().to_string())
                    .unwrap_or_default();
            }
            Some(Ok(_)) => continue,
            other => {
                let _ = child.kill();
                panic!("the helper did not take the lock: {other:?}");
            }
        }
    };
    match f.t.lock(&path, Duration::ZERO) {
        Ok(_) => panic!("the helper does not hold the lock"),
        Err(e) => assert!(matches!(e, TransportError::Locked { .. }), "{e}"),
    }
    child.kill().expect("kill -9 the helper");
    let _ = child.wait();
    let start = Instant::now();
    let g =
        f.t.lock(&path, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("not freed by killing punix: {e}"));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    drop(g);
    // The killed process's control master goes away by itself once idle
    // (it removes its socket as it exits). Polled without connecting to
    // it: each mux client would restart its idle countdown.
    if socket != "-" {
        let until = Instant::now()
            + Duration::from_secs(punix::transport::ssh::CONTROL_PERSIST_SECS as u64 + 20);
        while Path::new(&socket).exists() {
            assert!(
                Instant::now() < until,
                "the orphaned master at {socket} stays"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn measures_round_trips(f: &Fixture) {
    f.ok("true");
    let n = 20;
    let start = Instant::now();
    for _ in 0..n {
        f.ok("true");
    }
    let each = start.elapsed() / n;
    eprintln!(
        "round trip on {}: {:.1} ms",
        f.t.name(),
        each.as_secs_f64() * 1000.0
    );
}

// ---- SSH only ----------------------------------------------------------

macro_rules! ssh_suite {
    ($($case:ident),* $(,)?) => {
        mod ssh_h1 {
            $( #[test] fn $case() {
                if let Some((tb, host)) = super::testbed::host_or_skip(stringify!($case), "h1") { super::$case(&tb, &host) }
            } )*
        }
        mod ssh_arm1 {
            $( #[test] fn $case() {
                if let Some((tb, host)) = super::testbed::host_or_skip(stringify!($case), "arm1") { super::$case(&tb, &host) }
            } )*
        }
    };
}

ssh_suite!(
    host_key_unknown_or_changed_fails,
    unreachable_host_fails_fast,
    one_connection_for_many_scripts,
    dead_master_is_reported,
    drop_closes_the_master,
    reports_the_system,
    sessions_at_once_are_bounded,
);

/// Steps run from many threads at once share the agent and at most
/// `MAX_SESSIONS` sessions of their own, under sshd's `MaxSessions` (10 by
/// default): each script notes itself in a directory on the host and
/// counts who else is there.
fn sessions_at_once_are_bounded(tb: &testbed::Testbed, host: &testbed::Host) {
    use punix::transport::ssh::MAX_SESSIONS;
    let t = Arc::new(connect(tb, host));
    let dir = PathBuf::from("/srv/deploy").join(unique("sessions"));
    let d = quote_path(&dir);
    let script =
        format!("mkdir -p {d}; : > {d}/$$; sleep 0.4; n=$(ls {d} | wc -l); rm -f {d}/$$; echo $n");
    let threads: Vec<_> = (0..3 * MAX_SESSIONS)
        .map(|_| {
            let t = t.clone();
            let script = script.clone();
            std::thread::spawn(move || t.run_script(&script, T).expect("run"))
        })
        .collect();
    let seen: Vec<usize> = threads
        .into_iter()
        .map(|th| {
            th.join()
                .expect("thread")
                .stdout
                .trim()
                .parse()
                .expect("a count")
        })
        .collect();
    let most = seen.iter().copied().max().unwrap_or(0);
    // The agent's script and MAX_SESSIONS others: never more.
    assert!(most <= MAX_SESSIONS + 1, "{most} at once: {seen:?}");
    assert!(most > 2, "they did run side by side: {seen:?}");
    assert_eq!(t.counters().connections, 1);
    let _ = t.run_script(&format!("rm -rf {d}"), T);
}

fn host_key_unknown_or_changed_fails(tb: &testbed::Testbed, host: &testbed::Host) {
    let d = tempfile::tempdir().expect("tempdir");
    let empty = d.path().join("empty_known_hosts");
    std::fs::write(&empty, "").expect("write");
    // A different key under the host's name: as if the host changed.
    let k = d.path().join("other");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&k)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let other = std::fs::read_to_string(k.with_extension("pub")).expect("pub");
    let wrong = d.path().join("wrong_known_hosts");
    let name = if host.port == 22 {
        host.addr.clone()
    } else {
        format!("[{}]:{}", host.addr, host.port)
    };
    let wrong_text = format!(
        "{name} {}",
        other
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
            + "\n"
    );
    std::fs::write(&wrong, &wrong_text).expect("write");
    let target = SshTarget::parse(&host.url(&tb.user)).expect("url");
    for (file, changed) in [(&empty, false), (&wrong, true)] {
        let before = std::fs::read(file).expect("read");
        let opts = SshOptions {
            known_hosts: Some(file.clone()),
            ..ssh_options(tb)
        };
        let e = match SshTransport::connect(&target, &opts) {
            Ok(_) => panic!("connected with {}", file.display()),
            Err(e) => e,
        };
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, TransportError::Connect { .. }), "{e:?}");
        assert!(msg.contains("Host key verification failed"), "{msg}");
        assert!(msg.contains(&target.to_string()), "{msg}");
        let keyscan = format!(
            "ssh-keyscan -p {} {} >> {}",
            host.port,
            host.addr,
            file.display()
        );
        assert!(msg.contains(&keyscan), "want `{keyscan}` in:\n{msg}");
        assert!(msg.contains("--known-hosts"), "{msg}");
        if changed {
            assert!(
                msg.contains("CHANGED") && msg.contains("ssh-keygen -R"),
                "{msg}"
            );
        }
        // Strict checking wrote nothing into the pinned file.
        assert_eq!(std::fs::read(file).expect("read"), before);
    }
}

fn unreachable_host_fails_fast(tb: &testbed::Testbed, host: &testbed::Host) {
    // A closed port on the host's address.
    let url = format!("ssh://{}@{}:1", tb.user, host.bracketed());
    let target = SshTarget::parse(&url).expect("url");
    let opts = SshOptions {
        connect_timeout: Duration::from_secs(2),
        ..ssh_options(tb)
    };
    let start = Instant::now();
    let e = SshTransport::connect(&target, &opts).expect_err("port 1 is closed");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&url), "the error names the target: {msg}");
    assert!(msg.contains("nothing listens on port 1"), "{msg}");
    // An address nobody has, on the testbed's network: times out.
    if host.addr.contains(':') {
        let ghost = format!(
            "{}::fe",
            host.addr
                .rsplit_once("::")
                .map(|(p, _)| p)
                .unwrap_or("fd00")
        );
        let url = format!("ssh://{}@[{ghost}]:22", tb.user);
        let target = SshTarget::parse(&url).expect("url");
        let start = Instant::now();
        let e = SshTransport::connect(&target, &opts).expect_err("nobody there");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(12), "{took:?}");
        let msg = e.to_string();
        eprintln!("after {took:?}: {msg}");
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("hint:"), "{msg}");
    }
}

fn one_connection_for_many_scripts(tb: &testbed::Testbed, host: &testbed::Host) {
    let t = Arc::new(connect(tb, host));
    let n = 20;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let out = t.run_script("echo \"$SSH_CONNECTION\"", T).expect("run");
        seen.insert(out.stdout.trim().to_string());
    }
    // In parallel, too (sessions multiplexed over the one master).
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || {
                t.run_script("echo \"$SSH_CONNECTION\"", T)
                    .expect("run")
                    .stdout
                    .trim()
                    .to_string()
            })
        })
        .collect();
    for th in threads {
        seen.insert(th.join().expect("thread"));
    }
    let (store, names) = make_store();
    let dir = PathBuf::from("/srv/deploy").join(unique("one-connection"));
    t.push(store.path(), &names, &dir).expect("push");
    let back = tempfile::tempdir().expect("tempdir");
    t.pull(&dir.join(&names[2]), &back.path().join("x"))
        .expect("pull");
    drop(t.lock(&dir.join("lock"), Duration::ZERO).expect("lock"));
    let out = t.run_script("echo \"$SSH_CONNECTION\"", T).expect("run");
    seen.insert(out.stdout.trim().to_string());
    assert_eq!(
        seen.len(),
        1,
        "one TCP connection (client port) for all: {seen:?}"
    );
    let c = t.counters();
    assert_eq!(c.connections, 1);
    assert_eq!(c.round_trips, n as u64 + 6 + 4);
    let _ = t.run_script(
        &format!("chmod -R u+w {0}; rm -rf {0}", quote_path(&dir)),
        T,
    );
}

fn dead_master_is_reported(tb: &testbed::Testbed, host: &testbed::Host) {
    let t = connect(tb, host);
    t.check().expect("alive");
    let st = Command::new("ssh")
        .arg("-S")
        .arg(t.control_socket())
        .args(["-O", "exit", "punix-test"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ssh -O exit");
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(200));
    let name = t.name();
    for r in [
        t.check().map(|_| ()),
        t.run_script("true", T).map(|_| ()),
        t.push(
            Path::new("/nonexistent"),
            &["x".to_string()],
            Path::new("/srv/deploy/x"),
        )
        .map(|_| ()),
        t.lock(Path::new("/srv/deploy/x.lock"), Duration::ZERO)
            .map(|_| ()),
    ] {
        match r {
            Err(e @ TransportError::Dead { .. }) => {
                eprintln!("{e}");
                assert!(e.to_string().contains(&name), "{e}");
            }
            other => panic!("expected Dead, got {other:?}"),
        }
    }
}

fn drop_closes_the_master(tb: &testbed::Testbed, host: &testbed::Host) {
    let t = connect(tb, host);
    let socket = t.control_socket().to_path_buf();
    assert!(socket.exists());
    drop(t);
    let alive = Command::new("ssh")
        .arg("-S")
        .arg(&socket)
        .args(["-O", "check", "punix-test"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(!alive, "the master outlived its transport");
    assert!(!socket.exists());
}

fn reports_the_system(tb: &testbed::Testbed, host: &testbed::Host) {
    let t = connect(tb, host);
    let out = t.run_script("uname -m; id -un", T).expect("run");
    assert_eq!(out.stdout, format!("{}\n{}\n", host.arch, tb.user));
}
