//! The module boundaries, read from the source: the contexts never import each other, the layers
//! below them (kernel, web kit, messaging, db, ops, contracts) import no context, and only the
//! wiring (`app`, `lib.rs`, `main.rs`) imports one.

use std::path::{Path, PathBuf};

const CONTEXTS: [&str; 2] = ["orders", "payments"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names through `crate::...` paths, `use crate::{a, b}` included.
fn imported_modules(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut modules = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
            None => vec![rest],
        };
        for name in names {
            let name: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                modules.push(name);
            }
        }
    }
    modules
}

#[test]
fn only_the_wiring_imports_a_context() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut breaches = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        let wiring = matches!(top, "app" | "lib" | "main");
        for module in imported_modules(&std::fs::read_to_string(file).unwrap()) {
            if CONTEXTS.contains(&module.as_str()) && module != top && !wiring {
                breaches.push(format!("{} imports {module}", relative.display()));
            }
        }
    }
    assert!(files.len() > 20, "read the source tree");
    assert!(breaches.is_empty(), "boundary breaches: {breaches:#?}");
}

#[test]
fn the_check_sees_an_import() {
    assert_eq!(
        imported_modules("use crate::orders::api;\nuse crate::{payments, web::error};"),
        ["orders", "payments", "web"]
    );
    assert!(imported_modules("// use crate::orders;").is_empty());
}
