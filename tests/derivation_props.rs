//! Properties of store paths, from recipe text to `plan`:
//!
//! - the layout of the recipes (key order, package order, how packages are
//!   split across files, the order of the files, how strings are quoted,
//!   optional keys written out with their defaults) never changes a path;
//! - the same inputs give the same path, wherever the sources live;
//! - changing one input of a package (its script, one byte of its source,
//!   a new dependency, its builder, its env or args) changes its path and
//!   the paths of everything that depends on it, and nothing else;
//! - changing the system or the store root changes every path;
//! - every name is `<32 lowercase hex>-<pname>-<version>`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use punix::build::plan::plan;
use punix::platform::System;
use punix::recipe::{SourceText, load_sources};

// ---------------------------------------------------------------------------
// The model: a small set of packages whose deps form a DAG.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builder {
    Shell,
    Make,
    Copy,
}

impl Builder {
    fn kind(self) -> &'static str {
        match self {
            Builder::Shell => "shell",
            Builder::Make => "make",
            Builder::Copy => "copy",
        }
    }
}

#[derive(Clone, Debug)]
struct Pkg {
    module: String,
    pname: String,
    version: String,
    builder: Builder,
    /// Only for the shell builder (required there).
    script: Option<String>,
    /// File name -> bytes of the source tree; required by `copy`.
    src: Option<BTreeMap<String, Vec<u8>>>,
    /// Indexes of earlier packages: the deps form a DAG by construction.
    deps: BTreeSet<usize>,
    env: BTreeMap<String, String>,
    args: Vec<String>,
}

#[derive(Clone, Debug)]
struct PkgSet {
    pkgs: Vec<Pkg>,
}

impl PkgSet {
    /// Indexes of `k` and of every package that depends on it, directly
    /// or not.
    fn dependents_of(&self, k: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::from([k]);
        // Deps point to lower indexes, so one pass upwards suffices.
        for i in k + 1..self.pkgs.len() {
            if self.pkgs[i].deps.iter().any(|d| out.contains(d)) {
                out.insert(i);
            }
        }
        out
    }
}

fn files() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    proptest::collection::btree_map(
        "[a-z]{1,8}(\\.[a-z]{1,3})?",
        proptest::collection::vec(any::<u8>(), 0..48),
        1..4,
    )
}

fn pkg(index: usize) -> impl Strategy<Value = Pkg> {
    (
        "[A-Z][A-Za-z0-9_]{0,6}",
        "[a-z0-9][a-z0-9+._-]{0,10}",
        "[0-9a-z][0-9a-z.+_-]{0,8}",
        prop_oneof![
            2 => Just(Builder::Shell),
            1 => Just(Builder::Make),
            1 => Just(Builder::Copy),
        ],
        "(?s).{0,40}",
        proptest::option::of(files()),
        files(),
        any::<u8>(),
        proptest::collection::btree_map("[A-Z][A-Z0-9_]{0,6}", "(?s).{0,12}", 0..3),
        proptest::collection::vec("(?s).{0,10}", 0..3),
    )
        .prop_map(
            move |(base, pname, version, builder, script, shell_src, src, deps, env, args)| {
                let shell = builder == Builder::Shell;
                Pkg {
                    // Unique: the index is part of the name.
                    module: format!("{base}{index}"),
                    pname,
                    version,
                    builder,
                    script: shell.then_some(script),
                    src: if shell { shell_src } else { Some(src) },
                    deps: (0..index).filter(|j| deps & (1 << j) != 0).collect(),
                    // `V_` keeps clear of the names the build reserves.
                    env: env
                        .into_iter()
                        .map(|(k, v)| (format!("V_{k}"), v))
                        .collect(),
                    args,
                }
            },
        )
}

fn pkg_set() -> impl Strategy<Value = PkgSet> {
    (2usize..=5)
        .prop_flat_map(|n| (0..n).map(pkg).collect::<Vec<_>>())
        .prop_map(|pkgs| PkgSet { pkgs })
}

// ---------------------------------------------------------------------------
// Rendering: one package set, many layouts.

/// A small deterministic generator for layout decisions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A TOML string: a basic string with escapes, or a literal string when
/// the text allows one and the coin says so.
fn toml_str(s: &str, rng: &mut Rng) -> String {
    let literal_ok = !s.contains('\'') && !s.chars().any(|c| c.is_control() && c != '\t');
    if literal_ok && rng.coin() {
        return format!("'{s}'");
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' if rng.coin() => out.push_str("\\t"),
            c if c.is_control() && c != '\t' => write!(out, "\\u{:04X}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String], rng: &mut Rng) -> String {
    let parts: Vec<String> = items.iter().map(|s| toml_str(s, rng)).collect();
    format!("[{}]", parts.join(", "))
}

fn toml_inline_table(map: &BTreeMap<String, String>, rng: &mut Rng) -> String {
    let mut entries: Vec<(&String, &String)> = map.iter().collect();
    rng.shuffle(&mut entries);
    let parts: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| format!("{k} = {}", toml_str(v, rng)))
        .collect();
    if parts.is_empty() {
        "{}".into()
    } else {
        format!("{{ {} }}", parts.join(", "))
    }
}

/// The `key = value` pairs of one package, in random order, plus its env
/// when it goes into a `[package.NAME.env]` table of its own.
fn package_pairs(
    set: &PkgSet,
    p: &Pkg,
    rng: &mut Rng,
    env_table: bool,
) -> (Vec<(String, String)>, Option<Vec<String>>) {
    let mut pairs = vec![
        ("pname".to_string(), toml_str(&p.pname, rng)),
        ("version".to_string(), toml_str(&p.version, rng)),
    ];
    if p.builder != Builder::Shell || rng.coin() {
        pairs.push(("builder".into(), toml_str(p.builder.kind(), rng)));
    }
    if let Some(s) = &p.script {
        pairs.push(("script".into(), toml_str(s, rng)));
    }
    if p.src.is_some() {
        pairs.push(("src".into(), toml_str(&format!("src-{}", p.module), rng)));
    }
    let mut deps: Vec<String> = p.deps.iter().map(|&d| set.pkgs[d].module.clone()).collect();
    // The order of `deps` is not an input either.
    rng.shuffle(&mut deps);
    if !deps.is_empty() || rng.coin() {
        pairs.push(("deps".into(), toml_list(&deps, rng)));
    }
    if !p.args.is_empty() || rng.coin() {
        pairs.push(("args".into(), toml_list(&p.args, rng)));
    }
    let mut env_lines = None;
    if env_table && !p.env.is_empty() {
        let mut lines: Vec<String> = p
            .env
            .iter()
            .map(|(k, v)| format!("{k} = {}", toml_str(v, rng)))
            .collect();
        rng.shuffle(&mut lines);
        env_lines = Some(lines);
    } else if !p.env.is_empty() || rng.coin() {
        pairs.push(("env".into(), toml_inline_table(&p.env, rng)));
    }
    rng.shuffle(&mut pairs);
    (pairs, env_lines)
}

/// Render the set as 1–3 recipe files (in `dir`, named after `tag`), with
/// the layout chosen by `seed`.
fn render(set: &PkgSet, seed: u64, dir: &Path, tag: &str) -> Vec<SourceText> {
    let mut rng = Rng(seed);
    let n_files = 1 + rng.below(3);
    let mut order: Vec<usize> = (0..set.pkgs.len()).collect();
    rng.shuffle(&mut order);
    // Per file: top-level inline packages, then `[package.X]` tables.
    let mut inline: Vec<Vec<String>> = vec![Vec::new(); n_files];
    let mut tables: Vec<Vec<String>> = vec![Vec::new(); n_files];
    for i in order {
        let p = &set.pkgs[i];
        let f = rng.below(n_files);
        match rng.below(3) {
            0 => {
                let (pairs, _) = package_pairs(set, p, &mut rng, false);
                let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                inline[f].push(format!(
                    "package.{} = {{ {} }}\n",
                    p.module,
                    body.join(", ")
                ));
            }
            form => {
                let (pairs, env_lines) = package_pairs(set, p, &mut rng, form == 2);
                let mut t = format!("[package.{}]\n", p.module);
                for (k, v) in pairs {
                    writeln!(t, "{k} = {v}").unwrap();
                }
                if let Some(lines) = env_lines {
                    writeln!(t, "\n[package.{}.env]", p.module).unwrap();
                    for l in lines {
                        writeln!(t, "{l}").unwrap();
                    }
                }
                tables[f].push(t);
            }
        }
    }
    let mut sources: Vec<SourceText> = (0..n_files)
        .map(|f| {
            let mut text = format!("# layout {seed:#x}, file {f}\n");
            for l in &inline[f] {
                text.push_str(l);
            }
            for t in &tables[f] {
                text.push('\n');
                text.push_str(t);
            }
            SourceText::new(dir.join(format!("{tag}-{f}.toml")), text)
        })
        .collect();
    rng.shuffle(&mut sources);
    sources
}

/// Write the source trees of the set into `dir` (`src-<module>/...`).
fn write_sources(set: &PkgSet, dir: &Path) {
    for p in &set.pkgs {
        if let Some(files) = &p.src {
            let d = dir.join(format!("src-{}", p.module));
            fs::create_dir_all(&d).unwrap();
            for (name, bytes) in files {
                fs::write(d.join(name), bytes).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// From text to store names.

const ROOT: &str = "/var/lib/punix/store";

fn system(s: &str) -> System {
    s.parse().unwrap()
}

/// Module -> store entry name, for every package of the set.
fn store_names(
    set: &PkgSet,
    seed: u64,
    dir: &Path,
    sys: &System,
    root: &str,
) -> BTreeMap<String, String> {
    let sources = render(set, seed, dir, &format!("l{seed:x}"));
    let recipes = match load_sources(&sources) {
        Ok(r) => r,
        Err(e) => {
            let texts: Vec<String> = sources
                .iter()
                .map(|s| format!("--- {}\n{}", s.path.display(), s.text))
                .collect();
            panic!("rendered recipes do not load: {e}\n{}", texts.join("\n"));
        }
    };
    let plan = plan(&recipes, Path::new(root), sys, &[]).unwrap();
    assert_eq!(plan.roots.len(), set.pkgs.len());
    plan.roots
}

fn check_shape(set: &PkgSet, names: &BTreeMap<String, String>) -> Result<(), TestCaseError> {
    for p in &set.pkgs {
        let name = &names[&p.module];
        let (hash, rest) = name.split_at(32.min(name.len()));
        prop_assert!(
            hash.len() == 32
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "bad hash in {name}"
        );
        prop_assert_eq!(rest, format!("-{}-{}", p.pname, p.version));
    }
    Ok(())
}

/// One change to one input of package `k`.
#[derive(Clone, Debug)]
enum Change {
    Script,
    SrcByte { file: usize, at: usize, xor: u8 },
    AddDep,
    Builder,
    Env,
    Args,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::Script),
        (any::<usize>(), any::<usize>(), 1u8..=255).prop_map(|(file, at, xor)| Change::SrcByte {
            file,
            at,
            xor
        }),
        Just(Change::AddDep),
        Just(Change::Builder),
        Just(Change::Env),
        Just(Change::Args),
    ]
}

/// Apply `change` to package `k`; `None` when it does not apply to it.
fn apply(set: &PkgSet, k: usize, change: &Change) -> Option<PkgSet> {
    let mut out = set.clone();
    let p = &mut out.pkgs[k];
    match change {
        Change::Script => {
            p.script.as_mut()?.push_str("\n# changed");
        }
        Change::SrcByte { file, at, xor } => {
            let files = p.src.as_mut()?;
            let name = files.keys().nth(file % files.len()).cloned()?;
            let bytes = files.get_mut(&name)?;
            if bytes.is_empty() {
                bytes.push(*xor);
            } else {
                let i = at % bytes.len();
                bytes[i] ^= xor;
            }
        }
        Change::AddDep => {
            // Any earlier package keeps the graph acyclic.
            let new = (0..k).find(|j| !p.deps.contains(j))?;
            p.deps.insert(new);
        }
        Change::Builder => {
            // Same recipe, another builder script: `make` <-> `copy`.
            p.builder = match p.builder {
                Builder::Shell => return None,
                Builder::Make => Builder::Copy,
                Builder::Copy => Builder::Make,
            };
        }
        Change::Env => {
            let v = p.env.entry("V_CHANGED".into()).or_default();
            v.push('!');
        }
        Change::Args => p.args.push("--changed".into()),
    }
    Some(out)
}

// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn layout_never_changes_a_path(set in pkg_set(), a in any::<u64>(), b in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        write_sources(&set, dir.path());
        let sys = system("x86_64-linux");
        let first = store_names(&set, a, dir.path(), &sys, ROOT);
        check_shape(&set, &first)?;
        let second = store_names(&set, b, dir.path(), &sys, ROOT);
        prop_assert_eq!(&first, &second);
    }

    #[test]
    fn same_inputs_give_the_same_path_anywhere(set in pkg_set(), seed in any::<u64>()) {
        let sys = system("aarch64-linux");
        let here = tempfile::tempdir().unwrap();
        write_sources(&set, here.path());
        let there = tempfile::tempdir().unwrap();
        write_sources(&set, there.path());
        let a = store_names(&set, seed, here.path(), &sys, ROOT);
        let again = store_names(&set, seed, here.path(), &sys, ROOT);
        let elsewhere = store_names(&set, seed, there.path(), &sys, ROOT);
        prop_assert_eq!(&a, &again);
        prop_assert_eq!(&a, &elsewhere);
    }

}

// Some changes do not apply to the package drawn (no script, no src, no
// earlier package to depend on): more cases for this one.
proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn one_changed_input_changes_the_package_and_its_dependents(
        set in pkg_set(),
        k in any::<usize>(),
        change in change(),
        seed in any::<u64>(),
        seed2 in any::<u64>(),
    ) {
        let k = k % set.pkgs.len();
        let Some(changed) = apply(&set, k, &change) else {
            // Not applicable to this package (no script, no src, ...).
            return Ok(());
        };
        let sys = system("x86_64-linux");
        let before_dir = tempfile::tempdir().unwrap();
        write_sources(&set, before_dir.path());
        let after_dir = tempfile::tempdir().unwrap();
        write_sources(&changed, after_dir.path());
        let before = store_names(&set, seed, before_dir.path(), &sys, ROOT);
        let after = store_names(&changed, seed2, after_dir.path(), &sys, ROOT);
        check_shape(&changed, &after)?;
        let affected = set.dependents_of(k);
        for (i, p) in set.pkgs.iter().enumerate() {
            let m = &p.module;
            if affected.contains(&i) {
                prop_assert_ne!(
                    &before[m], &after[m],
                    "{:?} of {} left {} unchanged", change, set.pkgs[k].module, m
                );
            } else {
                prop_assert_eq!(
                    &before[m], &after[m],
                    "{:?} of {} changed unrelated {}", change, set.pkgs[k].module, m
                );
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn system_and_store_root_change_every_path(set in pkg_set(), seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        write_sources(&set, dir.path());
        let x86 = store_names(&set, seed, dir.path(), &system("x86_64-linux"), ROOT);
        let arm = store_names(&set, seed, dir.path(), &system("aarch64-linux"), ROOT);
        let other_root =
            store_names(&set, seed, dir.path(), &system("x86_64-linux"), "/home/me/.punix/store");
        check_shape(&set, &arm)?;
        for p in &set.pkgs {
            let m = &p.module;
            prop_assert_ne!(&x86[m], &arm[m], "system did not change {}", m);
            prop_assert_ne!(&x86[m], &other_root[m], "store root did not change {}", m);
            prop_assert_ne!(&arm[m], &other_root[m]);
        }
    }
}

#[test]
fn layouts_really_differ() {
    // The layout generator is not a no-op: two seeds give different texts
    // for the same set, yet the same names.
    let set = PkgSet {
        pkgs: (0..4)
            .map(|i| Pkg {
                module: format!("P{i}"),
                pname: format!("p{i}"),
                version: "1.0".into(),
                builder: Builder::Shell,
                script: Some(format!("echo {i} > \"$out\"\n")),
                src: None,
                deps: (0..i).collect(),
                env: BTreeMap::from([("V_A".into(), "a".into()), ("V_B".into(), "b'\"".into())]),
                args: vec!["x".into()],
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let texts: BTreeSet<Vec<String>> = (0..8u64)
        .map(|seed| {
            render(&set, seed, dir.path(), "t")
                .into_iter()
                .map(|s| s.text)
                .collect()
        })
        .collect();
    assert!(texts.len() > 4, "layouts: {}", texts.len());
    let sys = system("x86_64-linux");
    let names: BTreeSet<BTreeMap<String, String>> = (0..8u64)
        .map(|seed| store_names(&set, seed, dir.path(), &sys, ROOT))
        .collect();
    assert_eq!(names.len(), 1);
}
