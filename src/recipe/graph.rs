//! The dependency graph of packages: unknown names, cycles, and order.

use std::collections::BTreeMap;

use super::Recipes;
use super::diagnostic::{Diagnostic, SourceText, did_you_mean};
use super::fields::Located;

/// Report dependencies on unknown packages and dependency cycles.
pub(super) fn check_deps(
    sources: &[SourceText],
    recipes: &Recipes,
    dep_spans: &BTreeMap<String, (usize, Vec<Located<String>>)>,
    diags: &mut Vec<Diagnostic>,
) {
    // Unknown names first; a cycle search only follows known edges.
    for (name, (file, deps)) in dep_spans {
        let src = &sources[*file];
        for dep in deps {
            if !dep_spans.contains_key(&dep.value) {
                let hint = did_you_mean(&dep.value, dep_spans.keys().map(String::as_str))
                    .unwrap_or_else(|| {
                        format!(
                            "declare it as `[package.{}]`, or remove it from `deps`",
                            dep.value
                        )
                    });
                diags.push(
                    src.diag(
                        dep.span.clone(),
                        format!(
                            "package `{name}` depends on `{}`, which is not defined",
                            dep.value
                        ),
                    )
                    .with_hint(hint),
                );
            } else if dep.value == *name {
                diags.push(
                    src.diag(
                        dep.span.clone(),
                        format!("package `{name}` depends on itself"),
                    )
                    .with_hint("remove it from its own `deps`"),
                );
            }
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> =
        dep_spans.keys().map(|k| (k.as_str(), Mark::New)).collect();
    let mut stack: Vec<&str> = Vec::new();

    fn visit<'a>(
        node: &'a str,
        dep_spans: &'a BTreeMap<String, (usize, Vec<Located<String>>)>,
        sources: &[SourceText],
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
        diags: &mut Vec<Diagnostic>,
    ) {
        marks.insert(node, Mark::Active);
        stack.push(node);
        if let Some((file, deps)) = dep_spans.get(node) {
            for dep in deps {
                let d = dep.value.as_str();
                if d == node {
                    continue; // reported above
                }
                match marks.get(d).copied() {
                    Some(Mark::New) => visit(d, dep_spans, sources, marks, stack, diags),
                    Some(Mark::Active) => {
                        let start = stack.iter().position(|n| *n == d).unwrap_or(0);
                        let mut cycle: Vec<&str> = stack[start..].to_vec();
                        cycle.push(d);
                        diags.push(
                            sources[*file]
                                .diag(
                                    dep.span.clone(),
                                    format!("dependency cycle: {}", cycle.join(" -> ")),
                                )
                                .with_hint(format!(
                                    "packages cannot depend on each other in a circle; remove `{d}` from the `deps` of `{node}` or break the cycle elsewhere"
                                )),
                        );
                    }
                    _ => {}
                }
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
    }

    for name in dep_spans.keys() {
        if marks.get(name.as_str()) == Some(&Mark::New) {
            visit(name, dep_spans, sources, &mut marks, &mut stack, diags);
        }
    }
    let _ = recipes;
}

/// The packages `roots` need, dependencies before dependents. The recipes
/// are known to be acyclic with known deps (checked at load).
pub fn topo_order(recipes: &Recipes, roots: &[String]) -> Vec<String> {
    fn visit(
        name: &str,
        recipes: &Recipes,
        seen: &mut std::collections::BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some(pkg) = recipes.packages.get(name) {
            for d in &pkg.deps {
                visit(d, recipes, seen, out);
            }
        }
        out.push(name.to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for r in roots {
        visit(r, recipes, &mut seen, &mut out);
    }
    out
}
