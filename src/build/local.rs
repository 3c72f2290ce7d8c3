//! One build on this machine: the builder script in a clean environment,
//! its output turned into a store entry.
//!
//! The build runs `sh builder.sh ARGS...` in a fresh build directory (a
//! copy of the source tree is the working directory), with only these
//! variables: `out` (the temporary output path, as long as the final one),
//! `src`, `system`,
//! `PUNIX_BUILD_CORES`, `PUNIX_INPUTS`, `input_<Module>` per input, `PATH`
//! made of the inputs' `bin/` and `/usr/bin:/bin`, `CPATH`, `LIBRARY_PATH`,
//! `PKG_CONFIG_PATH` from the inputs, `HOME` and `TMPDIR` inside the build
//! directory, `SOURCE_DATE_EPOCH`, `LC_ALL=C`, `TZ=UTC`, and the recipe's
//! `env`. Its output goes to a log file. The builder dies with punix.
//!
//! After a successful build, every occurrence of the temporary path in the
//! output's files and symlink targets is replaced by the final path (same
//! length), so an output may record `$out`; then it is hashed and
//! installed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::plan::Node;
use super::{BuildError, builders};
use crate::files::{self, ctx};
use crate::store::{Built, Store};

/// The fixed timestamp builds see (1980-01-01, the earliest zip can store).
pub const SOURCE_DATE_EPOCH: &str = "315532800";

/// The minimal system PATH after the inputs' `bin/`.
pub const SYSTEM_PATH: &str = "/usr/bin:/bin";

/// How a build ended.
#[derive(Debug)]
pub enum Outcome {
    /// This process built it.
    Built(Built),
    /// Another process built it while we waited for its lock.
    BuiltElsewhere,
}

/// The environment of a build, from its node and paths.
pub fn build_env(
    node: &Node,
    store: &Store,
    out: &Path,
    src: &Path,
    build_dir: &Path,
    cores: usize,
    script_file: Option<&Path>,
) -> BTreeMap<String, String> {
    let input_paths: Vec<String> = node
        .drv
        .inputs
        .iter()
        .map(|n| store.entry_path(n).to_string_lossy().into_owned())
        .collect();
    let joined = |sub: &str| -> String {
        input_paths
            .iter()
            .map(|p| format!("{p}/{sub}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut path = joined("bin");
    if !path.is_empty() {
        path.push(':');
    }
    path.push_str(SYSTEM_PATH);
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("out", out.to_string_lossy().into_owned());
    set("src", src.to_string_lossy().into_owned());
    set("system", node.drv.system.clone());
    set("PUNIX_BUILD_CORES", cores.to_string());
    set("PUNIX_INPUTS", input_paths.join(" "));
    set("PATH", path);
    set("CPATH", joined("include"));
    set("LIBRARY_PATH", joined("lib"));
    set("PKG_CONFIG_PATH", joined("lib/pkgconfig"));
    set(
        "HOME",
        build_dir.join("home").to_string_lossy().into_owned(),
    );
    set(
        "TMPDIR",
        build_dir.join("tmp").to_string_lossy().into_owned(),
    );
    set("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.into());
    set("LC_ALL", "C".into());
    set("TZ", "UTC".into());
    if let Some(f) = script_file {
        set("PUNIX_SCRIPT", f.to_string_lossy().into_owned());
    }
    for (module, name) in &node.inputs {
        set(
            &format!("input_{module}"),
            store.entry_path(name).to_string_lossy().into_owned(),
        );
    }
    for (k, v) in &node.drv.env {
        set(k, v.clone());
    }
    env
}

/// Build `node` into `store`, unless it is already there. Takes the
/// entry's lock for the whole build.
pub fn build_node(store: &Store, node: &Node, cores: usize) -> Result<Outcome, BuildError> {
    let _lock = store.lock_entry(&node.name)?;
    if store.is_valid(&node.name) {
        return Ok(Outcome::BuiltElsewhere);
    }
    for input in &node.drv.inputs {
        if !store.is_valid(input) {
            return Err(BuildError::MissingInput {
                module: node.module.clone(),
                input: input.clone(),
            });
        }
    }
    let build_dir = tempfile::Builder::new()
        .prefix("punix-build-")
        .tempdir()
        .map_err(ctx(
            "cannot create a build directory in",
            &std::env::temp_dir(),
        ))?;
    let top = build_dir.path();
    let src_copy = top.join("src");
    match &node.src {
        Some(src) => files::copy_tree(src, &src_copy)?,
        None => fs::create_dir(&src_copy).map_err(ctx("cannot create", &src_copy))?,
    }
    for d in ["home", "tmp"] {
        fs::create_dir(top.join(d)).map_err(ctx("cannot create", &top.join(d)))?;
    }
    let builder_file = top.join("builder.sh");
    let script =
        builders::script(&node.drv.builder.kind).ok_or_else(|| BuildError::UnknownBuilder {
            module: node.module.clone(),
            kind: node.drv.builder.kind.clone(),
        })?;
    fs::write(&builder_file, script).map_err(ctx("cannot write", &builder_file))?;
    let script_file = match &node.drv.script {
        Some(s) => {
            let f = top.join("script.sh");
            fs::write(&f, s).map_err(ctx("cannot write", &f))?;
            Some(f)
        }
        None => None,
    };
    let out = store.temp_path(&node.name);
    let env = build_env(
        node,
        store,
        &out,
        &src_copy,
        top,
        cores,
        script_file.as_deref(),
    );
    let log_path = store.log_path(&node.name);
    let log = File::create(&log_path).map_err(ctx("cannot create the build log", &log_path))?;
    let log_err = log.try_clone().map_err(ctx("cannot open", &log_path))?;

    let mut cmd = Command::new("/bin/sh");
    cmd.arg(&builder_file)
        .args(&node.drv.args)
        .current_dir(&src_copy)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: only async-signal-safe calls (prctl, setpgid) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The builder dies with us, and gets its own process group.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let status = cmd.status().map_err(|source| BuildError::Spawn {
        module: node.module.clone(),
        source,
    })?;
    if !status.success() {
        let _ = files::remove_tree(&out);
        let mut tail = files::tail(&log_path, 20);
        if tail.trim().is_empty() {
            tail = "(the log is empty)".into();
        }
        let reason = match (status.code(), status.signal()) {
            (Some(code), _) => format!("the builder exited with status {code}"),
            (None, Some(sig)) => format!("the builder was killed by signal {sig}"),
            _ => "the builder failed".to_string(),
        };
        return Err(BuildError::Failed {
            module: node.module.clone(),
            name: node.name.clone(),
            reason,
            tail,
            log: log_path,
        });
    }
    let rejected = |e| BuildError::Output {
        module: node.module.clone(),
        log: log_path.clone(),
        source: Box::new(e),
    };
    if let Err(e) = store.rewrite_output(&node.name, &out) {
        let _ = files::remove_tree(&out);
        return Err(rejected(e));
    }
    let built = store
        .install(&node.name, &out, &node.drv, None)
        .map_err(rejected)?;
    Ok(Outcome::Built(built))
}

/// The log file of a node's last build.
pub fn log_file(store: &Store, node: &Node) -> PathBuf {
    store.log_path(&node.name)
}
