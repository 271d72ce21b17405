//! Structured logs: one JSON object per line on stderr, with a Unix timestamp, a level and an
//! event name, so that log shippers (Fluent Bit, Vector, Loki) parse them without a pattern.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Writes `{"ts": …, "level": level, "event": event, …fields}` as one line on stderr.
pub fn log(level: &str, event: &str, fields: Value) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut line = Map::new();
    line.insert("ts".into(), Value::from((ts * 1e3).round() / 1e3));
    line.insert("level".into(), Value::from(level));
    line.insert("event".into(), Value::from(event));
    if let Value::Object(fields) = fields {
        line.extend(fields);
    }
    let mut err = std::io::stderr().lock();
    // A closed stderr must not take the server down.
    let _ = writeln!(err, "{}", Value::Object(line));
}
