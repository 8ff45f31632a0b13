//! Offline checks of `terraform/` (no provider can be downloaded here, so `terraform validate`
//! cannot run): every file parses as HCL, every module declares typed and described variables,
//! has outputs and a README, every module call passes exactly declared variables and sets every
//! required one, every `module.X.Y` reference names a real output, every file a module reads
//! exists, and the example environment's `terraform.tfvars.example` sets every required input.
//! `scripts/test.sh` adds `terraform fmt -check` and checkov on top.

use hcl::{Block, Body, Expression};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn terraform_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("terraform")
}

/// Every file under `dir` (recursively) whose name ends with one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if !name.starts_with('.') {
                    stack.push(path);
                }
            } else if suffixes.iter().any(|s| name.ends_with(s)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn parse(path: &Path) -> Body {
    let text = std::fs::read_to_string(path).unwrap();
    hcl::parse(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

/// All `.tf` bodies of one directory (not recursive): a Terraform module.
fn module_bodies(dir: &Path) -> Vec<(PathBuf, Body)> {
    let mut out: Vec<(PathBuf, Body)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tf"))
        .map(|p| {
            let body = parse(&p);
            (p, body)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn blocks<'a>(bodies: &'a [(PathBuf, Body)], kind: &'a str) -> impl Iterator<Item = &'a Block> {
    bodies
        .iter()
        .flat_map(|(_, b)| b.blocks())
        .filter(move |b| b.identifier() == kind)
}

fn label(block: &Block, i: usize) -> String {
    block.labels()[i].as_str().to_string()
}

fn attr<'a>(block: &'a Block, key: &str) -> Option<&'a Expression> {
    block
        .body()
        .attributes()
        .find(|a| a.key() == key)
        .map(|a| a.expr())
}

/// A module's interface: variable name -> required (no default), and output names.
struct Interface {
    variables: BTreeMap<String, bool>,
    outputs: BTreeSet<String>,
}

fn interface(dir: &Path) -> Interface {
    let bodies = module_bodies(dir);
    let mut variables = BTreeMap::new();
    for v in blocks(&bodies, "variable") {
        let name = label(v, 0);
        variables.insert(name, attr(v, "default").is_none());
    }
    let outputs = blocks(&bodies, "output").map(|o| label(o, 0)).collect();
    Interface { variables, outputs }
}

fn module_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(terraform_dir().join("modules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Directories holding `.tf` files: the modules and the environments.
fn tf_dirs() -> Vec<PathBuf> {
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for f in files(&terraform_dir(), &[".tf"]) {
        dirs.insert(f.parent().unwrap().to_path_buf());
    }
    dirs.into_iter().collect()
}

#[test]
fn every_terraform_file_parses() {
    let all = files(&terraform_dir(), &[".tf", ".tfvars", ".tfvars.example"]);
    assert!(
        all.len() >= 20,
        "expected the modules and the example env, found {all:?}"
    );
    for f in &all {
        parse(f);
    }
}

#[test]
fn the_issue_modules_and_five_region_example_exist() {
    let names: Vec<String> = module_dirs()
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for m in [
        "cdn",
        "edge-region",
        "geo-router",
        "origin",
        "packager",
        "redis",
    ] {
        assert!(
            names.iter().any(|n| n == m),
            "missing module {m}: {names:?}"
        );
    }
    let env = module_bodies(&terraform_dir().join("envs/example"));
    let mut regions = BTreeSet::new();
    for p in blocks(&env, "provider") {
        if attr(p, "alias").is_some() {
            if let Some(Expression::String(r)) = attr(p, "region") {
                regions.insert(r.clone());
            }
        }
    }
    let want: BTreeSet<String> = [
        "us-east-1",
        "us-west-2",
        "eu-west-1",
        "ap-southeast-1",
        "ap-southeast-2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(regions, want, "provider aliases of the example env");
    let calls: Vec<String> = blocks(&env, "module").map(|m| label(m, 0)).collect();
    assert_eq!(calls.iter().filter(|c| c.starts_with("edge_")).count(), 5);
    assert_eq!(calls.iter().filter(|c| *c == "origin").count(), 1);
    assert_eq!(calls.iter().filter(|c| *c == "cdn").count(), 1);
}

#[test]
fn every_variable_has_a_type_and_a_description_and_every_output_a_description() {
    for dir in tf_dirs() {
        let bodies = module_bodies(&dir);
        for v in blocks(&bodies, "variable") {
            let name = label(v, 0);
            for key in ["type", "description"] {
                assert!(
                    attr(v, key).is_some(),
                    "{}: variable {name} has no {key}",
                    dir.display()
                );
            }
            if let Some(Expression::String(d)) = attr(v, "description") {
                assert!(!d.trim().is_empty(), "{}: {name}", dir.display());
            }
        }
        for o in blocks(&bodies, "output") {
            assert!(
                attr(o, "description").is_some(),
                "{}: output {} has no description",
                dir.display(),
                label(o, 0)
            );
        }
    }
}

#[test]
fn every_module_has_outputs_and_a_readme() {
    for dir in module_dirs() {
        let i = interface(&dir);
        assert!(!i.outputs.is_empty(), "{} has no outputs", dir.display());
        assert!(
            !i.variables.is_empty(),
            "{} has no variables",
            dir.display()
        );
        let readme = std::fs::read_to_string(dir.join("README.md"))
            .unwrap_or_else(|_| panic!("{} has no README.md", dir.display()));
        // The README documents every input and output by name.
        for name in i.variables.keys().chain(i.outputs.iter()) {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{}/README.md does not mention `{name}`",
                dir.display()
            );
        }
    }
}

const META_ARGUMENTS: [&str; 6] = [
    "source",
    "version",
    "providers",
    "count",
    "for_each",
    "depends_on",
];

#[test]
fn module_calls_match_declared_variables() {
    let mut calls = 0;
    for dir in tf_dirs() {
        let bodies = module_bodies(&dir);
        for call in blocks(&bodies, "module") {
            calls += 1;
            let name = label(call, 0);
            let Some(Expression::String(source)) = attr(call, "source") else {
                panic!("{}: module {name} has no literal source", dir.display());
            };
            assert!(
                source.starts_with("../"),
                "module {name}: local sources only"
            );
            let target = dir.join(source);
            let iface = interface(&target);
            let passed: BTreeSet<String> = call
                .body()
                .attributes()
                .map(|a| a.key().to_string())
                .filter(|k| !META_ARGUMENTS.contains(&k.as_str()))
                .collect();
            for arg in &passed {
                assert!(
                    iface.variables.contains_key(arg),
                    "{}: module {name} passes {arg}, which {source} does not declare",
                    dir.display()
                );
            }
            for (var, required) in &iface.variables {
                if *required {
                    assert!(
                        passed.contains(var),
                        "{}: module {name} does not set required variable {var} of {source}",
                        dir.display()
                    );
                }
            }
        }
    }
    assert!(
        calls >= 14,
        "expected every module call of the example env, saw {calls}"
    );
}

/// `module.NAME[...].OUTPUT` references in the raw text of a directory's `.tf` files.
fn module_references(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("module.") {
        let after = &rest[i + "module.".len()..];
        let ident = |s: &str| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect::<String>()
        };
        let name = ident(after);
        let mut tail = &after[name.len()..];
        if tail.starts_with('[') {
            tail = tail.split_once(']').map(|(_, t)| t).unwrap_or("");
        }
        if let Some(t) = tail.strip_prefix('.') {
            let output = ident(t);
            if !name.is_empty() && !output.is_empty() {
                out.push((name, output));
            }
        }
        rest = after;
    }
    out
}

#[test]
fn module_output_references_name_real_outputs() {
    let mut checked = 0;
    for dir in tf_dirs() {
        let bodies = module_bodies(&dir);
        let mut sources = BTreeMap::new();
        for call in blocks(&bodies, "module") {
            if let Some(Expression::String(source)) = attr(call, "source") {
                sources.insert(label(call, 0), interface(&dir.join(source)));
            }
        }
        for (path, _) in &bodies {
            let text = std::fs::read_to_string(path).unwrap();
            for (name, output) in module_references(&text) {
                let iface = sources
                    .get(&name)
                    .unwrap_or_else(|| panic!("{}: unknown module {name}", path.display()));
                assert!(
                    iface.outputs.contains(&output),
                    "{}: module.{name}.{output} is not an output of that module",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 20,
        "expected many module output references, saw {checked}"
    );
}

#[test]
fn files_read_by_modules_exist() {
    let mut checked = 0;
    for f in files(&terraform_dir(), &[".tf"]) {
        let text = std::fs::read_to_string(&f).unwrap();
        let dir = f.parent().unwrap();
        for piece in text.split("\"${path.module}/").skip(1) {
            let rel = piece.split('"').next().unwrap();
            let target = dir.join(rel);
            assert!(
                target.is_file(),
                "{} reads {}, which does not exist",
                f.display(),
                target.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "expected template and unit references, saw {checked}"
    );
}

#[test]
fn example_tfvars_set_every_required_input_and_nothing_else() {
    let env = terraform_dir().join("envs/example");
    let iface = interface(&env);
    let tfvars = parse(&env.join("terraform.tfvars.example"));
    let set: BTreeSet<String> = tfvars.attributes().map(|a| a.key().to_string()).collect();
    for (var, required) in &iface.variables {
        if *required {
            assert!(
                set.contains(var),
                "terraform.tfvars.example does not set {var}"
            );
        }
    }
    for var in &set {
        assert!(
            iface.variables.contains_key(var),
            "terraform.tfvars.example sets {var}, which the env does not declare"
        );
    }
}

#[test]
fn the_reference_scanner_finds_indexed_and_plain_references() {
    let refs = module_references("a = module.x.y\nb = module.r[0].api_url\nc = \"module.\"");
    assert_eq!(
        refs,
        vec![
            ("x".to_string(), "y".to_string()),
            ("r".to_string(), "api_url".to_string())
        ]
    );
}

/// Each `templatefile("${path.module}/FILE", { key = ..., })` call in `text`: the file and the
/// keys of its variables object (nested calls are listed on their own).
fn templatefile_calls(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for (start, _) in text.match_indices("templatefile(\"${path.module}/") {
        let rest = &text[start + "templatefile(\"${path.module}/".len()..];
        let file = rest.split('"').next().unwrap().to_string();
        let open = rest.find('{').expect("a variables object");
        let (mut depth, mut keys, mut line_start) = (0i32, BTreeSet::new(), true);
        let mut ident = String::new();
        for c in rest[open..].chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            if c == '\n' {
                line_start = true;
                ident.clear();
            } else if line_start && depth == 1 {
                if c.is_ascii_alphanumeric() || c == '_' {
                    ident.push(c);
                } else if c == '=' && !ident.is_empty() {
                    keys.insert(std::mem::take(&mut ident));
                    line_start = false;
                } else if !c.is_whitespace() {
                    line_start = false;
                }
            }
        }
        out.push((file, keys));
    }
    out
}

/// The root variables a Terraform template reads: identifiers in `${...}` and `%{...}` that are
/// not function names, attributes, keywords, or `for` loop variables.
fn template_variables(text: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 8] = [
        "for", "in", "if", "else", "endif", "endfor", "true", "false",
    ];
    let mut exprs = Vec::new();
    for open in ["${", "%{"] {
        for (i, _) in text.match_indices(open) {
            if i > 0 && text[i - 1..i] == open[..1] {
                continue; // `$${` / `%%{` escapes
            }
            let body = &text[i + 2..];
            exprs.push(&body[..body.find('}').unwrap_or(body.len())]);
        }
    }
    let mut loop_vars = BTreeSet::new();
    for e in &exprs {
        if let Some(decl) = e.trim().strip_prefix("for ") {
            for v in decl.split(" in ").next().unwrap().split(',') {
                loop_vars.insert(v.trim().to_string());
            }
        }
    }
    let mut vars = BTreeSet::new();
    for e in exprs {
        let chars: Vec<char> = e.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '"' {
                // Skip string literals inside expressions.
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += 1;
                }
                i += 1;
                continue;
            }
            if c.is_ascii_alphabetic() || c == '_' {
                let s = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[s..i].iter().collect();
                let after_dot = s > 0 && chars[s - 1] == '.';
                let call = chars.get(i) == Some(&'(');
                if !after_dot
                    && !call
                    && !KEYWORDS.contains(&word.as_str())
                    && !loop_vars.contains(&word)
                {
                    vars.insert(word);
                }
                continue;
            }
            i += 1;
        }
    }
    vars
}

#[test]
fn every_templatefile_call_passes_exactly_the_variables_its_template_reads() {
    let mut checked = 0;
    for f in files(&terraform_dir(), &[".tf"]) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (file, passed) in templatefile_calls(&text) {
            let template = f.parent().unwrap().join(&file);
            let read = template_variables(&std::fs::read_to_string(&template).unwrap());
            assert_eq!(
                passed,
                read,
                "{}: templatefile({file}) passes other variables than the template reads",
                f.display()
            );
            checked += 1;
        }
    }
    // Four role configs and four user data scripts.
    assert!(
        checked >= 8,
        "expected every templatefile call, saw {checked}"
    );
}

#[test]
fn the_template_scanners_find_calls_and_variables() {
    let calls = templatefile_calls(
        "x = templatefile(\"${path.module}/t.tftpl\", {\n  a = 1\n  bb = \"${var.q}\"\n  c = { d = 2 }\n})",
    );
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "t.tftpl");
    assert_eq!(
        calls[0].1,
        ["a", "bb", "c"].iter().map(|s| s.to_string()).collect()
    );
    let vars = template_variables(
        "id = \"${id}\"\n%{ for k, v in items ~}\n${k}=${trimspace(v.pem)} ${m[v.r].x}\n%{ endfor ~}\n%{ if on ~}x%{ endif ~}\n$${shell} %%{ not }",
    );
    assert_eq!(
        vars,
        ["id", "items", "m", "on"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
