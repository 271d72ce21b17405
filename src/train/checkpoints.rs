//! The checkpoint directory layout of a training run.
//!
//! ```text
//! OUT/LATEST                         "checkpoints/step-000000123"  (replaced atomically)
//! OUT/checkpoints/step-000000123/    config.json, model.safetensors, trainer_state.safetensors
//! OUT/metrics.jsonl, OUT/training_curves.svg, OUT/tensorboard/events.out.tfevents.*
//! ```
//!
//! A checkpoint directory is written completely (each file atomically, fsynced) before `LATEST` is
//! switched to it by an atomic rename, and older directories are removed only after that: a kill at
//! any moment leaves the previous checkpoint intact and `LATEST` pointing at a complete one.

use std::path::{Path, PathBuf};

use ranker_model::checkpoint::{write_atomically, CONFIG_FILE};
use rankstack_nn::{Error, Result};

/// The pointer file of a run directory.
pub const LATEST: &str = "LATEST";

/// The checkpoint `LATEST` points to in a run directory, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = run_dir.join(LATEST);
    match std::fs::read_to_string(&pointer) {
        Ok(rel) => Ok(Some(run_dir.join(rel.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: pointer.display().to_string(), source }),
    }
}

/// Accepts either a checkpoint directory (holding `config.json`) or a run directory (holding
/// `LATEST`), and returns the checkpoint directory.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    match latest_checkpoint(path)? {
        Some(dir) => Ok(dir),
        None => Err(Error::input(
            "checkpoint",
            path.display().to_string(),
            "is neither a checkpoint (no config.json) nor a training run (no LATEST)",
        )),
    }
}

/// Points `LATEST` at `checkpoint` (relative to `run_dir`) and removes older checkpoints.
pub(crate) fn publish(run_dir: &Path, checkpoint: &Path) -> Result<()> {
    let rel = checkpoint.strip_prefix(run_dir).unwrap_or(checkpoint);
    write_atomically(&run_dir.join(LATEST), format!("{}\n", rel.display()).as_bytes())?;
    let dir = run_dir.join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p != checkpoint {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(())
}
