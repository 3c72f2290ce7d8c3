//! `punix service deploy|rollback|status`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::human_bytes;
use super::{Context, print_json, progress::Renderer, recipes_path};
use punix::Error;
use punix::build::scheduler::Options;
use punix::deploy::{self, DeployOptions, DeployReport, RollbackOptions};
use punix::transport::Transport;
use punix::transport::local::LocalTransport;
use punix::transport::ssh::{SshOptions, SshTarget, SshTransport};

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Deploy a stack: push its closure, write its files and a new
    /// generation, flip `current`, optionally activate its units.
    Deploy(DeployArgs),
    /// Switch a stack back to an earlier generation.
    Rollback(RollbackArgs),
    /// Show a stack's generations and drift on a target.
    Status(StatusArgs),
}

/// Where a command acts: a host over SSH, or a local directory.
#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// The target host: `ssh://USER@HOST[:PORT]` (IPv6 in brackets);
    /// `service deploy` takes it more than once.
    #[arg(long, value_name = "URL", conflicts_with = "transport_root", action = clap::ArgAction::Append)]
    pub target: Vec<String>,
    /// Act on a directory of this machine as if it were the target's `/`
    /// (no SSH; for demos and tests).
    #[arg(long, value_name = "DIR")]
    pub transport_root: Option<PathBuf>,
    /// The SSH identity to use [default: the agent, then ~/.ssh/id_*].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Check host keys against this file only (strict checking always).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Seconds to wait for the SSH connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub connect_timeout: u64,
    /// Seconds one remote step may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub timeout: u64,
}

impl TargetArgs {
    /// Was a target given at all?
    pub fn given(&self) -> bool {
        !self.target.is_empty() || self.transport_root.is_some()
    }

    /// Open the transport to one target URL (or the transport root).
    pub fn open_url(&self, url: &str) -> Result<Box<dyn Transport>, Error> {
        if self.transport_root.is_some() {
            return self.open();
        }
        self.connect(url)
    }

    /// Connect over SSH to `url` with these options.
    fn connect(&self, url: &str) -> Result<Box<dyn Transport>, Error> {
        let target = SshTarget::parse(url).map_err(Error::Usage)?;
        let opts = SshOptions {
            key: self.key.clone(),
            known_hosts: self.known_hosts.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            op_timeout: Duration::from_secs(self.timeout),
        };
        // Every command here probes first: that goes with the login.
        let probe = punix::deploy::remote::probe();
        Ok(Box::new(SshTransport::connect_with_first(
            &target,
            &opts,
            Some(&probe),
        )?))
    }

    /// Open the one target of a command that takes one.
    pub fn open(&self) -> Result<Box<dyn Transport>, Error> {
        if let Some(root) = &self.transport_root {
            let root = punix::config::absolute(root);
            std::fs::create_dir_all(&root)
                .map_err(punix::files::ctx("cannot create the transport root", &root))?;
            return Ok(Box::new(LocalTransport::new(root)));
        }
        let url = match self.target.as_slice() {
            [] => {
                return Err(Error::Usage(
                    "no target: pass `--target ssh://USER@HOST[:PORT]` or `--transport-root DIR`"
                        .into(),
                ));
            }
            [one] => one.as_str(),
            _ => {
                return Err(Error::Usage(
                    "this command takes one `--target`; only `service deploy` takes several".into(),
                ));
            }
        };
        self.connect(url)
    }
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The stack to deploy.
    pub stack: String,
    /// A recipe file or a directory of `*.toml` recipe files.
    #[arg(long, short = 'f', env = "PUNIX_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Where generations live on the target [default: ~/.punix/deployments
    /// of the target user].
    #[arg(long, value_name = "DIR")]
    pub deployments_root: Option<PathBuf>,
    /// Where units are written on the target.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Reload systemd and restart what changed; roll back if a unit fails.
    #[arg(long)]
    pub activate: bool,
    /// With `--activate`: keep a failed generation current.
    #[arg(long, requires = "activate")]
    pub no_rollback: bool,
    /// Seconds units get to settle before they are checked.
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    pub settle: u64,
    /// Show the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to wait for another deploy of this stack to the target.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub lock_wait: u64,
    /// Builds at once here [default: the number of cores]; 0 builds
    /// nothing here, only on builders.
    #[arg(long, short = 'j', value_name = "N")]
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
    /// Print one JSON object with the result on stdout.
    #[arg(long)]
    pub json: bool,
    /// A file listing targets, one `ssh://USER@HOST[:PORT] [@tag...]` per
    /// line.
    #[arg(long, value_name = "FILE", conflicts_with = "transport_root")]
    pub targets: Option<PathBuf>,
    /// Only the targets of `--targets` with this tag (`@web`).
    #[arg(long, value_name = "@TAG", requires = "targets")]
    pub on: Option<String>,
    /// Targets deployed at once.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub parallel: usize,
    /// Stop at the first failed target (the others are skipped).
    #[arg(long)]
    pub fail_fast: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub stack: String,
    #[command(flatten)]
    pub target: TargetArgs,
    /// The generation to return to [default: the one before the current].
    #[arg(long, value_name = "N")]
    pub to: Option<u64>,
    #[arg(long, value_name = "DIR")]
    pub deployments_root: Option<PathBuf>,
    /// Reload systemd and restart what changed.
    #[arg(long)]
    pub activate: bool,
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    pub settle: u64,
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub lock_wait: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub stack: String,
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, value_name = "DIR")]
    pub deployments_root: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cx: &Context, cmd: ServiceCommand) -> Result<(), Error> {
    match cmd {
        ServiceCommand::Deploy(a) => {
            for (flag, p) in [
                ("--deployments-root", a.deployments_root.as_deref()),
                ("--unit-dir", Some(a.unit_dir.as_path())),
            ] {
                if let Some(p) = p
                    && !p.is_absolute()
                {
                    return Err(Error::Usage(format!(
                        "`{flag} {}`: paths on the target must be absolute",
                        p.display()
                    )));
                }
            }
            let path = recipes_path(a.file.as_deref())?;
            let mut build = Options::default();
            if let Some(j) = a.jobs {
                build.jobs = j.max(1);
            }
            let registry = super::build::load_registry(a.builders.as_deref())?;
            let route = super::build::route_options(
                cx,
                build,
                a.jobs != Some(0) && !a.builders_only,
                &a.caches,
                &registry,
            );
            let opts = DeployOptions {
                recipes_path: path,
                stack: a.stack.clone(),
                store_root: cx.store_root.clone(),
                deployments_root: a.deployments_root.clone(),
                unit_dir: a.unit_dir.clone(),
                activate: a.activate,
                no_rollback: a.no_rollback,
                dry_run: a.dry_run,
                lock_wait: Duration::from_secs(a.lock_wait),
                timeout: Duration::from_secs(a.target.timeout),
                settle_secs: a.settle,
                route,
                builders: registry.builders,
            };
            // Recipes and secrets are checked before any connection.
            let prepared = deploy::prepare(&opts)?;
            let mut urls: Vec<String> = a.target.target.clone();
            if let Some(file) = &a.targets {
                urls.extend(
                    punix::deploy::targets::load(file, a.on.as_deref())
                        .map_err(|e| Error::from(punix::deploy::DeployError::from(e)))?,
                );
            }
            if a.target.transport_root.is_some() {
                urls = vec![format!(
                    "local:{}",
                    a.target
                        .transport_root
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display()
                )];
            }
            if urls.is_empty() {
                return Err(Error::Usage(
                    "no target: pass `--target ssh://USER@HOST[:PORT]` (once or more), `--targets FILE` or `--transport-root DIR`".into(),
                ));
            }
            if a.target.transport_root.is_none() {
                for url in &urls {
                    SshTarget::parse(url).map_err(Error::Usage)?;
                }
            }
            let renderer = Renderer::new(a.json, cx.verbose);
            let fleet = FleetLines::new(urls.len() > 1 && !a.json);
            let connect = |url: &str| -> Result<Box<dyn Transport>, punix::deploy::DeployError> {
                a.target.open_url(url).map_err(|e| match e {
                    Error::Transport(t) => punix::deploy::DeployError::Transport(t),
                    other => punix::deploy::DeployError::Target {
                        target: url.to_string(),
                        message: other.to_string(),
                    },
                })
            };
            let result = deploy::deploy_fleet(
                &prepared,
                &urls,
                &connect,
                &opts,
                a.parallel,
                a.fail_fast,
                &renderer,
                &fleet,
            );
            renderer.finish();
            let results = result?;
            if let [one] = results.as_slice() {
                return match &one.result {
                    Ok(report) => {
                        print_report(report, a.json, "deploy");
                        punix::trace::mark("printed");
                        Ok(())
                    }
                    Err(_) => {
                        let Some(r) = results.into_iter().next() else {
                            return Ok(());
                        };
                        Err(r
                            .result
                            .err()
                            .map(Error::from)
                            .unwrap_or(Error::Usage(String::new())))
                    }
                };
            }
            print_fleet(&results, a.json)
        }
        ServiceCommand::Rollback(a) => {
            let t = a.target.open()?;
            let opts = RollbackOptions {
                stack: a.stack.clone(),
                store_root: cx.store_root.clone(),
                deployments_root: a.deployments_root.clone(),
                to: a.to,
                activate: a.activate,
                lock_wait: Duration::from_secs(a.lock_wait),
                timeout: Duration::from_secs(a.target.timeout),
                settle_secs: a.settle,
            };
            let report = deploy::rollback(t.as_ref(), &opts)?;
            print_report(&report, a.json, "rollback");
            Ok(())
        }
        ServiceCommand::Status(a) => {
            let t = a.target.open()?;
            let report = deploy::status(
                t.as_ref(),
                &a.stack,
                &cx.store_root,
                a.deployments_root.as_deref(),
                Duration::from_secs(a.target.timeout),
            )?;
            if a.json {
                print_json(&serde_json::to_value(&report).unwrap_or_default());
                return Ok(());
            }
            println!("stack {} on {}", report.stack, report.target);
            if report.generations.is_empty() {
                println!("  never deployed");
            }
            for g in &report.generations {
                println!(
                    "  {} gen-{:03}  {}  {} store path(s)  services: {}",
                    if g.current { "*" } else { " " },
                    g.number,
                    g.created,
                    g.store_paths.len(),
                    if g.services.is_empty() {
                        "-".to_string()
                    } else {
                        g.services.join(", ")
                    }
                );
            }
            for r in &report.pending_journals {
                println!(
                    "  an interrupted commit is pending ({r}); the next deploy or rollback completes it"
                );
            }
            if report.activation_pending {
                println!(
                    "  an activation never ended: the running units may not match the current generation; a deploy or rollback with --activate restarts them all"
                );
            }
            if report.drifted_files.is_empty()
                && report.missing_paths.is_empty()
                && report.missing_files.is_empty()
            {
                if report.current.is_some() {
                    println!("  no drift: files and store paths match the current generation");
                }
            } else {
                for f in &report.drifted_files {
                    println!("  drift: {f} changed on the target");
                }
                for f in &report.missing_files {
                    println!("  drift: {f} is missing on the target");
                }
                for p in &report.missing_paths {
                    println!("  drift: store path {p} is missing on the target");
                }
            }
            Ok(())
        }
    }
}

fn print_report(r: &DeployReport, json: bool, verb: &str) {
    if json {
        print_json(&serde_json::to_value(r).unwrap_or_default());
        return;
    }
    let gen_name = r
        .generation
        .map(|g| format!("gen-{g:03}"))
        .unwrap_or_else(|| "no generation".into());
    for rf in &r.rolled_forward {
        eprintln!("completed an interrupted commit first: {rf}");
    }
    if r.activation_pending {
        eprintln!(
            "note: an earlier --activate on {} never ended, so the running units may not match {gen_name}: run this again with --activate to restart them all",
            r.target
        );
    }
    for jf in &r.journals_failed {
        eprintln!(
            "an interrupted commit could not be completed ({jf}; kept as `{jf}.failed` next to its log); this deploy rewrites what differs"
        );
    }
    if r.dry_run {
        println!(
            "plan for {} on {} ({}), nothing done:",
            r.stack, r.target, r.system
        );
        for step in &r.plan {
            println!("  - {step}");
        }
        return;
    }
    if verb == "rollback" {
        println!(
            "{}: rolled back to {gen_name} on {}; {} file(s) restored, {} removed{}",
            r.stack,
            r.target,
            r.files_written.len(),
            r.files_removed.len(),
            if r.activated {
                format!("; restarted {}", r.units_restarted.join(", "))
            } else {
                String::new()
            }
        );
        return;
    }
    if r.unchanged {
        println!(
            "{}: {gen_name} already current on {} ({}); 0 pushed / {} cached, nothing written ({:.2}s)",
            r.stack, r.target, r.system, r.cached, r.seconds
        );
        return;
    }
    if !r.new_generation {
        println!(
            "{}: updated what differed on {} (drift, or a changed secret; {gen_name} stays current): {}",
            r.stack,
            r.target,
            r.repaired.join(", ")
        );
    }
    println!(
        "{}: {gen_name} on {} ({}): {} pushed / {} cached ({} sent), {} file(s) written, {} removed{} ({:.2}s)",
        r.stack,
        r.target,
        r.system,
        r.pushed,
        r.cached,
        human_bytes(r.bytes_sent),
        r.files_written.len(),
        r.files_removed.len(),
        if r.activated {
            format!(
                "; restarted {}{}",
                if r.units_restarted.is_empty() {
                    "none".to_string()
                } else {
                    r.units_restarted.join(", ")
                },
                if r.units_stopped.is_empty() {
                    String::new()
                } else {
                    format!("; stopped {}", r.units_stopped.join(", "))
                }
            )
        } else {
            String::new()
        },
        r.seconds
    );
}

/// Per-target progress of a fleet deploy: one spinner per host on a
/// terminal, plain lines otherwise; nothing for a single target (its
/// summary says it all) or with `--json`.
struct FleetLines {
    on: bool,
    bars: Option<(
        indicatif::MultiProgress,
        std::sync::Mutex<std::collections::BTreeMap<String, indicatif::ProgressBar>>,
    )>,
}

impl FleetLines {
    fn new(on: bool) -> FleetLines {
        use std::io::IsTerminal;
        let bars = (on && std::io::stderr().is_terminal()).then(|| {
            (
                indicatif::MultiProgress::new(),
                std::sync::Mutex::new(std::collections::BTreeMap::new()),
            )
        });
        FleetLines { on, bars }
    }

    fn say(&self, target: &str, msg: String, done: bool) {
        let Some((multi, bars)) = &self.bars else {
            eprintln!("{target}: {msg}");
            return;
        };
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(target.to_string()).or_insert_with(|| {
            let b = multi.add(indicatif::ProgressBar::new_spinner());
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_prefix(target.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        if done {
            bar.finish_with_message(msg);
        } else {
            bar.set_message(msg);
        }
    }
}

impl deploy::FleetObserver for FleetLines {
    fn target_event(&self, target: &str, event: deploy::TargetEvent<'_>) {
        if !self.on {
            return;
        }
        match event {
            deploy::TargetEvent::Connected { system } => {
                self.say(target, format!("connected ({system})"), false)
            }
            deploy::TargetEvent::Deploying => self.say(target, "deploying".into(), false),
            deploy::TargetEvent::Done(r) => self.say(
                target,
                format!(
                    "done, gen-{:03} ({} pushed / {} cached)",
                    r.generation.unwrap_or(0),
                    r.pushed,
                    r.cached
                ),
                true,
            ),
            deploy::TargetEvent::Failed(e) => self.say(
                target,
                format!(
                    "failed: {}",
                    first_line_without_target(&e.to_string(), target)
                ),
                true,
            ),
        }
    }
}

/// The per-host table of a fleet deploy; an error when any target failed.
fn print_fleet(results: &[deploy::TargetResult], json: bool) -> Result<(), Error> {
    let failed: Vec<&deploy::TargetResult> = results.iter().filter(|r| r.result.is_err()).collect();
    if json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| match &r.result {
                Ok(rep) => serde_json::json!({"target": r.target, "system": r.system, "ok": true, "report": rep}),
                Err(e) => serde_json::json!({"target": r.target, "system": r.system, "ok": false, "error": e.to_string()}),
            })
            .collect();
        print_json(&serde_json::json!({"ok": failed.is_empty(), "targets": rows}));
    } else {
        let w = results
            .iter()
            .map(|r| r.target.len())
            .max()
            .unwrap_or(6)
            .max(6);
        println!(
            "{:<w$}  {:<15}  {:<9}  {:>13}  {:<9}  RESULT",
            "TARGET", "SYSTEM", "GEN", "PUSHED/CACHED", "ACTIVATED"
        );
        for r in results {
            let system = r.system.clone().unwrap_or_else(|| "-".into());
            match &r.result {
                Ok(rep) => println!(
                    "{:<w$}  {:<15}  {:<9}  {:>13}  {:<9}  {}",
                    r.target,
                    system,
                    rep.generation
                        .map(|g| format!("gen-{g:03}"))
                        .unwrap_or_else(|| "-".into()),
                    format!("{}/{}", rep.pushed, rep.cached),
                    if rep.activated { "yes" } else { "no" },
                    if rep.unchanged {
                        "ok (unchanged)"
                    } else {
                        "ok"
                    }
                ),
                Err(e) => println!(
                    "{:<w$}  {:<15}  {:<9}  {:>13}  {:<9}  error: {}",
                    r.target,
                    system,
                    "-",
                    "-",
                    "-",
                    first_line_without_target(&e.to_string(), &r.target)
                ),
            }
        }
        println!(
            "{} of {} target(s) deployed",
            results.len() - failed.len(),
            results.len()
        );
    }
    if failed.is_empty() {
        return Ok(());
    }
    let code = failed
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .map(punix::error::deploy_exit_code)
        .max()
        .unwrap_or(punix::error::EXIT_FAILURE);
    Err(Error::Fleet {
        failed: failed.len(),
        total: results.len(),
        code,
    })
}

/// The first line of an error, without a leading "`TARGET`: " (the table
/// row names the target already).
fn first_line_without_target(message: &str, target: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    first
        .strip_prefix(&format!("`{target}`: "))
        .unwrap_or(first)
        .to_string()
}
