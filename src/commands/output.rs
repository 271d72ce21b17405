//! Where a command may write: never over a user's file unasked, never onto its own input.

use std::path::Path;

use rankstack_nn::{Error, Result};

/// Checks that `command` may write `out`: an existing file is refused unless `force` (the
/// `--force` flag), and `out` may never be one of `inputs` (writing scores over the data being
/// scored would destroy it), `--force` or not. The write itself must then be atomic
/// (`write_atomically`, or `ParquetWriter`'s temporary file and rename).
pub fn check_output(command: &str, out: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    let same_file = |input: &Path| match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some(input) = inputs.iter().find(|i| same_file(i)) {
        return Err(Error::input(
            command,
            "out",
            format!("{} is also an input ({}); choose another output file", out.display(), input.display()),
        ));
    }
    if out.is_dir() {
        return Err(Error::input(command, "out", format!("{} is a directory; give a file name", out.display())));
    }
    if !force && out.exists() {
        return Err(Error::input(
            command,
            "out",
            format!("{} already exists; pass --force to replace it", out.display()),
        ));
    }
    Ok(())
}
