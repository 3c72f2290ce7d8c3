//! `punix build`: plan, then build each missing derivation where the
//! routing rules put it (this machine or a registered builder; see
//! `punix::farm::route`).

use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use serde_json::json;

use super::{Context, print_json, progress::Renderer, recipes_path};
use punix::Error;
use punix::build::plan::{Plan, plan};
use punix::build::scheduler::{self, Options};
use punix::build::{Event, Observer, Placement};
use punix::farm::Registry;
use punix::farm::route::{self, RouteOptions};
use punix::platform::System;
use punix::recipe;
use punix::store::Store;
use punix::transport::ssh::{SshOptions, SshTarget, SshTransport};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A recipe file or a directory of `*.toml` recipe files.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Build for this system (`x86_64-linux`, `aarch64-linux`, ...)
    /// [default: this machine's]
    #[arg(long, value_name = "SYSTEM", conflicts_with = "target")]
    pub system: Option<String>,

    /// Build for the system of this host (`ssh://USER@HOST[:PORT]`), read
    /// with `uname` over SSH.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// The SSH identity for `--target`.
    #[arg(long, value_name = "FILE", requires = "target")]
    pub key: Option<PathBuf>,

    /// Check `--target`'s host key against this file only (strict checking
    /// always).
    #[arg(long, value_name = "FILE", requires = "target")]
    pub known_hosts: Option<PathBuf>,

    /// Builds at once on this machine [default: the number of cores]; 0
    /// builds nothing here, only on builders.
    #[arg(long, short = 'j', visible_alias = "max-jobs", value_name = "N")]
    pub jobs: Option<usize>,

    /// Build only on registered builders, never on this machine.
    #[arg(long)]
    pub builders_only: bool,

    /// The builder registry [default: $PUNIX_BUILDERS, else
    /// ~/.punix/builders.toml].
    #[arg(long, value_name = "FILE")]
    pub builders: Option<PathBuf>,
    /// A binary cache to fetch built paths from before building (a
    /// directory, `file://` or `http(s)://` URL); more than once for
    /// several. The `[[cache]]` entries of the registry come after these.
    #[arg(long = "cache", value_name = "URL", action = clap::ArgAction::Append)]
    pub caches: Vec<String>,

    /// Say for each package where it is built and why not elsewhere (also
    /// with `-v`).
    #[arg(long)]
    pub explain: bool,

    /// Go on with independent builds after a failure.
    #[arg(long, short = 'k')]
    pub keep_going: bool,

    /// Show what would be built, build nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Keep the built packages from `punix store gc` (a link in
    /// `<store-root>/.roots/`).
    #[arg(long)]
    pub add_root: bool,

    /// Print one JSON object with the result on stdout.
    #[arg(long)]
    pub json: bool,

    /// Packages to build [default: all].
    #[arg(value_name = "PACKAGE")]
    pub modules: Vec<String>,
}

/// Parse `--system`, defaulting to this machine's.
pub fn parse_system(s: Option<&str>) -> Result<System, Error> {
    match s {
        Some(s) => Ok(s.parse::<System>()?),
        None => Ok(System::host()),
    }
}

/// The system of `--target`: one connection, one `uname` round trip.
fn target_system(args: &BuildArgs, url: &str) -> Result<System, Error> {
    let target = SshTarget::parse(url).map_err(Error::Usage)?;
    let opts = SshOptions {
        key: args.key.clone(),
        known_hosts: args.known_hosts.clone(),
        connect_timeout: route::CONNECT_TIMEOUT,
        ..SshOptions::default()
    };
    let t = SshTransport::connect(&target, &opts)?;
    let system = route::target_system(&t)?;
    eprintln!("{target} runs {system}");
    Ok(system)
}

/// The registry, or an empty one when there is no place to look for it
/// (no `HOME`, no `--builders`, no `PUNIX_BUILDERS`).
pub(super) fn load_registry(flag: Option<&std::path::Path>) -> Result<Registry, Error> {
    match Registry::path_from(flag) {
        Ok(path) => Ok(Registry::load(&path)?),
        Err(_) if flag.is_none() => Ok(Registry::default()),
        Err(e) => Err(e.into()),
    }
}

/// How builds are routed (for `build` and `service deploy` alike): this
/// machine when `local`, the registry's builders, then the `--cache`s and
/// the registry's caches.
pub(super) fn route_options(
    cx: &Context,
    options: Options,
    local: bool,
    caches: &[String],
    registry: &Registry,
) -> RouteOptions {
    let slots_dir =
        route::default_slots_dir().unwrap_or_else(|_| cx.store_root.join(".locks/slots"));
    let mut route_opts = RouteOptions::new(options, slots_dir);
    route_opts.local = local;
    route_opts.local_features = cx.config.features.clone();
    route_opts.registry = (!registry.path.as_os_str().is_empty()).then(|| registry.path.clone());
    route_opts.caches = caches.iter().chain(&registry.caches).cloned().collect();
    route_opts
}

/// Forwards build events to the renderer and keeps the placements.
struct Explaining<'a> {
    inner: &'a Renderer,
    placements: Mutex<Vec<Placement>>,
}

impl Observer for Explaining<'_> {
    fn event(&self, event: Event<'_>) {
        self.inner.event(event);
    }

    fn placed(&self, placement: &Placement) {
        let mut all = self.placements.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|p| p.name != placement.name);
        all.push(placement.clone());
    }
}

pub fn run(cx: &Context, args: BuildArgs) -> Result<(), Error> {
    let path = recipes_path(args.file.as_deref())?;
    let recipes = recipe::load(&path)?;
    let system = match &args.target {
        Some(url) => target_system(&args, url)?,
        None => parse_system(args.system.as_deref())?,
    };
    let store = Store::new(&cx.store_root)?;
    if recipes.packages.is_empty() && args.modules.is_empty() {
        return no_packages(&path, &system, &store, args.json, args.dry_run);
    }
    let plan = plan(&recipes, store.root(), &system, &args.modules)?;
    let need = scheduler::missing(&store, &plan);
    let explain = args.explain || cx.verbose;

    let mut options = Options::default();
    let local = args.jobs != Some(0) && !args.builders_only;
    if let Some(j) = args.jobs {
        options.jobs = j.max(1);
    }
    options.keep_going = args.keep_going;
    // Made under the gc lock the builds hold, so gc cannot delete the
    // packages between their build and their root.
    options.add_roots = args.add_root;
    let registry = if need.is_empty() {
        Registry::default()
    } else {
        load_registry(args.builders.as_deref())?
    };
    let route_opts = route_options(cx, options, local, &args.caches, &registry);

    if args.dry_run {
        print_dry_run(&plan, &need, args.json)?;
        if explain && !args.json {
            for (name, ok, rejected) in
                route::explain_static(&plan, &need, &route_opts, &registry.builders)
            {
                let node = &plan.nodes[&name];
                println!(
                    "{} ({}): candidates: {}",
                    node.module,
                    name.get(33..).unwrap_or(&name),
                    if ok.is_empty() {
                        "none".to_string()
                    } else {
                        ok.join(", ")
                    }
                );
                for r in rejected {
                    println!("  - not {}: {}", r.machine, r.reason);
                }
            }
        }
        return Ok(());
    }

    let renderer = Renderer::new(args.json, cx.verbose);
    let observer = Explaining {
        inner: &renderer,
        placements: Mutex::new(Vec::new()),
    };
    let result = route::realise_routed(&store, &plan, &route_opts, &registry.builders, &observer);
    renderer.finish();
    if explain && !args.json {
        let placements = observer
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for p in placements.iter() {
            eprintln!("{}", p.explain());
        }
    }
    let report = result?;

    let roots: serde_json::Map<String, serde_json::Value> = plan
        .roots
        .iter()
        .map(|(m, n)| (m.clone(), json!(plan.entry_path(n))))
        .collect();
    if args.json {
        let built_on: serde_json::Map<String, serde_json::Value> = report
            .placements
            .iter()
            .map(|p| (p.name.clone(), json!(p.machine)))
            .collect();
        print_json(&json!({
            "system": system.to_string(),
            "store_root": store.root(),
            "built": report.built,
            "present": report.present,
            "packages": roots,
            "built_on": built_on,
            "placements": report.placements,
            "builders": report.builders,
            "seconds": report.seconds,
        }));
    } else {
        if report.built.is_empty() {
            eprintln!(
                "nothing to build: all {} package(s) already in the store ({:.2}s)",
                report.present.len(),
                report.seconds
            );
        } else {
            let remote = report
                .placements
                .iter()
                .filter(|p| p.machine != route::LOCAL && report.built.contains(&p.name))
                .count();
            let on = if remote > 0 {
                format!(" ({remote} on builders)")
            } else {
                String::new()
            };
            eprintln!(
                "built {} package(s){on}, {} already in the store, for {} in {:.2}s",
                report.built.len(),
                report.present.len(),
                system,
                report.seconds
            );
        }
        for name in plan.roots.values() {
            println!("{}", plan.entry_path(name).display());
        }
    }
    Ok(())
}

fn print_dry_run(plan: &Plan, need: &[String], json: bool) -> Result<(), Error> {
    if json {
        print_json(&json!({
            "system": plan.system.to_string(),
            "would_build": need.iter().map(|n| plan.entry_path(n)).collect::<Vec<_>>(),
            "present": plan.order.iter().filter(|n| !need.contains(n)).map(|n| plan.entry_path(n)).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    if need.is_empty() {
        println!(
            "nothing to build: all {} package(s) already in the store",
            plan.order.len()
        );
    } else {
        println!("would build {} package(s) for {}:", need.len(), plan.system);
        for n in need {
            println!(
                "  {}  ({})",
                plan.entry_path(n).display(),
                plan.nodes[n].module
            );
        }
        let present = plan.order.len() - need.len();
        if present > 0 {
            println!("{present} already in the store");
        }
    }
    Ok(())
}

/// A recipe file with stacks but no packages: nothing to build, and say so.
fn no_packages(
    path: &std::path::Path,
    system: &System,
    store: &Store,
    json: bool,
    dry_run: bool,
) -> Result<(), Error> {
    if json && dry_run {
        print_json(&json!({
            "system": system.to_string(),
            "would_build": [],
            "present": [],
        }));
    } else if json {
        print_json(&json!({
            "system": system.to_string(),
            "store_root": store.root(),
            "built": [],
            "present": [],
            "packages": {},
            "seconds": 0.0,
        }));
    } else {
        eprintln!(
            "no packages to build: `{}` declares no `[package.NAME]`",
            path.display()
        );
    }
    Ok(())
}
