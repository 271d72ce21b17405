//! `fixtures/MANIFEST.json`: the sha256 of every generator source and every committed fixture.
//!
//! If a generator source changes without the fixtures being regenerated (or a fixture is edited by
//! hand), the manifest no longer matches and `verify` fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Result;

const MANIFEST: &str = "fixtures/MANIFEST.json";

fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn files_with_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            files_with_ext(&path, ext, out)?;
        } else if path.extension().is_some_and(|x| x == ext) {
            out.push(path);
        }
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// The generator's inputs: its Python sources and pinned requirements.
pub fn generator_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    files_with_ext(&root.join("reference/rankstack_ref"), "py", &mut files)?;
    files.push(root.join("reference/requirements.txt"));
    files.push(root.join("reference/requirements-no-deps.txt"));
    files.sort();
    Ok(files)
}

/// Every committed fixture file.
pub fn fixture_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    files_with_ext(dir, "safetensors", &mut files)?;
    files.sort();
    Ok(files)
}

fn current(root: &Path) -> Result<serde_json::Value> {
    let hash_all = |files: Vec<PathBuf>, base: &Path| -> Result<BTreeMap<String, String>> {
        files.iter().map(|f| Ok((relative(base, f), sha256(f)?))).collect()
    };
    let generator = hash_all(generator_sources(root)?, root)?;
    let fixtures_dir = root.join("fixtures");
    let fixtures = hash_all(fixture_files(&fixtures_dir)?, &fixtures_dir)?;
    Ok(serde_json::json!({ "generator": generator, "fixtures": fixtures }))
}

/// Rewrites the manifest from the current files.
pub fn write(root: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(&current(root)?).map_err(|e| e.to_string())? + "\n";
    std::fs::write(root.join(MANIFEST), text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    eprintln!("wrote {MANIFEST}");
    Ok(())
}

/// Fails, naming every stale entry, if the manifest does not match the current files.
pub fn check(root: &Path) -> Result<()> {
    let path = root.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{MANIFEST}: {e} (run `cargo xtask fixtures`)"))?;
    let recorded: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let now = current(root)?;
    let mut problems = Vec::new();
    for section in ["generator", "fixtures"] {
        let (old, new) = (&recorded[section], &now[section]);
        let (old, new) = (old.as_object().cloned().unwrap_or_default(), new.as_object().cloned().unwrap_or_default());
        for (name, hash) in &new {
            match old.get(name) {
                None => problems.push(format!("{section}: `{name}` is not in the manifest")),
                Some(h) if h != hash => {
                    problems.push(format!("{section}: `{name}` changed since the fixtures were generated"))
                }
                _ => {}
            }
        }
        for name in old.keys().filter(|k| !new.contains_key(*k)) {
            problems.push(format!("{section}: `{name}` is in the manifest but missing"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{MANIFEST} is stale (regenerate with `cargo xtask fixtures`):\n  {}", problems.join("\n  ")))
    }
}
