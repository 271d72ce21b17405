//! Parquet data I/O: round trips, up-front column checks, row-level errors, streaming, shuffling,
//! and the synthetic generator's determinism and fit to the model.

use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder};
use arrow_array::{ArrayRef, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use candle_core::{DType, Device, Tensor};
use feature_encoders::{DenseFeature, EmbeddingFeature, FeatureSchema, Pooling, SparseFeature};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use ranker_model::{presets, Ranker, SequenceItems};
use rankstack::data::synthetic::{self, SyntheticSpec};
use rankstack::data::{
    collate, DataSchema, Example, ExampleItems, ExampleSequence, LabeledBatch, ParquetDataset, ParquetWriter,
    SequenceItemSpec, SequenceSpec, Shuffle, WriterOptions, SCHEMA_METADATA_KEY,
};
use rankstack_nn::testing::ScratchDir;
use rankstack_nn::SeededVarMap;

/// A scratch directory for one test's files, removed when the test ends.
fn scratch() -> ScratchDir {
    ScratchDir::new("data-tests")
}

fn schema(items: SequenceItemSpec) -> DataSchema {
    DataSchema {
        features: FeatureSchema {
            dense: vec![
                DenseFeature { name: "d0".into(), missing_indicator: true },
                DenseFeature { name: "d1".into(), missing_indicator: false },
            ],
            sparse: vec![
                SparseFeature::new("s_one", 50),
                SparseFeature { pooling: Pooling::Mean, ..SparseFeature::new("s_bag", 20) },
            ],
            embedding: vec![EmbeddingFeature {
                name: "e".into(),
                dim: 3,
                projection: None,
                projection_bias: true,
                normalize: true,
            }],
            ..FeatureSchema::default()
        },
        sequence: Some(SequenceSpec { max_len: 4, num_action_types: 5, items }),
        tasks: vec!["save".into(), "click".into()],
    }
}

/// Row `i`: varied bag and sequence lengths (0 to 6 > max_len), NaN dense values and labels.
fn example(i: usize, embeddings: bool, weights: bool) -> Example {
    let n = i % 7;
    let items = if embeddings {
        ExampleItems::Embeddings {
            sequence: (0..n).map(|j| vec![i as f32, j as f32, -1.5]).collect(),
            candidate: vec![0.5, i as f32, 2.0],
        }
    } else {
        ExampleItems::Ids { sequence: (0..n).map(|j| (i * 10 + j) as i64).collect(), candidate: 1000 + i as i64 }
    };
    Example {
        dense: vec![if i.is_multiple_of(3) { f32::NAN } else { i as f32 * 0.5 }, -(i as f32)],
        sparse: vec![vec![(i % 50) as i64], (0..(i % 4) as i64).map(|k| k + i as i64 % 5).collect()],
        embedding: vec![vec![i as f32, 1.0, -2.0]],
        sequence: Some(ExampleSequence {
            action_types: (0..n).map(|j| 1 + ((i + j) % 4) as i64).collect(),
            timestamps: (0..n).map(|j| 1_000_000 - 1000 * j as i64 - i as i64).collect(),
            items,
            request_time: 1_000_000 + i as i64,
        }),
        labels: vec![if i % 4 == 1 { f32::NAN } else { (i % 2) as f32 }, 1.0 - (i % 2) as f32],
        example_weight: weights.then_some(1.0 + i as f32),
    }
}

fn write(path: &PathBuf, schema: &DataSchema, rows: &[Example], weights: bool, rows_per_group: usize) {
    let options = WriterOptions { sparse_lists: vec!["s_bag".into()], example_weights: weights, rows_per_group };
    let mut w = ParquetWriter::create(path, schema, options).unwrap();
    for chunk in rows.chunks(5) {
        w.write(chunk).unwrap();
    }
    assert_eq!(w.finish().unwrap(), rows.len() as u64);
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn assert_same_batch(a: &LabeledBatch, b: &LabeledBatch) {
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.row_index, b.row_index);
    assert_eq!(bits(&a.labels), bits(&b.labels));
    assert_eq!(a.example_weights.as_ref().map(bits), b.example_weights.as_ref().map(bits));
    let (fa, fb) = (&a.batch.features, &b.batch.features);
    assert_eq!(bits(fa.dense.as_ref().unwrap()), bits(fb.dense.as_ref().unwrap()));
    assert_eq!(fa.sparse, fb.sparse);
    for (x, y) in fa.embedding.iter().zip(&fb.embedding) {
        assert_eq!(x.dims(), y.dims());
        assert_eq!(bits(x), bits(y));
    }
    let (sa, sb) = (a.batch.sequence.as_ref().unwrap(), b.batch.sequence.as_ref().unwrap());
    assert_eq!(ints(&sa.action_types), ints(&sb.action_types));
    assert_eq!(ints(&sa.timestamps), ints(&sb.timestamps));
    assert_eq!(ints(&sa.request_time), ints(&sb.request_time));
    match (&sa.items, &sb.items) {
        (SequenceItems::Ids { sequence: s1, candidate: c1 }, SequenceItems::Ids { sequence: s2, candidate: c2 }) => {
            assert_eq!(ints(s1), ints(s2));
            assert_eq!(ints(c1), ints(c2));
        }
        (
            SequenceItems::Embeddings { sequence: s1, candidate: c1 },
            SequenceItems::Embeddings { sequence: s2, candidate: c2 },
        ) => {
            assert_eq!(s1.dims(), s2.dims());
            assert_eq!(bits(s1), bits(s2));
            assert_eq!(bits(c1), bits(c2));
        }
        _ => panic!("item kinds differ"),
    }
}

#[test]
fn round_trip_gives_the_same_rows_and_tensors() {
    for (embeddings, weights) in [(false, false), (true, true)] {
        let items = if embeddings {
            SequenceItemSpec::Embeddings { dim: 3 }
        } else {
            SequenceItemSpec::Ids { cardinality: 2000, dim: 8 }
        };
        let schema = schema(items);
        let rows: Vec<Example> = (0..23).map(|i| example(i, embeddings, weights)).collect();
        let dir = scratch();
        let path = dir.join(format!("round_trip_{embeddings}.parquet"));
        write(&path, &schema, &rows, weights, 6);
        let data = ParquetDataset::open(&path).unwrap();
        assert_eq!(data.schema(), &schema);
        assert_eq!((data.num_rows(), data.has_example_weights()), (23, weights));
        // Rows: NaN ≠ NaN, so compare the debug forms.
        assert_eq!(format!("{:?}", data.read_all().unwrap()), format!("{rows:?}"));
        // Batches of 5 (does not divide 23): 5, 5, 5, 5, 3, equal to collating the originals.
        let batches: Vec<LabeledBatch> = data.batches(5, None).unwrap().map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(|b| b.rows).collect::<Vec<_>>(), [5, 5, 5, 5, 3]);
        for (k, batch) in batches.iter().enumerate() {
            let index: Vec<u64> = (k as u64 * 5..(k as u64 * 5 + batch.rows as u64)).collect();
            let originals = &rows[index[0] as usize..=*index.last().unwrap() as usize];
            assert_same_batch(batch, &collate(&schema, originals, &index).unwrap());
        }
        // Truncation to max_len = 4 keeps the newest (first) actions; padding is type 0.
        let seq = batches[1].batch.sequence.as_ref().unwrap();
        assert_eq!(seq.action_types.dims(), &[5, 4]);
        let row6 = &rows[6].sequence.as_ref().unwrap().action_types; // 6 actions
        assert_eq!(ints(&seq.action_types.get(1).unwrap()), row6[..4]);
        let row7 = ints(&seq.action_types.get(2).unwrap()); // 0 actions
        assert_eq!(row7, [0, 0, 0, 0]);
        // Null labels read as NaN.
        let labels = batches[0].labels.to_vec2::<f32>().unwrap();
        assert!(labels[1][0].is_nan() && !labels[1][1].is_nan() && labels[0][0] == 0.0 && labels[2][0] == 0.0);
    }
}

#[test]
fn missing_and_mistyped_columns_are_named_up_front() {
    let schema = schema(SequenceItemSpec::Ids { cardinality: 2000, dim: 8 });
    let rows: Vec<Example> = (0..5).map(|i| example(i, false, false)).collect();
    let dir = scratch();
    let path = dir.join("columns.parquet");
    write(&path, &schema, &rows, false, 100);

    let mut wider = schema.clone();
    wider.features.dense.push(DenseFeature { name: "zz".into(), missing_indicator: false });
    let err = ParquetDataset::open_with_schema(&path, &wider).unwrap_err().to_string();
    assert!(err.contains("`zz`") && err.contains("missing"), "{err}");

    let mut more_tasks = schema.clone();
    more_tasks.tasks.push("hide".into());
    let err = ParquetDataset::open_with_schema(&path, &more_tasks).unwrap_err().to_string();
    assert!(err.contains("`label_hide`") && err.contains("missing"), "{err}");
    // ... which scoring tolerates: the label reads as NaN.
    let data = ParquetDataset::open_unlabeled(&path, Some(&more_tasks)).unwrap();
    assert_eq!(data.missing_labels(), ["label_hide"]);
    let batch = data.batches(5, None).unwrap().next().unwrap().unwrap();
    assert!(batch.labels.to_vec2::<f32>().unwrap().iter().all(|r| r[2].is_nan()));

    // The embedding column has width 3; a schema asking for 4 is a type error.
    let mut wrong_dim = schema.clone();
    wrong_dim.features.embedding[0].dim = 4;
    let err = ParquetDataset::open_with_schema(&path, &wrong_dim).unwrap_err().to_string();
    assert!(err.contains("`e`") && err.contains("FixedSizeList<Float32, 4>"), "{err}");

    // A string column where a dense feature should be.
    let text_schema = Arc::new(Schema::new(vec![Field::new("d0", DataType::Utf8, true)]));
    let batch =
        RecordBatch::try_new(text_schema.clone(), vec![Arc::new(StringArray::from(vec!["a"])) as ArrayRef]).unwrap();
    let dir = scratch();
    let path = dir.join("text.parquet");
    let mut w = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), text_schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = ParquetDataset::open_with_schema(&path, &schema).unwrap_err().to_string();
    assert!(err.contains("`d0`") && err.contains("Utf8"), "{err}");
    // No schema metadata and no explicit schema.
    let err = ParquetDataset::open(&path).unwrap_err().to_string();
    assert!(err.contains(SCHEMA_METADATA_KEY), "{err}");
}

/// A hand-written file (Float64 labels, Int64 lists) of 8 rows in row groups of 4, with `corrupt`
/// applied to the columns; returns the first error of streaming it.
fn stream_error(corrupt: impl Fn(usize, &mut Vec<i64>, &mut Vec<i64>, &mut f64)) -> String {
    let schema = DataSchema {
        features: FeatureSchema {
            dense: vec![DenseFeature { name: "d".into(), missing_indicator: false }],
            ..Default::default()
        },
        sequence: Some(SequenceSpec {
            max_len: 3,
            num_action_types: 4,
            items: SequenceItemSpec::Ids { cardinality: 10, dim: 4 },
        }),
        tasks: vec!["y".into()],
    };
    let list = || DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)));
    let arrow = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Float32, true),
        Field::new("seq_action_types", list(), true),
        Field::new("seq_timestamps", list(), true),
        Field::new("seq_item_ids", list(), true),
        Field::new("candidate_item_id", DataType::Int64, false),
        Field::new("request_time", DataType::Int64, false),
        Field::new("label_y", DataType::Float64, true),
    ]));
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(4))
        .set_key_value_metadata(Some(vec![KeyValue::new(SCHEMA_METADATA_KEY.into(), schema.to_json())]))
        .build();
    let dir = scratch();
    let path = dir.join("corrupt.parquet");
    let mut w = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), arrow.clone(), Some(props)).unwrap();
    for start in [0usize, 4] {
        let (mut types, mut stamps, mut ids) = (
            ListBuilder::new(Int64Builder::new()),
            ListBuilder::new(Int64Builder::new()),
            ListBuilder::new(Int64Builder::new()),
        );
        let mut labels = Vec::new();
        for row in start..start + 4 {
            let (mut t, mut s, mut y) = (vec![1, 2], vec![10, 5], 1.0);
            corrupt(row, &mut t, &mut s, &mut y);
            ids.values().append_slice(&vec![3; t.len()]);
            ids.append(true);
            types.values().append_slice(&t);
            types.append(true);
            stamps.values().append_slice(&s);
            stamps.append(true);
            labels.push(y);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Float32Array::from(vec![1.0; 4])),
            Arc::new(types.finish()),
            Arc::new(stamps.finish()),
            Arc::new(ids.finish()),
            Arc::new(Int64Array::from(vec![7; 4])),
            Arc::new(Int64Array::from(vec![100; 4])),
            Arc::new(Float64Array::from(labels)),
        ];
        w.write(&RecordBatch::try_new(arrow.clone(), columns).unwrap()).unwrap();
    }
    w.close().unwrap();
    let data = ParquetDataset::open(&path).unwrap();
    let results: Vec<_> = data.batches(3, None).unwrap().collect();
    if let Some(first_err) = results.iter().position(Result::is_err) {
        assert_eq!(first_err + 1, results.len(), "the stream must end with the error");
    }
    results.into_iter().find_map(Result::err).map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn bad_values_name_the_column_and_the_first_bad_row() {
    let err = stream_error(|row, _, s, _| {
        if row >= 5 {
            s.pop();
        }
    });
    assert!(err.contains("`seq_timestamps`, row 5") && err.contains("1 timestamps for 2"), "{err}");
    let err = stream_error(|row, _, _, y| {
        if row == 6 {
            *y = 2.0;
        }
    });
    assert!(err.contains("`label_y`, row 6") && err.contains("outside [0, 1]"), "{err}");
    let err = stream_error(|row, t, _, _| {
        if row == 2 {
            t[1] = 4;
        }
    });
    assert!(err.contains("`seq_action_types`, row 2") && err.contains("outside 1..4"), "{err}");
    assert_eq!(stream_error(|_, _, _, _| {}), "", "the clean file streams without error");
}

fn order(data: &ParquetDataset, batch_size: usize, shuffle: Option<Shuffle>) -> Vec<u64> {
    let mut out = Vec::new();
    for batch in data.batches(batch_size, shuffle).unwrap() {
        let batch = batch.unwrap();
        // Row i carries -i as its second dense value: contents follow the reported index.
        let dense = batch.batch.features.dense.as_ref().unwrap().to_vec2::<f32>().unwrap();
        for (r, &i) in batch.row_index.iter().enumerate() {
            assert_eq!(dense[r][1], -(i as f32));
        }
        out.extend(&batch.row_index);
    }
    out
}

#[test]
fn shuffling_is_seeded_and_complete() {
    let schema = schema(SequenceItemSpec::Ids { cardinality: 2000, dim: 8 });
    let rows: Vec<Example> = (0..103).map(|i| example(i, false, false)).collect();
    let dir = scratch();
    let path = dir.join("shuffle.parquet");
    write(&path, &schema, &rows, false, 10);
    let data = ParquetDataset::open(&path).unwrap();
    assert_eq!(order(&data, 7, None), (0..103).collect::<Vec<_>>());
    let shuffle = |seed| Some(Shuffle { seed, buffer_rows: 32 });
    let a = order(&data, 7, shuffle(1));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..103).collect::<Vec<_>>(), "every row exactly once");
    assert_ne!(a, (0..103).collect::<Vec<_>>());
    assert_eq!(a, order(&data, 7, shuffle(1)), "same seed, same order");
    assert_eq!(a, order(&data, 16, shuffle(1)), "the order does not depend on the batch size");
    assert_ne!(a, order(&data, 7, shuffle(2)), "different seed, different order");
    let full = order(&data, 50, Some(Shuffle { seed: 3, buffer_rows: 1000 }));
    assert_eq!(full.len(), 103);
    assert!(data.batches(0, None).is_err());
}

#[test]
fn synthetic_data_is_deterministic_and_fits_the_model() {
    let spec = SyntheticSpec { rows: 600, ..SyntheticSpec::default() };
    let dir = scratch();
    let (a, b, c) = (dir.join("syn_a.parquet"), dir.join("syn_b.parquet"), dir.join("syn_c.parquet"));
    let summary = synthetic::generate(&spec, &a).unwrap();
    synthetic::generate(&spec, &b).unwrap();
    synthetic::generate(&SyntheticSpec { seed: 1, ..spec.clone() }, &c).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap(), "same spec, same bytes");
    assert_ne!(bytes, std::fs::read(&c).unwrap());
    assert_eq!(summary.rows, 600);
    for (t, rate) in summary.label_rates.iter().enumerate() {
        assert!((0.03..0.8).contains(rate), "task {t} rate {rate}");
    }
    assert!(summary.teacher_auc[0] > 0.8, "{:?}", summary.teacher_auc);

    let data = ParquetDataset::open(&a).unwrap();
    assert_eq!(data.schema(), &spec.schema());
    let mut config = presets::preset("pinterest-homefeed").unwrap();
    data.schema().apply(&mut config).unwrap();
    let params = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, params.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let batch = data.batches(16, Some(Shuffle { seed: 0, buffer_rows: 100 })).unwrap().next().unwrap().unwrap();
    let logits = ranker.forward(&batch.batch).unwrap();
    assert_eq!(logits.dims(), &[16, 4]);
    assert!(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

/// Timing and label statistics of the default synthetic data set (20 000 rows):
/// `cargo test --test data_parquet -- --ignored --nocapture`.
#[test]
#[ignore]
fn synthetic_default_timing() {
    let dir = scratch();
    let path = dir.join("syn_default.parquet");
    let t0 = std::time::Instant::now();
    let summary = synthetic::generate(&SyntheticSpec::default(), &path).unwrap();
    let generate = t0.elapsed();
    let t0 = std::time::Instant::now();
    let data = ParquetDataset::open(&path).unwrap();
    let rows: usize =
        data.batches(512, Some(Shuffle { seed: 0, buffer_rows: 8192 })).unwrap().map(|b| b.unwrap().rows).sum();
    eprintln!(
        "generate {generate:.2?}, read+shuffle+collate {:.2?} ({rows} rows, {} bytes): {summary:?}",
        t0.elapsed(),
        std::fs::metadata(&path).unwrap().len()
    );
}
