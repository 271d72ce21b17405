//! The `rankstack` command line: train a ranker, evaluate and score with it, serve it over HTTP,
//! inspect its cost, make data. Every error is one readable line on stderr and a non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rankstack::commands;
use rankstack::train::{AdamWConfig, TrainOptions};

/// Feed-ranking models (Pinterest Homefeed architecture) in Rust, on candle.
#[derive(Debug, Parser)]
#[command(name = "rankstack", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--weights` of `eval`, `score` and `serve`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Weights {
    /// The training model's scores, up to f32 summation order.
    F32,
    /// bf16 weights and activations with f32 accumulation: faster on CPUs with AVX512-BF16;
    /// probabilities move by 1e-3 to 3e-2 depending on the model (larger logits, larger moves),
    /// so compare both on a sample before serving (docs/performance.md).
    Bf16,
}

impl From<Weights> for rankstack::nn::packed_matmul::WeightPrecision {
    fn from(w: Weights) -> Self {
        match w {
            Weights::F32 => Self::F32,
            Weights::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the model presets.
    Presets {
        /// Print this preset's full config as TOML instead.
        #[arg(long)]
        show: Option<String>,
    },
    /// Train a model (on the built-in synthetic data unless --data is given).
    Train(TrainCmd),
    /// Evaluate a checkpoint on a labelled Parquet file.
    Eval {
        /// Checkpoint directory, or a training run directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Parquet file.
        #[arg(long)]
        data: PathBuf,
        /// Rows per batch.
        #[arg(long, default_value_t = 1024)]
        batch_size: usize,
        /// How linear weights are packed for scoring.
        #[arg(long, value_enum, default_value_t = Weights::F32)]
        weights: Weights,
    },
    /// Write per-task probabilities for every row of a Parquet file.
    Score {
        /// Checkpoint directory, or a training run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Parquet file (label columns optional).
        #[arg(long)]
        data: PathBuf,
        /// Output file: .parquet or .csv.
        #[arg(long)]
        out: PathBuf,
        /// Rows per batch.
        #[arg(long, default_value_t = 1024)]
        batch_size: usize,
        /// How linear weights are packed for scoring.
        #[arg(long, value_enum, default_value_t = Weights::F32)]
        weights: Weights,
    },
    /// Serve a checkpoint over HTTP (Open Inference Protocol / KServe v2) with dynamic batching.
    Serve(ServeCmd),
    /// Print the cost planner's table: parameters, FLOPs and memory per module.
    Inspect {
        /// Preset name.
        #[arg(long, default_value = "pinterest-homefeed")]
        preset: String,
        /// Config file (overrides --preset).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Batch size for the memory figures.
        #[arg(long, default_value_t = 512)]
        batch_size: usize,
        /// Device memory in GiB: also answer "does training fit?".
        #[arg(long)]
        device_memory_gib: Option<f64>,
        /// Fraction of the device memory that may be used.
        #[arg(long, default_value_t = 0.6)]
        fraction: f64,
    },
    /// Make training data.
    #[command(subcommand)]
    Data(DataCmd),
}

/// `rankstack serve` (docs/serving.md).
#[derive(Debug, Args)]
struct ServeCmd {
    /// Checkpoint directory, or a training run directory (its LATEST; re-read on each reload).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: std::net::SocketAddr,
    /// The model's name in the URLs (/v2/models/NAME/infer).
    #[arg(long, default_value = "ranker")]
    model_name: String,
    /// How linear weights are packed for scoring.
    #[arg(long, value_enum, default_value_t = Weights::F32)]
    weights: Weights,
    /// Most candidates scored in one batch (larger requests are refused).
    #[arg(long, default_value_t = 1024)]
    max_batch: usize,
    /// Longest wait, in microseconds, of the oldest queued request for others to join its batch.
    #[arg(long, default_value_t = 2000)]
    max_queue_delay_us: u64,
    /// Most requests waiting; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Threads answering HTTP (scoring runs on its own thread and the model's thread pool).
    #[arg(long, default_value_t = 2)]
    http_threads: usize,
}

impl ServeCmd {
    fn into_options(self) -> commands::ServeOptions {
        commands::ServeOptions {
            checkpoint: self.checkpoint,
            addr: self.addr,
            model_name: self.model_name,
            weights: self.weights.into(),
            device: candle_core::Device::Cpu,
            batching: rankstack::serve::BatcherConfig {
                max_batch: self.max_batch,
                max_queue_delay: std::time::Duration::from_micros(self.max_queue_delay_us),
                max_queue: self.max_queue,
            },
            max_body_bytes: self.max_body_bytes,
            http_threads: self.http_threads,
        }
    }
}

#[derive(Debug, Subcommand)]
enum DataCmd {
    /// The built-in synthetic Homefeed-like data (hidden teacher with planted interactions).
    Synthetic {
        /// Rows to write.
        #[arg(long, default_value_t = 20_000)]
        rows: usize,
        /// Seed of the world and the teacher.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Row stream (same world, different rows: use 1 for a held-out set).
        #[arg(long, default_value_t = 0)]
        stream: u64,
        /// Output Parquet file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert MovieLens-100k (fetch it with scripts/fetch-movielens.sh) to train/test Parquet.
    Movielens {
        /// Directory holding ml-100k.inter, ml-100k.user, ml-100k.item.
        #[arg(long, default_value = "data/ml-100k")]
        input: PathBuf,
        /// Output directory (train.parquet, test.parquet).
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct TrainCmd {
    /// Architecture preset (see `rankstack presets`).
    #[arg(long, default_value = "pinterest-homefeed")]
    preset: String,
    /// Architecture config file (TOML or JSON; overrides --preset). Features and tasks come from the data.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training Parquet file; without it, synthetic data is generated into OUT/data.
    #[arg(long, requires = "eval")]
    data: Option<PathBuf>,
    /// Evaluation Parquet file.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, training_curves.svg).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Examples per step.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 50)]
    warmup_steps: u64,
    /// Gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows of synthetic training data (without --data).
    #[arg(long, default_value_t = 20_000)]
    synthetic_rows: usize,
    /// Checkpoint every N steps as well as at each epoch end.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop with a checkpoint after this step (resume later with --resume).
    #[arg(long)]
    stop_after: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Dense embedding-table gradients and updates (every row, every step, as PyTorch's
    /// nn.Embedding with AdamW) instead of the default row-sparse, lazy updates.
    #[arg(long)]
    dense_embedding_gradients: bool,
}

impl TrainCmd {
    fn into_args(self) -> commands::TrainArgs {
        let options = TrainOptions {
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            optimizer: AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..AdamWConfig::default() },
            warmup_steps: self.warmup_steps,
            grad_clip_norm: (self.grad_clip > 0.0).then_some(self.grad_clip),
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            stop_after: self.stop_after,
            quiet: self.quiet,
            row_sparse_embeddings: !self.dense_embedding_gradients,
            ..TrainOptions::default()
        };
        commands::TrainArgs {
            preset: self.preset,
            config: self.config,
            data: self.data,
            eval: self.eval,
            out: self.out,
            resume: self.resume,
            synthetic_rows: self.synthetic_rows,
            options,
        }
    }
}

fn run(cli: Cli) -> rankstack::nn::Result<String> {
    match cli.command {
        Command::Presets { show: None } => Ok(commands::presets_listing()),
        Command::Presets { show: Some(name) } => Ok(rankstack::ranker_model::presets::preset(&name)?.to_toml_string()),
        Command::Train(t) => commands::train(&t.into_args()),
        Command::Eval { checkpoint, data, batch_size, weights } => {
            commands::eval(&checkpoint, &data, batch_size, weights.into())
        }
        Command::Score { checkpoint, data, out, batch_size, weights } => {
            commands::score(&checkpoint, &data, &out, batch_size, weights.into())
        }
        Command::Serve(s) => commands::serve(s.into_options()),
        Command::Inspect { preset, config, batch_size, device_memory_gib, fraction } => {
            commands::inspect(&preset, config.as_deref(), batch_size, device_memory_gib, fraction)
        }
        Command::Data(DataCmd::Synthetic { rows, seed, stream, out }) => {
            commands::data_synthetic(rows, seed, stream, &out)
        }
        Command::Data(DataCmd::Movielens { input, out_dir }) => commands::data_movielens(&input, &out_dir),
    }
}

fn main() -> ExitCode {
    // A bug must still read as one line, not a Rust panic report.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        eprintln!("rankstack: internal error: {}", what.lines().next().unwrap_or(""));
    }));
    // Tensor intermediates are large and short-lived: keep freed memory for reuse (see the docs).
    rankstack::nn::memory::retain_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's report is several lines (usage, hints); keep the first, which says what is wrong.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("rankstack: error: {first} (see `rankstack --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', "; ");
            eprintln!("rankstack: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
