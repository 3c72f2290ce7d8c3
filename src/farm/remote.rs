//! Agentless builds of one derivation on a builder, over a [`Transport`].
//!
//! A builder needs only `sh`, coreutils (or busybox) and rsync: nothing of
//! punix is installed there. One build is, over one connection:
//!
//! 1. **prepare** (one round trip): make the store root, sweep what lost
//!    builds left behind, say which entries of the inputs' closure the
//!    builder lacks (an entry counts only with its `built` marker), and
//!    make a fresh build directory (`mktemp -d`);
//! 2. **push** (transfers): the missing inputs in one rsync run into a
//!    temporary directory of the builder's store, the source tree in one
//!    more into the build directory;
//! 3. **build** (one round trip): rename the pushed inputs into place,
//!    write the embedded builder script, run it with the same clean
//!    environment as a local build ([`build_env`]) and `$out` a temporary
//!    sibling in the builder's store exactly as long as the final path,
//!    then compute the output's content hash there ([`CONTENT_HASH_SH`]);
//!    the build log comes back on the script's stderr;
//! 4. **pull** (one transfer): the raw output into a local temporary of the
//!    same length, whose content hash must equal the builder's;
//! 5. **install**: replace the builder's temporary path by the final path
//!    (same length) in every file and link, then install as a local build
//!    does (its content hash is computed then, as for local builds);
//! 6. **cleanup** (one round trip): remove the builder's temporary output.
//!
//! The store root is the same absolute path on the builder as here. On the
//! builder, pushed inputs appear under their final names only by a rename
//! of a complete entry (one with `built`). A temporary there is named like
//! a local one (`.tmp` + 28 letters, the first 8 the pid of the shell that
//! made it); the prepare step of a later build removes temporaries and
//! build directories that are older than [`STALE_AFTER_MINUTES`] and whose
//! process is gone, so a builder killed or disconnected mid-build does not
//! fill its disk.
//!
//! A failure is either the build's ([`RemoteError::Build`]: the script
//! failed, the output was rejected; another builder would fail the same
//! way) or the builder's ([`RemoteError::Builder`]: unreachable, killed,
//! disconnected, store not writable, a hash mismatch after the pull),
//! after which the router tries the next builder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::build::BuildError;
use crate::build::builders;
use crate::build::local::{Outcome, build_env};
use crate::build::plan::Node;
use crate::files;
use crate::store::content_hash::hash_tree;
use crate::store::{Store, StoreError};
use crate::transport::script::{mark_in_use, words, write_staged};
use crate::transport::{Transport, TransportError, quote, quote_path};

/// Temporaries and build directories a lost build left on a builder are
/// removed by a later build once they are this old and their process is
/// gone.
pub const STALE_AFTER_MINUTES: u32 = 120;

/// Bound on the small steps (prepare, cleanup).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The prefix of build directories on a builder (in its `$TMPDIR`).
const BUILD_DIR_PREFIX: &str = "punix-build-";

/// The letters of a temporary's name (as in [`crate::store`]).
const TMP_ALPHABET: &str = "ghijklmnopqrstuvwxyz";

/// The steps of a remote build, as `punix builders check` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Open the SSH connection.
    Connect,
    /// System, tools, store root, load.
    Probe,
    /// Prepare the builder, send the missing inputs and the source.
    Push,
    /// Run the builder script.
    Build,
    /// The output's content hash, computed on the builder.
    Hash,
    /// Bring the output back.
    Pull,
    /// Check the hash here, rewrite the temporary path, install.
    Verify,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Connect,
        Step::Probe,
        Step::Push,
        Step::Build,
        Step::Hash,
        Step::Pull,
        Step::Verify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Probe => "probe",
            Step::Push => "push",
            Step::Build => "build",
            Step::Hash => "hash",
            Step::Pull => "pull",
            Step::Verify => "verify",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a remote build failed.
#[derive(Debug)]
pub enum RemoteError {
    /// The build itself failed (the script, or its output was rejected):
    /// another builder would fail the same way.
    Build(BuildError),
    /// The builder failed at `step` (unreachable, killed, disconnected,
    /// store not writable, a hash mismatch): the next builder may succeed.
    Builder { step: Step, reason: String },
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Build(e) => write!(f, "{e}"),
            RemoteError::Builder { step, reason } => write!(f, "{step} step failed: {reason}"),
        }
    }
}

/// A builder to build on: how it is named and reached.
pub struct RemoteBuilder<'a> {
    /// The builder's name (for messages).
    pub name: &'a str,
    /// Its URL (for messages).
    pub url: &'a str,
    pub transport: &'a dyn Transport,
    /// Builds it runs at once: it shares its cores among them.
    pub max_jobs: usize,
    /// Bound on the build step (the builder script and the hash).
    pub build_timeout: Duration,
}

/// What one remote build did, for `builders check` and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct RemoteReport {
    /// Inputs the builder lacked and got.
    pub pushed_inputs: usize,
    /// The content hash the builder computed of the raw output.
    pub remote_hash: String,
    /// Bytes of the output pulled back.
    pub bytes_pulled: u64,
}

/// The content hash of [`crate::store::content_hash`] in POSIX `sh`, for
/// builders: the function `punix_content_hash DIR SCRATCH` prints
/// `sha256:<hex>` of the tree at `DIR`, exactly as `hash_tree` computes it.
///
/// The walk is one `find` with `stat -c` (busybox and GNU alike). Pre-order
/// with each directory's children sorted by the bytes of their names is
/// the order of the relative paths sorted bytewise once every `/` is
/// replaced by a byte below any other a name can hold (`\001`), so one
/// `LC_ALL=C sort` of the paths gives it. The fields of each line are
/// separated by `\002`, so the sort key is the path alone. Names holding a
/// newline, `\001` or `\002` cannot travel in such lines and are refused,
/// as are devices, sockets and fifos. Each record is printed with its NUL
/// separators by `printf` and the stream goes through one `sha256sum`; each
/// file's bytes through a `sha256sum` of their own. `SCRATCH` is a file
/// name the function may create and removes (the sorted listing).
///
/// Exit status: 0 with the hash on stdout; 3 for a name or file type it
/// refuses, 1 for anything else, with the reason on stderr.
pub const CONTENT_HASH_SH: &str = r#"punix_content_hash() (
  LC_ALL=C
  export LC_ALL
  cd "$1" || exit 1
  ph_list=$2
  ph_s1=$(printf '\001')
  ph_s2=$(printf '\002')
  ph_nl='
'
  ph_bad=$(find . \( -name "*$ph_nl*" -o -name "*$ph_s1*" -o -name "*$ph_s2*" \) -print 2>/dev/null | head -c 300)
  if [ -n "$ph_bad" ]; then
    echo "punix: cannot hash the output: a file name holds a newline or a control character (\\001, \\002) that the builder-side hash cannot carry: $ph_bad" >&2
    exit 3
  fi
  ph_special=$(find . ! -type f ! -type d ! -type l -print 2>/dev/null | head -n 1)
  if [ -n "$ph_special" ]; then
    echo "punix: \`${ph_special#./}\` in the output is not a file, directory or symlink; a store tree may hold only those" >&2
    exit 3
  fi
  find . -exec stat -c "%n$ph_s2%f$ph_s2%s" {} + > "$ph_list.raw" || exit 1
  sed -e "/^\.$ph_s2/d" -e 's|^\./||' "$ph_list.raw" | tr '/' '\001' | sort -t "$ph_s2" -k1,1 | tr '\001' '/' > "$ph_list" || exit 1
  rm -f "$ph_list.raw"
  {
    printf 'punix-content-v1\0d\0.\0'
    while IFS="$ph_s2" read -r ph_p ph_m ph_z; do
      ph_t=$(( 0x$ph_m & 0xF000 ))
      if [ "$ph_t" -eq $(( 0xA000 )) ]; then
        ph_l=$(readlink "./$ph_p"; echo x)
        ph_l=${ph_l%x}
        ph_l=${ph_l%"$ph_nl"}
        printf 'l\0%s\0%s\0' "$ph_l" "$ph_p"
      elif [ "$ph_t" -eq $(( 0x4000 )) ]; then
        printf 'd\0%s\0' "$ph_p"
      else
        ph_h=$(sha256sum < "./$ph_p") || { echo "punix: cannot read \`$ph_p\`" >&2; : > "$ph_list.failed"; }
        ph_h=${ph_h%% *}
        if [ $(( 0x$ph_m & 73 )) -ne 0 ]; then ph_x=x; else ph_x=-; fi
        printf 'f\0%s\0%s\0%s\0%s\0' "$ph_x" "$ph_z" "$ph_h" "$ph_p"
      fi
    done < "$ph_list"
  } | sha256sum > "$ph_list.sum" || exit 1
  rm -f "$ph_list"
  if [ -e "$ph_list.failed" ]; then rm -f "$ph_list.failed" "$ph_list.sum"; exit 1; fi
  ph_h=$(cat "$ph_list.sum")
  rm -f "$ph_list.sum"
  printf 'sha256:%s\n' "${ph_h%% *}"
)
"#;

/// A script that prints the content hash of the tree at `dir`, using the
/// scratch file `scratch`.
pub fn content_hash_script(dir: &Path, scratch: &Path) -> String {
    format!(
        "{CONTENT_HASH_SH}punix_content_hash {} {}\n",
        quote_path(dir),
        quote_path(scratch)
    )
}

/// Build `node` on the builder `b` into `store` (unless it is already
/// there), taking the entry's lock for the whole build. `on_step` hears of
/// each step that succeeded and how long it took.
pub fn build_on(
    store: &Store,
    node: &Node,
    b: &RemoteBuilder<'_>,
    on_step: &mut dyn FnMut(Step, Duration),
) -> Result<(Outcome, RemoteReport), RemoteError> {
    let build_err = RemoteError::Build;
    let _lock = store
        .lock_entry(&node.name)
        .map_err(|e| build_err(e.into()))?;
    if store.is_valid(&node.name) {
        return Ok((Outcome::BuiltElsewhere, RemoteReport::default()));
    }
    for input in &node.drv.inputs {
        if !store.is_valid(input) {
            return Err(build_err(BuildError::MissingInput {
                module: node.module.clone(),
                input: input.clone(),
            }));
        }
    }
    let builder_script = builders::script(&node.drv.builder.kind).ok_or_else(|| {
        build_err(BuildError::UnknownBuilder {
            module: node.module.clone(),
            kind: node.drv.builder.kind.clone(),
        })
    })?;
    let closure: Vec<String> = store
        .closure(node.drv.inputs.iter().cloned())
        .map_err(|e| build_err(e.into()))?
        .into_iter()
        .collect();
    let t = b.transport;
    let root = store.root();
    let lost = |step: Step, e: TransportError| RemoteError::Builder {
        step,
        reason: transport_reason(&e),
    };
    let mut report = RemoteReport::default();

    // 1. Prepare: store root, sweep, missing inputs, build directory.
    let started = Instant::now();
    let out = t
        .run_script(&prepare_script(&t.rebase(root), &closure), STEP_TIMEOUT)
        .map_err(|e| lost(Step::Push, e))?;
    let prepared = Prepared::parse(&out.stdout);
    let build_dir = match (&prepared.build_dir, out.status) {
        (Some(d), 0) => PathBuf::from(d),
        _ => {
            return Err(RemoteError::Builder {
                step: Step::Push,
                reason: prepare_failure(root, out.status, &out.stderr),
            });
        }
    };
    // From here on, the build directory is ours to remove.
    let result = build_in(
        store,
        node,
        b,
        builder_script,
        &closure,
        &prepared.missing,
        &build_dir,
        started,
        &mut report,
        on_step,
    );
    result.map(|o| (o, report))
}

/// Steps 2 to 6, once the builder has a build directory for us.
#[allow(clippy::too_many_arguments)]
fn build_in(
    store: &Store,
    node: &Node,
    b: &RemoteBuilder<'_>,
    builder_script: &str,
    closure: &[String],
    missing: &[String],
    build_dir: &Path,
    started: Instant,
    report: &mut RemoteReport,
    on_step: &mut dyn FnMut(Step, Duration),
) -> Result<Outcome, RemoteError> {
    let t = b.transport;
    let root = store.root();
    let lost = |step: Step, e: TransportError| RemoteError::Builder {
        step,
        reason: transport_reason(&e),
    };
    let forget_build_dir = || {
        let _ = t.run_script(
            &format!(
                "chmod -R u+w {d} 2>/dev/null; rm -rf {d}",
                d = quote_path(build_dir)
            ),
            STEP_TIMEOUT,
        );
    };

    // 2. Push: the missing inputs into a temporary of the store, the
    // source into the build directory.
    let staging = if missing.is_empty() {
        None
    } else {
        let dir = root.join(temp_name(0, "-inputs"));
        if let Err(e) = t.push(root, missing, &t.rebase(&dir)) {
            forget_build_dir();
            return Err(lost(Step::Push, e));
        }
        Some(dir)
    };
    report.pushed_inputs = missing.len();
    let src_name = match &node.src {
        None => None,
        Some(src) => {
            let (parent, name) = match (src.parent(), src.file_name()) {
                (Some(p), Some(n)) => (p, n.to_string_lossy().into_owned()),
                _ => {
                    forget_build_dir();
                    return Err(RemoteError::Build(BuildError::Internal(format!(
                        "the source tree `{}` of `{}` has no name",
                        src.display(),
                        node.module
                    ))));
                }
            };
            if let Err(e) = t.push(parent, std::slice::from_ref(&name), &build_dir.join("in")) {
                forget_build_dir();
                return Err(lost(Step::Push, e));
            }
            Some(name)
        }
    };
    on_step(Step::Push, started.elapsed());

    // 3. Build, and hash the output there.
    let started = Instant::now();
    let random = random_letters(&node.name);
    let script = build_script(&BuildScript {
        store_root: &t.rebase(root),
        node,
        store,
        build_dir,
        staging: staging.as_deref().map(|d| (t.rebase(d), missing)),
        closure,
        src_name: src_name.as_deref(),
        builder_script,
        random: &random,
        max_jobs: b.max_jobs,
    });
    let out = match t.run_script(&script, b.build_timeout) {
        Ok(o) => o,
        Err(TransportError::Timeout { secs, .. }) => {
            forget_build_dir();
            return Err(RemoteError::Build(BuildError::Failed {
                module: node.module.clone(),
                name: node.name.clone(),
                reason: format!(
                    "it did not finish within {secs}s on builder `{}` ({}); it was killed there",
                    b.name, b.url
                ),
                log: store.log_path(&node.name),
                tail: "(no log: the build was killed on the builder)".into(),
            }));
        }
        Err(e) => {
            forget_build_dir();
            return Err(lost(Step::Build, e));
        }
    };
    let built = BuildOutput::parse(&out.stdout);
    let log_path = store.log_path(&node.name);
    // The log: whatever came back, written where a local build writes it.
    let _ = std::fs::write(&log_path, out.stderr.as_bytes());
    let Some(status) = built.status else {
        // The script did not get as far as the build.
        forget_build_dir();
        let reason = if out.status == 4 || out.status == 5 {
            last_lines(&out.stderr, 5)
        } else {
            format!(
                "the build script ended early (exit status {}): {}",
                out.status,
                last_lines(&out.stderr, 5)
            )
        };
        return Err(RemoteError::Builder {
            step: Step::Build,
            reason,
        });
    };
    if status != 0 {
        let mut tail = files::tail(&log_path, 20);
        if tail.trim().is_empty() {
            tail = "(the log is empty)".into();
        }
        let how = if status > 128 {
            format!("the builder was killed by signal {}", status - 128)
        } else {
            format!("the builder exited with status {status}")
        };
        return Err(RemoteError::Build(BuildError::Failed {
            module: node.module.clone(),
            name: node.name.clone(),
            reason: format!("{how} on builder `{}` ({})", b.name, b.url),
            log: log_path,
            tail,
        }));
    }
    on_step(Step::Build, started.elapsed());
    let rejected = |e: StoreError| {
        RemoteError::Build(BuildError::Output {
            module: node.module.clone(),
            log: log_path.clone(),
            source: Box::new(e),
        })
    };
    let Some(remote_out) = built.out.clone() else {
        return Err(RemoteError::Builder {
            step: Step::Build,
            reason: "the build script did not say where the output is".into(),
        });
    };
    let remote_out = PathBuf::from(remote_out);
    let cleanup = || {
        let _ = t.run_script(
            &format!(
                "chmod -R u+w {o} 2>/dev/null; rm -rf {o}",
                o = quote_path(&remote_out)
            ),
            STEP_TIMEOUT,
        );
    };
    if built.no_output {
        return Err(rejected(StoreError::NoOutput {
            name: node.name.clone(),
        }));
    }
    let remote_hash = match (&built.hash, built.hash_failed) {
        (Some(h), None) => h.clone(),
        (_, Some(3)) => {
            // The build script removed the output already.
            let mut tail = files::tail(&log_path, 20);
            if tail.trim().is_empty() {
                tail = "(the log is empty)".into();
            }
            return Err(RemoteError::Build(BuildError::Failed {
                module: node.module.clone(),
                name: node.name.clone(),
                reason: format!(
                    "its output cannot be hashed on builder `{}` ({}): {}",
                    b.name,
                    b.url,
                    built.hash_errors.join("; ").trim_start_matches("punix: ")
                ),
                log: log_path.clone(),
                tail,
            }));
        }
        _ => {
            return Err(RemoteError::Builder {
                step: Step::Hash,
                reason: format!(
                    "the content hash of the output could not be computed there: {}",
                    if built.hash_errors.is_empty() {
                        "no reason given".to_string()
                    } else {
                        built.hash_errors.join("; ")
                    }
                ),
            });
        }
    };
    on_step(Step::Hash, Duration::ZERO);
    report.remote_hash = remote_hash.clone();

    // 4. Pull into a local temporary of the same length.
    let started = Instant::now();
    let local_tmp = store.temp_path(&node.name);
    let pulled = t.pull(&t.rebase(&remote_out), &local_tmp);
    cleanup();
    match pulled {
        Ok(stats) => report.bytes_pulled = stats.bytes_received,
        Err(e) => {
            let _ = files::remove_tree(&local_tmp);
            return Err(lost(Step::Pull, e));
        }
    }
    on_step(Step::Pull, started.elapsed());

    // 5. Verify, make it refer to its final path, install.
    let started = Instant::now();
    let local_hash = match hash_tree(&local_tmp) {
        Ok(h) => h,
        Err(e) => {
            let _ = files::remove_tree(&local_tmp);
            return Err(rejected(e.into()));
        }
    };
    if local_hash != remote_hash {
        let _ = files::remove_tree(&local_tmp);
        return Err(RemoteError::Builder {
            step: Step::Verify,
            reason: StoreError::HashMismatch {
                name: node.name.clone(),
                expected: remote_hash,
                actual: local_hash,
            }
            .to_string(),
        });
    }
    let final_path = store.entry_path(&node.name);
    if let Err(e) = rewrite_remote_path(&local_tmp, &remote_out, &final_path) {
        let _ = files::remove_tree(&local_tmp);
        return Err(rejected(e));
    }
    let installed = store
        .install(&node.name, &local_tmp, &node.drv, None)
        .map_err(rejected)?;
    on_step(Step::Verify, started.elapsed());
    Ok(Outcome::Built(installed))
}

/// One step of `punix builders check` and how it went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepResult {
    pub step: Step,
    /// `None`: not run, an earlier step failed.
    pub ok: Option<bool>,
    pub seconds: f64,
    /// What it found, or why it failed.
    pub detail: String,
}

/// What `punix builders check` found out about one builder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub builder: String,
    pub url: String,
    pub system: Option<String>,
    /// Every step, in order ([`Step::ALL`]).
    pub steps: Vec<StepResult>,
}

impl CheckReport {
    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|s| s.ok == Some(true))
    }

    /// The first step that failed.
    pub fn failed_step(&self) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.ok == Some(false))
    }
}

/// The script of the check build: a file, and what `uname -m` says.
const CHECK_SCRIPT: &str = r#"mkdir -p "$out/share"
echo "built by punix builders check" > "$out/share/hello"
uname -m > "$out/share/machine"
"#;

/// `punix builders check`: connect to `b`, probe it, then build a tiny
/// package on it (pushed, built, hashed there, pulled back, verified here)
/// into `store`, and remove the result again. Never fails: each step's
/// outcome is in the report.
pub fn check(store: &Store, b: &super::Builder, connect_timeout: Duration) -> CheckReport {
    use crate::store::derivation::{BuilderRef, DERIVATION_FORMAT, Derivation};
    let mut report = CheckReport {
        builder: b.name.clone(),
        url: b.url.clone(),
        system: None,
        steps: Step::ALL
            .iter()
            .map(|&step| StepResult {
                step,
                ok: None,
                seconds: 0.0,
                detail: String::new(),
            })
            .collect(),
    };
    let set = |report: &mut CheckReport, step: Step, ok: bool, d: Duration, detail: String| {
        if let Some(r) = report.steps.iter_mut().find(|r| r.step == step) {
            r.ok = Some(ok);
            r.seconds = d.as_secs_f64();
            r.detail = detail;
        }
    };
    let t0 = Instant::now();
    let t = match super::probe::connect(b, connect_timeout) {
        Ok(t) => t,
        Err(e) => {
            set(
                &mut report,
                Step::Connect,
                false,
                t0.elapsed(),
                e.to_string(),
            );
            return report;
        }
    };
    set(
        &mut report,
        Step::Connect,
        true,
        t0.elapsed(),
        String::new(),
    );
    let t0 = Instant::now();
    let status = super::probe::probe_over(&t, &b.name, store.root());
    let problems = status.problems(store.root());
    let Some(system) = status.system.clone().filter(|_| problems.is_empty()) else {
        set(
            &mut report,
            Step::Probe,
            false,
            t0.elapsed(),
            if problems.is_empty() {
                "its system is unknown".into()
            } else {
                problems.join("; ")
            },
        );
        return report;
    };
    report.system = Some(system.to_string());
    let registered = b.systems.contains(&system);
    set(
        &mut report,
        Step::Probe,
        registered,
        t0.elapsed(),
        if registered {
            format!(
                "{system}, load {}",
                status
                    .load
                    .map(|l| format!("{l:.2}"))
                    .unwrap_or_else(|| "unknown".into())
            )
        } else {
            format!(
                "`uname` says `{system}`, which it is not registered for; remove it and add it again"
            )
        },
    );
    if !registered {
        return report;
    }
    if let Err(e) = store.ensure_writable() {
        set(
            &mut report,
            Step::Push,
            false,
            Duration::ZERO,
            e.to_string(),
        );
        return report;
    }
    // A derivation of its own each time (the nonce), so it really builds.
    let mut env = std::collections::BTreeMap::new();
    env.insert(
        "PUNIX_CHECK_NONCE".to_string(),
        random_letters("builders-check"),
    );
    let drv = Derivation {
        format: DERIVATION_FORMAT,
        pname: "punix-builders-check".into(),
        version: "1".into(),
        system: system.to_string(),
        store_root: store.root().to_string_lossy().into_owned(),
        builder: BuilderRef {
            kind: "shell".into(),
            script_sha256: builders::script_sha256("shell").unwrap_or_default(),
        },
        script: Some(CHECK_SCRIPT.into()),
        args: vec![],
        env,
        src_sha256: None,
        inputs: vec![],
        features: vec![],
    };
    let node = Node {
        module: "BuildersCheck".into(),
        name: drv.store_name(),
        drv,
        src: None,
        inputs: Default::default(),
    };
    let rb = RemoteBuilder {
        name: &b.name,
        url: &b.url,
        transport: &t,
        max_jobs: b.max_jobs,
        build_timeout: Duration::from_secs(600),
    };
    let mut done: Vec<(Step, Duration)> = Vec::new();
    let result = build_on(store, &node, &rb, &mut |step, d| done.push((step, d)));
    for (step, d) in &done {
        set(&mut report, *step, true, *d, String::new());
    }
    match result {
        Ok((_, built)) => {
            if let Some(r) = report.steps.iter_mut().find(|r| r.step == Step::Hash) {
                r.detail = format!("computed there (with the build): {}", built.remote_hash);
            }
            let entry = store.entry_path(&node.name);
            let machine = std::fs::read_to_string(entry.join("share/machine")).unwrap_or_default();
            let hello = std::fs::read_to_string(entry.join("share/hello")).unwrap_or_default();
            let machine = machine.trim();
            let arch_ok = crate::platform::System::from_uname(machine, "Linux")
                .map(|s| s.arch() == system.arch())
                .unwrap_or(false);
            let ok = arch_ok && hello == "built by punix builders check\n";
            if let Some(r) = report.steps.iter_mut().find(|r| r.step == Step::Verify) {
                r.ok = Some(ok);
                r.detail = if ok {
                    format!("content hash checked; `uname -m` there says `{machine}`")
                } else {
                    format!("the output is not what was built: `uname -m` said `{machine}`")
                };
            }
            let _ = store.discard(&node.name);
        }
        Err(e) => {
            let failed = match &e {
                RemoteError::Builder { step, .. } => *step,
                RemoteError::Build(_) => Step::ALL
                    .into_iter()
                    .find(|s| *s > Step::Probe && !done.iter().any(|(d, _)| d == s))
                    .unwrap_or(Step::Build),
            };
            let detail = match e {
                RemoteError::Builder { reason, .. } => reason,
                RemoteError::Build(e) => e.to_string(),
            };
            set(&mut report, failed, false, Duration::ZERO, detail);
        }
    }
    let _ = std::fs::remove_file(store.log_path(&node.name));
    report
}

/// A transport failure in a few words: a dropped connection without the
/// deploy-oriented hint of [`TransportError::Dead`].
fn transport_reason(e: &TransportError) -> String {
    match e {
        TransportError::Dead { target, reason } => {
            format!("the connection to `{target}` was lost ({reason})")
        }
        other => other.to_string(),
    }
}

/// Replace the builder's temporary path by the final path (same length)
/// in every file and link of the pulled tree.
fn rewrite_remote_path(
    tree: &Path,
    remote_out: &Path,
    final_path: &Path,
) -> Result<(), StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let (from, to) = (
        remote_out.as_os_str().as_bytes(),
        final_path.as_os_str().as_bytes(),
    );
    if from.len() != to.len() {
        return Err(StoreError::Corrupt {
            name: final_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            reason: format!(
                "the builder's temporary `{}` is not as long as the final path",
                remote_out.display()
            ),
        });
    }
    files::rewrite_tree(tree, from, to)?;
    Ok(())
}

/// The name of a temporary for an entry whose name ends in `rest`:
/// `.tmp`, 8 letters for `pid` (0: no process), 20 random letters, `rest`.
fn temp_name(pid: u32, rest: &str) -> String {
    let alphabet = TMP_ALPHABET.as_bytes();
    let mut letters = String::new();
    let mut p = pid as u64;
    let mut digits = [b'g'; 8];
    for d in digits.iter_mut().rev() {
        *d = alphabet[(p % 20) as usize];
        p /= 20;
    }
    letters.push_str(&String::from_utf8_lossy(&digits));
    letters.push_str(&random_letters(rest));
    format!(".tmp{letters}{rest}")
}

/// 20 letters of `g`..`z`, unique per call (not secret).
fn random_letters(salt: &str) -> String {
    let alphabet = TMP_ALPHABET.as_bytes();
    let seed = Sha256::digest(format!("{}-{salt}", files::unique_suffix()).as_bytes());
    seed.iter()
        .take(20)
        .map(|b| alphabet[(*b % 20) as usize] as char)
        .collect()
}

/// The last `n` non-empty lines of `text`, on one line.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" / ");
    if tail.is_empty() {
        "no reason given".into()
    } else {
        tail
    }
}

/// The sh functions that find stale temporaries on a builder.
fn sweep_fragment(store_root: &Path) -> String {
    let letters = "[g-z]".repeat(28);
    format!(
        r#"S={root}
A={alphabet}
punix_pid_of() {{
  pp_s=$1; pp_p=0
  while [ -n "$pp_s" ]; do
    pp_c=${{pp_s%"${{pp_s#?}}"}}; pp_s=${{pp_s#?}}
    pp_i=${{A%%"$pp_c"*}}
    pp_p=$(( pp_p * 20 + ${{#pp_i}} ))
  done
  echo "$pp_p"
}}
punix_gone() {{
  [ "$1" -gt 0 ] 2>/dev/null || return 0
  ! kill -0 "$1" 2>/dev/null && [ ! -d "/proc/$1" ]
}}
punix_old() {{ [ -n "$(find "$1" -maxdepth 0 -mmin +{stale} 2>/dev/null)" ]; }}
swept=0
for d in "$S"/.tmp*; do
  [ -d "$d" ] || continue
  l=${{d##*/}}; l=${{l#.tmp}}
  case $l in {letters}-*) ;; *) continue ;; esac
  punix_gone "$(punix_pid_of "${{l%"${{l#????????}}"}}")" || continue
  punix_old "$d" || continue
  chmod -R u+w "$d" 2>/dev/null; rm -rf "$d" && swept=$((swept + 1))
done
for d in "${{TMPDIR:-/tmp}}"/{prefix}*; do
  [ -d "$d" ] && [ -O "$d" ] || continue
  punix_gone "$(cat "$d/pid" 2>/dev/null || echo 0)" || continue
  punix_old "$d" || continue
  chmod -R u+w "$d" 2>/dev/null; rm -rf "$d" && swept=$((swept + 1))
done
echo "swept=$swept"
"#,
        root = quote_path(store_root),
        alphabet = TMP_ALPHABET,
        stale = STALE_AFTER_MINUTES,
        prefix = BUILD_DIR_PREFIX,
    )
}

/// Round trip 1: the store root, the sweep, which of `names` the builder
/// lacks, and a fresh build directory. Exit 4: the store root cannot be
/// written; 5: no build directory.
fn prepare_script(store_root: &Path, names: &[String]) -> String {
    let mut s = String::from("LC_ALL=C\nexport LC_ALL\n");
    s.push_str(&sweep_fragment(store_root));
    s.push_str(
        r#"if ! mkdir -p -- "$S" 2>/dev/null || ! [ -w "$S" ]; then
  echo "punix: the store root $S cannot be created or written by $(id -un 2>/dev/null || echo this user)" >&2
  exit 4
fi
"#,
    );
    // What is there is marked in use first, so a `store gc --target` of
    // the builder keeps it for this build.
    s.push_str(&mark_inputs(names));
    let _ = writeln!(
        s,
        "for n in {}; do [ -e \"$S/$n/built\" ] || echo \"missing=$n\"; done",
        words(names.iter().map(|n| n.as_ref()))
    );
    let _ = writeln!(
        s,
        r#"B=$(mktemp -d "${{TMPDIR:-/tmp}}/{BUILD_DIR_PREFIX}XXXXXXXX") || {{ echo "punix: cannot make a build directory in ${{TMPDIR:-/tmp}}" >&2; exit 5; }}
echo "build=$B""#
    );
    s
}

/// Mark the entries `names` of the builder's store (`$S`) in use.
fn mark_inputs(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    format!("cd \"$S\" && {{\n{}}}\ncd /\n", mark_in_use(names))
}

/// What the prepare step found.
#[derive(Debug, Default)]
struct Prepared {
    build_dir: Option<String>,
    missing: Vec<String>,
}

impl Prepared {
    fn parse(stdout: &str) -> Prepared {
        let mut p = Prepared::default();
        for line in stdout.lines() {
            match line.split_once('=') {
                Some(("build", v)) => p.build_dir = Some(v.to_string()),
                Some(("missing", v)) => p.missing.push(v.to_string()),
                _ => {}
            }
        }
        p
    }
}

fn prepare_failure(root: &Path, status: i32, stderr: &str) -> String {
    let why = last_lines(stderr, 3);
    if status == 4 {
        let q = quote_path(root);
        format!(
            "{why}\n  hint: create it there for the builder's user (`sudo mkdir -p {q} && sudo chown USER {q}`); the store root is the same path on every machine"
        )
    } else {
        format!("the prepare step failed (exit status {status}): {why}")
    }
}

struct BuildScript<'a> {
    store_root: &'a Path,
    node: &'a Node,
    store: &'a Store,
    build_dir: &'a Path,
    /// The directory the missing inputs were pushed to, and their names.
    staging: Option<(PathBuf, &'a [String])>,
    closure: &'a [String],
    /// The source tree's name under `<build dir>/in`.
    src_name: Option<&'a str>,
    builder_script: &'a str,
    random: &'a str,
    max_jobs: usize,
}

/// Stand-ins for the values only the builder knows, replaced by shell
/// variables in the script.
const OUT_PLACEHOLDER: &str = "/punix-remote-out-placeholder";
const CORES_PLACEHOLDER: usize = usize::MAX;

/// Round trip 2: place the inputs, run the builder script, hash. Prints
/// `status=`, `out=`, then `hash=` (or `no-output`, or `hash-failed=` and
/// `hash-error=` lines); the build log goes to stderr. Exit 4: the inputs
/// are not there; 5: the build directory is not usable.
fn build_script(b: &BuildScript<'_>) -> String {
    let node = b.node;
    let q = quote_path;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "LC_ALL=C\nexport LC_ALL\nS={}\nB={}\necho $$ > \"$B/pid\" || exit 5",
        q(b.store_root),
        q(b.build_dir)
    );
    if let Some((dir, names)) = &b.staging {
        let _ = writeln!(s, "P={}", q(dir));
        s.push_str(
            r#"for n in PUNIX_WORDS; do
  [ -e "$S/$n/built" ] && continue
  if [ ! -e "$P/$n/built" ]; then echo "punix: the input $n did not arrive in $P" >&2; exit 4; fi
  if [ -e "$S/$n" ] && [ ! -e "$S/$n/built" ]; then chmod -R u+w "$S/$n"; rm -rf "$S/$n"; fi
  [ -e "$S/$n" ] && continue
  chmod u+w "$P/$n" && mv "$P/$n" "$S/$n" && chmod a-w "$S/$n" || { echo "punix: cannot move the input $n into $S" >&2; exit 4; }
done
"#
            .replace("PUNIX_WORDS", &words(names.iter().map(|n| n.as_ref())))
            .as_str(),
        );
        s.push_str("chmod -R u+w \"$P\" 2>/dev/null; rm -rf \"$P\"\n");
    }
    // All inputs marked in use again (the pushed ones kept the times they
    // had here) before they are checked.
    s.push_str(&mark_inputs(b.closure));
    s.push_str("for n in");
    for n in b.closure {
        s.push(' ');
        s.push_str(&quote(n));
    }
    s.push_str(
        "; do [ -e \"$S/$n/built\" ] || { echo \"punix: the input $n is not in the builder's store\" >&2; exit 4; }; done\n",
    );
    s.push_str("mkdir -p \"$B/home\" \"$B/tmp\" || exit 5\n");
    match b.src_name {
        Some(n) => {
            let _ = writeln!(s, "mv \"$B/in\"/{} \"$B/src\" || exit 5", quote(n));
        }
        None => s.push_str("mkdir \"$B/src\" || exit 5\n"),
    }
    s.push_str("chmod -R u+w \"$B/src\"\n");
    s.push_str(&write_staged(
        &b.build_dir.join("builder.sh"),
        b.builder_script.as_bytes(),
        0o644,
    ));
    let script_file = node.drv.script.as_ref().map(|text| {
        let f = b.build_dir.join("script.sh");
        s.push_str(&write_staged(&f, text.as_bytes(), 0o644));
        f
    });
    // `$out`: `.tmp`, the pid of this shell in 8 letters, the random ones,
    // then the name without its hash: exactly as long as the final name.
    let rest = node.name.get(32..).unwrap_or("");
    let _ = writeln!(
        s,
        r#"A={TMP_ALPHABET}
p=$$; l=; i=0
while [ $i -lt 8 ]; do
  d=$((p % 20)); t=$A
  while [ $d -gt 0 ]; do t=${{t#?}}; d=$((d - 1)); done
  l=${{t%"${{t#?}}"}}$l; p=$((p / 20)); i=$((i + 1))
done
out=$S/.tmp${{l}}{random}{rest}
if [ -e "$out" ]; then echo "punix: $out exists already" >&2; exit 5; fi
c=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
c=$((c / {jobs})); [ "$c" -ge 1 ] 2>/dev/null || c=1"#,
        random = b.random,
        rest = quote(rest),
        jobs = b.max_jobs.max(1),
    );
    let env = build_env(
        node,
        b.store,
        Path::new(OUT_PLACEHOLDER),
        &b.build_dir.join("src"),
        b.build_dir,
        CORES_PLACEHOLDER,
        script_file.as_deref(),
    );
    s.push_str("cd \"$B/src\" || exit 5\nenv -i");
    for (k, v) in &env {
        if k == "out" && v == OUT_PLACEHOLDER {
            s.push_str(" out=\"$out\"");
        } else if k == "PUNIX_BUILD_CORES" && *v == CORES_PLACEHOLDER.to_string() {
            s.push_str(" PUNIX_BUILD_CORES=\"$c\"");
        } else {
            s.push(' ');
            s.push_str(&quote(&format!("{k}={v}")));
        }
    }
    s.push_str(" /bin/sh \"$B/builder.sh\"");
    for a in &node.drv.args {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s.push_str(" </dev/null >\"$B/log\" 2>&1\nst=$?\ncd /\n");
    s.push_str(CONTENT_HASH_SH);
    s.push_str(
        r#"echo "status=$st"
echo "out=$out"
keep=0
if [ "$st" -eq 0 ]; then
  if [ -d "$out" ] && [ ! -L "$out" ]; then
    if h=$(punix_content_hash "$out" "$B/hash.list" 2>"$B/hash.err"); then
      echo "hash=$h"
      touch "$out"
      keep=1
    else
      echo "hash-failed=$?"
      sed 's/^/hash-error=/' "$B/hash.err"
    fi
  else
    echo no-output
  fi
fi
cat "$B/log" >&2
if [ "$keep" = 0 ]; then chmod -R u+w "$out" 2>/dev/null; rm -rf "$out"; fi
chmod -R u+w "$B" 2>/dev/null; rm -rf "$B"
exit 0
"#,
    );
    s
}

/// What the build step printed.
#[derive(Debug, Default)]
struct BuildOutput {
    status: Option<i32>,
    out: Option<String>,
    hash: Option<String>,
    no_output: bool,
    hash_failed: Option<i32>,
    hash_errors: Vec<String>,
}

impl BuildOutput {
    fn parse(stdout: &str) -> BuildOutput {
        let mut o = BuildOutput::default();
        for line in stdout.lines() {
            if line == "no-output" {
                o.no_output = true;
                continue;
            }
            match line.split_once('=') {
                Some(("status", v)) => o.status = v.trim().parse().ok(),
                Some(("out", v)) => o.out = Some(v.to_string()),
                Some(("hash", v)) => o.hash = Some(v.trim().to_string()),
                Some(("hash-failed", v)) => o.hash_failed = v.trim().parse().ok(),
                Some(("hash-error", v)) => o.hash_errors.push(v.to_string()),
                _ => {}
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::process::{Command, Stdio};

    /// Run `script` with `shell -s`.
    fn sh(shell: &str, script: &str) -> (i32, String, String) {
        use std::io::Write;
        let mut child = Command::new(shell)
            .arg("-s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A tree with every kind of node and names that sort trickily.
    pub(crate) fn tricky_tree(root: &Path) {
        let w = |p: &str, b: &[u8], mode: u32| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, b).expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        };
        w("a/b", b"in a dir", 0o644);
        w("a.b", b"a file named a.b", 0o644);
        w("a-b/c", b"", 0o600);
        w("bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
        w("bin/group-exec", b"x", 0o610);
        w("with space/and  two", b"spaces\n", 0o444);
        w("-dash", b"dash", 0o644);
        w("back\\slash", b"\\", 0o644);
        w("quote'\"$x`", b"quotes", 0o644);
        w("\u{e9}t\u{e9}/caf\u{e9}", "é".as_bytes(), 0o644);
        w("Z", b"upper", 0o644);
        w("deep/er/still/f", &vec![7u8; 200_000], 0o644);
        fs::create_dir_all(root.join("empty/dir")).expect("mkdir");
        fs::create_dir_all(root.join("a0")).expect("mkdir");
        symlink("bin/tool", root.join("link")).expect("ln");
        symlink("/nonexistent/target", root.join("a/dangling")).expect("ln");
        symlink("with space/and  two", root.join("a/spaced link")).expect("ln");
        symlink("trailing\n", root.join("nl-target")).expect("ln");
    }

    #[test]
    fn sh_content_hash_matches_hash_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let tree = t.path().join("tree");
        fs::create_dir(&tree).expect("mkdir");
        tricky_tree(&tree);
        let want = hash_tree(&tree).expect("hash");
        let script = content_hash_script(&tree, &t.path().join("scratch"));
        for shell in ["sh", "dash", "bash"] {
            if Command::new(shell).arg("-c").arg("true").status().is_err() {
                continue;
            }
            let (status, out, err) = sh(shell, &script);
            assert_eq!(status, 0, "{shell}: {err}");
            assert_eq!(out.trim(), want, "{shell}");
        }
        // Scratch files are gone.
        let left: Vec<_> = fs::read_dir(t.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("tree")]);
        // A single empty dir, and every change shows.
        let e = t.path().join("empty");
        fs::create_dir(&e).expect("mkdir");
        let (_, out, _) = sh("sh", &content_hash_script(&e, &t.path().join("s2")));
        assert_eq!(out.trim(), hash_tree(&e).expect("hash"));
    }

    fn node(root: &Path, script: &str, src: Option<PathBuf>, inputs: &[&str]) -> Node {
        use crate::store::derivation::{BuilderRef, DERIVATION_FORMAT, Derivation};
        let src_sha256 = src.as_ref().map(|s| hash_tree(s).expect("hash src"));
        let drv = Derivation {
            format: DERIVATION_FORMAT,
            pname: "remote-test".into(),
            version: "1.0".into(),
            system: crate::platform::System::host().to_string(),
            store_root: root.to_string_lossy().into_owned(),
            builder: BuilderRef {
                kind: "shell".into(),
                script_sha256: builders::script_sha256("shell").expect("shell"),
            },
            script: Some(script.into()),
            args: vec![],
            env: Default::default(),
            src_sha256,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            features: vec![],
        };
        Node {
            module: "RemoteTest".into(),
            name: drv.store_name(),
            drv,
            src,
            inputs: Default::default(),
        }
    }

    const SCRIPT: &str = r#"mkdir -p "$out/bin" "$out/share"
printf '#!/bin/sh\necho %s\n' "$out" > "$out/bin/self"
chmod +x "$out/bin/self"
ln -s "$out/bin/self" "$out/share/abs-link"
cp "$src/data.txt" "$out/share/"
env | sort | sed -e "s|$out|OUT|g" -e "s|$HOME|HOME|g" -e "s|$src|SRC|g" -e "s|$TMPDIR|TMP|g" -e "s|$PUNIX_SCRIPT|SCRIPT|g" | grep -v '^PUNIX_BUILD_CORES=' > "$out/share/env"
"#;

    #[test]
    fn remote_build_over_a_local_transport_equals_a_local_build() {
        use crate::transport::local::LocalTransport;
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("store");
        let store = Store::new(&root).expect("store");
        store.ensure_writable().expect("writable");
        let src = t.path().join("src dir");
        fs::create_dir(&src).expect("mkdir");
        fs::write(src.join("data.txt"), b"data\n").expect("write");
        fs::set_permissions(src.join("data.txt"), fs::Permissions::from_mode(0o444))
            .expect("chmod");
        let n = node(&root, SCRIPT, Some(src.clone()), &[]);
        // The builder's store is this store: "/" as the transport root.
        let lt = LocalTransport::new(PathBuf::from("/"));
        let b = RemoteBuilder {
            name: "self",
            url: "local:/",
            transport: &lt,
            max_jobs: 1,
            build_timeout: Duration::from_secs(60),
        };
        let mut steps = Vec::new();
        let (outcome, report) =
            build_on(&store, &n, &b, &mut |s, _| steps.push(s)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(outcome, Outcome::Built(_)), "{outcome:?}");
        assert_eq!(
            steps,
            vec![
                Step::Push,
                Step::Build,
                Step::Hash,
                Step::Pull,
                Step::Verify
            ]
        );
        assert!(report.remote_hash.starts_with("sha256:"));
        // Prepare, build, cleanup: three scripts; source push and pull.
        assert_eq!(lt.counters().round_trips, 5);
        let entry = store.entry_path(&n.name);
        let text = fs::read_to_string(entry.join("bin/self")).expect("read");
        assert_eq!(text, format!("#!/bin/sh\necho {}\n", entry.display()));
        assert_eq!(
            fs::read_link(entry.join("share/abs-link")).expect("link"),
            entry.join("bin/self")
        );
        let remote_env = fs::read_to_string(entry.join("share/env")).expect("env");
        let remote_built = store.built(&n.name).expect("built");
        // No temporaries left, here or "there".
        let left: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // The same derivation built locally: the same bytes, the same
        // environment, the same content hash.
        store.discard(&n.name).expect("discard");
        let local = crate::build::local::build_node(&store, &n, 1).expect("local build");
        assert!(matches!(local, Outcome::Built(_)));
        assert_eq!(
            fs::read_to_string(entry.join("share/env")).expect("env"),
            remote_env
        );
        assert_eq!(store.built(&n.name).expect("built"), remote_built);
        // Built already: nothing to do.
        let (again, _) = build_on(&store, &n, &b, &mut |_, _| {}).expect("again");
        assert!(matches!(again, Outcome::BuiltElsewhere));
    }

    #[test]
    fn remote_build_failures_show_the_log_and_name_the_builder() {
        use crate::transport::local::LocalTransport;
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("store");
        let store = Store::new(&root).expect("store");
        store.ensure_writable().expect("writable");
        let lt = LocalTransport::new(PathBuf::from("/"));
        let b = RemoteBuilder {
            name: "self",
            url: "local:/",
            transport: &lt,
            max_jobs: 1,
            build_timeout: Duration::from_secs(60),
        };
        let n = node(
            &root,
            "echo compiling; echo 'oops: it broke' >&2; exit 7",
            None,
            &[],
        );
        match build_on(&store, &n, &b, &mut |_, _| {}) {
            Err(RemoteError::Build(e @ BuildError::Failed { .. })) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("the builder exited with status 7 on builder `self` (local:/)"),
                    "{msg}"
                );
                assert!(msg.contains("oops: it broke"), "{msg}");
                assert!(msg.contains(&store.log_path(&n.name).display().to_string()));
            }
            other => panic!("expected a build failure, got {other:?}"),
        }
        let n = node(&root, "true", None, &[]);
        match build_on(&store, &n, &b, &mut |_, _| {}) {
            Err(RemoteError::Build(e @ BuildError::Output { .. })) => {
                assert!(e.to_string().contains("did not create `$out`"), "{e}");
            }
            other => panic!("expected no output, got {other:?}"),
        }
        // An output the builder-side hash cannot carry.
        let n = node(
            &root,
            "mkdir -p \"$out\"; touch \"$out/two
 lines\"",
            None,
            &[],
        );
        match build_on(&store, &n, &b, &mut |_, _| {}) {
            Err(RemoteError::Build(e @ BuildError::Failed { .. })) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("its output cannot be hashed on builder `self` (local:/)")
                        && msg.contains("a file name holds a newline"),
                    "{msg}"
                );
            }
            other => panic!("expected a hash refusal, got {other:?}"),
        }
        let left: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn sh_content_hash_refuses_what_it_cannot_carry() {
        let t = tempfile::tempdir().expect("tempdir");
        for bad in ["new\nline", "ctl\u{1}x", "ctl\u{2}y"] {
            let tree = t.path().join("tree");
            fs::create_dir_all(tree.join("sub")).expect("mkdir");
            fs::write(tree.join("sub").join(bad), b"x").expect("write");
            let (status, _, err) = sh("sh", &content_hash_script(&tree, &t.path().join("s")));
            assert_eq!(status, 3, "{bad:?}: {err}");
            assert!(err.contains("file name holds a newline"), "{err}");
            fs::remove_dir_all(&tree).expect("rm");
        }
        let tree = t.path().join("tree");
        fs::create_dir_all(&tree).expect("mkdir");
        let fifo = std::ffi::CString::new(tree.join("fifo").as_os_str().as_encoded_bytes())
            .expect("cstring");
        // SAFETY: `fifo` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let (status, _, err) = sh("sh", &content_hash_script(&tree, &t.path().join("s")));
        assert_eq!(status, 3, "{err}");
        assert!(err.contains("`fifo` in the output is not a file"), "{err}");
    }
}
