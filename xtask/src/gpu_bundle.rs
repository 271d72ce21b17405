//! `cargo xtask gpu-bundle [DIR]` (and `cargo xtask gpu-bench [DIR]`, the same bundle): everything
//! the GPU checks need, built with the `cuda` feature on a machine without a GPU or a CUDA
//! installation and packed into `DIR` (default `.gpu/`, git-ignored): copy the workspace to a GPU
//! machine and run
//!
//! - `bash .gpu/run.sh`: the PyTorch reference tests of every layer crate on the GPU
//!   (`RANKSTACK_TEST_DEVICE=cuda`, see `rankstack_nn::testing::test_device`: forward values and
//!   all gradients against the committed fixtures, f64 and f32), the whole model's training step
//!   and evaluation on the GPU against the CPU (`tests/device.rs`), and the CLI (`rankstack train`,
//!   `eval`, `score` with `--device cuda` against `--device cpu`);
//! - `bash .gpu/bench.sh OUT`: `homefeed-bench` scoring and training on the GPU, rankstack
//!   (`examples/gpu_bench.rs`) against PyTorch eager and `torch.compile`
//!   (`reference/rankstack_ref/gpu_bench.py`) on the same GPU, one JSON line per measurement in
//!   `OUT/gpu-bench.jsonl`.
//!
//! How, without CUDA here:
//! 1. CUDA 13.0's compiler, headers and runtime from PyPI in a venv (`target/cuda-toolkit`), pinned
//!    to 13.0 so that the PTX loads on any driver from CUDA 13.0 on.
//! 2. candle's cudarc links the driver, cuBLAS(Lt), cuRAND and NVRTC. Their link stubs are built
//!    here: each library's symbols that cudarc uses, as empty functions, under the real soname; at
//!    run time the GPU machine's libraries (PyTorch's, found by `run.sh`) are loaded instead.
//! 3. `cargo test --features cuda --no-run --test reference --test device`, the `rankstack`
//!    binary and the `gpu_bench` example in `target/cuda`, for `CUDA_COMPUTE_CAP` (default 90:
//!    H100/H200).
//! 4. The binaries, stripped and xz-compressed (about 6 MB each), plus `run.sh` and `bench.sh`.

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

/// Sets up the environment of every script in the bundle.
const PRELUDE: &str = r#"#!/bin/bash
cd "$(dirname "$0")"
nvidia-smi -L
# CUDA's libraries: PyTorch's wheels where they are, else the system's.
L=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=$L:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
# The binaries read the fixtures from the workspace path they were built in.
WORKSPACE=@WORKSPACE@
if [ "$(cd .. && pwd)" != "$WORKSPACE" ]; then mkdir -p "$(dirname "$WORKSPACE")" && ln -sfn "$(cd .. && pwd)" "$WORKSPACE"; fi
for f in *.xz; do b=${f%.xz}; [ -x "$b" ] || { xz -dkf "$f" || python3 -c "import lzma; open('$b', 'wb').write(lzma.open('$f').read())"; chmod +x "$b"; }; done
export RUST_BACKTRACE=1
"#;

/// The GPU checks (written by `cargo xtask gpu-bundle`).
const RUNNER: &str = r#"
status=0
export RANKSTACK_TEST_DEVICE=cuda
for b in test-*; do
  [[ $b == *.xz ]] && continue
  # The device tests print what they compared.
  show=(); [[ $b == *device* ]] && show=(--nocapture)
  echo "=== $b"; timeout 600 ./"$b" --test-threads=1 "${show[@]}" || status=1
done
# The CLI on the GPU against the CPU: a short training run, then eval and score on both devices.
echo "=== CLI"
W=$(mktemp -d)
cli() { echo "+ rankstack $*"; timeout 300 ./rankstack "$@" || { echo "FAILED: rankstack $*"; status=1; }; }
cli data synthetic --rows 3000 --out $W/train.parquet
cli data synthetic --rows 1000 --stream 1 --out $W/eval.parquet
cli train --preset pinterest-homefeed --data $W/train.parquet --eval $W/eval.parquet --out $W/gpu --epochs 1 --batch-size 256 --device cuda --quiet
cli train --preset pinterest-homefeed --data $W/train.parquet --eval $W/eval.parquet --out $W/gpu-bf16 --epochs 1 --batch-size 256 --device cuda --precision bf16 --quiet
cli train --preset pinterest-homefeed --data $W/train.parquet --eval $W/eval.parquet --out $W/auto --max-steps 3 --batch-size auto --device cuda --quiet
grep '"kind":"memory"' $W/gpu/metrics.jsonl $W/auto/metrics.jsonl
grep -h '"kind":"train"' $W/gpu/metrics.jsonl | tail -1
for d in cpu cuda; do cli eval --checkpoint $W/gpu --data $W/eval.parquet --device $d > $W/eval-$d.txt; cat $W/eval-$d.txt; done
cli eval --checkpoint $W/gpu --data $W/eval.parquet --device cuda --weights bf16
for d in cpu cuda; do cli score --checkpoint $W/gpu --data $W/eval.parquet --out $W/score-$d.csv --device $d; done
python3 - "$W" <<'PY' || status=1
import csv, sys
w = sys.argv[1]
rows = {d: list(csv.reader(open(f"{w}/score-{d}.csv"))) for d in ("cpu", "cuda")}
assert rows["cpu"][0] == rows["cuda"][0] and len(rows["cpu"]) == len(rows["cuda"]) > 1
worst = max(abs(float(a) - float(b)) for ra, rb in zip(rows["cpu"][1:], rows["cuda"][1:]) for a, b in zip(ra[1:], rb[1:]))
print(f"score: CPU vs CUDA max |dp| = {worst:.3g} over {len(rows['cpu']) - 1} rows")
assert worst < 1e-4, worst
PY
exit $status
"#;

/// The GPU benchmark (written by `cargo xtask gpu-bundle`): `bash bench.sh OUT [PATTERN]` (only
/// the measurements whose command line matches the extended regular expression PATTERN, e.g.
/// `gpu_bench` for rankstack's side alone after a change).
const BENCH: &str = r#"
OUT=${1:-/tmp/gpu-bench}; mkdir -p "$OUT"; J="$OUT/gpu-bench.jsonl"; : > "$J"
ONLY=${2:-.}
D=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
./gpu_bench prepare "$D" | tee -a "$J" || exit 1
export PYTHONPATH=$(cd ../reference && pwd)
run() {
  grep -Eq -- "$ONLY" <<< "${*:2}" || return 0
  echo "+ ${*:2}" >&2; timeout "$1" "${@:2}" | tee -a "$J"
}
run 120 python3 -m rankstack_ref.gpu_bench check "$D"
run 120 ./gpu_bench infer "$D" f32
run 180 python3 -m rankstack_ref.gpu_bench infer "$D" eager-f32
run 120 ./gpu_bench train "$D" f32
run 180 python3 -m rankstack_ref.gpu_bench train "$D" eager-f32
run 180 ./gpu_bench parts "$D" f32
run 120 env RANKSTACK_ADAMW=tensors ./gpu_bench train "$D" f32
run 120 env RANKSTACK_DEVICE_ATTENTION=composed ./gpu_bench infer "$D" f32
run 120 ./gpu_bench infer "$D" bf16
run 180 python3 -m rankstack_ref.gpu_bench infer "$D" eager-bf16
run 120 ./gpu_bench train "$D" bf16
run 180 python3 -m rankstack_ref.gpu_bench train "$D" eager-bf16
run 120 ./gpu_bench infer "$D" tf32
run 180 python3 -m rankstack_ref.gpu_bench infer "$D" eager-tf32
run 300 python3 -m rankstack_ref.gpu_bench infer "$D" compile-f32
echo "results: $J"
"#;

/// The environment of every cargo command built with the `cuda` feature here: the toolkit's
/// compiler on the path, its root for candle's and cudarc's build scripts, the compute capability
/// (`CUDA_COMPUTE_CAP`, default 90: H100/H200), the target directory `target/cuda`, and the link
/// stubs' directory.
fn cuda_env(cuda: &Path) -> impl Fn(&mut Command) + '_ {
    let target = root().join("target/cuda");
    let stubs = target.join("link-stubs");
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let path = format!("{}:{}", cuda.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    move |cmd: &mut Command| {
        cmd.env("PATH", &path)
            .env("NVCC", cuda.join("bin/nvcc"))
            .env("CUDA_ROOT", cuda)
            .env("CUDA_PATH", cuda)
            .env("CUDA_HOME", cuda)
            .env("CUDA_COMPUTE_CAP", &compute_cap)
            .env("CUDARC_CUDA_VERSION", "13000")
            .env("CARGO_TARGET_DIR", &target)
            .env("LIBRARY_PATH", &stubs);
    }
}

/// `cargo xtask cuda-check`: the whole workspace with the `cuda` feature (every target: library,
/// binary, tests, examples, benches) through clippy with warnings denied, with the pinned
/// toolkit. It runs the build scripts (candle's and rankstack's CUDA kernels compiled to PTX by
/// `nvcc`) and type-checks every CUDA-gated line, so that the GPU build cannot rot on machines
/// without a GPU; it does not link or run anything (`gpu-bundle` does). `verify` runs it: about
/// 3 minutes on 2 cores from a fresh target directory (`target/cuda-check`), seconds when only the
/// workspace changed. When the toolkit's wheels cannot be installed (no network), it fails if
/// `required`, else says so and skips.
///
/// One part of candle's build is left out: the static library of its quantized and
/// mixture-of-experts kernels (`libmoe.a`, 15 sources compiled to machine code for the GPU), which
/// rankstack never calls and a check never links. It took 7 of the check's 10 minutes on 2 cores
/// (2026-12-06), so the check's `nvcc` ([`CHECK_NVCC`]) writes empty objects for it; every other
/// `nvcc` call, candle's PTX kernels and rankstack's own included, runs the real compiler.
/// `gpu-bundle` builds everything for real, in its own target directory.
pub fn cuda_check(required: bool) -> Result<()> {
    let cuda = match toolkit() {
        Ok(cuda) => cuda,
        Err(e) if !required => {
            eprintln!("==> skipping the cuda feature's check: no CUDA toolkit ({e})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let target = root().join("target/cuda-check");
    let nvcc = check_nvcc(&cuda, &target.join("toolkit"))?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--features", "cuda", "--", "-D", "warnings"]);
    cuda_env(&cuda)(&mut clippy);
    // Its own target directory: the build scripts do not notice a change of `nvcc`, so the
    // empty library must never reach `gpu-bundle`'s builds in `target/cuda`.
    clippy.env("NVCC", &nvcc).env("CARGO_TARGET_DIR", &target);
    run("cargo clippy --features cuda (warnings denied; compiles the CUDA kernels to PTX)", &mut clippy)
}

/// The `nvcc` of `cuda-check` (see [`cuda_check`]), with `@NVCC@` standing for the real one:
/// compilations to an object (`-c`) of candle-kernels' sources, and the archive made of them
/// (`--lib`), produce empty outputs; everything else is the real `nvcc`.
const CHECK_NVCC: &str = r#"#!/bin/sh
# Written by `cargo xtask cuda-check`: see `cuda_check` in xtask/src/gpu_bundle.rs.
out= ; mode= ; candle=
prev=
for a in "$@"; do
  case "$a" in
    -c) mode=object ;;
    --lib) mode=archive ;;
    */candle-kernels-*) candle=yes ;;
  esac
  [ "$prev" = "-o" ] && out=$a
  prev=$a
done
if [ -n "$candle" ] && [ -n "$out" ]; then
  case "$mode" in
    object) : > "$out"; exit 0 ;;
    archive) printf '!<arch>\n' > "$out"; exit 0 ;;
  esac
fi
exec "@NVCC@" "$@"
"#;

/// Writes [`CHECK_NVCC`] as `DIR/bin/nvcc`, with the toolkit's `include` and `lib` linked beside
/// it (candle's build derives the include directory from where `nvcc` lies); returns its path.
fn check_nvcc(cuda: &Path, dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for name in ["include", "lib"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        }
        std::os::unix::fs::symlink(cuda.join(name), &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    let nvcc = bin.join("nvcc");
    let script = CHECK_NVCC.replace("@NVCC@", &cuda.join("bin/nvcc").display().to_string());
    std::fs::write(&nvcc, script).map_err(|e| format!("{}: {e}", nvcc.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", nvcc.display()))?;
    Ok(nvcc)
}

/// `cargo xtask gpu-bundle [DIR]`.
pub fn gpu_bundle(args: &[String]) -> Result<()> {
    let out = root().join(args.first().map_or(".gpu", String::as_str));
    let cuda = toolkit()?;
    let target = root().join("target/cuda");
    let stubs = target.join("link-stubs");
    let env = cuda_env(&cuda);

    let mut lib = cargo();
    lib.args(["build", "--features", "cuda", "--lib"]);
    env(&mut lib);
    run("build the cuda feature (compiles candle's kernels; minutes)", &mut lib)?;
    link_stubs(&target, &stubs, &cuda)?;

    let mut build = cargo();
    build.args([
        "test",
        "--workspace",
        "--features",
        "cuda",
        "--no-run",
        "--test",
        "reference",
        "--test",
        "device",
        "--message-format=json",
    ]);
    env(&mut build);
    let mut executables = built("the reference and device tests with the cuda feature", &mut build)?;
    let mut build = cargo();
    build.args([
        "build",
        "--features",
        "cuda",
        "--bin",
        "rankstack",
        "--example",
        "gpu_bench",
        "--message-format=json",
    ]);
    env(&mut build);
    executables.extend(built("the rankstack binary and the gpu_bench example with the cuda feature", &mut build)?);
    // The integration tests' build lists the binary too.
    executables.sort();
    executables.dedup_by(|a, b| a.0 == b.0);

    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, exe) in &executables {
        let dest = out.join(name);
        std::fs::copy(exe, &dest).map_err(|e| format!("copy {exe}: {e}"))?;
        run(&format!("strip {name}"), Command::new("strip").arg(&dest))?;
        run(&format!("compress {name}"), Command::new("xz").args(["-6", "-f"]).arg(&dest))?;
    }
    let prelude = PRELUDE.replace("@WORKSPACE@", &root().display().to_string());
    for (file, body) in [("run.sh", RUNNER), ("bench.sh", BENCH)] {
        std::fs::write(out.join(file), format!("{prelude}{body}")).map_err(|e| format!("{file}: {e}"))?;
    }
    eprintln!(
        "==> {} binaries in {d}; on a GPU machine: bash {d}/run.sh (checks), bash {d}/bench.sh OUT (benchmark)",
        executables.len(),
        d = out.display()
    );
    Ok(())
}

/// Runs a cargo build with `--message-format=json` and returns its executables as (bundle name,
/// path): `test-<package>-<target>` for test binaries, the target's name otherwise.
fn built(what: &str, cmd: &mut Command) -> Result<Vec<(String, String)>> {
    eprintln!("==> build {what}");
    let output = cmd.current_dir(root()).output().map_err(|e| format!("cargo: {e}"))?;
    let messages: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    if !output.status.success() {
        // With JSON messages the compiler's errors are on stdout, rendered inside the JSON.
        let rendered: String = messages.iter().filter_map(|m| m["message"]["rendered"].as_str()).collect();
        return Err(format!("{what} failed:\n{rendered}{}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(messages
        .iter()
        .filter_map(|m| {
            let exe = m["executable"].as_str()?;
            let target = m["target"]["name"].as_str()?;
            let name = if m["profile"]["test"].as_bool() == Some(true) {
                // `path+file:///…/crates/masknet#0.1.0` → `masknet`;
                // `path+file:///…/main#rankstack@0.1.0` → `rankstack`
                let id = m["package_id"].as_str().unwrap_or("");
                let (path, version) = id.split_once('#').unwrap_or((id, ""));
                let package = match version.split_once('@') {
                    Some((name, _)) => name,
                    None => path.rsplit('/').next().unwrap_or("tests"),
                };
                format!("test-{package}-{target}")
            } else {
                target.to_string()
            };
            Some((name, exe.to_string()))
        })
        .collect())
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
        // cudarc, and rankstack-nn, which calls a few driver functions through it (device memory).
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| ["libcudarc-", "librankstack_nn-"].iter().any(|s| n.to_string_lossy().starts_with(s)))
        })
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
