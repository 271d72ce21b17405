//! A temporary directory for one test, removed when the test ends.

use std::ops::Deref;
use std::path::Path;

/// A fresh, uniquely named directory under the system's temporary directory, named
/// `rankstack-<tag>-<random>`. It is removed when dropped, so a test run never leaves its files
/// behind. If the test fails (the thread is panicking), it is kept and its path printed, so the
/// failure can be inspected.
///
/// Derefs to [`Path`]: `dir.join("file")`, `&dir` where a `&Path` is expected.
///
/// ```
/// # use rankstack_nn::testing::ScratchDir;
/// let dir = ScratchDir::new("example");
/// std::fs::write(dir.join("a.txt"), b"x").unwrap();
/// let path = dir.to_path_buf();
/// drop(dir);
/// assert!(!path.exists());
/// ```
pub struct ScratchDir(Option<tempfile::TempDir>);

impl ScratchDir {
    /// Creates the directory; panics (this is test support) if the temporary directory is unusable.
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rankstack-{tag}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a scratch directory for {tag}: {e}"));
        Self(Some(dir))
    }
}

impl Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::thread::panicking() {
                let kept = dir.keep();
                eprintln!("the failed test's files are kept in {}", kept.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_removed_when_dropped_and_kept_when_the_test_fails() {
        let dir = ScratchDir::new("scratch-dir-test");
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        std::fs::write(dir.join("nested/file"), b"x").unwrap();
        let path = dir.to_path_buf();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("rankstack-scratch-dir-test-"));
        drop(dir);
        assert!(!path.exists());

        let kept = std::thread::spawn(|| {
            let dir = ScratchDir::new("scratch-dir-failed");
            let path = dir.to_path_buf();
            let _guard = dir;
            std::panic::panic_any(path);
        })
        .join()
        .unwrap_err();
        let kept = kept.downcast::<std::path::PathBuf>().unwrap();
        assert!(kept.is_dir(), "{}", kept.display());
        std::fs::remove_dir_all(*kept).unwrap();
    }
}
