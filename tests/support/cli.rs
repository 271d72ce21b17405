//! Running the `rankstack` binary in tests: success with its stdout, or a failure whose stderr is
//! exactly one line without panic output.

use std::process::{Command, Output};

/// Runs `rankstack args` (one rayon thread: the machine is shared).
pub fn rankstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstack"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run rankstack")
}

/// The standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with the output unless the command succeeded.
pub fn ok(args: &[&str]) -> String {
    let o = rankstack(args);
    assert!(o.status.success(), "{args:?} failed:\n{}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The one-line error of a failing command (exit code 1 or 2, no panic, no abort).
pub fn fails(args: &[&str]) -> String {
    let o = rankstack(args);
    assert!(!o.status.success(), "{args:?} should fail:\n{}", stdout(&o));
    assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: exit status {:?}:\n{}", o.status, stderr(&o));
    let err = stderr(&o);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?}: panic output:\n{err}");
    assert!(!err.contains("internal error"), "{args:?}: a bug, not a reported error:\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line:\n{err}");
    err
}
