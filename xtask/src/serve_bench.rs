//! `cargo xtask serve-bench [--seconds S] [--weights f32|bf16] [--no-pytorch] [--pin-threads]`:
//! `rankstack serve` with the `homefeed-bench` model under a real HTTP load generator (`wrk`,
//! Debian package `wrk`), with requests of 1, 64 and 512 candidates (`examples/serve_bench.rs`
//! writes the model and the bodies):
//!
//! - saturation: a fixed number of connections sending back to back (closed loop);
//! - a fixed offered load at about half the saturation rate: the same connections, each pausing
//!   between requests (wrk's `delay()`), so the server is not queue-bound; the achieved rate is
//!   reported;
//! - the batcher's lift: 1-candidate requests at saturation with `--max-batch 1` (no batching)
//!   against the default;
//! - the binary tensor extension against JSON at 512 candidates (saturation);
//! - the PyTorch baseline (unless `--no-pytorch`): the same checkpoint in the reference model
//!   behind a minimal FastAPI/uvicorn endpoint (`reference/serve_fastapi.py`, in the reference
//!   venv plus pinned FastAPI and uvicorn), with the same bodies, connections and pauses.
//!
//! Throughput and p50/p99/p999 latency come from wrk's own histogram (a Lua `done` hook prints
//! them). The table goes to stdout and `target/serve-bench/results.md`. Threads: the model's pool
//! gets `RAYON_NUM_THREADS=2`; wrk runs one thread. Run it on a quiet machine. `--pin-threads`
//! starts rankstack's servers with that option (each kernel worker on its own CPU).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{cargo, root, run, Result};

/// wrk's script: POST the body in `BENCH_BODY`, pause `BENCH_DELAY_MS` between requests on a
/// connection, print the summary as one JSON line.
const WRK_SCRIPT: &str = r#"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local json_len = os.getenv("BENCH_JSON_LENGTH") or ""
if json_len ~= "" then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = json_len
end
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pause > 0 then
  function delay() return pause end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %.3f, "non2xx": %d, "socket_errors": %d, "p50_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3))
end
"#;

/// One wrk run's summary.
#[derive(Debug, Clone)]
struct Load {
    rps: f64,
    requests: u64,
    errors: u64,
    p50: f64,
    p99: f64,
    p999: f64,
}

/// A running `rankstack serve` (SIGTERM on drop).
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(binary: &Path, checkpoint: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--checkpoint"])
            .arg(checkpoint)
            .args(["--addr", "127.0.0.1:0", "--max-queue", "4096"])
            .args(extra)
            .env("RAYON_NUM_THREADS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line.trim().strip_prefix("listening on ").ok_or_else(|| format!("rankstack serve: {line:?}"))?;
        Ok(Self { url: format!("{addr}/v2/models/ranker/infer"), child })
    }
}

impl Server {
    /// The FastAPI baseline (`reference/serve_fastapi.py`) on a free port, once it accepts
    /// connections (bounded wait: the model takes seconds to load).
    fn start_pytorch(checkpoint: &Path) -> Result<Self> {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let child = Command::new(crate::fixtures::venv_python())
            .arg(root().join("reference/serve_fastapi.py"))
            .arg(checkpoint)
            .args([port.to_string().as_str(), "--threads", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the FastAPI baseline: {e}"))?;
        let server = Self { url: format!("http://127.0.0.1:{port}/v2/models/ranker/infer"), child };
        for _ in 0..1200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err("the FastAPI baseline did not start listening within 2 minutes".into())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn wrk(url: &str, body: &Path, connections: usize, seconds: u64, delay_ms: f64, script: &Path) -> Result<Load> {
    // A binary body (`.bin`) sends its JSON part's length in the protocol's header.
    let json_len = if body.extension().is_some_and(|e| e == "bin") {
        std::fs::read_to_string(body.with_extension("bin.json-length")).map_err(|e| e.to_string())?
    } else {
        String::new()
    };
    let out = Command::new("wrk")
        .env("BENCH_JSON_LENGTH", json_len.trim())
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--timeout", "30s", "-s"])
        .arg(script)
        .arg(url)
        .env("BENCH_BODY", body)
        .env("BENCH_DELAY_MS", format!("{}", delay_ms.round() as u64))
        .output()
        .map_err(|e| format!("cannot run wrk ({e}): install it with `apt-get install -y wrk`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| format!("wrk printed no summary:\n{text}"))?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Load {
        rps: f("requests") / f("seconds"),
        requests: f("requests") as u64,
        errors: (f("non2xx") + f("socket_errors")) as u64,
        p50: f("p50_ms"),
        p99: f("p99_ms"),
        p999: f("p999_ms"),
    })
}

/// The 1-minute load average (other work on the machine skews every number).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |s| s.split_whitespace().next().unwrap_or("?").to_string())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn row(server: &str, what: &str, b: usize, connections: usize, load: &Load) -> String {
    format!(
        "| {server} | {what} | {b} | {connections} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {} / {} |\n",
        load.rps,
        load.rps * b as f64,
        load.p50,
        load.p99,
        load.p999,
        load.errors,
        load.requests
    )
}

/// `cargo xtask serve-bench`.
pub fn serve_bench(args: &[String]) -> Result<()> {
    let usage = "usage: cargo xtask serve-bench [--seconds S] [--weights f32|bf16] [--no-pytorch] [--pin-threads]";
    let (mut seconds, mut with_pytorch, mut weights) = (10u64, true, "f32".to_string());
    let mut pin_threads = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let v = rest.next().ok_or(usage)?;
                seconds = v.parse().map_err(|_| format!("--seconds {v}: not a number"))?;
            }
            "--no-pytorch" => with_pytorch = false,
            "--pin-threads" => pin_threads = true,
            "--weights" => weights = rest.next().ok_or(usage)?.clone(),
            _ => return Err(usage.into()),
        }
    }
    // `wrk --version` exits 1 after printing: only whether it starts matters.
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|_| "wrk is missing: install it with `apt-get install -y wrk`".to_string())?;
    run(
        "build rankstack and the serve_bench example (release)",
        cargo().args(["build", "--release", "--bin", "rankstack", "--example", "serve_bench"]),
    )?;
    let dir: PathBuf = root().join("target/serve-bench");
    let release = root().join("target/release");
    run(
        "write the homefeed-bench checkpoint and requests",
        Command::new(release.join("examples/serve_bench")).arg("prepare").arg(&dir),
    )?;
    let script = dir.join("post.lua");
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| e.to_string())?;
    let binary = release.join("rankstack");
    let checkpoint = dir.join("checkpoint");

    let mut table = String::from(
        "| server | load | candidates/request | connections | requests/s | candidates/s | p50 ms | p99 ms | p999 ms | errors / requests |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let load_before = loadavg();
    // Connections: enough to keep the batcher's next batch queued while one scores (1-candidate
    // requests need many to fill a batch); the paced load uses fewer, each pausing so that
    // connections / pause ≈ half of rankstack's saturation rate (the same pause for PyTorch:
    // equal offered load). The achieved rate is lower by the latency's share of each cycle.
    let shapes = [(1usize, 64usize, 16usize), (64, 4, 2), (512, 2, 1)];
    // rankstack's server only: `--pin-threads` (PyTorch's baseline has no such switch).
    let pin: &[&str] = if pin_threads { &["--pin-threads"] } else { &[] };
    let mut pauses = Vec::new();
    let mut saturated_single = None;
    {
        let server = Server::start(&binary, &checkpoint, &[&["--weights", weights.as_str()], pin][..].concat())?;
        for &(b, connections, paced) in &shapes {
            let body = dir.join(format!("request-{b}.json"));
            wrk(&server.url, &body, connections, 2, 0.0, &script)?; // warm-up, not reported
            eprintln!("==> rankstack, {b} candidates: saturation");
            let saturation = wrk(&server.url, &body, connections, seconds, 0.0, &script)?;
            let target = 0.5 * saturation.rps;
            let pause_ms = paced as f64 * 1e3 / target;
            pauses.push((target, pause_ms));
            eprintln!("==> rankstack, {b} candidates: paced ({pause_ms:.1} ms pause per connection)");
            let fixed = wrk(&server.url, &body, paced, seconds, pause_ms, &script)?;
            table.push_str(&row("rankstack", "saturation", b, connections, &saturation));
            table.push_str(&row("rankstack", &format!("paced, {target:.1}/s offered"), b, paced, &fixed));
            if b == 1 {
                saturated_single = Some(saturation);
            }
        }
        // The binary tensor extension at 512 candidates: does it pay against JSON?
        let body = dir.join("request-512.bin");
        wrk(&server.url, &body, 2, 2, 0.0, &script)?;
        eprintln!("==> rankstack, 512 candidates, binary tensors: saturation");
        table.push_str(&row(
            "rankstack",
            "saturation, binary tensors",
            512,
            2,
            &wrk(&server.url, &body, 2, seconds, 0.0, &script)?,
        ));
    }
    eprintln!("==> rankstack, 1 candidate, no batching (--max-batch 1): saturation");
    let body = dir.join("request-1.json");
    let unbatched = {
        let server = Server::start(
            &binary,
            &checkpoint,
            &[&["--max-batch", "1", "--weights", weights.as_str()], pin][..].concat(),
        )?;
        wrk(&server.url, &body, 64, 2, 0.0, &script)?;
        wrk(&server.url, &body, 64, seconds, 0.0, &script)?
    };
    table.push_str(&row("rankstack", "saturation, --max-batch 1", 1, 64, &unbatched));
    if with_pytorch {
        crate::fixtures::ensure_venv()?;
        crate::python_venv("reference/.venv", "FastAPI and uvicorn", &["fastapi==0.163.2", "uvicorn==0.54.0"])?;
        let server = Server::start_pytorch(&checkpoint)?;
        for (&(b, connections, paced), &(target, pause_ms)) in shapes.iter().zip(&pauses) {
            let body = dir.join(format!("request-{b}.json"));
            wrk(&server.url, &body, connections, 2, 0.0, &script)?;
            eprintln!("==> PyTorch, {b} candidates: saturation");
            table.push_str(&row(
                "PyTorch",
                "saturation",
                b,
                connections,
                &wrk(&server.url, &body, connections, seconds, 0.0, &script)?,
            ));
            eprintln!("==> PyTorch, {b} candidates: paced");
            let fixed = wrk(&server.url, &body, paced, seconds, pause_ms, &script)?;
            table.push_str(&row("PyTorch", &format!("paced, {target:.1}/s offered"), b, paced, &fixed));
        }
    }
    let lift = saturated_single.map_or(f64::NAN, |s| s.rps / unbatched.rps);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let report = format!(
        "`cargo xtask serve-bench --seconds {seconds} --weights {weights}{}`: {}, {} cores, RAYON_NUM_THREADS=2, wrk 1 thread, {date}, commit {commit}; load average before {load_before}, after {}.\n\n{table}\nBatcher lift at 1-candidate requests (saturation, default batching vs --max-batch 1): {lift:.2}x\n",
        if pin_threads { " --pin-threads" } else { "" },
        cpu_name(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
    );
    std::fs::write(dir.join("results.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
