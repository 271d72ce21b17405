//! Which instruction-set path the CPU kernels take, detected at run time and switchable, so that
//! every path can be tested and timed on any machine that supports it.
//!
//! | path | needs | the packed GEMM engine ([`super::gemm`]) |
//! |---|---|---|
//! | [`Isa::Avx512`] | x86-64 AVX-512F | 12 × 32 micro-tiles of 512-bit FMAs; bf16 weights by AVX512-BF16 dot products where the CPU has them |
//! | [`Isa::Avx2`] | x86-64 AVX2 + FMA | 6 × 16 micro-tiles of 256-bit FMAs; bf16 weights widened to f32 in the kernel |
//! | [`Isa::Generic`] | anything (arm64 included) | none: the callers take candle's own product |
//! | [`Isa::Candle`] | anything | none, and no other rankstack CPU kernel either (see below) |
//!
//! The path is, in order: the innermost [`with_isa`] on the calling thread (tests), the
//! environment variable `RANKSTACK_CPU=avx512|avx2|generic|candle` (read once; a path this CPU
//! lacks falls back to the best one it has, with one warning on stderr), or the best path detected.
//!
//! [`Isa::Candle`] is not a path to run in production: it turns off every rankstack CPU kernel
//! ([`kernels_enabled`]): LayerNorm, packed attention, masked max-pooling, dropout's fused mask,
//! the fused linear products and the fused optimizer update. The layers then build the graph of
//! candle operations that they build on a GPU, so that the CPU can check that graph against the
//! kernels (`tests` of the top crate) and measure its tensor memory (`examples/gpu_bench.rs` with
//! `GPU_BENCH_DEVICE=cpu`). It is never detected and not in [`Isa::ALL`]: kernel tests that run
//! "under every path" do not run under it. Like a GPU, it draws the attention's dropout masks
//! with the device's generator, which on the CPU cannot be seeded: training with dropout is not
//! reproducible on this path.
//! The f32 products of the two SIMD paths are bit-identical: each output element is one fused
//! multiply-add chain over `k` in the same order.

use std::cell::Cell;
use std::sync::OnceLock;

/// An instruction-set path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// No SIMD kernel: callers fall back to candle's operations.
    Generic,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512F (x86-64).
    Avx512,
    /// No rankstack CPU kernel at all: candle's operations everywhere, as on other devices.
    Candle,
}

impl Isa {
    /// Every path, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Generic];

    /// The name `RANKSTACK_CPU` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Generic => "generic",
            Isa::Candle => "candle",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Generic | Isa::Candle => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU supports.
    pub fn detected() -> Isa {
        Isa::ALL.into_iter().find(|i| i.supported()).unwrap_or(Isa::Generic)
    }

    /// The path the kernels take on this thread now (see the module documentation).
    pub fn active() -> Isa {
        OVERRIDE.with(Cell::get).unwrap_or_else(|| *PROCESS.get_or_init(from_environment))
    }

    /// The path [`with_isa`] forces on this thread, if any.
    pub fn override_on_this_thread() -> Option<Isa> {
        OVERRIDE.with(Cell::get)
    }

    /// Every path this CPU supports, fastest first: what the kernel tests run under.
    pub fn all_supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// Whether the CPU has AVX512-BF16 dot products (used by the bf16 path on [`Isa::Avx512`]).
    pub fn has_avx512_bf16() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Isa::ALL
            .into_iter()
            .chain([Isa::Candle])
            .find(|i| i.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown CPU path `{s}` (expected avx512, avx2, generic or candle)"))
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

static PROCESS: OnceLock<Isa> = OnceLock::new();

/// `RANKSTACK_CPU`, or the detected path.
fn from_environment() -> Isa {
    let Ok(value) = std::env::var("RANKSTACK_CPU") else { return Isa::detected() };
    if value.is_empty() || value == "auto" {
        return Isa::detected();
    }
    match value.parse::<Isa>() {
        Ok(isa) if isa.supported() => isa,
        Ok(isa) => {
            let best = Isa::ALL.into_iter().filter(|i| *i < isa).find(|i| i.supported()).unwrap_or(Isa::Generic);
            eprintln!("warning: RANKSTACK_CPU={value}: this CPU lacks it; the kernels take the {} path", best.name());
            best
        }
        Err(e) => {
            eprintln!("warning: RANKSTACK_CPU: {e}; the kernels take the detected path");
            Isa::detected()
        }
    }
}

/// Whether rankstack's CPU kernels run at all on this thread: every path but [`Isa::Candle`].
/// Each kernel's entry point checks it and returns `None` (the caller composes candle operations)
/// where it is off.
pub fn kernels_enabled() -> bool {
    Isa::active() != Isa::Candle
}

/// Whether rankstack's CPU kernels run for tensors on `device`: on the CPU with the kernels on.
/// Where they do not (a GPU, or the CPU under `RANKSTACK_CPU=candle`), the layers build the graph
/// of candle operations that a GPU runs.
pub fn kernels_run_on(device: &candle_core::Device) -> bool {
    device.is_cpu() && kernels_enabled()
}

/// Runs `f` with the kernels on `isa` on this thread (the kernels read the path on the calling
/// thread and hand it to their worker threads). For tests and benchmarks of each path.
///
/// # Panics
/// If this CPU does not support `isa`.
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isa.supported(), "this CPU cannot run the {} path", isa.name());
    with_isa_override(Some(isa), f)
}

/// Runs `f` with this thread's override set to `isa` (`None`: the process-wide path), restoring
/// the previous one afterwards, also when `f` panics. What [`with_isa`] and the worker pool's
/// hand-over ([`on_worker_pool`](super::on_worker_pool)) share.
pub(crate) fn with_isa_override<R>(isa: Option<Isa>, f: impl FnOnce() -> R) -> R {
    let previous = OVERRIDE.with(|o| o.replace(isa));
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Runs `test` once per path this CPU supports (each under [`with_isa`]) and reports, past the test
/// harness's capture, the paths it could not run.
pub fn for_each_supported_isa(name: &str, mut test: impl FnMut(Isa)) {
    for isa in Isa::ALL {
        if isa.supported() {
            with_isa(isa, || test(isa));
        } else {
            super::skipped(&format!("{name} [{}]", isa.name()), isa.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_the_override_nests() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!("sse".parse::<Isa>().is_err());
        assert_eq!("candle".parse::<Isa>().unwrap(), Isa::Candle);
        assert!(!Isa::ALL.contains(&Isa::Candle) && Isa::detected() != Isa::Candle);
        assert!(kernels_enabled() || Isa::active() == Isa::Candle);
        with_isa(Isa::Candle, || assert!(!kernels_enabled()));
        assert!(Isa::Generic.supported());
        let outer = Isa::active();
        with_isa(Isa::Generic, || {
            assert_eq!(Isa::active(), Isa::Generic);
            if Isa::Avx2.supported() {
                with_isa(Isa::Avx2, || assert_eq!(Isa::active(), Isa::Avx2));
            }
            assert_eq!(Isa::active(), Isa::Generic);
        });
        assert_eq!(Isa::active(), outer);
    }
}
