//! How many of the machine's CPUs other processes keep busy, sampled from `/proc`.
//!
//! A small batch is a chain of short, memory-bound products, each split over every worker. When
//! another process keeps a core busy, the scheduler preempts the worker that shares it, and the
//! product waits for that worker to be scheduled again: at batch 1 on a 2-vCPU machine, two
//! workers were slower than one (ninth session, `docs/performance.md`). [`cpus_busy_elsewhere`]
//! is what [`super::on_worker_pool_for_rows`] reads to give small batches no more workers than
//! there are CPUs left free.
//!
//! The figure is the CPU time of the whole machine (`/proc/stat`) less this process's
//! (`/proc/self/stat`), over a window of at least [`WINDOW`], divided by the window. It is only
//! given where it means what it says: on Linux, and where this process may use every CPU that
//! `/proc/stat` counts (in a container limited to some of the host's CPUs, `/proc/stat` counts
//! the host's, so the figure would charge other tenants' load to our share). Elsewhere it is
//! `None`, and small batches use the whole pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest window a figure is measured over (the kernel counts CPU time in ticks of 10 ms).
pub const WINDOW: Duration = Duration::from_millis(250);

/// CPU-time counters at one moment, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    at: Instant,
    /// Ticks the machine's CPUs spent on any work (`/proc/stat`'s first line less idle and
    /// iowait).
    machine_busy: u64,
    /// Ticks of every kind, idle included, summed over the machine's CPUs.
    machine_all: u64,
    /// Ticks this process ran (user and system).
    ours: u64,
}

/// The start of the current window.
static WINDOW_START: Mutex<Option<Counters>> = Mutex::new(None);

/// The last complete window's figure (`f64` bits; NaN for none), readable while another thread
/// reads `/proc`.
static LAST: AtomicU64 = AtomicU64::new(NO_FIGURE);
const NO_FIGURE: u64 = 0x7ff8_0000_0000_0000; // f64::NAN

fn last_figure() -> Option<f64> {
    Some(f64::from_bits(LAST.load(Ordering::Relaxed))).filter(|v| !v.is_nan())
}

/// The number of CPUs (fractional: 0.5 is one CPU half the time) that other processes kept busy
/// over the last complete window, or `None` before the first window is complete, where `/proc`
/// cannot be read, or where the figure would not be this process's (see the module
/// documentation). Cheap: a call reads `/proc` at most once per [`WINDOW`], and a call that finds
/// another one reading returns the previous figure.
pub fn cpus_busy_elsewhere() -> Option<f64> {
    let Ok(mut window_start) = WINDOW_START.try_lock() else {
        return last_figure();
    };
    if window_start.is_none_or(|start| start.at.elapsed() >= WINDOW) {
        let now = read_counters()?;
        if let Some(start) = *window_start {
            let figure = busy_elsewhere(&start, &now);
            LAST.store(figure.map_or(NO_FIGURE, f64::to_bits), Ordering::Relaxed);
        }
        *window_start = Some(now);
    }
    last_figure()
}

/// Other processes' busy CPUs between two readings, `None` if the machine's counters did not move.
fn busy_elsewhere(start: &Counters, end: &Counters) -> Option<f64> {
    let all = end.machine_all.checked_sub(start.machine_all)?;
    let busy = end.machine_busy.checked_sub(start.machine_busy)?;
    let ours = end.ours.checked_sub(start.ours)?;
    if all == 0 {
        return None;
    }
    let cpus = cpus_counted()? as f64;
    // Ticks of this process and of the machine are sampled a few microseconds apart, and each
    // rounds to a tick: never below zero.
    Some((busy.saturating_sub(ours) as f64 / all as f64 * cpus).max(0.0))
}

/// The CPUs `/proc/stat` counts, when this process may use them all; else `None` (read once:
/// [`cpus_busy_elsewhere`] is a figure out of these).
pub fn cpus_counted() -> Option<usize> {
    static CPUS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let counted = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count();
        let ours = std::thread::available_parallelism().ok()?.get();
        (counted > 0 && counted == ours).then_some(counted)
    })
}

fn read_counters() -> Option<Counters> {
    cpus_counted()?;
    let at = Instant::now();
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (machine_busy, machine_all) = parse_machine(&stat)?;
    Some(Counters { at, machine_busy, machine_all, ours: parse_own(&own)? })
}

/// (busy, all) ticks from `/proc/stat`'s first line: `cpu user nice system idle iowait irq
/// softirq steal guest guest_nice` (guest time is already inside user time, so it is not added).
fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line.split_whitespace().take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else { return None };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// User plus system ticks from `/proc/self/stat` (fields 14 and 15; the command name, field 2,
/// is in parentheses and may contain spaces, so fields are counted after its closing one).
fn parse_own(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_machine_and_process_counters() {
        let stat = "cpu  5871921 0 717905 2062744 23212 0 2710 16073 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(
            parse_machine(stat),
            Some((5871921 + 717905 + 2710 + 16073, 5871921 + 717905 + 2710 + 16073 + 2062744 + 23212))
        );
        assert_eq!(parse_machine("intr 1 2 3"), None);
        let own = "4242 (a name) with spaces) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0";
        assert_eq!(parse_own(own), Some(280));
        assert_eq!(parse_own("garbage"), None);
    }

    #[test]
    fn others_busy_time_is_the_machine_s_less_ours() {
        let at = Instant::now();
        let start = Counters { at, machine_busy: 1000, machine_all: 4000, ours: 500 };
        // 2 CPUs (if /proc says so) over 100 ticks: 200 ticks in all, 150 busy, 50 of them ours.
        let end = Counters { at, machine_busy: 1150, machine_all: 4200, ours: 550 };
        if let Some(cpus) = cpus_counted() {
            let got = busy_elsewhere(&start, &end).unwrap();
            assert!((got - 100.0 / 200.0 * cpus as f64).abs() < 1e-12, "{got}");
        }
        let still = Counters { at, ..start };
        assert_eq!(busy_elsewhere(&start, &still), None);
        // Ours counted ahead of the machine's by a tick: zero, not negative.
        let ahead = Counters { at, machine_busy: 1000, machine_all: 4100, ours: 510 };
        assert!(busy_elsewhere(&start, &ahead).is_none_or(|v| v == 0.0));
    }

    #[test]
    fn a_figure_is_given_after_one_window_where_proc_counts_our_cpus() {
        let Some(cpus) = cpus_counted() else {
            crate::cpu::skipped(
                "a_figure_is_given_after_one_window_where_proc_counts_our_cpus",
                "/proc/stat counting exactly the CPUs this process may use",
            );
            return;
        };
        cpus_busy_elsewhere();
        std::thread::sleep(WINDOW + Duration::from_millis(50));
        let busy = cpus_busy_elsewhere().expect("a complete window");
        assert!((0.0..=cpus as f64).contains(&busy), "{busy} of {cpus} CPUs");
    }
}
