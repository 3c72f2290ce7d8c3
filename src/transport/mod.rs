//! The transport seam: how punix reaches a target (or a build host).
//!
//! One small trait, two implementations: [`local::LocalTransport`] runs
//! everything on this machine with every target path rebased under a root
//! directory (`--transport-root`, tests), [`ssh::SshTransport`] runs it over
//! one OpenSSH control-master connection (the `openssh` crate, native
//! multiplexing), rsync riding the same master.
//!
//! The unit of work is a POSIX `sh` script, fed to `sh -s` on standard
//! input (so its text, which may carry a secret's value, never shows in a
//! process list), run in ONE round trip. Composite operations build one
//! script for many steps, which is how a deploy stays at a constant number
//! of round trips whatever the closure size. Every value put into a script
//! goes through [`quote`].
//!
//! Scripts must run under dash and busybox `sh` alike and use only POSIX
//! utilities that busybox also has (no `flock`, no `mv -T`, no `stat -c`
//! assumptions beyond busybox's).

pub(crate) mod agent;
pub mod local;
pub mod script;
pub mod ssh;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use script::{quote, quote_path};

/// Errors of reaching or using a target.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to `{target}`: {reason}{}", hint_suffix(.hint))]
    Connect {
        target: String,
        reason: String,
        hint: Option<String>,
    },
    #[error(
        "the connection to `{target}` is gone ({reason})\n  hint: check that the host is up and sshd runs, then retry; a deploy that stopped here left the target on its old generation"
    )]
    Dead { target: String, reason: String },
    #[error(
        "`{what}` on `{target}` did not finish within {secs}s\n  hint: the host or the network may be overloaded; retry, or raise `--timeout`"
    )]
    Timeout {
        target: String,
        what: String,
        secs: u64,
    },
    #[error("`{what}` failed on `{target}` (exit status {status}){}{}", stderr_suffix(.stderr), hint_suffix(.hint))]
    Remote {
        target: String,
        what: String,
        status: i32,
        stderr: String,
        hint: Option<String>,
    },
    #[error("rsync {direction} `{target}` failed (exit status {status}){}{}", stderr_suffix(.stderr), hint_suffix(.hint))]
    Rsync {
        /// `to` for a push, `from` for a pull.
        direction: &'static str,
        target: String,
        status: i32,
        stderr: String,
        hint: Option<String>,
    },
    #[error(
        "cannot start `{program}`: {source}\n  hint: install it (Debian: `apt-get install {package}`)"
    )]
    Spawn {
        program: String,
        package: String,
        source: std::io::Error,
    },
    #[error("the stack lock `{path}` on `{target}` is held by another deploy{}\n  hint: wait for it to finish, or pass `--lock-wait SECONDS` to wait longer", .holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Locked {
        target: String,
        path: String,
        holder: Option<String>,
    },
    #[error("{0}")]
    Other(String),
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref()
        .map(|h| format!("\n  hint: {h}"))
        .unwrap_or_default()
}

fn stderr_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(":\n{t}")
    }
}

/// What a script printed and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// What one push moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Bytes rsync sent over the wire.
    pub bytes_sent: u64,
}

/// What one pull moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Bytes that came over the wire (for the local transport: the bytes
    /// copied).
    pub bytes_received: u64,
}

/// Counters for benchmarks and `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// SSH connections opened (0 for the local transport).
    pub connections: u64,
    /// Scripts run plus rsync runs.
    pub round_trips: u64,
}

/// A held remote lock; dropping it releases the lock.
pub trait LockGuard: Send {}

/// The transport seam. Implementations are cheap to share between threads.
pub trait Transport: Send + Sync {
    /// How to name the target in messages: `ssh://user@host:port`,
    /// `local:/dir`.
    fn name(&self) -> String;

    /// Where the target path `path` (absolute) lives for this transport:
    /// the same path over SSH, the path under the root locally.
    fn rebase(&self, path: &Path) -> PathBuf;

    /// Run `script` with `sh -s` on the target, in one round trip, within
    /// `timeout`. A non-zero exit is returned in [`Output::status`], not as
    /// an error; errors are for not being able to run it at all.
    fn run_script(&self, script: &str, timeout: Duration) -> Result<Output, TransportError>;

    /// Send the entries `names` of the local store at `local_store` into the
    /// directory `remote_dir` (already rebased, created if needed) in ONE
    /// rsync run: `remote_dir/<name>/...`. Files are written in place
    /// (`--inplace`): `remote_dir` must be a temporary directory whose
    /// content is used only once the push succeeded.
    fn push(
        &self,
        local_store: &Path,
        names: &[String],
        remote_dir: &Path,
    ) -> Result<PushStats, TransportError>;

    /// Copy the directory `remote` of the target (already rebased) to the
    /// local directory `local` in ONE rsync run: afterwards `local` holds
    /// what `remote` holds, with modes, executable bits and symlinks as
    /// they are there, owned by this process's user. `local` is created if needed (its parent must
    /// exist); files already in it are updated, others left alone. A
    /// missing `remote` is an error.
    fn pull(&self, remote: &Path, local: &Path) -> Result<PullStats, TransportError>;

    /// Hold the lock at `lock_path` (already rebased) until the guard is
    /// dropped, waiting up to `wait` for another holder. The lock dies with
    /// this process and with the connection.
    fn lock(&self, lock_path: &Path, wait: Duration) -> Result<Box<dyn LockGuard>, TransportError>;

    /// [`lock`](Self::lock), then [`run_script`](Self::run_script) under
    /// it. A transport that can sends both at once (one round trip); the
    /// script runs only if the lock was taken.
    fn lock_and_run(
        &self,
        lock_path: &Path,
        wait: Duration,
        script: &str,
        timeout: Duration,
    ) -> Result<(Box<dyn LockGuard>, Output), TransportError> {
        let guard = self.lock(lock_path, wait)?;
        let out = self.run_script(script, timeout)?;
        Ok((guard, out))
    }

    /// Connections and round trips so far.
    fn counters(&self) -> Counters;

    /// Run `script` and turn a non-zero exit into [`TransportError::Remote`].
    fn run_checked(
        &self,
        what: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<Output, TransportError> {
        let out = self.run_script(script, timeout)?;
        self.checked(what, out)
    }

    /// `out` of the step `what` when it exited 0, else
    /// [`TransportError::Remote`] with its standard error.
    fn checked(&self, what: &str, out: Output) -> Result<Output, TransportError> {
        if out.status != 0 {
            return Err(TransportError::Remote {
                target: self.name(),
                what: what.to_string(),
                status: out.status,
                stderr: out.stderr,
                hint: None,
            });
        }
        Ok(out)
    }
}

/// The default time limit of one remote step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How a target lock is taken. See [`lock_holder_script`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMethod {
    /// `flock` where the target has it, else a `mkdir` lock.
    #[default]
    Auto,
    /// Always the `mkdir` lock (what a busybox host without `flock` gets).
    Mkdir,
}

/// The first line a lock holder prints once it holds the lock.
pub const LOCK_HELD: &str = "locked";
/// The first word of the line a lock holder prints when it gave up.
pub const LOCK_BUSY: &str = "busy";

/// The `sh` script that takes the lock at `lock` and holds it exactly
/// while its standard input stays open (the caller keeps the write end:
/// a pipe locally, the SSH channel remotely), so a killed punix or a
/// dropped connection releases it.
///
/// It prints [`LOCK_HELD`] once it holds the lock, or `busy HOLDER` (and
/// exits 2) when `wait` ran out; `HOLDER` is `pid N on HOST since TIME` of
/// the current holder when known.
///
/// - With `flock` (util-linux) on the target: the lock file is opened on
///   fd 9 by the holder shell alone (the `cat` that watches stdin does not
///   inherit it), so killing the holder releases the lock at once. The
///   holder writes its description into the lock file.
/// - Without it (busybox): `mkdir LOCK` is the lock; the holder writes its
///   pid and description into it and removes it on exit (`trap` on EXIT,
///   HUP, INT, TERM). A waiter polls every 0.2 s until `wait` runs out
///   (measured with `date +%s`, so it waits between `wait` and `wait` + 1 s)
///   and takes over a lock only when its recorded pid is dead or a zombie
///   (or, for a directory that has had no pid for 5 s, its maker died
///   before writing one), under a second `mkdir` so two waiters cannot
///   both take it over.
pub fn lock_holder_script(lock: &Path, wait: Duration, method: LockMethod) -> String {
    let flock_arg = if wait.is_zero() {
        "-n".to_string()
    } else {
        format!("-w {:.3}", wait.as_secs_f64())
    };
    let wait_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let method = match method {
        LockMethod::Auto => "auto",
        LockMethod::Mkdir => "mkdir",
    };
    format!(
        r#"lock={lock}
method={method}
info() {{ printf 'pid %s on %s since %s' "$$" "$(uname -n 2>/dev/null)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"; }}
mkdir -p -- "$(dirname -- "$lock")" || exit 3
if [ "$method" = auto ] && command -v flock >/dev/null 2>&1; then
  exec 9>>"$lock" || exit 3
  if ! flock {flock_arg} 9; then
    printf '{busy} %s\n' "$(head -n 1 "$lock" 2>/dev/null)"
    exit 2
  fi
  info > "$lock"
else
  end=$(( $(date +%s) + {wait_secs} ))
  nopid=0
  stuck=0
  while ! mkdir -- "$lock" 2>/dev/null; do
    [ -e "$lock" ] || [ -L "$lock" ] || {{ echo "cannot create the lock directory $lock" >&2; exit 3; }}
    pid=$(cat "$lock/pid" 2>/dev/null)
    stale=0
    if [ -n "$pid" ]; then
      nopid=0
      if ! kill -0 "$pid" 2>/dev/null && [ ! -d "/proc/$pid" ]; then
        stale=1
      elif [ "$(sed -n 's/.*) \([A-Z]\).*/\1/p' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
        stale=1
      fi
    else
      nopid=$((nopid + 1))
      [ "$nopid" -ge 25 ] && stale=1
    fi
    if [ "$stale" = 1 ]; then
      if mkdir -- "$lock.takeover" 2>/dev/null; then
        if [ "$(cat "$lock/pid" 2>/dev/null)" = "$pid" ]; then rm -rf -- "$lock"; fi
        rmdir -- "$lock.takeover"
        nopid=0
        stuck=0
        continue
      fi
      stuck=$((stuck + 1))
      if [ "$stuck" -ge 25 ]; then rmdir -- "$lock.takeover" 2>/dev/null; stuck=0; fi
    fi
    if [ {wait_secs} = 0 ] || [ "$(date +%s)" -gt "$end" ]; then
      printf '{busy} %s\n' "$(cat "$lock/info" 2>/dev/null)"
      exit 2
    fi
    sleep 0.2 2>/dev/null || sleep 1
  done
  trap 'if [ "$(cat "$lock/pid" 2>/dev/null)" = "$$" ]; then rm -rf -- "$lock"; fi' EXIT
  echo "$$" > "$lock/pid"
  info > "$lock/info"
fi
exec 3<&0 </dev/null
cat <&3 >/dev/null 3<&- 9>&- &
c=$!
exec 3<&-
trap 'kill "$c" 2>/dev/null; exit 129' HUP
trap 'kill "$c" 2>/dev/null; exit 130' INT
trap 'kill "$c" 2>/dev/null; exit 143' TERM
echo {held}
wait "$c"
exit 0
"#,
        lock = quote_path(lock),
        busy = LOCK_BUSY,
        held = LOCK_HELD,
    )
}

/// What the first line of a lock holder's output means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReply {
    Held,
    /// Someone else holds it; their description if known.
    Busy(Option<String>),
    /// Anything else: the holder failed (its stderr tells why).
    Failed,
}

/// Read the first line a lock holder printed.
pub fn parse_lock_reply(line: &str) -> LockReply {
    let line = line.trim_end_matches(['\n', '\r']);
    if line == LOCK_HELD {
        return LockReply::Held;
    }
    match line.strip_prefix(LOCK_BUSY) {
        Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
            let holder = rest.trim();
            LockReply::Busy((!holder.is_empty()).then(|| holder.to_string()))
        }
        _ => LockReply::Failed,
    }
}

/// Check a store entry name before it goes to rsync: one plain path
/// component.
pub fn check_entry_name(name: &str) -> Result<(), TransportError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(TransportError::Other(format!(
            "cannot push `{}`: a store entry name is one path component",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// The `Total bytes sent:` figure of `rsync --stats` (digits only, so any
/// thousands separator is fine).
pub fn parse_rsync_bytes_sent(stats: &str) -> Option<u64> {
    parse_rsync_figure(stats, "Total bytes sent:")
}

/// The `Total bytes received:` figure of `rsync --stats`.
pub fn parse_rsync_bytes_received(stats: &str) -> Option<u64> {
    parse_rsync_figure(stats, "Total bytes received:")
}

fn parse_rsync_figure(stats: &str, label: &str) -> Option<u64> {
    stats.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(label)?;
        let digits: String = rest.chars().filter(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

/// The hint for a failed rsync run, from its exit status and stderr.
pub fn rsync_hint(status: i32, stderr: &str) -> Option<String> {
    let missing = stderr.contains("rsync: not found")
        || stderr.contains("rsync: command not found")
        || stderr.contains("rsync: No such file or directory")
        || (status == 127);
    if missing {
        return Some(
            "rsync is missing on the target: install it there (Debian/Ubuntu: `apt-get install rsync`, Alpine: `apk add rsync`, Fedora: `dnf install rsync`)"
                .to_string(),
        );
    }
    if stderr.contains("Permission denied") {
        return Some(
            "the target user cannot write there: pick a directory it owns (`--store-root`), or create it for that user first".to_string(),
        );
    }
    if stderr.contains("No space left on device") {
        return Some("the target's disk is full: free space there (`punix store gc`)".to_string());
    }
    None
}

/// The most bytes of entry names a push passes as arguments; a longer
/// list goes through `--files-from` (rsync handles a list of arguments
/// faster, the standard input has no length limit).
const MAX_NAME_ARG_BYTES: usize = 512 * 1024;

/// Run one prepared `rsync` (its arguments hold `--stats` and its
/// options) that sends the entries `names` of `local_store` into `dest`,
/// and read its statistics. Shared by both transports.
pub(crate) fn run_rsync(
    target: &str,
    cmd: Command,
    local_store: &Path,
    names: &[String],
    dest: &std::ffi::OsStr,
) -> Result<PushStats, TransportError> {
    run_rsync_limited(target, cmd, local_store, names, dest, MAX_NAME_ARG_BYTES)
}

fn run_rsync_limited(
    target: &str,
    mut cmd: Command,
    local_store: &Path,
    names: &[String],
    dest: &std::ffi::OsStr,
    max_arg_bytes: usize,
) -> Result<PushStats, TransportError> {
    for n in names {
        check_entry_name(n)?;
    }
    // Test hook: a slow link, so a test can stop a push half-way.
    if let Ok(kbps) = std::env::var("PUNIX_TEST_BWLIMIT") {
        cmd.arg(format!("--bwlimit={kbps}"));
    }
    let mut list = Vec::new();
    let prefix = local_store.as_os_str().len() + 1;
    if names.iter().map(|n| prefix + n.len() + 1).sum::<usize>() <= max_arg_bytes {
        // Each entry by its path (no trailing slash): it lands as
        // `dest/name`.
        cmd.arg("--")
            .args(names.iter().map(|n| local_store.join(n)))
            .arg(dest);
    } else {
        for n in names {
            list.extend_from_slice(n.as_bytes());
            list.push(0);
        }
        let mut src = local_store.as_os_str().to_os_string();
        src.push("/");
        cmd.args(["-r", "--from0", "--files-from=-"])
            .arg(src)
            .arg(dest);
    }
    let stdout = run_rsync_with_input(target, "to", cmd, list)?;
    Ok(PushStats {
        bytes_sent: parse_rsync_bytes_sent(&stdout).unwrap_or(0),
    })
}

/// Run one prepared `rsync` (its arguments hold `--stats`) with `input` on
/// its standard input; its standard output (the statistics) on success.
pub(crate) fn run_rsync_with_input(
    target: &str,
    direction: &'static str,
    mut cmd: Command,
    list: Vec<u8>,
) -> Result<String, TransportError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| TransportError::Spawn {
        program: "rsync".into(),
        package: "rsync".into(),
        source,
    })?;
    let stdin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&list);
        }
    });
    let mut stderr_pipe = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr_pipe.as_mut() {
            let _ = e.read_to_end(&mut s);
        }
        s
    });
    let mut stdout = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    let status = child
        .wait()
        .map_err(|e| TransportError::Other(format!("rsync: {e}")))?;
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    if !status.success() {
        let code = exit_code(status);
        return Err(TransportError::Rsync {
            direction,
            target: target.to_string(),
            status: code,
            hint: rsync_hint(code, &stderr),
            stderr,
        });
    }
    Ok(stdout)
}

/// A process's exit code, or 128 + the signal that ended it (as `sh`
/// reports it).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_replies() {
        assert_eq!(parse_lock_reply("locked\n"), LockReply::Held);
        assert_eq!(parse_lock_reply("busy \n"), LockReply::Busy(None));
        assert_eq!(
            parse_lock_reply("busy pid 4 on h1 since 2026-01-01T00:00:00Z\n"),
            LockReply::Busy(Some("pid 4 on h1 since 2026-01-01T00:00:00Z".into()))
        );
        assert_eq!(parse_lock_reply(""), LockReply::Failed);
        assert_eq!(parse_lock_reply("busybox"), LockReply::Failed);
    }

    #[test]
    fn rsync_stats() {
        let s = "Number of files: 3\nTotal bytes sent: 1,234,567\nTotal bytes received: 35\n";
        assert_eq!(parse_rsync_bytes_sent(s), Some(1_234_567));
        assert_eq!(
            parse_rsync_bytes_sent("Total bytes sent: 98.765\n"),
            Some(98_765)
        );
        assert_eq!(parse_rsync_bytes_sent("nothing"), None);
        assert_eq!(parse_rsync_bytes_received(s), Some(35));
    }

    #[test]
    fn rsync_missing_gets_a_hint() {
        let h = rsync_hint(
            12,
            "sh: 1: rsync: not found\nrsync: connection unexpectedly closed",
        );
        assert!(h.unwrap_or_default().contains("install"));
        assert!(rsync_hint(127, "").is_some());
        assert!(rsync_hint(23, "some files vanished").is_none());
    }

    /// Both ways of naming what to push (arguments, or `--files-from`
    /// for a long list) deliver the same entries, and only those.
    #[test]
    fn pushes_by_arguments_or_by_list() {
        let src = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..5).map(|i| format!("{i:032x}-m{i}-1")).collect();
        for n in &names {
            std::fs::create_dir_all(src.path().join(n).join("share")).expect("mkdir");
            std::fs::write(src.path().join(n).join("share/a"), n).expect("write");
            std::fs::write(src.path().join(n).join("built"), "").expect("write");
        }
        std::fs::create_dir_all(src.path().join("not-pushed")).expect("mkdir");
        let wanted = &names[1..4];
        for limit in [0, MAX_NAME_ARG_BYTES] {
            let dst = tempfile::tempdir().expect("tempdir");
            let mut d = dst.path().as_os_str().to_os_string();
            d.push("/");
            let mut cmd = Command::new("rsync");
            cmd.args(["-a", "--stats"]);
            let stats = run_rsync_limited("local", cmd, src.path(), wanted, &d, limit)
                .expect("rsync (install it: apt-get install rsync)");
            assert!(stats.bytes_sent > 0);
            let mut got: Vec<String> = std::fs::read_dir(dst.path())
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            got.sort();
            assert_eq!(got, wanted, "limit {limit}");
            for n in wanted {
                assert_eq!(
                    std::fs::read_to_string(dst.path().join(n).join("share/a")).expect("read"),
                    *n
                );
            }
        }
    }

    #[test]
    fn entry_names() {
        assert!(check_entry_name("0123-api-1.0").is_ok());
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            assert!(check_entry_name(bad).is_err(), "{bad:?}");
        }
    }
}
