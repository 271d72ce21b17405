//! The `rankstack` command line: train a ranker, evaluate and score with it, serve it over HTTP,
//! inspect its cost, make data. Every error is one readable line on stderr and a non-zero exit code.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rankstack::commands;
use rankstack::device::DeviceSpec;
use rankstack::nn::InitScheme;
use rankstack::train::{AdamWConfig, TrainOptions};

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: rankstack::nn::Error| e.to_string())
}

/// `--init xavier-normal|layers`.
fn parse_init(s: &str) -> Result<InitScheme, String> {
    [InitScheme::XavierNormal, InitScheme::Layers]
        .into_iter()
        .find(|scheme| scheme.name() == s)
        .ok_or_else(|| format!("unknown initialisation `{s}` (expected xavier-normal or layers)"))
}

/// `--batch-size N|auto`.
#[derive(Debug, Clone, Copy)]
enum BatchSize {
    Rows(usize),
    Auto,
}

fn parse_batch_size(s: &str) -> Result<BatchSize, String> {
    match s {
        "auto" => Ok(BatchSize::Auto),
        n => n.parse().map(BatchSize::Rows).map_err(|_| format!("{s:?}: expected a number of rows or `auto`")),
    }
}

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

/// Says on stderr what `--weights bf16` computes with on this CPU (it depends on the instruction
/// set: AVX512-BF16 dot products, or bf16 weights widened to f32 in the AVX2 kernel, or candle).
fn announce_weights(weights: Weights, device: DeviceSpec) {
    if matches!(weights, Weights::Bf16) && device.is_cpu() {
        eprintln!("--weights bf16: {}", rankstack::kernels::cpu::bf16_path_description());
    }
}

/// How `eval` and `score` run the model.
#[derive(Debug, Args)]
struct ScoringArgs {
    /// Rows per batch.
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// How linear weights are packed for scoring.
    #[arg(long, value_enum, default_value_t = Weights::F32)]
    weights: Weights,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceSpec,
}

/// `rankstack import --from`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImportFrom {
    /// torchrec CrossNet or VectorCrossNet.
    TorchrecCrossnet,
    /// torchrec LowRankCrossNet.
    TorchrecLowrank,
    /// torchrec LowRankMixtureCrossNet.
    TorchrecMixture,
    /// Pinterest's TransAct module.
    Transact,
    /// Twitter's recap MaskNet (parallel or serial).
    TwitterMasknet,
    /// torch.nn.TransformerEncoder.
    TorchTransformer,
}

impl From<ImportFrom> for commands::ImportSource {
    fn from(value: ImportFrom) -> Self {
        match value {
            ImportFrom::TorchrecCrossnet => Self::TorchrecCrossNet,
            ImportFrom::TorchrecLowrank => Self::TorchrecLowRank,
            ImportFrom::TorchrecMixture => Self::TorchrecMixture,
            ImportFrom::Transact => Self::TransAct,
            ImportFrom::TwitterMasknet => Self::TwitterMaskNet,
            ImportFrom::TorchTransformer => Self::TorchTransformer,
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
        #[command(flatten)]
        scoring: ScoringArgs,
        /// Directory for the reliability diagrams (`reliability-<data stem>.svg`, calibration by
        /// decile per task); default: the --checkpoint directory.
        #[arg(long)]
        plots: Option<PathBuf>,
    },
    /// Write per-task probabilities for every row of a Parquet file.
    Score {
        /// Checkpoint directory, or a training run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Parquet file (label columns optional).
        #[arg(long)]
        data: PathBuf,
        /// Output file: .parquet or .csv (never the --data file; written atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        scoring: ScoringArgs,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
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
    /// Import a peer framework's PyTorch state dict (saved as safetensors) into a single-layer
    /// rankstack checkpoint (docs/compatibility.md).
    Import {
        /// The peer module the state dict comes from.
        #[arg(long, value_enum)]
        from: ImportFrom,
        /// The state dict, saved with `safetensors.torch.save_file(module.state_dict(), PATH)`.
        state_dict: PathBuf,
        /// The rankstack layer config (JSON) that reproduces the peer module.
        #[arg(long)]
        config: PathBuf,
        /// The layer's input width (torchrec cross networks, Twitter MaskNet; read off the state dict
        /// when left out).
        #[arg(long)]
        input_dim: Option<usize>,
        /// The checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing checkpoint directory.
        #[arg(long)]
        force: bool,
    },
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
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceSpec,
    /// Pin each kernel worker thread to its own CPU (Linux): faster answers after idle gaps on
    /// dedicated cores, slower when other processes compete for the cores (docs/serving.md).
    #[arg(long)]
    pin_threads: bool,
}

impl ServeCmd {
    fn into_options(self) -> rankstack::nn::Result<commands::ServeOptions> {
        Ok(commands::ServeOptions {
            checkpoint: self.checkpoint,
            addr: self.addr,
            model_name: self.model_name,
            weights: self.weights.into(),
            device: self.device.open()?,
            batching: rankstack::serve::BatcherConfig {
                max_batch: self.max_batch,
                max_queue_delay: std::time::Duration::from_micros(self.max_queue_delay_us),
                max_queue: self.max_queue,
            },
            max_body_bytes: self.max_body_bytes,
            http_threads: self.http_threads,
            pin_threads: self.pin_threads,
        })
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
        /// Output Parquet file (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Convert MovieLens-100k (fetch it with scripts/fetch-movielens.sh) to train/test Parquet.
    Movielens {
        /// Directory holding ml-100k.inter, ml-100k.user, ml-100k.item.
        #[arg(long, default_value = "data/ml-100k")]
        input: PathBuf,
        /// Output directory (train.parquet, test.parquet; written atomically).
        #[arg(long)]
        out_dir: PathBuf,
        /// Replace train.parquet and test.parquet if they exist.
        #[arg(long)]
        force: bool,
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
    /// Training Parquet file (requires --eval); without it, synthetic data is generated into OUT/data.
    #[arg(long, requires = "eval")]
    data: Option<PathBuf>,
    /// Evaluation Parquet file (requires --data).
    #[arg(long, requires = "data")]
    eval: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, training_curves.svg, tensorboard/).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (with the same --batch-size, --seed,
    /// embedding-gradient mode and data schema as the run had).
    #[arg(long)]
    resume: bool,
    /// With --resume: accept a --batch-size, --seed, embedding-gradient mode or data schema that
    /// differs from the checkpoint's (the run then no longer reproduces an uninterrupted one).
    #[arg(long, requires = "resume")]
    allow_resume_changes: bool,
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Examples per step, or `auto`: the largest batch whose planned training memory (the cost
    /// planner, `rankstack inspect`) fits in --memory-fraction of the device's memory.
    #[arg(long, default_value = "256", value_parser = parse_batch_size)]
    batch_size: BatchSize,
    /// With --batch-size auto: the fraction of the device's memory a training step may plan to use
    /// (the paper targets 60% of GPU memory).
    #[arg(long, default_value_t = 0.6)]
    memory_fraction: f64,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceSpec,
    /// Precision of the linear layers' products: f32, or bf16 autocast on a GPU (bf16 products,
    /// f32 master weights, optimizer, loss and everything else).
    #[arg(long, value_enum, default_value_t = Weights::F32)]
    precision: Weights,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 50)]
    warmup_steps: u64,
    /// Gradient-norm clipping: a positive number, or 0 to disable.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows of synthetic training data (without --data).
    #[arg(long, default_value_t = 20_000)]
    synthetic_rows: usize,
    /// Log the mean loss, learning rate and gradient norm every N steps (metrics.jsonl,
    /// TensorBoard, curves).
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Checkpoint every N steps (N > 0) as well as at each epoch end.
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
    /// Initial weights of a fresh run: `layers` (each layer's own initialisation, e.g. feature
    /// tables N(0, 1/dim)) or `xavier-normal` (every matrix and embedding table Xavier-normal, zero
    /// biases). The PyTorch reference trainer draws the same conventions (its --init).
    #[arg(long, default_value = "layers", value_parser = parse_init)]
    init: InitScheme,
}

impl TrainCmd {
    fn into_args(self) -> commands::TrainArgs {
        let options = TrainOptions {
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: match self.batch_size {
                BatchSize::Rows(n) => n,
                BatchSize::Auto => 0, // chosen by commands::train from the planner
            },
            device: self.device,
            bf16_autocast: matches!(self.precision, Weights::Bf16),
            optimizer: AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..AdamWConfig::default() },
            warmup_steps: self.warmup_steps,
            // Exactly 0 disables clipping; anything else (negative, NaN) is validated by the trainer.
            grad_clip_norm: (self.grad_clip != 0.0).then_some(self.grad_clip),
            seed: self.seed,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
            stop_after: self.stop_after,
            quiet: self.quiet,
            row_sparse_embeddings: !self.dense_embedding_gradients,
            init: self.init,
            ..TrainOptions::default()
        };
        commands::TrainArgs {
            preset: self.preset,
            config: self.config,
            data: self.data,
            eval: self.eval,
            out: self.out,
            resume: self.resume,
            allow_resume_changes: self.allow_resume_changes,
            synthetic_rows: self.synthetic_rows,
            auto_batch: matches!(self.batch_size, BatchSize::Auto).then_some(self.memory_fraction),
            options,
        }
    }
}

fn run(cli: Cli) -> rankstack::nn::Result<String> {
    match cli.command {
        Command::Presets { show: None } => Ok(commands::presets_listing()),
        Command::Presets { show: Some(name) } => Ok(rankstack::ranker_model::presets::preset(&name)?.to_toml_string()),
        Command::Train(t) => commands::train(&t.into_args()),
        Command::Eval { checkpoint, data, scoring: s, plots } => {
            announce_weights(s.weights, s.device);
            commands::eval(&checkpoint, &data, s.batch_size, s.weights.into(), s.device, plots.as_deref())
        }
        Command::Score { checkpoint, data, out, scoring: s, force } => {
            announce_weights(s.weights, s.device);
            commands::score(&checkpoint, &data, &out, s.batch_size, s.weights.into(), s.device, force)
        }
        Command::Serve(s) => {
            announce_weights(s.weights, s.device);
            commands::serve(s.into_options()?)
        }
        Command::Inspect { preset, config, batch_size, device_memory_gib, fraction } => {
            commands::inspect(&preset, config.as_deref(), batch_size, device_memory_gib, fraction)
        }
        Command::Data(DataCmd::Synthetic { rows, seed, stream, out, force }) => {
            commands::data_synthetic(rows, seed, stream, &out, force)
        }
        Command::Data(DataCmd::Movielens { input, out_dir, force }) => {
            commands::data_movielens(&input, &out_dir, force)
        }
        Command::Import { from, state_dict, config, input_dim, out, force } => commands::import(
            from.into(),
            &commands::ImportArgs { state_dict: &state_dict, config: &config, input_dim, out: &out, force },
        ),
    }
}

fn main() -> ExitCode {
    // A bug must still read as one line, not a Rust panic report.
    std::panic::set_hook(Box::new(|info| {
        if rankstack::data::panic_is_handled() {
            return; // a damaged file's metadata, caught and reported as an error by the reader
        }
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        eprintln!("rankstack: internal error: {}", what.lines().next().unwrap_or(""));
    }));
    // Tensor intermediates are large and short-lived: keep freed memory for reuse (see the docs).
    rankstack::memory::retain_freed_memory();
    // candle's spinning element-wise pool stalls when another process has a core (see the docs).
    rankstack::cpu_threads::single_threaded_elementwise_ops();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's report is several lines: what is wrong (for a missing argument, its name is on
            // the next lines), then usage and hints. Keep what is wrong, as one line.
            let text = e.to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .collect();
            let what = if what.is_empty() { "invalid arguments".to_string() } else { what.join(" ") };
            eprintln!("rankstack: error: {what} (see `rankstack --help`)");
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
