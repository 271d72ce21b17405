//! Writing tensor files: atomically (a temporary file, fsync, rename), with sorted headers (the same
//! tensors give the same bytes) and a checksum of every tensor that [`crate::checkpoint::read_safetensors`]
//! verifies. Ranker checkpoints, trainer state and single-layer checkpoints all write through here.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::checkpoint::{TensorChecksum, CHECKSUM_KEY};
use crate::host_transfer::read_computed;
use crate::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename. A
/// crash at any moment leaves either the old file or the new one, never a torn one.
/// A failed write removes its temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(Error::io_at(&tmp))?;
        file.write_all(bytes).map_err(Error::io_at(&tmp))?;
        file.sync_all().map_err(Error::io_at(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(Error::io_at(path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        // Persist the rename itself; failure to open a directory (some platforms) is not fatal.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The metadata key, in the weights file, of the checksum of the `config.json` written with it.
pub const CONFIG_CHECKSUM_KEY: &str = "rankstack.config_crc32";

/// Writes named tensors (and optional string metadata) to a safetensors file, atomically, with a
/// checksum of the tensors in the metadata ([`crate::checkpoint::CHECKSUM_KEY`], verified
/// on reading).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // safetensors panics on a repeated name; report it instead.
    if let Some(pair) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Corrupt {
            path: path.display().to_string(),
            reason: format!("tensor name `{}` appears twice", pair[0].0),
        });
    }
    let views = sorted.iter().map(|(n, t)| Ok((n.as_str(), HostTensor::new(n, t)?))).collect::<Result<Vec<_>>>()?;
    let mut metadata = metadata.unwrap_or_default();
    let mut checksum = TensorChecksum::default();
    checksum.add_metadata(&metadata);
    for (name, view) in &views {
        checksum.add(name, view.1, view.0.dims(), &view.2);
    }
    metadata.insert(CHECKSUM_KEY.to_string(), checksum.finish());
    let mut bytes = safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), Some(metadata))
        .map_err(|e| Error::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
    sort_header(&mut bytes).map_err(|reason| Error::Corrupt { path: path.display().to_string(), reason })?;
    write_atomically(path, &bytes)
}

/// Rewrites a serialized safetensors header with its keys in sorted order, in place: safetensors
/// writes the metadata map in hash order, which would make two saves of the same tensors differ
/// byte for byte (reproducible runs compare checkpoint files). Same keys and values, so the same
/// length; the padding to the header's size is spaces, as safetensors pads.
fn sort_header(bytes: &mut [u8]) -> std::result::Result<(), String> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            other => other,
        }
    }
    let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let header = len.and_then(|n| bytes.get(8..8 + n)).ok_or("header out of range")?;
    let (value, n) = (serde_json::from_slice::<serde_json::Value>(header).map_err(|e| e.to_string())?, header.len());
    let text = serde_json::to_vec(&sorted(value)).map_err(|e| e.to_string())?;
    let header = &mut bytes[8..8 + n];
    if text.len() > header.len() {
        return Err("the sorted header is longer than the original".into());
    }
    header[..text.len()].copy_from_slice(&text);
    header[text.len()..].fill(b' ');
    Ok(())
}

/// A tensor's little-endian bytes on the host, copied once, for safetensors' `View` and the
/// checksum.
struct HostTensor<'a>(&'a Tensor, safetensors::Dtype, Vec<u8>);

impl<'a> HostTensor<'a> {
    fn new(name: &str, tensor: &'a Tensor) -> Result<Self> {
        const WHAT: &str = "tensor written to a file";
        let t = tensor;
        let (dtype, bytes) = match t.dtype() {
            DType::F64 => {
                (safetensors::Dtype::F64, read_computed::<f64>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::F32 => {
                (safetensors::Dtype::F32, read_computed::<f32>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::F16 => (
                safetensors::Dtype::F16,
                read_computed::<half::f16>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                read_computed::<half::bf16>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            DType::I64 => {
                (safetensors::Dtype::I64, read_computed::<i64>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::U32 => {
                (safetensors::Dtype::U32, read_computed::<u32>(t, WHAT)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::U8 => (safetensors::Dtype::U8, read_computed::<u8>(t, WHAT)?),
            other => {
                return Err(Error::input(
                    "checkpoint",
                    name,
                    format!("dtype {other:?} cannot be written to a checkpoint"),
                ))
            }
        };
        Ok(Self(tensor, dtype, bytes))
    }
}

impl safetensors::View for &HostTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.1
    }

    fn shape(&self) -> &[usize] {
        self.0.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }

    fn data_len(&self) -> usize {
        self.2.len()
    }
}
