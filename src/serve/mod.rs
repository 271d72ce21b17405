//! `rankstack serve`: an online scoring server speaking the Open Inference Protocol (KServe v2 /
//! Triton HTTP/REST) with a dynamic batcher. See `docs/serving.md` for the protocol surface, the
//! error codes and the measurements.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`ServeOptions`] and [`serve`]: load, bind, run until SIGTERM/SIGINT, drain |
//! | `signature.rs` | [`ModelSignature`]: the model's inputs and outputs, from its feature schema |
//! | `request.rs` | an infer request's body (JSON or binary tensors) → checked rows |
//! | `response.rs` | probabilities → the infer response (JSON or binary outputs) |
//! | `batcher.rs` | [`Batcher`]: the bounded queue and the scoring thread |
//! | `model.rs` | [`ServedModel`] and [`ModelSlot`] (atomic hot reload) |
//! | `http.rs` | the axum router: health, metadata, infer, repository, metrics |
//! | `metrics.rs` | Prometheus text metrics |
//! | `log.rs` | JSON-lines logs on stderr |

mod batcher;
mod http;
mod log;
mod metrics;
mod model;
mod request;
mod response;
mod signature;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::{Error, Result};
use serde_json::json;

pub use batcher::{Batcher, BatcherConfig};
pub use model::{ModelSlot, ServedModel};
pub use signature::{Datatype, InputRole, InputSpec, ModelSignature};

/// Everything `rankstack serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A checkpoint directory, or a training run (its `LATEST`, re-read on each reload).
    pub checkpoint: PathBuf,
    /// Address to listen on (port 0: any free port; the bound address is printed).
    pub addr: SocketAddr,
    /// The model's name in the protocol's URLs.
    pub model_name: String,
    /// How linear weights are packed (CPU).
    pub weights: WeightPrecision,
    /// Where the model scores (the CPU unless a GPU build passes one).
    pub device: Device,
    /// Batching limits.
    pub batching: BatcherConfig,
    /// Largest accepted request body in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Threads answering HTTP (scoring has its own thread and the model's thread pool).
    pub http_threads: usize,
    /// Pin each of the kernels' worker threads to its own CPU before loading the model
    /// ([`crate::cpu_threads::pin_kernel_workers`]): lower latency on dedicated cores, slower when
    /// other processes compete for them.
    pub pin_threads: bool,
}

impl ServeOptions {
    /// Checks the options that can be checked before loading anything.
    pub fn validate(&self) -> Result<()> {
        self.batching.validate()?;
        let name_ok = !self.model_name.is_empty()
            && self.model_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(Error::config(
                "serve",
                "model-name",
                format!("`{}`: use letters, digits, '-', '_', '.'", self.model_name),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(Error::config("serve", "max-body-bytes", "must be > 0"));
        }
        if self.http_threads == 0 {
            return Err(Error::config("serve", "http-threads", "must be > 0"));
        }
        Ok(())
    }
}

/// Loads the model, serves until SIGTERM or SIGINT, then stops accepting connections, answers
/// every request already received, and returns. Prints `listening on http://ADDR` on stdout once
/// the socket is bound (the tests and scripts read the port from it).
pub fn serve(options: ServeOptions) -> Result<String> {
    options.validate()?;
    if options.pin_threads {
        let cpus = crate::cpu_threads::pin_kernel_workers()?;
        log::log("info", "worker_threads_pinned", json!({"cpus": cpus}));
    }
    let started = std::time::Instant::now();
    let model = ServedModel::load(&options.checkpoint, options.weights, &options.device, 1)?;
    log::log(
        "info",
        "model_loaded",
        json!({"model": options.model_name, "version": 1, "checkpoint": model.checkpoint.display().to_string(),
               "weights": format!("{:?}", options.weights).to_lowercase(), "seconds": started.elapsed().as_secs_f64()}),
    );
    let slot = Arc::new(ModelSlot::new(model, options.checkpoint.clone(), options.weights));
    let metrics = Arc::new(metrics::Metrics::new());
    let (batcher, scoring_thread) = Batcher::start(options.batching, metrics.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.http_threads)
        .thread_name("rankstack-http")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::config("serve", "runtime", e.to_string()))?;
    let state = Arc::new(http::AppState::new(options.clone(), slot, batcher, metrics));
    let served = runtime.block_on(http::run(state.clone(), options.addr));
    // Every connection is closed: close the queue, let the scoring thread finish what it holds.
    state.close_queue();
    let _ = scoring_thread.join();
    runtime.shutdown_timeout(Duration::from_secs(1));
    served?;
    log::log("info", "stopped", json!({}));
    Ok(String::new())
}
