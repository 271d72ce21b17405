//! `rankstack eval` and `rankstack score`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use ranker_model::checkpoint;
use rankstack_nn::host_transfer::read_computed;
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::{Error, Result};

use super::{check_batch_memory, check_output, Workload};
use crate::data::{DataSchema, ParquetDataset, UploadAhead};
use crate::device::DeviceSpec;
use crate::train::{
    evaluate, non_finite_score, reliability_svg, resolve_checkpoint, BatchSource, TaskMetrics, RELIABILITY_MARKER,
};

/// A plain-text table of per-task metrics.
pub fn metrics_table(tasks: &[(String, TaskMetrics)]) -> String {
    let mut s =
        format!("{:<12} {:>8} {:>8} {:>9} {:>8} {:>11}\n", "task", "rows", "AUC", "log loss", "NE", "calibration");
    for (name, m) in tasks {
        s.push_str(&format!(
            "{name:<12} {:>8} {:>8.4} {:>9.4} {:>8.4} {:>11.4}\n",
            m.count, m.auc, m.log_loss, m.normalized_entropy, m.calibration
        ));
    }
    s
}

/// The serving model (f32 activations) on `device` ([`checkpoint::load_serving_model`]).
fn load_model(checkpoint_path: &Path, weights: WeightPrecision, device: DeviceSpec) -> Result<ranker_model::Ranker> {
    checkpoint::load_serving_model(resolve_checkpoint(checkpoint_path)?, weights, &device.open()?)
}

/// `rankstack eval`: metrics of a checkpoint on a labelled file, and the reliability diagram of
/// every task (calibration by decile) as `reliability-<data file stem>.svg` in `plots_dir` (by
/// default the `--checkpoint` directory, beside the model it describes).
pub fn eval(
    checkpoint_path: &Path,
    data_path: &Path,
    batch_size: usize,
    weights: WeightPrecision,
    device: DeviceSpec,
    plots_dir: Option<&Path>,
) -> Result<String> {
    let ranker = load_model(checkpoint_path, weights, device)?;
    let data = ParquetDataset::open(data_path)?;
    DataSchema::check_fits_model(data.schema(), ranker.config(), "eval", true)?;
    check_batch_memory(&ranker, batch_size, data.num_rows(), Workload::Inference, "eval", ranker.device())?;
    // Before the evaluation: a file in the way fails at once, not after the pass over the data.
    let plot = reliability_path(plots_dir.unwrap_or(checkpoint_path), data_path)?;
    let report = evaluate(&ranker, &data, batch_size, 0, 0)?;
    let svg = reliability_svg(&report.reliability)?;
    ranker_model::checkpoint::write_atomically(&plot, svg.as_bytes())?;
    Ok(format!(
        "loss {:.4}\n{}reliability diagrams (calibration by decile): {}\n",
        report.loss,
        metrics_table(&report.tasks),
        plot.display()
    ))
}

/// Where `eval` writes the reliability diagrams of `data`: `dir/reliability-<stem>.svg` (`dir`
/// created if needed). A file already there is replaced only if an earlier `eval` wrote it.
fn reliability_path(dir: &Path, data: &Path) -> Result<PathBuf> {
    let stem = data.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
    let path = dir.join(format!("reliability-{stem}.svg"));
    match std::fs::read(&path) {
        Ok(existing) if !existing.starts_with(RELIABILITY_MARKER.as_bytes()) => {
            return Err(Error::input(
                "eval",
                "plots",
                format!(
                    "{} exists and was not written by rankstack eval; move it or choose another --plots directory",
                    path.display()
                ),
            ));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(Error::io_at(dir))?;
    Ok(path)
}

/// `rankstack score`: per-task probabilities for every row of `data`, written to `out` as CSV or
/// Parquet (by extension), one column per task plus the row index. The file's features must be
/// those the model was trained on (its labels are not read); an existing `out` is replaced only
/// with `force`, `out` is never the data file, and the write is atomic. A non-finite probability
/// is an error naming its row and task.
pub fn score(
    checkpoint_path: &Path,
    data_path: &Path,
    out: &Path,
    batch_size: usize,
    weights: WeightPrecision,
    device: DeviceSpec,
    force: bool,
) -> Result<String> {
    check_output("score", out, force, &[data_path])?;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "csv" | "parquet") {
        return Err(Error::input("score", "out", format!("{}: use a .csv or .parquet file name", out.display())));
    }
    let ranker = load_model(checkpoint_path, weights, device)?;
    let data = ParquetDataset::open_features_only(data_path)?;
    DataSchema::check_fits_model(data.schema(), ranker.config(), "score", false)?;
    check_batch_memory(&ranker, batch_size, data.num_rows(), Workload::Inference, "score", ranker.device())?;
    let tasks = ranker.task_names().to_vec();
    let mut columns: Vec<Vec<f32>> = vec![Vec::new(); tasks.len()];
    // On a GPU the next batch is copied while this one is scored.
    for item in UploadAhead::new(BatchSource::batches(&data, batch_size, None)?, ranker.device()) {
        let b = item?;
        let p = read_computed::<f32>(&ranker.predict(&b.batch)?.to_dtype(DType::F32)?, "probabilities")?;
        for (row, index) in p.chunks(tasks.len()).zip(&b.row_index) {
            for (t, &v) in row.iter().enumerate() {
                if !v.is_finite() {
                    return Err(non_finite_score("score", f64::from(v), *index, &tasks[t]));
                }
                columns[t].push(v);
            }
        }
    }
    let rows = columns.first().map_or(0, Vec::len);
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = match ext {
        "csv" => {
            let mut s = format!("row,{}\n", tasks.iter().map(|t| format!("p_{t}")).collect::<Vec<_>>().join(","));
            for r in 0..rows {
                let vals: Vec<String> = columns.iter().map(|c| format!("{}", c[r])).collect();
                s.push_str(&format!("{r},{}\n", vals.join(",")));
            }
            s.into_bytes()
        }
        _ => parquet_bytes(&tasks, &columns)?,
    };
    ranker_model::checkpoint::write_atomically(out, &bytes)?;
    Ok(format!("scored {rows} rows into {}\n", out.display()))
}

fn parquet_bytes(tasks: &[String], columns: &[Vec<f32>]) -> Result<Vec<u8>> {
    use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt64Array};
    use arrow_schema::{DataType, Field, Schema};
    let rows = columns.first().map_or(0, Vec::len);
    let mut fields = vec![Field::new("row", DataType::UInt64, false)];
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from_iter_values(0..rows as u64))];
    for (t, c) in tasks.iter().zip(columns) {
        fields.push(Field::new(format!("p_{t}"), DataType::Float32, false));
        arrays.push(Arc::new(Float32Array::from(c.clone())));
    }
    let schema = Arc::new(Schema::new(fields));
    let err = |e: String| Error::input("score", "out", e);
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).map_err(|e| err(e.to_string()))?;
    writer.write(&batch).map_err(|e| err(e.to_string()))?;
    writer.close().map_err(|e| err(e.to_string()))?;
    Ok(buf)
}
