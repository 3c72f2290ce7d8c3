//! The CI route: `punix ci matrix` writes a GitHub Actions workflow that
//! builds a stack's closure natively on one runner per system
//! (`ubuntu-24.04` for `x86_64-linux`, `ubuntu-24.04-arm` for
//! `aarch64-linux`), uploads each closure as a binary cache (an artifact),
//! and a deploy job that imports every cache (each entry verified) and runs
//! `punix service deploy` against the targets, building nothing itself.
//!
//! The shell of every step that does punix work comes from one function
//! here ([`Matrix::store_root_script`], [`Matrix::build_script`],
//! [`Matrix::import_script`], [`Matrix::ssh_script`],
//! [`Matrix::deploy_script`]), so that a test can run the very commands the
//! workflow runs. The YAML is written by the small writer in [`yaml`]:
//! deterministic, every interpolated value quoted for YAML and, inside
//! scripts, for the shell.
//!
//! Every job shares one absolute store root (`PUNIX_STORE_DIR` in the
//! workflow's `env`): it is part of every derivation, so a closure built
//! under another root would not be the one the deploy job looks for.

pub mod shell;
pub mod yaml;

use std::path::{Component, Path};

use crate::build::BuildError;
use crate::build::plan::plan;
use crate::platform::System;
use crate::recipe::diagnostic::Diagnostic;
use crate::recipe::stack::{SecretRef, Stack};
use crate::recipe::{RecipeError, Recipes};
use crate::transport::ssh::SshTarget;

use shell::sh_quote;
use yaml::{Map, Node, block, plain, quoted};

/// The store root of the generated workflow when none is chosen.
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/punix/store";

/// The systems built when `--systems` is not given.
pub const DEFAULT_SYSTEMS: &[&str] = &["x86_64-linux", "aarch64-linux"];

/// GitHub-hosted runners by system: the only systems `ci matrix` builds.
pub const RUNNERS: &[(&str, &str)] = &[
    ("x86_64-linux", "ubuntu-24.04"),
    ("aarch64-linux", "ubuntu-24.04-arm"),
];

/// A GitHub action, pinned to a full commit hash; `version` is the release
/// tag that commit carries (written as a comment beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    pub repo: &'static str,
    pub sha: &'static str,
    pub version: &'static str,
}

impl Action {
    /// `owner/repo@<sha>`.
    pub fn uses(&self) -> String {
        format!("{}@{}", self.repo, self.sha)
    }
}

pub const CHECKOUT: Action = Action {
    repo: "actions/checkout",
    sha: "11bd71901bbe5b1630ceea73d27597364c9af683",
    version: "v4.2.2",
};
pub const UPLOAD_ARTIFACT: Action = Action {
    repo: "actions/upload-artifact",
    sha: "ea165f8d65b6e75b540449e92b4886f43607fa02",
    version: "v4.6.2",
};
pub const DOWNLOAD_ARTIFACT: Action = Action {
    repo: "actions/download-artifact",
    sha: "d3f86a106a0bac45b974a628896c90dbdf5c8093",
    version: "v4.3.0",
};

/// Repository secrets the deploy job reads besides the stack's own.
pub const SSH_KEY_SECRET: &str = "PUNIX_SSH_KEY";
pub const KNOWN_HOSTS_SECRET: &str = "PUNIX_KNOWN_HOSTS";

/// Where a build job writes its cache (shell form, under `$RUNNER_TEMP`).
pub const CACHE_DIR: &str = "$RUNNER_TEMP/punix-cache";
/// Where the deploy job downloads the caches, one directory per artifact.
pub const CACHES_DIR: &str = "$RUNNER_TEMP/punix-caches";
/// Where the deploy job writes the SSH key and known_hosts.
pub const SSH_DIR: &str = "$RUNNER_TEMP/punix-ssh";

/// Names a stack's `from-env` secret may not have: the workflow or punix
/// set or read them, so a repository secret of that name would change how
/// the deploy runs.
const RESERVED_ENV: &[&str] = &[
    "CI",
    "HOME",
    "PATH",
    "RUNNER_TEMP",
    "PUNIX_STORE_DIR",
    "PUNIX_FILE",
    "PUNIX_BUILDERS",
    "PUNIX_DEPLOYMENTS_ROOT",
];

/// Errors of `punix ci matrix`.
#[derive(Debug, thiserror::Error)]
pub enum CiError {
    /// A bad option: the message says which and what to write instead.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// How the workflow installs punix on a runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Install {
    /// `cargo install --locked punix --version V` (exactly V).
    Crate(String),
    /// `cargo install --locked --git URL --rev REV punix`.
    Git { url: String, rev: String },
}

impl Install {
    /// Exactly version `v` from crates.io (`MAJOR.MINOR.PATCH[-PRE][+BUILD]`).
    pub fn version(v: &str) -> Result<Install, CiError> {
        let (core, rest) = match v.find(['-', '+']) {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, ""),
        };
        let parts: Vec<&str> = core.split('.').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
            && !(v.contains(['-', '+']) && rest.is_empty());
        if !ok {
            return Err(CiError::Usage(format!(
                "`--punix-version {v}`: write an exact version such as `{}` (the workflow installs exactly it)",
                env!("CARGO_PKG_VERSION")
            )));
        }
        Ok(Install::Crate(v.to_string()))
    }

    /// `URL@REV`, REV a full commit hash.
    pub fn git(spec: &str) -> Result<Install, CiError> {
        let Some((url, rev)) = spec.rsplit_once('@').filter(|(u, _)| !u.is_empty()) else {
            return Err(CiError::Usage(format!(
                "`--punix-git {spec}`: write `URL@REV`, for example `https://example.org/punix.git@<40-hex commit>`"
            )));
        };
        if !(url.contains("://") || url.contains(':')) || url.chars().any(char::is_whitespace) {
            return Err(CiError::Usage(format!(
                "`--punix-git {spec}`: `{url}` is not a git URL"
            )));
        }
        check_value("--punix-git", spec)?;
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if !((rev.len() == 40 || rev.len() == 64) && hex(rev)) {
            return Err(CiError::Usage(format!(
                "`--punix-git {spec}`: `{rev}` is not a full commit hash; pin the commit (`git rev-parse {rev}` prints it): a branch or tag can move, and every runner must install the same punix"
            )));
        }
        Ok(Install::Git {
            url: url.to_string(),
            rev: rev.to_string(),
        })
    }

    /// The install command (shell).
    pub fn command(&self) -> String {
        match self {
            Install::Crate(v) => format!("cargo install --locked punix --version {}", sh_quote(v)),
            Install::Git { url, rev } => format!(
                "cargo install --locked --git {} --rev {} punix",
                sh_quote(url),
                sh_quote(rev)
            ),
        }
    }

    /// For step names and comments.
    pub fn describe(&self) -> String {
        match self {
            Install::Crate(v) => format!("punix {v}"),
            Install::Git { rev, .. } => format!("punix at {}", &rev[..12.min(rev.len())]),
        }
    }

    /// The flag that chooses this install.
    fn flag(&self) -> String {
        match self {
            Install::Crate(v) => format!("--punix-version {}", sh_quote(v)),
            Install::Git { url, rev } => {
                format!("--punix-git {}", sh_quote(&format!("{url}@{rev}")))
            }
        }
    }
}

impl Default for Install {
    fn default() -> Install {
        Install::Crate(env!("CARGO_PKG_VERSION").to_string())
    }
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct MatrixSpec {
    /// The recipes, as a path relative to the repository root (the
    /// workflow runs in a checkout).
    pub file: String,
    pub stack: String,
    /// Systems to build for, in order; duplicates are dropped.
    pub systems: Vec<String>,
    /// `ssh://USER@HOST[:PORT]` targets of the deploy job; none: no
    /// deploy job.
    pub deploy_targets: Vec<String>,
    /// The absolute store root of every job (and of the targets).
    pub store_root: String,
    pub install: Install,
}

/// Where the deploy script deploys.
#[derive(Clone, Copy, Debug)]
pub enum Destination<'a> {
    /// The `--deploy-target`s, over SSH with the key and known_hosts the
    /// workflow wrote.
    Targets,
    /// A directory of this machine as the target's `/` (tests).
    TransportRoot(&'a Path),
}

/// A checked matrix: everything the workflow needs.
#[derive(Clone, Debug)]
pub struct Matrix {
    file: String,
    stack: String,
    systems: Vec<(System, &'static str)>,
    targets: Vec<String>,
    store_root: String,
    install: Install,
    /// The stack's packages (store modules and services' packages).
    modules: Vec<String>,
    /// The stack's `from-env` secret names, sorted.
    env_secrets: Vec<String>,
    /// Things the user should know (printed on stderr by the CLI).
    warnings: Vec<String>,
}

/// Refuse what a workflow cannot carry: control characters, and `${{`,
/// which GitHub would evaluate as an expression even inside a script.
fn check_value(what: &str, s: &str) -> Result<(), CiError> {
    if s.chars().any(char::is_control) {
        return Err(CiError::Usage(format!(
            "`{what}` holds a control character; a workflow cannot carry it"
        )));
    }
    if s.contains("${{") {
        return Err(CiError::Usage(format!(
            "`{what} {s}` holds `${{{{`, which GitHub Actions would evaluate as an expression"
        )));
    }
    Ok(())
}

/// The runner of a system, or why there is none.
pub fn runner(system: &System) -> Result<&'static str, CiError> {
    let name = system.to_string();
    RUNNERS
        .iter()
        .find(|(s, _)| *s == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            CiError::Usage(format!(
                "no GitHub-hosted runner builds `{name}`: `punix ci matrix` knows {}\n  hint: build `{name}` on a machine of that system (`punix builders add`) and publish it with `punix store export`",
                RUNNERS
                    .iter()
                    .map(|(s, r)| format!("{s} ({r})"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))
        })
}

/// Can `name` be a repository secret and an environment variable of the
/// deploy step? Why not, if not.
fn secret_name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Some(
            "repository secrets are named with letters, digits and `_`, not starting with a digit"
                .into(),
        );
    }
    if name.to_ascii_uppercase().starts_with("GITHUB_") {
        return Some("GitHub reserves secret names starting with `GITHUB_`".into());
    }
    if RESERVED_ENV.contains(&name) {
        return Some("the workflow sets or punix reads this variable itself".into());
    }
    None
}

impl Matrix {
    /// Check `spec` against the recipes: the stack exists, each system has
    /// a runner and every package of the stack builds for it, targets are
    /// SSH URLs, secret names can be repository secrets.
    pub fn new(spec: MatrixSpec, recipes: &Recipes) -> Result<Matrix, CiError> {
        check_value("--file", &spec.file)?;
        let file_path = Path::new(&spec.file);
        if spec.file.is_empty()
            || file_path.is_absolute()
            || file_path.components().any(|c| c == Component::ParentDir)
        {
            return Err(CiError::Usage(format!(
                "`--file {}`: write the recipes' path relative to the repository root, without `..` (the workflow runs it in a checkout); run `punix ci matrix` from the repository root",
                spec.file
            )));
        }
        check_value("--store-root", &spec.store_root)?;
        if !spec.store_root.starts_with('/') {
            return Err(CiError::Usage(format!(
                "`--store-root {}`: the store root must be an absolute path, the same in every job and on the targets (default {DEFAULT_STORE_ROOT})",
                spec.store_root
            )));
        }
        let stack: &Stack = recipes.stack(&spec.stack)?;
        check_value("--stack", &stack.name)?;

        let mut systems: Vec<(System, &'static str)> = Vec::new();
        if spec.systems.is_empty() {
            return Err(CiError::Usage(
                "`--systems` is empty: name at least one of x86_64-linux, aarch64-linux".into(),
            ));
        }
        for s in &spec.systems {
            let system: System = s.parse().map_err(|e: crate::platform::SystemError| {
                CiError::Usage(format!("`--systems`: {e}"))
            })?;
            let runner = runner(&system)?;
            if !systems.iter().any(|(have, _)| *have == system) {
                systems.push((system, runner));
            }
        }

        let mut targets = Vec::new();
        for t in &spec.deploy_targets {
            check_value("--deploy-target", t)?;
            SshTarget::parse(t).map_err(|e| CiError::Usage(format!("`--deploy-target`: {e}")))?;
            if !targets.contains(t) {
                targets.push(t.clone());
            }
        }

        let modules = stack.modules();
        for (system, _) in &systems {
            // Every package of the closure must build for the system. (An
            // empty list would mean every package to `plan`.)
            if !modules.is_empty() {
                plan(recipes, Path::new(&spec.store_root), system, &modules)?;
            }
        }

        let mut env_secrets = Vec::new();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for r in stack.secret_refs() {
            match r {
                SecretRef::FromEnv(name) => match secret_name_problem(&name) {
                    None => env_secrets.push(name),
                    Some(why) => problems.push(Diagnostic {
                        file: stack.origin.file.clone(),
                        line: stack.origin.line,
                        col: stack.origin.col,
                        message: format!(
                            "stack `{}` reads the secret `{{ from-env = \"{name}\" }}`, which `punix ci matrix` cannot pass from a repository secret: {why}",
                            stack.name
                        ),
                        hint: Some(
                            "rename the variable, for example to `APP_TOKEN`, in the stack and in the repository's secrets"
                                .into(),
                        ),
                    }),
                },
                SecretRef::FromFile(path) => warnings.push(format!(
                    "stack `{}` reads a secret from the file `{}`; the deploy job does not create it: add a step that writes it from a repository secret (mode 0600) before the deploy step",
                    stack.name,
                    path.display()
                )),
            }
        }
        if !problems.is_empty() {
            return Err(RecipeError::Invalid(problems).into());
        }
        env_secrets.sort();
        env_secrets.dedup();
        if targets.is_empty() {
            warnings.push(
                "no `--deploy-target`: the workflow builds and uploads the caches, and deploys nowhere"
                    .into(),
            );
        }
        Ok(Matrix {
            file: spec.file,
            stack: stack.name.clone(),
            systems,
            targets,
            store_root: spec.store_root,
            install: spec.install,
            modules,
            env_secrets,
            warnings,
        })
    }

    pub fn stack(&self) -> &str {
        &self.stack
    }

    /// The systems and their runners, in order.
    pub fn systems(&self) -> &[(System, &'static str)] {
        &self.systems
    }

    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    pub fn store_root(&self) -> &str {
        &self.store_root
    }

    /// The stack's `from-env` secret names: the repository secrets the
    /// deploy step passes as environment variables.
    pub fn env_secrets(&self) -> &[String] {
        &self.env_secrets
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The job id of a system's build job: `build-x86_64-linux`.
    pub fn build_job_id(system: &System) -> String {
        format!("build-{system}")
    }

    /// The artifact a system's build job uploads.
    pub fn artifact_name(system: &System) -> String {
        format!("punix-cache-{system}")
    }

    /// Create the store root for the runner's user (every job).
    pub fn store_root_script(&self) -> String {
        "sudo mkdir -p \"$PUNIX_STORE_DIR\"\nsudo chown \"$(id -u):$(id -g)\" \"$PUNIX_STORE_DIR\"\n"
            .into()
    }

    /// The build step of `system`'s job: build the stack's packages (and
    /// their inputs) for the system, then export the stack's closure into
    /// the cache directory that the next step uploads. Reads
    /// `PUNIX_STORE_DIR` and `RUNNER_TEMP` from the environment.
    pub fn build_script(&self, system: &System) -> String {
        let file = sh_quote(&self.file);
        let sys = sh_quote(&system.to_string());
        let mut script = String::new();
        if !self.modules.is_empty() {
            let modules: Vec<String> = self.modules.iter().map(|m| sh_quote(m)).collect();
            script.push_str(&format!(
                "punix build --file {file} --system {sys} {}\n",
                modules.join(" ")
            ));
        }
        script.push_str(&format!(
            "punix store export --file {file} --system {sys} --to \"{CACHE_DIR}\" {}\n",
            sh_quote(&self.stack),
        ));
        script
    }

    /// The directory (shell form) the deploy job downloads `system`'s
    /// artifact into.
    pub fn download_dir(system: &System) -> String {
        format!("{CACHES_DIR}/{}", Self::artifact_name(system))
    }

    /// The import step of the deploy job: every system's cache into the
    /// store, each entry's archive and content hash checked.
    pub fn import_script(&self) -> String {
        self.systems
            .iter()
            .map(|(s, _)| format!("punix store import \"{}\"\n", Self::download_dir(s)))
            .collect()
    }

    /// Write the SSH key and known_hosts from the repository secrets into
    /// files of mode 0600 under `$RUNNER_TEMP/punix-ssh` (mode 0700).
    pub fn ssh_script(&self) -> String {
        format!(
            r#"for name in {SSH_KEY_SECRET} {KNOWN_HOSTS_SECRET}; do
  if [ -z "${{!name}}" ]; then
    echo "::error::the repository secret $name is missing or empty (Settings > Secrets and variables > Actions)"
    exit 1
  fi
done
umask 077
mkdir -p "{SSH_DIR}"
chmod 0700 "{SSH_DIR}"
printf '%s\n' "${SSH_KEY_SECRET}" > "{SSH_DIR}/key"
printf '%s\n' "${KNOWN_HOSTS_SECRET}" > "{SSH_DIR}/known_hosts"
chmod 0600 "{SSH_DIR}/key" "{SSH_DIR}/known_hosts"
"#
        )
    }

    /// The deploy step: check that the stack's secrets arrived, then
    /// `punix service deploy` with `--jobs 0`, so that a path missing from
    /// the imported caches fails the job instead of being built here.
    pub fn deploy_script(&self, dest: Destination<'_>) -> String {
        let mut s = String::new();
        if !self.env_secrets.is_empty() {
            s.push_str(&format!(
                "for name in {}; do\n  if [ -z \"${{!name:-}}\" ]; then\n    echo \"::error::the repository secret $name (a from-env secret of stack {}) is missing or empty\"\n    exit 1\n  fi\ndone\n",
                self.env_secrets.join(" "),
                self.stack
            ));
        }
        let mut lines = vec![format!(
            "punix service deploy {} --file {} --jobs 0",
            sh_quote(&self.stack),
            sh_quote(&self.file)
        )];
        match dest {
            Destination::Targets => {
                for t in &self.targets {
                    lines.push(format!("--target {}", sh_quote(t)));
                }
                lines.push(format!(
                    "--key \"{SSH_DIR}/key\" --known-hosts \"{SSH_DIR}/known_hosts\""
                ));
            }
            Destination::TransportRoot(root) => {
                lines.push(format!(
                    "--transport-root {}",
                    sh_quote(&root.to_string_lossy())
                ));
            }
        }
        s.push_str(&lines.join(" \\\n  "));
        s.push('\n');
        s
    }

    /// The `punix ci matrix` command line that makes this workflow, as
    /// words of the command first and then one option (with its value)
    /// per item.
    pub fn command_line(&self) -> Vec<String> {
        let mut c = vec![
            format!(
                "punix ci matrix --file {} --stack {}",
                sh_quote(&self.file),
                sh_quote(&self.stack)
            ),
            format!(
                "--systems {}",
                self.systems
                    .iter()
                    .map(|(s, _)| s.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        for t in &self.targets {
            c.push(format!("--deploy-target {}", sh_quote(t)));
        }
        c.push(format!("--store-root {}", sh_quote(&self.store_root)));
        c.push(self.install.flag());
        c
    }

    /// The whole workflow, deterministic.
    pub fn workflow(&self) -> String {
        let mut jobs = Map::new();
        for (i, (system, runner)) in self.systems.iter().enumerate() {
            if i > 0 {
                jobs = jobs.blank();
            }
            jobs = jobs.pair(&Self::build_job_id(system), self.build_job(system, runner));
        }
        if !self.targets.is_empty() {
            jobs = jobs.blank().pair("deploy", self.deploy_job());
        }
        let doc = Map::new()
            .comment(&self.header())
            .blank()
            .pair("name", quoted(format!("punix release: {}", self.stack)))
            .blank()
            .comment("A release tag, or by hand from the Actions tab.")
            .pair(
                "on",
                Map::new()
                    .pair(
                        "push",
                        Map::new()
                            .pair("tags", Node::Seq(vec![quoted("v*")]))
                            .node(),
                    )
                    .pair("workflow_dispatch", Map::new().node())
                    .node(),
            )
            .blank()
            .pair(
                "permissions",
                Map::new().pair("contents", plain("read")).node(),
            )
            .blank()
            .comment("One release of this stack at a time: a running one is never cancelled, a\nnewer run waits for it.")
            .pair(
                "concurrency",
                Map::new()
                    .pair("group", quoted(format!("punix-release-{}", self.stack)))
                    .pair("cancel-in-progress", plain("false"))
                    .node(),
            )
            .blank()
            .pair(
                "env",
                Map::new()
                    .comment("The store root of every job and of the targets: it is part of every\nstore path's hash, so it must be the same absolute path everywhere.")
                    .pair("PUNIX_STORE_DIR", quoted(&self.store_root))
                    .node(),
            )
            .blank()
            .pair(
                "defaults",
                Map::new()
                    .comment("bash -eo pipefail: a failing command fails its step.")
                    .pair("run", Map::new().pair("shell", plain("bash")).node())
                    .node(),
            )
            .blank()
            .pair("jobs", jobs.node())
            .node();
        yaml::render(&doc)
    }

    fn header(&self) -> String {
        let mut h = format!(
            "Generated by `punix ci matrix` (punix {}); edit the recipes and regenerate:\n  {} \\\n    --out FILE\n\nWhat it does (docs/ci-matrix.md explains every line):\n",
            env!("CARGO_PKG_VERSION"),
            self.command_line().join(" \\\n    ")
        );
        for (system, runner) in &self.systems {
            h.push_str(&format!(
                "- {} on {runner}: build the closure of stack `{}` natively,\n  export it to a binary cache, upload that as the artifact {};\n",
                Self::build_job_id(system),
                self.stack,
                Self::artifact_name(system)
            ));
        }
        if self.targets.is_empty() {
            h.push_str("- no deploy job (no --deploy-target was given).\n");
        } else {
            h.push_str(&format!(
                "- deploy: import every cache (each entry's content hash is checked) and\n  deploy `{}` to {} target(s); it builds nothing.\n",
                self.stack,
                self.targets.len()
            ));
            h.push_str(
                "\nRepository secrets it reads (Settings > Secrets and variables > Actions):\n",
            );
            let mut rows = vec![
                (
                    SSH_KEY_SECRET.to_string(),
                    "the private key punix logs in to the targets with".to_string(),
                ),
                (
                    KNOWN_HOSTS_SECRET.to_string(),
                    "known_hosts lines pinning each target's host key".to_string(),
                ),
            ];
            for name in &self.env_secrets {
                rows.push((
                    name.clone(),
                    format!("`from-env` secret of stack `{}`", self.stack),
                ));
            }
            let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            for (n, what) in rows {
                h.push_str(&format!("  {n:width$}  {what}\n"));
            }
        }
        h.trim_end().to_string()
    }

    /// The steps every job starts with: checkout, store root, punix.
    fn common_steps(&self) -> Vec<Node> {
        vec![
            Map::new()
                .pair("name", plain("Check out the repository"))
                .pair_commented("uses", plain(&CHECKOUT.uses()), CHECKOUT.version)
                .pair(
                    "with",
                    Map::new()
                        .pair("persist-credentials", plain("false"))
                        .node(),
                )
                .node(),
            Map::new()
                .pair("name", plain("Create the store root"))
                .pair("run", block(self.store_root_script()))
                .node(),
            Map::new()
                .pair(
                    "name",
                    quoted(format!("Install {}", self.install.describe())),
                )
                .pair("run", block(format!("{}\n", self.install.command())))
                .node(),
        ]
    }

    fn build_job(&self, system: &System, runner: &str) -> Node {
        let mut steps = self.common_steps();
        steps.push(
            Map::new()
                .comment("Natively on this runner (never emulated): build, then write the closure\nto a binary cache.")
                .pair(
                    "name",
                    quoted(format!("Build and export the closure for {system}")),
                )
                .pair("id", plain("build"))
                .pair("run", block(self.build_script(system)))
                .node(),
        );
        steps.push(
            Map::new()
                .pair("name", plain("Upload the cache"))
                .pair_commented(
                    "uses",
                    plain(&UPLOAD_ARTIFACT.uses()),
                    UPLOAD_ARTIFACT.version,
                )
                .pair(
                    "with",
                    Map::new()
                        .pair("name", quoted(Self::artifact_name(system)))
                        .pair("path", quoted("${{ runner.temp }}/punix-cache"))
                        .pair("if-no-files-found", plain("error"))
                        .pair("retention-days", plain("7"))
                        .node(),
                )
                .node(),
        );
        Map::new()
            .pair("name", quoted(format!("build {} ({system})", self.stack)))
            .pair("runs-on", quoted(runner))
            .pair("timeout-minutes", plain("60"))
            .pair("steps", Node::Seq(steps))
            .node()
    }

    fn deploy_job(&self) -> Node {
        let mut steps = self.common_steps();
        for (system, _) in &self.systems {
            steps.push(
                Map::new()
                    .pair("name", quoted(format!("Download the {system} cache")))
                    .pair_commented(
                        "uses",
                        plain(&DOWNLOAD_ARTIFACT.uses()),
                        DOWNLOAD_ARTIFACT.version,
                    )
                    .pair(
                        "with",
                        Map::new()
                            .pair("name", quoted(Self::artifact_name(system)))
                            .pair(
                                "path",
                                quoted(format!(
                                    "${{{{ runner.temp }}}}/punix-caches/{}",
                                    Self::artifact_name(system)
                                )),
                            )
                            .node(),
                    )
                    .node(),
            );
        }
        steps.push(
            Map::new()
                .comment("Every archive's sha256 and every entry's content hash are checked\nbefore the entry enters the store.")
                .pair("name", plain("Import the caches"))
                .pair("id", plain("import"))
                .pair("run", block(self.import_script()))
                .node(),
        );
        steps.push(
            Map::new()
                .pair("name", plain("Write the SSH key and known_hosts"))
                .pair(
                    "env",
                    Map::new()
                        .pair(
                            SSH_KEY_SECRET,
                            quoted(format!("${{{{ secrets.{SSH_KEY_SECRET} }}}}")),
                        )
                        .pair(
                            KNOWN_HOSTS_SECRET,
                            quoted(format!("${{{{ secrets.{KNOWN_HOSTS_SECRET} }}}}")),
                        )
                        .node(),
                )
                .pair("run", block(self.ssh_script()))
                .node(),
        );
        let mut env = Map::new();
        if self.env_secrets.is_empty() {
            env = env.comment(&format!("Stack `{}` has no from-env secrets.", self.stack));
        } else {
            env = env.comment(&format!(
                "The from-env secrets of stack `{}`: {}.",
                self.stack,
                self.env_secrets.join(", ")
            ));
            for name in &self.env_secrets {
                env = env.pair(name, quoted(format!("${{{{ secrets.{name} }}}}")));
            }
        }
        steps.push(
            Map::new()
                .comment("--jobs 0: nothing is built here; a store path missing from the caches\nfails the deploy. Host keys are checked strictly against known_hosts.")
                .pair("name", quoted(format!("Deploy {}", self.stack)))
                .pair("id", plain("deploy"))
                .pair("env", env.node())
                .pair("run", block(self.deploy_script(Destination::Targets)))
                .node(),
        );
        steps.push(
            Map::new()
                .pair("name", plain("Remove the SSH key"))
                .pair("if", plain("always()"))
                .pair("run", block(format!("rm -rf \"{SSH_DIR}\"\n")))
                .node(),
        );
        let needs: Vec<Node> = self
            .systems
            .iter()
            .map(|(s, _)| plain(&Self::build_job_id(s)))
            .collect();
        Map::new()
            .pair("name", quoted(format!("deploy {}", self.stack)))
            .pair("needs", Node::Seq(needs))
            .pair("runs-on", quoted("ubuntu-24.04"))
            .pair("timeout-minutes", plain("60"))
            .pair("steps", Node::Seq(steps))
            .node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(Install::version("0.1.0").is_ok());
        assert!(Install::version("1.2.3-rc.1").is_ok());
        assert!(Install::version("1.2.3+build.5").is_ok());
        for bad in ["1.2", "^1.2.3", "1.2.3-", "latest", "1.2.3 ", "1..3"] {
            assert!(Install::version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn git_specs() {
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let i = Install::git(&format!("ssh://git@example.org/punix.git@{rev}")).expect("git spec");
        assert_eq!(
            i,
            Install::Git {
                url: "ssh://git@example.org/punix.git".into(),
                rev: rev.into()
            }
        );
        assert_eq!(
            i.command(),
            format!(
                "cargo install --locked --git 'ssh://git@example.org/punix.git' --rev '{rev}' punix"
            )
        );
        for bad in [
            "https://example.org/punix.git",
            "https://example.org/punix.git@main",
            "https://example.org/punix.git@v1.0.0",
            "@0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(Install::git(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runners_and_secret_names() {
        assert_eq!(
            runner(&"x86_64-linux".parse().expect("system")).expect("runner"),
            "ubuntu-24.04"
        );
        assert_eq!(
            runner(&"arm64-linux".parse().expect("system")).expect("runner"),
            "ubuntu-24.04-arm"
        );
        let e = runner(&"riscv64-linux".parse().expect("system")).expect_err("no runner");
        assert!(
            e.to_string()
                .contains("no GitHub-hosted runner builds `riscv64-linux`")
        );
        assert!(secret_name_problem("DB_URL").is_none());
        assert!(secret_name_problem("_X1").is_none());
        for bad in [
            "1X",
            "A-B",
            "GITHUB_TOKEN",
            "github_x",
            "PATH",
            "PUNIX_STORE_DIR",
            "",
        ] {
            assert!(secret_name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn values_that_a_workflow_cannot_carry() {
        assert!(check_value("--file", "pkgs/").is_ok());
        assert!(check_value("--file", "a${{ github.token }}").is_err());
        assert!(check_value("--file", "a\nb").is_err());
    }
}
