//! The deploy, rollback, status and target-gc pipelines over a transport.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Serialize;

use super::DeployError;
use super::generation::{
    FileKind, GENERATION_FORMAT, GenFile, GenService, Generation, KEEP_GENERATIONS, utc_now,
};
use super::remote::{self, Commit, Layout, Probe, State, Watched, Write};
use super::render::{self, Desired};
use super::secrets::{self, Secrets};
use crate::build::Observer;
use crate::build::plan::{Plan, plan};
use crate::build::scheduler;
use crate::platform::System;
use crate::recipe::stack::{EnvValue, SecretRef, Stack};
use crate::recipe::{self, Recipes};
use crate::store::Store;
use crate::store::content_hash::sha256_hex;
use crate::transport::{Counters, Transport};

/// What a deploy is asked to do.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub recipes_path: PathBuf,
    pub stack: String,
    /// The store root, the same path here and on the target.
    pub store_root: PathBuf,
    /// The deployments root on the target; `None` = `~/.punix/deployments`
    /// of the target user.
    pub deployments_root: Option<PathBuf>,
    pub unit_dir: PathBuf,
    pub activate: bool,
    pub no_rollback: bool,
    pub dry_run: bool,
    pub lock_wait: Duration,
    pub timeout: Duration,
    /// Seconds to let units settle before checking they are active.
    pub settle_secs: u64,
    /// Where builds go: this machine and the build farm.
    pub route: crate::farm::route::RouteOptions,
    /// The registered builders.
    pub builders: Vec<crate::farm::Builder>,
}

/// What a deploy (or rollback) did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeployReport {
    pub target: String,
    pub stack: String,
    pub system: String,
    /// The generation current on the target afterwards.
    pub generation: Option<u64>,
    /// A new generation was written.
    pub new_generation: bool,
    /// Nothing had to change.
    pub unchanged: bool,
    pub dry_run: bool,
    pub pushed: usize,
    pub cached: usize,
    pub bytes_sent: u64,
    pub built: usize,
    pub files_written: Vec<PathBuf>,
    pub files_removed: Vec<PathBuf>,
    /// Files or paths repaired on a target that drifted.
    pub repaired: Vec<String>,
    pub units_restarted: Vec<String>,
    pub units_stopped: Vec<String>,
    pub activated: bool,
    pub rolled_forward: Vec<String>,
    /// An earlier `--activate` never ended (punix was stopped during it):
    /// the running units may not match the current generation. A deploy
    /// or rollback with `--activate` restarts them all.
    pub activation_pending: bool,
    /// Interrupted commits that could not be completed (kept as
    /// `.failed` next to their log); this deploy rewrote what differs.
    pub journals_failed: Vec<String>,
    pub plan: Vec<String>,
    pub store_root: PathBuf,
    pub deployments_root: PathBuf,
    pub counters: Counters,
    pub seconds: f64,
}

/// Test hook: `PUNIX_TEST_PAUSE=<step>` stops a deploy before that step
/// (`push`, `commit`, `flip`, `activate`) so a test can kill it there, or
/// change the world and let it go on: with `PUNIX_TEST_RESUME=FILE` the
/// deploy resumes once FILE exists.
fn pause_requested(step: &str) -> bool {
    std::env::var("PUNIX_TEST_PAUSE").is_ok_and(|v| v == step)
}

fn pause_if_requested(step: &str) {
    if !pause_requested(step) {
        return;
    }
    eprintln!("punix: paused before {step} (PUNIX_TEST_PAUSE)");
    let resume = std::env::var_os("PUNIX_TEST_RESUME").map(PathBuf::from);
    let deadline = Instant::now() + Duration::from_secs(3600);
    while Instant::now() < deadline {
        if resume.as_ref().is_some_and(|f| f.exists()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Test hook: `PUNIX_TEST_PAUSE=writes|flip` stops the commit journal on
/// the target (see [`remote::JournalPause`]) until `.journal-NNN.sh.paused`
/// is removed.
fn journal_pause() -> Option<remote::JournalPause> {
    match std::env::var("PUNIX_TEST_PAUSE").as_deref() {
        Ok("writes") => Some(remote::JournalPause::Writes),
        Ok("flip") => Some(remote::JournalPause::Flip),
        _ => None,
    }
}

fn target_err(t: &dyn Transport, message: impl Into<String>) -> DeployError {
    DeployError::Target {
        target: t.name(),
        message: message.into(),
    }
}

/// Probe the target in one round trip.
fn probe(t: &dyn Transport, timeout: Duration) -> Result<(Probe, System), DeployError> {
    let out = t.run_checked("probe", &remote::probe(), timeout)?;
    let p = Probe::parse(&out.stdout);
    let system = System::from_uname(&p.machine, &p.kernel)
        .map_err(|e| target_err(t, format!("cannot tell its system from `uname`: {e}")))?;
    Ok((p, system))
}

fn deployments_root(opt: Option<&Path>, probe: &Probe) -> PathBuf {
    match opt {
        Some(p) => p.to_path_buf(),
        None => Path::new(&probe.home).join(".punix/deployments"),
    }
}

fn layout(t: &dyn Transport, store_root: &Path, dep_root: &Path, stack: &str) -> Layout {
    Layout {
        store: t.rebase(store_root),
        stack_dir: t.rebase(&dep_root.join(stack)),
        deployments_root: t.rebase(dep_root),
    }
}

/// The parents of a target path the transport must check for symlinks:
/// every ancestor below `/` (or below the local root).
fn parents_to_check(t: &dyn Transport, path: &Path) -> Vec<PathBuf> {
    let root = t.rebase(Path::new("/"));
    let mut out = Vec::new();
    let mut cur = t.rebase(path);
    while let Some(parent) = cur.parent() {
        if parent == root || parent == Path::new("/") || !parent.starts_with(&root) {
            break;
        }
        out.push(parent.to_path_buf());
        cur = parent.to_path_buf();
    }
    out.reverse();
    out
}

fn watched(t: &dyn Transport, paths: &[PathBuf]) -> Vec<Watched> {
    paths
        .iter()
        .map(|p| Watched {
            path: t.rebase(p),
            parents: parents_to_check(t, p),
        })
        .collect()
}

fn check_state(
    t: &dyn Transport,
    st: &State,
    files: &[PathBuf],
    store_root: &Path,
    unit_dir: Option<&Path>,
) -> Result<(), DeployError> {
    if let Some(p) = st.unwritable.first() {
        let hint = if Path::new(p) == t.rebase(store_root) {
            format!(
                "pass `--store-root` with a directory the target user can write, or create it there: `sudo mkdir -p '{p}' && sudo chown \"$USER\" '{p}'`"
            )
        } else if unit_dir.is_some_and(|u| Path::new(p) == t.rebase(u)) {
            "units are written as the target user: deploy as root (`ssh://root@...`), or pass `--unit-dir` with a directory that user can write".to_string()
        } else {
            format!(
                "make it writable for the target user (`sudo mkdir -p '{p}' && sudo chown \"$USER\" '{p}'`), or deploy as a user that can write it"
            )
        };
        return Err(DeployError::Unwritable {
            target: t.name(),
            path: p.clone(),
            hint,
        });
    }
    if let Some((i, p)) = st.unsafe_parents.first() {
        return Err(DeployError::UnsafePath {
            target: t.name(),
            path: files
                .get(*i)
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            why: format!("its parent `{p}` is a symlink, and punix never writes through symlinks"),
        });
    }
    for (i, (h, _)) in st.files.iter().enumerate() {
        if h == "symlink" || h == "notfile" {
            return Err(DeployError::UnsafePath {
                target: t.name(),
                path: files
                    .get(i)
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
                why: if h == "symlink" {
                    "it is a symlink on the target; remove it, punix never writes through symlinks"
                        .into()
                } else {
                    "it exists on the target and is not a regular file".into()
                },
            });
        }
    }
    Ok(())
}

fn parse_current(
    t: &dyn Transport,
    st: &State,
    stack_dir: &Path,
) -> Result<Option<Generation>, DeployError> {
    match &st.current_json {
        None => Ok(None),
        Some(bytes) => Generation::parse(bytes)
            .map(Some)
            .map_err(|e| DeployError::BadGeneration {
                target: t.name(),
                path: stack_dir.join(st.current.as_deref().unwrap_or("current")),
                message: e.to_string(),
            }),
    }
}

/// Generations to delete after `live` became current: all but the newest
/// [`KEEP_GENERATIONS`], never the live one.
fn trim_list(existing: &[u64], live: u64) -> Vec<u64> {
    let mut all: Vec<u64> = existing.iter().copied().chain([live]).collect();
    all.sort_unstable();
    all.dedup();
    let cut = all.len().saturating_sub(KEEP_GENERATIONS);
    all[..cut].iter().copied().filter(|n| *n != live).collect()
}

fn secrets_error(stack: &str, missing: Vec<secrets::Missing>) -> DeployError {
    DeployError::MissingSecrets {
        stack: stack.to_string(),
        missing: missing
            .iter()
            .map(|m| format!("  - {} ({})", m.reference, m.reason))
            .collect(),
    }
}

/// The hash of the recipe files a stack came from.
fn source_hash(path: &Path) -> String {
    let mut all = Vec::new();
    if let Ok(files) = recipe::recipe_files(path) {
        for f in files {
            all.extend_from_slice(f.to_string_lossy().as_bytes());
            all.push(0);
            all.extend_from_slice(&std::fs::read(&f).unwrap_or_default());
            all.push(0);
        }
    }
    format!("sha256:{}", sha256_hex(&all))
}

/// A realised closure: sorted entry names, the store path of each module,
/// and how many entries were built for it.
#[derive(Clone)]
pub struct Closure {
    names: Vec<String>,
    by_module: BTreeMap<String, PathBuf>,
    built: usize,
    /// When already looked at: the binaries (`bin/`, `sbin/`) of these
    /// entries that are not for the system, by entry.
    foreign: Option<BTreeMap<String, Foreign>>,
}

/// A binary in the closure that is not for the system it is deployed to.
#[derive(Clone)]
struct Foreign {
    file: String,
    arch: &'static str,
}

/// Realise the closure of `stack` for `system` in the local store; the
/// sorted entry names of its runtime closure and the store path of each
/// module.
fn realise_closure(
    recipes: &Recipes,
    stack: &Stack,
    store: &Store,
    system: &System,
    opts: &DeployOptions,
    observer: &dyn Observer,
) -> Result<Closure, DeployError> {
    let plan = plan(recipes, store.root(), system, &stack.modules())?;
    let need = scheduler::missing(store, &plan);
    if need.is_empty() {
        return closure_of(store, &plan, 0);
    }
    let mut built = 0;
    if !opts.dry_run {
        // This machine when it can, else the build farm; a closure is
        // never built for one system and pushed to another.
        let report = crate::farm::route::realise_routed(
            store,
            &plan,
            &opts.route,
            &opts.builders,
            observer,
        )?;
        built = report.built.len();
    }
    if opts.dry_run {
        // What would be built is not there to read references from.
        return Ok(Closure {
            names: plan.order.clone(),
            by_module: by_module(store, &plan),
            built,
            foreign: None,
        });
    }
    closure_of(store, &plan, built)
}

fn by_module(store: &Store, plan: &Plan) -> BTreeMap<String, PathBuf> {
    plan.roots
        .iter()
        .map(|(m, n)| (m.clone(), store.entry_path(n)))
        .collect()
}

/// The closure of a plan whose every entry is in the store.
fn closure_of(store: &Store, plan: &Plan, built: usize) -> Result<Closure, DeployError> {
    let roots: Vec<String> = plan.roots.values().cloned().collect();
    Ok(Closure {
        names: store.closure(roots)?.into_iter().collect(),
        by_module: by_module(store, plan),
        built,
        foreign: None,
    })
}

/// The closure of `stack` for `system` if nothing of it needs building:
/// read-only, so it can run while the targets are being connected.
fn closure_if_built(
    recipes: &Recipes,
    stack: &Stack,
    store: &Store,
    system: &System,
) -> Option<Closure> {
    let plan = plan(recipes, store.root(), system, &stack.modules()).ok()?;
    if !scheduler::missing(store, &plan).is_empty() {
        return None;
    }
    let mut c = closure_of(store, &plan, 0).ok()?;
    // Which binaries would be refused, while there is time: the deploy
    // then only looks up the entries the target lacks.
    c.foreign = Some(
        c.names
            .iter()
            .filter_map(|n| foreign_binary(store, n, system).map(|f| (n.clone(), f)))
            .collect(),
    );
    Some(c)
}

/// What every target of one deploy shares: the checked recipes, the
/// stack, its resolved secrets, the local store.
pub struct Prepared {
    pub recipes: Recipes,
    pub stack: Stack,
    secrets: Secrets,
    pub store: Store,
    /// The hash of the recipe files, computed once (while the targets
    /// connect, when they are connected over the network).
    source_hash: std::sync::OnceLock<String>,
}

impl Prepared {
    fn source_hash(&self, opts: &DeployOptions) -> &str {
        self.source_hash
            .get_or_init(|| source_hash(&opts.recipes_path))
    }
}

/// Load the recipes, pick the stack, resolve its secrets: everything that
/// happens before any connection.
pub fn prepare(opts: &DeployOptions) -> Result<Prepared, DeployError> {
    let recipes = recipe::load(&opts.recipes_path)?;
    let stack = recipes.stack(&opts.stack)?.clone();
    let secrets = secrets::resolve(&stack).map_err(|m| secrets_error(&stack.name, m))?;
    let store = Store::new(&opts.store_root)?;
    Ok(Prepared {
        recipes,
        stack,
        secrets,
        store,
        source_hash: std::sync::OnceLock::new(),
    })
}

/// A connected, probed target.
pub struct Probed {
    pub transport: Box<dyn Transport>,
    pub probe: Probe,
    pub system: System,
}

/// Probe a connected target (one round trip) and check it can receive a
/// push.
pub fn probe_target(t: Box<dyn Transport>, timeout: Duration) -> Result<Probed, DeployError> {
    let (probe, system) = probe(t.as_ref(), timeout)?;
    if !probe.has("rsync") {
        return Err(DeployError::NoRsync { target: t.name() });
    }
    Ok(Probed {
        transport: t,
        probe,
        system,
    })
}

/// Deploy `opts.stack` to the target behind `t`.
pub fn deploy(
    t: &dyn Transport,
    opts: &DeployOptions,
    observer: &dyn Observer,
) -> Result<DeployReport, DeployError> {
    let start = Instant::now();
    let prepared = prepare(opts)?;
    let (probe, system) = probe(t, opts.timeout)?;
    if !probe.has("rsync") {
        return Err(DeployError::NoRsync { target: t.name() });
    }
    let closure = realise_closure(
        &prepared.recipes,
        &prepared.stack,
        &prepared.store,
        &system,
        opts,
        observer,
    )?;
    deploy_realised(t, &prepared, &probe, &system, &closure, opts, start)
}

/// The per-target part of a deploy, after the closure is in the local
/// store: checks, lock, state, push, commit, activation.
fn deploy_realised(
    t: &dyn Transport,
    prepared: &Prepared,
    probe: &Probe,
    system: &System,
    realised: &Closure,
    opts: &DeployOptions,
    start: Instant,
) -> Result<DeployReport, DeployError> {
    let (stack, secrets, store) = (&prepared.stack, &prepared.secrets, &prepared.store);
    let closure = &realised.names;
    let by_module = &realised.by_module;
    let built = realised.built;
    if opts.activate {
        check_can_activate(t, probe)?;
    }
    let dep_root = deployments_root(opts.deployments_root.as_deref(), probe);
    let stack_dir = dep_root.join(&stack.name);
    let lay = layout(t, &opts.store_root, &dep_root, &stack.name);

    let desired = render::desired_files(stack, by_module, secrets, &opts.unit_dir, &dep_root)
        .map_err(|message| DeployError::Render {
            stack: stack.name.clone(),
            message,
        })?;
    check_no_collisions(t, stack, &desired, &opts.store_root, &dep_root)?;

    let mut report = DeployReport {
        target: t.name(),
        stack: stack.name.clone(),
        system: system.to_string(),
        built,
        dry_run: opts.dry_run,
        store_root: opts.store_root.clone(),
        deployments_root: dep_root.clone(),
        ..DeployReport::default()
    };

    let paths: Vec<PathBuf> = desired.iter().map(|d| d.path.clone()).collect();
    let mut create = vec![lay.store.clone(), lay.stack_dir.clone()];
    if !stack.services.is_empty() {
        create.push(t.rebase(&opts.unit_dir));
    }
    // (A dry run only checks that they could be created and written.)
    // Where a push goes (made by the state query when something is
    // missing).
    let push_dir = lay
        .store
        .join(format!(".tmp-push-{}", crate::files::unique_suffix()));
    let script = remote::state(
        &lay,
        closure,
        &watched(t, &paths),
        &create,
        !opts.dry_run,
        (!opts.dry_run).then_some(push_dir.as_path()),
    );
    // Under the stack's lock (one round trip for both where the transport
    // can), except for a dry run, which changes nothing.
    let (_lock, out) = if opts.dry_run {
        (None, t.run_script(&script, opts.timeout)?)
    } else {
        let (guard, out) = t.lock_and_run(
            &lay.stack_dir.join(".lock"),
            opts.lock_wait,
            &script,
            opts.timeout,
        )?;
        (Some(guard), out)
    };
    crate::trace::mark("state answered");
    let out = t.checked("state query", out)?;
    let st = State::with_names(&out.stdout, paths.len(), closure);
    // The state query made the push directory if something is missing:
    // until the commit owns it, an error removes it again.
    let mut push_cleanup = PushDirCleanup {
        t,
        dir: (!opts.dry_run && !st.missing.is_empty()).then(|| push_dir.clone()),
        timeout: opts.timeout.min(Duration::from_secs(10)),
    };
    report.rolled_forward = st.rolled_forward.clone();
    report.journals_failed = st.journal_failed.clone();
    check_state(
        t,
        &st,
        &paths,
        &opts.store_root,
        (!stack.services.is_empty()).then_some(opts.unit_dir.as_path()),
    )?;
    let current = parse_current(t, &st, &stack_dir)?;
    // What the target lacks is what will be pushed: check those binaries
    // (the rest were checked when they were pushed).
    if !opts.dry_run {
        check_binaries(t, store, realised, &st.missing, system)?;
    }

    // The generation this deploy describes.
    let mut generation = Generation {
        format: GENERATION_FORMAT,
        number: 0,
        stack: stack.name.clone(),
        created: utc_now(),
        source_hash: prepared.source_hash(opts).to_string(),
        backend: stack.backend.clone(),
        system: system.to_string(),
        store_root: opts.store_root.to_string_lossy().into_owned(),
        store_paths: closure
            .iter()
            .map(|n| opts.store_root.join(n).to_string_lossy().into_owned())
            .collect(),
        services: stack
            .services
            .iter()
            .map(|s| GenService {
                name: s.name.clone(),
                package: s.package.clone(),
                store_path: by_module.get(&s.package).cloned().unwrap_or_default(),
                binary: s.binary.clone(),
                args: s.args.clone(),
                depends_on: s.depends_on.clone(),
                environment: s.environment.clone(),
                unit: render::unit_name(&s.name),
            })
            .collect(),
        files: desired.iter().map(Desired::gen_file).collect(),
        unit_dir: opts.unit_dir.to_string_lossy().into_owned(),
        content_id: String::new(),
    };
    generation.seal();
    let next = st.next_number();

    // What differs on the target.
    let writes: Vec<usize> = desired
        .iter()
        .enumerate()
        .filter(|(i, d)| {
            let (h, m) = &st.files[*i];
            *h != d.sha256() || u32::from_str_radix(m, 8).ok() != Some(d.mode)
        })
        .map(|(i, _)| i)
        .collect();
    if !opts.dry_run
        && let Some((i, dir)) = st.unwritable_files.iter().find(|(i, _)| writes.contains(i))
    {
        let path = desired[*i].path.display().to_string();
        let file_dir = desired[*i]
            .path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let user = if probe.user.is_empty() {
            "the deploy user".to_string()
        } else {
            format!("`{}`", probe.user)
        };
        let hint = if desired[*i].kind == FileKind::Unit {
            format!(
                "units are written as {user}: deploy as root (`ssh://root@...`), or pass `--unit-dir` with a directory {user} can write"
            )
        } else {
            format!(
                "`{dir}` is not writable for {user}: deploy as a user that can write there (e.g. root), or have an administrator create `{file_dir}` for {user} on the target"
            )
        };
        return Err(DeployError::Unwritable {
            target: t.name(),
            path,
            hint,
        });
    }
    let wanted: BTreeSet<&PathBuf> = paths.iter().collect();
    let removes: Vec<PathBuf> = current
        .as_ref()
        .map(|c| {
            c.files
                .iter()
                .filter(|f| !wanted.contains(&f.path))
                .map(|f| f.path.clone())
                .collect()
        })
        .unwrap_or_default();
    let same_content = current
        .as_ref()
        .is_some_and(|c| c.content_id == generation.content_id);
    let cur_number = current.as_ref().map(|c| c.number);

    // An activation that never ended: this one restarts every unit.
    let pending = st.activate_pending.as_ref().filter(|_| opts.activate);
    report.activation_pending = st.activate_pending.is_some() && !opts.activate;
    report.pushed = st.missing.len();
    report.cached = closure.len() - st.missing.len();
    report.files_written = writes.iter().map(|i| desired[*i].path.clone()).collect();
    report.files_removed = removes.clone();

    let nothing_to_write =
        same_content && st.missing.is_empty() && writes.is_empty() && removes.is_empty();
    if nothing_to_write && pending.is_none() {
        report.unchanged = true;
        report.generation = cur_number;
        report.plan.push(format!(
            "nothing to do: {} already current",
            Generation::file_name(cur_number.unwrap_or(0)).trim_end_matches(".json")
        ));
        report.counters = t.counters();
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    let number = if same_content {
        report.repaired = st
            .missing
            .iter()
            .cloned()
            .chain(report.files_written.iter().map(|p| p.display().to_string()))
            .collect();
        cur_number.unwrap_or(next)
    } else {
        report.new_generation = true;
        next
    };
    generation.number = number;

    // The plan.
    if !st.missing.is_empty() {
        report.plan.push(format!(
            "push {} store path(s) ({} already on the target)",
            st.missing.len(),
            report.cached
        ));
    }
    for i in &writes {
        let d = &desired[*i];
        report.plan.push(format!(
            "write {} ({:04o}{})",
            d.path.display(),
            d.mode,
            if d.secret { ", secret" } else { "" }
        ));
    }
    for r in &removes {
        report.plan.push(format!("remove {}", r.display()));
    }
    if report.new_generation {
        report.plan.push(format!(
            "write {} and switch current to it",
            Generation::file_name(number)
        ));
    } else if !nothing_to_write {
        report.plan.push(format!(
            "repair drift; {} stays current",
            Generation::file_name(number)
        ));
    }
    let (stop, restart) = match pending {
        Some(ran) => restart_all(ran, current.as_ref(), &generation),
        None => unit_changes(current.as_ref(), &generation, &desired, &writes),
    };
    if pending.is_some() {
        report.plan.push(format!(
            "finish the activation that never ended: restart every unit of {}",
            Generation::file_name(number)
        ));
    }
    if opts.activate {
        report.plan.push(format!(
            "activate: daemon-reload; restart {}; stop {}",
            list_or_none(&restart),
            list_or_none(&stop)
        ));
    }
    if opts.dry_run {
        report.generation = cur_number;
        report.counters = t.counters();
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }

    // Push and commit (nothing to do when only an activation is left).
    if !nothing_to_write {
        let pushed = if st.missing.is_empty() {
            None
        } else {
            pause_if_requested("push");
            let dir = push_dir;
            crate::trace::mark("push starts");
            let stats = t.push(store.root(), &st.missing, &dir)?;
            crate::trace::mark("push done");
            report.bytes_sent = stats.bytes_sent;
            Some((dir, st.missing.clone()))
        };

        // Commit.
        pause_if_requested("commit");
        let gen_json = generation.to_json();
        let trim = if report.new_generation {
            trim_list(&st.generations, number)
        } else {
            Vec::new()
        };
        let commit = Commit {
            layout: &lay,
            number,
            generation_json: report.new_generation.then_some(gen_json.as_bytes()),
            pushed,
            cached: {
                let missing: BTreeSet<&String> = st.missing.iter().collect();
                closure
                    .iter()
                    .filter(|n| !missing.contains(n))
                    .cloned()
                    .collect()
            },
            writes: writes
                .iter()
                .map(|i| Write {
                    path: t.rebase(&desired[*i].path),
                    bytes: &desired[*i].bytes,
                    mode: desired[*i].mode,
                })
                .collect(),
            removes: removes.iter().map(|r| t.rebase(r)).collect(),
            trim,
            pause: journal_pause(),
            activate_from: opts.activate.then(|| units_of(current.as_ref())),
            wait_secs: opts.timeout.as_secs().max(1),
        };
        // From here on the commit script cleans up after itself.
        push_cleanup.dir = None;
        t.run_checked("commit", &remote::commit(&commit), opts.timeout)?;
        crate::trace::mark("committed");
    }
    report.generation = Some(number);

    // Activate.
    if opts.activate {
        pause_if_requested("activate");
        let units: Vec<String> = generation.services.iter().map(|s| s.unit.clone()).collect();
        report.units_restarted = restart.clone();
        report.units_stopped = stop.clone();
        let failed = activate_with(
            t,
            &stack_dir,
            number,
            &stop,
            &restart,
            &units,
            opts.settle_secs,
            opts.timeout,
        )?;
        report.activated = true;
        if failed.is_empty() {
            activation_ended(t, &stack_dir, opts.timeout)?;
        } else {
            let logs = unit_logs(t, &failed, opts.timeout);
            // The generation to go back to: the one this deploy replaced,
            // or, when it only finished an activation, the one before.
            let prev = if report.new_generation {
                cur_number
            } else {
                st.generations.iter().copied().filter(|n| *n < number).max()
            };
            let outcome = match (opts.no_rollback, prev) {
                (true, _) => {
                    activation_ended(t, &stack_dir, opts.timeout)?;
                    "the failed generation stays current (--no-rollback)".to_string()
                }
                (false, Some(prev)) => {
                    let ro = RollbackOptions {
                        stack: stack.name.clone(),
                        store_root: opts.store_root.clone(),
                        deployments_root: Some(dep_root.clone()),
                        to: Some(prev),
                        activate: true,
                        lock_wait: opts.lock_wait,
                        timeout: opts.timeout,
                        settle_secs: opts.settle_secs,
                    };
                    let prev_name = gen_label(prev);
                    let outcome = match rollback_locked(t, &ro, probe) {
                        Ok(_) => {
                            format!("rolled back to {prev_name}, whose units are active again")
                        }
                        Err(e) => format!(
                            "rolled back to {prev_name}, but it did not come up either: {}",
                            e.to_string().lines().next().unwrap_or_default()
                        ),
                    };
                    // Keep the failed generation for inspection, out of the
                    // way of the next rollback.
                    let g = t.rebase(&stack_dir.join(Generation::file_name(number)));
                    let f = t.rebase(&stack_dir.join(Generation::failed_file_name(number)));
                    let _ = t.run_script(
                        &format!(
                            "mv -f {} {}",
                            crate::transport::script::quote_path(&g),
                            crate::transport::script::quote_path(&f)
                        ),
                        opts.timeout,
                    );
                    outcome
                }
                (false, None) => {
                    activation_ended(t, &stack_dir, opts.timeout)?;
                    "there is no earlier generation to roll back to, so the failed one stays current"
                        .to_string()
                }
            };
            return Err(DeployError::ActivationFailed {
                target: t.name(),
                failed: describe_failed(&failed),
                outcome,
                logs,
            });
        }
    }
    report.counters = t.counters();
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// `--activate` needs systemd running on a real host: not a directory
/// standing in for one (`--transport-root`), not a host without systemd.
fn check_can_activate(t: &dyn Transport, probe: &Probe) -> Result<(), DeployError> {
    if t.rebase(Path::new("/")) != Path::new("/") {
        return Err(target_err(
            t,
            "`--activate` cannot be used with `--transport-root`: it would restart the units of this machine",
        ));
    }
    if !probe.has("systemd-running") || !probe.has("systemctl") {
        return Err(DeployError::NoSystemd { target: t.name() });
    }
    Ok(())
}

/// Give the calling thread (only) the nice value 10, for work that can
/// wait. On Linux a thread's nice value is its own.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return plain integers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Removes the push directory on drop, unless disarmed (`dir` taken).
struct PushDirCleanup<'a> {
    t: &'a dyn Transport,
    dir: Option<PathBuf>,
    timeout: Duration,
}

impl Drop for PushDirCleanup<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = self.t.run_script(&remote::remove_tree(&dir), self.timeout);
        }
    }
}

/// Refuse entries `names` of the closure with an ELF binary under `bin/`
/// (or `sbin/`) built for another machine than the target's.
fn check_binaries(
    t: &dyn Transport,
    store: &Store,
    closure: &Closure,
    names: &[String],
    system: &System,
) -> Result<(), DeployError> {
    for name in names {
        let found = match &closure.foreign {
            Some(known) => known.get(name).cloned(),
            None => foreign_binary(store, name, system),
        };
        if let Some(f) = found {
            return Err(DeployError::ForeignBinary {
                target: t.name(),
                file: f.file,
                file_arch: f.arch.to_string(),
                target_system: system.to_string(),
            });
        }
    }
    Ok(())
}

/// The first binary of entry `name` that is not for `system`.
fn foreign_binary(store: &Store, name: &str, system: &System) -> Option<Foreign> {
    for dir in ["bin", "sbin"] {
        let Ok(rd) = std::fs::read_dir(store.entry_path(name).join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            if let Some(arch) = crate::platform::elf_mismatch(&e.path(), system) {
                return Some(Foreign {
                    file: e.path().display().to_string(),
                    arch,
                });
            }
        }
    }
    None
}

fn gen_label(n: u64) -> String {
    Generation::file_name(n)
        .trim_end_matches(".json")
        .to_string()
}

fn describe_failed(failed: &[(String, String)]) -> Vec<String> {
    failed
        .iter()
        .map(|(u, s)| {
            format!(
                "`{u}` is {}",
                if s.is_empty() {
                    "in an unknown state"
                } else {
                    s
                }
            )
        })
        .collect()
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Units to stop (gone) and to restart (new, or whose unit or env file
/// changed or was repaired), sorted.
fn unit_changes(
    current: Option<&Generation>,
    next: &Generation,
    desired: &[Desired],
    writes: &[usize],
) -> (Vec<String>, Vec<String>) {
    let next_units: BTreeSet<String> = next.services.iter().map(|s| s.unit.clone()).collect();
    let stop: Vec<String> = current
        .map(|c| {
            c.services
                .iter()
                .map(|s| s.unit.clone())
                .filter(|u| !next_units.contains(u))
                .collect()
        })
        .unwrap_or_default();
    let mut restart: BTreeSet<String> = BTreeSet::new();
    let cur_units: BTreeSet<String> = current
        .map(|c| c.services.iter().map(|s| s.unit.clone()).collect())
        .unwrap_or_default();
    for u in &next_units {
        if !cur_units.contains(u) {
            restart.insert(u.clone());
        }
    }
    for i in writes {
        let d = &desired[*i];
        if let (Some(svc), FileKind::Unit | FileKind::Env) = (&d.service, d.kind) {
            restart.insert(render::unit_name(svc));
        }
    }
    // A service whose package changed has a changed unit (ExecStart).
    if let Some(c) = current {
        for s in &next.services {
            if let Some(old) = c.services.iter().find(|o| o.name == s.name)
                && old.store_path != s.store_path
            {
                restart.insert(s.unit.clone());
            }
        }
    }
    (stop, restart.into_iter().collect())
}

/// The units of a generation (none without one).
fn units_of(g: Option<&Generation>) -> Vec<String> {
    g.map(|g| g.services.iter().map(|s| s.unit.clone()).collect())
        .unwrap_or_default()
}

/// (stop, restart) when an earlier activation never ended: which of its
/// units run which version is unknown, so every unit of `next` restarts,
/// and every unit that ran before it (`ran`) or is in `current` but not
/// in `next` stops.
fn restart_all(
    ran: &[String],
    current: Option<&Generation>,
    next: &Generation,
) -> (Vec<String>, Vec<String>) {
    let restart: BTreeSet<String> = units_of(Some(next)).into_iter().collect();
    let stop: BTreeSet<String> = ran
        .iter()
        .cloned()
        .chain(units_of(current))
        .filter(|u| !restart.contains(u))
        .collect();
    (stop.into_iter().collect(), restart.into_iter().collect())
}

/// The activation ended (its outcome is known and reported): the next one
/// need not restart every unit.
fn activation_ended(
    t: &dyn Transport,
    stack_dir: &Path,
    timeout: Duration,
) -> Result<(), DeployError> {
    let marker = t.rebase(&stack_dir.join(remote::ACTIVATE_PENDING));
    t.run_checked(
        "activation record",
        &format!("rm -f {}", crate::transport::script::quote_path(&marker)),
        timeout,
    )?;
    Ok(())
}

/// Run the activation; returns the units that are not active.
#[allow(clippy::too_many_arguments)]
fn activate_with(
    t: &dyn Transport,
    stack_dir: &Path,
    number: u64,
    stop: &[String],
    restart: &[String],
    check: &[String],
    settle_secs: u64,
    timeout: Duration,
) -> Result<Vec<(String, String)>, DeployError> {
    let script = remote::activate(
        &t.rebase(stack_dir),
        number,
        stop,
        restart,
        check,
        if restart.is_empty() { 0 } else { settle_secs },
    );
    let out = t.run_checked(
        "activation",
        &script,
        timeout + Duration::from_secs(settle_secs),
    )?;
    // Units still starting get more time (up to a minute); a unit that
    // failed, or that systemd restarted, is failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = remote::UnitState::restarts_before(&out.stdout);
    let since = |mut st: remote::UnitState| {
        st.restarts = st
            .restarts
            .saturating_sub(before.get(&st.unit).copied().unwrap_or(0));
        st
    };
    let mut states: Vec<remote::UnitState> = remote::UnitState::parse_all(&out.stdout)
        .into_iter()
        .map(since)
        .collect();
    loop {
        let starting: Vec<String> = states
            .iter()
            .filter(|s| s.health() == remote::Health::Starting)
            .map(|s| s.unit.clone())
            .collect();
        if starting.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let out = t.run_checked("unit states", &remote::unit_states(&starting), timeout)?;
        for fresh in remote::UnitState::parse_all(&out.stdout)
            .into_iter()
            .map(since)
        {
            if let Some(s) = states.iter_mut().find(|s| s.unit == fresh.unit) {
                *s = fresh;
            }
        }
    }
    Ok(states
        .iter()
        .filter(|s| s.health() != remote::Health::Up)
        .map(|s| (s.unit.clone(), s.describe()))
        .collect())
}

fn unit_logs(t: &dyn Transport, failed: &[(String, String)], timeout: Duration) -> String {
    let units: Vec<String> = failed.iter().map(|(u, _)| u.clone()).collect();
    t.run_script(&remote::unit_logs(&units), timeout)
        .map(|o| o.stdout.trim_end().to_string())
        .unwrap_or_default()
}

/// Config files may not collide with generated files, nor land in the
/// store or the deployments root.
fn check_no_collisions(
    t: &dyn Transport,
    stack: &Stack,
    desired: &[Desired],
    store_root: &Path,
    dep_root: &Path,
) -> Result<(), DeployError> {
    let generated: BTreeSet<&PathBuf> = desired
        .iter()
        .filter(|d| d.kind != FileKind::Config)
        .map(|d| &d.path)
        .collect();
    for cf in &stack.config_files {
        let why = if generated.contains(&cf.path) {
            Some("it is a file punix generates for a service (a unit or an environment file)")
        } else if cf.path.starts_with(store_root) {
            Some("it is inside the store")
        } else if cf.path.starts_with(dep_root) {
            Some("it is inside the deployments root")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(DeployError::UnsafePath {
                target: t.name(),
                path: cf.path.display().to_string(),
                why: why.into(),
            });
        }
    }
    Ok(())
}

/// What a rollback is asked to do.
#[derive(Debug, Clone)]
pub struct RollbackOptions {
    pub stack: String,
    pub store_root: PathBuf,
    pub deployments_root: Option<PathBuf>,
    /// The generation to return to; `None` = the one before the current.
    pub to: Option<u64>,
    pub activate: bool,
    pub lock_wait: Duration,
    pub timeout: Duration,
    pub settle_secs: u64,
}

/// Roll a stack back on the target behind `t`.
pub fn rollback(t: &dyn Transport, opts: &RollbackOptions) -> Result<DeployReport, DeployError> {
    let (probe, _) = probe(t, opts.timeout)?;
    let dep_root = deployments_root(opts.deployments_root.as_deref(), &probe);
    let lay = layout(t, &opts.store_root, &dep_root, &opts.stack);
    let _lock = t.lock(&lay.stack_dir.join(".lock"), opts.lock_wait)?;
    rollback_locked(t, opts, &probe)
}

/// Query the target about a generation (one round trip): which of its
/// pinned store paths are missing there, and its files as they are. Also
/// returns the entry names and file paths, in the order of the answer.
fn generation_state(
    t: &dyn Transport,
    lay: &Layout,
    g: &Generation,
    roll_forward: bool,
    timeout: Duration,
) -> Result<(State, Vec<String>, Vec<PathBuf>), DeployError> {
    let names: Vec<String> = g
        .store_paths
        .iter()
        .filter_map(|p| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    let paths: Vec<PathBuf> = g.files.iter().map(|f| f.path.clone()).collect();
    let out = t.run_checked(
        "state query",
        &remote::state(lay, &names, &watched(t, &paths), &[], roll_forward, None),
        timeout,
    )?;
    Ok((
        State::with_names(&out.stdout, paths.len(), &names),
        names,
        paths,
    ))
}

fn read_generation(
    t: &dyn Transport,
    stack_dir: &Path,
    number: u64,
    timeout: Duration,
) -> Result<Generation, DeployError> {
    let path = stack_dir.join(Generation::file_name(number));
    let out = t.run_checked(
        "read generation",
        &format!(
            "base64 < {}",
            crate::transport::script::quote_path(&t.rebase(&path))
        ),
        timeout,
    )?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(out.stdout.split_whitespace().collect::<String>())
        .map_err(|e| DeployError::BadGeneration {
            target: t.name(),
            path: path.clone(),
            message: e.to_string(),
        })?;
    Generation::parse(&bytes).map_err(|e| DeployError::BadGeneration {
        target: t.name(),
        path,
        message: e.to_string(),
    })
}

/// The bytes of a generation's file for a restore: the recorded bytes, or,
/// for files that carry secrets, a new rendering from this environment.
fn restore_bytes(f: &GenFile, g: &Generation, secrets: &Secrets) -> Option<Vec<u8>> {
    if !f.secret {
        return f.bytes();
    }
    match f.kind {
        FileKind::Env => {
            let svc = g
                .services
                .iter()
                .find(|s| Some(&s.name) == f.service.as_ref())?;
            let service = crate::recipe::stack::Service {
                name: svc.name.clone(),
                description: None,
                package: svc.package.clone(),
                binary: svc.binary.clone(),
                args: svc.args.clone(),
                depends_on: svc.depends_on.clone(),
                environment: svc.environment.clone(),
                service_type: String::new(),
                restart: String::new(),
                user: None,
            };
            render::env_file(&service, secrets)
        }
        _ => f
            .secret_ref
            .as_ref()
            .and_then(|r| secrets.get(r))
            .map(|s| s.expose().to_vec()),
    }
}

fn generation_secret_refs(g: &Generation) -> Vec<SecretRef> {
    let mut set = BTreeSet::new();
    for f in &g.files {
        if f.secret {
            if let Some(r) = &f.secret_ref {
                set.insert(r.clone());
            }
            if f.kind == FileKind::Env
                && let Some(svc) = g
                    .services
                    .iter()
                    .find(|s| Some(&s.name) == f.service.as_ref())
            {
                for v in svc.environment.values() {
                    if let EnvValue::Secret(r) = v {
                        set.insert(r.clone());
                    }
                }
            }
        }
    }
    set.into_iter().collect()
}

fn rollback_locked(
    t: &dyn Transport,
    opts: &RollbackOptions,
    probe: &Probe,
) -> Result<DeployReport, DeployError> {
    let start = Instant::now();
    let dep_root = deployments_root(opts.deployments_root.as_deref(), probe);
    let stack_dir = dep_root.join(&opts.stack);
    let lay = layout(t, &opts.store_root, &dep_root, &opts.stack);
    let nothing = |reason: String| DeployError::NothingToRollBack {
        stack: opts.stack.clone(),
        target: t.name(),
        reason,
    };

    let out = t.run_checked(
        "state query",
        &remote::state(&lay, &[], &[], &[], true, None),
        opts.timeout,
    )?;
    let st = State::parse(&out.stdout, 0);
    let current = parse_current(t, &st, &stack_dir)?
        .ok_or_else(|| nothing("it has never been deployed there".into()))?;
    let to = match opts.to {
        Some(n) => {
            if !st.generations.contains(&n) {
                return Err(nothing(format!(
                    "there is no generation {n} (the generations there are: {})",
                    st.generations
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if n == current.number {
                return Err(nothing(format!("generation {n} is already current")));
            }
            n
        }
        None => *st
            .generations
            .iter()
            .filter(|n| **n < current.number)
            .max()
            .ok_or_else(|| nothing(format!("generation {} is the oldest one", current.number)))?,
    };
    let target_gen = read_generation(t, &stack_dir, to, opts.timeout)?;

    // Check the pinned paths ON THE TARGET, and the files as they are.
    let (st2, names, paths) = generation_state(t, &lay, &target_gen, true, opts.timeout)?;
    if !st2.missing.is_empty() {
        return Err(DeployError::RollbackMissingPaths {
            stack: opts.stack.clone(),
            target: t.name(),
            number: to,
            missing: st2.missing.clone(),
        });
    }
    check_state(t, &st2, &paths, &opts.store_root, None)?;

    let secrets = secrets::resolve_refs(&generation_secret_refs(&target_gen))
        .map_err(|m| secrets_error(&opts.stack, m))?;
    let mut bytes: Vec<(PathBuf, Vec<u8>, u32)> = Vec::new();
    let mut cannot = Vec::new();
    for f in &target_gen.files {
        match restore_bytes(f, &target_gen, &secrets) {
            Some(b) => bytes.push((f.path.clone(), b, f.mode_bits())),
            None => cannot.push(f.path.display().to_string()),
        }
    }
    if !cannot.is_empty() {
        return Err(nothing(format!(
            "these files of generation {to} cannot be restored (their bytes were not recorded): {}",
            cannot.join(", ")
        )));
    }
    let wanted: BTreeSet<&PathBuf> = paths.iter().collect();
    let removes: Vec<PathBuf> = current
        .files
        .iter()
        .filter(|f| !wanted.contains(&f.path))
        .map(|f| f.path.clone())
        .collect();
    let writes_idx: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(i, (_, b, m))| {
            let (h, mode) = &st2.files[*i];
            *h != sha256_hex(b) || u32::from_str_radix(mode, 8).ok() != Some(*m)
        })
        .map(|(i, _)| i)
        .collect();
    let commit = Commit {
        layout: &lay,
        number: to,
        generation_json: None,
        pushed: None,
        cached: names.clone(),
        writes: writes_idx
            .iter()
            .map(|i| Write {
                path: t.rebase(&bytes[*i].0),
                bytes: &bytes[*i].1,
                mode: bytes[*i].2,
            })
            .collect(),
        removes: removes.iter().map(|r| t.rebase(r)).collect(),
        trim: Vec::new(),
        pause: None,
        activate_from: opts.activate.then(|| units_of(Some(&current))),
        wait_secs: opts.timeout.as_secs().max(1),
    };
    t.run_checked("commit", &remote::commit(&commit), opts.timeout)?;

    let mut report = DeployReport {
        target: t.name(),
        stack: opts.stack.clone(),
        system: target_gen.system.clone(),
        generation: Some(to),
        files_written: writes_idx.iter().map(|i| bytes[*i].0.clone()).collect(),
        files_removed: removes,
        store_root: opts.store_root.clone(),
        deployments_root: dep_root.clone(),
        cached: names.len(),
        activation_pending: st.activate_pending.is_some() && !opts.activate,
        ..DeployReport::default()
    };
    report.plan.push(format!(
        "switch current from {} to {}",
        Generation::file_name(current.number),
        Generation::file_name(to)
    ));
    if opts.activate {
        let desired: Vec<Desired> = target_gen
            .files
            .iter()
            .zip(&bytes)
            .map(|(f, (p, b, m))| Desired {
                path: p.clone(),
                kind: f.kind,
                mode: *m,
                bytes: b.clone(),
                secret: f.secret,
                secret_ref: f.secret_ref.clone(),
                service: f.service.clone(),
            })
            .collect();
        let (stop, restart) = match &st.activate_pending {
            Some(ran) => restart_all(ran, Some(&current), &target_gen),
            None => unit_changes(Some(&current), &target_gen, &desired, &writes_idx),
        };
        let units: Vec<String> = target_gen.services.iter().map(|s| s.unit.clone()).collect();
        let failed = activate_with(
            t,
            &stack_dir,
            to,
            &stop,
            &restart,
            &units,
            opts.settle_secs,
            opts.timeout,
        )?;
        report.activated = true;
        report.units_restarted = restart;
        report.units_stopped = stop;
        activation_ended(t, &stack_dir, opts.timeout)?;
        if !failed.is_empty() {
            let logs = unit_logs(t, &failed, opts.timeout);
            return Err(DeployError::ActivationFailed {
                target: t.name(),
                failed: describe_failed(&failed),
                outcome: format!("{} stays current", gen_label(to)),
                logs,
            });
        }
    }
    report.counters = t.counters();
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// One generation as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationInfo {
    pub number: u64,
    pub current: bool,
    pub created: String,
    pub store_paths: Vec<String>,
    pub services: Vec<String>,
}

/// What `status` found.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub target: String,
    pub stack: String,
    pub current: Option<u64>,
    pub generations: Vec<GenerationInfo>,
    /// Files of the current generation that changed on the target.
    pub drifted_files: Vec<String>,
    /// Files of the current generation missing on the target.
    pub missing_files: Vec<String>,
    /// Interrupted commits that the next deploy or rollback completes.
    pub pending_journals: Vec<String>,
    /// An `--activate` that never ended: the running units may not match
    /// the current generation.
    pub activation_pending: bool,
    /// Store paths of the current generation missing on the target.
    pub missing_paths: Vec<String>,
    pub rolled_forward: Vec<String>,
}

/// Show a stack's generations and drift on the target behind `t`.
pub fn status(
    t: &dyn Transport,
    stack: &str,
    store_root: &Path,
    deployments_root: Option<&Path>,
    timeout: Duration,
) -> Result<StatusReport, DeployError> {
    let (probe, _) = probe(t, timeout)?;
    let dep_root = deployments_root_or(deployments_root, &probe);
    let stack_dir = dep_root.join(stack);
    let lay = layout(t, store_root, &dep_root, stack);
    let out = t.run_checked(
        "state query",
        &remote::state(&lay, &[], &[], &[], false, None),
        timeout,
    )?;
    let st = State::parse(&out.stdout, 0);
    let current = parse_current(t, &st, &stack_dir)?;
    let mut report = StatusReport {
        target: t.name(),
        stack: stack.to_string(),
        current: current.as_ref().map(|c| c.number),
        generations: Vec::new(),
        drifted_files: Vec::new(),
        missing_files: Vec::new(),
        pending_journals: st.pending_journals.clone(),
        activation_pending: st.activate_pending.is_some(),
        missing_paths: Vec::new(),
        rolled_forward: st.rolled_forward.clone(),
    };
    // All generation files in one round trip.
    let mut dump = String::new();
    for n in &st.generations {
        let p = t.rebase(&stack_dir.join(Generation::file_name(*n)));
        dump.push_str(&format!(
            "echo 'gen-begin {n}'; base64 < {}; echo 'gen-end'\n",
            crate::transport::script::quote_path(&p)
        ));
    }
    if !dump.is_empty() {
        let out = t.run_checked("read generations", &dump, timeout)?;
        let mut cur: Option<(u64, String)> = None;
        for line in out.stdout.lines() {
            if let Some(n) = line.strip_prefix("gen-begin ") {
                cur = n.parse().ok().map(|n| (n, String::new()));
            } else if line == "gen-end" {
                if let Some((n, b64)) = cur.take()
                    && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64)
                    && let Ok(g) = Generation::parse(&bytes)
                {
                    report.generations.push(GenerationInfo {
                        number: n,
                        current: Some(n) == report.current,
                        created: g.created,
                        store_paths: g.store_paths,
                        services: g.services.iter().map(|s| s.name.clone()).collect(),
                    });
                }
            } else if let Some((_, b64)) = cur.as_mut() {
                b64.push_str(line.trim());
            }
        }
    }
    if let Some(c) = &current {
        let (st2, _, _) = generation_state(t, &lay, c, false, timeout)?;
        report.missing_paths = st2.missing;
        for (f, (h, m)) in c.files.iter().zip(&st2.files) {
            let mode_ok = u32::from_str_radix(m, 8).ok() == Some(f.mode_bits());
            let drift = match (&f.sha256, h.as_str()) {
                (_, "absent") => {
                    report.missing_files.push(f.path.display().to_string());
                    false
                }
                (_, "symlink" | "notfile") => true,
                (Some(expected), actual) => expected != actual || !mode_ok,
                (None, _) => !mode_ok,
            };
            if drift {
                report.drifted_files.push(f.path.display().to_string());
            }
        }
    }
    Ok(report)
}

fn deployments_root_or(opt: Option<&Path>, probe: &Probe) -> PathBuf {
    deployments_root(opt, probe)
}

/// What gc on a target did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcTargetReport {
    pub target: String,
    pub pinned: usize,
    pub deleted: Vec<String>,
    pub kept: usize,
    /// Unpinned entries kept because a deploy marked them in use within
    /// the last [`remote::IN_USE_MINUTES`] minutes (counted in `kept`).
    pub in_use: Vec<String>,
    /// Pushes left for more than an hour by killed deploys: removed (or,
    /// on a dry run, that would be).
    pub stale_pushes: Vec<String>,
    pub dry_run: bool,
}

/// Delete the store entries on the target that no generation of any stack
/// pins. Refuses while a deploy is committing there.
pub fn gc_target(
    t: &dyn Transport,
    store_root: &Path,
    deployments_root: Option<&Path>,
    dry_run: bool,
    timeout: Duration,
) -> Result<GcTargetReport, DeployError> {
    let (probe, _) = probe(t, timeout)?;
    let dep_root = deployments_root_or(deployments_root, &probe);
    let dr = crate::transport::script::quote_path(&t.rebase(&dep_root));
    let s = crate::transport::script::quote_path(&t.rebase(store_root));
    // A push left for more than an hour is stale: swept (or, on a dry
    // run, only reported).
    let sweep = if dry_run {
        "echo \"stale $j\""
    } else {
        "chmod -R u+w \"$j\" 2>/dev/null; rm -rf \"$j\"; echo \"swept $j\""
    };
    let script = format!(
        "for g in {dr}/*/gen-*.json; do [ -e \"$g\" ] || continue; echo \"gen-begin $g\"; base64 < \"$g\"; echo gen-end; done\n\
         for j in {dr}/*/.journal-*.sh; do [ -e \"$j\" ] && echo \"busy $j\"; done\n\
         for j in {s}/.tmp-push-*; do [ -e \"$j\" ] || continue; if [ -n \"$(find \"$j\" -maxdepth 0 -mmin +60 2>/dev/null)\" ]; then {sweep}; else echo \"busy $j\"; fi; done\n\
         for e in {s}/*; do if [ -e \"$e/built\" ]; then echo \"entry ${{e##*/}}\"; fi; done\n\
         [ ! -d {s} ] || find {s} -mindepth 2 -maxdepth 2 -name built -mmin -{m} 2>/dev/null | sed 's|/built$||; s|.*/|fresh |'\n\
         true\n",
        m = remote::IN_USE_MINUTES
    );
    let out = t.run_checked("gc query", &script, timeout)?;
    let swept: Vec<String> = out
        .stdout
        .lines()
        .filter_map(|l| {
            l.strip_prefix("swept ")
                .or_else(|| l.strip_prefix("stale "))
        })
        .map(str::to_string)
        .collect();
    let mut pinned: BTreeSet<String> = BTreeSet::new();
    let mut entries = Vec::new();
    let mut busy = Vec::new();
    let mut fresh: BTreeSet<String> = BTreeSet::new();
    let mut cur: Option<String> = None;
    for line in out.stdout.lines() {
        if line.starts_with("gen-begin ") {
            cur = Some(String::new());
        } else if line == "gen-end" {
            if let Some(b64) = cur.take() {
                let g = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .ok()
                    .and_then(|b| Generation::parse(&b).ok())
                    .ok_or_else(|| target_err(t, "a generation file there cannot be read; gc stopped so it deletes nothing pinned"))?;
                for p in g.store_paths {
                    if let Some(n) = Path::new(&p).file_name() {
                        pinned.insert(n.to_string_lossy().into_owned());
                    }
                }
            }
        } else if let Some(b64) = cur.as_mut() {
            b64.push_str(line.trim());
        } else if let Some(e) = line.strip_prefix("entry ") {
            entries.push(e.to_string());
        } else if let Some(b) = line.strip_prefix("busy ") {
            busy.push(b.to_string());
        } else if let Some(e) = line.strip_prefix("fresh ") {
            fresh.insert(e.to_string());
        }
    }
    if !busy.is_empty() {
        return Err(target_err(
            t,
            format!(
                "a deploy is in progress there ({}); retry gc when it is done",
                busy.join(", ")
            ),
        ));
    }
    let unpinned = entries.iter().filter(|e| !pinned.contains(*e));
    let (mut in_use, mut deleted): (Vec<String>, Vec<String>) =
        unpinned.cloned().partition(|e| fresh.contains(e));
    let mut report = GcTargetReport {
        target: t.name(),
        pinned: pinned.len(),
        kept: entries.len() - deleted.len(),
        deleted: Vec::new(),
        in_use: Vec::new(),
        stale_pushes: swept,
        dry_run,
    };
    if dry_run || deleted.is_empty() {
        report.deleted = deleted;
        report.in_use = in_use;
        return Ok(report);
    }
    // Each entry is renamed away first, so it vanishes whole; one that a
    // deploy marked in use meanwhile (see `remote::IN_USE_MINUTES`) is put
    // back, unless a deploy pushed it again meanwhile.
    let mut del = format!("set -e\nS={s}\n");
    let _ = std::fmt::Write::write_fmt(
        &mut del,
        format_args!(
            r#"for n in {names}; do
  [ -e "$S/$n" ] || continue
  t="$S/.del-$$-$n"
  chmod u+w "$S/$n" 2>/dev/null || true
  mv "$S/$n" "$t"
  if [ -n "$(find "$t/built" -mmin -{m} 2>/dev/null)" ]; then
    chmod a-w "$t" 2>/dev/null || true
    [ -e "$S/$n" ] || mv -T "$t" "$S/$n" 2>/dev/null || [ -e "$S/$n" ] || mv "$t" "$S/$n"
    if [ -e "$t" ]; then chmod -R u+w "$t" 2>/dev/null || true; rm -rf "$t"; fi
    echo "in-use $n"
    continue
  fi
  chmod -R u+w "$t" 2>/dev/null || true
  rm -rf "$t"
done
"#,
            names = crate::transport::script::words(deleted.iter().map(String::as_str)),
            m = remote::IN_USE_MINUTES
        ),
    );
    let out = t.run_checked("gc", &del, timeout)?;
    let kept_now: BTreeSet<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("in-use "))
        .collect();
    deleted.retain(|e| {
        let keep = kept_now.contains(e.as_str());
        if keep {
            in_use.push(e.clone());
        }
        !keep
    });
    report.kept = entries.len() - deleted.len();
    report.deleted = deleted;
    report.in_use = in_use;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_keeps_ten_and_the_live_one() {
        let existing: Vec<u64> = (1..=12).collect();
        assert_eq!(trim_list(&existing, 13), vec![1, 2, 3]);
        assert_eq!(trim_list(&[1, 2, 3], 4), Vec::<u64>::new());
        // A rollback made 2 live: it is never trimmed.
        let existing: Vec<u64> = (1..=11).collect();
        assert_eq!(trim_list(&existing, 2), vec![1]);
    }

    fn with_units(units: &[&str]) -> Generation {
        let services: Vec<serde_json::Value> = units
            .iter()
            .map(|u| {
                serde_json::json!({"name": u, "package": "P", "store_path": "/s/p",
                    "binary": "b", "unit": format!("{u}.service")})
            })
            .collect();
        serde_json::from_value(serde_json::json!({"number": 1, "stack": "S",
            "created": "t", "store_paths": [], "services": services, "content_id": ""}))
        .expect("a generation")
    }

    #[test]
    fn an_unended_activation_restarts_every_unit_and_stops_the_ones_that_left() {
        let current = with_units(&["a", "b"]);
        let next = with_units(&["a", "c"]);
        let ran = vec!["old.service".to_string(), "a.service".to_string()];
        let (stop, restart) = restart_all(&ran, Some(&current), &next);
        assert_eq!(restart, vec!["a.service", "c.service"]);
        assert_eq!(stop, vec!["b.service", "old.service"]);
        let (stop, restart) = restart_all(&[], None, &next);
        assert_eq!((stop.len(), restart.len()), (0, 2));
    }
}

/// What one target of a fleet deploy is doing.
#[derive(Debug)]
pub enum TargetEvent<'a> {
    Connected { system: &'a str },
    Deploying,
    Done(&'a DeployReport),
    Failed(&'a DeployError),
}

/// Receives per-target progress of a fleet deploy; called from worker
/// threads.
pub trait FleetObserver: Sync {
    fn target_event(&self, target: &str, event: TargetEvent<'_>);
}

/// The outcome for one target of a fleet deploy.
#[derive(Debug)]
pub struct TargetResult {
    pub target: String,
    pub system: Option<String>,
    pub result: Result<DeployReport, DeployError>,
}

/// Opens the transport to one target (`ssh://...` or a local root).
pub type Connector<'a> = dyn Fn(&str) -> Result<Box<dyn Transport>, DeployError> + Sync + 'a;

/// Run `work` over `items` on at most `parallel` threads, keeping order.
fn bounded<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1).min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = work(item);
                    if let Ok(mut all) = results.lock() {
                        all[i] = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// The same error, told for another target of the same system, with the
/// exit code of the original.
fn for_target(e: &DeployError, target: &str) -> DeployError {
    DeployError::Repeated {
        target: target.to_string(),
        message: e.to_string(),
        code: crate::error::deploy_exit_code(e),
    }
}

/// The error of a target skipped because another failed (`--fail-fast`).
fn skipped(target: &str) -> DeployError {
    DeployError::Target {
        target: target.to_string(),
        message: "skipped: another target failed and --fail-fast is set".into(),
    }
}

/// Connect to and probe every target, at most `parallel` at once.
fn probe_all(
    targets: &[String],
    connect: &Connector<'_>,
    opts: &DeployOptions,
    parallel: usize,
    fail_fast: bool,
    stop: &std::sync::atomic::AtomicBool,
    fleet: &dyn FleetObserver,
) -> Vec<Result<Probed, DeployError>> {
    use std::sync::atomic::Ordering;
    bounded(targets, parallel, |target| {
        if fail_fast && stop.load(Ordering::Relaxed) {
            return Err(skipped(target));
        }
        let r = connect(target).and_then(|t| probe_target(t, opts.timeout));
        match &r {
            Ok(p) => fleet.target_event(
                target,
                TargetEvent::Connected {
                    system: &p.system.to_string(),
                },
            ),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                fleet.target_event(target, TargetEvent::Failed(e));
            }
        }
        r
    })
}

/// Deploy one stack to many targets: recipes and secrets are checked once,
/// targets are connected and probed in parallel (at most `parallel` at
/// once), each system's closure is realised once, then every target is
/// deployed in parallel. A failed target does not stop the others unless
/// `fail_fast`. Errors before any connection (recipes, secrets) fail the
/// whole deploy; everything after is reported per target.
#[allow(clippy::too_many_arguments)]
pub fn deploy_fleet(
    prepared: &Prepared,
    targets: &[String],
    connect: &Connector<'_>,
    opts: &DeployOptions,
    parallel: usize,
    fail_fast: bool,
    observer: &dyn Observer,
    fleet: &dyn FleetObserver,
) -> Result<Vec<TargetResult>, DeployError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let start = Instant::now();
    let stop = AtomicBool::new(false);

    // Plan for this machine's system while the targets are connected and
    // probed: that hashes the sources (the bulk of planning, which the
    // plans for other systems reuse) and, when everything is built
    // already, gives the closure of targets of this machine's system.
    let host = System::host();
    let (probed, speculated) = std::thread::scope(|scope| {
        let speculation = scope.spawn(|| {
            // One core fewer than the machine has, at a lower priority:
            // the SSH handshakes running meanwhile (and, on a small
            // machine, the rest of the host) come first.
            lower_thread_priority();
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1).max(1));
            let work = || {
                prepared.source_hash(opts);
                closure_if_built(&prepared.recipes, &prepared.stack, &prepared.store, &host)
            };
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .start_handler(|_| lower_thread_priority())
                .build()
            {
                Ok(pool) => pool.install(work),
                Err(_) => work(),
            }
        });
        let probed = probe_all(targets, connect, opts, parallel, fail_fast, &stop, fleet);
        (probed, speculation.join().ok().flatten())
    });

    // One closure per system.
    let mut closures: BTreeMap<System, Result<Closure, DeployError>> = BTreeMap::new();
    if let Some(c) = speculated
        && probed.iter().flatten().any(|p| p.system == host)
    {
        closures.insert(host.clone(), Ok(c));
    }
    for p in &probed {
        let Ok(p) = p else { continue };
        if closures.contains_key(&p.system) || (fail_fast && stop.load(Ordering::Relaxed)) {
            continue;
        }
        let c = realise_closure(
            &prepared.recipes,
            &prepared.stack,
            &prepared.store,
            &p.system,
            opts,
            observer,
        );
        if c.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        closures.insert(p.system.clone(), c);
    }

    // Deploy every probed target, at most `parallel` at once.
    let work: Vec<(&String, &Probed)> = targets
        .iter()
        .zip(&probed)
        .filter_map(|(t, p)| p.as_ref().ok().map(|p| (t, p)))
        .collect();
    let deployed: Vec<Result<DeployReport, DeployError>> =
        bounded(&work, parallel, |(target, p)| {
            let target = target.as_str();
            let result = match closures.get(&p.system) {
                None => Err(skipped(target)),
                Some(Err(e)) => Err(for_target(e, target)),
                Some(Ok(_)) if fail_fast && stop.load(Ordering::Relaxed) => Err(skipped(target)),
                Some(Ok(closure)) => {
                    fleet.target_event(target, TargetEvent::Deploying);
                    deploy_realised(
                        p.transport.as_ref(),
                        prepared,
                        &p.probe,
                        &p.system,
                        closure,
                        opts,
                        start,
                    )
                }
            };
            match &result {
                Ok(r) => fleet.target_event(target, TargetEvent::Done(r)),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    fleet.target_event(target, TargetEvent::Failed(e));
                }
            }
            result
        });
    let mut deployed = deployed.into_iter();
    let results = targets
        .iter()
        .zip(probed)
        .map(|(target, p)| match p {
            Err(e) => TargetResult {
                target: target.clone(),
                system: None,
                result: Err(e),
            },
            Ok(p) => TargetResult {
                target: target.clone(),
                system: Some(p.system.to_string()),
                result: deployed.next().unwrap_or_else(|| Err(skipped(target))),
            },
        })
        .collect();
    Ok(results)
}
