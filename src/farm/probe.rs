//! Probing builders: is it there, what is it, can it build?
//!
//! One probe is one SSH connection (strict host-key checking, as always)
//! and two round trips over it: a trivial script, whose wall time is the
//! latency, then one script that reports everything else at once:
//! `uname -m`/`uname -s`, whether `sh` and `rsync` are there, whether the
//! store root can be created and written (`mkdir -p`, `test -w`), the load
//! average (`/proc/loadavg`) and the free space of the store root's file
//! system (`df -Pk`, on the nearest existing parent when the root cannot be
//! created). A probe changes nothing on the host but creating the store
//! root's directories.
//!
//! [`probe_all`] probes many builders at once, one thread per builder and
//! at most [`MAX_PARALLEL_PROBES`] at a time.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Builder, FarmError};
use crate::platform::System;
use crate::transport::ssh::SshTransport;
use crate::transport::{Transport, quote_path};

/// Probes running at once: each holds one SSH connection (and an ssh
/// master process), so a big farm must not open them all together.
pub const MAX_PARALLEL_PROBES: usize = 16;

/// Bound on each of the probe's scripts once connected (an emulated host
/// can be slow to start its first processes).
pub const PROBE_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a probe found out about a builder.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct BuilderStatus {
    /// The builder's name.
    pub name: String,
    /// Connected, and the probe script ran.
    pub reachable: bool,
    /// Why it is not reachable (the transport's message, with its hint),
    /// or why the probe script failed.
    pub error: Option<String>,
    /// From `uname -m` and `uname -s`.
    pub system: Option<System>,
    /// `uname -m` and `uname -s` as printed, when they name no system we
    /// know.
    pub uname: Option<String>,
    /// The login user there (`id -un`).
    pub user: Option<String>,
    pub has_sh: bool,
    pub has_rsync: bool,
    /// The store root exists (or was created) and is writable.
    pub store_writable: bool,
    /// 1-minute load average.
    pub load: Option<f64>,
    /// Free space on the store root's file system.
    pub free_disk_bytes: Option<u64>,
    /// Wall time of a trivial script round trip, in milliseconds.
    pub latency_ms: Option<f64>,
}

impl BuilderStatus {
    fn unreachable(name: &str, error: String) -> BuilderStatus {
        BuilderStatus {
            name: name.to_string(),
            error: Some(error),
            ..BuilderStatus::default()
        }
    }

    /// Whether it can serve as a builder: reachable, a known system, `sh`,
    /// `rsync` and a writable store root.
    pub fn usable(&self) -> bool {
        self.reachable
            && self.error.is_none()
            && self.system.is_some()
            && self.has_sh
            && self.has_rsync
            && self.store_writable
    }

    /// What keeps it from serving as a builder, one sentence each (with a
    /// hint on the next line where we know the fix). Empty when usable.
    pub fn problems(&self, store_root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.error {
            out.push(e.clone());
        }
        if !self.reachable {
            return out;
        }
        if self.system.is_none() {
            out.push(format!(
                "its system is unknown (`uname -m`/`uname -s` print `{}`)\n  hint: record it with `--no-probe --systems ARCH-OS` if you know it",
                self.uname.as_deref().unwrap_or("?")
            ));
        }
        if !self.has_sh {
            out.push("`sh` is not on its PATH\n  hint: a builder needs a POSIX `sh`".into());
        }
        if !self.has_rsync {
            out.push(
                "`rsync` is not installed\n  hint: install it there (Debian: `apt-get install rsync`, Alpine: `apk add rsync`)"
                    .into(),
            );
        }
        if !self.store_writable {
            out.push(format!(
                "the store root `{root}` cannot be created or written by `{user}`\n  hint: create it there for that user (`sudo mkdir -p {root} && sudo chown {user} {root}`), or choose another with `--store-root`",
                root = store_root.display(),
                user = self.user.as_deref().unwrap_or("USER")
            ));
        }
        out
    }
}

/// Open the one SSH connection to `builder`.
pub fn connect(builder: &Builder, connect_timeout: Duration) -> Result<SshTransport, FarmError> {
    let target = builder.target()?;
    let opts = builder.ssh_options(connect_timeout);
    Ok(SshTransport::connect(&target, &opts)?)
}

/// Probe `builder`: connect, then [`probe_over`]. Never fails: an
/// unreachable builder is a status with `reachable: false` and the reason.
pub fn probe(builder: &Builder, store_root: &Path, connect_timeout: Duration) -> BuilderStatus {
    match connect(builder, connect_timeout) {
        Ok(t) => probe_over(&t, &builder.name, store_root),
        Err(e) => BuilderStatus::unreachable(&builder.name, e.to_string()),
    }
}

/// Probe a builder over a connection already open: two round trips.
pub fn probe_over(t: &dyn Transport, name: &str, store_root: &Path) -> BuilderStatus {
    let started = Instant::now();
    if let Err(e) = t.run_checked("the latency probe", "true", PROBE_SCRIPT_TIMEOUT) {
        return BuilderStatus::unreachable(name, e.to_string());
    }
    let latency = started.elapsed();
    let script = probe_script(&t.rebase(store_root));
    let out = match t.run_checked("the builder probe", &script, PROBE_SCRIPT_TIMEOUT) {
        Ok(o) => o,
        Err(e) => return BuilderStatus::unreachable(name, e.to_string()),
    };
    let mut s = parse_probe_output(name, &out.stdout);
    // Milliseconds, to the microsecond.
    s.latency_ms = Some((latency.as_secs_f64() * 1e6).round() / 1e3);
    s
}

/// Probe `builders` in parallel (at most [`MAX_PARALLEL_PROBES`] at once);
/// the statuses come back in the order of `builders`.
pub fn probe_all(
    builders: &[Builder],
    store_root: &Path,
    connect_timeout: Duration,
) -> Vec<BuilderStatus> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<BuilderStatus>>> = Mutex::new(vec![None; builders.len()]);
    let workers = builders.len().min(MAX_PARALLEL_PROBES);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(b) = builders.get(i) else {
                        break;
                    };
                    let status = probe(b, store_root, connect_timeout);
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(status);
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results
        .into_iter()
        .zip(builders)
        .map(|(r, b)| {
            r.unwrap_or_else(|| {
                BuilderStatus::unreachable(&b.name, "the probe did not finish".into())
            })
        })
        .collect()
}

/// The probe script: one `key=value` line per fact.
fn probe_script(store_root: &Path) -> String {
    format!(
        r#"root={root}
echo "machine=$(uname -m 2>/dev/null)"
echo "kernel=$(uname -s 2>/dev/null)"
echo "user=$(id -un 2>/dev/null)"
if command -v sh >/dev/null 2>&1; then echo sh=yes; else echo sh=no; fi
if command -v rsync >/dev/null 2>&1; then echo rsync=yes; else echo rsync=no; fi
if mkdir -p -- "$root" 2>/dev/null && [ -d "$root" ] && [ -w "$root" ]; then echo store=yes; else echo store=no; fi
if read -r l _ < /proc/loadavg 2>/dev/null; then echo "load=$l"; fi
d=$root
while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname -- "$d"); done
df -Pk -- "$d" 2>/dev/null | awk 'NR == 2 {{ print "free_kb=" $4 }}'
exit 0
"#,
        root = quote_path(store_root)
    )
}

fn parse_probe_output(name: &str, stdout: &str) -> BuilderStatus {
    let mut s = BuilderStatus {
        name: name.to_string(),
        reachable: true,
        ..BuilderStatus::default()
    };
    let (mut machine, mut kernel) = (String::new(), String::new());
    for line in stdout.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k {
            "machine" => machine = v.to_string(),
            "kernel" => kernel = v.to_string(),
            "user" if !v.is_empty() => s.user = Some(v.to_string()),
            "sh" => s.has_sh = v == "yes",
            "rsync" => s.has_rsync = v == "yes",
            "store" => s.store_writable = v == "yes",
            "load" => s.load = v.parse().ok(),
            "free_kb" => s.free_disk_bytes = v.parse::<u64>().ok().map(|kb| kb * 1024),
            _ => {}
        }
    }
    match System::from_uname(&machine, &kernel) {
        Ok(sys) => s.system = Some(sys),
        Err(_) => s.uname = Some(format!("{machine} {kernel}").trim().to_string()),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_parses() {
        let s = parse_probe_output(
            "a",
            "machine=arm64\nkernel=Linux\nsh=yes\nrsync=no\nstore=yes\nload=0.42\nfree_kb=2048\n",
        );
        assert!(s.reachable);
        assert_eq!(
            s.system.as_ref().map(|s| s.to_string()).as_deref(),
            Some("aarch64-linux")
        );
        assert!(s.has_sh && !s.has_rsync && s.store_writable);
        assert_eq!(s.load, Some(0.42));
        assert_eq!(s.free_disk_bytes, Some(2 * 1024 * 1024));
        assert!(!s.usable());
        let p = s.problems(Path::new("/s"));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("`rsync` is not installed"));
        let s = parse_probe_output("b", "machine=vax\nkernel=Linux\n");
        assert_eq!(s.system, None);
        assert_eq!(s.uname.as_deref(), Some("vax Linux"));
    }

    #[test]
    fn probe_script_uses_local_transport() {
        let dir = tempfile::tempdir().expect("ok");
        let t = crate::transport::local::LocalTransport::new(dir.path().to_path_buf());
        let s = probe_over(&t, "local", Path::new("/store/root"));
        assert!(s.reachable, "{s:?}");
        assert!(s.store_writable);
        assert!(dir.path().join("store/root").is_dir());
        assert!(s.free_disk_bytes.is_some());
        assert_eq!(s.system, Some(System::host()));
    }
}
