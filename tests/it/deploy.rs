//! `punix service deploy|rollback|status` with `--transport-root`: the
//! pipeline's guarantees on a local target directory. The same properties
//! over real SSH are in `ssh_deploy.rs`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{Run, Test};
use crate::stderr_watch::StderrWatch;

const SECRET: &str = "s3cr3t-Value-7f1c";

/// A stack with one long-running-free service, a secret, a config file.
fn stack(t: &Test, conf: &str) {
    t.file(
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

[package.Extra]
pname = "extra"
version = "1"
script = 'mkdir -p "$out"; echo extra > "$out/extra.txt"'
"#,
    );
    t.file(
        "stack.toml",
        &format!(
            r#"
[stack.Web]
store-modules = ["Extra"]

[[stack.Web.services]]
name = "app"
package = "App"
binary = "app"
args = ["--port", "8080", "two words"]
environment = {{ LOG = "info", TOKEN = {{ from-env = "APP_TOKEN" }} }}

[[stack.Web.config-files]]
path = "/etc/web/app.conf"
content = "{conf}"
mode = "0640"
"#
        ),
    );
}

fn root(t: &Test) -> PathBuf {
    t.path().join("target")
}

fn deploy(t: &Test, extra: &[&str]) -> Run {
    let pkgs = t.pkgs();
    let mut args = vec!["--file", pkgs.to_str().unwrap()];
    args.extend_from_slice(extra);
    service(t, "deploy", &args)
}

/// `punix service deploy Web --file FILE` to the test's target root, with
/// the stack's secret in the environment, for a test to spawn.
fn deploy_cmd(t: &Test, file: &Path) -> std::process::Command {
    let mut c = t.cmd();
    c.args(["service", "deploy", "Web", "--file"])
        .arg(file)
        .arg("--transport-root")
        .arg(root(t))
        .args(["--deployments-root", "/srv/deploy"])
        .env("APP_TOKEN", SECRET);
    c
}

/// `punix service CMD Web --transport-root ... ARGS` with the stack's
/// secret in the environment.
fn service(t: &Test, cmd: &str, extra: &[&str]) -> Run {
    let root = root(t);
    let mut args = vec![
        "service",
        cmd,
        "Web",
        "--transport-root",
        root.to_str().unwrap(),
        "--deployments-root",
        "/srv/deploy",
    ];
    args.extend_from_slice(extra);
    t.run_cmd(t.cmd().args(&args).env("APP_TOKEN", SECRET))
}

fn on_target(t: &Test, p: &str) -> PathBuf {
    root(t).join(p.trim_start_matches('/'))
}

fn current(t: &Test) -> Option<String> {
    fs::read_link(on_target(t, "/srv/deploy/Web/current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every directory in the target's store with a store name is valid.
fn assert_store_whole(t: &Test) {
    let store = root(t).join(t.store().to_str().unwrap().trim_start_matches('/'));
    let Ok(rd) = fs::read_dir(&store) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if punix::store::derivation::is_store_name(&name) {
            assert!(
                e.path().join("built").is_file(),
                "`{name}` is under its final name without `built`"
            );
        }
    }
}

fn gen_json(t: &Test, n: u32) -> serde_json::Value {
    let p = on_target(t, &format!("/srv/deploy/Web/gen-{n:03}.json"));
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

#[test]
fn deploy_lands_everything_the_seed_page_shows() {
    let t = Test::new();
    stack(&t, "verbose = true\\n");
    let r = deploy(&t, &[]).success();
    assert!(
        r.stdout.contains("Web: gen-001 on local:") && r.stdout.contains("3 pushed / 0 cached"),
        "{}",
        r.stdout
    );
    assert_eq!(current(&t).as_deref(), Some("gen-001.json"));
    let conf = on_target(&t, "/etc/web/app.conf");
    assert_eq!(fs::read_to_string(&conf).unwrap(), "verbose = true\n");
    assert_eq!(
        fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let unit = fs::read_to_string(on_target(&t, "/etc/systemd/system/app.service")).unwrap();
    let app = t.path_of("App");
    assert!(
        unit.contains(&format!(
            "ExecStart={}/bin/app --port 8080 \"two words\"",
            app.display()
        )),
        "{unit}"
    );
    assert!(unit.contains("Environment=\"LOG=info\""), "{unit}");
    assert!(
        unit.contains("EnvironmentFile=/srv/deploy/Web/env/app.env"),
        "{unit}"
    );
    let env = on_target(&t, "/srv/deploy/Web/env/app.env");
    assert_eq!(
        fs::read_to_string(&env).unwrap(),
        format!("TOKEN=\"{SECRET}\"\n")
    );
    assert_eq!(
        fs::metadata(&env).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The whole closure: the service's package, its input, the store module.
    let g = gen_json(&t, 1);
    let paths: Vec<&str> = g["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    for m in ["App", "Lib", "Extra"] {
        let p = t.path_of(m);
        assert!(paths.contains(&p.to_str().unwrap()));
        assert!(
            root(&t)
                .join(p.strip_prefix("/").unwrap())
                .join("built")
                .is_file()
        );
    }
    assert_store_whole(&t);
}

#[test]
fn an_unchanged_redeploy_pushes_and_writes_nothing() {
    let t = Test::new();
    stack(&t, "a = 1\\n");
    deploy(&t, &[]).success();
    let before = fs::metadata(on_target(&t, "/etc/web/app.conf"))
        .unwrap()
        .modified()
        .unwrap();
    let r = deploy(&t, &["--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["unchanged"], true);
    assert_eq!(v["pushed"], 0);
    assert_eq!(v["cached"], 3);
    assert_eq!(v["generation"], 1);
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("gen-001 already current"), "{}", r.stdout);
    assert!(r.stdout.contains("0 pushed / 3 cached"), "{}", r.stdout);
    assert!(!on_target(&t, "/srv/deploy/Web/gen-002.json").exists());
    let after = fs::metadata(on_target(&t, "/etc/web/app.conf"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "nothing was rewritten");
}

#[test]
fn rollback_restores_config_files_exactly_and_flips_current() {
    let t = Test::new();
    stack(&t, "first\\n");
    deploy(&t, &[]).success();
    stack(&t, "second\\n");
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("gen-002"), "{}", r.stdout);
    assert_eq!(current(&t).as_deref(), Some("gen-002.json"));
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "second\n"
    );
    let r = service(&t, "rollback", &[]).success();
    assert!(r.stdout.contains("rolled back to gen-001"), "{}", r.stdout);
    assert_eq!(current(&t).as_deref(), Some("gen-001.json"));
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "first\n"
    );
    // The secret env file is re-rendered from this environment.
    assert_eq!(
        fs::read_to_string(on_target(&t, "/srv/deploy/Web/env/app.env")).unwrap(),
        format!("TOKEN=\"{SECRET}\"\n")
    );
    let r = service(&t, "rollback", &["--to", "2"]).success();
    assert!(r.stdout.contains("rolled back to gen-002"), "{}", r.stdout);
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "second\n"
    );
    let r = service(&t, "rollback", &["--to", "9"]).failure(1);
    assert!(
        r.stderr.contains("there is no generation 9"),
        "{}",
        r.stderr
    );
}

#[test]
fn rollback_checks_pinned_paths_on_the_target() {
    let t = Test::new();
    stack(&t, "one\\n");
    deploy(&t, &[]).success();
    // A new package version: gen-002 pins another Extra.
    let text = fs::read_to_string(t.pkgs().join("pkgs.toml")).unwrap();
    t.file("pkgs.toml", &text.replace("echo extra", "echo extra2"));
    deploy(&t, &[]).success();
    // The target's copy of gen-001's Extra disappears (the local store
    // still has it: the check must look at the target).
    let old_extra = gen_json(&t, 1)["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|p| p.ends_with("-extra-1"))
        .unwrap();
    let on = root(&t).join(old_extra.trim_start_matches('/'));
    let status = std::process::Command::new("rm")
        .arg("-rf")
        .arg(&on)
        .status()
        .unwrap();
    assert!(status.success());
    let r = service(&t, "rollback", &[]).failure(1);
    assert!(
        r.stderr
            .contains("pins 1 store path(s) that are gone from the target")
            && r.stderr.contains("-extra-1"),
        "{}",
        r.stderr
    );
    assert_eq!(
        current(&t).as_deref(),
        Some("gen-002.json"),
        "nothing flipped"
    );
}

#[test]
fn drift_is_reported_and_repaired_without_a_new_generation() {
    let t = Test::new();
    stack(&t, "x = 1\\n");
    deploy(&t, &[]).success();
    fs::write(on_target(&t, "/etc/web/app.conf"), "edited by hand\n").unwrap();
    fs::remove_file(on_target(&t, "/etc/systemd/system/app.service")).unwrap();
    let s = service(&t, "status", &[]).success();
    assert!(
        s.stdout.contains("drift: /etc/web/app.conf changed"),
        "{}",
        s.stdout
    );
    assert!(
        s.stdout
            .contains("drift: /etc/systemd/system/app.service is missing on the target"),
        "{}",
        s.stdout
    );
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("updated what differed"), "{}", r.stdout);
    assert!(r.stdout.contains("gen-001 stays current"), "{}", r.stdout);
    assert!(!on_target(&t, "/srv/deploy/Web/gen-002.json").exists());
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "x = 1\n"
    );
    let s = service(&t, "status", &[]).success();
    assert!(s.stdout.contains("no drift"), "{}", s.stdout);
}

#[test]
fn missing_secrets_are_all_reported_before_anything_is_written() {
    let t = Test::new();
    stack(&t, "x\\n");
    let text = fs::read_to_string(t.pkgs().join("stack.toml")).unwrap();
    t.file(
        "stack.toml",
        &text.replace(
            "TOKEN = { from-env = \"APP_TOKEN\" }",
            "TOKEN = { from-env = \"APP_TOKEN_UNSET\" }, KEY = { from-file = \"missing.key\" }",
        ),
    );
    let r = deploy(&t, &[]).failure(1);
    assert!(
        r.stderr
            .contains("2 secret(s) of stack `Web` cannot be resolved"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("APP_TOKEN_UNSET"), "{}", r.stderr);
    assert!(r.stderr.contains("missing.key"), "{}", r.stderr);
    assert!(!root(&t).exists(), "nothing reached the target");
}

#[test]
fn secrets_never_reach_the_store_generations_logs_or_output() {
    let t = Test::new();
    stack(&t, "x\\n");
    let mut outputs = String::new();
    for extra in [
        &["--dry-run"][..],
        &[],
        &["--json"],
        &["--dry-run", "--json"],
    ] {
        let r = deploy(&t, extra).success();
        outputs.push_str(&r.stdout);
        outputs.push_str(&r.stderr);
    }
    outputs.push_str(&service(&t, "status", &["--json"]).success().stdout);
    assert!(!outputs.contains(SECRET), "the secret leaked into output");
    let env_file = on_target(&t, "/srv/deploy/Web/env/app.env");
    let mut hits = Vec::new();
    grep(t.path(), SECRET.as_bytes(), &mut hits);
    assert_eq!(
        hits,
        vec![env_file],
        "the secret is only in the 0600 env file"
    );
}

fn grep(dir: &Path, needle: &[u8], hits: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            grep(&p, needle, hits);
        } else if m.is_file()
            && let Ok(b) = fs::read(&p)
            && b.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(p);
        }
    }
}

#[test]
fn target_and_transport_root_are_exclusive() {
    let t = Test::new();
    stack(&t, "x\\n");
    let r = deploy(&t, &["--target", "ssh://u@h"]).failure(2);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
}

#[test]
fn hostile_config_paths_work_or_are_refused_before_anything_runs() {
    let t = Test::new();
    stack(&t, "x\\n");
    let text = fs::read_to_string(t.pkgs().join("stack.toml")).unwrap();
    t.file(
        "stack.toml",
        &text.replace("/etc/web/app.conf", "/etc/web/it's a $HOME;`x`\\nfile.conf"),
    );
    let r = deploy(&t, &[]).failure(1);
    assert!(r.stderr.contains("holds a newline"), "{}", r.stderr);
    t.file(
        "stack.toml",
        &text.replace(
            "/etc/web/app.conf",
            "/etc/web dir/it's a $HOME;`x` \\\"q\\\".conf",
        ),
    );
    deploy(&t, &[]).success();
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web dir/it's a $HOME;`x` \"q\".conf")).unwrap(),
        "x\n"
    );
    for bad in [
        "/etc/sudoers.d/web",
        "/etc/ssh/sshd_config",
        "/etc/passwd",
        "relative/x",
        "/etc/../etc/shadow",
    ] {
        t.file("stack.toml", &text.replace("/etc/web/app.conf", bad));
        let r = deploy(&t, &[]).failure(1);
        assert!(r.stderr.contains("is refused"), "{bad}: {}", r.stderr);
    }
}

#[test]
fn a_planted_symlink_is_never_written_through() {
    let t = Test::new();
    stack(&t, "x\\n");
    let victim = t.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    let dir = on_target(&t, "/etc/web");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("app.conf")).unwrap();
    let r = deploy(&t, &[]).failure(1);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    // A symlinked parent directory is refused too.
    fs::remove_file(dir.join("app.conf")).unwrap();
    fs::remove_dir(&dir).unwrap();
    let elsewhere = t.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    let r = deploy(&t, &[]).failure(1);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
}

fn killed_at(step: &str) {
    let t = Test::new();
    stack(&t, "old\\n");
    deploy(&t, &[]).success();
    stack(&t, "new\\n");
    let text = fs::read_to_string(t.pkgs().join("pkgs.toml")).unwrap();
    t.file("pkgs.toml", &text.replace("echo extra", "echo extra-new"));
    // Build first, so the pause is reached quickly.
    t.build(&[]).success();
    let mut child = deploy_cmd(&t, &t.pkgs())
        .env("PUNIX_TEST_PAUSE", step)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    StderrWatch::new(&mut child).wait_for(&format!("paused before {step}"));
    child.kill().unwrap();
    child.wait().unwrap();
    // Wholly on the old generation.
    assert_eq!(
        current(&t).as_deref(),
        Some("gen-001.json"),
        "after a kill before {step}"
    );
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "old\n"
    );
    assert_store_whole(&t);
    let s = service(&t, "status", &[]).success();
    assert!(s.stdout.contains("no drift"), "{}", s.stdout);
    // The next deploy completes.
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("gen-002"), "{}", r.stdout);
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "new\n"
    );
    assert_store_whole(&t);
}

#[test]
fn kill_9_before_push_leaves_the_old_generation() {
    killed_at("push");
}

#[test]
fn kill_9_before_commit_leaves_the_old_generation() {
    killed_at("commit");
}

#[test]
fn a_journal_killed_between_generation_write_and_flip_is_rolled_forward() {
    let t = Test::new();
    stack(&t, "old\\n");
    deploy(&t, &[]).success();
    stack(&t, "new\\n");
    let mut child = deploy_cmd(&t, &t.pkgs())
        .args(["--timeout", "5"])
        .env("PUNIX_TEST_PAUSE", "flip")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = on_target(&t, "/srv/deploy/Web/.journal-002.sh");
    let paused = on_target(&t, "/srv/deploy/Web/.journal-002.sh.paused");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !paused.exists() {
        assert!(Instant::now() < deadline, "the journal never paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A crash: punix and the detached journal die before the flip.
    child.kill().unwrap();
    child.wait().unwrap();
    let pattern = journal.to_string_lossy().into_owned();
    let _ = std::process::Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    assert!(journal.exists(), "the journal survives the crash");
    assert_eq!(current(&t).as_deref(), Some("gen-001.json"));
    assert_store_whole(&t);
    // `status` holds no lock: it reports the interrupted commit.
    let s = service(&t, "status", &[]).success();
    assert!(
        s.stdout
            .contains("an interrupted commit is pending (.journal-002.sh)"),
        "{}",
        s.stdout
    );
    assert!(journal.exists());
    // The next deploy, under the lock, completes it first.
    let r = deploy(&t, &[]).success();
    assert!(
        r.stderr
            .contains("completed an interrupted commit first: .journal-002.sh"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("gen-002 already current"), "{}", r.stdout);
    let s = service(&t, "status", &[]).success();
    assert!(s.stdout.contains("* gen-002"), "{}", s.stdout);
    assert!(s.stdout.contains("no drift"), "{}", s.stdout);
    assert!(!journal.exists());
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "new\n"
    );
}

#[test]
fn concurrent_deploys_of_one_stack_never_interleave() {
    let t = Test::new();
    stack(&t, "a\\n");
    t.build(&[]).success();
    let pkgs = t.pkgs();
    let spawn = |conf_dir: &Path| {
        deploy_cmd(&t, conf_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A second recipe directory with other config content.
    let other = t.path().join("pkgs2");
    fs::create_dir_all(&other).unwrap();
    fs::copy(pkgs.join("pkgs.toml"), other.join("pkgs.toml")).unwrap();
    fs::write(
        other.join("stack.toml"),
        fs::read_to_string(pkgs.join("stack.toml"))
            .unwrap()
            .replace("content = \"a\\n\"", "content = \"b\\n\""),
    )
    .unwrap();
    let (a, b) = (spawn(&pkgs), spawn(&other));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let mut gens: Vec<String> = fs::read_dir(on_target(&t, "/srv/deploy/Web"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    assert_eq!(gens, vec!["gen-001.json", "gen-002.json"]);
    let s = service(&t, "status", &[]).success();
    assert!(s.stdout.contains("* gen-002"), "{}", s.stdout);
    assert!(s.stdout.contains("no drift"), "{}", s.stdout);
    let last = gen_json(&t, 2);
    let conf = last["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/web/app.conf")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        conf
    );
}

#[test]
fn gc_on_a_target_keeps_every_pinned_path() {
    let t = Test::new();
    stack(&t, "x\\n");
    deploy(&t, &[]).success();
    let text = fs::read_to_string(t.pkgs().join("pkgs.toml")).unwrap();
    t.file("pkgs.toml", &text.replace("echo extra", "echo extra2"));
    deploy(&t, &[]).success();
    // An unpinned entry on the target: a copy of a valid entry under
    // another store name.
    let store_on_target = root(&t).join(t.store().to_str().unwrap().trim_start_matches('/'));
    let stray = store_on_target.join("0123456789abcdef0123456789abcdef-stray-1");
    fs::create_dir_all(&stray).unwrap();
    fs::write(stray.join("built"), "{}").unwrap();
    let old = std::process::Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(stray.join("built"))
        .status()
        .unwrap();
    assert!(old.success());
    // Another one that a deploy marked in use a moment ago: kept.
    let in_use = store_on_target.join("fedcba9876543210fedcba9876543210-stray-2");
    fs::create_dir_all(&in_use).unwrap();
    fs::write(in_use.join("built"), "{}").unwrap();
    let r = t
        .run(&[
            "store",
            "gc",
            "--transport-root",
            root(&t).to_str().unwrap(),
            "--deployments-root",
            "/srv/deploy",
        ])
        .success();
    assert!(r.stdout.contains("-stray-1"), "{}", r.stdout);
    assert!(r.stderr.contains("deleted 1 entry on"), "{}", r.stderr);
    assert!(!stray.exists());
    assert!(
        r.stdout.contains(
            "-stray-2 (not pinned, but a deploy or a build used it within the last 60 minutes)"
        ),
        "{}",
        r.stdout
    );
    assert!(in_use.join("built").exists());
    // Both generations' paths are still there: rollback works.
    service(&t, "rollback", &[]).success();
    assert_store_whole(&t);
}

#[test]
fn dry_run_shows_the_plan_and_changes_nothing() {
    let t = Test::new();
    stack(&t, "x\\n");
    let r = deploy(&t, &["--dry-run"]).success();
    assert!(r.stdout.contains("plan for Web"), "{}", r.stdout);
    assert!(r.stdout.contains("push 3 store path(s)"), "{}", r.stdout);
    assert!(
        r.stdout.contains("write /etc/web/app.conf (0640)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("write gen-001.json"), "{}", r.stdout);
    assert!(current(&t).is_none());
    assert!(!on_target(&t, "/etc/web/app.conf").exists());
}

#[test]
fn a_binary_for_another_machine_is_never_pushed() {
    let t = Test::new();
    stack(&t, "x\\n");
    // `App` ships an ELF header for the other architecture in `bin/`.
    let other_machine = if punix::platform::System::host().arch() == "aarch64" {
        "\\076\\000"
    } else {
        "\\267\\000"
    };
    let text = fs::read_to_string(t.pkgs().join("pkgs.toml")).unwrap();
    t.file(
        "pkgs.toml",
        &text.replace(
            "chmod +x \"$out/bin/app\"",
            &format!(
                "chmod +x \"$out/bin/app\"\nprintf '\\177ELF\\002\\001\\001\\000\\000\\000\\000\\000\\000\\000\\000\\000\\002\\000{other_machine}' > \"$out/bin/foreign\""
            ),
        ),
    );
    let r = deploy(&t, &[]).failure(1);
    assert!(r.stderr.contains("/bin/foreign` is an `"), "{}", r.stderr);
    assert!(r.stderr.contains("refusing to push it"), "{}", r.stderr);
    assert!(current(&t).is_none());
    assert_store_whole(&t);
    // The directory the push would have gone to is gone again.
    let store = root(&t).join(t.store().to_str().unwrap().trim_start_matches('/'));
    let left: Vec<String> = fs::read_dir(&store)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left on the target: {left:?}");
}

/// A leftover under a store path's final name (an interrupted `store gc`
/// leaves a partial directory without `built`) makes the journal's
/// all-at-once move fail for that entry: it is cleared and replaced, the
/// others move as usual, and every entry ends complete and read-only.
#[test]
fn a_leftover_under_a_final_name_is_replaced_by_the_push() {
    let t = Test::new();
    stack(&t, "x\\n");
    deploy(&t, &[]).success();
    let store = root(&t).join(t.store().to_str().unwrap().trim_start_matches('/'));
    let lib = t.path_of("Lib");
    let name = lib.file_name().unwrap().to_string_lossy().into_owned();
    let entry = store.join(&name);
    // What a killed gc leaves: part of the tree, `built` already gone.
    let status = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&entry)
        .status()
        .unwrap();
    assert!(status.success());
    fs::remove_file(entry.join("built")).unwrap();
    fs::write(entry.join("junk"), "half-deleted").unwrap();
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("1 pushed"), "{}", r.stdout);
    assert!(entry.join("built").is_file());
    assert!(!entry.join("junk").exists());
    assert_eq!(
        fs::read_to_string(entry.join("share/lib.txt")).unwrap(),
        "lib\n"
    );
    assert_store_whole(&t);
    for e in fs::read_dir(&store).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".tmp-push-"), "left: {name}");
        let mode = e.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "`{name}` is writable: {mode:o}");
    }
}

/// Generation files written by earlier versions must keep parsing.
#[test]
fn old_generation_files_keep_parsing() {
    let dir = crate::common::repo().join("tests/fixtures/generations");
    let mut seen = 0;
    for e in fs::read_dir(&dir).unwrap().flatten() {
        let bytes = fs::read(e.path()).unwrap();
        let g = punix::deploy::generation::Generation::parse(&bytes)
            .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        assert!(g.number > 0 && !g.stack.is_empty() && !g.store_paths.is_empty());
        seen += 1;
    }
    assert!(seen >= 2, "fixtures in {}", dir.display());
    let demo = punix::deploy::generation::Generation::parse(
        &fs::read(dir.join("format1-demo.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(demo.services.len(), 2);
    assert!(demo.files.iter().any(|f| f.secret && f.content.is_none()));
    let conf = demo
        .files
        .iter()
        .find(|f| f.path == Path::new("/etc/demo/app.conf"))
        .unwrap();
    assert_eq!(conf.bytes().unwrap(), b"verbose = true\nworkers = 4\n");
}

/// A journal that died before it took its real name (its data was not
/// known to be on disk) is never run by a later deploy: it is removed.
#[test]
fn a_journal_that_never_took_its_name_is_dropped_not_run() {
    let t = Test::new();
    stack(&t, "x\\n");
    deploy(&t, &[]).success();
    let stale = on_target(&t, "/srv/deploy/Web/.journal-009.sh.new");
    let marker = on_target(&t, "/srv/deploy/Web/ran");
    fs::write(&stale, format!("touch '{}'\n", marker.display())).unwrap();
    let r = deploy(&t, &[]).success();
    assert!(r.stdout.contains("gen-001 already current"), "{}", r.stdout);
    assert!(!marker.exists(), "the unnamed journal was run");
    assert!(!stale.exists(), "the unnamed journal was left behind");
}

#[test]
fn a_commit_that_cannot_be_completed_is_reported_not_hidden() {
    let t = Test::new();
    stack(&t, "x\\n");
    deploy(&t, &[]).success();
    let journal = on_target(&t, "/srv/deploy/Web/.journal-009.sh");
    fs::write(&journal, "echo disk full >&2; exit 1\n").unwrap();
    let r = deploy(&t, &[]).success();
    assert!(
        r.stderr
            .contains("an interrupted commit could not be completed (.journal-009.sh"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("completed an interrupted commit first"),
        "{}",
        r.stderr
    );
    assert!(on_target(&t, "/srv/deploy/Web/.journal-009.sh.failed").exists());
}

#[test]
fn a_malformed_target_is_a_usage_error() {
    let t = Test::new();
    stack(&t, "x\\n");
    let pkgs = t.pkgs();
    let r = t
        .run_cmd(
            t.cmd()
                .args(["service", "deploy", "Web", "--file", pkgs.to_str().unwrap()])
                .args(["--target", "tbdeploy@h1"])
                .env("APP_TOKEN", SECRET),
        )
        .failure(2);
    assert!(r.stderr.contains("tbdeploy@h1"), "{}", r.stderr);
}

#[test]
fn gc_dry_run_on_a_target_deletes_nothing_not_even_stale_pushes() {
    let t = Test::new();
    stack(&t, "x\\n");
    deploy(&t, &[]).success();
    let store_on_target = root(&t).join(t.store().to_str().unwrap().trim_start_matches('/'));
    let stale = store_on_target.join(".tmp-push-1-2-3");
    fs::create_dir_all(stale.join("x")).unwrap();
    let old = std::process::Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(&stale)
        .status()
        .unwrap();
    assert!(old.success());
    let gc = |extra: &[&str]| {
        let root = root(&t);
        let mut args = vec![
            "store",
            "gc",
            "--transport-root",
            root.to_str().unwrap(),
            "--deployments-root",
            "/srv/deploy",
        ];
        args.extend_from_slice(extra);
        t.run(&args).success()
    };
    let r = gc(&["--dry-run"]);
    assert!(
        r.stdout.contains("would delete") && r.stdout.contains(".tmp-push-1-2-3"),
        "{}",
        r.stdout
    );
    assert!(stale.exists(), "a dry run deletes nothing");
    let r = gc(&[]);
    assert!(
        r.stdout.contains("deleted") && r.stdout.contains(".tmp-push-1-2-3"),
        "{}",
        r.stdout
    );
    assert!(!stale.exists());
    assert_store_whole(&t);
}

#[test]
fn a_store_path_gone_before_the_commit_fails_the_deploy_before_anything_changes() {
    let t = Test::new();
    stack(&t, "old\\n");
    deploy(&t, &[]).success();
    // A new config only: every store path is already on the target.
    stack(&t, "new\\n");
    let resume = t.path().join("resume");
    let root = root(&t);
    let mut child = deploy_cmd(&t, &t.pkgs())
        .env("PUNIX_TEST_PAUSE", "commit")
        .env("PUNIX_TEST_RESUME", &resume)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watch = StderrWatch::new(&mut child);
    watch.wait_for("paused before commit");
    // Meanwhile a gc (say) takes one of the paths the deploy found there.
    let store_on_target = root.join(t.store().to_str().unwrap().trim_start_matches('/'));
    let lib = fs::read_dir(&store_on_target)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-lib-1"))
        .expect("the lib entry on the target");
    let gone = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("chmod -R u+w '{0}' && rm -rf '{0}'", lib.display()))
        .status()
        .unwrap();
    assert!(gone.success());
    fs::write(&resume, "").unwrap();
    let status = child.wait().unwrap();
    let err = watch.finish();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("-lib-1 is gone from the target") && err.contains("deploy again"),
        "{err}"
    );
    // Nothing changed.
    assert_eq!(current(&t).as_deref(), Some("gen-001.json"));
    assert_eq!(
        fs::read_to_string(on_target(&t, "/etc/web/app.conf")).unwrap(),
        "old\n"
    );
    // Deploying again pushes it and completes.
    let r = deploy(&t, &[]).success();
    assert!(
        r.stdout.contains("gen-002") && r.stdout.contains("1 pushed"),
        "{}",
        r.stdout
    );
    assert_store_whole(&t);
}
