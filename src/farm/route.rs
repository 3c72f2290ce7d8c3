//! Routing: where each derivation that is not in the local store is built.
//!
//! For each such derivation, in this order:
//!
//! 1. **this machine**, when local builds are allowed (not `--max-jobs 0`,
//!    not `--builders-only`), its system is the derivation's and its
//!    features (`features` in config.toml) cover the derivation's, and one
//!    of its job slots (`--max-jobs`) is free;
//! 2. a **registered builder** whose `systems` include the derivation's and
//!    whose `features` cover it, that is reachable (probed once per run:
//!    strict host-key checking, system, `sh`, rsync, writable store root,
//!    load) and has a free job slot. Among those with a free slot,
//!    builders are ranked by busy slots per unit of speed factor (fewer
//!    first, as Nix does: an idle builder with speed factor 2 comes before
//!    an idle one with 1, and before a busy one with 2), then speed factor
//!    (higher first), then measured load (the 1-minute load average, lower
//!    first), then free slots (more first), then name. A builder's
//!    `max-jobs` slots are lock files `<slots>/<builder>/<i>.lock` held
//!    with `flock` for the length of a build, so concurrent punix
//!    processes on this machine share them. When every candidate is busy,
//!    the build waits for a slot;
//! 3. when a builder fails (unreachable mid-way, killed, disconnected, a
//!    hash mismatch), the **next** candidate; a failed *build* (the script
//!    exits non-zero, its output is rejected) is not retried elsewhere;
//! 4. when no machine can build it, an error ([`BuildError::NoMachine`])
//!    that lists this machine and every builder with the reason each was
//!    rejected, and suggests `punix builders add` or the CI route. A plan
//!    whose derivations some machine can never build (wrong system,
//!    missing features) fails that way before anything is built.
//!    Emulation is never used silently: a builder serves only the systems
//!    it is registered for, and one whose `uname` names none of them is
//!    rejected.
//!
//! Each decision is a [`Placement`] (the machine and every rejected
//! candidate with its reason), handed to [`Observer::placed`] as it is made
//! and kept in the [`Report`]: `--explain` prints them.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::probe::{self, BuilderStatus};
use super::remote::{self, RemoteBuilder, RemoteError};
use super::{Builder, FarmError};
use crate::build::local::{self, Outcome};
use crate::build::plan::{Node, Plan};
use crate::build::scheduler::{self, Options, Report, Runner, cores_per_build};
use crate::build::{BuildError, Observer, Placement, Rejection};
use crate::config::ConfigError;
use crate::platform::System;
use crate::store::Store;
use crate::store::lock::{FileLock, LockMode};
use crate::transport::ssh::SshTransport;
use crate::transport::{Transport, TransportError};

/// The name this machine goes by in placements.
pub const LOCAL: &str = "local";

/// How long a build waits before looking again for a free slot.
const SLOT_POLL: Duration = Duration::from_millis(250);

/// How to route a plan's builds.
#[derive(Clone, Debug)]
pub struct RouteOptions {
    /// The scheduler's options; `jobs` is the number of local job slots.
    pub build: Options,
    /// Whether this machine may build (false: `--max-jobs 0`,
    /// `--builders-only`).
    pub local: bool,
    /// Features this machine offers (`features` in config.toml).
    pub local_features: Vec<String>,
    /// Where the per-builder slot locks live (`~/.punix/slots`).
    pub slots_dir: PathBuf,
    /// Limit on reaching a builder.
    pub connect_timeout: Duration,
    /// Limit on one remote build (the builder script and the hash).
    pub build_timeout: Duration,
    /// The registry the builders came from, for messages.
    pub registry: Option<PathBuf>,
    /// Binary caches (directory, `file://` or `http(s)://` URLs) to
    /// substitute from before anything is built, in order.
    pub caches: Vec<String>,
}

/// The default connect timeout for builders.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default limit on one remote build.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl RouteOptions {
    /// Local builds allowed, no features, slots under `slots_dir`.
    pub fn new(build: Options, slots_dir: PathBuf) -> RouteOptions {
        RouteOptions {
            build,
            local: true,
            local_features: Vec::new(),
            slots_dir,
            connect_timeout: CONNECT_TIMEOUT,
            build_timeout: BUILD_TIMEOUT,
            registry: None,
            caches: Vec::new(),
        }
    }
}

/// `~/.punix/slots`.
pub fn default_slots_dir() -> Result<PathBuf, ConfigError> {
    Ok(crate::config::home()?.join(".punix/slots"))
}

/// Build what `plan` lacks in `store`, each derivation where the routing
/// rules (see the module doc) put it: this machine or one of `builders`.
/// The placements are in the report.
pub fn realise_routed(
    store: &Store,
    plan: &Plan,
    options: &RouteOptions,
    builders: &[Builder],
    observer: &dyn Observer,
) -> Result<Report, BuildError> {
    let (substituted, cache_notes) = substitute(store, plan, &options.caches, observer);
    let need = scheduler::missing(store, plan);
    if let Err(mut e) = preflight(plan, &need, options, builders) {
        // Say why the caches did not have it either.
        if let BuildError::NoMachine { rejected, .. } = &mut e {
            rejected.extend(cache_notes);
        }
        return Err(e);
    }
    let router = Router::new(store, plan, options, builders, observer);
    let mut report = scheduler::realise_with(store, plan, &options.build, observer, &router)?;
    report.builders = router.traffic();
    let mut placements = router
        .placements
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    placements.retain(|p| report.built.contains(&p.name) || report.present.contains(&p.name));
    placements.extend(substituted);
    report.placements = placements;
    Ok(report)
}

/// Fetch from the binary caches, in order, what they have of the plan's
/// missing entries: one batched query per cache, every entry verified on
/// import (content hash recomputed) before it lands in the store. A cache
/// that cannot be read is passed over (the entries are then built); the
/// placements say where each fetched entry came from.
fn substitute(
    store: &Store,
    plan: &Plan,
    caches: &[String],
    observer: &dyn Observer,
) -> (Vec<Placement>, Vec<Rejection>) {
    let mut placements = Vec::new();
    let mut notes: Vec<Rejection> = Vec::new();
    for url in caches {
        let need = scheduler::missing(store, plan);
        if need.is_empty() {
            break;
        }
        let outcome = crate::cache::Cache::open(url).and_then(|cache| {
            cache.check(store.root())?;
            let have = cache.has_many(&need)?;
            if have.is_empty() {
                return Ok(Vec::new());
            }
            cache.fetch_into(store, &have, &crate::cache::Silent)?;
            Ok(have.into_iter().collect::<Vec<_>>())
        });
        match outcome {
            Ok(fetched) => {
                for name in fetched {
                    let Some(node) = plan.nodes.get(&name) else {
                        continue;
                    };
                    let p = Placement {
                        module: node.module.clone(),
                        name: name.clone(),
                        system: node.drv.system.clone(),
                        machine: "cache".into(),
                        via: url.clone(),
                        why: "the cache has it (verified on import)".into(),
                        rejected: notes.clone(),
                    };
                    observer.placed(&p);
                    placements.push(p);
                }
            }
            Err(e) => notes.push(Rejection {
                machine: format!("cache {url}"),
                reason: e.to_string().lines().next().unwrap_or_default().to_string(),
            }),
        }
    }
    (placements, notes)
}

/// Where `plan`'s missing derivations could go, without building or
/// connecting: for `--dry-run --explain`. The machines that pass the static
/// checks (system, features, local builds allowed) are listed as
/// candidates in ranking order of their speed factor.
pub fn explain_static(
    plan: &Plan,
    need: &[String],
    options: &RouteOptions,
    builders: &[Builder],
) -> Vec<(String, Vec<String>, Vec<Rejection>)> {
    let host = System::host();
    need.iter()
        .map(|name| {
            let node = &plan.nodes[name];
            let c = static_candidates(node, &host, options, builders);
            let mut ok = Vec::new();
            if c.local {
                ok.push(LOCAL.to_string());
            }
            let mut bs: Vec<&Builder> = c.builders.iter().map(|&i| &builders[i]).collect();
            bs.sort_by(|a, b| b.speed_factor.total_cmp(&a.speed_factor));
            ok.extend(bs.iter().map(|b| b.name.clone()));
            (name.clone(), ok, c.rejected)
        })
        .collect()
}

/// Refuse a plan with a derivation no machine can ever build.
fn preflight(
    plan: &Plan,
    need: &[String],
    options: &RouteOptions,
    builders: &[Builder],
) -> Result<(), BuildError> {
    let host = System::host();
    let mut modules = Vec::new();
    let mut rejected: Option<Vec<Rejection>> = None;
    for name in need {
        let node = &plan.nodes[name];
        let c = static_candidates(node, &host, options, builders);
        if !c.local && c.builders.is_empty() {
            modules.push(node.module.clone());
            rejected.get_or_insert(c.rejected);
        }
    }
    match rejected {
        None => Ok(()),
        Some(rejected) => Err(BuildError::NoMachine {
            system: plan.system.to_string(),
            modules,
            rejected,
            registry: options.registry.clone(),
        }),
    }
}

/// The machines that could build `node` on paper.
struct Static {
    local: bool,
    /// Indexes into the builders.
    builders: Vec<usize>,
    /// This machine and the builders that cannot, with the reason.
    rejected: Vec<Rejection>,
}

fn missing_features<'a>(want: &'a [String], have: &[String]) -> Vec<&'a str> {
    want.iter()
        .filter(|f| !have.contains(f))
        .map(String::as_str)
        .collect()
}

fn features_list(f: &[&str]) -> String {
    f.iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn static_candidates(
    node: &Node,
    host: &System,
    options: &RouteOptions,
    builders: &[Builder],
) -> Static {
    let system = &node.drv.system;
    let mut rejected = Vec::new();
    let reject = |rejected: &mut Vec<Rejection>, machine: &str, reason: String| {
        rejected.push(Rejection {
            machine: machine.to_string(),
            reason,
        })
    };
    let local = if host.to_string() != *system {
        reject(
            &mut rejected,
            LOCAL,
            format!("wrong system: this machine is `{host}`"),
        );
        false
    } else if !options.local {
        reject(
            &mut rejected,
            LOCAL,
            "local builds are off (`--max-jobs 0` or `--builders-only`)".into(),
        );
        false
    } else {
        let missing = missing_features(&node.drv.features, &options.local_features);
        if missing.is_empty() {
            true
        } else {
            reject(
                &mut rejected,
                LOCAL,
                format!(
                    "package `{}` needs the machine feature(s) {}, which this machine does not offer",
                    node.module,
                    features_list(&missing)
                ),
            );
            false
        }
    };
    let mut ok = Vec::new();
    for (i, b) in builders.iter().enumerate() {
        if !b.systems.iter().any(|s| s.to_string() == *system) {
            let serves = if b.systems.is_empty() {
                "no system".to_string()
            } else {
                b.systems
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            reject(
                &mut rejected,
                &b.name,
                format!("wrong system: it builds for {serves}"),
            );
            continue;
        }
        let missing = missing_features(&node.drv.features, &b.features);
        if !missing.is_empty() {
            reject(
                &mut rejected,
                &b.name,
                format!("it lacks the feature(s) {}", features_list(&missing)),
            );
            continue;
        }
        ok.push(i);
    }
    Static {
        local,
        builders: ok,
        rejected,
    }
}

/// A builder as probed for this run.
enum Probed {
    Ready {
        transport: Arc<SshTransport>,
        status: BuilderStatus,
    },
    Rejected(String),
}

/// The scheduler's runner for routed builds.
struct Router<'a> {
    store: &'a Store,
    options: &'a RouteOptions,
    builders: &'a [Builder],
    observer: &'a dyn Observer,
    host: System,
    /// Local job slots and how many are taken.
    local_jobs: usize,
    local_running: AtomicUsize,
    /// Workers the scheduler may run at once.
    workers: usize,
    /// Probe results, once per builder per run.
    probed: Mutex<HashMap<usize, Arc<OnceLock<Probed>>>>,
    /// Builders whose connection died during this run, and why.
    lost: Mutex<HashMap<usize, String>>,
    placements: Mutex<Vec<Placement>>,
}

/// A machine to build on, with its slot held.
enum Choice<'b> {
    Local(LocalSlot<'b>),
    Remote {
        index: usize,
        transport: Arc<SshTransport>,
        _slot: FileLock,
        why: String,
    },
}

/// One of this machine's job slots; released when dropped.
struct LocalSlot<'b>(&'b AtomicUsize);

impl Drop for LocalSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<'a> Router<'a> {
    /// The connections and round trips to each builder connected so far.
    fn traffic(&self) -> Vec<scheduler::BuilderTraffic> {
        let probed = self.probed.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<scheduler::BuilderTraffic> = probed
            .iter()
            .filter_map(|(i, cell)| match cell.get() {
                Some(Probed::Ready { transport, .. }) => {
                    let c = transport.counters();
                    Some(scheduler::BuilderTraffic {
                        builder: self.builders.get(*i).map(|b| b.name.clone())?,
                        connections: c.connections,
                        round_trips: c.round_trips,
                    })
                }
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.builder.cmp(&b.builder));
        out
    }

    fn new(
        store: &'a Store,
        plan: &Plan,
        options: &'a RouteOptions,
        builders: &'a [Builder],
        observer: &'a dyn Observer,
    ) -> Router<'a> {
        let host = System::host();
        let local_jobs = if options.local && plan.system == host {
            options.build.jobs.max(1)
        } else {
            0
        };
        let remote_jobs: usize = builders
            .iter()
            .filter(|b| b.systems.contains(&plan.system))
            .map(|b| b.max_jobs.max(1))
            .sum();
        Router {
            store,
            options,
            builders,
            observer,
            host,
            local_jobs,
            local_running: AtomicUsize::new(0),
            workers: (local_jobs + remote_jobs).max(1),
            probed: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashMap::new()),
            placements: Mutex::new(Vec::new()),
        }
    }

    /// The probe of builder `i`, made once (concurrent askers wait for it).
    fn probe(&self, i: usize) -> Arc<OnceLock<Probed>> {
        let cell = {
            let mut map = self.probed.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(i).or_default().clone()
        };
        cell.get_or_init(|| probe_builder(&self.builders[i], self.store.root(), self.options));
        cell
    }

    /// Probe the builders `which` that are not probed yet, in parallel.
    fn probe_all(&self, which: &[usize]) {
        let todo: Vec<usize> = {
            let map = self.probed.lock().unwrap_or_else(|e| e.into_inner());
            which
                .iter()
                .copied()
                .filter(|i| map.get(i).is_none_or(|c| c.get().is_none()))
                .collect()
        };
        if todo.len() <= 1 {
            return;
        }
        std::thread::scope(|s| {
            for &i in &todo {
                s.spawn(move || {
                    self.probe(i);
                });
            }
        });
    }

    fn take_local_slot(&self) -> Option<LocalSlot<'_>> {
        let mut cur = self.local_running.load(Ordering::Acquire);
        while cur < self.local_jobs {
            match self.local_running.compare_exchange(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(LocalSlot(&self.local_running)),
                Err(now) => cur = now,
            }
        }
        None
    }

    fn slot_dir(&self, b: &Builder) -> PathBuf {
        self.options.slots_dir.join(&b.name)
    }

    /// How many of builder `b`'s slots are free now (others may take them
    /// meanwhile).
    fn free_slots(&self, b: &Builder) -> usize {
        let dir = self.slot_dir(b);
        if fs::create_dir_all(&dir).is_err() {
            return 0;
        }
        (0..b.max_jobs.max(1))
            .filter(|i| {
                matches!(
                    FileLock::try_acquire(&dir.join(format!("{i}.lock")), LockMode::Exclusive),
                    Ok(Some(_))
                )
            })
            .count()
    }

    /// Take a free slot of builder `b`, if one is free.
    fn take_slot(&self, b: &Builder) -> Option<FileLock> {
        let dir = self.slot_dir(b);
        fs::create_dir_all(&dir).ok()?;
        (0..b.max_jobs.max(1)).find_map(|i| {
            FileLock::try_acquire(&dir.join(format!("{i}.lock")), LockMode::Exclusive)
                .ok()
                .flatten()
        })
    }

    /// Pick a machine for `node`, skipping the builders in `failed`.
    /// `Ok(None)`: every candidate is busy, look again later.
    #[allow(clippy::type_complexity)]
    fn choose(
        &self,
        node: &Node,
        failed: &[Rejection],
    ) -> Result<Option<(Choice<'_>, Vec<Rejection>)>, Vec<Rejection>> {
        let stat = static_candidates(node, &self.host, self.options, self.builders);
        let mut rejected = stat.rejected;
        let mut candidates: Vec<usize> = Vec::new();
        for &i in &stat.builders {
            let b = &self.builders[i];
            if let Some(f) = failed.iter().find(|f| f.machine == b.name) {
                rejected.push(f.clone());
                continue;
            }
            candidates.push(i);
        }
        if stat.local
            && let Some(slot) = self.take_local_slot()
        {
            for &i in &candidates {
                rejected.push(Rejection {
                    machine: self.builders[i].name.clone(),
                    reason: "not needed: this machine builds it (it comes first when it can)"
                        .into(),
                });
            }
            return Ok(Some((Choice::Local(slot), rejected)));
        }
        if stat.local {
            rejected.push(Rejection {
                machine: LOCAL.into(),
                reason: format!("no free slot: its {} job slot(s) are busy", self.local_jobs),
            });
        }
        self.probe_all(&candidates);
        let mut ready: Vec<(usize, Arc<SshTransport>, BuilderStatus, usize)> = Vec::new();
        for &i in &candidates {
            let b = &self.builders[i];
            if let Some(why) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).get(&i) {
                rejected.push(Rejection {
                    machine: b.name.clone(),
                    reason: why.clone(),
                });
                continue;
            }
            let cell = self.probe(i);
            match cell.get() {
                Some(Probed::Ready { transport, status }) => {
                    let free = self.free_slots(b);
                    ready.push((i, transport.clone(), status.clone(), free));
                }
                Some(Probed::Rejected(why)) => rejected.push(Rejection {
                    machine: b.name.clone(),
                    reason: why.clone(),
                }),
                None => rejected.push(Rejection {
                    machine: b.name.clone(),
                    reason: "the probe did not finish".into(),
                }),
            }
        }
        if ready.is_empty() && !stat.local {
            return Err(rejected);
        }
        ready.sort_by(|a, b| {
            rank_order(
                (&self.builders[a.0], a.3, a.2.load),
                (&self.builders[b.0], b.3, b.2.load),
            )
        });
        let describe = |i: usize, status: &BuilderStatus, free: usize| {
            let b = &self.builders[i];
            format!(
                "{free} of {} slot(s) free, speed factor {}, load {}",
                b.max_jobs.max(1),
                b.speed_factor,
                status
                    .load
                    .map(|l| format!("{l:.2}"))
                    .unwrap_or_else(|| "unknown".into())
            )
        };
        let mut chosen = None;
        for (rank, (i, transport, status, free)) in ready.iter().enumerate() {
            let b = &self.builders[*i];
            if chosen.is_none() && *free > 0 {
                if let Some(slot) = self.take_slot(b) {
                    let why = if rank == 0 {
                        format!("ranked first ({})", describe(*i, status, *free))
                    } else {
                        format!("ranked {} ({})", rank + 1, describe(*i, status, *free))
                    };
                    chosen = Some(Choice::Remote {
                        index: *i,
                        transport: transport.clone(),
                        _slot: slot,
                        why,
                    });
                    continue;
                }
            }
            let reason = if *free == 0 || chosen.is_none() {
                format!(
                    "no free slot: its {} job slot(s) are busy",
                    b.max_jobs.max(1)
                )
            } else {
                format!("ranked lower ({})", describe(*i, status, *free))
            };
            rejected.push(Rejection {
                machine: b.name.clone(),
                reason,
            });
        }
        Ok(chosen.map(|c| (c, rejected)))
    }

    fn place(
        &self,
        node: &Node,
        machine: &str,
        via: String,
        why: String,
        rejected: Vec<Rejection>,
    ) {
        let p = Placement {
            module: node.module.clone(),
            name: node.name.clone(),
            system: node.drv.system.clone(),
            machine: machine.to_string(),
            via,
            why,
            rejected,
        };
        self.observer.placed(&p);
        let mut all = self.placements.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|q| q.name != p.name);
        all.push(p);
    }

    /// A note in the derivation's log, for when every builder failed.
    fn note(&self, node: &Node, text: &str) {
        use std::io::Write;
        let path = self.store.log_path(&node.name);
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = writeln!(f, "punix: {text}");
        }
    }
}

impl Runner for Router<'_> {
    fn workers(&self, need: usize) -> usize {
        self.workers.min(need).max(1)
    }

    fn run(&self, node: &Node, workers: usize) -> Result<Outcome, BuildError> {
        let mut failed: Vec<Rejection> = Vec::new();
        let mut waited = false;
        loop {
            let (choice, rejected) = match self.choose(node, &failed) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    waited = true;
                    std::thread::sleep(SLOT_POLL);
                    continue;
                }
                Err(rejected) => return Err(self.nothing_left(node, failed, rejected)),
            };
            match choice {
                Choice::Local(_slot) => {
                    let why = if waited {
                        "this machine comes first when it can build (after waiting for a slot)"
                    } else {
                        "this machine comes first when it can build"
                    };
                    self.place(node, LOCAL, "this machine".into(), why.into(), rejected);
                    let cores = cores_per_build(
                        self.options.build.cores,
                        self.local_jobs.min(workers).max(1),
                    );
                    return local::build_node(self.store, node, cores);
                }
                Choice::Remote {
                    index,
                    transport,
                    _slot,
                    why,
                } => {
                    let b = &self.builders[index];
                    self.place(node, &b.name, b.url.clone(), why, rejected);
                    let rb = RemoteBuilder {
                        name: &b.name,
                        url: &b.url,
                        transport: transport.as_ref(),
                        max_jobs: b.max_jobs,
                        build_timeout: self.options.build_timeout,
                    };
                    match remote::build_on(self.store, node, &rb, &mut |_, _| {}) {
                        Ok((outcome, _)) => return Ok(outcome),
                        Err(RemoteError::Build(e)) => return Err(e),
                        Err(RemoteError::Builder { step, reason }) => {
                            let alive = transport.check().is_ok();
                            let reason = if alive {
                                format!("failed at the {step} step: {reason}")
                            } else {
                                format!("lost at the {step} step: {reason}")
                            };
                            if !alive {
                                self.lost
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(index, format!("lost earlier in this run: {reason}"));
                            }
                            self.note(
                                node,
                                &format!(
                                    "builder `{}` ({}) {reason}; trying the next machine",
                                    b.name, b.url
                                ),
                            );
                            failed.push(Rejection {
                                machine: b.name.clone(),
                                reason,
                            });
                        }
                    }
                }
            }
        }
    }
}

impl Router<'_> {
    /// The error when no candidate is left for `node`.
    fn nothing_left(
        &self,
        node: &Node,
        failed: Vec<Rejection>,
        rejected: Vec<Rejection>,
    ) -> BuildError {
        if failed.is_empty() {
            return BuildError::NoMachine {
                system: node.drv.system.clone(),
                modules: vec![node.module.clone()],
                rejected,
                registry: self.options.registry.clone(),
            };
        }
        let log = self.store.log_path(&node.name);
        let mut tail = crate::files::tail(&log, 20);
        if tail.trim().is_empty() {
            tail = "(the log is empty)".into();
        }
        let tried = failed
            .iter()
            .map(|f| format!("`{}` {}", f.machine, f.reason))
            .collect::<Vec<_>>()
            .join("; ");
        let others: Vec<String> = rejected
            .iter()
            .filter(|r| !failed.iter().any(|f| f.machine == r.machine))
            .map(|r| format!("`{}`: {}", r.machine, r.reason))
            .collect();
        let mut reason = format!("every machine that could build it failed: {tried}");
        if !others.is_empty() {
            reason.push_str(&format!(" (not tried: {})", others.join("; ")));
        }
        BuildError::Failed {
            module: node.module.clone(),
            name: node.name.clone(),
            reason,
            log,
            tail,
        }
    }
}

/// The ranking of builders that can build a derivation, from
/// `(builder, free slots, measured load)`: builders with a free slot first;
/// among them the fewest busy slots per unit of speed factor (as Nix
/// does), then a higher speed factor, then a lower load, then more free
/// slots, then the name.
fn rank_order(
    a: (&Builder, usize, Option<f64>),
    b: (&Builder, usize, Option<f64>),
) -> std::cmp::Ordering {
    let busy_per_speed = |(x, free, _): (&Builder, usize, Option<f64>)| {
        x.max_jobs.max(1).saturating_sub(free) as f64 / x.speed_factor.max(f64::MIN_POSITIVE)
    };
    (b.1 > 0)
        .cmp(&(a.1 > 0))
        .then(busy_per_speed(a).total_cmp(&busy_per_speed(b)))
        .then(b.0.speed_factor.total_cmp(&a.0.speed_factor))
        .then(a.2.unwrap_or(f64::MAX).total_cmp(&b.2.unwrap_or(f64::MAX)))
        .then(b.1.cmp(&a.1))
        .then(a.0.name.cmp(&b.0.name))
}

/// Connect to builder `b` and probe it; the reason it cannot serve if not.
fn probe_builder(b: &Builder, store_root: &Path, options: &RouteOptions) -> Probed {
    let t = match probe::connect(b, options.connect_timeout) {
        Ok(t) => t,
        Err(e) => return Probed::Rejected(unreachable_reason(&e)),
    };
    let status = probe::probe_over(&t, &b.name, store_root);
    if !status.reachable {
        return Probed::Rejected(format!(
            "unreachable: {}",
            status.error.as_deref().unwrap_or("the probe failed")
        ));
    }
    if !status.usable() {
        return Probed::Rejected(format!(
            "unusable: {}",
            status.problems(store_root).join("; ")
        ));
    }
    if let Some(sys) = &status.system
        && !b.systems.contains(sys)
    {
        return Probed::Rejected(format!(
            "its `uname` now says `{sys}`, which it is not registered for (registered: {}); re-add it with `punix builders add`",
            b.systems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Probed::Ready {
        transport: Arc::new(t),
        status,
    }
}

/// "unreachable: ..." or "host key: ..." for a failed connection.
fn unreachable_reason(e: &FarmError) -> String {
    let msg = e.to_string();
    let transport = match e {
        FarmError::Transport(t) => Some(t),
        FarmError::Reach { source, .. } => Some(std::borrow::Borrow::borrow(source)),
        _ => None,
    };
    match transport {
        Some(TransportError::Connect { reason, .. })
            if reason.contains("Host key verification failed") =>
        {
            format!("host key: {msg}")
        }
        Some(_) => format!("unreachable: {msg}"),
        None => format!("unusable: {msg}"),
    }
}

/// A target's system from `uname -m` and `uname -s`, in one round trip:
/// for `punix build --target`.
pub fn target_system(t: &dyn Transport) -> Result<System, FarmError> {
    let out = t.run_checked(
        "uname -m; uname -s",
        "uname -m; uname -s",
        crate::transport::DEFAULT_TIMEOUT,
    )?;
    let mut lines = out.stdout.lines();
    let (m, k) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    System::from_uname(m, k).map_err(|e| {
        FarmError::Other(format!(
            "`{}` runs a system punix does not know (`uname -m` says `{m}`, `uname -s` says `{k}`): {e}",
            t.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::plan::Node;
    use crate::store::derivation::{BuilderRef, DERIVATION_FORMAT, Derivation};

    fn builder(name: &str, system: &str, jobs: usize, speed: f64, features: &[&str]) -> Builder {
        let mut b = Builder::new(name, format!("ssh://u@{name}"));
        b.systems = vec![system.parse().expect("system")];
        b.max_jobs = jobs;
        b.speed_factor = speed;
        b.features = features.iter().map(|f| f.to_string()).collect();
        b
    }

    fn node(system: &str, features: &[&str]) -> Node {
        let drv = Derivation {
            format: DERIVATION_FORMAT,
            pname: "p".into(),
            version: "1".into(),
            system: system.into(),
            store_root: "/s".into(),
            builder: BuilderRef {
                kind: "shell".into(),
                script_sha256: "00".into(),
            },
            script: None,
            args: vec![],
            env: Default::default(),
            src_sha256: None,
            inputs: vec![],
            features: features.iter().map(|f| f.to_string()).collect(),
        };
        Node {
            module: "P".into(),
            name: drv.store_name(),
            drv,
            src: None,
            inputs: Default::default(),
        }
    }

    fn options() -> RouteOptions {
        RouteOptions::new(Options::default(), PathBuf::from("/nonexistent/slots"))
    }

    fn other_system() -> String {
        if System::host().arch() == "aarch64" {
            "x86_64-linux".into()
        } else {
            "aarch64-linux".into()
        }
    }

    #[test]
    fn ranking_prefers_idle_fast_builders_then_low_load() {
        let fast = builder("fast", "x86_64-linux", 1, 2.0, &[]);
        let slow = builder("slow", "x86_64-linux", 4, 1.0, &[]);
        let also = builder("also", "x86_64-linux", 4, 1.0, &[]);
        let order = |mut v: Vec<(&Builder, usize, Option<f64>)>| {
            v.sort_by(|a, b| rank_order(*a, *b));
            v.iter()
                .map(|x| x.0.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        // All idle: the higher speed factor wins, even with fewer slots.
        assert_eq!(
            order(vec![(&slow, 4, Some(0.1)), (&fast, 1, Some(3.0))]),
            "fast slow"
        );
        // A busy fast builder: no free slot, last.
        assert_eq!(
            order(vec![(&fast, 0, Some(0.0)), (&slow, 1, Some(5.0))]),
            "slow fast"
        );
        // Fewer busy slots per unit of speed first: 1 of 4 busy loses to
        // none busy.
        assert_eq!(
            order(vec![(&slow, 3, Some(0.0)), (&also, 4, Some(9.0))]),
            "also slow"
        );
        // Equal otherwise: the lower load, then the name.
        assert_eq!(
            order(vec![(&slow, 4, Some(2.0)), (&also, 4, Some(1.0))]),
            "also slow"
        );
        assert_eq!(order(vec![(&slow, 4, None), (&also, 4, None)]), "also slow");
    }

    #[test]
    fn static_candidates_say_why_not() {
        let host = System::host();
        let other = other_system();
        let bs = vec![
            builder("same", &host.to_string(), 1, 1.0, &[]),
            builder("big", &host.to_string(), 1, 1.0, &["big-parallel"]),
            builder("foreign", &other, 1, 1.0, &[]),
        ];
        let opts = options();
        let c = static_candidates(&node(&host.to_string(), &[]), &host, &opts, &bs);
        assert!(c.local);
        assert_eq!(c.builders, vec![0, 1]);
        assert_eq!(c.rejected.len(), 1);
        assert_eq!(c.rejected[0].machine, "foreign");
        assert!(
            c.rejected[0]
                .reason
                .starts_with("wrong system: it builds for")
        );

        let c = static_candidates(
            &node(&host.to_string(), &["big-parallel"]),
            &host,
            &opts,
            &bs,
        );
        assert!(!c.local);
        assert_eq!(c.builders, vec![1]);
        let why: Vec<String> = c
            .rejected
            .iter()
            .map(|r| format!("{}: {}", r.machine, r.reason))
            .collect();
        assert_eq!(
            why[..2],
            [
                "local: package `P` needs the machine feature(s) `big-parallel`, which this machine does not offer".to_string(),
                "same: it lacks the feature(s) `big-parallel`".to_string()
            ]
        );

        let mut off = options();
        off.local = false;
        let c = static_candidates(&node(&host.to_string(), &[]), &host, &off, &bs);
        assert!(!c.local);
        assert!(c.rejected[0].reason.contains("local builds are off"));

        let c = static_candidates(&node(&other, &[]), &host, &opts, &bs);
        assert!(!c.local);
        assert_eq!(c.builders, vec![2]);
        assert!(
            c.rejected[0]
                .reason
                .contains(&format!("this machine is `{host}`"))
        );
    }

    #[test]
    fn no_machine_lists_every_builder_and_suggests_the_ways_out() {
        let other = other_system();
        let host = System::host().to_string();
        let bs = vec![builder("x", &host, 1, 1.0, &[])];
        let n = node(&other, &[]);
        let plan = Plan {
            system: other.parse().expect("system"),
            store_root: "/s".into(),
            nodes: [(n.name.clone(), n.clone())].into_iter().collect(),
            order: vec![n.name.clone()],
            roots: Default::default(),
        };
        let mut opts = options();
        opts.registry = Some(PathBuf::from("/r/builders.toml"));
        let e = preflight(&plan, &plan.order, &opts, &bs).expect_err("no machine");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "building for `{other}` needs a machine of that system, and this one is `{host}` (1 package(s): P)"
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("\n  - x: wrong system: it builds for `{host}`")),
            "{msg}"
        );
        assert!(msg.contains("punix builders add"), "{msg}");
        assert!(msg.contains("punix ci matrix"), "{msg}");
        assert!(msg.contains("never used silently"), "{msg}");
        let e = preflight(&plan, &plan.order, &opts, &[]).expect_err("no machine");
        assert!(
            e.to_string()
                .contains("no builders are registered (in `/r/builders.toml`)"),
            "{e}"
        );
        // The same plan with a builder of that system passes.
        let ok = vec![builder("y", &other, 1, 1.0, &[])];
        assert!(preflight(&plan, &plan.order, &opts, &ok).is_ok());
    }
}
