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

pub mod local;
pub mod script;
pub mod ssh;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use script::quote;

/// Errors of reaching or using a target.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to `{target}`: {reason}{}", hint_suffix(.hint))]
    Connect {
        target: String,
        reason: String,
        hint: Option<String>,
    },
    #[error("the connection to `{target}` is gone ({reason})\n  hint: check that the host is up and sshd runs, then retry; a deploy that stopped here left the target on its old generation")]
    Dead { target: String, reason: String },
    #[error("`{what}` on `{target}` did not finish within {secs}s\n  hint: the host or the network may be overloaded; retry, or raise `--timeout`")]
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
    #[error("rsync to `{target}` failed (exit status {status}){}{}", stderr_suffix(.stderr), hint_suffix(.hint))]
    Rsync {
        target: String,
        status: i32,
        stderr: String,
        hint: Option<String>,
    },
    #[error("cannot start `{program}`: {source}\n  hint: install it (Debian: `apt-get install {package}`)")]
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
    /// rsync run: `remote_dir/<name>/...`.
    fn push(
        &self,
        local_store: &Path,
        names: &[String],
        remote_dir: &Path,
    ) -> Result<PushStats, TransportError>;

    /// Hold the lock at `lock_path` (already rebased) until the guard is
    /// dropped, waiting up to `wait` for another holder. The lock dies with
    /// this process and with the connection.
    fn lock(&self, lock_path: &Path, wait: Duration) -> Result<Box<dyn LockGuard>, TransportError>;

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
