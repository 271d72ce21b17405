//! Regenerating the reference fixtures with the pinned PyTorch venv, and comparing a fresh
//! regeneration with the committed files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};

use crate::{manifest, python_venv, root, run, Result};

/// The reference venv's Python.
pub fn venv_python() -> PathBuf {
    root().join("reference/.venv/bin/python")
}

/// Creates `reference/.venv` if missing and installs the pinned requirements into it, then the
/// packages of `reference/requirements-no-deps.txt` without their dependencies (torchrec: the
/// fixtures use a module of it that needs torch only, and its declared fbgemm-gpu is 2.7 GB that
/// does not load beside the pinned torch).
pub fn ensure_venv() -> Result<()> {
    python_venv("reference/.venv", "pinned reference requirements", &["-r", "reference/requirements.txt"])?;
    python_venv(
        "reference/.venv",
        "pinned reference packages without their dependencies",
        &["--no-deps", "-r", "reference/requirements-no-deps.txt"],
    )
    .map(drop)
}

fn generate_into(out: &Path) -> Result<()> {
    run(
        &format!("generate fixtures into {}", out.display()),
        Command::new(venv_python())
            .args(["-m", "rankstack_ref.generate"])
            .arg(out)
            .env("PYTHONPATH", root().join("reference")),
    )
}

/// `cargo xtask fixtures`.
pub fn regenerate() -> Result<()> {
    ensure_venv()?;
    let dir = root().join("fixtures");
    for old in manifest::fixture_files(&dir).unwrap_or_default() {
        std::fs::remove_file(&old).map_err(|e| format!("{}: {e}", old.display()))?;
    }
    generate_into(&dir)?;
    manifest::write(&root())
}

fn values(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f64>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        Dtype::F32 => {
            data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
        }
        Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect(),
        Dtype::I32 => {
            data.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
        }
        Dtype::U32 => {
            data.chunks_exact(4).map(|c| f64::from(u32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
        }
        Dtype::U8 => data.iter().map(|&b| f64::from(b)).collect(),
        Dtype::BOOL => data.iter().map(|&b| f64::from(b)).collect(),
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Differences between two fixture files: names, dtypes, shapes, metadata, and values beyond
/// `1e-12` (float64) or `1e-5` (float32) max-norm relative error. Exact equality is not expected:
/// a different CPU may use other BLAS kernels and sum in another order.
fn compare_file(committed: &Path, fresh: &Path) -> Result<Vec<String>> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let (a_bytes, b_bytes) = (read(committed)?, read(fresh)?);
    let a = SafeTensors::deserialize(&a_bytes).map_err(|e| format!("{}: {e}", committed.display()))?;
    let b = SafeTensors::deserialize(&b_bytes).map_err(|e| format!("{}: {e}", fresh.display()))?;
    let meta = |bytes: &[u8]| {
        SafeTensors::read_metadata(bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default()
    };
    let mut problems = Vec::new();
    if meta(&a_bytes) != meta(&b_bytes) {
        problems.push("metadata differs".to_string());
    }
    let names =
        |s: &SafeTensors| s.names().into_iter().map(str::to_string).collect::<std::collections::BTreeSet<String>>();
    if names(&a) != names(&b) {
        problems.push("tensor names differ".to_string());
        return Ok(problems);
    }
    for name in names(&a) {
        let (ta, tb) = (a.tensor(&name).map_err(|e| e.to_string())?, b.tensor(&name).map_err(|e| e.to_string())?);
        if ta.dtype() != tb.dtype() || ta.shape() != tb.shape() {
            problems.push(format!("`{name}`: dtype/shape differ"));
            continue;
        }
        let (va, vb) = (values(&ta)?, values(&tb)?);
        let scale = va.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = va.iter().zip(&vb).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        let rtol = if ta.dtype() == Dtype::F64 { 1e-12 } else { 1e-5 };
        if err > rtol * scale.max(f64::MIN_POSITIVE) {
            problems.push(format!("`{name}`: max abs difference {err:.3e} (scale {scale:.3e})"));
        }
    }
    Ok(problems)
}

/// Regenerates all fixtures into a temporary directory and compares them with the committed ones.
/// The directory is removed afterwards, also when generating or comparing fails.
pub fn compare_regenerated() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("rankstack-fixtures-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let outcome = regenerate_and_compare(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    outcome
}

fn regenerate_and_compare(tmp: &Path) -> Result<()> {
    generate_into(tmp)?;
    let committed_dir = root().join("fixtures");
    let rel = |base: &Path, files: Vec<PathBuf>| -> BTreeMap<String, PathBuf> {
        files.into_iter().map(|f| (f.strip_prefix(base).unwrap_or(&f).to_string_lossy().into_owned(), f)).collect()
    };
    let committed = rel(&committed_dir, manifest::fixture_files(&committed_dir)?);
    let fresh = rel(tmp, manifest::fixture_files(tmp)?);
    let mut problems = Vec::new();
    for name in committed.keys().filter(|k| !fresh.contains_key(*k)) {
        problems.push(format!("{name}: committed but no longer generated"));
    }
    for (name, path) in &fresh {
        match committed.get(name) {
            None => problems.push(format!("{name}: generated but not committed")),
            Some(old) => problems.extend(compare_file(old, path)?.into_iter().map(|p| format!("{name}: {p}"))),
        }
    }
    if problems.is_empty() {
        eprintln!("regenerated fixtures match the committed ones ({} files)", fresh.len());
        Ok(())
    } else {
        Err(format!("regenerated fixtures differ from the committed ones:\n  {}", problems.join("\n  ")))
    }
}
