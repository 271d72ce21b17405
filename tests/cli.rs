//! The `rankstack` binary's `--version` and `--help`.

use std::process::Command;

fn run(arg: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankstack")).arg(arg).output().expect("run rankstack");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn version_and_help() {
    let (ok, stdout) = run("--version");
    assert!(ok);
    assert_eq!(stdout.trim(), format!("rankstack {}", env!("CARGO_PKG_VERSION")));
    let (ok, stdout) = run("--help");
    assert!(ok);
    assert!(stdout.contains("Usage: rankstack") && stdout.contains("--version"), "{stdout}");
}

#[test]
fn unknown_arguments_fail_without_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_rankstack")).arg("--bogus").output().expect("run rankstack");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--bogus") && !stderr.contains("panicked"), "{stderr}");
}
