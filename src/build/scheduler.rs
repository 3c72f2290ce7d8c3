//! Realising a plan: every derivation that is not yet a valid entry is
//! built, independent ones in parallel up to the job limit, each after its
//! inputs.
//!
//! Concurrency is bounded in one place: `jobs` worker threads, each running
//! one builder at a time (default: the number of cores, since a build
//! usually keeps one core busy). The cores are shared among the builds
//! that can run at once: each is told `PUNIX_BUILD_CORES` =
//! max(1, cores / workers). Across processes the per-entry lock keeps one
//! builder per path, and the shared gc lock keeps gc away: it is held from
//! the moment the missing entries are decided until the gc roots asked for
//! (`--add-root`) exist, so gc never deletes a path in between.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::local::{self, Outcome};
use super::plan::{Node, Plan};
use super::{BuildError, Event, Observer, Placement};
use crate::store::Store;
use crate::store::lock::LockMode;

/// How to realise a plan.
#[derive(Clone, Debug)]
pub struct Options {
    /// Builds at once.
    pub jobs: usize,
    /// Cores of this machine, shared among the builds that run at once.
    pub cores: usize,
    /// Go on with independent builds after a failure.
    pub keep_going: bool,
    /// Add a gc root (`.roots/<entry>`) for each requested package, under
    /// the same gc lock as the builds.
    pub add_roots: bool,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Options {
            jobs: cores,
            cores,
            keep_going: false,
            add_roots: false,
        }
    }
}

/// What realising a plan did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Entries this run built.
    pub built: Vec<String>,
    /// Entries that were valid already (or were built by another process).
    pub present: Vec<String>,
    /// Stale temporaries removed first.
    pub swept: usize,
    /// The gc root links made (or already there) for the requested packages.
    pub roots: Vec<std::path::PathBuf>,
    /// Where each entry this run built was built, and why not elsewhere
    /// (empty for a plain local run).
    pub placements: Vec<Placement>,
    /// The SSH connections and round trips to each builder this run used.
    pub builders: Vec<BuilderTraffic>,
    pub seconds: f64,
}

/// What a run said to one builder.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BuilderTraffic {
    pub builder: String,
    pub connections: u64,
    /// Remote steps waited for (scripts, lock requests, rsync runs).
    pub round_trips: u64,
}

/// What runs one build: this machine ([`LocalRunner`]), or the build
/// farm's router, which picks a machine per derivation.
pub trait Runner: Sync {
    /// How many builds to run at once for `need` entries to build.
    fn workers(&self, need: usize) -> usize;
    /// Build `node` (its inputs are valid), taking its entry lock;
    /// `workers` builds run at once.
    fn run(&self, node: &Node, workers: usize) -> Result<Outcome, BuildError>;
}

/// Every build on this machine: `jobs` at once, the cores shared among
/// them.
pub struct LocalRunner<'a> {
    store: &'a Store,
    jobs: usize,
    cores: usize,
}

impl<'a> LocalRunner<'a> {
    /// A runner into `store` under `options`.
    pub fn new(store: &'a Store, options: &Options) -> LocalRunner<'a> {
        LocalRunner {
            store,
            jobs: options.jobs.max(1),
            cores: options.cores,
        }
    }
}

impl Runner for LocalRunner<'_> {
    fn workers(&self, need: usize) -> usize {
        self.jobs.min(need).max(1)
    }

    fn run(&self, node: &Node, workers: usize) -> Result<Outcome, BuildError> {
        local::build_node(self.store, node, cores_per_build(self.cores, workers))
    }
}

/// The cores each build is told it may use when `workers` run at once.
pub fn cores_per_build(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

/// The entries of `plan` that are not valid in `store`, in build order.
pub fn missing(store: &Store, plan: &Plan) -> Vec<String> {
    plan.order
        .iter()
        .filter(|n| !store.is_valid(n))
        .cloned()
        .collect()
}

struct State {
    /// Unbuilt inputs left per waiting entry.
    waiting: BTreeMap<String, usize>,
    ready: VecDeque<String>,
    running: usize,
    stop: bool,
    failures: Vec<BuildError>,
    report: Report,
}

/// Build what `plan` lacks in `store`, on this machine.
pub fn realise(
    store: &Store,
    plan: &Plan,
    options: &Options,
    observer: &dyn Observer,
) -> Result<Report, BuildError> {
    realise_with(
        store,
        plan,
        options,
        observer,
        &LocalRunner::new(store, options),
    )
}

/// Build what `plan` lacks in `store`, each build through `runner`.
pub fn realise_with(
    store: &Store,
    plan: &Plan,
    options: &Options,
    observer: &dyn Observer,
    runner: &dyn Runner,
) -> Result<Report, BuildError> {
    let start = Instant::now();
    let mut need = missing(store, plan);
    // Hold the gc lock from deciding what is missing until the roots exist:
    // a gc in between could delete an input, or a path about to be rooted.
    let _gc = if need.is_empty() && !options.add_roots {
        None
    } else {
        store.ensure_writable()?;
        let lock = store.lock_gc(LockMode::Shared, true)?;
        need = missing(store, plan);
        lock
    };
    let present: Vec<String> = plan
        .order
        .iter()
        .filter(|n| !need.contains(n))
        .cloned()
        .collect();
    observer.event(Event::Planned {
        to_build: &need,
        present: present.len(),
    });
    if need.is_empty() {
        let roots = add_roots(store, plan, options)?;
        return Ok(Report {
            present,
            roots,
            seconds: start.elapsed().as_secs_f64(),
            ..Report::default()
        });
    }
    let swept = store.sweep()?;

    let need_set: BTreeSet<&String> = need.iter().collect();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut waiting = BTreeMap::new();
    let mut ready = VecDeque::new();
    for name in &need {
        let node = &plan.nodes[name];
        let unbuilt: Vec<&String> = node
            .drv
            .inputs
            .iter()
            .filter(|i| need_set.contains(i))
            .collect();
        for i in &unbuilt {
            dependents.entry(i.as_str()).or_default().push(name);
        }
        if unbuilt.is_empty() {
            ready.push_back(name.clone());
        } else {
            waiting.insert(name.clone(), unbuilt.len());
        }
    }
    let state = Mutex::new(State {
        waiting,
        ready,
        running: 0,
        stop: false,
        failures: Vec::new(),
        report: Report {
            present,
            swept,
            ..Report::default()
        },
    });
    let wake = Condvar::new();
    let workers = runner.workers(need.len()).clamp(1, need.len());

    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let name = {
                        let Ok(mut st) = state.lock() else { return };
                        loop {
                            if st.stop {
                                return;
                            }
                            if let Some(n) = st.ready.pop_front() {
                                st.running += 1;
                                break n;
                            }
                            if st.running == 0 {
                                return;
                            }
                            st = match wake.wait_timeout(st, Duration::from_millis(500)) {
                                Ok((g, _)) => g,
                                Err(_) => return,
                            };
                        }
                    };
                    let node = &plan.nodes[&name];
                    observer.event(Event::Started {
                        module: &node.module,
                        name: &name,
                    });
                    let t0 = Instant::now();
                    let result = runner.run(node, workers);
                    let Ok(mut st) = state.lock() else { return };
                    st.running -= 1;
                    match result {
                        Ok(outcome) => {
                            observer.event(Event::Finished {
                                module: &node.module,
                                name: &name,
                                seconds: t0.elapsed().as_secs_f64(),
                                elsewhere: matches!(outcome, Outcome::BuiltElsewhere),
                            });
                            match outcome {
                                Outcome::Built(_) => st.report.built.push(name.clone()),
                                Outcome::BuiltElsewhere => st.report.present.push(name.clone()),
                            }
                            for dep in dependents.get(name.as_str()).into_iter().flatten() {
                                if let Some(left) = st.waiting.get_mut(*dep) {
                                    *left -= 1;
                                    if *left == 0 {
                                        st.waiting.remove(*dep);
                                        st.ready.push_back((*dep).to_string());
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            observer.event(Event::Failed {
                                module: &node.module,
                                name: &name,
                                error: &e,
                            });
                            st.failures.push(e);
                            if !options.keep_going {
                                st.stop = true;
                            }
                        }
                    }
                    wake.notify_all();
                }
            });
        }
    });

    let st = state
        .into_inner()
        .map_err(|_| BuildError::Internal("a build worker panicked".into()))?;
    let mut failures = st.failures;
    if !failures.is_empty() {
        let skipped = need.len()
            - st.report.built.len()
            - failures.len()
            - st.report
                .present
                .iter()
                .filter(|p| need_set.contains(p))
                .count();
        return Err(if failures.len() == 1 && skipped == 0 {
            failures.remove(0)
        } else {
            BuildError::Several { failures, skipped }
        });
    }
    let mut report = st.report;
    report.roots = add_roots(store, plan, options)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The gc roots asked for, made while the caller holds the gc lock.
fn add_roots(
    store: &Store,
    plan: &Plan,
    options: &Options,
) -> Result<Vec<std::path::PathBuf>, BuildError> {
    if !options.add_roots {
        return Ok(Vec::new());
    }
    let mut links = Vec::new();
    for name in plan.roots.values() {
        links.push(store.add_root(name)?);
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_shared_among_concurrent_builds() {
        assert_eq!(cores_per_build(8, 1), 8);
        assert_eq!(cores_per_build(8, 3), 2);
        assert_eq!(cores_per_build(8, 8), 1);
        assert_eq!(cores_per_build(2, 16), 1);
        assert_eq!(cores_per_build(4, 0), 4);
    }
}
