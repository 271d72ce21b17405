//! `cargo xtask arm64-test`: the kernels, `rankstack-nn` and every layer crate (unit tests, the
//! PyTorch reference fixtures, doctests) cross-compiled for `aarch64-unknown-linux-gnu` and run
//! under QEMU's user-mode emulator, so that the portable path (no AVX; `RANKSTACK_CPU` has only
//! `generic` there) is checked on an arm64 instruction set from an x86 machine.
//!
//! Needs the Rust target (`rustup target add aarch64-unknown-linux-gnu`), a cross C compiler
//! and QEMU (Debian: `apt-get install -y gcc-aarch64-linux-gnu qemu-user`); it says which one is
//! missing. Builds into `target/aarch64` (about 5 minutes on 2 cores). Not part of `verify`:
//! it needs those system packages.

use std::process::{Command, Stdio};

use crate::{cargo, root, run, Result};

/// The crates whose tests run emulated: everything below the trainer and the CLI.
const CRATES: [&str; 6] =
    ["rankstack-kernels", "rankstack-nn", "dcnv2", "masknet", "sequence-transformer", "feature-encoders"];

fn present(program: &str, hint: &str) -> Result<()> {
    match Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("`{program}` is missing: {hint}")),
    }
}

/// `cargo xtask arm64-test`.
pub fn arm64_test(args: &[String]) -> Result<()> {
    if let Some(other) = args.first() {
        return Err(format!("arm64-test: unknown argument `{other}` (it takes none)"));
    }
    let target = "aarch64-unknown-linux-gnu";
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == target))
        .unwrap_or(false);
    if !installed {
        return Err(format!("the Rust target is missing: rustup target add {target}"));
    }
    present("aarch64-linux-gnu-gcc", "apt-get install -y gcc-aarch64-linux-gnu")?;
    present("qemu-aarch64", "apt-get install -y qemu-user")?;
    let mut cmd = cargo();
    cmd.args(["test", "--target", target])
        .arg("--target-dir")
        .arg(root().join("target/aarch64"))
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", "qemu-aarch64 -L /usr/aarch64-linux-gnu");
    for c in CRATES {
        cmd.args(["-p", c]);
    }
    run(&format!("test {} on {target} under qemu-aarch64", CRATES.join(", ")), &mut cmd)
}
