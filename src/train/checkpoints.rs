//! The checkpoint directory layout of a training run.
//!
//! ```text
//! OUT/LATEST                         "checkpoints/step-000000123"  (replaced atomically)
//! OUT/checkpoints/step-000000123/    config.json, model.safetensors, trainer_state.safetensors
//! OUT/metrics.jsonl, OUT/training_curves.svg, OUT/tensorboard/events.out.tfevents.*
//! ```
//!
//! A checkpoint directory is written completely (each file atomically, fsynced) before `LATEST` is
//! switched to it by an atomic rename, and older directories are removed only after that (renamed
//! out of the `step-N` namespace first, then deleted): a kill at any moment leaves the previous
//! checkpoint intact, `LATEST` pointing at a complete one, and no half-deleted `step-N`. A state
//! with a non-finite tensor is never written (the trainer checks first), so it can neither become
//! `LATEST` nor cause an older, finite checkpoint to be pruned.

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

/// The name prefix of a checkpoint directory being removed (see [`publish`]).
const PRUNING_PREFIX: &str = ".pruning-";

/// Points `LATEST` at `checkpoint` (relative to `run_dir`) and removes older checkpoints. Each is
/// first renamed to `.pruning-<name>` (atomic) and then deleted, so a kill during the deletion
/// leaves a directory that no longer looks like a checkpoint (the next publish finishes it).
pub(crate) fn publish(run_dir: &Path, checkpoint: &Path) -> Result<()> {
    let rel = checkpoint.strip_prefix(run_dir).unwrap_or(checkpoint);
    write_atomically(&run_dir.join(LATEST), format!("{}\n", rel.display()).as_bytes())?;
    let dir = run_dir.join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p == checkpoint {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let doomed = if name.starts_with(PRUNING_PREFIX) { p } else { dir.join(format!("{PRUNING_PREFIX}{name}")) };
            if doomed != entry.path() && std::fs::rename(entry.path(), &doomed).is_err() {
                continue;
            }
            let _ = std::fs::remove_dir_all(&doomed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint_dir(run: &Path, name: &str) -> PathBuf {
        let dir = run.join("checkpoints").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        dir
    }

    #[test]
    fn publishing_prunes_through_a_rename_and_finishes_an_interrupted_pruning() {
        let run = rankstack_nn::testing::ScratchDir::new("publish");
        let old = checkpoint_dir(&run, "step-000000001");
        // What a kill during an earlier pruning leaves: a renamed, partly deleted directory.
        let half = checkpoint_dir(&run, ".pruning-step-000000000");
        std::fs::remove_file(half.join(CONFIG_FILE)).unwrap();
        let new = checkpoint_dir(&run, "step-000000002");
        publish(&run, &new).unwrap();
        assert_eq!(latest_checkpoint(&run).unwrap().unwrap(), new);
        let left: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["step-000000002"]);
        assert!(!old.exists() && !half.exists());
    }
}
