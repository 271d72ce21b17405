//! `cargo xtask bench-compare [--rounds N] [--threads T] [--cpu avx512|avx2|generic] [--load]`:
//! the `homefeed-bench` model in rankstack
//! (`examples/bench_compare.rs`) and in the PyTorch reference (`rankstack_ref.bench_compare`), from
//! the same checkpoint and inputs. It checks that their probabilities agree, then times both,
//! alternating process by process for N rounds (default 3) with T threads each (default 2):
//! scoring at batch 1, 64, 512 and 2048 (PyTorch with and without the transformer fast path, the
//! faster reported, and under bf16 autocast), a training step at batch 512, the f32 GEMM rate, and
//! each process's peak RSS. Prints a Markdown table (also written to
//! `target/bench-compare/table.md`) with the ratio rankstack / PyTorch per row.
//!
//! `--cpu` restricts both sides to one instruction-set path, so that any x86 machine reproduces
//! another's: rankstack through `RANKSTACK_CPU`, PyTorch through `ATEN_CPU_CAPABILITY` (its own
//! kernels), `ONEDNN_MAX_CPU_ISA` (oneDNN) and `MKL_ENABLE_INSTRUCTIONS` (MKL's GEMM).
//!
//! `--load` adds to every round a second pass of the same processes with one core kept busy by
//! another process (a shell busy loop, bounded to an hour and killed after the pass), right after
//! the idle pass, and a table of each framework's slowdown (loaded / idle time within a round, the
//! median over rounds): how much each slows down when it does not have the machine to itself. The
//! pairing within a round keeps the drift of a shared machine's memory bandwidth out of the ratio.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

use crate::fixtures::{ensure_venv, venv_python};
use crate::{cargo, root, run, Result};

/// One timed process's report.
struct Report(Value);

impl Report {
    fn ms(&self, batch: u64) -> Option<f64> {
        self.0["rows"].as_array()?.iter().find(|r| r["batch"].as_u64() == Some(batch))?["median_ms"].as_f64()
    }
    fn rss(&self) -> f64 {
        self.0["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN)
    }
}

fn capture(what: &str, cmd: &mut Command) -> Result<Value> {
    eprintln!("==> {what}");
    let out = cmd.current_dir(root()).output().map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or(format!("{what}: no JSON output"))?;
    serde_json::from_str(line).map_err(|e| format!("{what}: bad JSON ({e}): {line}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if mid * 2 == v.len() {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// The suffix of the report keys of the passes under load.
const LOADED: &str = "@loaded";

/// Per round, the time of the row at `batch` under `key` + `suffix` (for PyTorch's scoring,
/// `pt_infer`: the faster of its two paths, as in the main table).
fn round_times(reports: &BTreeMap<String, Vec<Report>>, key: &str, suffix: &str, batch: u64) -> Vec<f64> {
    let at = |k: &str| -> Vec<f64> {
        reports
            .get(&format!("{k}{suffix}"))
            .map_or(Vec::new(), |v| v.iter().map(|r| r.ms(batch).unwrap_or(f64::NAN)).collect())
    };
    if key == "pt_infer" {
        at("pt_infer_slow").into_iter().zip(at("pt_infer_fast")).map(|(s, f)| s.min(f)).collect()
    } else {
        at(key)
    }
}

/// `--load`: each framework's slowdown with one core busy, from the idle and loaded passes of the
/// same rounds (the median of the rounds' loaded / idle ratios), against the target that
/// rankstack slows down no more than PyTorch.
fn load_table(reports: &BTreeMap<String, Vec<Report>>, rounds: usize) -> String {
    let mut t = String::from(
        "\n### Under load\n\nEvery round also ran each process with one core kept busy by another process (a shell \
         busy loop started after the round's idle pass and stopped after its loaded pass). Slowdown: the median over \
         the rounds of loaded ms / idle ms of the same round.\n\n\
         | row | rankstack idle → loaded ms | slowdown | PyTorch idle → loaded ms | slowdown | rankstack slows down no more |\n\
         |---|---|---|---|---|---|\n",
    );
    let rows = [1u64, 64, 512, 2048].map(|b| (format!("scoring f32, batch {b}"), "rs_infer", "pt_infer", b));
    let train = ("training step f32, batch 512".to_string(), "rs_train", "pt_train", 512);
    for (name, rs, pt, b) in rows.into_iter().chain([train]) {
        let side = |key: &str| {
            let (idle, loaded) = (round_times(reports, key, "", b), round_times(reports, key, LOADED, b));
            let slowdown = median(idle.iter().zip(&loaded).map(|(i, l)| l / i).collect());
            (median(idle), median(loaded), slowdown)
        };
        let ((ri, rl, rs_slow), (pi, pl, pt_slow)) = (side(rs), side(pt));
        t.push_str(&format!(
            "| {name} | {ri:.2} → {rl:.2} | {rs_slow:.2}× | {pi:.2} → {pl:.2} | {pt_slow:.2}× | {} |\n",
            if rs_slow <= pt_slow { "yes" } else { "no" }
        ));
    }
    t.push_str(&format!(
        "\n({rounds} rounds. The idle columns are the same runs as the table above; for PyTorch's scoring they \
         take the faster of its two paths round by round, where the table above compares the paths' medians.)\n"
    ));
    t
}

/// Another process spinning on one core, killed when dropped (and ending by itself after an hour).
struct BusyLoop(std::process::Child);

impl BusyLoop {
    fn start() -> Result<Self> {
        let child = Command::new("sh")
            .args(["-c", "end=$(( $(date +%s) + 3600 )); while [ $(date +%s) -lt $end ]; do i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; done"])
            .spawn()
            .map_err(|e| format!("--load: cannot start the busy loop: {e}"))?;
        eprintln!("==> one core loaded by a busy loop (pid {})", child.id());
        Ok(Self(child))
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo xtask bench-compare`.
pub fn bench_compare(args: &[String]) -> Result<()> {
    let mut rounds = 3usize;
    let mut threads = 2usize;
    let mut cpu: Option<String> = None;
    let mut load = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--load" {
            load = true;
            continue;
        }
        if a == "--cpu" {
            let v = it.next().ok_or("--cpu needs avx512, avx2 or generic")?;
            if !["avx512", "avx2", "generic"].contains(&v.as_str()) {
                return Err(format!("--cpu {v}: expected avx512, avx2 or generic"));
            }
            cpu = Some(v.clone());
            continue;
        }
        let mut value = |name: &str| -> Result<usize> {
            it.next().and_then(|v| v.parse().ok()).filter(|&v| v > 0).ok_or(format!("{name} needs a positive integer"))
        };
        match a.as_str() {
            "--rounds" => rounds = value("--rounds")?,
            "--threads" => threads = value("--threads")?,
            other => {
                return Err(format!(
                    "bench-compare: unknown argument `{other}` (use --rounds N, --threads T, --cpu PATH, --load)"
                ))
            }
        }
    }
    run("build examples/bench_compare (release)", cargo().args(["build", "--release", "--example", "bench_compare"]))?;
    ensure_venv()?;
    let dir = root().join("target/bench-compare");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bin = root().join("target/release/examples/bench_compare");
    // One instruction-set path for both sides (`--cpu`).
    let torch_isa: &[(&str, &str)] = match cpu.as_deref() {
        Some("avx512") => &[
            ("ATEN_CPU_CAPABILITY", "avx512"),
            ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16"),
            ("MKL_ENABLE_INSTRUCTIONS", "AVX512"),
        ],
        Some("avx2") => {
            &[("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")]
        }
        Some(_) => &[
            ("ATEN_CPU_CAPABILITY", "default"),
            ("ONEDNN_MAX_CPU_ISA", "SSE41"),
            ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2"),
        ],
        None => &[],
    };
    let rust = |what: &str, mode: &str| -> Result<Value> {
        let mut cmd = Command::new(&bin);
        cmd.arg(mode).arg(&dir).env("RAYON_NUM_THREADS", threads.to_string());
        if let Some(cpu) = &cpu {
            cmd.env("RANKSTACK_CPU", cpu);
        }
        capture(what, &mut cmd)
    };
    let torch = |what: &str, mode: &str, flags: &[&str]| -> Result<Value> {
        let mut cmd = Command::new(venv_python());
        cmd.args(["-m", "rankstack_ref.bench_compare", mode])
            .arg(&dir)
            .args(flags)
            .args(["--threads", &threads.to_string()])
            .env("PYTHONPATH", root().join("reference"))
            .env("OMP_NUM_THREADS", threads.to_string())
            .envs(torch_isa.iter().copied());
        capture(what, &mut cmd)
    };

    let model = rust("rankstack: write checkpoint and inputs", "prepare")?;
    let check = torch("PyTorch: check the outputs agree", "check", &[])?;
    let gemm_rust = rust("rankstack: f32 GEMM rate", "gemm")?;
    let gemm_torch = torch("PyTorch: f32 GEMM rate", "gemm", &[])?;

    // One pass of every timed process, its reports filed under `key + suffix`.
    let pass = |reports: &mut BTreeMap<String, Vec<Report>>, r: &str, suffix: &str| -> Result<()> {
        let mut add = |key: &str, v: Value| reports.entry(format!("{key}{suffix}")).or_default().push(Report(v));
        add("rs_infer", rust(&format!("{r}: rankstack scoring"), "infer")?);
        add("rs_infer_bf16", rust(&format!("{r}: rankstack scoring, bf16 weights"), "infer-bf16")?);
        add("pt_infer_slow", torch(&format!("{r}: PyTorch scoring"), "infer", &[])?);
        add("pt_infer_fast", torch(&format!("{r}: PyTorch scoring, fast path"), "infer", &["--fastpath"])?);
        add(
            "pt_infer_bf16",
            torch(&format!("{r}: PyTorch scoring, bf16 autocast"), "infer", &["--fastpath", "--bf16"])?,
        );
        add("rs_train", rust(&format!("{r}: rankstack training step"), "train")?);
        add("pt_train", torch(&format!("{r}: PyTorch training step"), "train", &[])?);
        Ok(())
    };
    let mut reports: BTreeMap<String, Vec<Report>> = BTreeMap::new();
    for round in 1..=rounds {
        let r = format!("round {round}/{rounds}");
        pass(&mut reports, &r, "")?;
        if load {
            // The loaded pass right after the idle one, so that both see the same machine.
            let _busy = BusyLoop::start()?;
            pass(&mut reports, &format!("{r}, one core loaded"), LOADED)?;
        }
    }
    // Every report first, so that nothing measured is lost if a table cannot be made.
    let raw: Vec<String> = reports.iter().flat_map(|(k, v)| v.iter().map(move |r| format!("{k}\t{}", r.0))).collect();
    std::fs::write(dir.join("raw.tsv"), raw.join("\n") + "\n").map_err(|e| format!("raw.tsv: {e}"))?;
    let ms = |key: &str, batch: u64| median(reports[key].iter().filter_map(|r| r.ms(batch)).collect());
    let rss = |key: &str| median(reports[key].iter().map(Report::rss).collect());

    let flops = model["flops_per_candidate"].as_f64().unwrap_or(f64::NAN);
    let gemm_rs = gemm_rust["gflops"].as_f64().unwrap_or(f64::NAN);
    let gemm_pt = gemm_torch["gflops"].as_f64().unwrap_or(f64::NAN);
    let machine_gemm = gemm_rs.max(gemm_pt);
    let mut t = String::new();
    if let Some(cpu) = &cpu {
        t.push_str(&format!("CPU path: `{cpu}` on both sides (`--cpu {cpu}`).\n\n"));
    }
    t.push_str(&format!(
        "Model `homefeed-bench`: {:.1}M parameters, {:.1} MFLOP per candidate (forward). {threads} threads each, \
         median over {rounds} alternating rounds. f32 GEMM 2048³: rankstack {gemm_rs:.1} GFLOP/s, PyTorch \
         {gemm_pt:.1} GFLOP/s (machine rate = the higher). Outputs agree: max |Δp| = {:.2e}.\n\n",
        model["parameters"].as_f64().unwrap_or(f64::NAN) / 1e6,
        flops / 1e6,
        check["max_abs_probability_difference"].as_f64().unwrap_or(f64::NAN),
    ));
    t.push_str(
        "| row | rankstack ms | PyTorch ms | rankstack cand/s | PyTorch cand/s | rankstack GFLOP/s (% of GEMM) | rankstack / PyTorch |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|\n");
    for b in [1u64, 64, 512, 2048] {
        let rs = ms("rs_infer", b);
        let (slow, fast) = (ms("pt_infer_slow", b), ms("pt_infer_fast", b));
        let (pt, which) = if fast < slow { (fast, "fast path") } else { (slow, "no fast path") };
        let gflops = b as f64 * flops / (rs / 1e3) / 1e9;
        t.push_str(&format!(
            "| scoring f32, batch {b} (PyTorch: {which}) | {rs:.2} | {pt:.2} | {:.0} | {:.0} | {gflops:.1} ({:.0}%) | {:.2} |\n",
            b as f64 / rs * 1e3,
            b as f64 / pt * 1e3,
            100.0 * gflops / machine_gemm,
            pt / rs
        ));
    }
    let worst = |key: &str| {
        reports[key].iter().filter_map(|r| r.0["max_abs_probability_difference_from_f32"].as_f64()).fold(0f64, f64::max)
    };
    for b in [1u64, 64, 512, 2048] {
        let (rs, pt) = (ms("rs_infer_bf16", b), ms("pt_infer_bf16", b));
        t.push_str(&format!(
            "| scoring bf16, batch {b} (PyTorch: autocast) | {rs:.2} | {pt:.2} | {:.0} | {:.0} | {:.1} | {:.2} |\n",
            b as f64 / rs * 1e3,
            b as f64 / pt * 1e3,
            b as f64 * flops / (rs / 1e3) / 1e9,
            pt / rs
        ));
    }
    let (rs, pt) = (ms("rs_train", 512), ms("pt_train", 512));
    t.push_str(&format!(
        "| training step f32, batch 512 (forward, backward, AdamW) | {rs:.1} | {pt:.1} | {:.0} | {:.0} | {:.1} (fwd+bwd ≈ 3× fwd) | {:.2} |\n",
        512.0 / rs * 1e3,
        512.0 / pt * 1e3,
        3.0 * 512.0 * flops / (rs / 1e3) / 1e9,
        pt / rs
    ));
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let best_pt_infer = rss("pt_infer_slow").min(rss("pt_infer_fast"));
    t.push_str(&format!(
        "| peak RSS, scoring (GiB) | {:.2} | {:.2} | | | | {:.2} |\n",
        gib(rss("rs_infer")),
        gib(best_pt_infer),
        rss("rs_infer") / best_pt_infer
    ));
    t.push_str(&format!(
        "| peak RSS, training (GiB) | {:.2} | {:.2} | | | | {:.2} |\n",
        gib(rss("rs_train")),
        gib(rss("pt_train")),
        rss("rs_train") / rss("pt_train")
    ));
    t.push_str(&format!(
        "\nbf16 against f32, largest probability difference over all batches: rankstack (bf16 weights, f32 \
         accumulation) {:.2e}, PyTorch autocast {:.2e}. bf16 rows show GFLOP/s without a percentage (the f32 \
         GEMM rate is not their ceiling).\n",
        worst("rs_infer_bf16"),
        worst("pt_infer_bf16")
    ));
    t.push_str(
        "\nTime ratios are PyTorch ms / rankstack ms (above 1: rankstack is faster); memory ratios are \
         rankstack / PyTorch (below 1: rankstack uses less).\n",
    );
    if load {
        t.push_str(&load_table(&reports, rounds));
    }
    std::fs::write(dir.join("table.md"), &t).map_err(|e| format!("table.md: {e}"))?;
    println!("{t}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Reports of one process per round: `ms[round]` at every batch.
    fn reports(ms: &[f64]) -> Vec<Report> {
        ms.iter()
            .map(|&m| {
                let rows: Vec<Value> = [1, 64, 512, 2048].iter().map(|b| json!({"batch": b, "median_ms": m})).collect();
                Report(json!({ "rows": rows }))
            })
            .collect()
    }

    #[test]
    fn the_load_table_pairs_each_round_and_takes_pytorchs_faster_path() {
        let mut r: BTreeMap<String, Vec<Report>> = BTreeMap::new();
        r.insert("rs_infer".into(), reports(&[10.0, 20.0]));
        r.insert(format!("rs_infer{LOADED}"), reports(&[12.0, 26.0])); // 1.2×, 1.3×
        r.insert("pt_infer_slow".into(), reports(&[40.0, 40.0]));
        r.insert("pt_infer_fast".into(), reports(&[30.0, 50.0])); // faster per round: 30, 40
        r.insert(format!("pt_infer_slow{LOADED}"), reports(&[45.0, 60.0]));
        r.insert(format!("pt_infer_fast{LOADED}"), reports(&[33.0, 70.0])); // 33 / 30, 60 / 40
        r.insert("rs_train".into(), reports(&[100.0, 100.0]));
        r.insert(format!("rs_train{LOADED}"), reports(&[300.0, 300.0]));
        r.insert("pt_train".into(), reports(&[200.0, 200.0]));
        r.insert(format!("pt_train{LOADED}"), reports(&[400.0, 400.0]));
        let t = load_table(&r, 2);
        assert!(t.contains("| scoring f32, batch 1 | 15.00 → 19.00 | 1.25× | 35.00 → 46.50 | 1.30× | yes |"), "{t}");
        assert!(
            t.contains("| training step f32, batch 512 | 100.00 → 300.00 | 3.00× | 200.00 → 400.00 | 2.00× | no |"),
            "{t}"
        );
    }
}
