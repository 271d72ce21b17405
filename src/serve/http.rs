//! The HTTP surface: the Open Inference Protocol's REST endpoints (plus Triton's model config,
//! repository index and load), Prometheus metrics, JSON errors for every failure, graceful
//! shutdown.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v2` | server metadata (name, version, extensions) |
//! | `GET /v2/health/live`, `/v2/health/ready` | 200; ready is 503 while draining |
//! | `GET /v2/models/{name}[/versions/{v}]` | model metadata: inputs, outputs |
//! | `GET /v2/models/{name}[/versions/{v}]/ready` | 200, or 503 while draining |
//! | `GET /v2/models/{name}[/versions/{v}]/config` | Triton's model configuration |
//! | `POST /v2/models/{name}[/versions/{v}]/infer` | probabilities |
//! | `POST /v2/repository/index` | the one model, its version and state |
//! | `POST /v2/repository/models/{name}/load` | atomic hot reload |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are `{"error": "..."}`: 400 malformed request, 404 unknown model, version or path, 405
//! wrong method, 413 body over `--max-body-bytes`, 422 rows the model itself refused, 503 queue
//! full (with `Retry-After`), 504 deadline passed in the queue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::batcher::{Batcher, Job, Outcome};
use super::log::log;
use super::metrics::Metrics;
use super::model::ModelSlot;
use super::signature::Datatype;
use super::{request, response, ServeOptions};

/// The binary tensor extension's header: the length of the JSON part of a body.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// What every handler shares.
pub struct AppState {
    options: ServeOptions,
    slot: Arc<ModelSlot>,
    batcher: Mutex<Option<Batcher>>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
}

impl AppState {
    /// The state of a server about to start.
    pub fn new(options: ServeOptions, slot: Arc<ModelSlot>, batcher: Batcher, metrics: Arc<Metrics>) -> Self {
        Self { options, slot, batcher: Mutex::new(Some(batcher)), metrics, draining: AtomicBool::new(false) }
    }

    /// Closes the batcher's queue (after the last connection): the scoring thread drains and ends.
    pub fn close_queue(&self) {
        self.batcher.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn queue_depth(&self) -> usize {
        self.batcher.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, Batcher::depth)
    }
}

/// An error answer: status and message, as `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, json_body(&json!({"error": self.message}))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn json_body(value: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// The body, or the extractor's failure as a JSON error (413 over the size limit).
fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's --max-body-bytes".to_string()
        } else {
            format!("cannot read the request body: {}", r.body_text())
        };
        ApiError::new(status, message)
    })
}

/// Binds, prints the address, serves until SIGTERM/SIGINT, then drains (in-flight requests are
/// answered; the listener closes at once).
pub async fn run(state: Arc<AppState>, addr: SocketAddr) -> rankstack_nn::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| rankstack_nn::Error::config("serve", "addr", format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| rankstack_nn::Error::config("serve", "addr", e.to_string()))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{bound}");
        let _ = out.flush();
    }
    log("info", "listening", json!({"addr": bound.to_string(), "model": state.options.model_name}));
    let app = router(state.clone());
    let shutdown_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let signal = shutdown_signal().await;
            shutdown_state.draining.store(true, Ordering::SeqCst);
            log("info", "draining", json!({"signal": signal, "queued": shutdown_state.queue_depth()}));
        })
        .await
        .map_err(|e| rankstack_nn::Error::config("serve", "addr", format!("serving failed: {e}")))
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn shutdown_signal() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

fn router(state: Arc<AppState>) -> Router {
    let model = "/v2/models/{name}";
    let version = "/v2/models/{name}/versions/{version}";
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { json_body(&json!({"live": true})) }))
        .route("/v2/health/ready", get(server_ready))
        .route(model, get(model_metadata))
        .route(version, get(model_metadata))
        .route(&format!("{model}/ready"), get(model_ready))
        .route(&format!("{version}/ready"), get(model_ready))
        .route(&format!("{model}/config"), get(model_config))
        .route(&format!("{version}/config"), get(model_config))
        .route(&format!("{model}/infer"), post(infer))
        .route(&format!("{version}/infer"), post(infer))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see docs/serving.md)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method")
        })
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_responses))
        .with_state(state)
}

async fn count_responses(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state.metrics.http_response(response.status().as_u16());
    response
}

/// Checks the model name and the optional version of a `/v2/models/...` path.
fn check_model(state: &AppState, params: &HashMap<String, String>) -> Result<Arc<super::ServedModel>, ApiError> {
    let name = params.get("name").map(String::as_str).unwrap_or("");
    if name != state.options.model_name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model `{name}` (this server serves `{}`)", state.options.model_name),
        ));
    }
    let model = state.slot.current();
    if let Some(v) = params.get("version") {
        if *v != model.version.to_string() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("model `{name}` has no version `{v}` (serving version {})", model.version),
            ));
        }
    }
    Ok(model)
}

async fn server_metadata() -> Response {
    json_body(&json!({
        "name": "rankstack",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

async fn server_ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = !state.draining.load(Ordering::SeqCst);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, json_body(&json!({"ready": ready}))).into_response()
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(params): Path<HashMap<String, String>>) -> Response {
    match check_model(&state, &params) {
        Err(e) => e.into_response(),
        Ok(_) => server_ready(State(state)).await,
    }
}

async fn model_metadata(State(state): State<Arc<AppState>>, Path(params): Path<HashMap<String, String>>) -> Response {
    let model = match check_model(&state, &params) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let (inputs, outputs) = model.signature.metadata_tensors();
    json_body(&json!({
        "name": state.options.model_name,
        "versions": [model.version.to_string()],
        "platform": "rankstack",
        "inputs": inputs,
        "outputs": outputs,
    }))
}

async fn model_config(State(state): State<Arc<AppState>>, Path(params): Path<HashMap<String, String>>) -> Response {
    let model = match check_model(&state, &params) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let triton_type = |d: Datatype| format!("TYPE_{}", d.as_str());
    let inputs: Vec<Value> = model
        .signature
        .inputs
        .iter()
        .map(|i| json!({"name": i.name, "data_type": triton_type(i.datatype), "dims": i.shape[1..]}))
        .collect();
    let outputs: Vec<Value> =
        model.signature.outputs.iter().map(|o| json!({"name": o, "data_type": "TYPE_FP32", "dims": []})).collect();
    let b = state.options.batching;
    json_body(&json!({
        "name": state.options.model_name,
        "platform": "rankstack",
        "max_batch_size": b.max_batch,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {
            "max_queue_delay_microseconds": b.max_queue_delay.as_micros() as u64,
            "default_queue_policy": {"max_queue_size": b.max_queue},
        },
    }))
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    state.metrics.infer_started();
    let result = infer_inner(&state, &params, &headers, body).await;
    let (response, code, candidates) = match result {
        Ok((response, candidates)) => (response, 200, candidates),
        Err(e) => {
            let code = e.status.as_u16();
            if code != 503 {
                log("warn", "infer_error", json!({"code": code, "error": e.message}));
            }
            (e.into_response(), code, 0)
        }
    };
    state.metrics.infer_response(code, started.elapsed().as_secs_f64(), candidates);
    response
}

async fn infer_inner(
    state: &AppState,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Response, usize), ApiError> {
    let model = check_model(state, params)?;
    let body = body_or_error(body)?;
    let json_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ApiError::bad_request("Inference-Header-Content-Length must be a byte count"))?,
        ),
    };
    let max_batch = state.options.batching.max_batch;
    let request = request::parse(&body, json_len, &model.signature, &model.schema, max_batch)
        .map_err(|e| ApiError::bad_request(e.0))?;
    let candidates = request.rows.len();
    let (reply, outcome) = oneshot::channel();
    let now = Instant::now();
    let job = Job { model, rows: request.rows, deadline: request.timeout.map(|t| now + t), queued_at: now, reply };
    {
        let batcher = state.batcher.lock().unwrap_or_else(|e| e.into_inner());
        let batcher =
            batcher.as_ref().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
        batcher.submit(job).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "overloaded: {} requests are queued (--max-queue); retry later",
                    state.options.batching.max_queue
                ),
            )
        })?;
    }
    match outcome.await {
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the scoring thread stopped; retry later")),
        Ok(Outcome::TimedOut { queue_time }) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request's timeout ({} µs) passed after {} µs in the queue; it was not scored",
                request.timeout.unwrap_or_default().as_micros(),
                queue_time.as_micros()
            ),
        )),
        Ok(Outcome::Failed(e)) => {
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("the model could not score this request: {e}")))
        }
        Ok(Outcome::Scored { probabilities, model, queue_time: _ }) => {
            let encoded = response::encode(
                request.id.as_deref(),
                &state.options.model_name,
                model.version,
                &model.signature.outputs,
                &probabilities,
                &request.outputs,
            );
            let mut response = Response::new(Body::from(encoded.body));
            let headers = response.headers_mut();
            match encoded.json_len {
                None => {
                    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(n) => {
                    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                    headers.insert(HEADER_LENGTH, HeaderValue::from(n));
                }
            }
            Ok((response, candidates))
        }
    }
}

async fn repository_index(State(state): State<Arc<AppState>>) -> Response {
    let model = state.slot.current();
    json_body(&json!([{"name": state.options.model_name, "version": model.version.to_string(), "state": "READY"}]))
}

/// `POST /v2/repository/models/{name}/load`: reloads the `--checkpoint` path (a run directory's
/// `LATEST` is re-read), or `parameters.checkpoint` if the body names one, and swaps it in
/// atomically. Requests already checked against the old model are scored by it.
async fn load(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match load_inner(&state, &name, body).await {
        Ok(v) => json_body(&v),
        Err(e) => e.into_response(),
    }
}

async fn load_inner(state: &AppState, name: &str, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    check_model(state, &HashMap::from([("name".to_string(), name.to_string())]))?;
    let body = body_or_error(body)?;
    let mut path = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
        if let Some(params) = v.get("parameters") {
            let params = params.as_object().ok_or_else(|| ApiError::bad_request("`parameters` must be an object"))?;
            for (key, value) in params {
                match (key.as_str(), value) {
                    ("checkpoint", Value::String(p)) => path = Some(std::path::PathBuf::from(p)),
                    ("checkpoint", _) => {
                        return Err(ApiError::bad_request("parameters.checkpoint must be a path string"))
                    }
                    (other, _) => {
                        return Err(ApiError::bad_request(format!(
                            "parameter `{other}` is not supported (only `checkpoint`)"
                        )))
                    }
                }
            }
        }
    }
    let slot = state.slot.clone();
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || slot.reload(path.as_deref()))
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("the load stopped: {e}")))?;
    match loaded {
        Ok(model) => {
            state.metrics.model_load(true);
            let checkpoint = model.checkpoint.display().to_string();
            log(
                "info",
                "model_loaded",
                json!({"model": name, "version": model.version, "checkpoint": checkpoint,
                       "seconds": started.elapsed().as_secs_f64()}),
            );
            Ok(json!({"name": name, "version": model.version.to_string(), "checkpoint": checkpoint}))
        }
        Err(e) => {
            state.metrics.model_load(false);
            let current = state.slot.current().version;
            log(
                "warn",
                "model_load_failed",
                json!({"model": name, "error": e.to_string(), "serving_version": current}),
            );
            Err(ApiError::bad_request(format!("load failed, still serving version {current}: {e}")))
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.queue_depth(), state.slot.current().version);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
