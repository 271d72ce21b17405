//! Probabilities → the infer response: JSON `data`, or the binary tensor extension for outputs
//! that ask for it (their values follow the JSON as little-endian f32, and the JSON's length goes
//! in the `Inference-Header-Content-Length` header).

use serde::Serialize;

use super::request::OutputChoice;

#[derive(Serialize)]
struct Response<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: String,
    outputs: Vec<Output<'a>>,
}

#[derive(Serialize)]
struct Output<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: [usize; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// A finished response body.
pub struct Encoded {
    /// The bytes to send.
    pub body: Vec<u8>,
    /// `Some(json length)` when binary outputs follow the JSON.
    pub json_len: Option<usize>,
}

/// Encodes the response for `outputs` (indices into `names` and `probabilities`).
pub fn encode(
    id: Option<&str>,
    model_name: &str,
    model_version: u64,
    names: &[String],
    probabilities: &[Vec<f32>],
    outputs: &[OutputChoice],
) -> Encoded {
    let rows = probabilities.first().map_or(0, Vec::len);
    let response = Response {
        id,
        model_name,
        model_version: model_version.to_string(),
        outputs: outputs
            .iter()
            .map(|o| Output {
                name: &names[o.index],
                datatype: "FP32",
                shape: [rows],
                data: (!o.binary).then(|| probabilities[o.index].as_slice()),
                parameters: o.binary.then_some(BinarySize { binary_data_size: rows * 4 }),
            })
            .collect(),
    };
    let mut body = serde_json::to_vec(&response).expect("plain structs serialise");
    if !outputs.iter().any(|o| o.binary) {
        return Encoded { body, json_len: None };
    }
    let json_len = body.len();
    for o in outputs.iter().filter(|o| o.binary) {
        body.extend(probabilities[o.index].iter().flat_map(|v| v.to_le_bytes()));
    }
    Encoded { body, json_len: Some(json_len) }
}
