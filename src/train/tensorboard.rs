//! TensorBoard scalar logs: every `metrics.jsonl` line of a run is also written as scalar events
//! to `OUT/tensorboard/`, so `tensorboard --logdir OUT` shows a run while it trains.
//!
//! The format, written here in a few lines rather than through a protobuf stack:
//! - an event file is a sequence of TFRecords: `u64` length (little-endian), the masked CRC32C of
//!   those 8 bytes, the payload, the masked CRC32C of the payload; a masked CRC is
//!   `((crc >> 15) | (crc << 17)) + 0xa282ead8` (mod 2³²), CRC32C being the Castagnoli CRC;
//! - each payload is a serialised `tensorflow.Event` protobuf: `wall_time` (field 1, double),
//!   `step` (2, int64), then `file_version` (3, string: `brain.Event:2`, the first record),
//!   `summary` (5: repeated `value` (1) of `tag` (1, string) and `simple_value` (2, float)) or
//!   `session_log` (7: `status` (1) = START).
//!
//! Each record is flushed when written. A fresh run removes the event files of an earlier run in
//! the same directory (as it starts a fresh `metrics.jsonl`); a resumed run opens a new file whose
//! first event is a `SessionLog.START` at the step after the checkpoint: TensorBoard then drops
//! every point logged after the checkpoint by the interrupted session, the same lines the trainer
//! drops from `metrics.jsonl`, and the run reads as one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rankstack_nn::{Error, Result};
use serde_json::Value;

/// The directory of a run's event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The name suffix of the event files rankstack writes (only these are ever removed).
const FILE_SUFFIX: &str = ".rankstack";

/// The CRC32C (Castagnoli, reflected polynomial `0x82F63B78`) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C of `data` (the checksum TFRecord uses).
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| (crc >> 8) ^ CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize])
}

/// The masked CRC32C TFRecord stores (masking keeps a CRC of data that holds CRCs well-behaved).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the payload, its masked CRC.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(payload);
    record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    record
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides its time and step.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody<'a> {
    /// The file's first event: the format version.
    FileVersion,
    /// A session (re)started at this step: TensorBoard discards points at or after it.
    SessionStart,
    /// Scalar values by tag.
    Scalars(&'a [(String, f32)]),
}

/// A serialised `tensorflow.Event`.
pub fn event(wall_time: f64, step: u64, body: &EventBody<'_>) -> Vec<u8> {
    let mut out = vec![0x09]; // field 1, 64-bit
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10); // field 2, varint
    varint(&mut out, step);
    match body {
        EventBody::FileVersion => bytes_field(&mut out, 3, b"brain.Event:2"),
        EventBody::SessionStart => bytes_field(&mut out, 7, &[0x08, 0x01]), // status = START
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values.iter() {
                let mut v = Vec::new();
                bytes_field(&mut v, 1, tag.as_bytes());
                v.push(0x15); // field 2, 32-bit
                v.extend_from_slice(&value.to_le_bytes());
                bytes_field(&mut summary, 1, &v);
            }
            bytes_field(&mut out, 5, &summary);
        }
    }
    out
}

/// The scalars of one `metrics.jsonl` line, tagged `train/<field>` (every numeric field but
/// `step` and `epoch`), `eval/loss` and `eval/<task>/<metric>` (every numeric metric but
/// `count`), or `memory/planned_bytes` and `memory/measured_peak_bytes`. `null` values (a non-finite metric, e.g. the AUC of a task with one class) are left
/// out, as in the line itself.
pub fn scalars_of_line(line: &Value) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let Some(fields) = line.as_object() else { return out };
    match line["kind"].as_str() {
        Some("train") => {
            for (key, value) in fields {
                if let (false, Some(v)) = (matches!(key.as_str(), "step" | "epoch"), value.as_f64()) {
                    out.push((format!("train/{key}"), v as f32));
                }
            }
        }
        Some("eval") => {
            if let Some(v) = line["loss"].as_f64() {
                out.push(("eval/loss".to_string(), v as f32));
            }
            for task in line["tasks"].as_array().into_iter().flatten() {
                let (Some(name), Some(metrics)) = (task[0].as_str(), task[1].as_object()) else { continue };
                for (metric, value) in metrics {
                    if let (false, Some(v)) = (metric == "count", value.as_f64()) {
                        out.push((format!("eval/{name}/{metric}"), v as f32));
                    }
                }
            }
        }
        Some("memory") => {
            for key in ["planned_bytes", "measured_peak_bytes"] {
                if let Some(v) = line[key].as_f64() {
                    out.push((format!("memory/{key}"), v as f32));
                }
            }
        }
        _ => {}
    }
    out
}

/// An open event file of a run.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn is_ours(name: &str) -> bool {
    name.starts_with("events.out.tfevents.") && name.ends_with(FILE_SUFFIX)
}

/// The sequence number of one of our event files (`events.out.tfevents.<sequence>.<seconds>.rankstack`).
fn sequence_of(name: &str) -> Option<u64> {
    name.strip_prefix("events.out.tfevents.")?.split('.').next()?.parse().ok()
}

impl EventWriter {
    /// A fresh run's log in `run_dir/tensorboard/`: event files of an earlier run there are removed.
    pub fn fresh(run_dir: &Path) -> Result<Self> {
        let dir = run_dir.join(TENSORBOARD_DIR);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_str().is_some_and(is_ours) {
                    std::fs::remove_file(entry.path()).map_err(Error::io_at(&entry.path()))?;
                }
            }
        }
        Self::open(&dir)
    }

    /// The log of a run resumed after `step`: a new file that starts with a session restart at
    /// `step + 1`, which retracts anything the interrupted session logged after its checkpoint.
    pub fn resumed(run_dir: &Path, step: u64) -> Result<Self> {
        let mut writer = Self::open(&run_dir.join(TENSORBOARD_DIR))?;
        writer.write(step + 1, &EventBody::SessionStart)?;
        Ok(writer)
    }

    /// A new event file in `dir`, named so that it sorts after the files already there
    /// (TensorBoard reads a directory's files in name order).
    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io_at(dir))?;
        let sequence = std::fs::read_dir(dir)
            .map_err(Error::io_at(dir))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().filter(|n| is_ours(n)).and_then(sequence_of))
            .max()
            .map_or(0, |last| last + 1);
        let seconds = now() as u64;
        let path = dir.join(format!("events.out.tfevents.{sequence:06}.{seconds}{FILE_SUFFIX}"));
        let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path).map_err(Error::io_at(&path))?;
        let mut writer = Self { file, path };
        writer.write(0, &EventBody::FileVersion)?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and flushes it to the file.
    pub fn write(&mut self, step: u64, body: &EventBody<'_>) -> Result<()> {
        let record = tfrecord(&event(now(), step, body));
        self.file.write_all(&record).and_then(|()| self.file.flush()).map_err(Error::io_at(&self.path))
    }

    /// Appends the scalars of one `metrics.jsonl` line at its step.
    pub fn log_line(&mut self, line: &Value) -> Result<()> {
        let scalars = scalars_of_line(line);
        if scalars.is_empty() {
            return Ok(());
        }
        let step = line["step"].as_u64().unwrap_or(0);
        self.write(step, &EventBody::Scalars(&scalars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value, and the iSCSI test vectors of RFC 3720 (B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_match_tensorboards_own_writer() {
        // Reference values from TensorBoard 2.21's Python writer
        // (`tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c` and
        // `tensorboard.summary.writer.record_writer.RecordWriter`).
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(tfrecord(b"abc"), b"\x03\x00\x00\x00\x00\x00\x00\x00\xb0\x99I\x0eabcnW\xf1!");
        // Events as protobuf serialises them (`event_pb2.Event(...).SerializeToString()`).
        let e = event(1.5, 7, &EventBody::Scalars(&[("loss".to_string(), 0.25)]));
        assert_eq!(e, b"\t\x00\x00\x00\x00\x00\x00\xf8?\x10\x07*\r\n\x0b\n\x04loss\x15\x00\x00\x80>".as_slice());
        assert_eq!(
            event(2.0, 300, &EventBody::FileVersion),
            b"\t\x00\x00\x00\x00\x00\x00\x00@\x10\xac\x02\x1a\rbrain.Event:2".as_slice()
        );
        assert_eq!(event(3.25, 12, &EventBody::SessionStart), b"\t\x00\x00\x00\x00\x00\x00\n@\x10\x0c:\x02\x08\x01");
    }

    #[test]
    fn new_files_sort_after_the_existing_ones() {
        let dir = rankstack_nn::testing::ScratchDir::new("tensorboard-names");
        std::fs::create_dir_all(dir.join(TENSORBOARD_DIR)).unwrap();
        // Someone else's file is left alone; ours continue after the highest sequence number.
        std::fs::write(dir.join(TENSORBOARD_DIR).join("events.out.tfevents.1.host"), b"").unwrap();
        std::fs::write(dir.join(TENSORBOARD_DIR).join("events.out.tfevents.000007.1.rankstack"), b"").unwrap();
        let resumed = EventWriter::resumed(&dir, 3).unwrap();
        let name = resumed.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents.000008.") && name.ends_with(".rankstack"), "{name}");
        let fresh = EventWriter::fresh(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.join(TENSORBOARD_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let fresh_name = fresh.path().file_name().unwrap().to_str().unwrap();
        assert_eq!(names, vec![fresh_name.to_string(), "events.out.tfevents.1.host".to_string()]);
        assert!(fresh_name.starts_with("events.out.tfevents.000000."));
    }

    #[test]
    fn metrics_lines_map_to_tagged_scalars() {
        let train: Value = serde_json::from_str(
            r#"{"kind":"train","step":10,"epoch":1,"loss":0.5,"lr":0.001,"grad_norm":null,"examples_per_second":250.0}"#,
        )
        .unwrap();
        let mut tags = scalars_of_line(&train);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tags,
            vec![
                ("train/examples_per_second".to_string(), 250.0),
                ("train/loss".to_string(), 0.5),
                ("train/lr".to_string(), 0.001),
            ]
        );
        let eval: Value = serde_json::from_str(
            r#"{"kind":"eval","step":16,"epoch":1,"loss":0.4,"tasks":[["save",{"count":9,"auc":0.7,"calibration":null}]]}"#,
        )
        .unwrap();
        assert_eq!(scalars_of_line(&eval), vec![("eval/loss".to_string(), 0.4), ("eval/save/auc".to_string(), 0.7)]);
    }
}
