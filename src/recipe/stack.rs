//! Stacks: `[stack.NAME]` with services and config files, checked with
//! locations like packages.
//!
//! ```toml
//! [stack.MyStack]
//! backend = "systemd"
//! store-modules = ["Api", "Worker"]
//!
//! [[stack.MyStack.services]]
//! name = "api"
//! package = "Api"
//! binary = "api"                     # $package/bin/api (or a path inside it)
//! args = ["--bind", "0.0.0.0:8080"]
//! depends-on = ["worker"]
//! environment = { LOG_LEVEL = "info", DB_URL = { from-env = "DB_URL" } }
//!
//! [[stack.MyStack.config-files]]
//! path = "/etc/myapp/app.conf"
//! content = "verbose = true\n"       # or source = "app.conf", or secret = { from-env = "X" }
//! mode = "0644"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Origin;
use super::diagnostic::{Diagnostic, SourceText, did_you_mean};
use super::fields::{Fields, Located, type_name};

/// Where a secret's value comes from on the deploying machine.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretRef {
    /// An environment variable of the deploying process.
    FromEnv(String),
    /// A file on the deploying machine (absolute after loading).
    FromFile(PathBuf),
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::FromEnv(v) => write!(f, "environment variable `{v}`"),
            SecretRef::FromFile(p) => write!(f, "file `{}`", p.display()),
        }
    }
}

/// A service environment value: a literal, or a secret reference.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvValue {
    Literal(String),
    Secret(SecretRef),
}

/// A service of a stack; becomes `<unit-dir>/<name>.service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub description: Option<String>,
    /// The package (module) that provides the binary.
    pub package: String,
    /// Path of the program inside the package (`api` means `bin/api`).
    pub binary: String,
    pub args: Vec<String>,
    pub depends_on: Vec<String>,
    pub environment: BTreeMap<String, EnvValue>,
    /// systemd `Type=`.
    pub service_type: String,
    /// systemd `Restart=`.
    pub restart: String,
    /// systemd `User=`, if any.
    pub user: Option<String>,
}

/// Where a config file's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    Content(String),
    /// A file next to the recipes (absolute after loading).
    Source(PathBuf),
    Secret(SecretRef),
}

/// A config file a stack writes on its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// Absolute, normalised path on the target.
    pub path: PathBuf,
    pub source: FileSource,
    pub mode: u32,
}

/// A stack, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub name: String,
    pub backend: String,
    pub store_modules: Vec<String>,
    pub services: Vec<Service>,
    pub config_files: Vec<ConfigFile>,
    pub origin: Origin,
}

impl Stack {
    /// Every package the stack pins: its store modules and its services'
    /// packages, sorted and unique.
    pub fn modules(&self) -> Vec<String> {
        let set: BTreeSet<String> = self
            .store_modules
            .iter()
            .cloned()
            .chain(self.services.iter().map(|s| s.package.clone()))
            .collect();
        set.into_iter().collect()
    }

    /// Every secret reference, sorted and unique.
    pub fn secret_refs(&self) -> Vec<SecretRef> {
        let mut set = BTreeSet::new();
        for s in &self.services {
            for v in s.environment.values() {
                if let EnvValue::Secret(r) = v {
                    set.insert(r.clone());
                }
            }
        }
        for f in &self.config_files {
            if let FileSource::Secret(r) = &f.source {
                set.insert(r.clone());
            }
        }
        set.into_iter().collect()
    }
}

/// Paths a config file may never be written to or under.
pub const SENSITIVE_PATHS: &[&str] = &[
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/pam.d",
    "/etc/security",
    "/etc/crontab",
    "/etc/cron.d",
    "/etc/ld.so.preload",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/profile",
    "/etc/profile.d",
    "/root/.ssh",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/usr",
];

/// Why a config file path is refused, if it is.
pub fn confine(path: &str) -> Result<PathBuf, String> {
    if path.contains('\0') {
        return Err("it holds a NUL byte".into());
    }
    if path.contains('\n') {
        return Err("it holds a newline".into());
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err("it is not absolute".into());
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("it holds `..`".into()),
            Component::Prefix(_) => return Err("it is not a plain path".into()),
        }
    }
    if out == Path::new("/") {
        return Err("it names the root directory".into());
    }
    if path.ends_with('/') {
        return Err("it names a directory".into());
    }
    for s in SENSITIVE_PATHS {
        if out.starts_with(s) {
            return Err(format!("`{s}` is a sensitive system path"));
        }
    }
    if out.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with(".punix-") || n.contains(".punix-tmp")
    }) {
        return Err("names starting with `.punix-` are kept for punix".into());
    }
    Ok(out)
}

fn is_stack_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 64
}

/// Service names become unit names: `[A-Za-z0-9][A-Za-z0-9_.@-]*`.
fn is_service_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c))
        && s.len() <= 200
        && !s.ends_with(".service")
}

const STACK_KEYS: &[&str] = &[
    "backend",
    "description",
    "store-modules",
    "services",
    "config-files",
];
const SERVICE_KEYS: &[&str] = &[
    "name",
    "description",
    "package",
    "binary",
    "args",
    "depends-on",
    "environment",
    "type",
    "restart",
    "user",
];
const FILE_KEYS: &[&str] = &["path", "content", "source", "secret", "mode"];
const SERVICE_TYPES: &[&str] = &["simple", "exec", "forking", "oneshot", "notify", "idle"];
const RESTARTS: &[&str] = &[
    "no",
    "on-success",
    "on-failure",
    "on-abnormal",
    "on-watchdog",
    "on-abort",
    "always",
];

/// References from a stack to packages and services, with spans, for the
/// checks that need every file loaded.
#[derive(Default)]
pub(super) struct StackRefs {
    pub file: usize,
    pub modules: Vec<Located<String>>,
    pub services: Vec<(String, Vec<Located<String>>, Located<String>)>,
}

/// Check one `[stack.NAME]` table.
pub(super) fn check_stack(
    src: &SourceText,
    file_index: usize,
    name: &str,
    name_span: Range<usize>,
    table: &DeTable<'_>,
    origin: Origin,
    diags: &mut Vec<Diagnostic>,
) -> (Option<Stack>, StackRefs) {
    let before = diags.len();
    let mut refs = StackRefs {
        file: file_index,
        ..StackRefs::default()
    };
    if !is_stack_name(name) {
        diags.push(
            src.diag(name_span.clone(), format!("`{name}` is not a valid stack name"))
                .with_hint("stack names start with a letter and hold only letters, digits, `_` and `-` (at most 64)"),
        );
    }
    let mut f = Fields {
        src,
        table,
        what: format!("stack `{name}`"),
        header: name_span.clone(),
        diags: &mut *diags,
        suggested: Vec::new(),
    };
    f.deny_unknown(STACK_KEYS);
    let backend = f.string("backend", "\"systemd\"");
    let modules = f.string_list("store-modules", "[\"Api\"]");
    let _ = f.string("description", "\"what it is\"");
    if let Some(b) = &backend
        && b.value != "systemd"
    {
        diags.push(
            src.diag(b.span.clone(), format!("unknown backend `{}`", b.value))
                .with_hint("the only backend is `systemd`"),
        );
    }
    refs.modules = modules.clone();

    let mut services = Vec::new();
    let mut seen_services: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for (i, item) in array_of_tables(src, table, "services", name, diags) {
        let DeValue::Table(t) = item.get_ref() else {
            continue;
        };
        if let Some((svc, deps, pkg)) = check_service(src, name, i, item.span(), t, diags) {
            if let Some(first) = seen_services.get(&svc.name) {
                let (l, c) = src.line_col(first.start);
                diags.push(
                    src.diag(
                        item.span(),
                        format!("stack `{name}` has two services named `{}`", svc.name),
                    )
                    .with_hint(format!(
                        "the first is at {}:{l}:{c}; service names must be unique",
                        src.path.display()
                    )),
                );
            } else {
                seen_services.insert(svc.name.clone(), item.span());
                refs.services.push((svc.name.clone(), deps, pkg));
                services.push(svc);
            }
        }
    }

    let base_dir = src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut files = Vec::new();
    let mut seen_files: BTreeSet<PathBuf> = BTreeSet::new();
    for (_, item) in array_of_tables(src, table, "config-files", name, diags) {
        let DeValue::Table(t) = item.get_ref() else {
            continue;
        };
        if let Some(cf) = check_file(src, name, item.span(), t, &base_dir, diags) {
            if !seen_files.insert(cf.path.clone()) {
                diags.push(
                    src.diag(
                        item.span(),
                        format!("stack `{name}` writes `{}` twice", cf.path.display()),
                    )
                    .with_hint("each config file path may appear once"),
                );
            } else {
                files.push(cf);
            }
        }
    }

    if diags.len() > before {
        return (None, refs);
    }
    (
        Some(Stack {
            name: name.to_string(),
            backend: backend.map(|b| b.value).unwrap_or_else(|| "systemd".into()),
            store_modules: modules.into_iter().map(|m| m.value).collect(),
            services,
            config_files: files,
            origin,
        }),
        refs,
    )
}

/// The items of an array of tables (`[[stack.X.services]]`), reporting a
/// key that is something else.
fn array_of_tables<'a, 'i>(
    src: &SourceText,
    table: &'a DeTable<'i>,
    key: &str,
    stack: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(usize, &'a Spanned<DeValue<'i>>)> {
    let Some(v) = table.get(key) else {
        return Vec::new();
    };
    let DeValue::Array(items) = v.get_ref() else {
        diags.push(
            src.diag(
                v.span(),
                format!(
                    "`{key}` in stack `{stack}` must be an array of tables, not {}",
                    type_name(v.get_ref())
                ),
            )
            .with_hint(format!("declare each one as `[[stack.{stack}.{key}]]`")),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if matches!(item.get_ref(), DeValue::Table(_)) {
            out.push((i, item));
        } else {
            diags.push(
                src.diag(
                    item.span(),
                    format!(
                        "the items of `{key}` in stack `{stack}` must be tables, not {}",
                        type_name(item.get_ref())
                    ),
                )
                .with_hint(format!("declare each one as `[[stack.{stack}.{key}]]`")),
            );
        }
    }
    out
}

fn check_service(
    src: &SourceText,
    stack: &str,
    index: usize,
    span: Range<usize>,
    t: &DeTable<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(Service, Vec<Located<String>>, Located<String>)> {
    let before = diags.len();
    let what = format!("service #{} of stack `{stack}`", index + 1);
    let mut f = Fields {
        src,
        table: t,
        what: what.clone(),
        header: span.clone(),
        diags: &mut *diags,
        suggested: Vec::new(),
    };
    f.deny_unknown(SERVICE_KEYS);
    let name = f.required_string("name", "\"api\"");
    let description = f.string("description", "\"what it does\"");
    let package = f.required_string("package", "\"Api\"");
    let binary = f.required_string("binary", "\"api\"");
    let args = f.string_list("args", "[\"--port\", \"8080\"]");
    let depends_on = f.string_list("depends-on", "[\"db\"]");
    let service_type = f.string("type", "\"simple\"");
    let restart = f.string("restart", "\"on-failure\"");
    let user = f.string("user", "\"www-data\"");

    if let Some(n) = &name
        && !is_service_name(&n.value)
    {
        diags.push(
            src.diag(n.span.clone(), format!("`{}` is not a valid service name", n.value))
                .with_hint("service names become systemd unit names: letters, digits and `_.@-`, starting with a letter or digit, without `.service`"),
        );
    }
    if let Some(b) = &binary {
        let p = Path::new(&b.value);
        if b.value.is_empty()
            || p.is_absolute()
            || p.components().any(|c| matches!(c, Component::ParentDir))
            || b.value.contains(['\n', '\0'])
        {
            diags.push(
                src.diag(
                    b.span.clone(),
                    format!(
                        "`binary` `{}` must be a relative path inside the package",
                        b.value
                    ),
                )
                .with_hint(
                    "write the program's name (`api` means `bin/api`) or a path like `libexec/api`",
                ),
            );
        }
    }
    for (v, allowed, key) in [
        (&service_type, SERVICE_TYPES, "type"),
        (&restart, RESTARTS, "restart"),
    ] {
        if let Some(v) = v
            && !allowed.contains(&v.value.as_str())
        {
            diags.push(
                src.diag(
                    v.span.clone(),
                    format!("unknown service {key} `{}`", v.value),
                )
                .with_hint(format!("one of: {}", allowed.join(", "))),
            );
        }
    }
    for a in args.iter().chain(depends_on.iter()) {
        if a.value.contains('\0') || a.value.contains('\n') {
            diags.push(
                src.diag(
                    a.span.clone(),
                    "a service argument may not hold a newline or NUL",
                )
                .with_hint("systemd reads ExecStart= line by line"),
            );
        }
    }
    let environment = check_environment(src, &what, t, diags);
    if diags.len() > before {
        return None;
    }
    let name = name?;
    let package = package?;
    Some((
        Service {
            name: name.value,
            description: description.map(|d| d.value),
            package: package.value.clone(),
            binary: binary?.value,
            args: args.into_iter().map(|a| a.value).collect(),
            depends_on: depends_on.iter().map(|d| d.value.clone()).collect(),
            environment,
            service_type: service_type
                .map(|s| s.value)
                .unwrap_or_else(|| "simple".into()),
            restart: restart
                .map(|s| s.value)
                .unwrap_or_else(|| "on-failure".into()),
            user: user.map(|u| u.value),
        },
        depends_on,
        package,
    ))
}

fn check_environment(
    src: &SourceText,
    what: &str,
    t: &DeTable<'_>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, EnvValue> {
    let mut out = BTreeMap::new();
    let Some(v) = t.get("environment") else {
        return out;
    };
    let DeValue::Table(env) = v.get_ref() else {
        diags.push(
            src.diag(v.span(), format!("`environment` in {what} must be a table, not {}", type_name(v.get_ref())))
                .with_hint("write it as `environment = { NAME = \"value\", TOKEN = { from-env = \"TOKEN\" } }`"),
        );
        return out;
    };
    for (k, val) in env.iter() {
        let key: &str = k.get_ref();
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            diags.push(
                src.diag(
                    k.span(),
                    format!("`{key}` is not a valid environment variable name"),
                )
                .with_hint("use letters, digits and `_`, not starting with a digit"),
            );
            continue;
        }
        match val.get_ref() {
            DeValue::String(s) => {
                if s.contains('\0') || s.contains('\n') {
                    diags.push(
                        src.diag(val.span(), format!("the value of `{key}` may not hold a newline or NUL"))
                            .with_hint("systemd environment values are single lines"),
                    );
                } else {
                    out.insert(key.to_string(), EnvValue::Literal(s.to_string()));
                }
            }
            DeValue::Table(r) => {
                if let Some(sr) = secret_ref(src, &format!("`environment.{key}` in {what}"), val.span(), r, None, diags) {
                    out.insert(key.to_string(), EnvValue::Secret(sr));
                }
            }
            other => diags.push(
                src.diag(val.span(), format!("`environment.{key}` in {what} must be a string or a secret reference, not {}", type_name(other)))
                    .with_hint(format!("write `{key} = \"value\"` or `{key} = {{ from-env = \"{key}\" }}`")),
            ),
        }
    }
    out
}

/// `{ from-env = "NAME" }` or `{ from-file = "path" }`.
fn secret_ref(
    src: &SourceText,
    what: &str,
    span: Range<usize>,
    t: &DeTable<'_>,
    base_dir: Option<&Path>,
    diags: &mut Vec<Diagnostic>,
) -> Option<SecretRef> {
    let mut f = Fields {
        src,
        table: t,
        what: what.to_string(),
        header: span.clone(),
        diags: &mut *diags,
        suggested: Vec::new(),
    };
    f.deny_unknown(&["from-env", "from-file"]);
    let env = f.string("from-env", "\"DB_PASSWORD\"");
    let file = f.string("from-file", "\"/run/secrets/db\"");
    match (env, file) {
        (Some(e), None) if !e.value.is_empty() && !e.value.contains(['=', '\0']) => {
            Some(SecretRef::FromEnv(e.value))
        }
        (None, Some(p)) if !p.value.is_empty() => {
            let path = Path::new(&p.value);
            let abs = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let base = base_dir
                    .map(Path::to_path_buf)
                    .or_else(|| src.path.parent().map(Path::to_path_buf))
                    .unwrap_or_default();
                crate::config::absolute(&base.join(path))
            };
            Some(SecretRef::FromFile(abs))
        }
        (Some(_), Some(_)) => {
            diags.push(
                src.diag(
                    span,
                    format!("{what} names both `from-env` and `from-file`"),
                )
                .with_hint("keep one of them"),
            );
            None
        }
        _ => {
            if diags.iter().all(|d| d.line != src.line_col(span.start).0) {
                diags.push(
                    src.diag(span, format!("{what} is not a secret reference"))
                        .with_hint("write `{ from-env = \"NAME\" }` or `{ from-file = \"path\" }`"),
                );
            }
            None
        }
    }
}

fn check_file(
    src: &SourceText,
    stack: &str,
    span: Range<usize>,
    t: &DeTable<'_>,
    base_dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Option<ConfigFile> {
    let before = diags.len();
    let what = format!("a config file of stack `{stack}`");
    let mut f = Fields {
        src,
        table: t,
        what: what.clone(),
        header: span.clone(),
        diags: &mut *diags,
        suggested: Vec::new(),
    };
    f.deny_unknown(FILE_KEYS);
    let path = f.required_string("path", "\"/etc/myapp/app.conf\"");
    let content = f.string("content", "\"key = value\\n\"");
    let source = f.string("source", "\"files/app.conf\"");

    let confined = path.as_ref().and_then(|p| match confine(&p.value) {
        Ok(c) => Some(c),
        Err(why) => {
            diags.push(
                src.diag(p.span.clone(), format!("config file path `{}` is refused: {why}", p.value))
                    .with_hint("config files need an absolute path outside system-critical locations, without `..`"),
            );
            None
        }
    });

    let mode = match t.get("mode") {
        None => None,
        Some(v) => match v.get_ref() {
            DeValue::String(s) => match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o7777 => Some(m),
                _ => {
                    diags.push(
                        src.diag(v.span(), format!("`{s}` is not a file mode"))
                            .with_hint(
                                "write an octal mode like `mode = \"0644\"` or `mode = 0o644`",
                            ),
                    );
                    None
                }
            },
            DeValue::Integer(i) => match i
                .as_str()
                .trim_start_matches("0o")
                .parse::<String>()
                .ok()
                .and_then(|s| {
                    if i.radix() == 8 {
                        u32::from_str_radix(&s, 8).ok()
                    } else {
                        None
                    }
                }) {
                Some(m) if m <= 0o7777 => Some(m),
                _ => {
                    diags.push(
                        src.diag(v.span(), "a file mode must be octal")
                            .with_hint("write `mode = \"0644\"` or `mode = 0o644`"),
                    );
                    None
                }
            },
            other => {
                diags.push(
                    src.diag(
                        v.span(),
                        format!(
                            "`mode` in {what} must be an octal string, not {}",
                            type_name(other)
                        ),
                    )
                    .with_hint("write `mode = \"0644\"`"),
                );
                None
            }
        },
    };

    let secret = match t.get("secret") {
        None => None,
        Some(v) => match v.get_ref() {
            DeValue::Table(r) => secret_ref(
                src,
                &format!("`secret` of {what}"),
                v.span(),
                r,
                Some(base_dir),
                diags,
            ),
            other => {
                diags.push(
                    src.diag(v.span(), format!("`secret` in {what} must be a table, not {}", type_name(other)))
                        .with_hint("write `secret = { from-env = \"NAME\" }` or `secret = { from-file = \"path\" }`"),
                );
                None
            }
        },
    };

    let given = [
        content.is_some(),
        source.is_some(),
        t.contains_key("secret"),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given != 1 {
        diags.push(
            src.diag(span.clone(), format!("{what} needs exactly one of `content`, `source` or `secret`"))
                .with_hint("`content` holds the text, `source` names a file next to the recipes, `secret` a secret reference"),
        );
    }
    let file_source = if let Some(c) = content {
        Some(FileSource::Content(c.value))
    } else if let Some(s) = source {
        let p = crate::config::absolute(&base_dir.join(&s.value));
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(FileSource::Source(p)),
            _ => {
                diags.push(
                    src.diag(
                        s.span.clone(),
                        format!(
                            "`source` file `{}` does not exist or is not a file",
                            p.display()
                        ),
                    )
                    .with_hint("`source` is relative to the recipe file"),
                );
                None
            }
        }
    } else {
        secret.map(FileSource::Secret)
    };
    if diags.len() > before {
        return None;
    }
    let is_secret = matches!(file_source, Some(FileSource::Secret(_)));
    Some(ConfigFile {
        path: confined?,
        source: file_source?,
        mode: mode.unwrap_or(if is_secret { 0o600 } else { 0o644 }),
    })
}

/// Cross-checks that need every file: packages the stacks name, and the
/// services `depends-on` names.
pub(super) fn check_refs(
    sources: &[SourceText],
    package_names: &BTreeSet<String>,
    refs: &BTreeMap<String, StackRefs>,
    diags: &mut Vec<Diagnostic>,
) {
    for (stack, r) in refs {
        let src = &sources[r.file];
        for m in &r.modules {
            if !package_names.contains(&m.value) {
                diags.push(
                    src.diag(
                        m.span.clone(),
                        format!(
                            "stack `{stack}` names the package `{}`, which is not defined",
                            m.value
                        ),
                    )
                    .with_hint_opt(
                        did_you_mean(&m.value, package_names.iter().map(String::as_str))
                            .or_else(|| Some(format!("declare it as `[package.{}]`", m.value))),
                    ),
                );
            }
        }
        let service_names: BTreeSet<&str> = r.services.iter().map(|(n, _, _)| n.as_str()).collect();
        for (svc, deps, pkg) in &r.services {
            if !package_names.contains(&pkg.value) {
                diags.push(
                    src.diag(pkg.span.clone(), format!("service `{svc}` of stack `{stack}` uses the package `{}`, which is not defined", pkg.value))
                        .with_hint_opt(did_you_mean(&pkg.value, package_names.iter().map(String::as_str))
                            .or_else(|| Some(format!("declare it as `[package.{}]`", pkg.value)))),
                );
            }
            for d in deps {
                if d.value == *svc {
                    diags.push(
                        src.diag(d.span.clone(), format!("service `{svc}` depends on itself"))
                            .with_hint("remove it from its own `depends-on`"),
                    );
                } else if !service_names.contains(d.value.as_str()) {
                    diags.push(
                        src.diag(d.span.clone(), format!("service `{svc}` depends on `{}`, which is not a service of stack `{stack}`", d.value))
                            .with_hint_opt(did_you_mean(&d.value, service_names.iter().copied().filter(|n| *n != svc.as_str()))
                                .or_else(|| Some(format!("the services are: {}", service_names.iter().copied().collect::<Vec<_>>().join(", "))))),
                    );
                }
            }
        }
    }
}
