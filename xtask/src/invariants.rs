//! The architecture's invariants (`docs/ARCHITECTURE.md`, "Invariants"), checked by `cargo xtask
//! verify` so that they cannot rot:
//!
//! 1. The crate graph, from `cargo metadata`: `rankstack-kernels` depends on no workspace crate;
//!    `rankstack-nn` only on the kernels; the four layer crates on those two and never on each
//!    other; `ranker-model` on the layer crates; only the top package (and `xtask`, on nothing)
//!    above it.
//! 2. `unsafe` only under `crates/kernels`: every other crate root carries
//!    `#![forbid(unsafe_code)]` (which the compiler enforces), and no other source file of the
//!    workspace mentions an `unsafe` block, fn or impl.
//! 3. Every layer crate has `tests/reference.rs` (its check against the PyTorch fixtures).
//! 4. Tensor values cross between host and device only through `rankstack_kernels::host_transfer`
//!    (which lists them): outside it, the CPU kernels and test code, no source file of the crates
//!    or of the top package calls candle's `to_vec*`/`to_scalar`, copies a tensor to another
//!    device (`to_device`), or builds a tensor from host values (`Tensor::new`/`from_vec`/
//!    `from_slice`/`from_iter`/`arange`) on a device other than a literal `Device::Cpu` on the
//!    same line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::Result;

/// The workspace crates each crate may depend on (normal and build dependencies; dev-dependencies
/// may also use `rankstack-nn`'s test support).
const ALLOWED: &[(&str, &[&str])] = &[
    ("rankstack-kernels", &[]),
    ("rankstack-nn", &["rankstack-kernels"]),
    ("dcnv2", &["rankstack-nn", "rankstack-kernels"]),
    ("masknet", &["rankstack-nn", "rankstack-kernels"]),
    ("feature-encoders", &["rankstack-nn", "rankstack-kernels"]),
    ("sequence-transformer", &["rankstack-nn", "rankstack-kernels"]),
    (
        "ranker-model",
        &["rankstack-nn", "rankstack-kernels", "dcnv2", "masknet", "feature-encoders", "sequence-transformer"],
    ),
    (
        "rankstack",
        &[
            "rankstack-nn",
            "rankstack-kernels",
            "dcnv2",
            "masknet",
            "feature-encoders",
            "sequence-transformer",
            "ranker-model",
        ],
    ),
    ("xtask", &[]),
];

/// The crates whose reference check against PyTorch lives in `tests/reference.rs`.
const LAYER_CRATES: &[&str] = &["dcnv2", "masknet", "feature-encoders", "sequence-transformer", "ranker-model"];

/// Runs every check; the error lists every violation.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = crate_graph(root)?;
    problems.extend(unsafe_code(root)?);
    problems.extend(direct_transfers(root)?);
    for name in LAYER_CRATES {
        if !root.join("crates").join(name).join("tests/reference.rs").is_file() {
            problems.push(format!("crates/{name} has no tests/reference.rs"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("architecture invariants violated:\n  - {}", problems.join("\n  - ")))
    }
}

/// Each workspace package's workspace dependencies (by kind), from `cargo metadata`.
fn crate_graph(root: &Path) -> Result<Vec<String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
    let packages = meta["packages"].as_array().ok_or_else(|| "cargo metadata: no packages".to_string())?;
    let members: BTreeSet<String> = packages.iter().filter_map(|p| p["name"].as_str().map(String::from)).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for name in &members {
        if !allowed.contains_key(name.as_str()) {
            problems
                .push(format!("workspace crate `{name}` has no place in the crate graph (xtask/src/invariants.rs)"));
        }
    }
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default();
        let Some(ok) = allowed.get(name) else { continue };
        for dep in p["dependencies"].as_array().into_iter().flatten() {
            let (dep_name, kind) = (dep["name"].as_str().unwrap_or_default(), dep["kind"].as_str());
            if !members.contains(dep_name) || dep_name == name {
                continue;
            }
            let test_support = kind == Some("dev") && dep_name == "rankstack-nn";
            if !ok.contains(&dep_name) && !test_support {
                problems.push(format!("`{name}` depends on `{dep_name}`, which the crate graph does not allow"));
            }
        }
    }
    Ok(problems)
}

/// Crate roots outside the kernels without `#![forbid(unsafe_code)]`, and `unsafe` code in any
/// Rust file outside `crates/kernels`.
fn unsafe_code(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["src", "xtask/src", "examples", "benches", "tests", "crates"] {
        collect_rust_files(&root.join(dir), &mut files)?;
    }
    for file in files {
        let rel = file.strip_prefix(root).unwrap_or(&file).to_string_lossy().replace('\\', "/");
        if rel.starts_with("crates/kernels/") {
            continue;
        }
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let code: String = text.lines().map(code_of_line).collect::<Vec<_>>().join("\n");
        for pattern in ["unsafe {", "unsafe fn", "unsafe impl", "unsafe extern"] {
            if code.contains(pattern) {
                problems.push(format!("{rel}: `{pattern}` outside crates/kernels"));
            }
        }
        let is_root = rel.ends_with("src/lib.rs") || rel.ends_with("src/main.rs");
        if is_root && !text.contains("#![forbid(unsafe_code)]") {
            problems.push(format!("{rel}: crate root without #![forbid(unsafe_code)]"));
        }
    }
    Ok(problems)
}

/// The files where tensor values may cross between host and device directly: the one place that
/// lists the transfers, the CPU kernels (CPU tensors only), the kernels' test oracle, and the test
/// support.
const DIRECT_TRANSFERS_ALLOWED: &[&str] = &[
    "crates/kernels/src/host_transfer.rs",
    "crates/kernels/src/cpu/",
    "crates/kernels/src/oracle.rs",
    "crates/nn/src/testing.rs",
];

/// Calls that read a tensor's values to the host.
const DIRECT_READS: &[&str] = &[
    ".to_vec0",
    ".to_vec1",
    ".to_vec2",
    ".to_vec3",
    ".to_scalar",
    "to_device(&Device::Cpu)",
    "to_device(&candle_core::Device::Cpu)",
];

/// Calls that place values on a tensor's device: a copy unless that device is the CPU.
const DIRECT_WRITES: &[&str] = &[
    "Tensor::new(",
    "Tensor::from_vec(",
    "Tensor::from_slice(",
    "Tensor::from_iter(",
    "Tensor::arange(",
    ".to_device(",
];

/// Direct transfers (`DIRECT_READS`, and `DIRECT_WRITES` without a literal `Device::Cpu` on the
/// line) in the library code of `src/` and the crates, outside `DIRECT_TRANSFERS_ALLOWED` and
/// outside `#[cfg(test)]` modules.
fn direct_transfers(root: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    collect_rust_files(&root.join("src"), &mut files)?;
    let crates = root.join("crates");
    if crates.is_dir() {
        for entry in std::fs::read_dir(&crates).map_err(|e| format!("{}: {e}", crates.display()))? {
            let dir = entry.map_err(|e| format!("{}: {e}", crates.display()))?.path();
            collect_rust_files(&dir.join("src"), &mut files)?;
        }
    }
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        let rel = file.strip_prefix(root).unwrap_or(&file).to_string_lossy().replace('\\', "/");
        if DIRECT_TRANSFERS_ALLOWED.iter().any(|allowed| rel.starts_with(allowed)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut previous = "";
        for (number, line) in text.lines().enumerate() {
            if previous.trim() == "#[cfg(test)]" && line.trim_start().starts_with("mod ") {
                break;
            }
            previous = line;
            let code = code_of_line(line);
            if let Some(call) = DIRECT_READS.iter().find(|p| code.contains(*p)) {
                problems.push(format!(
                    "{rel}:{}: `{call}` reads a tensor to the host; use rankstack_nn::host_transfer",
                    number + 1
                ));
            } else if let Some(call) = DIRECT_WRITES.iter().find(|p| calls(&code, p)) {
                if call.starts_with('.') || !code.contains("Device::Cpu") {
                    problems.push(format!(
                        "{rel}:{}: `{call}` places values on a device; use rankstack_nn::host_transfer",
                        number + 1
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// Whether `code` calls `pattern`: for a path (`Tensor::new(`), not as the tail of a longer name
/// (`HostTensor::new(`).
fn calls(code: &str, pattern: &str) -> bool {
    code.match_indices(pattern).any(|(at, _)| {
        pattern.starts_with('.') || !code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// A line without its comment and the contents of its string literals (a crude lexer: enough for
/// the patterns searched here, which never span lines).
fn code_of_line(line: &str) -> String {
    let mut out = String::new();
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '/' if chars.peek() == Some(&'/') => break,
            '"' => in_string = true,
            _ => out.push(c),
        }
    }
    out
}

fn collect_rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect_rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_keeps_its_invariants() {
        check(&crate::root()).unwrap();
    }

    /// A scratch source tree of `files` (path, text) under the temporary directory, named `name`.
    fn scratch_tree(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rankstack-{name}-{}", std::process::id()));
        for (rel, text) in files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn direct_transfers_outside_host_transfer_and_tests_are_found() {
        let dir = scratch_tree(
            "host-transfers",
            &[
                ("crates/kernels/src/host_transfer.rs", "fn r(t: &Tensor) { t.to_vec1::<f32>(); }\n"),
                ("crates/kernels/src/cpu/a.rs", "fn r(t: &Tensor, d: &Device) { t.to_scalar::<f32>(); Tensor::new(1f32, d); }\n"),
                (
                    "crates/masknet/src/lib.rs",
                    "/// t.to_vec2()\nfn f(t: &Tensor) { let s = \".to_scalar\"; }\n#[cfg(test)]\nmod tests { fn g(t: &Tensor) { t.to_vec1::<f32>(); } }\n",
                ),
                ("crates/dcnv2/src/cross.rs", "fn f(t: &Tensor) {\n    let v = t.to_vec1::<f32>();\n}\n"),
                ("crates/kernels/src/rows.rs", "fn f(d: &Device) { Tensor::from_vec(vec![1u32], 1, d); }\n"),
                (
                    "src/serve/x.rs",
                    "fn f(t: &Tensor, d: &Device) {\n    t.to_device(&candle_core::Device::Cpu);\n    t.to_device(d);\n    \
                     Tensor::from_slice(&[1f32], 1, &Device::Cpu);\n    Tensor::arange(0u32, 4, d);\n    HostTensor::new(d);\n}\n",
                ),
            ],
        );
        let problems = direct_transfers(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let use_it = "use rankstack_nn::host_transfer";
        assert_eq!(
            problems,
            [
                format!("crates/dcnv2/src/cross.rs:2: `.to_vec1` reads a tensor to the host; {use_it}"),
                format!("crates/kernels/src/rows.rs:1: `Tensor::from_vec(` places values on a device; {use_it}"),
                format!(
                    "src/serve/x.rs:2: `to_device(&candle_core::Device::Cpu)` reads a tensor to the host; {use_it}"
                ),
                format!("src/serve/x.rs:3: `.to_device(` places values on a device; {use_it}"),
                format!("src/serve/x.rs:5: `Tensor::arange(` places values on a device; {use_it}"),
            ]
        );
    }

    #[test]
    fn unsafe_code_outside_the_kernels_and_a_missing_forbid_are_found() {
        let dir = scratch_tree(
            "invariants",
            &[
                ("crates/kernels/src/lib.rs", "pub fn f() { unsafe {} }"),
                ("crates/masknet/src/lib.rs", "#![forbid(unsafe_code)]\n// unsafe { in a comment }\n"),
                ("crates/dcnv2/src/lib.rs", "pub fn g() {}\n"),
                ("src/lib.rs", "#![forbid(unsafe_code)]\nfn h() { unsafe { } }\n"),
            ],
        );
        let mut problems = unsafe_code(&dir).unwrap();
        problems.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            problems,
            vec![
                "crates/dcnv2/src/lib.rs: crate root without #![forbid(unsafe_code)]".to_string(),
                "src/lib.rs: `unsafe {` outside crates/kernels".to_string(),
            ],
        );
    }
}
