//! `punix ci matrix` and the project's own workflow (`ci/github/ci.yml`).
//!
//! The generated workflow must parse as YAML, have one build job per
//! system on the matching runner and a deploy job that needs them all, pin
//! every action to a commit, and never carry a secret's value. And the
//! build job's commands, run here as a shell script (this machine is an
//! x86_64-linux runner, `punix` is the binary under test), must produce the
//! cache that the deploy job's import step consumes, after which the deploy
//! (through `--transport-root` instead of SSH) succeeds without building.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use punix::ci::{Destination, Install, Matrix, MatrixSpec};
use serde_norway::Value;

const TARGET: &str = "ssh://deploy@prod.example.com";
const TARGET_V6: &str = "ssh://deploy@[2001:db8::7]:2222";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of the binary under test, to put first on PATH.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_punix"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn path_env() -> String {
    format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `punix ARGS` in the repository root with a clean environment (its own
/// HOME, no store root from the environment) plus `env`.
fn punix(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_punix"));
    c.env_clear()
        .env("PATH", path_env())
        .env("HOME", home)
        .current_dir(manifest_dir())
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn ok(out: Output) -> (String, String) {
    assert!(
        out.status.success(),
        "failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    (text(&out.stdout), text(&out.stderr))
}

fn parse(yaml: &str) -> Value {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn steps(job: &Value) -> &Vec<Value> {
    job["steps"].as_sequence().expect("steps")
}

/// The `run` of the step with `id`.
fn step_run<'a>(job: &'a Value, id: &str) -> &'a str {
    let step = steps(job)
        .iter()
        .find(|st| st["id"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("no step with id {id}"));
    s(&step["run"])
}

/// Every `uses:` in the document must name a full commit hash, and the
/// text must carry the release tag beside it.
#[track_caller]
fn assert_actions_pinned(doc: &Value, raw: &str) {
    let mut seen = 0;
    for (_, job) in doc["jobs"].as_mapping().unwrap() {
        for st in steps(job) {
            if let Some(uses) = st["uses"].as_str() {
                seen += 1;
                let (repo, sha) = uses.split_once('@').expect("owner/repo@ref");
                assert!(repo.contains('/'), "{uses}");
                assert!(
                    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                    "`{uses}` is not pinned to a commit"
                );
            }
        }
    }
    assert!(seen > 0, "no actions at all");
    for line in raw.lines().filter(|l| l.contains("uses:")) {
        assert!(
            line.contains(" # v"),
            "`{line}`: the version belongs beside the hash"
        );
    }
}

#[test]
fn generated_workflow_is_yaml_with_runners_needs_and_pins_and_no_secret_values() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    // Values that must never appear in the workflow, whatever the
    // environment holds when it is generated.
    let secrets = [
        ("DEMO_API_TOKEN", "tok-b7e1c0ffee-never-in-yaml"),
        (
            "PUNIX_SSH_KEY",
            "-----BEGIN OPENSSH PRIVATE KEY----- sekrit",
        ),
        (
            "PUNIX_KNOWN_HOSTS",
            "prod.example.com ssh-ed25519 AAAAC3sekrit",
        ),
    ];
    let args = [
        "ci",
        "matrix",
        "--file",
        "examples/",
        "--stack",
        "Demo",
        "--deploy-target",
        TARGET,
        "--deploy-target",
        TARGET_V6,
    ];
    let (yaml, _) = ok(punix(&home, &args, &secrets));
    for (_, value) in secrets {
        assert!(
            !yaml.contains(value),
            "a secret value leaked into the workflow"
        );
    }
    let doc = parse(&yaml);

    assert_eq!(s(&doc["env"]["PUNIX_STORE_DIR"]), "/var/lib/punix/store");
    let jobs = doc["jobs"].as_mapping().unwrap();
    let ids: Vec<&str> = jobs.keys().map(s).collect();
    assert_eq!(ids, ["build-x86_64-linux", "build-aarch64-linux", "deploy"]);
    for (id, runner, system) in [
        ("build-x86_64-linux", "ubuntu-24.04", "x86_64-linux"),
        ("build-aarch64-linux", "ubuntu-24.04-arm", "aarch64-linux"),
    ] {
        let job = &doc["jobs"][id];
        assert_eq!(s(&job["runs-on"]), runner);
        let run = step_run(job, "build");
        assert!(run.contains(&format!(
            "punix build --file 'examples/' --system '{system}'"
        )));
        assert!(run.contains(&format!(
            "punix store export --file 'examples/' --system '{system}' --to \"$RUNNER_TEMP/punix-cache\" 'Demo'"
        )));
        let upload = steps(job)
            .iter()
            .find(|st| {
                st["uses"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
            })
            .expect("an upload step");
        assert_eq!(s(&upload["with"]["name"]), format!("punix-cache-{system}"));
        let install = steps(job)
            .iter()
            .find(|st| {
                st["run"]
                    .as_str()
                    .is_some_and(|r| r.contains("cargo install"))
            })
            .expect("an install step");
        assert_eq!(
            s(&install["run"]),
            format!(
                "cargo install --locked punix --version '{}'\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        // The store root is made for the runner's user in every job.
        assert!(steps(job).iter().any(|st| {
            st["run"]
                .as_str()
                .is_some_and(|r| r.contains("sudo mkdir -p \"$PUNIX_STORE_DIR\""))
        }));
    }

    let deploy = &doc["jobs"]["deploy"];
    let needs: Vec<&str> = deploy["needs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(needs, ["build-x86_64-linux", "build-aarch64-linux"]);
    assert_eq!(s(&deploy["runs-on"]), "ubuntu-24.04");
    let downloads: Vec<String> = steps(deploy)
        .iter()
        .filter(|st| {
            st["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/download-artifact@"))
        })
        .map(|st| s(&st["with"]["name"]).to_string())
        .collect();
    assert_eq!(
        downloads,
        ["punix-cache-x86_64-linux", "punix-cache-aarch64-linux"]
    );
    assert_eq!(
        step_run(deploy, "import"),
        "punix store import \"$RUNNER_TEMP/punix-caches/punix-cache-x86_64-linux\"\n\
         punix store import \"$RUNNER_TEMP/punix-caches/punix-cache-aarch64-linux\"\n"
    );
    let d = steps(deploy)
        .iter()
        .find(|st| st["id"].as_str() == Some("deploy"))
        .unwrap();
    // The stack's from-env secrets come from repository secrets, by name.
    assert_eq!(
        s(&d["env"]["DEMO_API_TOKEN"]),
        "${{ secrets.DEMO_API_TOKEN }}"
    );
    let run = s(&d["run"]);
    for want in [
        "punix service deploy 'Demo' --file 'examples/' --jobs 0",
        &format!("--target '{TARGET}'"),
        &format!("--target '{TARGET_V6}'"),
        "--key \"$RUNNER_TEMP/punix-ssh/key\" --known-hosts \"$RUNNER_TEMP/punix-ssh/known_hosts\"",
    ] {
        assert!(run.contains(want), "`{want}` not in\n{run}");
    }
    let ssh = steps(deploy)
        .iter()
        .find(|st| !st["env"]["PUNIX_SSH_KEY"].is_null())
        .expect("a step that writes the key");
    assert_eq!(
        s(&ssh["env"]["PUNIX_SSH_KEY"]),
        "${{ secrets.PUNIX_SSH_KEY }}"
    );
    assert_eq!(
        s(&ssh["env"]["PUNIX_KNOWN_HOSTS"]),
        "${{ secrets.PUNIX_KNOWN_HOSTS }}"
    );
    // The secrets are listed in the header comment.
    for name in ["PUNIX_SSH_KEY", "PUNIX_KNOWN_HOSTS", "DEMO_API_TOKEN"] {
        assert!(
            yaml.lines()
                .any(|l| l.starts_with("#   ") && l.contains(name)),
            "{name} not listed in the header"
        );
    }
    assert_actions_pinned(&doc, &yaml);
    assert_eq!(
        doc["concurrency"]["cancel-in-progress"].as_bool(),
        Some(false)
    );
    assert_eq!(deploy["timeout-minutes"].as_u64(), Some(60));

    // Deterministic, and --out writes the same bytes.
    let (again, _) = ok(punix(&home, &args, &[]));
    assert_eq!(yaml, again);
    let out = tmp.path().join("wf/.github/workflows/punix-release.yml");
    let mut with_out: Vec<&str> = args.to_vec();
    let out_s = out.to_str().unwrap();
    with_out.extend(["--out", out_s]);
    let (stdout, stderr) = ok(punix(&home, &with_out, &[]));
    assert_eq!(stdout, "");
    assert!(stderr.contains("wrote "), "{stderr}");
    assert_eq!(fs::read_to_string(&out).unwrap(), yaml);
    let leftovers: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn options_choose_the_store_root_the_systems_and_the_punix_install() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let git = format!("https://example.org/punix.git@{rev}");
    let (yaml, stderr) = ok(punix(
        &home,
        &[
            "ci",
            "matrix",
            "--file",
            "examples",
            "--stack",
            "Demo",
            "--systems",
            "aarch64-linux",
            "--store-root",
            "/srv/punix/store",
            "--punix-git",
            &git,
        ],
        &[],
    ));
    assert!(stderr.contains("no `--deploy-target`"), "{stderr}");
    let doc = parse(&yaml);
    assert_eq!(s(&doc["env"]["PUNIX_STORE_DIR"]), "/srv/punix/store");
    let ids: Vec<&str> = doc["jobs"].as_mapping().unwrap().keys().map(s).collect();
    assert_eq!(ids, ["build-aarch64-linux"]);
    assert!(yaml.contains(&format!(
        "cargo install --locked --git 'https://example.org/punix.git' --rev '{rev}' punix"
    )));

    // PUNIX_STORE_DIR is the global --store-root.
    let (yaml, _) = ok(punix(
        &home,
        &["ci", "matrix", "--file", "examples/", "--stack", "Demo"],
        &[("PUNIX_STORE_DIR", "/opt/store/")],
    ));
    assert_eq!(s(&parse(&yaml)["env"]["PUNIX_STORE_DIR"]), "/opt/store");
}

#[test]
fn what_a_workflow_cannot_do_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let base = ["ci", "matrix", "--file", "examples/", "--stack", "Demo"];
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--systems", "riscv64-linux"],
            2,
            "no GitHub-hosted runner builds `riscv64-linux`",
        ),
        (
            &["--systems", "x86_64-linux,x86_64-windows"],
            2,
            "unknown operating system",
        ),
        (
            &["--store-root", "relative/store"],
            2,
            "must be an absolute path",
        ),
        (&["--punix-version", "latest"], 2, "exact version"),
        (
            &["--punix-git", "https://example.org/punix.git@main"],
            2,
            "not a full commit hash",
        ),
        (&["--deploy-target", "prod.example.com"], 2, "ssh://"),
        (
            &["--deploy-target", "ssh://u@h${{ github.token }}"],
            2,
            "would evaluate",
        ),
    ];
    for (extra, code, msg) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = punix(&home, &args, &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{extra:?}: {err}");
        assert!(err.contains(msg), "{extra:?}: `{msg}` not in {err}");
        assert!(out.stdout.is_empty());
    }
    let abs = manifest_dir().join("examples");
    let out = punix(
        &home,
        &[
            "ci",
            "matrix",
            "--file",
            abs.to_str().unwrap(),
            "--stack",
            "Demo",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("relative to the repository root"));
    let out = punix(
        &home,
        &["ci", "matrix", "--file", "examples/", "--stack", "Dmeo"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no stack `Dmeo`"));

    // A from-env name that cannot be a repository secret: file:line:col.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("pkgs")).unwrap();
    fs::write(
        dir.path().join("pkgs/stack.toml"),
        "[stack.S]\nstore-modules = []\n\n[[stack.S.config-files]]\npath = \"/etc/s.conf\"\nsecret = { from-env = \"GITHUB_TOKEN\" }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_punix"))
        .env_clear()
        .env("PATH", path_env())
        .env("HOME", &home)
        .current_dir(dir.path())
        .args(["ci", "matrix", "--file", "pkgs", "--stack", "S"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stack.toml:1:"), "{err}");
    assert!(
        err.contains("GITHUB_TOKEN") && err.contains("GITHUB_"),
        "{err}"
    );
}

/// Run a step's script as GitHub does (`bash --noprofile --norc -eo
/// pipefail FILE`) in the repository root, with `env` only (plus PATH).
fn run_step(
    dir: &Path,
    name: &str,
    script: &str,
    env: &[(&str, &Path)],
    secrets: &[(&str, &str)],
) -> Output {
    let file = dir.join(format!("{name}.sh"));
    fs::write(&file, script).unwrap();
    let mut c = Command::new("bash");
    c.args(["--noprofile", "--norc", "-eo", "pipefail"])
        .arg(&file)
        .env_clear()
        .env("PATH", path_env())
        .current_dir(manifest_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    for (k, v) in secrets {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Names of the valid entries of a store directory.
fn entries(store: &Path) -> BTreeSet<String> {
    fs::read_dir(store)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("built").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn build_job_commands_make_the_cache_that_the_deploy_job_imports_and_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    let store_s = store.to_str().unwrap();
    let home = t.join("home");
    fs::create_dir_all(&home).unwrap();
    let args = [
        "--store-root",
        store_s,
        "ci",
        "matrix",
        "--file",
        "examples/",
        "--stack",
        "Demo",
        "--systems",
        "x86_64-linux",
        "--deploy-target",
        TARGET,
    ];
    let (yaml, _) = ok(punix(&home, &args, &[]));
    let doc = parse(&yaml);
    // Every job runs with this store root: the workflow's own value.
    assert_eq!(s(&doc["env"]["PUNIX_STORE_DIR"]), store_s);
    let build_job = &doc["jobs"]["build-x86_64-linux"];
    let deploy_job = &doc["jobs"]["deploy"];
    let build = step_run(build_job, "build");
    let import = step_run(deploy_job, "import");
    let ssh = steps(deploy_job)
        .iter()
        .find(|st| !st["env"]["PUNIX_SSH_KEY"].is_null())
        .map(|st| s(&st["run"]))
        .unwrap();

    // The steps are exactly what the library's functions return.
    let recipes = punix::recipe::load(&manifest_dir().join("examples")).unwrap();
    let m = Matrix::new(
        MatrixSpec {
            file: "examples/".into(),
            stack: "Demo".into(),
            systems: vec!["x86_64-linux".into()],
            deploy_targets: vec![TARGET.into()],
            store_root: store_s.into(),
            install: Install::default(),
        },
        &recipes,
    )
    .unwrap();
    assert_eq!(m.workflow(), yaml);
    let x86 = "x86_64-linux".parse().unwrap();
    assert_eq!(build, m.build_script(&x86));
    assert_eq!(import, m.import_script());
    assert_eq!(ssh, m.ssh_script());
    assert_eq!(
        step_run(deploy_job, "deploy"),
        m.deploy_script(Destination::Targets)
    );

    // The build job, on this machine as its runner.
    let build_tmp = t.join("runner-build");
    let build_home = t.join("home-build");
    fs::create_dir_all(&build_tmp).unwrap();
    fs::create_dir_all(&build_home).unwrap();
    fs::create_dir_all(&store).unwrap(); // "Create the store root"
    let env_build: [(&str, &Path); 3] = [
        ("HOME", &build_home),
        ("RUNNER_TEMP", &build_tmp),
        ("PUNIX_STORE_DIR", &store),
    ];
    ok(run_step(t, "build", build, &env_build, &[]));
    let built = entries(&store);
    assert_eq!(built.len(), 4, "{built:?}"); // Counter, Hello, Libgreet, Site
    let cache = build_tmp.join("punix-cache");
    assert!(cache.join("punix-cache.json").is_file());
    for name in &built {
        assert!(cache.join(format!("{name}.tar.zst")).is_file(), "{name}");
    }

    // upload-artifact + download-artifact: the deploy job's runner gets
    // the directory under its own RUNNER_TEMP, and a store of its own.
    let deploy_tmp = t.join("runner-deploy");
    let deploy_home = t.join("home-deploy");
    fs::create_dir_all(&deploy_home).unwrap();
    copy_dir(
        &cache,
        &deploy_tmp.join("punix-caches/punix-cache-x86_64-linux"),
    );
    fs::rename(&store, t.join("store-of-the-build-runner")).unwrap();
    fs::create_dir_all(&store).unwrap();
    let env_deploy: [(&str, &Path); 3] = [
        ("HOME", &deploy_home),
        ("RUNNER_TEMP", &deploy_tmp),
        ("PUNIX_STORE_DIR", &store),
    ];
    let target = t.join("target");
    let mut deploy = m.deploy_script(Destination::TransportRoot(&target));
    assert!(deploy.ends_with(&format!("--transport-root '{}'\n", target.display())));
    deploy.insert_str(deploy.len() - 1, " --json");
    let secret = [("DEMO_API_TOKEN", "tok-ci-matrix-test")];

    // Without the import, the deploy job builds nothing: it fails.
    let out = run_step(t, "deploy-first", &deploy, &env_deploy, &secret);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("local builds are off"),
        "{}",
        text(&out.stderr)
    );
    assert!(entries(&store).is_empty());

    // A missing repository secret arrives as an empty variable: refused
    // before punix runs.
    let out = run_step(
        t,
        "deploy-empty",
        &deploy,
        &env_deploy,
        &[("DEMO_API_TOKEN", "")],
    );
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains("::error::the repository secret DEMO_API_TOKEN"));

    // The import step fills the store with exactly what was built.
    ok(run_step(t, "import", import, &env_deploy, &[]));
    assert_eq!(entries(&store), built);

    // The deploy (through a transport root instead of SSH) builds nothing.
    let (stdout, stderr) = ok(run_step(t, "deploy", &deploy, &env_deploy, &secret));
    assert!(!stderr.contains("building"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["built"], 0, "{report}");
    assert_eq!(report["pushed"], 4, "{report}");
    assert_eq!(report["generation"], 1, "{report}");
    assert_eq!(entries(&store), built, "the deploy changed the store");
    let target_store = target.join(store_s.trim_start_matches('/'));
    assert_eq!(entries(&target_store), built);
    assert!(target.join("etc/demo/app.conf").is_file());
    assert!(!stdout.contains(secret[0].1) && !stderr.contains(secret[0].1));

    // The SSH step writes both files with mode 0600 in a 0700 directory.
    let ssh_tmp = t.join("runner-ssh");
    fs::create_dir_all(&ssh_tmp).unwrap();
    let env_ssh: [(&str, &Path); 1] = [("RUNNER_TEMP", &ssh_tmp)];
    ok(run_step(
        t,
        "ssh",
        ssh,
        &env_ssh,
        &[("PUNIX_SSH_KEY", "KEY"), ("PUNIX_KNOWN_HOSTS", "HOSTS")],
    ));
    let dir = ssh_tmp.join("punix-ssh");
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for (f, content) in [("key", "KEY\n"), ("known_hosts", "HOSTS\n")] {
        let p = dir.join(f);
        assert_eq!(fs::read_to_string(&p).unwrap(), content);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let out = run_step(
        t,
        "ssh-missing",
        ssh,
        &env_ssh,
        &[("PUNIX_SSH_KEY", "KEY"), ("PUNIX_KNOWN_HOSTS", "")],
    );
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains("PUNIX_KNOWN_HOSTS is missing or empty"));
}

/// docs/ci-matrix.md shows the workflow for `examples/` in full: it must be
/// what this punix writes.
#[test]
fn the_workflow_in_the_docs_is_the_real_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (yaml, _) = ok(punix(
        tmp.path(),
        &[
            "ci",
            "matrix",
            "--file",
            "examples/",
            "--stack",
            "Demo",
            "--deploy-target",
            TARGET,
        ],
        &[],
    ));
    let doc = fs::read_to_string(manifest_dir().join("docs/ci-matrix.md")).unwrap();
    let marker = "`.github/workflows/punix-release.yml`:\n\n```yaml\n";
    let start = doc
        .find(marker)
        .expect("the workflow block in docs/ci-matrix.md")
        + marker.len();
    let end = start + doc[start..].find("```\n").unwrap();
    assert_eq!(
        &doc[start..end],
        yaml,
        "docs/ci-matrix.md is out of date: paste the output of `punix ci matrix --file examples/ --stack Demo --deploy-target {TARGET}`"
    );
}

#[test]
fn the_projects_own_workflow_parses_and_tests_on_both_runners() {
    let path = manifest_dir().join("ci/github/ci.yml");
    let raw = fs::read_to_string(&path).unwrap();
    let doc = parse(&raw);
    let jobs = doc["jobs"].as_mapping().unwrap();
    let ids: Vec<&str> = jobs.keys().map(s).collect();
    assert_eq!(ids, ["fmt", "clippy", "test", "release"]);
    assert_actions_pinned(&doc, &raw);
    let runs = |job: &Value| -> String {
        steps(job)
            .iter()
            .filter_map(|st| st["run"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(runs(&doc["jobs"]["fmt"]).contains("cargo fmt --check"));
    assert!(
        runs(&doc["jobs"]["clippy"]).contains("cargo clippy --locked --all-targets -- -D warnings")
    );
    for job in ["test", "release"] {
        let j = &doc["jobs"][job];
        assert_eq!(s(&j["runs-on"]), "${{ matrix.runner }}");
        let runners: Vec<(&str, &str)> = j["strategy"]["matrix"]["include"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| (s(&m["system"]), s(&m["runner"])))
            .collect();
        assert_eq!(
            runners,
            [
                ("x86_64-linux", "ubuntu-24.04"),
                ("aarch64-linux", "ubuntu-24.04-arm")
            ],
            "{job}"
        );
    }
    assert!(runs(&doc["jobs"]["test"]).contains("bash .ci/run"));
    assert!(runs(&doc["jobs"]["release"]).contains("cargo build --release"));
    let needs: Vec<&str> = doc["jobs"]["release"]["needs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(needs, ["fmt", "clippy", "test"]);
    assert!(steps(&doc["jobs"]["release"]).iter().any(|st| {
        st["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
    }));
}
