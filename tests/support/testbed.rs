//! The running testbed (`tests/testbed/hosts-up.sh`), as tests see it.
//!
//! Include it in a test binary with
//! `#[path = "support/testbed.rs"] mod testbed;`.
//!
//! `TB_DIR` names the state dir; its `env` file (shell syntax) or its
//! `hosts.tsv` describes the hosts. Without `TB_DIR` the SSH tests skip
//! with a note, except under `CI=true`, where they fail: CI must run them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One test host.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// `amd64`, `arm64` or `systemd`.
    pub kind: String,
    /// What `uname -m` prints there.
    pub arch: String,
    /// IPv6 (netns mode) or IPv4 (loopback mode) address, no brackets.
    pub addr: String,
    pub port: u16,
    /// The host's upper layer on this machine: what a test wrote on the
    /// host can be read here.
    pub fs: PathBuf,
}

/// The testbed's shared files and its hosts.
#[derive(Debug, Clone)]
pub struct Testbed {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
    /// The non-root login user (root accepts the same key).
    pub user: String,
    pub hosts: Vec<Host>,
}

impl Host {
    /// `[addr]` for IPv6, the address as is otherwise.
    pub fn bracketed(&self) -> String {
        if self.addr.contains(':') {
            format!("[{}]", self.addr)
        } else {
            self.addr.clone()
        }
    }

    /// `ssh://USER@ADDR:PORT` (IPv6 in brackets).
    pub fn url(&self, user: &str) -> String {
        format!("ssh://{user}@{}:{}", self.bracketed(), self.port)
    }

    /// Where the host's absolute path `path` is visible on this machine.
    /// (The host's `/tmp` is a bind of the `tmp` next to its upper layer.)
    pub fn local_path(&self, path: &Path) -> PathBuf {
        if let (Ok(rest), Some(h)) = (path.strip_prefix("/tmp"), self.fs.parent()) {
            return h.join("tmp").join(rest);
        }
        self.fs.join(path.strip_prefix("/").unwrap_or(path))
    }
}

impl Testbed {
    /// The testbed named by `TB_DIR`, `None` when it is unset; an error
    /// when it is set but unreadable.
    pub fn from_env() -> Result<Option<Testbed>, String> {
        match std::env::var_os("TB_DIR") {
            None => Ok(None),
            Some(d) if d.is_empty() => Ok(None),
            Some(d) => Testbed::load(Path::new(&d)).map(Some),
        }
    }

    /// Read `DIR/env`, else `DIR/hosts.tsv`.
    pub fn load(dir: &Path) -> Result<Testbed, String> {
        let env_file = dir.join("env");
        let vars = match std::fs::read_to_string(&env_file) {
            Ok(text) => parse_env(&text),
            Err(_) => BTreeMap::new(),
        };
        let get = |k: &str| vars.get(k).cloned();
        let path_or = |k: &str, default: &str| {
            get(k)
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.join(default))
        };
        let user = get("TB_USER").unwrap_or_else(|| "tbdeploy".into());
        let mut hosts = Vec::new();
        if let Some(names) = get("TB_HOSTS") {
            for name in names.split_whitespace() {
                let h = |f: &str| get(&format!("TB_HOST_{name}_{f}"));
                let (Some(addr), Some(port)) = (h("ADDR"), h("PORT")) else {
                    return Err(format!(
                        "{}: no address or port for host `{name}`",
                        env_file.display()
                    ));
                };
                hosts.push(Host {
                    name: name.to_string(),
                    kind: h("KIND").unwrap_or_default(),
                    arch: h("ARCH").unwrap_or_default(),
                    addr,
                    port: port.parse().map_err(|_| {
                        format!("{}: bad port `{port}` for `{name}`", env_file.display())
                    })?,
                    fs: h("FS")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| dir.join("hosts").join(name).join("upper")),
                });
            }
        } else {
            let tsv = dir.join("hosts.tsv");
            let text = std::fs::read_to_string(&tsv).map_err(|e| {
                format!(
                    "TB_DIR={}: neither `env` nor `hosts.tsv` is readable ({e}); start a testbed with `tests/testbed/hosts-up.sh`",
                    dir.display()
                )
            })?;
            for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
                let f: Vec<&str> = line.split('\t').collect();
                if f.len() < 5 {
                    return Err(format!("{}: bad line `{line}`", tsv.display()));
                }
                let fs = if f[1] == "arm64" { "a64upper" } else { "upper" };
                hosts.push(Host {
                    name: f[0].into(),
                    kind: f[1].into(),
                    arch: f[2].into(),
                    addr: f[3].into(),
                    port: f[4]
                        .parse()
                        .map_err(|_| format!("{}: bad port in `{line}`", tsv.display()))?,
                    fs: dir.join("hosts").join(f[0]).join(fs),
                });
            }
        }
        Ok(Testbed {
            dir: dir.to_path_buf(),
            key: path_or("TB_KEY", "id_ed25519"),
            known_hosts: path_or("TB_KNOWN_HOSTS", "known_hosts"),
            ssh_config: path_or("TB_SSH_CONFIG", "ssh_config"),
            user,
            hosts,
        })
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The first host of `kind` (`amd64`, `arm64`, `systemd`).
    pub fn host_of_kind(&self, kind: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.kind == kind)
    }
}

/// Whether this run is CI (`CI=true`): there, a missing testbed fails.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The testbed host `name` for an SSH test, or `None` (with a note on
/// stderr) when there is no testbed. Panics under `CI=true` instead of
/// skipping, and whenever `TB_DIR` is set but broken or lacks the host.
pub fn host_or_skip(test: &str, name: &str) -> Option<(Testbed, Host)> {
    let tb = match Testbed::from_env() {
        Ok(Some(tb)) => tb,
        Ok(None) => {
            if in_ci() {
                panic!(
                    "{test}: TB_DIR is not set under CI=true; the SSH tests must run in CI: \
                     TB_DIR=$(tests/testbed/hosts-up.sh h1 arm1:arm64) before `cargo test`"
                );
            }
            eprintln!(
                "note: {test}: skipped, no testbed (set TB_DIR, see tests/testbed/README.md)"
            );
            return None;
        }
        Err(e) => panic!("{test}: {e}"),
    };
    let Some(host) = tb.host(name).cloned() else {
        panic!(
            "{test}: the testbed at {} has no host `{name}` (it has: {})",
            tb.dir.display(),
            tb.hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
    };
    Some((tb, host))
}

/// Read a shell `KEY=VALUE` file as written by `hosts-up.sh` (values may be
/// backslash-escaped or quoted; `export` lines are ignored).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("export ") {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.insert(k.to_string(), unquote(v));
    }
    out
}

fn unquote(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '\'' => {
                for n in chars.by_ref() {
                    if n == '\'' {
                        break;
                    }
                    out.push(n);
                }
            }
            '"' => {
                while let Some(n) = chars.next() {
                    match n {
                        '"' => break,
                        '\\' => {
                            if let Some(m) = chars.next() {
                                out.push(m);
                            }
                        }
                        _ => out.push(n),
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}
