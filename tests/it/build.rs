//! `punix build`: local builds, parallelism, failures, crash safety.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{Run, Test, repo};

fn wait_for(path: &Path, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn builds_the_examples_and_a_second_run_builds_nothing() {
    let t = Test::new();
    let examples = repo().join("examples");
    let r = t
        .run(&["build", "--file", examples.to_str().unwrap()])
        .success();
    assert!(r.stderr.contains("built 4 package(s)"), "{}", r.stderr);
    let paths: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(paths.len(), 4, "{}", r.stdout);
    let hello = paths.iter().find(|p| p.ends_with("-hello-1.0")).unwrap();
    let out = std::process::Command::new(format!("{hello}/bin/hello"))
        .arg("tester")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello, tester, from punix\n"
    );

    let again = t
        .run(&["build", "--file", examples.to_str().unwrap()])
        .success();
    assert!(
        again
            .stderr
            .contains("nothing to build: all 4 package(s) already in the store"),
        "{}",
        again.stderr
    );
    assert_eq!(again.stdout, r.stdout);
}

#[test]
fn outputs_are_read_only_and_carry_their_derivation() {
    let t = Test::new();
    t.file(
        "p.toml",
        r#"
[package.A]
pname = "a"
version = "1"
script = '''
mkdir -p "$out/bin"
printf '#!/bin/sh\necho a\n' > "$out/bin/a"
chmod +x "$out/bin/a"
'''
"#,
    );
    t.build(&[]).success();
    let p = t.path_of("A");
    let mode = |rel: &str| fs::metadata(p.join(rel)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin"), 0o555);
    assert_eq!(mode("bin/a"), 0o555);
    assert_eq!(mode("."), 0o555);
    let drv: serde_json::Value =
        serde_json::from_slice(&fs::read(p.join("derivation.json")).unwrap()).unwrap();
    assert_eq!(drv["pname"], "a");
    assert_eq!(drv["store_root"], t.store().to_str().unwrap());
    let shell = fs::read(repo().join("builders/shell.sh")).unwrap();
    assert_eq!(
        drv["builder"]["script_sha256"],
        punix::store::content_hash::sha256_hex(&shell)
    );
    let built: serde_json::Value =
        serde_json::from_slice(&fs::read(p.join("built")).unwrap()).unwrap();
    assert_eq!(
        built["content_hash"],
        punix::store::content_hash::hash_entry(&p).unwrap()
    );
}

#[test]
fn the_build_environment_is_clean() {
    let t = Test::new();
    t.file(
        "p.toml",
        r#"
[package.Dep]
pname = "dep"
version = "1"
script = 'mkdir -p "$out/bin" "$out/include"'

[package.Env]
pname = "env"
version = "1"
deps = ["Dep"]
env = { GREETING = "hi there" }
script = '''
mkdir -p "$out"
env | LC_ALL=C sort > "$out/env"
pwd > "$out/pwd"
'''
"#,
    );
    let outside = t
        .cmd()
        .args(["build", "--file", t.pkgs().to_str().unwrap()])
        .env("LEAKED_SECRET", "nope")
        .output()
        .unwrap();
    assert!(outside.status.success(), "{outside:?}");
    let env_out = t.path_of("Env");
    let dep = t.path_of("Dep");
    let text = fs::read_to_string(env_out.join("env")).unwrap();
    let vars: std::collections::BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(!text.contains("LEAKED_SECRET"), "{text}");
    assert_eq!(vars["GREETING"], "hi there");
    assert_eq!(vars["LC_ALL"], "C");
    assert_eq!(vars["TZ"], "UTC");
    assert_eq!(vars["SOURCE_DATE_EPOCH"], "315532800");
    assert_eq!(vars["system"], punix::platform::System::host().to_string());
    assert_eq!(vars["PATH"], format!("{}/bin:/usr/bin:/bin", dep.display()));
    assert_eq!(vars["CPATH"], format!("{}/include", dep.display()));
    assert_eq!(vars["input_Dep"], dep.to_str().unwrap());
    assert_eq!(vars["PUNIX_INPUTS"], dep.to_str().unwrap());
    let build_top = Path::new(vars["HOME"]).parent().unwrap();
    assert_eq!(Path::new(vars["TMPDIR"]).parent().unwrap(), build_top);
    assert_eq!(Path::new(vars["src"]).parent().unwrap(), build_top);
    // `out` was a temporary sibling; the file recording it was rewritten
    // to name the final path.
    assert_eq!(vars["out"], env_out.to_str().unwrap());
    assert!(
        !build_top.exists(),
        "the build directory is removed afterwards"
    );
    let allowed = [
        "out",
        "src",
        "system",
        "PUNIX_BUILD_CORES",
        "PUNIX_INPUTS",
        "PUNIX_SCRIPT",
        "PATH",
        "CPATH",
        "LIBRARY_PATH",
        "PKG_CONFIG_PATH",
        "HOME",
        "TMPDIR",
        "SOURCE_DATE_EPOCH",
        "LC_ALL",
        "TZ",
        "input_Dep",
        "GREETING",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    for k in vars.keys() {
        assert!(
            allowed.contains(k),
            "unexpected variable `{k}` in the build"
        );
    }
}

/// Two independent packages that can only finish when both run at once:
/// each waits (bounded) for the other's start marker.
fn rendezvous(t: &Test) {
    let m = t.path().join("marks");
    fs::create_dir_all(&m).unwrap();
    let pkg = |me: &str, other: &str| {
        format!(
            r#"
[package.{me}]
pname = "{me_l}"
version = "1"
env = {{ MARKS = "{m}" }}
script = '''
touch "$MARKS/{me}"
i=0
while [ ! -e "$MARKS/{other}" ]; do
  i=$((i+1)); [ $i -lt 100 ] || {{ echo "{other} never started" >&2; exit 1; }}
  sleep 0.05
done
mkdir -p "$out"
'''
"#,
            me_l = me.to_lowercase(),
            m = m.display()
        )
    };
    t.file("p.toml", &(pkg("A", "B") + &pkg("B", "A")));
}

#[test]
fn independent_builds_run_in_parallel() {
    let t = Test::new();
    rendezvous(&t);
    t.build(&["-j", "2"]).success();
}

#[test]
fn the_job_limit_is_respected() {
    let t = Test::new();
    rendezvous(&t);
    // With one job the two builds cannot meet: the first times out.
    let r = t.build(&["-j", "1"]).failure(3);
    assert!(r.stderr.contains("never started"), "{}", r.stderr);
}

#[test]
fn a_failed_build_shows_its_log_tail_and_skips_dependents() {
    let t = Test::new();
    t.file(
        "p.toml",
        r#"
[package.Bad]
pname = "bad"
version = "1"
script = '''
echo "compiling step one"
echo "error: the widget is broken" >&2
exit 7
'''

[package.Top]
pname = "top"
version = "1"
deps = ["Bad"]
script = 'mkdir -p "$out"'
"#,
    );
    let r = t.build(&[]).failure(3);
    assert!(
        r.stderr.contains("building package `Bad`")
            && r.stderr.contains("the builder exited with status 7"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("error: the widget is broken"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("1 skipped because an input failed"),
        "{}",
        r.stderr
    );
    let log = t.store().join(".logs");
    assert!(r.stderr.contains(log.to_str().unwrap()), "{}", r.stderr);
    assert!(
        !t.store_dirs().iter().any(|d| d.ends_with("-bad-1")),
        "no entry for a failed build"
    );
}

#[test]
fn a_builder_that_makes_no_output_is_rejected() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'true'\n",
    );
    let r = t.build(&[]).failure(3);
    assert!(r.stderr.contains("did not create `$out`"), "{}", r.stderr);
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"; touch \"$out/built\"'\n",
    );
    let r = t.build(&[]).failure(3);
    assert!(
        r.stderr.contains("holds `built` at its top"),
        "{}",
        r.stderr
    );
    assert!(!t.store_dirs().iter().any(|d| d.ends_with("-a-1")));
}

#[test]
fn kill_9_mid_build_leaves_no_valid_entry_and_the_next_run_completes() {
    let t = Test::new();
    let mark = t.path().join("started");
    t.file(
        "p.toml",
        &format!(
            r#"
[package.Slow]
pname = "slow"
version = "1"
env = {{ MARK = "{}" }}
script = '''
mkdir -p "$out/bin"
echo partial > "$out/bin/half-written"
if [ ! -e "$MARK" ]; then
  touch "$MARK"
  sleep 30
fi
echo done > "$out/bin/complete"
'''
"#,
            mark.display()
        ),
    );
    let mut child = t
        .cmd()
        .args(["build", "--file", t.pkgs().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(&mark, 20), "the build never started");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let path = t.path_of("Slow");
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    assert!(!path.exists(), "nothing under the final name after a kill");
    let leftovers: Vec<String> = t
        .store_dirs()
        .into_iter()
        .filter(|d| d.starts_with(".tmp"))
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the killed build's temporary: {leftovers:?}"
    );
    assert_eq!(leftovers[0].len(), name.len(), "as long as the final name");
    assert_eq!(leftovers[0][32..], name[32..]);
    let ls = t.run(&["store", "ls"]).success();
    assert!(!ls.stdout.contains(&name), "{}", ls.stdout);

    t.build(&[]).success();
    assert!(path.join("built").is_file());
    assert_eq!(
        fs::read_to_string(path.join("bin/complete")).unwrap(),
        "done\n"
    );
    assert!(
        !t.store_dirs().iter().any(|d| d.starts_with(".tmp")),
        "the stale temporary was swept: {:?}",
        t.store_dirs()
    );
    t.run(&["store", "verify"]).success();
}

#[test]
fn two_processes_never_build_one_path_twice() {
    let t = Test::new();
    let count = t.path().join("count");
    t.file(
        "p.toml",
        &format!(
            r#"
[package.Once]
pname = "once"
version = "1"
env = {{ COUNT = "{}" }}
script = '''
echo run >> "$COUNT"
sleep 1
mkdir -p "$out"
'''
"#,
            count.display()
        ),
    );
    let spawn = || {
        t.cmd()
            .args(["build", "--file", t.pkgs().to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{a:?}\n{b:?}");
    assert_eq!(fs::read_to_string(&count).unwrap(), "run\n");
    assert_eq!(a.stdout, b.stdout, "both print the same path");
    t.run(&["store", "verify"]).success();
}

#[test]
fn the_same_package_in_two_stores_has_the_same_content_hash() {
    let (t1, t2) = (Test::new(), Test::new());
    let examples = repo().join("examples");
    let hashes = |t: &Test| {
        t.run(&["build", "--file", examples.to_str().unwrap()])
            .success();
        let r = t.run(&["store", "ls", "--json"]).success();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap();
                (
                    name[33..].to_string(),
                    e["content_hash"].as_str().unwrap().to_string(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (h1, h2) = (hashes(&t1), hashes(&t2));
    assert_eq!(h1.len(), 4);
    assert_eq!(h1, h2);
    // The paths differ: the store root is part of the derivation.
    let hello = |t: &Test| {
        t.run(&[
            "store",
            "path",
            "--file",
            examples.to_str().unwrap(),
            "Hello",
        ])
        .success()
        .stdout
    };
    assert_ne!(hello(&t1), hello(&t2));
}

#[test]
fn another_system_gets_another_path_and_needs_a_machine_of_that_system() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let host = punix::platform::System::host().to_string();
    let other = if host == "aarch64-linux" {
        "x86_64-linux"
    } else {
        "aarch64-linux"
    };
    let pkgs = t.pkgs();
    let p_host = t.path_of("A");
    let p_other = t
        .run(&[
            "store",
            "path",
            "--file",
            pkgs.to_str().unwrap(),
            "--system",
            other,
            "A",
        ])
        .success();
    assert_ne!(p_host.to_str().unwrap(), p_other.stdout.trim());
    let r = t.build(&["--system", other]).failure(1);
    assert!(
        r.stderr.contains(&format!(
            "building for `{other}` needs a machine of that system, and this one is `{host}`"
        )),
        "{}",
        r.stderr
    );
    // A bad `--system` is a usage error.
    let r = t.build(&["--system", "z80-linux"]).failure(2);
    assert!(
        r.stderr.contains("unknown architecture `z80`"),
        "{}",
        r.stderr
    );
    // Building for this machine's system by name works.
    t.build(&["--system", &host]).success();
}

#[test]
fn dry_run_builds_nothing() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let r = t.build(&["--dry-run"]).success();
    assert!(
        r.stdout.contains("would build 1 package(s)"),
        "{}",
        r.stdout
    );
    assert!(!t.path_of("A").exists());
}

#[test]
fn an_invalid_leftover_under_the_final_name_is_rebuilt() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"; echo ok > \"$out/f\"'\n",
    );
    let p = t.path_of("A");
    fs::create_dir_all(p.join("junk")).unwrap();
    let ls = t.run(&["store", "ls"]).success();
    assert!(
        ls.stdout.is_empty(),
        "an entry without `built` is not listed"
    );
    t.build(&[]).success();
    assert_eq!(fs::read_to_string(p.join("f")).unwrap(), "ok\n");
    assert!(!p.join("junk").exists());
}

#[test]
fn unknown_package_names_get_a_suggestion() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.Hello]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let r = t.build(&["Helo"]).failure(1);
    assert!(r.stderr.contains("no package `Helo`"), "{}", r.stderr);
    assert!(r.stderr.contains("did you mean `Hello`?"), "{}", r.stderr);
}

#[test]
fn json_output_is_one_object() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let r = t.build(&["--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["built"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["packages"]["A"].as_str().unwrap(),
        t.path_of("A").to_str().unwrap()
    );
}

#[test]
fn missing_features_are_refused_before_building() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nfeatures = [\"kvm\"]\nscript = 'mkdir -p \"$out\"'\n",
    );
    let r = t.build(&[]).failure(1);
    assert!(
        r.stderr.contains("needs the machine feature(s) `kvm`"),
        "{}",
        r.stderr
    );
    let cfg = t.path().join("home/.config/punix");
    fs::create_dir_all(&cfg).unwrap();
    fs::write(cfg.join("config.toml"), "features = [\"kvm\"]\n").unwrap();
    t.build(&[]).success();
}

/// A recipe whose output records `$out`: in a text file, in a read-only
/// script, in a symlink target and between binary bytes.
const SELF_REFERENCE: &str = r#"
[package.Pc]
pname = "pc"
version = "1.0"
script = '''
mkdir -p "$out/lib/pkgconfig" "$out/share" "$out/bin"
echo data > "$out/share/data"
echo "prefix=$out" > "$out/lib/pkgconfig/pc.pc"
printf '#!/bin/sh\ncat %s/share/data\n' "$out" > "$out/bin/show"
chmod 555 "$out/bin/show"
printf '\001\002%s\000%s/share\000' "$out" "$out" > "$out/lib/blob"
ln -s "$out/share/data" "$out/share/link"
'''
"#;

fn content_hash_of(t: &Test, name: &str) -> String {
    let r = t.run(&["store", "ls", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["content_hash"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no entry {name}: {}", r.stdout))
}

#[test]
fn an_output_that_records_out_names_its_final_path() {
    let (t1, t2) = (Test::new(), Test::new());
    for t in [&t1, &t2] {
        t.file("p.toml", SELF_REFERENCE);
        t.build(&[]).success();
        let p = t.path_of("Pc");
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(
            fs::read_to_string(p.join("lib/pkgconfig/pc.pc")).unwrap(),
            format!("prefix={}\n", p.display())
        );
        let show = p.join("bin/show");
        assert_eq!(
            fs::metadata(&show).unwrap().permissions().mode() & 0o777,
            0o555,
            "the mode is kept"
        );
        let out = std::process::Command::new(&show).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "data\n");
        assert_eq!(
            fs::read(p.join("lib/blob")).unwrap(),
            [
                &b"\x01\x02"[..],
                p.to_str().unwrap().as_bytes(),
                b"\x00",
                format!("{}/share", p.display()).as_bytes(),
                b"\x00"
            ]
            .concat()
        );
        assert_eq!(
            fs::read_link(p.join("share/link")).unwrap(),
            p.join("share/data")
        );
        assert_eq!(fs::read_to_string(p.join("share/link")).unwrap(), "data\n");
        t.run(&["store", "verify"]).success();

        // Delete it and build it again: another temporary, the same content.
        let first = content_hash_of(t, &name);
        t.run(&["store", "gc"]).success();
        assert!(!p.exists());
        t.build(&[]).success();
        assert_eq!(content_hash_of(t, &name), first, "the same content hash");
    }
    // Each store's output names its own root.
    assert_ne!(t1.path_of("Pc"), t2.path_of("Pc"));
}

#[test]
fn a_special_file_in_the_output_is_named_relative_to_out() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.Fifo]\npname = \"fifo\"\nversion = \"1.0\"\nscript = 'mkdir -p \"$out/sub\"; mkfifo \"$out/sub/pipe\"'\n",
    );
    let r = t.build(&[]).failure(3);
    assert!(
        r.stderr.contains(
            "`sub/pipe` in the output of `Fifo` is a fifo; a store tree may hold only files, directories and symlinks"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("/store/.tmp"), "{}", r.stderr);
    assert!(r.stderr.contains("the build log is in"), "{}", r.stderr);
    assert!(!t.store_dirs().iter().any(|d| d.starts_with(".tmp")));
}

#[test]
fn an_empty_log_says_so() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.Quiet]\npname = \"quiet\"\nversion = \"1\"\nscript = 'exit 4'\n",
    );
    let r = t.build(&[]).failure(3);
    assert!(
        r.stderr.contains("---\n(the log is empty)\n---"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_file_with_only_stacks_has_no_packages_to_build() {
    let t = Test::new();
    t.file("s.toml", "[stack.Web]\nbackend = \"systemd\"\n");
    let r = t.build(&[]).success();
    assert!(r.stderr.contains("no packages to build"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let r = t.build(&["--json"]).success();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["built"].as_array().unwrap().len(), 0);
}

#[test]
fn build_cores_are_shared_among_concurrent_builds() {
    let t = Test::new();
    let pkg = |n: &str, salt: &str| {
        format!(
            "[package.{n}]\npname = \"{l}\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"; echo $PUNIX_BUILD_CORES > \"$out/cores\"{salt}'\n",
            l = n.to_lowercase()
        )
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    let read = |m: &str| {
        fs::read_to_string(t.path_of(m).join("cores"))
            .unwrap()
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    // One build at a time: each may use every core.
    t.file("p.toml", &(pkg("A", "") + &pkg("B", "")));
    t.build(&["-j", "1"]).success();
    assert_eq!((read("A"), read("B")), (cores, cores));
    // Two at once: they share them. (Other scripts, so other paths.)
    t.file("p.toml", &(pkg("A", "; true") + &pkg("B", "; true")));
    t.build(&["-j", "2"]).success();
    let half = (cores / 2).max(1);
    assert_eq!((read("A"), read("B")), (half, half));
}

#[test]
fn a_misspelt_arch_gets_a_near_suggestion_and_z80_none() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'x'\nsystems = [\"z80-linux\", \"aarhc64-linux\"]\n",
    );
    let r = t.build(&[]).failure(1);
    assert!(!r.stderr.contains("i686-linux`?"), "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "unknown architecture `z80` in system `z80-linux`\n  hint: known architectures:"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("did you mean `aarch64-linux`?"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_non_utf8_file_does_not_hide_the_other_files_errors() {
    let t = Test::new();
    t.file(
        "a.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'x'\n",
    );
    fs::write(t.pkgs().join("b.toml"), b"[package.B]\npname = \"b\xff\"\n").unwrap();
    t.file(
        "c.toml",
        "[package.C]\npname = \"c\"\nverison = \"1\"\nscript = 'x'\n",
    );
    let r = t.build(&[]).failure(1);
    assert!(
        r.stderr
            .contains("b.toml:2:11: the file is not valid UTF-8"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("c.toml:3:1: unknown key `verison`"),
        "{}",
        r.stderr
    );
}

/// Run a command made with `Test::cmd`.
pub fn output(cmd: &mut std::process::Command) -> Run {
    let out = cmd.output().unwrap();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

#[test]
fn an_unreadable_src_says_it_cannot_be_read() {
    let t = Test::new();
    let locked = t.pkgs().join("locked");
    fs::create_dir_all(locked.join("app")).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nsrc = \"locked/app\"\nscript = 'x'\n",
    );
    let pkgs = t.pkgs();
    let mut cmd = t.cmd_unprivileged();
    cmd.args(["store", "path", "--file", pkgs.to_str().unwrap()]);
    let r = output(&mut cmd);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    let r = r.failure(1);
    assert!(
        r.stderr.contains("`src` of package `A` cannot be read: `")
            && r.stderr.contains("(permission denied)"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("does not exist"), "{}", r.stderr);
}

#[test]
fn add_root_waits_for_a_running_gc() {
    use punix::store::lock::{FileLock, LockMode};
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    t.build(&[]).success();
    let path = t.path_of("A");
    let link = t.store().join(".roots").join(path.file_name().unwrap());
    // Stand in for a gc: hold the gc lock exclusively.
    let gc = FileLock::acquire(&t.store().join(".locks/gc.lock"), LockMode::Exclusive).unwrap();
    let child = t
        .cmd()
        .args(["build", "--file", t.pkgs().to_str().unwrap(), "--add-root"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        link.symlink_metadata().is_err(),
        "the root appeared while gc held its lock"
    );
    drop(gc);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_link(&link).unwrap(), path);
    // A gc now keeps it.
    t.run(&["store", "gc"]).success();
    assert!(path.join("built").is_file());
}

#[test]
fn a_cache_that_does_not_answer_is_named_when_nothing_can_build() {
    let t = Test::new();
    t.file(
        "p.toml",
        "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = 'mkdir -p \"$out\"'\n",
    );
    let host = punix::platform::System::host().to_string();
    let other = if host == "aarch64-linux" {
        "x86_64-linux"
    } else {
        "aarch64-linux"
    };
    let missing = t.path().join("no-such-cache");
    let none = t.path().join("none.toml");
    let r = t
        .build(&[
            "--system",
            other,
            "--cache",
            missing.to_str().unwrap(),
            "--builders",
            none.to_str().unwrap(),
        ])
        .failure(1);
    assert!(
        r.stderr.contains(&format!("cache {}", missing.display())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("not a punix binary cache"),
        "{}",
        r.stderr
    );
}
