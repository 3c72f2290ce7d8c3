//! Deploys over real SSH to the testbed's hosts (`TB_DIR`): the seed's
//! conformance properties, host keys, a network cut, activation with real
//! systemd and automatic rollback, concurrent deploys, the wrong system.
//!
//! Each test uses its own directories on the hosts, so tests run in
//! parallel against one testbed.
#![allow(clippy::unwrap_used)]

#[path = "support/stderr_watch.rs"]
mod stderr_watch;
#[path = "support/testbed.rs"]
mod testbed;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use stderr_watch::StderrWatch;
use testbed::{Host, Testbed, host_or_skip};

const SECRET: &str = "ssh-s3cr3t-9d2e";

struct Ctx {
    tb: Testbed,
    host: Host,
    user: String,
    /// Local temp dir; the store root is `/tmp/punix-ssh-<id>/store` both
    /// here and on the host.
    local: tempfile::TempDir,
    id: String,
}

impl Ctx {
    fn new(test: &str, host: &str, user: &str) -> Option<Ctx> {
        let (tb, host) = host_or_skip(test, host)?;
        let local = tempfile::tempdir().unwrap();
        let id = format!(
            "{}-{}",
            test.replace('_', "-").chars().take(24).collect::<String>(),
            std::process::id()
        );
        fs::create_dir_all(local.path().join("pkgs")).unwrap();
        fs::create_dir_all(local.path().join("home")).unwrap();
        Some(Ctx {
            tb,
            host,
            user: user.to_string(),
            local,
            id,
        })
    }

    fn store(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/punix-ssh-{}/store", self.id))
    }

    /// Remote directory for this test's deployments, units and files.
    fn remote(&self) -> PathBuf {
        PathBuf::from(format!("/srv/deploy/{}", self.id))
    }

    fn pkgs(&self) -> PathBuf {
        self.local.path().join("pkgs")
    }

    fn file(&self, rel: &str, text: &str) {
        fs::write(self.pkgs().join(rel), text).unwrap();
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_punix"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.local.path().join("home"))
            .env("PUNIX_STORE_DIR", self.store())
            .env("APP_TOKEN", SECRET);
        c
    }

    fn target_args(&self) -> Vec<String> {
        vec![
            "--target".into(),
            self.host.url(&self.user),
            "--key".into(),
            self.tb.key.display().to_string(),
            "--known-hosts".into(),
            self.tb.known_hosts.display().to_string(),
        ]
    }

    /// `service CMD STACK` against this test's host and deployments root;
    /// recipes from `file`, and units under the test's remote dir with
    /// `units` (else the default unit directory).
    fn service_args(
        &self,
        cmd: &str,
        stack: &str,
        file: Option<&Path>,
        units: bool,
    ) -> Vec<String> {
        let mut args: Vec<String> = vec!["service".into(), cmd.into(), stack.into()];
        if let Some(f) = file {
            args.push("--file".into());
            args.push(f.display().to_string());
        }
        if units {
            args.push("--unit-dir".into());
            args.push(self.remote().join("units").display().to_string());
        }
        args.extend(self.target_args());
        args.push("--deployments-root".into());
        args.push(self.remote().join("deployments").display().to_string());
        args
    }

    fn service(&self, cmd: &str, stack: &str, extra: &[&str]) -> Output {
        let deploy = cmd == "deploy";
        let mut args =
            self.service_args(cmd, stack, deploy.then(|| self.pkgs()).as_deref(), deploy);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.cmd().args(&args).output().unwrap()
    }

    /// A file on the host, read through the host's filesystem here.
    fn on_host(&self, p: &Path) -> PathBuf {
        self.host.local_path(p)
    }

    fn ssh(&self, user: &str, script: &str) -> Output {
        Command::new("ssh")
            .args([
                "-F",
                self.tb.ssh_config.to_str().unwrap(),
                "-l",
                user,
                &self.host.name,
            ])
            .arg(script)
            .output()
            .unwrap()
    }

    fn current(&self, stack: &str) -> Option<String> {
        fs::read_link(
            self.on_host(
                &self
                    .remote()
                    .join("deployments")
                    .join(stack)
                    .join("current"),
            ),
        )
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // Leave the hosts clean for the next test run.
        let dirs = format!(
            "chmod -R u+w /tmp/punix-ssh-{id} {r} 2>/dev/null; rm -rf /tmp/punix-ssh-{id} {r}",
            id = self.id,
            r = self.remote().display()
        );
        let _ = self.ssh(&self.user, &dirs);
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "chmod -R u+w /tmp/punix-ssh-{id} 2>/dev/null; rm -rf /tmp/punix-ssh-{id}",
                id = self.id
            ))
            .status();
    }
}

fn ok(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "punix failed ({:?})\nstdout:\n{s}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    s
}

fn fails(o: &Output, code: i32) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{e}",
        String::from_utf8_lossy(&o.stdout)
    );
    e
}

/// Packages and a stack whose files all live under the test's remote dir.
fn simple_stack(c: &Ctx, conf: &str) {
    c.file(
        "pkgs.toml",
        r#"
[package.Lib]
pname = "lib"
version = "1"
script = 'mkdir -p "$out/share"; echo lib > "$out/share/lib.txt"'

[package.App]
pname = "app"
version = "1"
deps = ["Lib"]
script = '''
mkdir -p "$out/bin"
printf '#!/bin/sh\necho app\n' > "$out/bin/app"
chmod +x "$out/bin/app"
'''
"#,
    );
    c.file(
        "stack.toml",
        &format!(
            r#"
[stack.Web]

[[stack.Web.services]]
name = "app"
package = "App"
binary = "app"
environment = {{ TOKEN = {{ from-env = "APP_TOKEN" }} }}

[[stack.Web.config-files]]
path = "{}/etc/app.conf"
content = "{conf}"
"#,
            c.remote().display()
        ),
    );
}

#[test]
fn seed_conformance_over_ssh() {
    let Some(c) = Ctx::new("seed_conformance_over_ssh", "h1", "tbdeploy") else {
        return;
    };
    simple_stack(&c, "one\\n");
    // (Other tests log in to the same host at the same time, so the
    // connection count comes from punix's own counters here; the
    // benchmark counts sshd's log lines on a quiet host.)
    let out = ok(&c.service("deploy", "Web", &["--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(v["pushed"], 2, "{v}");
    assert_eq!(v["cached"], 0, "{v}");
    assert_eq!(
        v["counters"]["connections"], 1,
        "one SSH connection per deploy: {v}"
    );
    assert_eq!(c.current("Web").as_deref(), Some("gen-001.json"));
    let conf = c.on_host(&c.remote().join("etc/app.conf"));
    assert_eq!(fs::read_to_string(&conf).unwrap(), "one\n");

    // Unchanged: 0 pushed, no new generation.
    let out = ok(&c.service("deploy", "Web", &["--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["unchanged"], true);
    assert_eq!(v["pushed"], 0);
    assert!(v["counters"]["round_trips"].as_u64().unwrap() <= 3, "{v}");
    assert_eq!(v["counters"]["connections"], 1, "{v}");

    // A change, then rollback restores exactly.
    simple_stack(&c, "two\\n");
    ok(&c.service("deploy", "Web", &[]));
    assert_eq!(c.current("Web").as_deref(), Some("gen-002.json"));
    assert_eq!(fs::read_to_string(&conf).unwrap(), "two\n");
    let out = ok(&c.service("rollback", "Web", &[]));
    assert!(out.contains("rolled back to gen-001"), "{out}");
    assert_eq!(c.current("Web").as_deref(), Some("gen-001.json"));
    assert_eq!(fs::read_to_string(&conf).unwrap(), "one\n");

    // Status over SSH.
    let out = ok(&c.service("status", "Web", &[]));
    assert!(
        out.contains("* gen-001") && out.contains("no drift"),
        "{out}"
    );

    // GC on the target keeps pinned paths; a path removed on the target
    // makes a rollback to its generation fail clearly.
    let mut gc_args = vec!["store".to_string(), "gc".into()];
    gc_args.extend(c.target_args());
    gc_args.push("--deployments-root".into());
    gc_args.push(c.remote().join("deployments").display().to_string());
    let out = c.cmd().args(&gc_args).output().unwrap();
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted 0 entries"));
    let g1: serde_json::Value = serde_json::from_slice(
        &fs::read(c.on_host(&c.remote().join("deployments/Web/gen-001.json"))).unwrap(),
    )
    .unwrap();
    let lib = g1["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|p| p.ends_with("-lib-1"))
        .unwrap();
    // gen-003 pins another Lib; the old one, pinned only by gen-001 and
    // gen-002, disappears from the target.
    let text = fs::read_to_string(c.pkgs().join("pkgs.toml")).unwrap();
    c.file("pkgs.toml", &text.replace("echo lib >", "echo lib2 >"));
    ok(&c.service("deploy", "Web", &[]));
    assert_eq!(c.current("Web").as_deref(), Some("gen-003.json"));
    let r = c.ssh(&c.user, &format!("chmod -R u+w {lib} && rm -rf {lib}"));
    assert!(r.status.success());
    let err = fails(&c.service("rollback", "Web", &["--to", "1"]), 1);
    assert!(
        err.contains("gone from the target") && err.contains("-lib-1"),
        "{err}"
    );
    assert_eq!(c.current("Web").as_deref(), Some("gen-003.json"));
}

#[test]
fn an_unknown_host_key_fails_and_writes_nothing() {
    let Some(c) = Ctx::new("an_unknown_host_key_fails", "h1", "tbdeploy") else {
        return;
    };
    simple_stack(&c, "x\\n");
    let empty = c.local.path().join("empty_known_hosts");
    fs::write(&empty, "").unwrap();
    let out = c
        .cmd()
        .args([
            "service",
            "deploy",
            "Web",
            "--file",
            c.pkgs().to_str().unwrap(),
        ])
        .args([
            "--target",
            &c.host.url(&c.user),
            "--key",
            c.tb.key.to_str().unwrap(),
        ])
        .args(["--known-hosts", empty.to_str().unwrap()])
        .args([
            "--deployments-root",
            c.remote().join("deployments").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = fails(&out, 3);
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(err.contains("ssh-keyscan"), "{err}");
    assert!(!c.on_host(&c.remote()).exists(), "nothing was written");
}

#[test]
fn an_unwritable_store_root_is_reported_before_pushing() {
    let Some(c) = Ctx::new("an_unwritable_store_root", "h1", "tbdeploy") else {
        return;
    };
    simple_stack(&c, "x\\n");
    // Build locally into a store at /root/...: tbdeploy cannot write there.
    let store = PathBuf::from(format!("/root/punix-ssh-{}/store", c.id));
    let args = c.service_args("deploy", "Web", Some(&c.pkgs()), false);
    // A dry run finds it too, and creates nothing.
    let dry = c
        .cmd()
        .env("PUNIX_STORE_DIR", &store)
        .args(&args)
        .arg("--dry-run")
        .output()
        .unwrap();
    let err = fails(&dry, 1);
    assert!(
        err.contains("cannot write") && err.contains(store.to_str().unwrap()),
        "{err}"
    );
    let made = c.ssh(
        "tbdeploy",
        &format!(
            "[ -e {d} ] && echo made || echo none",
            d = c.remote().join("deployments").display()
        ),
    );
    assert_eq!(String::from_utf8_lossy(&made.stdout).trim(), "none");
    let out = c
        .cmd()
        .env("PUNIX_STORE_DIR", &store)
        .args(&args)
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(store.parent().unwrap());
    let err = fails(&out, 1);
    assert!(
        err.contains("cannot write") && err.contains(store.to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("--store-root"), "{err}");
}

#[test]
fn a_network_cut_mid_push_fails_within_the_timeout_and_a_retry_completes() {
    let Some(c) = Ctx::new("a_network_cut_mid_push", "h2", "tbdeploy") else {
        return;
    };
    crash_stack(&c, "cut");
    ok(&c
        .cmd()
        .args(["build", "--file"])
        .arg(c.pkgs())
        .output()
        .unwrap());
    // A slow push (a test hook limits rsync's rate), cut once part of the
    // 2 MiB file is on the host.
    let mut run = Running::start(
        &c,
        "Web",
        &["--timeout", "8"],
        &[("PUNIX_TEST_BWLIMIT", "256")],
    );
    let store = c.on_host(&c.store());
    run.wait_until("part of the file is on the host", || {
        fs::read_dir(&store).is_ok_and(|mut dir| {
            dir.any(|d| {
                d.is_ok_and(|d| {
                    d.file_name().to_string_lossy().starts_with(".tmp-push-")
                        && fs::read_dir(d.path()).unwrap().flatten().any(|e| {
                            fs::metadata(e.path().join("share/blob")).is_ok_and(|m| m.len() > 0)
                        })
                })
            })
        })
    });
    // Cut the host's link (keeping its address, so it can come back).
    let netns = netns_of(&c);
    let keep = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.eth0.keep_addr_on_down=1",
        ])
        .status()
        .unwrap();
    assert!(keep.success());
    let down = Command::new("ip")
        .args(["netns", "exec", &netns, "ip", "link", "set", "eth0", "down"])
        .status()
        .unwrap();
    assert!(down.success(), "cannot take the link of {netns} down");
    let t0 = Instant::now();
    let out = run.wait();
    let took = t0.elapsed();
    let up = Command::new("ip")
        .args(["netns", "exec", &netns, "ip", "link", "set", "eth0", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let err = fails(&out, 3);
    assert!(took < Duration::from_secs(40), "the failure took {took:?}");
    assert!(
        err.contains(&c.host.addr) || err.contains(&c.host.bracketed()),
        "{err}"
    );
    assert!(c.current("Web").is_none(), "nothing was committed");
    // The link is back: a retry completes.
    std::thread::sleep(Duration::from_millis(500));
    let out = ok(&c.service("deploy", "Web", &[]));
    assert!(out.contains("gen-001"), "{out}");
}

/// The network namespace of a testbed host: `tb<group>-NAME`, where
/// `<group>` is the third group of the testbed's IPv6 prefix.
fn netns_of(c: &Ctx) -> String {
    let group = c
        .host
        .addr
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    let name = format!("tb{group}-{}", c.host.name);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "no netns `{name}` in:\n{text}"
    );
    name
}

#[test]
fn concurrent_deploys_over_ssh_are_serialised() {
    let Some(c) = Ctx::new("concurrent_deploys_over_ssh", "h1", "tbdeploy") else {
        return;
    };
    simple_stack(&c, "a\\n");
    // Build once so both deploys race on the target, not on the build.
    ok(&c
        .cmd()
        .args(["build", "--file", c.pkgs().to_str().unwrap()])
        .output()
        .unwrap());
    let other = c.local.path().join("pkgs2");
    fs::create_dir_all(&other).unwrap();
    fs::copy(c.pkgs().join("pkgs.toml"), other.join("pkgs.toml")).unwrap();
    fs::write(
        other.join("stack.toml"),
        fs::read_to_string(c.pkgs().join("stack.toml"))
            .unwrap()
            .replace("content = \"a\\n\"", "content = \"b\\n\""),
    )
    .unwrap();
    let spawn = |dir: &Path| {
        c.cmd()
            .args(c.service_args("deploy", "Web", Some(dir), true))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(&c.pkgs()), spawn(&other));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    let mut gens: Vec<String> = fs::read_dir(c.on_host(&c.remote().join("deployments/Web")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    assert_eq!(gens, vec!["gen-001.json", "gen-002.json"]);
    let out = ok(&c.service("status", "Web", &[]));
    assert!(
        out.contains("* gen-002") && out.contains("no drift"),
        "{out}"
    );
}

#[test]
fn a_closure_for_another_system_is_never_pushed() {
    let Some(c) = Ctx::new("a_closure_for_another_system", "arm1", "tbdeploy") else {
        return;
    };
    simple_stack(&c, "x\\n");
    let err = fails(&c.service("deploy", "Web", &[]), 1);
    assert!(
        err.contains("`aarch64-linux`") && err.contains("x86_64-linux"),
        "{err}"
    );
    assert!(!c.on_host(&c.store()).join("x").exists());
    let store_on_host = c.on_host(&c.store());
    let entries = fs::read_dir(&store_on_host)
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "nothing was pushed to the aarch64 host");
}

/// A stack of real services for the systemd host: `good` runs until
/// stopped; with `broken`, the service's program exits 1 at once.
fn systemd_stack(c: &Ctx, version: &str, broken: bool) {
    let body = if broken {
        "echo starting; exit 1".to_string()
    } else {
        format!("echo running {version}; exec sleep 10000{version}")
    };
    c.file(
        "pkgs.toml",
        &format!(
            r#"
[package.Daemon]
pname = "daemon"
version = "{version}"
script = '''
mkdir -p "$out/bin"
printf '#!/bin/sh\n{body}\n' > "$out/bin/daemon"
chmod +x "$out/bin/daemon"
'''
"#
        ),
    );
    c.file(
        "stack.toml",
        &format!(
            r#"
[stack.Svc]

[[stack.Svc.services]]
name = "punix-test-{id}"
package = "Daemon"
binary = "daemon"
environment = {{ TOKEN = {{ from-env = "APP_TOKEN" }} }}
"#,
            id = c.id
        ),
    );
}

#[test]
fn activation_with_real_systemd_and_automatic_rollback() {
    let Some(c) = Ctx::new("activation_with_real_systemd", "sd1", "root") else {
        return;
    };
    let unit = format!("punix-test-{}.service", c.id);
    let deploy = |extra: &[&str]| {
        c.cmd()
            .args(c.service_args("deploy", "Svc", Some(&c.pkgs()), false))
            .arg("--activate")
            .args(extra)
            .output()
            .unwrap()
    };
    let is_active = || {
        let o = c.ssh("root", &format!("systemctl is-active {unit}"));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let main_pid_cmdline = || {
        let o = c.ssh(
            "root",
            &format!(
                "cat /proc/$(systemctl show -p MainPID --value {unit})/cmdline | tr '\\0' ' '"
            ),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };

    systemd_stack(&c, "1", false);
    let out = ok(&deploy(&[]));
    assert!(out.contains("restarted punix-test-"), "{out}");
    assert_eq!(is_active(), "active");
    let unit_text =
        fs::read_to_string(c.on_host(&PathBuf::from("/etc/systemd/system").join(&unit))).unwrap();
    assert!(unit_text.contains("EnvironmentFile="), "{unit_text}");

    // The same again restarts nothing.
    let out = ok(&deploy(&[]));
    assert!(out.contains("already current"), "{out}");

    // Version 2 runs.
    systemd_stack(&c, "2", false);
    let out = ok(&deploy(&[]));
    assert!(out.contains("gen-002"), "{out}");
    assert_eq!(is_active(), "active");
    let v2 = main_pid_cmdline();
    assert!(v2.contains("sleep"), "{v2}");

    // A broken version 3: activation fails, the deploy rolls back to
    // gen-002 and v2 runs again.
    systemd_stack(&c, "3", true);
    let err = fails(&deploy(&[]), 3);
    assert!(err.contains("activation failed"), "{err}");
    assert!(
        err.contains("rolled back to gen-002, whose units are active again"),
        "{err}"
    );
    assert_eq!(c.current("Svc").as_deref(), Some("gen-002.json"));
    assert_eq!(is_active(), "active");
    let unit_text =
        fs::read_to_string(c.on_host(&PathBuf::from("/etc/systemd/system").join(&unit))).unwrap();
    assert!(unit_text.contains("-daemon-2/bin/daemon"), "{unit_text}");

    // The failed generation is kept aside, never a rollback target, and
    // the next generation gets a new number.
    let stack_dir = c.on_host(&c.remote().join("deployments/Svc"));
    assert!(stack_dir.join("gen-003.failed.json").is_file());
    assert!(!stack_dir.join("gen-003.json").exists());
    systemd_stack(&c, "4", false);
    let out = ok(&deploy(&[]));
    assert!(out.contains("gen-004"), "{out}");
    let mut rb = c.service_args("rollback", "Svc", None, false);
    rb.push("--activate".into());
    let out = ok(&c.cmd().args(&rb).output().unwrap());
    assert!(out.contains("rolled back to gen-002"), "{out}");
    assert_eq!(is_active(), "active");

    // Clean up the unit on the host.
    let _ = c.ssh(
        "root",
        &format!("systemctl disable --now {unit}; rm -f /etc/systemd/system/{unit}; systemctl daemon-reload"),
    );
}

#[test]
fn a_fleet_deploy_with_one_host_down_reports_each_host() {
    let Some(c) = Ctx::new("a_fleet_deploy_with_one_down", "h1", "tbdeploy") else {
        return;
    };
    let sd1 = c.tb.host("sd1").cloned().expect("the testbed has sd1");
    simple_stack(&c, "fleet\\n");
    // A third target whose sshd is not running: nothing listens on port 1.
    let down = format!("ssh://{}@{}:1", c.user, c.host.bracketed());
    let targets = c.local.path().join("targets.txt");
    fs::write(
        &targets,
        format!(
            "# the fleet\n{} @web\n{} @web @db\n{down} @web\n",
            c.host.url(&c.user),
            sd1.url(&c.user)
        ),
    )
    .unwrap();
    let mut args: Vec<String> = vec![
        "service".into(),
        "deploy".into(),
        "Web".into(),
        "--file".into(),
        c.pkgs().display().to_string(),
        "--unit-dir".into(),
        c.remote().join("units").display().to_string(),
        "--targets".into(),
        targets.display().to_string(),
        "--on".into(),
        "@web".into(),
        "--key".into(),
        c.tb.key.display().to_string(),
        "--known-hosts".into(),
        c.tb.known_hosts.display().to_string(),
        "--connect-timeout".into(),
        "3".into(),
        "--deployments-root".into(),
        c.remote().join("deployments").display().to_string(),
    ];
    let out = c.cmd().args(&args).output().unwrap();
    let err = fails(&out, 3);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(err.contains("1 of 3 target(s) failed"), "{err}");
    assert!(table.contains("2 of 3 target(s) deployed"), "{table}");
    let row = |url: &str| {
        table
            .lines()
            .find(|l| l.starts_with(url))
            .unwrap_or_else(|| panic!("no row for {url} in:\n{table}"))
            .to_string()
    };
    assert!(
        row(&c.host.url(&c.user)).contains("x86_64-linux"),
        "{table}"
    );
    assert!(row(&c.host.url(&c.user)).contains("gen-001"), "{table}");
    assert!(row(&sd1.url(&c.user)).contains("gen-001"), "{table}");
    assert!(row(&down).contains("error:"), "{table}");
    assert_eq!(c.current("Web").as_deref(), Some("gen-001.json"));
    let on_sd1 = sd1.local_path(&c.remote().join("deployments/Web/current"));
    assert_eq!(
        fs::read_link(on_sd1).unwrap().to_string_lossy(),
        "gen-001.json"
    );
    // JSON tells the same; `--on @db` picks one host.
    args.push("--json".into());
    let out = c.cmd().args(&args).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["targets"].as_array().unwrap().len(), 3);
    let pos = args.iter().position(|a| a == "@web").unwrap();
    args[pos] = "@db".into();
    let out = c.cmd().args(&args).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unchanged"], true, "{v}");
    let _ = c.ssh(&c.user, "true");
    let _ = Command::new("ssh")
        .args([
            "-F",
            c.tb.ssh_config.to_str().unwrap(),
            "-l",
            &c.user,
            "sd1",
        ])
        .arg(format!("rm -rf {}", c.remote().display()))
        .status();
}

/// The testbed's aarch64 host, and a builder registry (in the test's
/// directory) that names it as the aarch64 builder.
fn arm_builder(c: &Ctx) -> (Host, PathBuf) {
    let arm = c.tb.host("arm1").cloned().expect("the testbed has arm1");
    let registry = c.local.path().join("builders.toml");
    fs::write(
        &registry,
        format!(
            "[[builder]]\nname = \"arm1\"\nurl = \"{}\"\nkey = \"{}\"\nknown-hosts = \"{}\"\nsystems = [\"aarch64-linux\"]\nmax-jobs = 2\n",
            arm.url(&c.user),
            c.tb.key.display(),
            c.tb.known_hosts.display()
        ),
    )
    .unwrap();
    (arm, registry)
}

#[test]
fn a_mixed_arch_fleet_builds_each_closure_on_a_machine_of_its_system() {
    let Some(c) = Ctx::new("a_mixed_arch_fleet", "h1", "tbdeploy") else {
        return;
    };
    // arm1 is also the aarch64 builder.
    let (arm, registry) = arm_builder(&c);
    c.file(
        "pkgs.toml",
        r#"
[package.Tool]
pname = "tool"
version = "1"
script = '''
mkdir -p "$out/bin"
cp "$(command -v rsync)" "$out/bin/tool"
uname -m > "$out/built-on"
'''
"#,
    );
    c.file(
        "stack.toml",
        &format!(
            r#"
[stack.Mixed]
store-modules = ["Tool"]

[[stack.Mixed.config-files]]
path = "{}/etc/mixed.conf"
content = "mixed\n"
"#,
            c.remote().display()
        ),
    );
    let mut args: Vec<String> = vec![
        "service".into(),
        "deploy".into(),
        "Mixed".into(),
        "--file".into(),
        c.pkgs().display().to_string(),
        "--builders".into(),
        registry.display().to_string(),
        "--target".into(),
        c.host.url(&c.user),
        "--target".into(),
        arm.url(&c.user),
        "--key".into(),
        c.tb.key.display().to_string(),
        "--known-hosts".into(),
        c.tb.known_hosts.display().to_string(),
        "--deployments-root".into(),
        c.remote().join("deployments").display().to_string(),
        "--json".into(),
    ];
    let out = c.cmd().args(&args).output().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let rows = v["targets"].as_array().unwrap();
    assert_eq!(rows[0]["system"], "x86_64-linux");
    assert_eq!(rows[1]["system"], "aarch64-linux");
    // Each target got the closure of its own system.
    let path_on = |row: &serde_json::Value| -> String {
        let g = row["report"]["generation"].as_u64().unwrap();
        assert_eq!(g, 1);
        let host = if row["system"] == "aarch64-linux" {
            &arm
        } else {
            &c.host
        };
        let gen_file = host.local_path(&c.remote().join("deployments/Mixed/gen-001.json"));
        let generation: serde_json::Value =
            serde_json::from_slice(&fs::read(gen_file).unwrap()).unwrap();
        assert_eq!(generation["system"], row["system"]);
        generation["store_paths"][0].as_str().unwrap().to_string()
    };
    let x86 = path_on(&rows[0]);
    let aarch64 = path_on(&rows[1]);
    assert_ne!(x86, aarch64, "two systems, two store paths");
    // Read the aarch64 host's files over ssh (its /tmp is its own).
    let cat = |rel: &str| -> Vec<u8> {
        let o = Command::new("ssh")
            .args([
                "-F",
                c.tb.ssh_config.to_str().unwrap(),
                "-l",
                &c.user,
                "arm1",
            ])
            .arg(format!("cat {aarch64}/{rel}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    assert_eq!(
        punix::platform::elf_arch(&cat("bin/tool")[..20]),
        Some("aarch64")
    );
    assert_eq!(String::from_utf8_lossy(&cat("built-on")).trim(), "aarch64");
    let drv: serde_json::Value = serde_json::from_slice(&cat("derivation.json")).unwrap();
    assert_eq!(drv["system"], "aarch64-linux");
    // The aarch64 binary runs on the aarch64 target.
    let o = Command::new("ssh")
        .args([
            "-F",
            c.tb.ssh_config.to_str().unwrap(),
            "-l",
            &c.user,
            "arm1",
        ])
        .arg(format!("{aarch64}/bin/tool --version"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("rsync"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Without the builder, the aarch64 target fails before it is touched
    // and the error explains why; the x86_64 one is unchanged.
    let pos = args.iter().position(|a| a == "--builders").unwrap();
    args[pos + 1] = c
        .local
        .path()
        .join("no-builders.toml")
        .display()
        .to_string();
    let store = c.store();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod -R u+w {s} && rm -rf {s}/*-tool-1",
            s = store.display()
        ))
        .status();
    let out = c.cmd().args(&args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = v["targets"][1]["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("aarch64-linux") && err.contains("punix builders add"),
        "{err}"
    );
    let _ = Command::new("ssh")
        .args([
            "-F",
            c.tb.ssh_config.to_str().unwrap(),
            "-l",
            &c.user,
            "arm1",
        ])
        .arg(format!(
            "chmod -R u+w {r} /tmp/punix-ssh-{id}; rm -rf {r} /tmp/punix-ssh-{id}",
            r = c.remote().display(),
            id = c.id
        ))
        .status();
}

#[test]
fn a_mixed_arch_stack_from_a_binary_cache_deploys_with_no_builder() {
    let Some(c) = Ctx::new("a_mixed_arch_cache_deploy", "h1", "tbdeploy") else {
        return;
    };
    let (arm, registry) = arm_builder(&c);
    c.file(
        "pkgs.toml",
        "[package.Tool]\npname = \"tool\"\nversion = \"2\"\nscript = '''\nmkdir -p \"$out/bin\"\ncp \"$(command -v rsync)\" \"$out/bin/tool\"\n'''\n",
    );
    c.file("stack.toml", "[stack.Cached]\nstore-modules = [\"Tool\"]\n");
    let pkgs = c.pkgs().display().to_string();
    // Build both systems' closures (aarch64 on the builder) and export
    // them into one directory cache.
    let cache = c.local.path().join("cache");
    for system in ["x86_64-linux", "aarch64-linux"] {
        ok(&c
            .cmd()
            .args(["build", "--file", &pkgs, "--system", system])
            .args(["--builders", registry.to_str().unwrap()])
            .output()
            .unwrap());
        ok(&c
            .cmd()
            .args([
                "store", "export", "--file", &pkgs, "Cached", "--system", system,
            ])
            .args(["--to", cache.to_str().unwrap()])
            .output()
            .unwrap());
    }
    // A fresh store: nothing built, no builder registered, no local
    // builds: everything comes from the cache, verified on import.
    let store = c.store();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("chmod -R u+w {s}; rm -rf {s}", s = store.display()))
        .status();
    let out = c
        .cmd()
        .args(["service", "deploy", "Cached", "--file", &pkgs, "-j", "0"])
        .args(["--cache", cache.to_str().unwrap()])
        .args([
            "--builders",
            c.local.path().join("none.toml").to_str().unwrap(),
        ])
        .args([
            "--target",
            &c.host.url(&c.user),
            "--target",
            &arm.url(&c.user),
        ])
        .args(["--key", c.tb.key.to_str().unwrap()])
        .args(["--known-hosts", c.tb.known_hosts.to_str().unwrap()])
        .args([
            "--deployments-root",
            c.remote().join("deployments").to_str().unwrap(),
        ])
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    for row in v["targets"].as_array().unwrap() {
        assert_eq!(row["report"]["built"], 0, "nothing was built: {row}");
        assert_eq!(row["report"]["generation"], 1, "{row}");
    }
    ok(&c.cmd().args(["store", "verify"]).output().unwrap());
    let _ = Command::new("ssh")
        .args([
            "-F",
            c.tb.ssh_config.to_str().unwrap(),
            "-l",
            &c.user,
            "arm1",
        ])
        .arg(format!(
            "chmod -R u+w {r} /tmp/punix-ssh-{id}; rm -rf {r} /tmp/punix-ssh-{id}",
            r = c.remote().display(),
            id = c.id
        ))
        .status();
}

/// A deploy running in its own process group, so a test can kill -9 it
/// with every process it started (rsync, ssh), as a crash would.
struct Running {
    child: std::process::Child,
    stderr: StderrWatch,
}

impl Running {
    /// Spawn `cmd` in a process group of its own, its standard error
    /// watched.
    fn spawn(cmd: &mut Command) -> Running {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let stderr = StderrWatch::new(&mut child);
        Running { child, stderr }
    }

    /// A deploy of `stack` with the test's recipes and unit directory.
    fn start(c: &Ctx, stack: &str, extra: &[&str], env: &[(&str, &str)]) -> Running {
        Running::spawn(
            c.cmd()
                .args(c.service_args("deploy", stack, Some(&c.pkgs()), true))
                .args(extra)
                .envs(env.iter().copied()),
        )
    }

    /// Wait until `done` holds (at most a minute), checking it is alive.
    fn wait_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the deploy ended ({status}) before {what}:\n{}",
                    self.stderr.text()
                );
            }
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status and standard error, once it ended.
    fn wait(mut self) -> Output {
        let status = self.child.wait().unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr: self.stderr.finish().into_bytes(),
        }
    }

    fn kill_9(mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill takes plain integers; a negative pid is the group.
        let r = unsafe { libc::kill(-pgid, libc::SIGKILL) };
        assert_eq!(r, 0, "cannot kill the deploy's process group");
        self.child.wait().unwrap();
    }
}

/// The entries under the host's store: every one under a final name is
/// whole (has `built`).
fn assert_store_whole(c: &Ctx) {
    let store = c.on_host(&c.store());
    for e in fs::read_dir(&store).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        assert!(
            e.path().join("built").is_file(),
            "{name} is under its final name on the host without `built`"
        );
    }
}

/// A stack with a 2 MiB package, so a push takes a while on a slow link,
/// and two config files: `step` goes into all of them.
fn crash_stack(c: &Ctx, step: &str) {
    c.file(
        "pkgs.toml",
        &format!(
            r#"
[package.Blob]
pname = "blob"
version = "{step}"
script = 'mkdir -p "$out/share"; echo {step} > "$out/share/step"; head -c 2097152 /dev/zero > "$out/share/blob"'

[package.App]
pname = "app"
version = "1"
deps = ["Blob"]
script = '''
mkdir -p "$out/bin"
printf '#!/bin/sh\necho app\n' > "$out/bin/app"
chmod +x "$out/bin/app"
'''
"#
        ),
    );
    c.file(
        "stack.toml",
        &format!(
            r#"
[stack.Web]
store-modules = ["Blob"]

[[stack.Web.services]]
name = "app"
package = "App"
binary = "app"

[[stack.Web.config-files]]
path = "{r}/etc/a.conf"
content = "{step}\n"

[[stack.Web.config-files]]
path = "{r}/etc/b.conf"
content = "{step}\n"
"#,
            r = c.remote().display()
        ),
    );
}

#[test]
fn kill_9_at_each_step_over_ssh_leaves_a_whole_generation() {
    let Some(c) = Ctx::new("kill_9_at_each_step_over_ssh", "h1", "tbdeploy") else {
        return;
    };
    let stack_dir = c.on_host(&c.remote().join("deployments/Web"));
    let conf = |n: &str| fs::read_to_string(c.on_host(&c.remote().join("etc").join(n))).unwrap();
    let on = |step: &str| {
        assert_eq!(conf("a.conf"), format!("{step}\n"));
        assert_eq!(conf("b.conf"), format!("{step}\n"));
    };
    let status = || ok(&c.service("status", "Web", &[]));
    crash_stack(&c, "s0");
    ok(&c.service("deploy", "Web", &[]));
    assert_eq!(c.current("Web").as_deref(), Some("gen-001.json"));
    on("s0");

    // 1. During the push: rsync is half-way through the 2 MiB file when
    // punix, rsync and ssh die.
    crash_stack(&c, "s1");
    ok(&c
        .cmd()
        .args(["build", "--file"])
        .arg(c.pkgs())
        .output()
        .unwrap());
    let mut run = Running::start(&c, "Web", &[], &[("PUNIX_TEST_BWLIMIT", "256")]);
    let store = c.on_host(&c.store());
    run.wait_until("part of the file is on the host", || {
        fs::read_dir(&store).unwrap().flatten().any(|d| {
            d.file_name().to_string_lossy().starts_with(".tmp-push-")
                && fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .any(|e| fs::metadata(e.path().join("share/blob")).is_ok_and(|m| m.len() > 0))
        })
    });
    run.kill_9();
    assert_eq!(c.current("Web").as_deref(), Some("gen-001.json"));
    on("s0");
    assert_store_whole(&c);
    assert!(status().contains("no drift"));
    let out = ok(&c.service("deploy", "Web", &[]));
    assert!(out.contains("gen-002"), "{out}");
    on("s1");
    assert_store_whole(&c);

    // 2. During the config writes, punix and the journal both die (the
    // host crashed): nothing is current but the old generation, and the
    // first punix to take the lock finishes the journal.
    crash_stack(&c, "s2");
    let mut run = Running::start(&c, "Web", &[], &[("PUNIX_TEST_PAUSE", "writes")]);
    let paused = stack_dir.join(".journal-003.sh.paused");
    run.wait_until("the journal stopped between two writes", || paused.exists());
    run.kill_9();
    let r = c.ssh(&c.user, "pkill -9 -f '[.]journal-003[.]sh'");
    assert!(r.status.success(), "no journal to kill on the host");
    assert_eq!(c.current("Web").as_deref(), Some("gen-002.json"));
    assert_ne!(conf("a.conf"), conf("b.conf"), "stopped between the writes");
    assert_store_whole(&c);
    let s = status();
    assert!(
        s.contains("an interrupted commit is pending (.journal-003.sh)"),
        "{s}"
    );
    let r = c.service("deploy", "Web", &[]);
    let out = ok(&r);
    assert!(
        String::from_utf8_lossy(&r.stderr)
            .contains("completed an interrupted commit first: .journal-003.sh"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.contains("gen-003 already current"), "{out}");
    on("s2");

    // 3. During the config writes only punix dies (a dropped connection):
    // the journal, detached from the session, finishes on its own.
    crash_stack(&c, "s3");
    let mut run = Running::start(&c, "Web", &[], &[("PUNIX_TEST_PAUSE", "writes")]);
    let paused = stack_dir.join(".journal-004.sh.paused");
    run.wait_until("the journal stopped between two writes", || paused.exists());
    run.kill_9();
    // (On the host: its overlay does not see a change made to its upper
    // layer from here.)
    let resume = c.remote().join("deployments/Web/.journal-004.sh.paused");
    let r = c.ssh(&c.user, &format!("rm {}", resume.display()));
    assert!(r.status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack_dir.join(".journal-004.sh").exists() {
        assert!(Instant::now() < deadline, "the journal never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.current("Web").as_deref(), Some("gen-004.json"));
    on("s3");
    assert!(status().contains("no drift"));

    // 4. Between the generation's write and the flip, both die: the old
    // generation stays current until the next deploy rolls forward.
    crash_stack(&c, "s4");
    let mut run = Running::start(&c, "Web", &[], &[("PUNIX_TEST_PAUSE", "flip")]);
    let paused = stack_dir.join(".journal-005.sh.paused");
    run.wait_until("the journal stopped before the flip", || paused.exists());
    run.kill_9();
    let r = c.ssh(&c.user, "pkill -9 -f '[.]journal-005[.]sh'");
    assert!(r.status.success(), "no journal to kill on the host");
    assert!(stack_dir.join("gen-005.json").is_file());
    assert_eq!(c.current("Web").as_deref(), Some("gen-004.json"));
    assert_store_whole(&c);
    let out = ok(&c.service("deploy", "Web", &[]));
    assert!(out.contains("gen-005 already current"), "{out}");
    on("s4");
    let s = status();
    assert!(s.contains("* gen-005") && s.contains("no drift"), "{s}");
    // No gaps, no duplicates.
    let mut gens: Vec<String> = fs::read_dir(&stack_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    let want: Vec<String> = (1..=5).map(|n| format!("gen-{n:03}.json")).collect();
    assert_eq!(gens, want);
}

#[test]
fn a_deploy_killed_around_its_activation_is_finished_by_the_next_one() {
    let Some(c) = Ctx::new("a_deploy_killed_around_activation", "sd1", "root") else {
        return;
    };
    let unit = format!("punix-test-{}.service", c.id);
    let args = |extra: &[&str]| {
        let mut a = c.service_args("deploy", "Svc", Some(&c.pkgs()), false);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let deploy = |extra: &[&str]| c.cmd().args(args(extra)).output().unwrap();
    let spawn =
        |env: (&str, &str)| Running::spawn(c.cmd().args(args(&["--activate"])).env(env.0, env.1));
    // Which version the unit's process runs (`sleep 10000<version>`).
    let running = || {
        let o = c.ssh(
            "root",
            &format!(
                "systemctl is-active {unit} && cat /proc/$(systemctl show -p MainPID --value {unit})/cmdline | tr '\\0' ' '"
            ),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let status = || ok(&c.service("status", "Svc", &[]));
    const PENDING: &str = "an activation never ended";

    systemd_stack(&c, "1", false);
    ok(&deploy(&["--activate"]));
    assert!(running().contains("sleep 100001"), "{}", running());

    // Killed after the commit, before the activation: the target is wholly
    // on gen-002, whose units never restarted.
    systemd_stack(&c, "2", false);
    let run = spawn(("PUNIX_TEST_PAUSE", "activate"));
    run.stderr.wait_for("paused before activate");
    run.kill_9();
    assert_eq!(c.current("Svc").as_deref(), Some("gen-002.json"));
    assert!(running().contains("sleep 100001"), "{}", running());
    let s = status();
    assert!(s.contains(PENDING) && s.contains("no drift"), "{s}");
    // A deploy without --activate says so and changes nothing.
    let r = deploy(&[]);
    let out = ok(&r);
    assert!(out.contains("gen-002 already current"), "{out}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("never ended"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // With --activate it finishes the activation.
    let out = ok(&deploy(&["--activate"]));
    assert!(out.contains("restarted punix-test-"), "{out}");
    assert!(running().contains("sleep 100002"), "{}", running());
    assert!(!status().contains(PENDING));
    let out = ok(&deploy(&["--activate"]));
    assert!(out.contains("already current"), "{out}");

    // A broken version, killed while its activation runs (the restart is
    // detached on the host and may have happened): the next deploy with
    // --activate restarts it, finds it failing and rolls back to gen-002.
    systemd_stack(&c, "3", true);
    let run = spawn(("PUNIX_TRACE_TIMES", "1"));
    run.stderr.wait_for(" committed");
    std::thread::sleep(Duration::from_millis(300));
    run.kill_9();
    assert_eq!(c.current("Svc").as_deref(), Some("gen-003.json"));
    assert!(status().contains(PENDING));
    let err = fails(&deploy(&["--activate"]), 3);
    assert!(
        err.contains("activation failed")
            && err.contains("rolled back to gen-002, whose units are active again"),
        "{err}"
    );
    assert_eq!(c.current("Svc").as_deref(), Some("gen-002.json"));
    assert!(running().contains("sleep 100002"), "{}", running());
    let s = status();
    assert!(!s.contains(PENDING) && s.contains("no drift"), "{s}");
    let stack_dir = c.on_host(&c.remote().join("deployments/Svc"));
    assert!(stack_dir.join("gen-003.failed.json").is_file());

    let _ = c.ssh(
        "root",
        &format!("systemctl disable --now {unit}; rm -f /etc/systemd/system/{unit}; systemctl daemon-reload"),
    );
}
