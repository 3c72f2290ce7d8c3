//! `punix build`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{Context, print_json, progress::Renderer, recipes_path};
use punix::Error;
use punix::build::BuildError;
use punix::build::plan::{Plan, plan};
use punix::build::scheduler::{self, Options};
use punix::platform::System;
use punix::recipe;
use punix::store::Store;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A recipe file or a directory of `*.toml` recipe files.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Build for this system (`x86_64-linux`, `aarch64-linux`, ...)
    /// [default: this machine's]
    #[arg(long, value_name = "SYSTEM")]
    pub system: Option<String>,

    /// Builds at once [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,

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

pub fn run(cx: &Context, args: BuildArgs) -> Result<(), Error> {
    let path = recipes_path(args.file.as_deref())?;
    let recipes = recipe::load(&path)?;
    let system = parse_system(args.system.as_deref())?;
    let store = Store::new(&cx.store_root)?;
    if recipes.packages.is_empty() && args.modules.is_empty() {
        return no_packages(&path, &system, &store, args.json, args.dry_run);
    }
    let plan = plan(&recipes, store.root(), &system, &args.modules)?;
    let host = System::host();
    let need = scheduler::missing(&store, &plan);

    check_buildable(cx, &plan, &need, &host)?;

    if args.dry_run {
        return print_dry_run(&plan, &need, args.json);
    }

    let mut options = Options::default();
    if let Some(j) = args.jobs {
        options.jobs = j.max(1);
    }
    options.keep_going = args.keep_going;
    // Made under the gc lock the builds hold, so gc cannot delete the
    // packages between their build and their root.
    options.add_roots = args.add_root;
    let renderer = Renderer::new(args.json, cx.verbose);
    let result = scheduler::realise(&store, &plan, &options, &renderer);
    renderer.finish();
    let report = result?;

    let roots: serde_json::Map<String, serde_json::Value> = plan
        .roots
        .iter()
        .map(|(m, n)| (m.clone(), json!(plan.entry_path(n))))
        .collect();
    if args.json {
        print_json(&json!({
            "system": system.to_string(),
            "store_root": store.root(),
            "built": report.built,
            "present": report.present,
            "packages": roots,
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
            eprintln!(
                "built {} package(s), {} already in the store, for {} in {:.2}s",
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

/// Refuse early what this machine cannot build: another system, or
/// features it does not offer.
fn check_buildable(cx: &Context, plan: &Plan, need: &[String], host: &System) -> Result<(), Error> {
    if need.is_empty() {
        return Ok(());
    }
    if &plan.system != host {
        return Err(BuildError::NeedsMachine {
            system: plan.system.to_string(),
            host: host.to_string(),
            modules: need.iter().map(|n| plan.nodes[n].module.clone()).collect(),
        }
        .into());
    }
    for name in need {
        let node = &plan.nodes[name];
        let missing: Vec<String> = node
            .drv
            .features
            .iter()
            .filter(|f| !cx.config.features.contains(f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(BuildError::MissingFeatures {
                module: node.module.clone(),
                missing,
            }
            .into());
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
