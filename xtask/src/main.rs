//! Project automation: `cargo xtask <command>`.
//!
//! - `verify`: everything CI checks — formatting, clippy with warnings denied, all tests, the doc
//!   build, the `cuda` feature's check (`cuda-check`), the fixture manifest's freshness, and (when
//!   the reference venv exists) a regeneration of every fixture into a temporary directory compared
//!   with the committed ones; and first the architecture invariants (`invariants`).
//! - `invariants`: only the architecture invariants: the crate graph from `cargo metadata`, `unsafe`
//!   only in `crates/kernels`, a `tests/reference.rs` in every layer crate (`xtask/src/invariants.rs`).
//! - `fixtures`: creates the reference venv (`reference/.venv`, pinned `reference/requirements.txt`)
//!   if needed, regenerates `fixtures/` and rewrites `fixtures/MANIFEST.json`.
//! - `venv`: only creates (or updates) the reference venv, for scripts that run the PyTorch reference.
//! - `tensorboard-venv`: only creates (or updates) `target/tensorboard-venv`, the pinned TensorBoard
//!   that `tests/observability.rs` reads the trainer's event files with (`verify` creates it first).
//! - `bench-compare [--rounds N] [--threads T]`: the `homefeed-bench` model in rankstack and in
//!   PyTorch, outputs checked to agree, then timed side by side (see `docs/performance.md`).
//! - `cuda-check`: clippy (warnings denied) over the whole workspace with the `cuda` feature and the
//!   pinned CUDA toolkit wheels: candle's kernels compiled to PTX, every CUDA-gated line checked,
//!   nothing linked or run; no GPU needed (`xtask/src/gpu_bundle.rs`).
//! - `gpu-bundle [DIR]` (alias `gpu-bench`): the reference tests, the device tests, the CLI and the
//!   GPU benchmark built with the `cuda` feature (no GPU or CUDA needed here), packed with `run.sh`
//!   (checks) and `bench.sh` (benchmark against PyTorch) into `DIR` (default `.gpu/`).
//! - `manifest`: rewrites `fixtures/MANIFEST.json` from the current files (after a deliberate change).
//! - `serve-venv`: creates (or updates) `target/serve-venv` with the pinned Python Triton client
//!   that `tests/serve.rs` drives `rankstack serve` with (`verify` makes it before the tests).
//! - `serve-bench [--seconds S] [--weights f32|bf16] [--no-pytorch] [--pin-threads]`:
//!   `rankstack serve` under `wrk` at 1, 64 and 512 candidates per request, against a PyTorch
//!   FastAPI baseline (see `docs/serving.md`).
//! - `arm64-test`: the kernels and the layer crates' tests cross-compiled for arm64 and run under
//!   QEMU (needs `gcc-aarch64-linux-gnu` and `qemu-user`; see `xtask/src/arm64_test.rs`).

#![forbid(unsafe_code)]

mod arm64_test;
mod bench_compare;
mod fixtures;
mod gpu_bundle;
mod invariants;
mod manifest;
mod serve_bench;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("verify") => verify(),
        Some("fixtures") => fixtures::regenerate(),
        Some("venv") => fixtures::ensure_venv(),
        Some("tensorboard-venv") => tensorboard_venv(),
        Some("bench-compare") => bench_compare::bench_compare(&args[1..]),
        Some("gpu-bundle" | "gpu-bench") => gpu_bundle::gpu_bundle(&args[1..]),
        Some("manifest") => manifest::write(&root()),
        Some("invariants") => invariants::check(&root()),
        Some("serve-venv") => serve_venv().map(|_| ()),
        Some("serve-bench") => serve_bench::serve_bench(&args[1..]),
        Some("arm64-test") => arm64_test::arm64_test(&args[1..]),
        Some("cuda-check") => gpu_bundle::cuda_check(true),
        _ => {
            eprintln!(
                "usage: cargo xtask <verify|invariants|fixtures|venv|tensorboard-venv|serve-venv|bench-compare|cuda-check|gpu-bundle|gpu-bench|serve-bench|arm64-test|manifest>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command in the workspace root, failing with its description if it fails.
pub fn run(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {what}");
    let status = cmd.current_dir(root()).status().map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// A Python venv at `dir` (relative to the workspace root), created with `$PYTHON` (default
/// `python3`) if missing, with `pip install <packages>` run in it; returns its Python.
pub fn python_venv(dir: &str, what: &str, packages: &[&str]) -> Result<PathBuf> {
    let python = root().join(dir).join("bin/python");
    if !python.exists() {
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        run(&format!("create {dir}"), Command::new(system).args(["-m", "venv", dir]))?;
    }
    run(&format!("install {what}"), Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(packages))?;
    Ok(python)
}

/// The pinned TensorBoard venv the tests read event files with (small: no TensorFlow, no torch).
fn tensorboard_venv() -> Result<()> {
    python_venv("target/tensorboard-venv", "TensorBoard", &["-r", "xtask/tensorboard-requirements.txt"]).map(|_| ())
}

/// The venv of `tests/serve.rs`: the Python Triton HTTP client (pinned; its dependencies,
/// numpy among them, resolved by pip).
fn serve_venv() -> Result<PathBuf> {
    python_venv("target/serve-venv", "the Triton HTTP client", &["tritonclient[http]==2.73.0"])
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

fn verify() -> Result<()> {
    run("cargo fmt --check", cargo().args(["fmt", "--all", "--", "--check"]))?;
    eprintln!("==> architecture invariants (crate graph, unsafe only in crates/kernels, reference tests)");
    invariants::check(&root())?;
    run(
        "cargo clippy (warnings denied)",
        cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    )?;
    tensorboard_venv()?;
    // tests/serve.rs drives the server with the real Triton client; CI must have it.
    if let Err(e) = serve_venv() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err(e);
        }
        eprintln!("==> no serve venv ({e}): tests/serve.rs will skip the tritonclient test");
    }
    run("cargo test", cargo().args(["test", "--workspace"]))?;
    run("cargo doc", cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"))?;
    // The GPU build must not rot where there is no GPU; CI must have the toolkit (from PyPI).
    gpu_bundle::cuda_check(std::env::var("CI").is_ok_and(|v| v == "true"))?;
    eprintln!("==> fixture manifest");
    manifest::check(&root())?;
    eprintln!("fixture manifest is fresh");
    if fixtures::venv_python().exists() {
        fixtures::compare_regenerated()?;
    } else {
        eprintln!("==> skipping fixture regeneration: no reference venv (create it with `cargo xtask fixtures`)");
    }
    eprintln!("verify: all checks passed");
    Ok(())
}
