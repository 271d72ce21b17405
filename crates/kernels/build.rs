//! With the `cuda` feature, compiles `cuda/*.cu` to PTX with `nvcc` (the compiler candle's own
//! kernels need too: `$NVCC`, else `nvcc` on the path) for the virtual architecture
//! `compute_$CUDA_COMPUTE_CAP` (default 75, the oldest CUDA 13 supports; the driver compiles the
//! PTX for newer GPUs when it loads it). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 8] = [
    "segment_sum",
    "overwrite_rows",
    "adamw",
    "sum_of_squares",
    "packed_attention",
    "bias_add",
    "layer_norm",
    "embedding_bag",
];

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // Included by the kernels that reduce over a block.
    println!("cargo:rerun-if-changed=cuda/block_sum.cuh");
    for name in SOURCES {
        let source = format!("cuda/{name}.cu");
        println!("cargo:rerun-if-changed={source}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} ({e}): the cuda feature needs CUDA's compiler"));
        assert!(status.success(), "{nvcc} failed on {source}");
    }
}
