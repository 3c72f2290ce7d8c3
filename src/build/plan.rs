//! From recipes to derivations: what each requested package is, for one
//! system and one store root, and the store path it will have.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{BuildError, builders};
use crate::platform::System;
use crate::recipe::{Recipes, graph::topo_order};
use crate::store::content_hash::hash_tree;
use crate::store::derivation::{BuilderRef, DERIVATION_FORMAT, Derivation};

/// One derivation of a plan.
#[derive(Clone, Debug)]
pub struct Node {
    /// The package (module) it comes from.
    pub module: String,
    /// Its store entry name.
    pub name: String,
    pub drv: Derivation,
    /// The source tree to copy into the build, if any.
    pub src: Option<PathBuf>,
    /// Module name -> store entry name of each direct input.
    pub inputs: BTreeMap<String, String>,
}

/// Every derivation the requested packages need, dependencies first.
#[derive(Clone, Debug)]
pub struct Plan {
    pub system: System,
    pub store_root: PathBuf,
    /// Store entry name -> node.
    pub nodes: BTreeMap<String, Node>,
    /// Store entry names, each after its inputs.
    pub order: Vec<String>,
    /// Requested module -> store entry name.
    pub roots: BTreeMap<String, String>,
}

impl Plan {
    pub fn entry_path(&self, name: &str) -> PathBuf {
        self.store_root.join(name)
    }
}

/// The content hash of a source tree, computed once per process: a run
/// plans the same recipes for several systems (a fleet deploy), and a
/// deploy warms this while it connects. Sources are not expected to change
/// while one punix command runs.
fn source_hash(dir: &Path) -> Result<String, crate::store::content_hash::HashError> {
    use std::sync::{Mutex, OnceLock};
    static MEMO: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(h) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(dir) {
        return Ok(h.clone());
    }
    let h = hash_tree(dir)?;
    memo.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(dir.to_path_buf(), h.clone());
    Ok(h)
}

/// Hash the source trees in `dirs` not hashed yet, many at once: a tree
/// alone is small (a package's source), and hashing one after another
/// leaves the thread pool waking up and idling for each. Failures are left
/// for [`source_hash`] to report, in plan order.
fn warm_source_hashes(dirs: Vec<&PathBuf>) {
    use rayon::prelude::*;
    dirs.par_iter().for_each(|d| {
        let _ = source_hash(d);
    });
}

/// Compute the derivations of `modules` (all packages when empty) and
/// their dependencies for `system` under `store_root`.
pub fn plan(
    recipes: &Recipes,
    store_root: &Path,
    system: &System,
    modules: &[String],
) -> Result<Plan, BuildError> {
    let requested: Vec<String> = if modules.is_empty() {
        recipes.packages.keys().cloned().collect()
    } else {
        for m in modules {
            recipes.package(m)?;
        }
        modules.to_vec()
    };
    let order_modules = topo_order(recipes, &requested);
    let mut dirs: Vec<&PathBuf> = order_modules
        .iter()
        .filter_map(|m| recipes.package(m).ok().and_then(|p| p.src.as_ref()))
        .collect();
    dirs.sort();
    dirs.dedup();
    warm_source_hashes(dirs);
    let mut src_hashes: HashMap<PathBuf, String> = HashMap::new();
    let mut by_module: BTreeMap<String, String> = BTreeMap::new();
    let mut plan = Plan {
        system: system.clone(),
        store_root: store_root.to_path_buf(),
        nodes: BTreeMap::new(),
        order: Vec::new(),
        roots: BTreeMap::new(),
    };
    for module in &order_modules {
        let pkg = recipes.package(module)?;
        if let Some(systems) = &pkg.systems
            && !systems.contains(system)
        {
            return Err(BuildError::UnsupportedSystem {
                module: module.clone(),
                system: system.to_string(),
                systems: systems.iter().map(ToString::to_string).collect(),
                origin: pkg.origin.to_string(),
            });
        }
        let src_sha256 = match &pkg.src {
            None => None,
            Some(dir) => Some(match src_hashes.get(dir) {
                Some(h) => h.clone(),
                None => {
                    let h = source_hash(dir).map_err(|e| BuildError::Source {
                        module: module.clone(),
                        source: e,
                    })?;
                    src_hashes.insert(dir.clone(), h.clone());
                    h
                }
            }),
        };
        let inputs: BTreeMap<String, String> = pkg
            .deps
            .iter()
            .filter_map(|d| by_module.get(d).map(|n| (d.clone(), n.clone())))
            .collect();
        let mut input_names: Vec<String> = inputs.values().cloned().collect();
        input_names.sort();
        input_names.dedup();
        let script_sha256 =
            builders::script_sha256(&pkg.builder).ok_or_else(|| BuildError::UnknownBuilder {
                module: module.clone(),
                kind: pkg.builder.clone(),
            })?;
        let drv = Derivation {
            format: DERIVATION_FORMAT,
            pname: pkg.pname.clone(),
            version: pkg.version.clone(),
            system: system.to_string(),
            store_root: store_root.to_string_lossy().into_owned(),
            builder: BuilderRef {
                kind: pkg.builder.clone(),
                script_sha256,
            },
            script: pkg.script.clone(),
            args: pkg.args.clone(),
            env: pkg.env.clone(),
            src_sha256,
            inputs: input_names,
            features: pkg.features.clone(),
        };
        let name = drv.store_name();
        by_module.insert(module.clone(), name.clone());
        if plan.nodes.contains_key(&name) {
            // Two modules with identical recipes share one store path.
            continue;
        }
        plan.order.push(name.clone());
        plan.nodes.insert(
            name.clone(),
            Node {
                module: module.clone(),
                name,
                drv,
                src: pkg.src.clone(),
                inputs,
            },
        );
    }
    for m in &requested {
        if let Some(n) = by_module.get(m) {
            plan.roots.insert(m.clone(), n.clone());
        }
    }
    Ok(plan)
}
