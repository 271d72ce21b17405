//! `rankstack serve` end to end, on 127.0.0.1 with an ephemeral port: the protocol's endpoints,
//! probabilities bit-equal to `rankstack score`, every bad request's 4xx, overload, queue
//! timeouts, hot reload under concurrent load, graceful shutdown, and the real Python
//! `tritonclient[http]` (from the venv `cargo xtask serve-venv` makes). Load loops are bounded in
//! count; every wait on the server is bounded in time by a socket timeout.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use candle_core::{DType, Device};
use rankstack::data::{synthetic, Example, ExampleItems, ParquetDataset};
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::SeededVarMap;
use rankstack::ranker_model::{checkpoint, Ranker};
use rankstack::serve::{InputRole, ModelSignature};
use serde_json::{json, Value};

/// The test world: 48 rows of synthetic data (as a Parquet file and in memory) and two tiny
/// checkpoints `a` (seed 0) and `b` (seed 1) of the same architecture.
struct World {
    dir: support::ScratchDir,
    rows: Vec<Example>,
    signature: ModelSignature,
}

const ROWS: usize = 48;

fn world(tag: &str) -> World {
    let dir = support::tmpdir(&format!("serve-{tag}"));
    synthetic::generate(&support::small_world(ROWS, 1), dir.join("rows.parquet")).unwrap();
    let data = ParquetDataset::open(dir.join("rows.parquet")).unwrap();
    let config = support::tiny_config(&data);
    for (name, seed) in [("a", 0), ("b", 1)] {
        let store = SeededVarMap::new(seed);
        let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        checkpoint::save(dir.join(name), &ranker, &store).unwrap();
    }
    let rows = data.read_all().unwrap();
    let signature = ModelSignature::new(data.schema()).unwrap();
    World { dir, rows, signature }
}

/// A running `rankstack serve`; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    fn start(checkpoint: &Path, log: PathBuf, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rankstack"))
            .args(["serve", "--checkpoint", checkpoint.to_str().unwrap(), "--addr", "127.0.0.1:0"])
            .args(extra)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start rankstack serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no address printed ({line:?}); log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        Self { addr: addr.parse().unwrap(), child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, &[], b"")
    }

    fn post_json(&self, path: &str, body: &Value) -> Reply {
        http(self.addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    fn metric(&self, line_prefix: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("{line_prefix} not in:\n{text}"))
    }

    fn no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked") && !log.contains("internal error"), "{log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error: {}", self.json())).to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded by a 60 s socket
/// timeout.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    send(&mut stream, method, path, headers, body);
    receive(stream)
}

fn send(stream: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server that refuses early (413) may close before the whole body is written.
    let _ = stream.write_all(body);
}

fn receive(mut stream: TcpStream) -> Reply {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { status, headers, body: raw[split + 4..].to_vec() }
}

/// The infer request for `rows` in the signature's layout (bags padded with -1, sequences with 0).
fn infer_body(signature: &ModelSignature, rows: &[Example]) -> Value {
    let b = rows.len();
    let inputs: Vec<Value> = signature
        .inputs
        .iter()
        .map(|spec| {
            let seq = |r: &Example| r.sequence.clone().unwrap();
            let longest = rows.iter().map(|r| seq(r).action_types.len()).max().unwrap_or(0);
            let pad = |v: Vec<i64>, fill: i64, n: usize| {
                let mut v = v;
                v.resize(n, fill);
                v
            };
            let (shape, data): (Vec<usize>, Value) = match spec.role {
                InputRole::Dense(i) => (vec![b], json!(rows.iter().map(|r| r.dense[i]).collect::<Vec<_>>())),
                InputRole::Sparse(i) => {
                    let width = rows.iter().map(|r| r.sparse[i].len()).max().unwrap().max(1);
                    let data: Vec<Vec<i64>> = rows.iter().map(|r| pad(r.sparse[i].clone(), -1, width)).collect();
                    (vec![b, width], json!(data))
                }
                InputRole::Embedding(i) => (
                    vec![b, rows[0].embedding[i].len()],
                    json!(rows.iter().map(|r| &r.embedding[i]).collect::<Vec<_>>()),
                ),
                InputRole::SeqActionTypes => (
                    vec![b, longest],
                    json!(rows.iter().map(|r| pad(seq(r).action_types, 0, longest)).collect::<Vec<_>>()),
                ),
                InputRole::SeqTimestamps => (
                    vec![b, longest],
                    json!(rows.iter().map(|r| pad(seq(r).timestamps, 0, longest)).collect::<Vec<_>>()),
                ),
                InputRole::SeqItemIds => (
                    vec![b, longest],
                    json!(rows
                        .iter()
                        .map(|r| match seq(r).items {
                            ExampleItems::Ids { sequence, .. } => pad(sequence, 0, longest),
                            ExampleItems::Embeddings { .. } => unreachable!(),
                        })
                        .collect::<Vec<_>>()),
                ),
                InputRole::CandidateItemId => (
                    vec![b],
                    json!(rows
                        .iter()
                        .map(|r| match seq(r).items {
                            ExampleItems::Ids { candidate, .. } => candidate,
                            ExampleItems::Embeddings { .. } => unreachable!(),
                        })
                        .collect::<Vec<_>>()),
                ),
                InputRole::RequestTime => {
                    (vec![b], json!(rows.iter().map(|r| seq(r).request_time).collect::<Vec<_>>()))
                }
                InputRole::SeqItemEmbeddings | InputRole::CandidateItemEmbedding => unreachable!("id sequences"),
            };
            json!({"name": spec.name, "datatype": spec.datatype.as_str(), "shape": shape, "data": data})
        })
        .collect();
    json!({"inputs": inputs})
}

/// `probabilities[task][row]` from a JSON infer response.
fn probabilities(reply: &Reply) -> Vec<Vec<f32>> {
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply.json()["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect()
}

/// `rankstack score`'s probabilities for the world's rows, `[task][row]`.
fn scored(world: &World, checkpoint: &str) -> Vec<Vec<f32>> {
    let out = world.dir.join(format!("scores-{checkpoint}.csv"));
    let status = Command::new(env!("CARGO_BIN_EXE_rankstack"))
        .args(["score", "--checkpoint", world.dir.join(checkpoint).to_str().unwrap()])
        .args(["--data", world.dir.join("rows.parquet").to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let csv = std::fs::read_to_string(out).unwrap();
    let rows: Vec<Vec<f32>> =
        csv.lines().skip(1).map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect();
    (0..rows[0].len()).map(|t| rows.iter().map(|r| r[t]).collect()).collect()
}

fn bits(p: &[Vec<f32>]) -> Vec<Vec<u32>> {
    p.iter().map(|t| t.iter().map(|v| v.to_bits()).collect()).collect()
}

#[test]
fn metadata_and_probabilities_bit_equal_to_score() {
    let w = world("equal");
    let server = Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--max-batch", "64"]);
    assert_eq!(server.get("/v2/health/live").status, 200);
    assert_eq!(server.get("/v2/health/ready").json(), json!({"ready": true}));
    assert_eq!(server.get("/v2/models/ranker/ready").status, 200);
    let meta = server.get("/v2/models/ranker").json();
    assert_eq!(meta["versions"], json!(["1"]));
    let names: Vec<&str> = meta["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    let expected: Vec<&str> = w.signature.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, expected);
    assert_eq!(meta["inputs"][0], json!({"name": "user_activity", "datatype": "FP32", "shape": [-1]}));
    assert_eq!(meta["outputs"].as_array().unwrap().len(), 4);
    assert_eq!(meta["outputs"][0], json!({"name": "p_save", "datatype": "FP32", "shape": [-1]}));
    assert_eq!(server.get("/v2/models/ranker/config").json()["max_batch_size"], json!(64));
    assert_eq!(server.get("/v2").json()["extensions"], json!(["binary_tensor_data", "model_repository"]));

    // All rows in one request: the same batch as `rankstack score`, so the same bits.
    let expected = scored(&w, "a");
    let mut body = infer_body(&w.signature, &w.rows);
    body["id"] = json!("all-rows");
    let reply = server.post_json("/v2/models/ranker/infer", &body);
    assert_eq!(reply.json()["id"], json!("all-rows"));
    assert_eq!(reply.json()["model_version"], json!("1"));
    assert_eq!(bits(&probabilities(&reply)), bits(&expected));

    // Binary outputs (the binary tensor extension), one of them requested by name.
    body["outputs"] = json!([{"name": "p_click", "parameters": {"binary_data": true}}]);
    let reply = server.post_json("/v2/models/ranker/versions/1/infer", &body);
    assert_eq!(reply.status, 200);
    let json_len: usize = reply.headers["inference-header-content-length"].parse().unwrap();
    let head: Value = serde_json::from_slice(&reply.body[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], json!(ROWS * 4));
    let click: Vec<u32> =
        reply.body[json_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()).to_bits()).collect();
    assert_eq!(click, bits(&expected)[1]);

    // One user's sequence sent once for several candidates equals sending it per candidate.
    let same_user: Vec<Example> =
        (0..3).map(|k| Example { sequence: w.rows[0].sequence.clone(), ..w.rows[k].clone() }).collect();
    let mut per_row = infer_body(&w.signature, &same_user);
    let full = probabilities(&server.post_json("/v2/models/ranker/infer", &per_row));
    for input in per_row["inputs"].as_array_mut().unwrap() {
        let name = input["name"].as_str().unwrap();
        if name.starts_with("seq_") || name == "request_time" {
            let first = input["data"][0].clone();
            input["data"] = json!([first]);
            input["shape"][0] = json!(1);
        }
    }
    assert_eq!(bits(&probabilities(&server.post_json("/v2/models/ranker/infer", &per_row))), bits(&full));

    // Many concurrent one-candidate requests are batched; each gets its own row's scores.
    let counts_before = server.metric("rankstack_batch_candidates_count");
    let handles: Vec<_> = (0..16)
        .map(|r| {
            let (addr, body) = (server.addr, infer_body(&w.signature, &w.rows[r..r + 1]));
            std::thread::spawn(move || {
                probabilities(&http(addr, "POST", "/v2/models/ranker/infer", &[], body.to_string().as_bytes()))
            })
        })
        .collect();
    for (r, h) in handles.into_iter().enumerate() {
        let p = h.join().unwrap();
        for t in 0..4 {
            assert!((p[t][0] - expected[t][r]).abs() < 1e-5, "row {r} task {t}: {} vs {}", p[t][0], expected[t][r]);
        }
    }
    assert!(server.metric("rankstack_batch_candidates_count") > counts_before);
    assert_eq!(server.metric("rankstack_infer_requests_total{code=\"200\"}"), 20.0);
    server.no_panic();
}

#[test]
fn every_bad_request_gets_a_json_4xx_naming_the_problem() {
    let w = world("bad");
    let server =
        Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--max-batch", "16", "--max-body-bytes", "200000"]);
    let good = infer_body(&w.signature, &w.rows[..2]);
    let with = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut body = good.clone();
        let input = body["inputs"].as_array_mut().unwrap().iter_mut().find(|i| i["name"] == name).unwrap();
        edit(input);
        body
    };
    let infer = "/v2/models/ranker/infer";
    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        ("malformed JSON", http(server.addr, "POST", infer, &[], b"{\"inputs\": ["), 400, "malformed JSON"),
        (
            "NaN literal",
            http(
                server.addr,
                "POST",
                infer,
                &[],
                good.to_string().replacen("\"data\":[", "\"data\":[NaN,", 1).as_bytes(),
            ),
            400,
            "NaN and Infinity are not JSON numbers",
        ),
        ("not an object", server.post_json(infer, &json!([1, 2])), 400, "JSON object"),
        ("no inputs", server.post_json(infer, &json!({"id": "x"})), 400, "no `inputs`"),
        (
            "missing input",
            server.post_json(infer, &json!({"inputs": good["inputs"].as_array().unwrap()[1..]})),
            400,
            "input `user_activity`: missing",
        ),
        (
            "unknown input",
            server.post_json(infer, &{
                let mut b = good.clone();
                b["inputs"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "bogus", "datatype": "FP32", "shape": [2], "data": [1, 2]}));
                b
            }),
            400,
            "input `bogus`: the model has no such input",
        ),
        (
            "wrong datatype",
            server.post_json(infer, &with("user_activity", &|i| i["datatype"] = json!("FP64"))),
            400,
            "input `user_activity`: datatype FP64, expected FP32",
        ),
        (
            "wrong shape",
            server.post_json(infer, &with("item_visual", &|i| i["shape"] = json!([2, 8, 2]))),
            400,
            "input `item_visual`: shape [2, 8, 2], expected [-1, 16]",
        ),
        (
            "wrong count",
            server.post_json(infer, &with("user_activity", &|i| i["data"] = json!([1.0]))),
            400,
            "input `user_activity`: 1 values for its shape's 2",
        ),
        (
            "not a number",
            server.post_json(infer, &with("user_activity", &|i| i["data"] = json!([1.0, "x"]))),
            400,
            "input `user_activity`: value 1 (\"x\") is not a number",
        ),
        (
            "float id",
            server.post_json(infer, &with("candidate_item_id", &|i| i["data"] = json!([1.5, 2]))),
            400,
            "input `candidate_item_id`: value 0 (1.5) is not a 64-bit integer",
        ),
        (
            "FP32 overflow",
            server.post_json(infer, &with("user_ctr_7d", &|i| i["data"] = json!([1e300, 0.5]))),
            400,
            "input `user_ctr_7d`: value 0 (1e+300) is outside the FP32 range",
        ),
        (
            "null embedding",
            server.post_json(infer, &with("item_visual", &|i| i["data"][0][0] = Value::Null)),
            400,
            "input `item_visual`: value 0 is null",
        ),
        (
            "candidate counts differ",
            server.post_json(
                infer,
                &with("item_id", &|i| {
                    i["shape"][0] = json!(1);
                    i["data"] = json!([i["data"][0]]);
                }),
            ),
            400,
            "input `item_id`: 1 candidates, but `user_activity` has 2",
        ),
        (
            "negative id",
            server.post_json(infer, &with("item_id", &|i| i["data"][0][0] = json!(-5))),
            400,
            "input `item_id`: candidate 0: negative id -5",
        ),
        (
            "action type out of range",
            server.post_json(infer, &with("seq_action_types", &|i| i["data"][1][0] = json!(99))),
            400,
            "input `seq_action_types`, candidate 1: action type 99 is outside 1..6",
        ),
        (
            "padding before an action",
            server.post_json(
                infer,
                &with("seq_action_types", &|i| {
                    i["data"][0][0] = json!(0);
                    i["data"][0][1] = json!(1);
                }),
            ),
            400,
            "after padding",
        ),
        (
            "sequence lengths differ",
            server.post_json(
                infer,
                &with("seq_timestamps", &|i| {
                    i["shape"][1] = json!(1);
                    i["data"] = json!([[1], [2]]);
                }),
            ),
            400,
            "input `seq_timestamps`: shape [2, 1] does not match seq_action_types'",
        ),
        (
            "too many candidates",
            server.post_json(infer, &infer_body(&w.signature, &w.rows[..17])),
            400,
            "17 candidates in one request: the server's --max-batch is 16",
        ),
        (
            "unknown output",
            server.post_json(infer, &{
                let mut b = good.clone();
                b["outputs"] = json!([{"name": "p_like"}]);
                b
            }),
            400,
            "output `p_like`: the model has no such output",
        ),
        (
            "bad timeout",
            server.post_json(infer, &{
                let mut b = good.clone();
                b["parameters"] = json!({"timeout": -1});
                b
            }),
            400,
            "parameters.timeout",
        ),
        (
            "binary header too long",
            http(
                server.addr,
                "POST",
                infer,
                &[("Inference-Header-Content-Length", "99999")],
                good.to_string().as_bytes(),
            ),
            400,
            "Inference-Header-Content-Length is 99999",
        ),
        ("unknown model", server.post_json("/v2/models/other/infer", &good), 404, "unknown model `other`"),
        ("unknown version", server.post_json("/v2/models/ranker/versions/7/infer", &good), 404, "no version `7`"),
        ("unknown model metadata", server.get("/v2/models/other"), 404, "unknown model `other`"),
        ("unknown path", server.get("/v1/models"), 404, "no such endpoint"),
        ("wrong method", server.get(infer), 405, "method"),
        ("oversize payload", http(server.addr, "POST", infer, &[], &vec![b' '; 300_000]), 413, "--max-body-bytes"),
    ];
    for (what, reply, status, needle) in &cases {
        assert_eq!(reply.status, *status, "{what}: {}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.headers.get("content-type").map(String::as_str), Some("application/json"), "{what}");
        let error = reply.error();
        assert!(error.contains(needle), "{what}: {error:?} lacks {needle:?}");
        assert!(!error.contains('\n'), "{what}: {error:?}");
    }

    // Binary tensor data: NaN in a dense feature is a missing value, as JSON null; NaN elsewhere
    // and infinities are refused.
    let binary = |name: &str, values: &[f32]| {
        let mut body = good.clone();
        let input = body["inputs"].as_array_mut().unwrap().iter_mut().find(|i| i["name"] == name).unwrap();
        input.as_object_mut().unwrap().remove("data");
        input["parameters"] = json!({"binary_data_size": values.len() * 4});
        let json_text = body.to_string();
        let mut bytes = json_text.clone().into_bytes();
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        http(server.addr, "POST", infer, &[("Inference-Header-Content-Length", &json_text.len().to_string())], &bytes)
    };
    let first = good["inputs"][0]["data"][0].as_f64().unwrap() as f32;
    let with_null = with("user_activity", &|i| i["data"][1] = Value::Null);
    assert_eq!(
        bits(&probabilities(&binary("user_activity", &[first, f32::NAN]))),
        bits(&probabilities(&server.post_json(infer, &with_null)))
    );
    let reply = binary("user_activity", &[first, f32::INFINITY]);
    assert_eq!(reply.status, 400);
    assert!(
        reply.error().contains("input `user_activity`: value 1 is inf (dense values must be finite or NaN"),
        "{}",
        reply.error()
    );
    let mut visual = vec![0.5f32; 32];
    visual[3] = f32::NAN;
    let reply = binary("item_visual", &visual);
    assert_eq!(reply.status, 400);
    assert!(
        reply.error().contains("input `item_visual`: value 3 is NaN (only dense features may hold NaN"),
        "{}",
        reply.error()
    );
    let second = good["inputs"][0]["data"][1].as_f64().unwrap() as f32;
    assert_eq!(
        bits(&probabilities(&binary("user_activity", &[first, second]))),
        bits(&probabilities(&server.post_json(infer, &good)))
    );

    // A missing dense value is JSON null, served like a null in the Parquet data.
    let missing = with("user_ctr_7d", &|i| i["data"][0] = Value::Null);
    assert_eq!(probabilities(&server.post_json(infer, &missing)).len(), 4);

    assert_eq!(server.get("/v2/health/ready").status, 200);
    let errors = server.metric("rankstack_infer_requests_total{code=\"400\"}");
    assert!(errors >= 20.0, "{errors}");
    server.no_panic();
}

#[test]
fn a_request_whose_timeout_passes_in_the_queue_gets_504() {
    let w = world("timeout");
    let server = Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--max-queue-delay-us", "0"]);
    let mut body = infer_body(&w.signature, &w.rows[..2]);
    body["parameters"] = json!({"timeout": 1});
    let reply = server.post_json("/v2/models/ranker/infer", &body);
    assert_eq!(reply.status, 504, "{}", String::from_utf8_lossy(&reply.body));
    assert!(reply.error().contains("timeout (1 µs) passed"), "{}", reply.error());
    body["parameters"] = json!({"timeout": 0});
    assert_eq!(server.post_json("/v2/models/ranker/infer", &body).status, 200);
    drop(server);
    // A 100 s batching window, a 1 s deadline: the window closes at the deadline and the request
    // is scored (it would otherwise wait out the window and time out).
    let server = Server::start(&w.dir.join("a"), w.dir.join("b.log"), &["--max-queue-delay-us", "100000000"]);
    body["parameters"] = json!({"timeout": 1_000_000});
    assert_eq!(server.post_json("/v2/models/ranker/infer", &body).status, 200);
}

#[test]
fn overload_gets_503_and_every_request_one_answer() {
    let w = world("overload");
    let server = Server::start(
        &w.dir.join("a"),
        w.dir.join("a.log"),
        &["--max-queue", "1", "--max-batch", "48", "--max-queue-delay-us", "0", "--http-threads", "4"],
    );
    let expected = scored(&w, "a");
    let (mut ok, mut refused, mut sent) = (0, 0, 0);
    // Rounds of 24 simultaneous requests until the queue has overflowed (at most 10 rounds).
    for round in 0..10 {
        let barrier = Arc::new(Barrier::new(24));
        let handles: Vec<_> = (0..24)
            .map(|k| {
                let (addr, barrier) = (server.addr, barrier.clone());
                let mut body = infer_body(&w.signature, &w.rows);
                body["id"] = json!(format!("{round}-{k}"));
                std::thread::spawn(move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    barrier.wait();
                    send(&mut stream, "POST", "/v2/models/ranker/infer", &[], body.to_string().as_bytes());
                    (format!("{round}-{k}"), receive(stream))
                })
            })
            .collect();
        for h in handles {
            let (id, reply) = h.join().unwrap();
            sent += 1;
            match reply.status {
                200 => {
                    ok += 1;
                    assert_eq!(reply.json()["id"], json!(id));
                    let p = probabilities(&reply);
                    for (t, task) in p.iter().enumerate() {
                        for (r, v) in task.iter().enumerate() {
                            assert!((v - expected[t][r]).abs() < 1e-5, "{id}: row {r} task {t}");
                        }
                    }
                }
                503 => {
                    refused += 1;
                    assert_eq!(reply.headers.get("retry-after").map(String::as_str), Some("1"));
                    assert!(reply.error().contains("overloaded"), "{}", reply.error());
                }
                other => panic!("{id}: status {other}: {}", String::from_utf8_lossy(&reply.body)),
            }
        }
        if refused > 0 && ok > 0 {
            break;
        }
    }
    assert!(refused > 0 && ok > 0, "no overload seen in {sent} requests ({ok} ok)");
    // The server counted each request exactly once: no request lost or answered twice.
    assert_eq!(server.metric("rankstack_infer_requests_total{code=\"200\"}"), f64::from(ok));
    assert_eq!(server.metric("rankstack_infer_requests_total{code=\"503\"}"), f64::from(refused));
    assert_eq!(server.metric("rankstack_infer_candidates_total"), f64::from(ok) * ROWS as f64);
    assert_eq!(server.metric("rankstack_requests_in_flight"), 0.0);
    server.no_panic();
}

/// Each model's probabilities for requests of 4 rows starting at `start`, scored alone in this
/// process (batch composition moves the last bits; the models differ by far more).
fn reference(w: &World, checkpoint: &str) -> Vec<Vec<Vec<f32>>> {
    let ranker = checkpoint::load_packed_for_serving(w.dir.join(checkpoint), WeightPrecision::F32).unwrap();
    let schema = rankstack::data::DataSchema::of_model(ranker.config()).unwrap();
    (0..ROWS / 4)
        .map(|k| {
            let rows = &w.rows[k * 4..k * 4 + 4];
            let batch = rankstack::data::collate(&schema, rows, &[0, 1, 2, 3]).unwrap();
            ranker.predict(&batch.batch).unwrap().t().unwrap().contiguous().unwrap().to_vec2().unwrap()
        })
        .collect()
}

fn close(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn hot_reload_under_load_serves_each_request_from_exactly_one_model() {
    let w = world("reload");
    let (ref_a, ref_b) = (reference(&w, "a"), reference(&w, "b"));
    assert!(!close(&ref_a[0], &ref_b[0]), "the two models must differ");
    let server = Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--max-batch", "32", "--http-threads", "4"]);
    let bodies: Arc<Vec<Value>> =
        Arc::new((0..ROWS / 4).map(|k| infer_body(&w.signature, &w.rows[k * 4..k * 4 + 4])).collect());
    let start = Arc::new(Barrier::new(5));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (addr, bodies, start) = (server.addr, bodies.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..30)
                    .map(|i| {
                        let k = (c * 7 + i) % bodies.len();
                        let reply =
                            http(addr, "POST", "/v2/models/ranker/infer", &[], bodies[k].to_string().as_bytes());
                        let version = reply.json()["model_version"].as_str().map(str::to_string);
                        (k, version, probabilities(&reply))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    start.wait();
    // Reload while the clients run: a bad checkpoint first (refused, nothing changes), then `b`.
    let bad = server.post_json("/v2/repository/models/ranker/load", &json!({"parameters": {"checkpoint": "/nowhere"}}));
    assert_eq!(bad.status, 400);
    assert!(bad.error().contains("still serving version 1") && bad.error().contains("/nowhere"), "{}", bad.error());
    let b = w.dir.join("b").display().to_string();
    let loaded = server.post_json("/v2/repository/models/ranker/load", &json!({"parameters": {"checkpoint": b}}));
    assert_eq!(loaded.status, 200, "{}", String::from_utf8_lossy(&loaded.body));
    assert_eq!(loaded.json()["version"], json!("2"));
    let mut from = [0, 0];
    for client in clients {
        for (k, version, p) in client.join().unwrap() {
            let (is_a, is_b) = (close(&p, &ref_a[k]), close(&p, &ref_b[k]));
            assert!(is_a != is_b, "request {k}: matches {} models", if is_a { 2 } else { 0 });
            assert_eq!(version.as_deref(), Some(if is_a { "1" } else { "2" }), "request {k}");
            from[usize::from(is_b)] += 1;
        }
    }
    assert_eq!(from[0] + from[1], 120);
    // After the load answered, every request is scored by `b`.
    let after = server.post_json("/v2/models/ranker/infer", &bodies[0]);
    assert!(close(&probabilities(&after), &ref_b[0]));
    assert_eq!(server.get("/v2/models/ranker").json()["versions"], json!(["2"]));
    assert_eq!(server.metric("rankstack_model_loads_total{result=\"ok\"}"), 1.0);
    assert_eq!(server.metric("rankstack_model_loads_total{result=\"error\"}"), 1.0);
    assert_eq!(server.post_json("/v2/repository/models/other/load", &json!({})).status, 404);
    server.no_panic();
}

#[test]
fn sigterm_drains_the_requests_in_flight() {
    let w = world("drain");
    // A 2 s batching window holds the requests in the server while it is told to stop.
    let mut server = Server::start(
        &w.dir.join("a"),
        w.dir.join("a.log"),
        &["--max-batch", "1024", "--max-queue-delay-us", "2000000"],
    );
    let clients: Vec<_> = (0..6)
        .map(|k| {
            let (addr, body) = (server.addr, infer_body(&w.signature, &w.rows[k..k + 2]));
            std::thread::spawn(move || http(addr, "POST", "/v2/models/ranker/infer", &[], body.to_string().as_bytes()))
        })
        .collect();
    // Bounded wait until the server holds all six (at most 500 polls).
    let mut held = 0.0;
    for _ in 0..500 {
        held = server.metric("rankstack_requests_in_flight");
        if held == 6.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(held, 6.0);
    let kill = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    for client in clients {
        let reply = client.join().unwrap();
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", server.log());
    let log = server.log();
    assert!(log.contains("\"event\":\"draining\"") && log.contains("\"signal\":\"SIGTERM\""), "{log}");
    assert!(log.contains("\"event\":\"stopped\""), "{log}");
    assert!(TcpStream::connect(server.addr).is_err());
}

/// The real Python client (PyPI `tritonclient[http]`): metadata, readiness, config, probabilities
/// bit-equal to `rankstack score` (binary inputs; binary and JSON outputs), and JSON inputs with
/// NaN refused with the documented 400.
#[test]
fn tritonclient_reads_metadata_and_gets_bit_equal_probabilities() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/serve-venv/bin/python");
    if !venv.exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI: {} is missing (`cargo xtask serve-venv` makes it)",
            venv.display()
        );
        eprintln!("skipping: no {} (make it with `cargo xtask serve-venv`)", venv.display());
        return;
    }
    let w = world("triton");
    let server = Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--max-batch", "64"]);
    let request = w.dir.join("request.json");
    std::fs::write(&request, infer_body(&w.signature, &w.rows).to_string()).unwrap();
    let out = Command::new(&venv)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_tritonclient.py"))
        .args([&server.addr.to_string(), "ranker", request.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let expected = bits(&scored(&w, "a"));
    for mode in ["binary", "json"] {
        let got: Vec<Vec<u32>> = serde_json::from_value(result[mode].clone()).unwrap();
        assert_eq!(got, expected, "{mode}");
    }
    assert_eq!(result["inputs"].as_array().unwrap().len(), w.signature.inputs.len());
    // The synthetic rows have missing dense values: JSON inputs with NaN were refused (400).
    assert_eq!(result["json_nan_refused"], json!(true));
    server.no_panic();
}

#[test]
fn a_reload_without_a_path_follows_the_runs_latest() {
    let w = world("latest");
    let run = w.dir.join("run");
    for (step, model) in [("step-1", "a"), ("step-2", "b")] {
        std::fs::create_dir_all(run.join("checkpoints").join(step)).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(w.dir.join(model).join(file), run.join("checkpoints").join(step).join(file)).unwrap();
        }
    }
    std::fs::write(run.join("LATEST"), "checkpoints/step-1\n").unwrap();
    let server = Server::start(&run, w.dir.join("run.log"), &[]);
    let body = infer_body(&w.signature, &w.rows[..4]);
    let (ref_a, ref_b) = (reference(&w, "a"), reference(&w, "b"));
    assert!(close(&probabilities(&server.post_json("/v2/models/ranker/infer", &body)), &ref_a[0]));
    std::fs::write(run.join("LATEST"), "checkpoints/step-2\n").unwrap();
    let loaded = http(server.addr, "POST", "/v2/repository/models/ranker/load", &[], b"");
    assert_eq!(loaded.status, 200, "{}", String::from_utf8_lossy(&loaded.body));
    assert!(loaded.json()["checkpoint"].as_str().unwrap().ends_with("step-2"));
    let reply = server.post_json("/v2/models/ranker/infer", &body);
    assert_eq!(reply.json()["model_version"], json!("2"));
    assert!(close(&probabilities(&reply), &ref_b[0]));
    assert_eq!(server.post_json("/v2/repository/index", &json!({})).json()[0]["version"], json!("2"));
    let bad = server.post_json("/v2/repository/models/ranker/load", &json!({"parameters": {"config": "{}"}}));
    assert_eq!(bad.status, 400);
    assert!(bad.error().contains("parameter `config` is not supported"), "{}", bad.error());
    server.no_panic();
}

/// `--pin-threads` (Linux): the log names each worker's CPU, one of the CPUs this process may use,
/// and the scores are the same bits as unpinned.
#[cfg(target_os = "linux")]
#[test]
fn pinned_worker_threads_score_the_same_bits() {
    let w = world("pinned");
    let server = Server::start(&w.dir.join("a"), w.dir.join("a.log"), &["--pin-threads"]);
    let reply = server.post_json("/v2/models/ranker/infer", &infer_body(&w.signature, &w.rows));
    assert_eq!(bits(&probabilities(&reply)), bits(&scored(&w, "a")));
    let log = server.log();
    let pinned: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["event"] == "worker_threads_pinned")
        .unwrap_or_else(|| panic!("no worker_threads_pinned event in:\n{log}"));
    let cpus = pinned["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 1, "RAYON_NUM_THREADS=1 gives one worker: {pinned}");
    // The CPUs this test may run on (the server inherits them), from /proc: e.g. "0-3,8".
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    let allowed: Vec<u64> = list
        .split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap()
        })
        .collect();
    assert_eq!(cpus[0].as_u64(), Some(allowed[0]), "the first worker takes the first allowed CPU: {pinned}");
    server.no_panic();
}

#[test]
fn bad_options_and_bad_checkpoints_are_one_line_errors() {
    let w = world("options");
    // Non-finite weights: never served.
    let broken = w.dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(w.dir.join("a/config.json"), broken.join("config.json")).unwrap();
    let (store, config) =
        (SeededVarMap::new(5), rankstack::ranker_model::RankerConfig::from_file(broken.join("config.json")).unwrap());
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let (_, var) = checkpoint::state(&ranker, &store).into_iter().next().unwrap();
    var.set(&var.ones_like().unwrap().affine(f64::INFINITY, 0.0).unwrap()).unwrap();
    checkpoint::save(&broken, &ranker, &store).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let a = w.dir.join("a").display().to_string();
    let nowhere = w.dir.join("nowhere").display().to_string();
    let broken = broken.display().to_string();
    for (args, needle) in [
        (vec!["--checkpoint", nowhere.as_str()], "nowhere"),
        (vec!["--checkpoint", broken.as_str()], "non-finite values"),
        (vec!["--checkpoint", a.as_str(), "--max-batch", "0"], "max-batch"),
        (vec!["--checkpoint", a.as_str(), "--max-queue", "0"], "max-queue"),
        (vec!["--checkpoint", a.as_str(), "--model-name", "a/b"], "model-name"),
        (vec!["--checkpoint", a.as_str(), "--addr", taken_addr.as_str()], "cannot listen"),
        (vec!["--checkpoint", a.as_str(), "--addr", "nonsense"], "--addr"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rankstack")).arg("serve").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("rankstack: error:") && last.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    drop(taken);
}
