//! `cargo xtask gpu-bundle [DIR]`: the PyTorch reference tests of every layer crate, built with
//! the `cuda` feature on a machine without a GPU or a CUDA installation, packed into `DIR`
//! (default `.gpu/`, git-ignored) with a runner: copy the workspace to a GPU machine and run
//! `bash .gpu/run.sh`. The tests then build every layer on the GPU (`RANKSTACK_TEST_DEVICE=cuda`,
//! see `rankstack_nn::testing::test_device`) and check forward values and all gradients against
//! the committed fixtures, in f64 and f32.
//!
//! How, without CUDA here:
//! 1. CUDA 13.0's compiler, headers and runtime from PyPI in a venv (`target/cuda-toolkit`), pinned
//!    to 13.0 so that the PTX loads on any driver from CUDA 13.0 on.
//! 2. candle's cudarc links the driver, cuBLAS(Lt), cuRAND and NVRTC. Their link stubs are built
//!    here: each library's symbols that cudarc uses, as empty functions, under the real soname; at
//!    run time the GPU machine's libraries (PyTorch's, found by `run.sh`) are loaded instead.
//! 3. `cargo test --features cuda --no-run --test reference` in `target/cuda`, for
//!    `CUDA_COMPUTE_CAP` (default 90: H100/H200).
//! 4. The test binaries, stripped and xz-compressed (about 6 MB each), plus `run.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, python_venv, root, run, Result};

/// The PyPI wheels of the CUDA 13.0 compiler (its front end, NVVM, headers and runtime).
const TOOLKIT: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

/// The libraries cudarc links, as (symbol prefix, soname), most specific prefix first; the driver
/// API's functions are `cu` followed by a capital (`cuMemAlloc_v2`).
const LINKED: [(&str, &str); 5] = [
    ("cublasLt", "libcublasLt.so.13"),
    ("cublas", "libcublas.so.13"),
    ("curand", "libcurand.so.10"),
    ("nvrtc", "libnvrtc.so.13"),
    ("cu", "libcuda.so.1"),
];

/// The soname of the library in [`LINKED`] that defines `symbol`, if any.
fn owner(symbol: &str) -> Option<&'static str> {
    LINKED.iter().find_map(|&(prefix, soname)| {
        let rest = symbol.strip_prefix(prefix)?;
        (prefix != "cu" || rest.starts_with(|c: char| c.is_ascii_uppercase())).then_some(soname)
    })
}

const RUNNER: &str = r#"#!/bin/bash
# Runs the PyTorch reference tests of every layer crate on the GPU (written by `cargo xtask gpu-bundle`).
cd "$(dirname "$0")"
nvidia-smi -L
# CUDA's libraries: PyTorch's wheels where they are, else the system's.
L=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=$L:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
# The binaries read the fixtures from the workspace path they were built in.
WORKSPACE=@WORKSPACE@
if [ "$(cd .. && pwd)" != "$WORKSPACE" ]; then mkdir -p "$(dirname "$WORKSPACE")" && ln -sfn "$(cd .. && pwd)" "$WORKSPACE"; fi
export RANKSTACK_TEST_DEVICE=cuda RUST_BACKTRACE=1
status=0
for f in *.xz; do
  b=${f%.xz}; xz -dkf "$f" || python3 -c "import lzma; open('$b', 'wb').write(lzma.open('$f').read())"; chmod +x "$b"
  echo "=== $b"; timeout 600 ./"$b" --test-threads=1 || status=1
done
exit $status
"#;

/// `cargo xtask gpu-bundle [DIR]`.
pub fn gpu_bundle(args: &[String]) -> Result<()> {
    let out = root().join(args.first().map_or(".gpu", String::as_str));
    let cuda = toolkit()?;
    let target = root().join("target/cuda");
    let stubs = target.join("link-stubs");
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let path = format!("{}:{}", cuda.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let env = |cmd: &mut Command| {
        cmd.env("PATH", &path)
            .env("NVCC", cuda.join("bin/nvcc"))
            .env("CUDA_ROOT", &cuda)
            .env("CUDA_PATH", &cuda)
            .env("CUDA_HOME", &cuda)
            .env("CUDA_COMPUTE_CAP", &compute_cap)
            .env("CUDARC_CUDA_VERSION", "13000")
            .env("CARGO_TARGET_DIR", &target)
            .env("LIBRARY_PATH", &stubs);
    };

    let mut lib = cargo();
    lib.args(["build", "--features", "cuda", "--lib"]);
    env(&mut lib);
    run("build the cuda feature (compiles candle's kernels; minutes)", &mut lib)?;
    link_stubs(&target, &stubs, &cuda)?;

    let mut tests = cargo();
    tests.args([
        "test",
        "--workspace",
        "--features",
        "cuda",
        "--no-run",
        "--test",
        "reference",
        "--message-format=json",
    ]);
    env(&mut tests);
    eprintln!("==> build the reference tests with the cuda feature");
    let output = tests.current_dir(root()).output().map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !output.status.success() {
        // With JSON messages the compiler's errors are on stdout, rendered inside the JSON.
        let rendered: String = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m["message"]["rendered"].as_str().map(str::to_string))
            .collect();
        return Err(format!("cargo test --no-run failed:\n{rendered}{}", String::from_utf8_lossy(&output.stderr)));
    }
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut bundled = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(id)) = (message["executable"].as_str(), message["package_id"].as_str()) else { continue };
        // `path+file:///…/crates/masknet#0.1.0` → `masknet`
        let package = id.split('#').next().and_then(|p| p.rsplit('/').next()).unwrap_or("tests");
        let dest = out.join(package);
        std::fs::copy(exe, &dest).map_err(|e| format!("copy {exe}: {e}"))?;
        run(&format!("strip {package}"), Command::new("strip").arg(&dest))?;
        run(&format!("compress {package}"), Command::new("xz").args(["-6", "-f"]).arg(&dest))?;
        bundled += 1;
    }
    let runner = RUNNER.replace("@WORKSPACE@", &root().display().to_string());
    std::fs::write(out.join("run.sh"), runner).map_err(|e| format!("run.sh: {e}"))?;
    eprintln!("==> {bundled} test binaries in {}; on a GPU machine: bash {}/run.sh", out.display(), out.display());
    Ok(())
}

/// The CUDA 13.0 toolkit from PyPI (created on first use); returns its root (`…/nvidia/cu13`).
fn toolkit() -> Result<PathBuf> {
    python_venv("target/cuda-toolkit", "the pinned CUDA 13.0 compiler wheels", &TOOLKIT)?;
    let lib = root().join("target/cuda-toolkit/lib");
    let site = std::fs::read_dir(&lib)
        .map_err(|e| format!("{}: {e}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("site-packages/nvidia/cu13")))
        .find(|p| p.join("bin/nvcc").exists())
        .ok_or_else(|| format!("no nvidia/cu13/bin/nvcc under {}", lib.display()))?;
    Ok(site)
}

/// Link stubs for every library in [`LINKED`] (symbols read from the compiled cudarc), plus
/// `libcudart.so` from the toolkit (candle's statically built kernels call it).
fn link_stubs(target: &Path, stubs: &Path, cuda: &Path) -> Result<()> {
    let deps = target.join("debug/deps");
    let rlibs: Vec<PathBuf> = std::fs::read_dir(&deps)
        .map_err(|e| format!("{}: {e}", deps.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libcudarc-")))
        .filter(|p| p.extension().is_some_and(|x| x == "rlib"))
        .collect();
    if rlibs.is_empty() {
        return Err("no compiled cudarc: did the cuda build run?".into());
    }
    let nm = Command::new("nm").args(["-u", "--no-sort"]).args(&rlibs).output().map_err(|e| format!("nm: {e}"))?;
    // `nm -u` lists each undefined symbol as `U name` (member headers end with a colon).
    let mut symbols: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["U", name] if owner(name).is_some() => Some(name.to_string()),
            _ => None,
        })
        .collect();
    symbols.sort();
    symbols.dedup();
    std::fs::create_dir_all(stubs).map_err(|e| format!("{}: {e}", stubs.display()))?;
    for (_, soname) in LINKED {
        let own: Vec<&String> = symbols.iter().filter(|s| owner(s) == Some(soname)).collect();
        let source = stubs.join(format!("{soname}.c"));
        let body: String = own.iter().map(|s| format!("void {s}(void) {{}}\n")).collect();
        std::fs::write(&source, body).map_err(|e| format!("{}: {e}", source.display()))?;
        let name = soname.split(".so").next().expect("a soname");
        run(
            &format!("link stub {soname} ({} symbols)", own.len()),
            Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(stubs.join(format!("{name}.so")))
                .arg(format!("-Wl,-soname,{soname}"))
                .arg(&source),
        )?;
    }
    let cudart = cuda.join("lib/libcudart.so.13");
    let link = stubs.join("libcudart.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&cudart, &link).map_err(|e| format!("{}: {e}", link.display()))
}
