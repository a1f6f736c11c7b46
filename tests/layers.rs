//! The library's layers, as ARCHITECTURE.md declares them, hold in the code: a top-level module
//! imports only modules of lower layers, and no two files import each other in a circle.
//!
//! The layers are read from ARCHITECTURE.md's `layers` block, so the picture and this check cannot
//! drift apart. Imports are read from the source text (`crate::a::b` paths, `use crate::{..}`
//! groups, `super::x`), test modules excluded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `layer number -> top-level modules` from ARCHITECTURE.md's fenced `layers` block, lines of the
/// form `3  train`.
fn declared_layers(root: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let block = text
        .split("```layers")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```layers block");
    let mut layers = BTreeMap::new();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_whitespace();
        let n: usize = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("a layer line starts with its number: {line}"));
        for module in words.take_while(|w| !w.starts_with('#')) {
            assert!(
                layers.insert(module.to_string(), n).is_none(),
                "{module} is declared twice"
            );
        }
    }
    layers
}

/// Every library source file (the binary's `main.rs` and `cli/` excluded) and its module path.
fn library_files(src: &Path) -> Vec<(Vec<String>, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(src).ok()?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let top = parts.first()?.as_str();
            if ["lib", "main", "cli"].contains(&top) {
                return None;
            }
            Some((parts, path))
        })
        .collect()
}

/// The source without comments and without its `#[cfg(test)]` tail.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("a readable source file");
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths named by `crate::` paths (grouped `use` lists expanded) and `super::` paths.
fn imported_paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    // The path at the start of `s`: identifiers joined by `::`, up to the first other character.
    let ident = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        for seg in s.split("::") {
            let seg = seg.trim_start();
            let id: String = seg
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if id.is_empty() {
                break;
            }
            let whole = id.len() == seg.len();
            out.push(id);
            if !whole {
                break;
            }
        }
        out
    };
    let mut out = Vec::new();
    // `use crate::{a::b, c::{d, e}};` and `use crate::a::{b, c};`: expand one level of braces.
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(stripped) = after.strip_prefix('{') {
            let end = stripped.find("};").unwrap_or(stripped.len());
            for item in split_top_level(&stripped[..end]) {
                out.extend(expand(&item, &[]));
            }
        } else {
            let head: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let head = head.trim_end_matches(':');
            let base = ident(head);
            if after[head.len()..].starts_with("::{") {
                let inner = &after[head.len() + 3..];
                let end = inner.find('}').unwrap_or(inner.len());
                for item in inner[..end].split(',') {
                    let mut p = base.clone();
                    p.extend(ident(item));
                    out.push(p);
                }
            }
            out.push(base);
        }
        rest = &after[1..];
    }
    // `super::x` names a sibling of the file's module: `ae/train.rs`'s `super` is `ae`, and
    // `ae/mod.rs`'s (module `ae`) is the crate root.
    let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
    let mut rest = code;
    while let Some(i) = rest.find("super::") {
        let after = &rest[i + "super::".len()..];
        let mut p = parent.clone();
        if let Some(stripped) = after.strip_prefix('{') {
            let end = stripped.find('}').unwrap_or(stripped.len());
            for item in stripped[..end].split(',') {
                let mut q = p.clone();
                q.extend(ident(item));
                out.push(q);
            }
        } else {
            p.extend(ident(after));
            out.push(p);
        }
        rest = &after[1..];
    }
    out
}

/// Splits `a::b, c::{d, e}` at the commas outside braces.
fn split_top_level(s: &str) -> Vec<String> {
    let (mut out, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// `a::{b, c}` under `prefix` -> `[prefix a b]`, `[prefix a c]`, `[prefix a]`.
fn expand(item: &str, prefix: &[String]) -> Vec<Vec<String>> {
    let item = item.trim();
    let (head, inner) = match item.find("::{") {
        Some(i) => (
            &item[..i],
            Some(&item[i + 3..item.rfind('}').unwrap_or(item.len())]),
        ),
        None => (item, None),
    };
    let mut base = prefix.to_vec();
    base.extend(
        head.split("::")
            .map(|p| p.split_whitespace().next().unwrap_or("").to_string())
            .filter(|p| !p.is_empty() && p != "self"),
    );
    let mut out = vec![base.clone()];
    if let Some(inner) = inner {
        for sub in split_top_level(inner) {
            out.extend(expand(&sub, &base));
        }
    }
    out
}

/// The longest known module that is a prefix of `path`.
fn resolve<'a>(path: &[String], modules: &'a BTreeSet<Vec<String>>) -> Option<&'a Vec<String>> {
    (1..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()))
}

struct Graph {
    /// File-level module -> the modules it imports.
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn graph(root: &Path) -> Graph {
    let files = library_files(&root.join("src"));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut edges = BTreeMap::new();
    for (module, path) in &files {
        let is_mod = path.file_name().is_some_and(|f| f == "mod.rs");
        let mut targets = BTreeSet::new();
        for p in imported_paths(&code_of(path), module) {
            if let Some(t) = resolve(&p, &modules)
                // A module's own children (its `mod.rs` declaring them) are not imports up.
                && t != module
                && !(is_mod && t.starts_with(module))
            {
                targets.insert(t.clone());
            }
        }
        edges.insert(module.clone(), targets);
    }
    Graph { edges }
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on: BTreeSet<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Vec<String>) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.edges.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.join("::"));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn modules_import_only_lower_layers() {
    let root = root();
    let layers = declared_layers(&root);
    let g = graph(&root);
    let mut wrong = Vec::new();
    for (from, targets) in &g.edges {
        let top = &from[0];
        let Some(&lf) = layers.get(top) else {
            wrong.push(format!("{top} is not in ARCHITECTURE.md's layers"));
            continue;
        };
        for to in targets {
            let other = &to[0];
            if other == top {
                continue;
            }
            match layers.get(other) {
                Some(&lt) if lt < lf => {}
                Some(&lt) => wrong.push(format!(
                    "{} (layer {lf}) imports {} (layer {lt})",
                    from.join("::"),
                    to.join("::")
                )),
                None => wrong.push(format!("{other} is not in ARCHITECTURE.md's layers")),
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let g = graph(&root());
    let found = cycles(&g);
    let imports: usize = g.edges.values().map(BTreeSet::len).sum();
    eprintln!(
        "{} library modules, {imports} imports between them, {} cycles",
        g.edges.len(),
        found.len()
    );
    assert!(
        found.is_empty(),
        "import cycles:\n{}",
        found
            .iter()
            .map(|c| c.join(" <-> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_an_upward_import() {
    // Two files importing each other, and a `use crate::{..}` group: what the checks must catch.
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let code = "use crate::{b::x, c::{d, e::f}};\nfn g() { super::sibling::h(); crate::z::w(); }";
    let paths = imported_paths(code, &m("a::inner"));
    for want in ["b::x", "c::d", "c::e::f", "a::sibling::h", "z::w"] {
        assert!(paths.contains(&m(want)), "{want} in {paths:?}");
    }
    let mut edges = BTreeMap::new();
    edges.insert(m("a"), BTreeSet::from([m("b")]));
    edges.insert(m("b"), BTreeSet::from([m("a")]));
    edges.insert(m("c"), BTreeSet::from([m("a")]));
    assert_eq!(
        cycles(&Graph { edges }),
        vec![vec!["a".to_string(), "b".into()]]
    );
}
