//! Counting the bytes a process holds on the heap, and their peak: the CPU's counterpart of a GPU
//! memory pool's high-water mark.
//!
//! A CPU tensor's storage is a heap buffer, so the peak of live heap bytes over a training step
//! is the peak of its tensors (plus the program's other heap data, small beside them), exactly and
//! independently of what the allocator keeps mapped, unlike the resident-memory figure of
//! `/proc`. With the kernels off (`RANKSTACK_CPU=candle`, see [`super::isa`]) the CPU runs the
//! graph of candle operations a GPU runs, so this peak is the GPU step's tensor memory measured
//! without a GPU.
//!
//! Counting costs two atomic operations per allocation, so only a measuring program installs it:
//!
//! ```
//! use rankstack_kernels::cpu::heap_count::{buffers_allocated, heap_bytes, reset_heap_peak, CountingAllocator};
//!
//! #[global_allocator]
//! static HEAP: CountingAllocator = CountingAllocator;
//!
//! fn main() {
//!     let before = heap_bytes().expect("installed").live;
//!     reset_heap_peak();
//!     let buffer = vec![1u8; 1 << 20];
//!     let counts = heap_bytes().unwrap();
//!     assert!(counts.live >= before + (1 << 20) && counts.peak >= counts.live);
//!     drop(buffer);
//!     let after = heap_bytes().unwrap();
//!     assert!(after.live < counts.live && after.peak == counts.peak);
//!     // The buffer stays counted among those allocated.
//!     let buffers = buffers_allocated().unwrap();
//!     assert!(buffers.count >= 1 && buffers.bytes >= 1 << 20);
//! }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Buffers of at least [`BUFFER_BYTES`] allocated since the start, and their bytes.
static BUFFERS: AtomicUsize = AtomicUsize::new(0);
static BUFFER_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// The smallest allocation [`buffers_allocated`] counts: 1024 `f32` values. A candle operation's
/// output on a batch is a buffer of this size or more, while the operation's host bookkeeping
/// (shapes, layouts, reference counts) lies far below it, so above it the count follows the
/// operations that write a batch-sized tensor, the work a GPU launches a kernel for. (Buffers
/// aligned beyond a tensor's 16 bytes, CPU scratch, are not counted.)
pub const BUFFER_BYTES: usize = 4096;
/// Set by the first allocation through [`CountingAllocator`]: it is the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Live heap bytes now, and the most held at once since the start or [`reset_heap_peak`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapBytes {
    /// Held now.
    pub live: usize,
    /// The peak.
    pub peak: usize,
}

/// The counts, if [`CountingAllocator`] is this program's global allocator.
pub fn heap_bytes() -> Option<HeapBytes> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| HeapBytes { live: LIVE.load(Ordering::Relaxed), peak: PEAK.load(Ordering::Relaxed) })
}

/// Buffers of at least [`BUFFER_BYTES`] allocated since the program started, freed or not: how many
/// and their bytes in all.
///
/// Each tensor an operation writes is one such buffer, so over a piece of work the difference of
/// two readings counts the tensors it wrote and the bytes written into them: with the CPU kernels
/// off (`RANKSTACK_CPU=candle`) those are the kernels a GPU would launch for that work and their
/// output traffic (a lower bound of what they move: they read at least as much again). Returns
/// `None` without [`CountingAllocator`].
pub fn buffers_allocated() -> Option<BuffersAllocated> {
    INSTALLED.load(Ordering::Relaxed).then(|| BuffersAllocated {
        count: BUFFERS.load(Ordering::Relaxed) as u64,
        bytes: BUFFER_TOTAL.load(Ordering::Relaxed) as u64,
    })
}

/// See [`buffers_allocated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuffersAllocated {
    /// Allocations of at least [`BUFFER_BYTES`].
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Starts a new peak from the bytes live now (no effect without [`CountingAllocator`]).
pub fn reset_heap_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Counts an allocation of `bytes` aligned to `align` among the tensor buffers if it is one: at
/// least [`BUFFER_BYTES`], and aligned as a `Vec` of a tensor's elements is (at most 16 bytes).
/// Scratch that is aligned to cache lines (the `gemm` crate's packing buffers, 128 bytes, one per
/// matrix of a batched product on the CPU) is no tensor a GPU would write.
fn counted_as_buffer(bytes: usize, align: usize) {
    if bytes >= BUFFER_BYTES && align <= MAX_TENSOR_ALIGN {
        BUFFERS.fetch_add(1, Ordering::Relaxed);
        BUFFER_TOTAL.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The largest alignment of a tensor's storage (`Vec<T>` of its element type).
const MAX_TENSOR_ALIGN: usize = 16;

/// An allocation of `bytes` aligned to `align` is held: live bytes, their peak, and the buffer
/// count.
fn grew(bytes: usize, align: usize) {
    counted_as_buffer(bytes, align);
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator with the caller's arguments, so its
// guarantees are the system allocator's; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size(), layout.align());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size(), layout.align());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is gone and the new one held (on failure the old one stays).
            grew(new_size, layout.align());
            shrank(layout.size());
        }
        p
    }
}
