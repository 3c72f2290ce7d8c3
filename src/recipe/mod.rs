//! Recipe files: TOML packages (and later stacks), loaded from one file or
//! a directory of `*.toml`, checked completely before anything is built.
//!
//! Every mistake becomes a [`Diagnostic`] with `file:line:col` and a hint;
//! all of them are reported together. Loading touches only the recipe files
//! and the `src` directories they name: no build, no network.

pub mod diagnostic;
mod fields;
pub mod graph;
pub mod stack;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use crate::build::builders;
use crate::platform::{System, SystemError};
pub use diagnostic::{Diagnostic, SourceText};
use fields::{Fields, Located};

/// Environment variables the build sets itself; a recipe may not set them.
pub const RESERVED_ENV: &[&str] = &[
    "out",
    "src",
    "system",
    "PATH",
    "HOME",
    "TMPDIR",
    "SOURCE_DATE_EPOCH",
    "LC_ALL",
    "TZ",
    "PUNIX_BUILD_CORES",
    "PUNIX_INPUTS",
    "PUNIX_SCRIPT",
    "CPATH",
    "LIBRARY_PATH",
    "PKG_CONFIG_PATH",
];

/// Errors of loading recipes.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error(
        "cannot read recipes from `{path}`: {source}\n  hint: pass `--file` with a recipe file or a directory of `*.toml` files"
    )]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "`{0}` holds no `*.toml` files\n  hint: pass `--file` with a recipe file or a directory of `*.toml` files"
    )]
    Empty(PathBuf),
    #[error("{}", DiagList(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("no package `{name}` in the recipes{}", .hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    UnknownModule { name: String, hint: Option<String> },
    #[error("no stack `{name}` in the recipes{}", .hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    UnknownStack { name: String, hint: Option<String> },
}

struct DiagList<'a>(&'a [Diagnostic]);

impl fmt::Display for DiagList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\nerror: ")?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\nerror: {} problems in the recipe files", self.0.len())?;
        }
        Ok(())
    }
}

/// Where a definition is: for messages about it later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// One package recipe, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    /// The module name: the key in `[package.NAME]`.
    pub name: String,
    pub pname: String,
    pub version: String,
    pub description: Option<String>,
    pub builder: String,
    /// Absolute path of the source tree, if any.
    pub src: Option<PathBuf>,
    /// Module names of the inputs.
    pub deps: Vec<String>,
    pub script: Option<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Systems the package can be built for; `None` = any.
    pub systems: Option<Vec<System>>,
    /// Features the build machine must offer, sorted and unique.
    pub features: Vec<String>,
    pub origin: Origin,
}

/// All recipes of a `--file` argument.
#[derive(Clone, Debug, Default)]
pub struct Recipes {
    pub packages: BTreeMap<String, Package>,
    pub stacks: BTreeMap<String, stack::Stack>,
}

impl Recipes {
    /// The stack named `name`, with a suggestion when there is none.
    pub fn stack(&self, name: &str) -> Result<&stack::Stack, RecipeError> {
        self.stacks
            .get(name)
            .ok_or_else(|| RecipeError::UnknownStack {
                name: name.to_string(),
                hint: diagnostic::did_you_mean(name, self.stacks.keys().map(String::as_str))
                    .or_else(|| {
                        Some(if self.stacks.is_empty() {
                            "the recipes declare no `[stack.NAME]`".to_string()
                        } else {
                            format!(
                                "the stacks are: {}",
                                self.stacks.keys().cloned().collect::<Vec<_>>().join(", ")
                            )
                        })
                    }),
            })
    }

    /// The package named `name`, with a suggestion when there is none.
    pub fn package(&self, name: &str) -> Result<&Package, RecipeError> {
        self.packages
            .get(name)
            .ok_or_else(|| RecipeError::UnknownModule {
                name: name.to_string(),
                hint: diagnostic::did_you_mean(name, self.packages.keys().map(String::as_str))
                    .or_else(|| {
                        Some(format!(
                            "the packages are: {}",
                            self.packages.keys().cloned().collect::<Vec<_>>().join(", ")
                        ))
                    }),
            })
    }
}

/// The recipe files named by `--file`: the file itself, or the `*.toml`
/// files of the directory, sorted.
pub fn recipe_files(path: &Path) -> Result<Vec<PathBuf>, RecipeError> {
    let read_err = |source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(RecipeError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

/// Load and check the recipes at `path` (a file or a directory). A file
/// that is not UTF-8 is reported together with the other files' mistakes.
pub fn load(path: &Path) -> Result<Recipes, RecipeError> {
    let mut sources = Vec::new();
    let mut unreadable = Vec::new();
    for file in recipe_files(path)? {
        let bytes = fs::read(&file).map_err(|source| RecipeError::Read {
            path: file.clone(),
            source,
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let src = SourceText::new(&file, String::new());
                let (line, col) = {
                    let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                    let s = SourceText::new(&file, String::from_utf8_lossy(valid).into_owned());
                    s.line_col(valid.len())
                };
                let mut d = src.diag(0..0, "the file is not valid UTF-8");
                d.line = line;
                d.col = col;
                unreadable.push(d.with_hint("TOML files must be UTF-8; re-save the file as UTF-8"));
                continue;
            }
        };
        sources.push(SourceText::new(file, text));
    }
    match (load_sources(&sources), unreadable.is_empty()) {
        (result, true) => result,
        (Ok(_), false) => Err(RecipeError::Invalid(unreadable)),
        (Err(RecipeError::Invalid(mut diags)), false) => {
            diags.append(&mut unreadable);
            diags.sort();
            diags.dedup();
            Err(RecipeError::Invalid(diags))
        }
        (Err(other), false) => Err(other),
    }
}

/// Load and check recipes from texts already read. `src` paths are
/// resolved against each text's directory.
pub fn load_sources(sources: &[SourceText]) -> Result<Recipes, RecipeError> {
    let mut diags = Vec::new();
    let mut recipes = Recipes::default();
    // module name -> (where it was defined, the dep entries with spans)
    let mut dep_spans: BTreeMap<String, (usize, Vec<Located<String>>)> = BTreeMap::new();
    let mut first_def: BTreeMap<String, Origin> = BTreeMap::new();
    let mut stack_refs: BTreeMap<String, stack::StackRefs> = BTreeMap::new();
    let mut stack_defs: BTreeMap<String, Origin> = BTreeMap::new();

    for (file_index, src) in sources.iter().enumerate() {
        let doc = match DeTable::parse(&src.text) {
            Ok(doc) => doc,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                diags.push(toml_syntax_diag(src, e.message(), span));
                continue;
            }
        };
        let doc = doc.get_ref();
        let mut top = Fields {
            src,
            table: doc,
            what: "a recipe file".into(),
            header: 0..0,
            diags: &mut diags,
            suggested: Vec::new(),
        };
        top.deny_unknown(&["package", "stack"]);
        check_stacks(
            src,
            file_index,
            doc,
            &mut recipes,
            &mut stack_refs,
            &mut stack_defs,
            &mut diags,
        );
        let Some((pkg_key, pkg_val)) = doc.get_key_value("package") else {
            continue;
        };
        let DeValue::Table(pkgs) = pkg_val.get_ref() else {
            diags.push(
                src.diag(
                    pkg_val.span(),
                    format!(
                        "`package` must be a table of packages, not {}",
                        fields::type_name(pkg_val.get_ref())
                    ),
                )
                .with_hint("declare each package as `[package.NAME]`"),
            );
            continue;
        };
        let _ = pkg_key;
        for (name_key, body) in pkgs.iter() {
            let name: &str = name_key.get_ref();
            let (line, col) = src.line_col(name_key.span().start);
            let origin = Origin {
                file: src.path.clone(),
                line,
                col,
            };
            if let Some(first) = first_def.get(name) {
                diags.push(
                    src.diag(
                        name_key.span(),
                        format!("package `{name}` is defined twice"),
                    )
                    .with_hint(format!("the first definition is at {first}; rename one")),
                );
                continue;
            }
            first_def.insert(name.to_string(), origin.clone());
            let DeValue::Table(table) = body.get_ref() else {
                diags.push(
                    src.diag(
                        body.span(),
                        format!(
                            "package `{name}` must be a table, not {}",
                            fields::type_name(body.get_ref())
                        ),
                    )
                    .with_hint(format!(
                        "write it as `[package.{name}]` followed by its keys"
                    )),
                );
                continue;
            };
            if let Some(pkg) = check_package(
                src,
                name,
                name_key.span(),
                table,
                origin,
                &mut diags,
                &mut dep_spans,
                file_index,
            ) {
                recipes.packages.insert(name.to_string(), pkg);
            }
        }
    }

    graph::check_deps(sources, &recipes, &dep_spans, &mut diags);
    let package_names: std::collections::BTreeSet<String> = dep_spans.keys().cloned().collect();
    stack::check_refs(sources, &package_names, &stack_refs, &mut diags);

    if diags.is_empty() {
        Ok(recipes)
    } else {
        diags.sort();
        diags.dedup();
        Err(RecipeError::Invalid(diags))
    }
}

/// Check the `[stack.NAME]` tables of one file.
fn check_stacks(
    src: &SourceText,
    file_index: usize,
    doc: &DeTable<'_>,
    recipes: &mut Recipes,
    refs: &mut BTreeMap<String, stack::StackRefs>,
    defs: &mut BTreeMap<String, Origin>,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(val) = doc.get("stack") else {
        return;
    };
    let DeValue::Table(stacks) = val.get_ref() else {
        diags.push(
            src.diag(
                val.span(),
                format!(
                    "`stack` must be a table of stacks, not {}",
                    fields::type_name(val.get_ref())
                ),
            )
            .with_hint("declare each stack as `[stack.NAME]`"),
        );
        return;
    };
    for (name_key, body) in stacks.iter() {
        let name: &str = name_key.get_ref();
        let (line, col) = src.line_col(name_key.span().start);
        let origin = Origin {
            file: src.path.clone(),
            line,
            col,
        };
        if let Some(first) = defs.get(name) {
            diags.push(
                src.diag(name_key.span(), format!("stack `{name}` is defined twice"))
                    .with_hint(format!("the first definition is at {first}; rename one")),
            );
            continue;
        }
        defs.insert(name.to_string(), origin.clone());
        let DeValue::Table(table) = body.get_ref() else {
            diags.push(
                src.diag(
                    body.span(),
                    format!(
                        "stack `{name}` must be a table, not {}",
                        fields::type_name(body.get_ref())
                    ),
                )
                .with_hint(format!("write it as `[stack.{name}]` followed by its keys")),
            );
            continue;
        };
        let (checked, r) =
            stack::check_stack(src, file_index, name, name_key.span(), table, origin, diags);
        refs.insert(name.to_string(), r);
        if let Some(st) = checked {
            recipes.stacks.insert(name.to_string(), st);
        }
    }
}

fn is_module_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// pnames and versions become part of a store path name.
fn is_name_part(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c))
        && s.len() <= 100
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_feature(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

const PACKAGE_KEYS: &[&str] = &[
    "pname",
    "version",
    "description",
    "builder",
    "src",
    "deps",
    "script",
    "args",
    "env",
    "systems",
    "features",
];

#[allow(clippy::too_many_arguments)]
fn check_package(
    src: &SourceText,
    name: &str,
    name_span: Range<usize>,
    table: &DeTable<'_>,
    origin: Origin,
    diags: &mut Vec<Diagnostic>,
    dep_spans: &mut BTreeMap<String, (usize, Vec<Located<String>>)>,
    file_index: usize,
) -> Option<Package> {
    let errors_before = diags.len();
    if !is_module_name(name) {
        diags.push(
            src.diag(name_span.clone(), format!("`{name}` is not a valid package name"))
                .with_hint("package names start with a letter and hold only letters, digits and `_` (at most 64)"),
        );
    }
    let mut f = Fields {
        src,
        table,
        what: format!("package `{name}`"),
        header: name_span.clone(),
        diags: &mut *diags,
        suggested: Vec::new(),
    };
    f.deny_unknown(PACKAGE_KEYS);
    let pname = f.required_string("pname", &format!("\"{}\"", example_pname(name)));
    let version = f.required_string("version", "\"1.0\"");
    let description = f.string("description", "\"what it is\"");
    let builder = f.string("builder", "\"shell\"");
    let src_dir = f.string("src", "\"api\"");
    let deps = f.string_list("deps", "[\"Libfoo\"]");
    let script = f.string("script", "'''make'''");
    let args = f.string_list("args", "[\"--flag\"]");
    let env = f.string_table("env", "{ NAME = \"value\" }");
    let systems_raw = f.string_list("systems", "[\"x86_64-linux\", \"aarch64-linux\"]");
    let systems_given = table.contains_key("systems");
    let features_raw = f.string_list("features", "[\"big-parallel\"]");

    for (what, v) in [("pname", &pname), ("version", &version)] {
        if let Some(v) = v
            && !is_name_part(&v.value)
        {
            diags.push(
                src.diag(v.span.clone(), format!("`{}` is not a valid {what}", v.value))
                    .with_hint(format!("a {what} starts with a letter or digit and holds only letters, digits and `+-._` (at most 100)")),
            );
        }
    }

    let builder_kind = builder
        .as_ref()
        .map(|b| b.value.clone())
        .unwrap_or_else(|| "shell".into());
    if let Some(b) = &builder
        && builders::script(&b.value).is_none()
    {
        let kinds: Vec<&str> = builders::KINDS.iter().map(|(k, _)| *k).collect();
        diags.push(
            src.diag(b.span.clone(), format!("unknown builder `{}`", b.value))
                .with_hint_opt(
                    diagnostic::did_you_mean(&b.value, kinds.iter().copied())
                        .or_else(|| Some(format!("the builders are: {}", kinds.join(", ")))),
                ),
        );
    }
    match (&script, builder_kind.as_str()) {
        (None, "shell") => diags.push(
            src.diag(name_span.clone(), format!("package `{name}` uses the `shell` builder but has no `script`"))
                .with_hint("add `script = '''...'''` with the commands that fill `$out`, or pick another `builder`"),
        ),
        (Some(s), kind) if kind != "shell" && builders::script(kind).is_some() => diags.push(
            src.diag(s.span.clone(), format!("`script` is only used by the `shell` builder, and package `{name}` uses `{kind}`"))
                .with_hint("remove `script`, or set `builder = \"shell\"`"),
        ),
        _ => {}
    }

    let base_dir = src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let src_path = src_dir.as_ref().and_then(|s| {
        let p = base_dir.join(&s.value);
        let abs = std::path::absolute(&p).unwrap_or(p.clone());
        match fs::metadata(&abs) {
            Ok(m) if m.is_dir() => Some(abs),
            Ok(_) => {
                diags.push(
                    src.diag(s.span.clone(), format!("`src` of package `{name}` is not a directory: `{}`", p.display()))
                        .with_hint("`src` names a directory, relative to the recipe file"),
                );
                None
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                diags.push(
                    src.diag(s.span.clone(), format!("`src` of package `{name}` cannot be read: `{}` (permission denied)", p.display()))
                        .with_hint("give your user read and search permission on it and on the directories above it (`ls -ld` each one)"),
                );
                None
            }
            Err(e) => {
                diags.push(
                    src.diag(s.span.clone(), format!("`src` of package `{name}` does not exist: `{}` ({})", p.display(), io_reason(&e)))
                        .with_hint("`src` names a directory, relative to the recipe file; create it or fix the path"),
                );
                None
            }
        }
    });
    if builder_kind == "copy" && src_dir.is_none() {
        diags.push(
            src.diag(
                name_span.clone(),
                format!("package `{name}` uses the `copy` builder but has no `src`"),
            )
            .with_hint("add `src = \"DIR\"` with the tree to copy"),
        );
    }

    let mut env_out = BTreeMap::new();
    for (k, (v, kspan)) in env {
        if !is_env_name(&k) {
            diags.push(
                src.diag(
                    kspan,
                    format!("`{k}` is not a valid environment variable name"),
                )
                .with_hint("use letters, digits and `_`, not starting with a digit"),
            );
        } else if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("input_") {
            diags.push(
                src.diag(
                    kspan,
                    format!("`{k}` is set by the build itself and cannot be set in `env`"),
                )
                .with_hint(format!(
                    "reserved names: {}, and `input_*`",
                    RESERVED_ENV.join(", ")
                )),
            );
        } else {
            env_out.insert(k, v.value);
        }
    }

    let mut systems = Vec::new();
    for s in &systems_raw {
        match s.value.parse::<System>() {
            Ok(sys) => systems.push(sys),
            Err(e) => diags.push(system_diag(src, s, &e)),
        }
    }
    let mut features = Vec::new();
    for feat in &features_raw {
        if is_feature(&feat.value) {
            features.push(feat.value.clone());
        } else {
            let fixed = feat
                .value
                .trim()
                .to_ascii_lowercase()
                .replace(['_', ' '], "-");
            let hint = if is_feature(&fixed) {
                format!("write it as `{fixed}`: features are lowercase words with digits and `-`")
            } else {
                "features are lowercase words with digits and `-`, like `big-parallel`".into()
            };
            diags.push(
                src.diag(
                    feat.span.clone(),
                    format!("`{}` is not a valid feature name", feat.value),
                )
                .with_hint(hint),
            );
        }
    }
    features.sort();
    features.dedup();

    dep_spans.insert(name.to_string(), (file_index, deps.clone()));

    if diags.len() > errors_before {
        return None;
    }
    Some(Package {
        name: name.to_string(),
        pname: pname?.value,
        version: version?.value,
        description: description.map(|d| d.value),
        builder: builder_kind,
        src: src_path,
        deps: deps.into_iter().map(|d| d.value).collect(),
        script: script.map(|s| s.value),
        args: args.into_iter().map(|a| a.value).collect(),
        env: env_out,
        systems: systems_given.then_some(systems),
        features,
        origin,
    })
}

/// The systems suggested for a misspelt one.
const KNOWN_SYSTEMS: &[&str] = &[
    "x86_64-linux",
    "aarch64-linux",
    "armv7l-linux",
    "i686-linux",
    "riscv64-linux",
    "powerpc64le-linux",
    "x86_64-darwin",
    "aarch64-darwin",
];

/// A bad entry of `systems`, with a suggestion when one is close.
fn system_diag(src: &SourceText, s: &Located<String>, e: &SystemError) -> Diagnostic {
    let message = match e {
        SystemError::Shape(_) => format!("`{}` is not a system", s.value),
        SystemError::Arch(a) => format!("unknown architecture `{a}` in system `{}`", s.value),
        SystemError::Os(o) => format!("unknown operating system `{o}` in system `{}`", s.value),
    };
    let fallback = match e {
        SystemError::Shape(_) => {
            "a system is `<arch>-<os>`, for example `x86_64-linux` or `aarch64-linux`"
        }
        SystemError::Arch(_) => {
            "known architectures: x86_64, aarch64, armv7l, i686, riscv64, powerpc64le, ..."
        }
        SystemError::Os(_) => "the operating systems are `linux` and `darwin`",
    };
    // An unknown architecture is compared by its name alone, with a small
    // distance: `z80` is not a misspelt `i686`.
    let close = match e {
        SystemError::Arch(a) => {
            let os = s
                .value
                .rsplit_once('-')
                .map_or(String::new(), |(_, os)| os.to_ascii_lowercase());
            KNOWN_SYSTEMS
                .iter()
                .filter_map(|k| k.split_once('-'))
                .filter(|(_, kos)| *kos == os || os.is_empty())
                .map(|(karch, _)| (strsim::damerau_levenshtein(a, karch), karch))
                .filter(|(d, karch)| *d <= 2 && *d < a.len().min(karch.len()))
                .min()
                .map(|(_, karch)| format!("did you mean `{karch}-{os}`?"))
        }
        _ => diagnostic::did_you_mean(&s.value, KNOWN_SYSTEMS.iter().copied()),
    };
    let hint = close.unwrap_or_else(|| fallback.to_string());
    src.diag(s.span.clone(), message).with_hint(hint)
}

/// A TOML syntax error, with a hint for the common mistakes.
fn toml_syntax_diag(src: &SourceText, message: &str, span: Range<usize>) -> Diagnostic {
    let mut message = message.trim_end().replace('\n', "; ");
    let hint = if message.starts_with("duplicate key") {
        let key = src
            .text
            .get(span.clone())
            .filter(|k| !k.is_empty() && k.len() <= 64 && !k.contains(['\n', '`']));
        if let Some(key) = key {
            message = format!("duplicate key `{key}`");
        }
        "a key, and a `[table]` header, can appear only once in a file: merge the two or rename one"
    } else if message.starts_with("invalid multi-line") {
        "close the multi-line string with the quotes that open it (`\"\"\"` or `'''`)"
    } else if message.starts_with("invalid basic string")
        || message.starts_with("invalid literal string")
    {
        "the string is not closed on its line: end it with the quote that opens it, or use `'''...'''` for text over several lines"
    } else if message.starts_with("string values must be quoted")
        || message.starts_with("invalid float")
        || message.starts_with("invalid integer")
    {
        // An unquoted value such as `version = 1.0.0`: point at all of it.
        if let Some(value) = bare_value(&src.text, span.start) {
            let text = &src.text[value.clone()];
            return src
                .diag(
                    value.clone(),
                    format!("invalid TOML: `{text}` is not a number, a boolean or a quoted string"),
                )
                .with_hint(format!("put text in quotes: `\"{text}\"`"));
        }
        "put text in quotes, like `version = \"1.0.0\"`, and separate array items with `,`"
    } else {
        "fix the syntax; see https://toml.io for the format"
    };
    src.diag(span, format!("invalid TOML: {message}"))
        .with_hint(hint)
}

/// The unquoted value around byte `at`, when it is one word: from after
/// the `=`, `[`, `{`, `,` or blank before it to the delimiter after it.
fn bare_value(text: &str, at: usize) -> Option<Range<usize>> {
    let at = at.min(text.len());
    if !text.is_char_boundary(at) {
        return None;
    }
    let is_delim = |c: char| c.is_whitespace() || "=[]{},#\"'".contains(c);
    let start = text[..at]
        .char_indices()
        .rev()
        .find(|(_, c)| is_delim(*c))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let end = text[at..]
        .char_indices()
        .find(|(_, c)| is_delim(*c))
        .map_or(text.len(), |(i, _)| at + i);
    let before = text[..start].trim_end_matches([' ', '\t']);
    let after = text[end..].trim_start_matches([' ', '\t']);
    let word = &text[start..end];
    let value_before = before.ends_with(['=', '[', ',']);
    let value_after = after.is_empty() || after.starts_with(['\n', '\r', '#', ',', ']', '}']);
    (!word.is_empty() && word.len() <= 64 && !word.contains('`') && value_before && value_after)
        .then_some(start..end)
}

/// A likely pname for a package, for the hint when it has none.
fn example_pname(module: &str) -> String {
    let guess = module.to_ascii_lowercase().replace('_', "-");
    if is_name_part(&guess) {
        guess
    } else {
        "api".into()
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagnostics of loading one in-memory file.
    fn diags(text: &str) -> Vec<Diagnostic> {
        match load_sources(&[SourceText::new("/nowhere/r.toml", text.to_string())]) {
            Ok(r) => panic!("expected errors, loaded {:?}", r.packages.keys()),
            Err(RecipeError::Invalid(d)) => d,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn misspelt_required_key_is_reported_once() {
        let d = diags("[package.Hello]\npname = \"hello\"\nverison = \"1.0\"\nscript = \"x\"\n");
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].line, d[0].col), (3, 1));
        assert_eq!(d[0].message, "unknown key `verison` in package `Hello`");
        assert_eq!(d[0].hint.as_deref(), Some("did you mean `version`?"));
    }

    #[test]
    fn missing_key_without_a_near_miss_is_still_reported() {
        let d = diags("[package.Hello]\npname = \"hello\"\nzzz = 1\nscript = \"x\"\n");
        let messages: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert!(
            messages.contains(&"package `Hello` has no `version`"),
            "{messages:?}"
        );
    }

    #[test]
    fn bad_system_has_a_hint_and_a_suggestion() {
        let d = diags(
            "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = \"x\"\nsystems = [\"x86-64-linux\", \"z80-linux\", \"x86_64-windows\"]\n",
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().all(|d| d.hint.is_some()), "{d:?}");
        assert_eq!(d[0].col, 12);
        assert_eq!(d[0].message, "`x86-64-linux` is not a system");
        assert_eq!(d[0].hint.as_deref(), Some("did you mean `x86_64-linux`?"));
        assert_eq!(
            d[1].message,
            "unknown architecture `z80` in system `z80-linux`"
        );
        assert_eq!(
            d[2].message,
            "unknown operating system `windows` in system `x86_64-windows`"
        );
    }

    #[test]
    fn unquoted_values_are_found_whole() {
        let t = "a = [\"x\", 1.2.3]\nb = { c = v1 } # note\nd = 1 2\n";
        let at = t.find("1.2.3").expect("in text");
        assert_eq!(bare_value(t, at + 1), Some(at..at + 5));
        let at = t.find("v1").expect("in text");
        assert_eq!(bare_value(t, at), Some(at..at + 2));
        assert_eq!(bare_value(t, t.find("1 2").expect("in text")), None);
        assert_eq!(bare_value("é", 1), None);
        assert_eq!(bare_value("", 0), None);
    }

    #[test]
    fn numbers_for_strings_are_shown_quoted() {
        let d = diags(
            "[package.A]\npname = \"a\"\nversion = 1\nscript = \"x\"\nenv = { JOBS = 4, ON = true, L = [1] }\n",
        );
        let hints: Vec<&str> = d.iter().filter_map(|d| d.hint.as_deref()).collect();
        assert_eq!(
            hints,
            [
                "write it as `version = \"1\"`",
                "write it as `JOBS = \"4\"`",
                "write it as `ON = \"true\"`",
                "write it as `env = { NAME = \"value\" }`",
            ],
            "{d:?}"
        );
    }

    #[test]
    fn package_of_wrong_type_names_the_type() {
        let d = diags("package = 1\n");
        assert_eq!(
            d[0].message,
            "`package` must be a table of packages, not an integer"
        );
    }

    #[test]
    fn missing_pname_hint_uses_the_package_name() {
        let d = diags("[package.My_Tool]\nversion = \"1\"\nscript = \"x\"\n");
        assert_eq!(d[0].hint.as_deref(), Some("add `pname = \"my-tool\"`"));
    }

    #[test]
    fn bad_feature_suggests_the_fixed_spelling() {
        let d = diags(
            "[package.A]\npname = \"a\"\nversion = \"1\"\nscript = \"x\"\nfeatures = [\"Big_Parallel\"]\n",
        );
        assert_eq!(
            d[0].hint.as_deref(),
            Some("write it as `big-parallel`: features are lowercase words with digits and `-`")
        );
    }

    #[test]
    fn toml_errors_get_specific_hints() {
        let d = diags("[package.A]\npname = \"a\"\n[package.A]\n");
        assert_eq!((d[0].line, d[0].col), (3, 10));
        assert_eq!(d[0].message, "invalid TOML: duplicate key `A`");
        assert!(
            d[0].hint
                .as_deref()
                .is_some_and(|h| h.contains("only once"))
        );

        let d = diags("[package.A]\nversion = 1.0.0\n");
        assert_eq!((d[0].line, d[0].col), (2, 11), "{d:?}");
        assert_eq!(
            d[0].message,
            "invalid TOML: `1.0.0` is not a number, a boolean or a quoted string"
        );
        assert!(
            d[0].hint.as_deref().is_some_and(|h| h.contains("quotes")),
            "{d:?}"
        );

        let d = diags("[package.A]\npname = \"a\n");
        assert_eq!((d[0].line, d[0].col), (2, 11));
        assert!(
            d[0].hint
                .as_deref()
                .is_some_and(|h| h.contains("not closed")),
            "{d:?}"
        );
    }
}
