//! `punix builders list|add|remove|check`: the build-farm registry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::human_bytes;
use super::{Context, print_json};
use punix::Error;
use punix::farm::registry::MAX_JOBS_LIMIT;
use punix::farm::{Builder, BuilderStatus, FarmError, Registry, probe};
use punix::platform::System;
use punix::transport::ssh::SshTarget;

#[derive(Debug, Subcommand)]
pub enum BuildersCommand {
    /// Show the registered builders with their live status (all probed in
    /// parallel).
    List(ListArgs),
    /// Check a host over SSH (system, `sh`, `rsync`, a writable store
    /// root) and register it as a builder.
    Add(AddArgs),
    /// Forget a builder.
    Remove(RemoveArgs),
    /// Run a tiny real build on each builder (or on NAME) and bring the
    /// result back, reporting each step.
    Check(CheckArgs),
    /// Delete, on each builder (or on NAME), the store entries no build
    /// used in the last hour and no generation deployed there pins.
    Gc(GcArgs),
}

/// Which registry file.
#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// The builder registry [default: $PUNIX_BUILDERS, else
    /// ~/.punix/builders.toml].
    #[arg(long, value_name = "FILE")]
    pub builders: Option<PathBuf>,
}

impl RegistryArgs {
    fn load(&self) -> Result<Registry, Error> {
        let path = Registry::path_from(self.builders.as_deref())?;
        Ok(Registry::load(&path)?)
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print one JSON object with the registry and each builder's status.
    #[arg(long)]
    pub json: bool,
    /// Show the registry only; connect to nothing.
    #[arg(long)]
    pub no_probe: bool,
    /// Seconds to wait for each SSH connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The builder's name in the registry.
    pub name: String,
    /// Where it is: `ssh://USER@HOST[:PORT]` (IPv6 in brackets).
    pub url: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The SSH identity to use [default: the agent, then ~/.ssh/id_*].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Check its host key against this file only (strict checking always)
    /// [default: ~/.ssh/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Builds it runs at once.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=MAX_JOBS_LIMIT as u64))]
    pub max_jobs: u64,
    /// Relative speed; higher is preferred.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_speed)]
    pub speed_factor: f64,
    /// Features it offers, comma-separated (`big-parallel,kvm`).
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub features: Vec<String>,
    /// The systems it builds for, comma-separated [default: detected with
    /// `uname`]. Needed with `--no-probe`; otherwise they must include the
    /// detected one.
    #[arg(long, value_name = "SYSTEM,...", value_delimiter = ',', value_parser = parse_system)]
    pub systems: Vec<System>,
    /// Record the builder without connecting to it.
    #[arg(long)]
    pub no_probe: bool,
    /// Seconds to wait for the SSH connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The builder to forget.
    pub name: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The builder to check [default: all].
    pub name: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print one JSON object with each builder's steps.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each SSH connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The builder to collect [default: all].
    pub name: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Only list what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object with each builder's report.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each SSH connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds each step on a builder may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub timeout: u64,
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        _ => Err(format!("`{s}` is not a number above 0 (e.g. `1.5`)")),
    }
}

fn parse_system(s: &str) -> Result<System, String> {
    s.trim().parse::<System>().map_err(|e| e.to_string())
}

pub fn run(cx: &Context, cmd: BuildersCommand) -> Result<(), Error> {
    match cmd {
        BuildersCommand::List(a) => list(cx, a),
        BuildersCommand::Add(a) => add(cx, a),
        BuildersCommand::Remove(a) => remove(a),
        BuildersCommand::Check(a) => check(cx, a),
        BuildersCommand::Gc(a) => gc(cx, a),
    }
}

// F2: builders check.
/// `punix builders check [NAME]`: a tiny real build on each builder (in
/// parallel), brought back and verified, each step reported.
/// The builder `name`, or all of them.
fn chosen(reg: &punix::farm::Registry, name: Option<&String>) -> Result<Vec<Builder>, Error> {
    Ok(match name {
        Some(n) => vec![reg.get(n).cloned().ok_or_else(|| FarmError::Unknown {
            name: n.clone(),
            path: reg.path.clone(),
            hint: (!reg.builders.is_empty()).then(|| {
                format!(
                    "the registered builders are: {}",
                    reg.builders
                        .iter()
                        .map(|b| format!("`{}`", b.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        })?],
        None => reg.builders.clone(),
    })
}

/// One builder after another: the builder's own store root is the one in
/// effect here (the same path on every machine), and generations deployed
/// to the builder's user (its default deployments root) stay pinned.
fn gc(cx: &Context, a: GcArgs) -> Result<(), Error> {
    let reg = a.registry.load()?;
    let chosen = chosen(&reg, a.name.as_ref())?;
    if chosen.is_empty() {
        println!("no builders in {}", reg.path.display());
        return Ok(());
    }
    let store = punix::store::Store::new(&cx.store_root)?;
    let mut reports = Vec::new();
    let mut failed: Vec<(String, Error)> = Vec::new();
    for b in &chosen {
        let run = || -> Result<_, Error> {
            let t = punix::farm::probe::connect(b, Duration::from_secs(a.connect_timeout))?;
            Ok(punix::deploy::gc_target(
                &t,
                store.root(),
                None,
                a.dry_run,
                Duration::from_secs(a.timeout),
            )?)
        };
        match run() {
            Ok(r) => {
                if !a.json {
                    super::store::print_gc_target(&store, &r, &format!(" on {}", b.name));
                }
                reports.push(json!({"builder": b.name, "ok": true, "report": r}));
            }
            Err(e) => {
                reports.push(json!({"builder": b.name, "ok": false, "error": e.to_string()}));
                failed.push((b.name.clone(), e));
            }
        }
    }
    if a.json {
        print_json(&json!({ "registry": reg.path, "builders": reports }));
    }
    match failed.len() {
        0 => Ok(()),
        1 if chosen.len() == 1 => Err(failed.remove(0).1),
        _ => {
            for (name, e) in &failed {
                eprintln!("error: {name}: {e}");
            }
            Err(punix::transport::TransportError::Other(format!(
                "gc failed on {} of {} builder(s): {}",
                failed.len(),
                chosen.len(),
                failed
                    .iter()
                    .map(|(n, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into())
        }
    }
}

fn check(cx: &Context, a: CheckArgs) -> Result<(), Error> {
    use punix::farm::remote::{self, CheckReport};
    let reg = a.registry.load()?;
    let chosen = chosen(&reg, a.name.as_ref())?;
    if chosen.is_empty() {
        if a.json {
            print_json(&json!({ "registry": reg.path, "builders": [] }));
        } else {
            println!("no builders in {}", reg.path.display());
            println!("  hint: add one with `punix builders add NAME ssh://USER@HOST[:PORT]`");
        }
        return Ok(());
    }
    let store = punix::store::Store::new(&cx.store_root)?;
    let timeout = Duration::from_secs(a.connect_timeout);
    if !a.json {
        eprintln!(
            "checking {} builder(s): a tiny build on each, brought back and verified ...",
            chosen.len()
        );
    }
    let reports: Vec<CheckReport> = std::thread::scope(|s| {
        let handles: Vec<_> = chosen
            .iter()
            .map(|b| s.spawn(|| remote::check(&store, b, timeout)))
            .collect();
        handles
            .into_iter()
            .zip(&chosen)
            .map(|(h, b)| {
                h.join().unwrap_or_else(|_| CheckReport {
                    builder: b.name.clone(),
                    url: b.url.clone(),
                    system: None,
                    steps: Vec::new(),
                })
            })
            .collect()
    });
    let failed: Vec<&CheckReport> = reports.iter().filter(|r| !r.passed()).collect();
    if a.json {
        print_json(&json!({
            "registry": reg.path,
            "builders": reports.iter().map(|r| json!({
                "name": r.builder,
                "url": r.url,
                "system": r.system,
                "passed": r.passed(),
                "steps": r.steps,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for r in &reports {
            println!(
                "{} ({}){}",
                r.builder,
                r.url,
                r.system
                    .as_ref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            );
            for st in &r.steps {
                let (word, time) = match st.ok {
                    Some(true) if st.step == remote::Step::Hash => ("pass", "        ".to_string()),
                    Some(true) => ("pass", format!("{:>7.2}s", st.seconds)),
                    Some(false) => ("FAIL", "        ".to_string()),
                    None => ("skip", "        ".to_string()),
                };
                let detail = st.detail.replace('\n', "\n                          ");
                let line = format!("  {word}  {:<8}{time}  {detail}", st.step.as_str());
                println!("{}", line.trim_end());
            }
            println!(
                "  {}",
                if r.passed() {
                    "ok: it can build for punix".to_string()
                } else {
                    format!(
                        "failed at `{}`",
                        r.failed_step().map(|s| s.step.as_str()).unwrap_or("?")
                    )
                }
            );
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(punix::transport::TransportError::Other(format!(
        "{} of {} builder(s) failed the check: {}",
        failed.len(),
        reports.len(),
        failed
            .iter()
            .map(|r| format!(
                "`{}` (at `{}`)",
                r.builder,
                r.failed_step().map(|s| s.step.as_str()).unwrap_or("?")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .into())
}

fn add(cx: &Context, a: AddArgs) -> Result<(), Error> {
    let mut reg = a.registry.load()?;
    punix::farm::valid_builder_name(&a.name).map_err(|why| FarmError::BadName {
        name: a.name.clone(),
        reason: why.into(),
    })?;
    if reg.get(&a.name).is_some() {
        return Err(FarmError::Duplicate {
            name: a.name,
            path: reg.path,
        }
        .into());
    }
    let target = SshTarget::parse(&a.url).map_err(Error::Usage)?;
    let file = |p: &Option<PathBuf>, flag: &str| -> Result<Option<PathBuf>, Error> {
        let Some(p) = p else { return Ok(None) };
        let p = punix::config::absolute(&punix::config::expand_home(p)?);
        if !p.is_file() {
            return Err(Error::Usage(format!(
                "`{flag} {}`: no such file",
                p.display()
            )));
        }
        Ok(Some(p))
    };
    let mut builder = Builder::new(&a.name, target.to_string());
    builder.key = file(&a.key, "--key")?;
    builder.known_hosts = file(&a.known_hosts, "--known-hosts")?;
    builder.max_jobs = a.max_jobs as usize;
    builder.speed_factor = a.speed_factor;
    for f in a
        .features
        .iter()
        .map(|f| f.trim())
        .filter(|f| !f.is_empty())
    {
        if !builder.features.iter().any(|x| x == f) {
            builder.features.push(f.to_string());
        }
    }
    let mut given: Vec<System> = Vec::new();
    for s in a.systems {
        if !given.contains(&s) {
            given.push(s);
        }
    }

    if a.no_probe {
        builder.systems = given;
        reg.add(builder.clone())?;
        reg.save()?;
        println!(
            "added builder `{}` ({}) without probing it: {}",
            builder.name,
            builder.url,
            describe(&builder)
        );
        if builder.systems.is_empty() {
            println!(
                "note: no systems recorded, so nothing will be built on `{name}`; `punix builders remove {name}` and add it again with `--systems x86_64-linux,...`, or without `--no-probe` to detect them",
                name = builder.name
            );
        }
        println!("registry: {}", reg.path.display());
        return Ok(());
    }

    eprintln!("probing `{}` at {} ...", builder.name, builder.url);
    let timeout = Duration::from_secs(a.connect_timeout);
    let t = probe::connect(&builder, timeout).map_err(|e| match e {
        FarmError::Transport(source) => FarmError::Reach {
            builder: builder.name.clone(),
            source: Box::new(source),
        },
        other => other,
    })?;
    let status = probe::probe_over(&t, &builder.name, &cx.store_root);
    drop(t);
    let mut problems = status.problems(&cx.store_root);
    if let Some(detected) = &status.system {
        if given.is_empty() {
            builder.systems = vec![detected.clone()];
        } else if given.contains(detected) {
            builder.systems = given;
        } else {
            problems.push(format!(
                "`uname` says it is `{detected}`, but `--systems` lists {}\n  hint: list the system it runs (`--systems {detected}`), or leave `--systems` out",
                given
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FarmError::Unsuitable {
            builder: builder.name,
            url: builder.url,
            problems,
        }
        .into());
    }
    reg.add(builder.clone())?;
    reg.save()?;
    println!(
        "added builder `{}` ({}): {}",
        builder.name,
        builder.url,
        describe(&builder)
    );
    println!(
        "  checked: sh and rsync present, store root `{}` writable; {}",
        cx.store_root.display(),
        live(&status)
    );
    println!("registry: {}", reg.path.display());
    Ok(())
}

fn remove(a: RemoveArgs) -> Result<(), Error> {
    let mut reg = a.registry.load()?;
    let b = reg.remove(&a.name)?;
    reg.save()?;
    println!(
        "removed builder `{}` ({}) from {}",
        b.name,
        b.url,
        reg.path.display()
    );
    Ok(())
}

fn list(cx: &Context, a: ListArgs) -> Result<(), Error> {
    let reg = a.registry.load()?;
    let statuses: Option<Vec<BuilderStatus>> = (!a.no_probe).then(|| {
        punix::farm::probe_all(
            &reg.builders,
            &cx.store_root,
            Duration::from_secs(a.connect_timeout),
        )
    });
    if a.json {
        print_json(&list_json(&reg, statuses.as_deref(), &cx.store_root));
        return Ok(());
    }
    if reg.builders.is_empty() {
        println!("no builders in {}", reg.path.display());
        println!("  hint: add one with `punix builders add NAME ssh://USER@HOST[:PORT]`");
        print_caches(&reg, !a.no_probe, &cx.store_root);
        return Ok(());
    }
    let mut header = vec!["NAME", "URL", "SYSTEMS", "JOBS", "SPEED", "FEATURES"];
    if statuses.is_some() {
        header.extend(["STATUS", "LATENCY", "LOAD", "FREE"]);
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for (i, b) in reg.builders.iter().enumerate() {
        let mut row = vec![
            b.name.clone(),
            b.url.clone(),
            dash(b.systems.iter().map(|s| s.to_string()).collect()),
            b.max_jobs.to_string(),
            trim_float(b.speed_factor),
            dash(b.features.clone()),
        ];
        if let Some(s) = statuses.as_ref().and_then(|v| v.get(i)) {
            row.push(short_status(s, b).into());
            row.push(opt(s.latency_ms.map(|l| format!("{l:.0} ms"))));
            row.push(opt(s.load.map(|l| format!("{l:.2}"))));
            row.push(opt(s.free_disk_bytes.map(human_bytes)));
        }
        rows.push(row);
    }
    print_table(&rows);
    if let Some(statuses) = &statuses {
        let mut first = true;
        for (s, b) in statuses.iter().zip(&reg.builders) {
            let mut problems = s.problems(&cx.store_root);
            if let Some(sys) = &s.system
                && s.reachable
                && !b.serves(sys)
            {
                problems.push(format!(
                    "`uname` says `{sys}`, which is not among its registered systems\n  hint: remove it and add it again to record what it is"
                ));
            }
            for p in problems {
                if first {
                    println!();
                    first = false;
                }
                println!("{}: {p}", b.name);
            }
        }
    }
    print_caches(&reg, !a.no_probe, &cx.store_root);
    Ok(())
}

/// Whether a binary cache answers: `ok`, or the first line of its error.
fn cache_status(url: &str, store_root: &Path) -> String {
    match punix::cache::Cache::open(url).and_then(|c| c.check(store_root)) {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

/// The registry's `[[cache]]` entries, with whether each answers.
fn print_caches(reg: &Registry, probe: bool, store_root: &Path) {
    if reg.caches.is_empty() {
        return;
    }
    println!();
    let mut rows = vec![vec!["CACHE".to_string(), "STATUS".to_string()]];
    for url in &reg.caches {
        let status = if probe {
            cache_status(url, store_root)
        } else {
            "-".into()
        };
        rows.push(vec![url.clone(), status]);
    }
    print_table(&rows);
}

fn list_json(
    reg: &Registry,
    statuses: Option<&[BuilderStatus]>,
    store_root: &Path,
) -> serde_json::Value {
    let builders: Vec<serde_json::Value> = reg
        .builders
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let status = statuses.and_then(|v| v.get(i)).map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.remove("name");
                    o.insert("usable".into(), json!(s.usable()));
                    o.insert("problems".into(), json!(s.problems(store_root)));
                }
                v
            });
            json!({
                "name": b.name,
                "url": b.url,
                "key": b.key,
                "known_hosts": b.known_hosts,
                "systems": b.systems,
                "max_jobs": b.max_jobs,
                "speed_factor": b.speed_factor,
                "features": b.features,
                "status": status,
            })
        })
        .collect();
    json!({
        "registry": reg.path,
        "store_root": store_root,
        "builders": builders,
        "caches": reg
            .caches
            .iter()
            .map(|url| json!({
                "url": url,
                "status": statuses.map(|_| cache_status(url, store_root)),
            }))
            .collect::<Vec<_>>(),
    })
}

/// One word for the STATUS column.
fn short_status(s: &BuilderStatus, b: &Builder) -> &'static str {
    if !s.reachable {
        let e = s.error.as_deref().unwrap_or("");
        if e.contains("Host key verification failed") {
            "host key"
        } else if e.contains("Permission denied") {
            "denied"
        } else {
            "unreachable"
        }
    } else if s.system.is_none() {
        "unknown system"
    } else if !s.has_rsync {
        "no rsync"
    } else if !s.store_writable {
        "store not writable"
    } else if s.system.as_ref().is_some_and(|sys| !b.serves(sys)) {
        "wrong system"
    } else if !s.usable() {
        "error"
    } else {
        "ok"
    }
}

/// `x86_64-linux, 2 jobs, speed 1.5, features: kvm`.
fn describe(b: &Builder) -> String {
    format!(
        "{}, {} job{}, speed factor {}, features: {}",
        if b.systems.is_empty() {
            "no systems".to_string()
        } else {
            b.systems
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        b.max_jobs,
        if b.max_jobs == 1 { "" } else { "s" },
        trim_float(b.speed_factor),
        if b.features.is_empty() {
            "none".to_string()
        } else {
            b.features.join(", ")
        }
    )
}

/// `latency 3 ms, load 0.12, 18.2 GiB free`.
fn live(s: &BuilderStatus) -> String {
    let mut parts = Vec::new();
    if let Some(l) = s.latency_ms {
        parts.push(format!("latency {l:.0} ms"));
    }
    if let Some(l) = s.load {
        parts.push(format!("load {l:.2}"));
    }
    if let Some(f) = s.free_disk_bytes {
        parts.push(format!("{} free", human_bytes(f)));
    }
    parts.join(", ")
}

fn dash(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn opt(s: Option<String>) -> String {
    s.unwrap_or_else(|| "-".into())
}

/// `1.5`, `2` (no trailing `.0`).
fn trim_float(f: f64) -> String {
    let s = format!("{f}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}
