//! The `rankstack` command line. Training, scoring and inspection subcommands arrive with the
//! trainer; for now it reports its version and the layers it was built with.

use clap::Parser;

/// Feed-ranking models (Pinterest Homefeed architecture) in Rust, on candle.
#[derive(Debug, Parser)]
#[command(name = "rankstack", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "rankstack {}: layers dcnv2, masknet, feature-encoders, sequence-transformer. Run `rankstack --help`.",
        env!("CARGO_PKG_VERSION")
    );
}
