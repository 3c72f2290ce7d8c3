//! The local transport: every target path lives under a root directory on
//! this machine (`--transport-root`, and the tests' temp dirs).
//!
//! Scripts run as `/bin/sh -s` with the script on standard input and the
//! root as working directory, in a process group of their own, so a
//! timeout kills the script and everything it started. A push is one local
//! `rsync` run, and so is a pull. The lock is the same holder script the SSH transport runs
//! ([`lock_holder_script`]), here a child `sh` whose standard input is a
//! pipe this process holds: when this process dies the pipe closes and the
//! lock is released.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{
    Counters, LockGuard, LockMethod, LockReply, Output, PullStats, PushStats, Transport,
    TransportError, exit_code, lock_holder_script, parse_lock_reply, parse_rsync_bytes_sent,
    run_rsync, run_rsync_with_input,
};

/// How long a lock holder may take, beyond the wait it was given, to say
/// whether it got the lock.
const LOCK_REPLY_SLACK: Duration = Duration::from_secs(30);
/// How long dropping a lock guard waits for the holder to let go.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The target is a directory on this machine.
#[derive(Debug)]
pub struct LocalTransport {
    root: PathBuf,
    lock_method: LockMethod,
    round_trips: AtomicU64,
}

impl LocalTransport {
    /// A transport whose target paths live under `root` (created when
    /// first needed).
    pub fn new(root: PathBuf) -> Self {
        LocalTransport {
            root,
            lock_method: LockMethod::Auto,
            round_trips: AtomicU64::new(0),
        }
    }

    /// Take locks with `method` (tests use [`LockMethod::Mkdir`] to run
    /// the busybox fallback here too).
    pub fn with_lock_method(mut self, method: LockMethod) -> Self {
        self.lock_method = method;
        self
    }

    /// The directory that stands for the target's `/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ensure_root(&self) -> Result<(), TransportError> {
        fs::create_dir_all(&self.root).map_err(|e| {
            TransportError::Other(format!(
                "cannot create the transport root `{}`: {e}",
                self.root.display()
            ))
        })
    }

    fn spawn_sh(&self, cmd: &mut Command) -> Result<Child, TransportError> {
        cmd.spawn().map_err(|source| TransportError::Spawn {
            program: "/bin/sh".into(),
            package: "dash".into(),
            source,
        })
    }
}

/// Read a pipe to its end on a thread of its own; the result arrives on
/// the returned channel.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: killpg only sends a signal; the group is the one this
        // transport made for the script (its leader is our child).
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill only sends a signal, to our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Transport for LocalTransport {
    fn name(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn rebase(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn run_script(&self, script: &str, timeout: Duration) -> Result<Output, TransportError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.ensure_root()?;
        let deadline = Instant::now() + timeout;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-s")
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = self.spawn_sh(&mut cmd)?;
        let pgid = i32::try_from(child.id()).unwrap_or(0);
        let stdin = child.stdin.take();
        let bytes = script.as_bytes().to_vec();
        thread::spawn(move || {
            if let Some(mut stdin) = stdin {
                // The script may end before reading all of its text.
                let _ = stdin.write_all(&bytes);
            }
        });
        let out_rx = drain(child.stdout.take());
        let err_rx = drain(child.stderr.take());
        let (wait_tx, wait_rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = wait_tx.send(child.wait());
        });
        let timed_out = || TransportError::Timeout {
            target: self.name(),
            what: "sh -s".into(),
            secs: ceil_secs(timeout),
        };
        let status = match wait_rx.recv_timeout(timeout) {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(TransportError::Other(format!("waiting for `sh`: {e}"))),
            Err(_) => {
                kill_group(pgid);
                let _ = wait_rx.recv();
                return Err(timed_out());
            }
        };
        // Something the script left running in the background may still
        // hold its output open: bounded by the same deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        let stdout = match out_rx.recv_timeout(left) {
            Ok(b) => b,
            Err(_) => {
                kill_group(pgid);
                return Err(timed_out());
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let stderr = match err_rx.recv_timeout(left.max(Duration::from_millis(100))) {
            Ok(b) => b,
            Err(_) => {
                kill_group(pgid);
                return Err(timed_out());
            }
        };
        Ok(Output {
            status: exit_code(status),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    fn push(
        &self,
        local_store: &Path,
        names: &[String],
        remote_dir: &Path,
    ) -> Result<PushStats, TransportError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        fs::create_dir_all(remote_dir).map_err(|e| {
            TransportError::Other(format!(
                "cannot create `{}` on `{}`: {e}",
                remote_dir.display(),
                self.name()
            ))
        })?;
        let mut dst = OsString::from(remote_dir.as_os_str());
        dst.push("/");
        let mut cmd = Command::new("rsync");
        cmd.args(["-a", "--inplace", "--stats"]).env("LC_ALL", "C");
        run_rsync(&self.name(), cmd, local_store, names, &dst)
    }

    fn pull(&self, remote: &Path, local: &Path) -> Result<PullStats, TransportError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut src = OsString::from(remote.as_os_str());
        src.push("/");
        let mut dst = OsString::from(local.as_os_str());
        dst.push("/");
        let mut cmd = Command::new("rsync");
        cmd.args(["-a", "--no-owner", "--no-group", "--stats"])
            .arg(src)
            .arg(dst)
            .env("LC_ALL", "C");
        let stats = run_rsync_with_input(&self.name(), "from", cmd, Vec::new())?;
        // A local copy's sender is this side: what it sent is what moved.
        Ok(PullStats {
            bytes_received: parse_rsync_bytes_sent(&stats).unwrap_or(0),
        })
    }

    fn lock(&self, lock_path: &Path, wait: Duration) -> Result<Box<dyn LockGuard>, TransportError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.ensure_root()?;
        let script = lock_holder_script(lock_path, wait, self.lock_method);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn_sh(&mut cmd)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let err_rx = drain(child.stderr.take());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let mut r = BufReader::new(out);
                let _ = r.read_line(&mut line);
                // Keep reading so the holder never blocks on a full pipe.
                let _ = tx.send(line);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            } else {
                let _ = tx.send(line);
            }
        });
        let (mut guard, pid) = LocalLockGuard::new(child, stdin);
        let line = match rx.recv_timeout(wait + LOCK_REPLY_SLACK) {
            Ok(line) => line,
            Err(_) => {
                kill_pid(pid);
                return Err(TransportError::Timeout {
                    target: self.name(),
                    what: format!("taking the lock `{}`", lock_path.display()),
                    secs: ceil_secs(wait + LOCK_REPLY_SLACK),
                });
            }
        };
        match parse_lock_reply(&line) {
            LockReply::Held => Ok(Box::new(guard)),
            LockReply::Busy(holder) => Err(TransportError::Locked {
                target: self.name(),
                path: lock_path.display().to_string(),
                holder,
            }),
            LockReply::Failed => {
                drop(guard.stdin.take());
                let status = guard.exited.recv_timeout(LOCK_RELEASE_WAIT).unwrap_or(-1);
                let stderr = err_rx
                    .recv_timeout(Duration::from_secs(5))
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                Err(TransportError::Remote {
                    target: self.name(),
                    what: format!("take the lock `{}`", lock_path.display()),
                    status,
                    stderr,
                    hint: None,
                })
            }
        }
    }

    fn counters(&self) -> Counters {
        Counters {
            connections: 0,
            round_trips: self.round_trips.load(Ordering::Relaxed),
        }
    }
}

/// Holds a local lock: the write end of the holder's stdin, and the
/// thread that reaps the holder (so a killed holder is gone at once, not a
/// zombie that still looks alive to a waiter).
struct LocalLockGuard {
    stdin: Option<ChildStdin>,
    /// The holder's exit code, once it has exited.
    exited: mpsc::Receiver<i32>,
}

impl LocalLockGuard {
    fn new(mut child: Child, stdin: Option<ChildStdin>) -> (Self, u32) {
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let code = child.wait().map(exit_code).unwrap_or(-1);
            let _ = tx.send(code);
        });
        (LocalLockGuard { stdin, exited: rx }, pid)
    }
}

impl LockGuard for LocalLockGuard {}

impl Drop for LocalLockGuard {
    fn drop(&mut self) {
        // End of input tells the holder to let go; wait until it has, so
        // the lock is free when the guard is gone.
        drop(self.stdin.take());
        let _ = self.exited.recv_timeout(LOCK_RELEASE_WAIT);
    }
}
