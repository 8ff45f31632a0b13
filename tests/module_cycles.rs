//! No import cycles between the modules of the server crates (issue 14): a module may use its
//! ancestors and descendants, but two modules that are neither must not reach each other through
//! `crate::` or `super::` paths, directly or around a loop. Test code (`#[cfg(test)]` onwards,
//! `tests.rs` files) and comments are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose module graphs must be acyclic.
const CRATES: &[&str] = &["edge-node", "origin", "cdn-packager", "geo-router"];

/// A module path within its crate (`[]` is the crate root).
type ModPath = Vec<String>;

/// Every non-test source file of `src`, by module path.
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match parts.last().map(String::as_str) {
            Some("tests") => continue,
            Some("mod") => {
                parts.pop();
            }
            Some("lib" | "main") if parts.len() == 1 => parts.clear(),
            _ => {}
        }
        out.insert(parts, file);
    }
    out
}

/// The source without comments and without its test module (everything from `#[cfg(test)]`).
fn shipped_code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifier starting at `s` (empty if none).
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every path `rest` names after a `crate::` or `super::` prefix, expanding `{a, b::c}` groups.
fn paths_in(rest: &str, base: &ModPath, out: &mut Vec<ModPath>) {
    let mut path = base.clone();
    let mut s = rest;
    loop {
        if let Some(group) = s.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        paths_in(group[start..i].trim(), &path, out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        paths_in(group[start..i].trim(), &path, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let name = ident(s);
        if name.is_empty() || name == "self" {
            break;
        }
        path.push(name.to_string());
        match s[name.len()..].strip_prefix("::") {
            Some(next) => s = next,
            None => break,
        }
    }
    out.push(path);
}

/// The modules `file` (module `me`) uses, each as the longest known module prefix of a path.
fn uses(me: &ModPath, code: &str, known: &BTreeMap<ModPath, PathBuf>) -> BTreeSet<ModPath> {
    let mut named = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        paths_in(&code[i + "crate::".len()..], &Vec::new(), &mut named);
    }
    for (i, _) in code.match_indices("super::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut base = me.clone();
        let mut rest = &code[i..];
        while let Some(next) = rest.strip_prefix("super::") {
            base.pop();
            rest = next;
        }
        paths_in(rest, &base, &mut named);
    }
    named
        .into_iter()
        .filter_map(|mut path| {
            while !known.contains_key(&path) {
                path.pop()?;
            }
            Some(path)
        })
        .filter(|m| !m.starts_with(me) && !me.starts_with(m))
        .collect()
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, (usize, usize)>,
        stack: Vec<&'a ModPath>,
        next: usize,
        found: Vec<Vec<ModPath>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a ModPath) {
            self.index.insert(v, (self.next, self.next));
            self.next += 1;
            self.stack.push(v);
            for w in &self.graph[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.index[w].1.min(self.index[v].1);
                    self.index.get_mut(v).unwrap().1 = low;
                } else if self.stack.contains(&w) {
                    let low = self.index[w].0.min(self.index[v].1);
                    self.index.get_mut(v).unwrap().1 = low;
                }
            }
            let (idx, low) = self.index[v];
            if idx == low {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

/// The module graph of one crate.
fn graph_of(krate: &str) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(krate)
        .join("src");
    let known = modules(&src);
    known
        .iter()
        .map(|(me, file)| {
            let text = std::fs::read_to_string(file).expect("read source");
            (me.clone(), uses(me, &shipped_code(&text), &known))
        })
        .collect()
}

#[test]
fn the_server_crates_have_no_import_cycles() {
    for krate in CRATES {
        let graph = graph_of(krate);
        assert!(
            graph.len() > 5,
            "{krate}: only {} modules found",
            graph.len()
        );
        let found = cycles(&graph);
        assert!(found.is_empty(), "{krate}: import cycles {found:?}");
    }
}

#[test]
fn the_checker_finds_a_cycle_between_siblings_but_not_with_an_ancestor() {
    let known: BTreeMap<ModPath, PathBuf> = [vec![], vec!["a".into()], vec!["b".into()]]
        .into_iter()
        .map(|m| (m, PathBuf::new()))
        .collect();
    let a = vec!["a".to_string()];
    let b = vec!["b".to_string()];
    let a_uses = uses(&a, "use crate::{b::Thing, Other};\nuse super::b;", &known);
    assert_eq!(a_uses, BTreeSet::from([b.clone()]));
    let b_uses = uses(&b, "fn f() -> crate::a::X { super::Root }", &known);
    assert_eq!(b_uses, BTreeSet::from([a.clone()]));
    let graph = BTreeMap::from([(vec![], BTreeSet::new()), (a, a_uses), (b, b_uses)]);
    assert_eq!(cycles(&graph).len(), 1);
    let code = shipped_code("use crate::b; // crate::a\n#[cfg(test)]\nuse crate::a;");
    assert_eq!(code.trim(), "use crate::b;");
}
