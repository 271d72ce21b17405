//! `rankstack data synthetic|movielens`.

use std::path::Path;

use rankstack_nn::Result;

use crate::data::{movielens, synthetic};

/// Writes `rows` synthetic rows (seed, stream) to `out` (an existing file only with `force`;
/// written to a temporary file and renamed); returns a summary line.
pub fn data_synthetic(rows: usize, seed: u64, stream: u64, out: &Path, force: bool) -> Result<String> {
    super::check_output("data synthetic", out, force, &[])?;
    let spec = synthetic::SyntheticSpec { rows, seed, stream, ..Default::default() };
    let summary = synthetic::generate(&spec, out)?;
    let rates: Vec<String> =
        synthetic::TASKS.iter().zip(&summary.label_rates).map(|(t, r)| format!("{t} {r:.3}")).collect();
    let aucs: Vec<String> =
        synthetic::TASKS.iter().zip(&summary.teacher_auc).map(|(t, a)| format!("{t} {a:.3}")).collect();
    Ok(format!(
        "wrote {} rows to {}\nlabel rates: {}\nteacher AUC (the ceiling): {}\n",
        summary.rows,
        out.display(),
        rates.join(", "),
        aucs.join(", ")
    ))
}

/// Converts MovieLens-100k (recbole atomic files in `input`) into `out_dir/{train,test}.parquet`
/// (existing files are replaced only with `force`).
pub fn data_movielens(input: &Path, out_dir: &Path, force: bool) -> Result<String> {
    let (train, test) = (out_dir.join("train.parquet"), out_dir.join("test.parquet"));
    for out in [&train, &test] {
        super::check_output("data movielens", out, force, &[])?;
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|source| rankstack_nn::Error::Io { path: out_dir.display().to_string(), source })?;
    let (_, counts) = movielens::convert(input, &train, &test)?;
    Ok(format!(
        "{} users, {} items; wrote {} training rows to {} and {} test rows to {}\n",
        counts.users,
        counts.items,
        counts.train_rows,
        train.display(),
        counts.test_rows,
        test.display()
    ))
}
