//! rankstack's CUDA kernels (`cuda/*.cu`) run on the CPU, for the tests: each kernel's test
//! launches it here with the launch shape of its CUDA launch ([`crate::launch_shape`]) and
//! compares what it wrote with the kernel's CPU mirror, bit for bit. So every kernel's indexing,
//! bounds and order of arithmetic are tested on every machine, with or without a GPU (on a GPU
//! `tests/device.rs` compares the real launches with the CPU as well).
//!
//! `cuda/host/runner.cpp` compiles the kernels as C++ with `cuda/host/cuda_on_host.h` (the CUDA
//! built-ins they use, for the host) and runs one launch: each CUDA thread is a fiber, a block's
//! threads meet at every `__syncthreads()`, and every buffer lies between two inaccessible pages,
//! so a read or write past either end of a buffer kills the launch instead of passing unnoticed.
//! A launch whose arguments do not match the kernel's parameter types, in number, kind and order,
//! is refused before it runs. The runner is compiled once per test binary with the machine's C++
//! compiler (`$CXX`, else `c++`; C++17).
//!
//! What this does not test: the CUDA launch code itself (cudarc's argument passing, device memory)
//! and the GPU's own arithmetic (nvcc's code generation); `tests/device.rs` does, on a GPU.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::launch_shape::LaunchShape;

/// One argument of a launch, in the kernel's parameter order: a buffer (read before the launch,
/// written back after it) or a scalar.
pub(crate) enum Arg<'a> {
    F32s(&'a mut [f32]),
    F64s(&'a mut [f64]),
    U32s(&'a mut [u32]),
    F32(f32),
    U32(u32),
    U64(u64),
}

/// The runner's sources: the test binary is rebuilt when they change, and the runner with it.
const SOURCES: [(&str, &str); 11] = [
    ("host/runner.cpp", include_str!("../cuda/host/runner.cpp")),
    ("host/cuda_on_host.h", include_str!("../cuda/host/cuda_on_host.h")),
    ("adamw.cu", include_str!("../cuda/adamw.cu")),
    ("bias_add.cu", include_str!("../cuda/bias_add.cu")),
    ("block_sum.cuh", include_str!("../cuda/block_sum.cuh")),
    ("embedding_bag.cu", include_str!("../cuda/embedding_bag.cu")),
    ("layer_norm.cu", include_str!("../cuda/layer_norm.cu")),
    ("overwrite_rows.cu", include_str!("../cuda/overwrite_rows.cu")),
    ("packed_attention.cu", include_str!("../cuda/packed_attention.cu")),
    ("segment_sum.cu", include_str!("../cuda/segment_sum.cu")),
    ("sum_of_squares.cu", include_str!("../cuda/sum_of_squares.cu")),
];

fn cuda_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda")
}

/// The compiled runner, built once per source version under the build script's `OUT_DIR`.
fn runner() -> &'static Path {
    static RUNNER: OnceLock<PathBuf> = OnceLock::new();
    RUNNER.get_or_init(|| {
        let mut hasher = DefaultHasher::new();
        SOURCES.hash(&mut hasher);
        let dir = Path::new(env!("OUT_DIR")).join("cuda-on-host");
        std::fs::create_dir_all(&dir).expect("create the runner's directory");
        let runner = dir.join(format!("runner-{:016x}", hasher.finish()));
        if runner.exists() {
            return runner;
        }
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        // Compiled to a private name and renamed: test binaries running at once never see half a
        // runner.
        let partial = dir.join(format!("runner.{}.partial", std::process::id()));
        let output = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unknown-pragmas",
                "-o",
            ])
            .arg(&partial)
            .arg(cuda_dir().join("host/runner.cpp"))
            .output()
            .unwrap_or_else(|e| {
                panic!("the CUDA kernels' host tests need a C++17 compiler ({cxx}: {e}); install g++ or set CXX")
            });
        assert!(
            output.status.success(),
            "{cxx} could not compile cuda/host/runner.cpp:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&partial, &runner).expect("move the runner into place");
        runner
    })
}

/// The kernels the runner knows, by name.
pub(crate) fn runner_kernels() -> Vec<String> {
    let output = Command::new(runner()).arg("--list").output().expect("run the runner");
    assert!(output.status.success(), "runner --list failed");
    String::from_utf8(output.stdout).expect("kernel names").lines().map(str::to_string).collect()
}

/// Every `extern "C" __global__` kernel of `cuda/*.cu`, by name.
pub(crate) fn kernels_in_sources() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(cuda_dir()).expect("read cuda/") {
        let path = entry.expect("a cuda/ entry").path();
        if path.extension().is_some_and(|e| e == "cu") {
            let text = std::fs::read_to_string(&path).expect("read a kernel source");
            for declaration in text.split("extern \"C\" __global__ void ").skip(1) {
                let name = declaration.split('(').next().expect("a kernel's name").trim();
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    names
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

fn read_back<T, const N: usize>(values: &mut [T], bytes: &[u8], from: fn([u8; N]) -> T) {
    assert_eq!(bytes.len(), values.len() * N, "the runner wrote back a buffer of another size");
    for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(N)) {
        *v = from(chunk.try_into().expect("N bytes"));
    }
}

/// Runs `kernel` over `shape` with `args` on the CPU and writes what it left in each buffer back
/// into the buffer. An error is the runner's refusal (a launch that does not match the kernel) or
/// its death (a kernel that touched memory outside its buffers), in words.
pub(crate) fn launch(kernel: &str, shape: LaunchShape, args: &mut [Arg]) -> Result<(), String> {
    static LAUNCHES: AtomicUsize = AtomicUsize::new(0);
    let runner = runner();
    let dir =
        runner.with_file_name(format!("launch-{}-{}", std::process::id(), LAUNCHES.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut words = vec![kernel.to_string()];
    words.extend([shape.blocks, 1, 1, shape.threads, 1, 1].map(|d| d.to_string()));
    for (i, arg) in args.iter().enumerate() {
        let path = dir.join(format!("{i}.bin"));
        let (kind, bytes) = match arg {
            Arg::F32s(v) => ("f32s", le_bytes(v, f32::to_le_bytes)),
            Arg::F64s(v) => ("f64s", le_bytes(v, f64::to_le_bytes)),
            Arg::U32s(v) => ("u32s", le_bytes(v, u32::to_le_bytes)),
            Arg::F32(x) => {
                words.push(format!("f32={:08x}", x.to_bits()));
                continue;
            }
            Arg::U32(x) => {
                words.push(format!("u32={x}"));
                continue;
            }
            Arg::U64(x) => {
                words.push(format!("u64={x}"));
                continue;
            }
        };
        std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
        words.push(format!("{kind}={}", path.display()));
    }
    let output = Command::new(runner).args(&words).output().map_err(|e| e.to_string())?;
    let result = if output.status.success() {
        for (i, arg) in args.iter_mut().enumerate() {
            let path = dir.join(format!("{i}.bin"));
            match arg {
                Arg::F32s(v) => read_back(v, &std::fs::read(&path).map_err(|e| e.to_string())?, f32::from_le_bytes),
                Arg::F64s(v) => read_back(v, &std::fs::read(&path).map_err(|e| e.to_string())?, f64::from_le_bytes),
                Arg::U32s(v) => read_back(v, &std::fs::read(&path).map_err(|e| e.to_string())?, u32::from_le_bytes),
                Arg::F32(_) | Arg::U32(_) | Arg::U64(_) => {}
            }
        }
        Ok(())
    } else {
        use std::os::unix::process::ExitStatusExt;
        Err(match output.status.signal() {
            Some(signal @ (libc::SIGSEGV | libc::SIGBUS)) => {
                format!("{kernel} touched memory outside its buffers (signal {signal})")
            }
            Some(signal) => format!("{kernel} died of signal {signal}"),
            None => String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch_shape::{grid_stride, one_block_per_row};

    #[test]
    fn the_runner_knows_every_kernel_of_the_sources() {
        let mut listed = runner_kernels();
        listed.sort();
        assert_eq!(listed, kernels_in_sources(), "cuda/host/runner.cpp's KERNELS and the kernels of cuda/*.cu");
    }

    #[test]
    fn a_launch_that_does_not_match_the_kernels_signature_is_refused_before_it_runs() {
        let (mut table, mut rows, mut values) = (vec![0f32; 8], vec![1u32], vec![5f32; 4]);
        // The row ids where the values belong.
        let err = launch(
            "overwrite_rows_f32",
            one_block_per_row(1, 4),
            &mut [Arg::F32s(&mut table), Arg::F32s(&mut values), Arg::U32s(&mut rows), Arg::U32(4)],
        )
        .unwrap_err();
        assert_eq!(err, "overwrite_rows_f32: argument 1 is f32s, the kernel takes u32s");
        let err = launch("overwrite_rows_f32", one_block_per_row(1, 4), &mut [Arg::F32s(&mut table)]).unwrap_err();
        assert_eq!(err, "overwrite_rows_f32 takes 4 arguments, got 1");
        let err = launch("no_such_kernel", grid_stride(1), &mut []).unwrap_err();
        assert_eq!(err, "no kernel named no_such_kernel");
        assert_eq!(table, vec![0f32; 8], "nothing ran");
    }

    #[test]
    fn a_kernel_that_reads_past_a_buffer_is_caught() {
        // A row id past the table: the kernel writes a row beyond the table's end.
        let (mut table, mut rows, mut values) = (vec![0f32; 8], vec![2u32], vec![5f32; 4]);
        let err = launch(
            "overwrite_rows_f32",
            one_block_per_row(1, 4),
            &mut [Arg::F32s(&mut table), Arg::U32s(&mut rows), Arg::F32s(&mut values), Arg::U32(4)],
        )
        .unwrap_err();
        assert!(err.contains("touched memory outside its buffers"), "{err}");
        // And the same launch inside the table writes its row.
        let mut rows = vec![1u32];
        launch(
            "overwrite_rows_f32",
            one_block_per_row(1, 4),
            &mut [Arg::F32s(&mut table), Arg::U32s(&mut rows), Arg::F32s(&mut values), Arg::U32(4)],
        )
        .unwrap();
        assert_eq!(table, [0., 0., 0., 0., 5., 5., 5., 5.]);
    }
}
