//! Prints the cost planner's report for every preset (the content of `docs/cost-planner.md`).
//!
//! `cargo run --example cost_report [-- BATCH DEVICE_GIB FRACTION] > docs/cost-planner.md`

#![forbid(unsafe_code)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let batch = args.first().map(|s| s.parse()).transpose()?.unwrap_or(512);
    let device_gib = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(80.0);
    let fraction = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0.6);
    print!("{}", rankstack::ranker_model::presets::cost_document(batch, device_gib, fraction)?);
    Ok(())
}
