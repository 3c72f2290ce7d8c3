//! The agent: one `sh` on the target that stays for the whole connection
//! and runs the scripts it is sent, one after another, each in a subshell.
//!
//! It is the command of the SSH master's own first session, so it starts
//! in the same round trip as the login, and every later script costs one
//! network round trip instead of a channel of its own (open, exec, close:
//! two to three). It can also hold the target lock itself (an `flock` on
//! its fd 9), which makes taking the lock one round trip and releasing it
//! none: the release is a line sent without waiting, and the lock dies with
//! the agent when punix or the connection goes.
//!
//! Protocol, over the agent's standard input and output:
//! - punix sends [`bootstrap`] once, then for every script the text of
//!   [`frame`]: the script inside `( ... )`, with standard input from
//!   `/dev/null`, fd 9 closed, standard error into a private temporary file.
//! - After each script the agent prints a newline, then the line
//!   `MARKER STATUS N`, then the N bytes of the script's standard error.
//!   MARKER is random per connection, so a script's output cannot fake it;
//!   the newline before it makes the marker start a line whatever the
//!   script printed, and is taken off again.
//! - The bootstrap answers with a frame of its own whose output is `pid=PID`
//!   (for a kill on time-out: the agent leads its process group).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::Output;
use super::script::quote_path;

/// What went wrong with the agent itself (not with a script it ran).
#[derive(Debug)]
pub(crate) enum AgentError {
    /// Its output ended: the shell or the connection is gone.
    Ended,
    /// Its output broke the protocol.
    Garbled(String),
}

/// A random marker for one connection.
pub(crate) fn new_marker() -> String {
    let mut bytes = [0u8; 16];
    if getrandom(&mut bytes).is_err() {
        // The pid and the time still make a collision with script output
        // implausible.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    let mut s = String::from("PUNIX-AGENT-");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// What the agent runs first: its helpers, then a frame saying its pid.
pub(crate) fn bootstrap(marker: &str) -> String {
    // Its standard error file is named after the marker: random, so
    // created without `mktemp` (and exclusively, `set -C`).
    let suffix = marker.rsplit('-').next().unwrap_or(marker);
    format!(
        r#"PUNIX_M={marker}
export LC_ALL=C
PUNIX_E=${{TMPDIR:-/tmp}}/punix-agent.{suffix}
(set -C; umask 077; : >"$PUNIX_E") 2>/dev/null || PUNIX_E=$(mktemp "${{TMPDIR:-/tmp}}/punix-agent.XXXXXX") || exit 97
trap 'rm -f "$PUNIX_E"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
punix_frame() {{
  if [ -s "$PUNIX_E" ]; then punix_n=$(wc -c <"$PUNIX_E"); else punix_n=0; fi
  printf '\n%s %s %s\n' "$PUNIX_M" "$1" $punix_n
  [ "$punix_n" = 0 ] || cat "$PUNIX_E"
  : >"$PUNIX_E"
}}
PUNIX_LOCKED=
PUNIX_HOST=
punix_lock() {{
  PUNIX_LOCKED=
  command -v flock >/dev/null 2>&1 || {{ echo fallback; return 0; }}
  case $1 in */*) [ -d "${{1%/*}}/" ] || mkdir -p -- "${{1%/*}}/" 2>/dev/null ;; esac
  ( : >>"$1" ) 2>/dev/null || {{ echo fallback; return 0; }}
  exec 9>>"$1"
  if flock $2 9; then
    [ -n "$PUNIX_HOST" ] || read -r PUNIX_HOST </proc/sys/kernel/hostname 2>/dev/null || PUNIX_HOST=$(uname -n 2>/dev/null)
    printf 'pid %s on %s since %s' "$$" "$PUNIX_HOST" "$3" >"$1"
    PUNIX_LOCKED=1
    echo locked
  else
    printf 'busy %s\n' "$(head -n 1 "$1" 2>/dev/null)"
    exec 9>&-
  fi
}}
echo "pid=$$"
punix_frame 0
"#
    )
}

/// The text that runs `script` in the agent and frames its answer. The
/// script travels as one single-quoted word and runs through `eval` in a
/// subshell, so whatever it holds (a syntax error, an unclosed quote, an
/// `exit`) stays inside that subshell.
pub(crate) fn frame(script: &str) -> String {
    format!("PUNIX_S={}\n{RUN_FRAMED}; PUNIX_S=\n", super::quote(script))
}

/// Runs the script in `$PUNIX_S` and frames its answer.
const RUN_FRAMED: &str = "( eval \"$PUNIX_S\" ) </dev/null 9>&- 2>\"$PUNIX_E\"; punix_frame $?";

/// The text that takes the lock at `lock` in the agent itself. Its answer
/// is `locked`, `busy HOLDER`, or `fallback` (no `flock` there, or the lock
/// file cannot be opened: the caller takes the lock another way, which
/// also reports why).
pub(crate) fn lock_command(lock: &Path, wait: Duration) -> String {
    let arg = if wait.is_zero() {
        "-n".to_string()
    } else {
        format!("-w {:.3}", wait.as_secs_f64())
    };
    // The time the lock was taken is this machine's: one process fewer
    // on the target than asking its `date`.
    format!(
        "punix_lock {} '{arg}' {} 2>\"$PUNIX_E\"; punix_frame $?\n",
        quote_path(lock),
        crate::clock::utc_now()
    )
}

/// [`frame`], run only if the lock command sent just before took the
/// lock; else its answer is status [`SKIPPED`] and nothing ran. Sent right
/// behind [`lock_command`], the lock and the script cost one round trip.
pub(crate) fn frame_if_locked(script: &str) -> String {
    format!(
        "PUNIX_S={}\nif [ -n \"$PUNIX_LOCKED\" ]; then {RUN_FRAMED}; else punix_frame {SKIPPED}; fi; PUNIX_S=\n",
        super::quote(script)
    )
}

/// The status of a [`frame_if_locked`] that did not run.
pub(crate) const SKIPPED: i32 = 254;

/// The text that lets the lock go; it answers nothing.
pub(crate) const UNLOCK: &str = "exec 9>&-; PUNIX_LOCKED=\n";

/// The most standard error one script may leave (64 MiB).
const MAX_STDERR: u64 = 64 << 20;

/// One agent: the write end of its input and the read end of its output.
pub(crate) struct Agent {
    input: Option<Box<dyn AsyncWrite + Unpin + Send>>,
    output: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    marker: String,
    /// The agent's pid on the target, once it said it.
    pub pid: Option<u32>,
    /// Whether the agent holds the lock (fd 9).
    pub holds_lock: bool,
}

impl Agent {
    pub fn new(
        input: Box<dyn AsyncWrite + Unpin + Send>,
        output: Box<dyn AsyncRead + Unpin + Send>,
        marker: String,
    ) -> Agent {
        Agent {
            input: Some(input),
            output: BufReader::new(output),
            marker,
            pid: None,
            holds_lock: false,
        }
    }

    /// Send text without waiting for anything.
    pub async fn send(&mut self, text: &str) -> Result<(), AgentError> {
        let Some(input) = self.input.as_mut() else {
            return Err(AgentError::Ended);
        };
        input
            .write_all(text.as_bytes())
            .await
            .map_err(|_| AgentError::Ended)?;
        input.flush().await.map_err(|_| AgentError::Ended)
    }

    /// Whether the agent's output has already ended (it died while idle):
    /// looks without waiting.
    pub async fn ended(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::ZERO, self.output.fill_buf()).await,
            Ok(Ok([])) | Ok(Err(_))
        )
    }

    /// Read the bootstrap's frame: the agent's pid.
    pub async fn hello(&mut self) -> Result<u32, AgentError> {
        let out = self.read_frame().await?;
        let pid = out
            .stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| AgentError::Garbled(format!("no pid in {:?}", out.stdout)))?;
        self.pid = Some(pid);
        Ok(pid)
    }

    /// Send `script` and wait for its answer.
    pub async fn run(&mut self, script: &str) -> Result<Output, AgentError> {
        self.send(&frame(script)).await?;
        self.read_frame().await
    }

    /// Read the next frame.
    pub async fn read_frame(&mut self) -> Result<Output, AgentError> {
        let mut out: Vec<u8> = Vec::new();
        let (status, n) = loop {
            let start = out.len();
            let got = self
                .output
                .read_until(b'\n', &mut out)
                .await
                .map_err(|_| AgentError::Ended)?;
            if got == 0 {
                return Err(AgentError::Ended);
            }
            let line = &out[start..];
            if let Some(rest) = line
                .strip_prefix(self.marker.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                let text = String::from_utf8_lossy(rest).trim().to_string();
                let mut words = text.split_whitespace();
                let parse = |w: Option<&str>| w.and_then(|w| w.parse::<u64>().ok());
                match (parse(words.next()), parse(words.next())) {
                    (Some(status), Some(n)) => {
                        out.truncate(start);
                        break (status, n);
                    }
                    _ => return Err(AgentError::Garbled(format!("bad frame line `{text}`"))),
                }
            }
        };
        // The newline the frame put before the marker.
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        // Standard error is kept in memory: a length beyond any script's
        // is a broken stream, not an allocation to make.
        if n > MAX_STDERR {
            return Err(AgentError::Garbled(format!(
                "a standard error of {n} bytes announced"
            )));
        }
        let mut err = vec![0u8; usize::try_from(n).unwrap_or(0)];
        self.output
            .read_exact(&mut err)
            .await
            .map_err(|_| AgentError::Ended)?;
        Ok(Output {
            status: i32::try_from(status).unwrap_or(255),
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        })
    }

    /// End the agent: close its input (it exits at the end of it).
    pub fn close(&mut self) {
        self.input = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// An agent over a local `sh`: the same protocol without SSH.
    async fn local_agent(shell: &str) -> Option<(Agent, tokio::process::Child)> {
        let mut child = tokio::process::Command::new(shell)
            .arg("-s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let input = child.stdin.take()?;
        let output = child.stdout.take()?;
        let marker = new_marker();
        let mut a = Agent::new(Box::new(input), Box::new(output), marker.clone());
        a.send(&bootstrap(&marker)).await.ok()?;
        a.hello().await.ok()?;
        Some((a, child))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    fn shells() -> Vec<&'static str> {
        ["/bin/sh", "/bin/dash", "/bin/bash"]
            .into_iter()
            .filter(|s| Path::new(s).exists())
            .collect()
    }

    #[test]
    fn runs_scripts_one_after_another() {
        for sh in shells() {
            rt().block_on(async {
                let (mut a, _child) = local_agent(sh).await.expect("agent starts");
                assert!(a.pid.is_some_and(|p| p > 1));
                let o = a.run("echo one; echo two >&2; exit 3").await.expect("runs");
                assert_eq!((o.status, o.stdout.as_str()), (3, "one\n"), "{sh}");
                assert_eq!(o.stderr, "two\n", "{sh}");
                // No newline at the end, no output at all, a heredoc, a
                // script that sets -e and traps EXIT: the agent goes on.
                let o = a.run("printf 'no newline'").await.expect("runs");
                assert_eq!((o.status, o.stdout.as_str(), o.stderr.as_str()), (0, "no newline", ""));
                let o = a.run("true").await.expect("runs");
                assert_eq!((o.status, o.stdout.as_str()), (0, ""));
                let o = a
                    .run("set -e\ntrap 'echo bye' EXIT\ncat <<'EOF'\na )\nEOF\nfalse\necho unreachable")
                    .await
                    .expect("runs");
                assert_eq!((o.status, o.stdout.as_str()), (1, "a )\nbye\n"), "{sh}");
                // A syntax error, an unclosed quote, an empty script.
                let o = a.run("echo before; if then fi").await.expect("runs");
                assert_ne!(o.status, 0, "{sh}");
                assert!(!o.stderr.is_empty(), "{sh}: {o:?}");
                let o = a.run("echo 'unclosed").await.expect("runs");
                assert_ne!(o.status, 0, "{sh}");
                let o = a.run("").await.expect("runs");
                assert_eq!((o.status, o.stdout.as_str()), (0, ""));
                let o = a.run("printf '%s' \"it's \\\"q\\\" $((1+1))\"").await.expect("runs");
                assert_eq!(o.stdout, "it's \"q\" 2", "{sh}");
                // A script cannot read the agent's input.
                let o = a.run("cat; echo after").await.expect("runs");
                assert_eq!(o.stdout, "after\n");
                let o = a.run("printf '%s' \"$PUNIX_M\" | wc -c").await.expect("runs");
                assert_eq!(o.stdout.trim(), "44", "the marker is there for the script too");
                // Standard error of the last script does not leak into the next.
                let o = a.run("echo out").await.expect("runs");
                assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", ""));
                // Ends at the end of its input.
                assert!(!a.ended().await);
                a.close();
                assert!(matches!(a.read_frame().await, Err(AgentError::Ended)));
            });
        }
    }

    #[test]
    fn holds_the_lock_until_told_or_gone() {
        if !shells().contains(&"/bin/sh") || which("flock").is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "flock (util-linux) is needed for this test"
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = dir.path().join("a b/.lock");
        rt().block_on(async {
            let (mut a, _c1) = local_agent("/bin/sh").await.expect("agent");
            let (mut b, _c2) = local_agent("/bin/sh").await.expect("agent");
            a.send(&lock_command(&lock, Duration::ZERO))
                .await
                .expect("send");
            assert_eq!(a.read_frame().await.expect("reply").stdout, "locked\n");
            let holder = std::fs::read_to_string(&lock).expect("lock file");
            assert!(
                holder.starts_with(&format!("pid {}", a.pid.unwrap_or(0))),
                "{holder}"
            );
            // Scripts run while the lock is held do not keep it.
            let o = a
                .run("sleep 5 >/dev/null 2>&1 & echo started")
                .await
                .expect("runs");
            assert_eq!(o.stdout, "started\n");
            b.send(&lock_command(&lock, Duration::from_millis(300)))
                .await
                .expect("send");
            let busy = b.read_frame().await.expect("reply").stdout;
            assert!(busy.starts_with("busy pid "), "{busy}");
            // A script sent behind a lock that was not taken does not run.
            b.send(&lock_command(&lock, Duration::ZERO))
                .await
                .expect("send");
            b.send(&frame_if_locked("echo ran")).await.expect("send");
            assert!(
                b.read_frame()
                    .await
                    .expect("reply")
                    .stdout
                    .starts_with("busy")
            );
            let o = b.read_frame().await.expect("reply");
            assert_eq!((o.status, o.stdout.as_str()), (SKIPPED, ""));
            a.send(UNLOCK).await.expect("send");
            b.send(&lock_command(&lock, Duration::from_secs(5)))
                .await
                .expect("send");
            b.send(&frame_if_locked("echo ran")).await.expect("send");
            assert_eq!(b.read_frame().await.expect("reply").stdout, "locked\n");
            let o = b.read_frame().await.expect("reply");
            assert_eq!((o.status, o.stdout.as_str()), (0, "ran\n"));
            // The holder going away lets go too.
            b.close();
            drop(b);
            a.send(&lock_command(&lock, Duration::from_secs(5)))
                .await
                .expect("send");
            assert_eq!(a.read_frame().await.expect("reply").stdout, "locked\n");
        });
    }

    fn which(program: &str) -> Option<std::path::PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|f| f.exists())
        })
    }

    #[test]
    fn an_absurd_stderr_length_is_a_broken_stream() {
        rt().block_on(async {
            let (mut a, _c) = local_agent("/bin/sh").await.expect("agent");
            let o = a.run("printf '\\n%s 0 99999999999\\n' \"$PUNIX_M\"").await;
            assert!(matches!(o, Err(AgentError::Garbled(_))), "{o:?}");
        });
    }

    #[test]
    fn frames_survive_a_marker_lookalike() {
        rt().block_on(async {
            let (mut a, _c) = local_agent("/bin/sh").await.expect("agent");
            let o = a
                .run("echo 'PUNIX-AGENT-00 0 0'; printf 'x\\n\\n'")
                .await
                .expect("runs");
            assert_eq!(o.stdout, "PUNIX-AGENT-00 0 0\nx\n\n");
        });
    }
}
