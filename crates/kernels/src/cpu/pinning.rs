//! Pinning the kernels' worker threads to CPUs, for latency-bound servers on dedicated cores.
//!
//! Unpinned, the operating system places a worker wherever it wakes. A scoring server that sits
//! idle between requests showed what that can cost (a 2-vCPU Firecracker VM, `docs/serving.md`):
//! after 160 ms without work, the first batch of 64 candidates took 47 ms instead of 29, because
//! every time a kernel call woke the second worker, the guest's scheduler put it on the busy vCPU
//! of the thread that woke it, so one thread did the work of two until the idle one was running
//! again. With each worker pinned to its own CPU the first batch takes 29–30 ms, and paced
//! 64-candidate requests answer in 40 ms instead of 60 (median).
//!
//! Pinning is not the default because it costs where other processes compete for the cores: a
//! pinned worker whose CPU is busy cannot move to a free one, and scoring with one core kept busy
//! took 11 ms instead of 8 at one candidate and 68 ms instead of 55 at 64. Servers on dedicated
//! cores opt in (`rankstack serve --pin-threads`).
//!
//! [`start_pinned_pool`] builds rayon's global pool (the one every kernel uses) with worker `i`
//! pinned to the `i`-th CPU this process may run on (wrapping when there are more workers than
//! CPUs), and checks each worker's affinity afterwards. Linux only; elsewhere it returns an error.

use std::fmt;

/// Why the workers could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// rayon's global pool already runs (some kernel ran first): pin before any other work.
    PoolAlreadyStarted(String),
    /// Reading or setting a thread's CPU affinity failed (or is not supported here).
    Affinity(String),
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinError::PoolAlreadyStarted(why) => {
                write!(f, "the kernels' worker pool is already running ({why}); pin before any other work")
            }
            PinError::Affinity(why) => write!(f, "cannot pin the worker threads: {why}"),
        }
    }
}

impl std::error::Error for PinError {}

/// The CPU of each of `threads` workers: the allowed CPUs in order, wrapping around.
pub fn pinning_plan(allowed: &[usize], threads: usize) -> Vec<usize> {
    (0..threads).map(|i| cpu_of_worker(allowed, i)).collect()
}

/// Worker `i`'s CPU in [`pinning_plan`].
fn cpu_of_worker(allowed: &[usize], i: usize) -> usize {
    assert!(!allowed.is_empty(), "a process may always run on at least one CPU");
    allowed[i % allowed.len()]
}

/// Starts rayon's global pool (its usual size: `RAYON_NUM_THREADS`, else one worker per CPU) with
/// each worker pinned to its own CPU ([`pinning_plan`] over the CPUs this process may use), and
/// returns the CPU of each worker, as checked on the workers themselves. Call it at start-up,
/// before any kernel runs; the pool cannot be rebuilt afterwards.
pub fn start_pinned_pool() -> Result<Vec<usize>, PinError> {
    let allowed = affinity::allowed_cpus().map_err(|e| PinError::Affinity(e.to_string()))?;
    // rayon sizes the pool as usual; each worker takes its CPU from its index as it starts.
    pinned_builder(allowed.clone()).build_global().map_err(|e| PinError::PoolAlreadyStarted(e.to_string()))?;
    let seen = rayon::broadcast(|_| affinity::current_thread_cpus());
    let plan = pinning_plan(&allowed, seen.len());
    check_workers(seen, &plan)?;
    Ok(plan)
}

/// A pool builder whose worker `i` pins itself to its CPU in [`pinning_plan`] over `allowed` as it
/// starts (a failure there is found by [`check_workers`]).
fn pinned_builder(allowed: Vec<usize>) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new().start_handler(move |i| {
        let _ = affinity::pin_current_thread(cpu_of_worker(&allowed, i));
    })
}

/// Checks that worker `i` may run on `plan[i]` alone.
fn check_workers(seen: Vec<std::io::Result<Vec<usize>>>, plan: &[usize]) -> Result<(), PinError> {
    for (i, (cpus, &want)) in seen.into_iter().zip(plan).enumerate() {
        let cpus = cpus.map_err(|e| PinError::Affinity(format!("worker {i}: {e}")))?;
        if cpus != [want] {
            return Err(PinError::Affinity(format!("worker {i} runs on CPUs {cpus:?}, not on CPU {want} alone")));
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod affinity {
    use std::io;

    /// The CPUs the calling thread may run on, ascending.
    pub fn current_thread_cpus() -> io::Result<Vec<usize>> {
        // SAFETY: `set` is a plain bit set that the kernel fills; its size is passed along.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
        }
    }

    /// The CPUs this process may run on (those of the calling thread, which new threads inherit).
    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        let cpus = current_thread_cpus()?;
        if cpus.is_empty() {
            return Err(io::Error::other("the affinity mask lists no CPU"));
        }
        Ok(cpus)
    }

    /// Restricts the calling thread to `cpu`.
    pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("CPU {cpu} is beyond the affinity mask's size")));
        }
        // SAFETY: as above; `cpu` is within the set's size (checked).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod affinity {
    use std::io;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "pinning threads is supported on Linux only")
    }

    pub fn current_thread_cpus() -> io::Result<Vec<usize>> {
        Err(unsupported())
    }

    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        Err(unsupported())
    }

    pub fn pin_current_thread(_cpu: usize) -> io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_takes_the_allowed_cpus_in_order_and_wraps() {
        assert_eq!(pinning_plan(&[3, 5, 8], 2), vec![3, 5]);
        assert_eq!(pinning_plan(&[3, 5], 5), vec![3, 5, 3, 5, 3]);
        assert_eq!(pinning_plan(&[0], 0), Vec::<usize>::new());
    }

    #[test]
    fn a_worker_on_the_wrong_cpus_is_reported() {
        let plan = [0, 1];
        assert!(check_workers(vec![Ok(vec![0]), Ok(vec![1])], &plan).is_ok());
        let err = check_workers(vec![Ok(vec![0]), Ok(vec![0, 1])], &plan).unwrap_err();
        assert_eq!(err, PinError::Affinity("worker 1 runs on CPUs [0, 1], not on CPU 1 alone".into()));
        let err = check_workers(vec![Err(std::io::Error::other("denied")), Ok(vec![1])], &plan).unwrap_err();
        assert_eq!(err.to_string(), "cannot pin the worker threads: worker 0: denied");
    }

    /// A private pool built like the global one: every worker runs on its planned CPU alone, and
    /// the test's own thread keeps its mask. (The global pool of the test process is left alone.)
    #[cfg(target_os = "linux")]
    #[test]
    fn pinned_workers_run_on_their_cpu_alone() {
        let allowed = affinity::allowed_cpus().unwrap();
        let threads = allowed.len().min(4) + 1; // wraps at least once
        let plan = pinning_plan(&allowed, threads);
        let pool = pinned_builder(allowed.clone()).num_threads(threads).build().unwrap();
        check_workers(pool.broadcast(|_| affinity::current_thread_cpus()), &plan).unwrap();
        assert_eq!(affinity::current_thread_cpus().unwrap(), allowed);
    }

    /// Once any work has started rayon's global pool, pinning is refused with a reason (and the
    /// running pool is left as it is).
    #[cfg(target_os = "linux")]
    #[test]
    fn pinning_a_running_pool_is_refused() {
        rayon::join(|| (), || ()); // starts the global pool if no other test has
        let err = start_pinned_pool().unwrap_err();
        assert!(matches!(err, PinError::PoolAlreadyStarted(_)), "{err}");
        assert!(err.to_string().contains("pin before any other work"), "{err}");
    }

    #[cfg(not(target_os = "linux"))]
    #[test]
    fn pinning_elsewhere_is_an_error() {
        assert!(matches!(start_pinned_pool(), Err(PinError::Affinity(_))));
    }
}
