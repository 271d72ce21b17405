//! MovieLens-100k (the recbole 1.2.1 atomic files) → the Parquet convention, split by time.
//!
//! Input: `ml-100k.inter` (`user_id:token`, `item_id:token`, `rating:float`, `timestamp:float`),
//! `ml-100k.user` (`user_id`, `age`, `gender`, `occupation`, `zip_code`) and `ml-100k.item`
//! (`item_id`, `release_year`, `class` = space-separated genres; other columns ignored):
//! tab-separated, one typed header line, columns found by name. `scripts/fetch-movielens.sh`
//! downloads them into `data/ml-100k/` (never commit them: the licence forbids redistribution).
//!
//! # Rows
//!
//! One row per rating, in time order (timestamp, then user, then item). Ids are 1-based in the
//! order of the `.user` / `.item` files (users or items seen only in `.inter` are appended); 0
//! means unknown everywhere.
//!
//! | column | kind | value |
//! |---|---|---|
//! | `user_id`, `item_id` | sparse | the ids |
//! | `age_bucket` | sparse (8) | <18, 18–24, 25–34, 35–44, 45–49, 50–55, 56+ → 1..=7 |
//! | `gender` | sparse (3) | M 1, F 2 |
//! | `occupation` | sparse | alphabetical vocabulary, 1-based |
//! | `zip_prefix` | sparse (101) | 1 + the first two digits of the zip code (0 if not two digits) |
//! | `genres` | sparse bag, mean pooling | alphabetical genre vocabulary, 1-based |
//! | `release_decade` | sparse (10) | `1 + clamp((year − 1920) / 10, 0, 8)` |
//! | `hour`, `weekday` | sparse (24, 7) | of the rating's UTC timestamp, Monday = 0 |
//! | `user_prev_count`, `item_prev_count` | dense | ratings by the user / of the item strictly before |
//! | `user_prev_mean_rating`, `item_prev_mean_rating` | dense | their mean rating (NaN if none) |
//! | `item_age_years` | dense | rating year − release year (NaN if unknown) |
//! | sequence | ids | the user's ratings strictly before this one, newest first, at most `max_len`: action type = rating (1..=5), item id, time in ms; `request_time` = the rating's time in ms; candidate = the rated item |
//! | `label_like`, `label_love` | labels | rating ≥ 4, rating = 5 |
//!
//! Every feature is computed from ratings with a timestamp strictly before the row's (ratings in
//! the same second are not "before" each other), so nothing from the present or future leaks in.
//!
//! # Split
//!
//! The last `⌈test_fraction · n⌉` rows in time order are the test set, the others the training set.
//! Test sequences may hold earlier test ratings: they are in the past at serving time.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use feature_encoders::{DenseFeature, FeatureSchema, Pooling, SparseFeature};
use rankstack_nn::{Error, Result};

use super::{
    DataSchema, Example, ExampleItems, ExampleSequence, ParquetWriter, SequenceItemSpec, SequenceSpec, WriterOptions,
};

const LAYER: &str = "movielens";

/// Conversion options.
#[derive(Debug, Clone, PartialEq)]
pub struct MovieLensOptions {
    /// Sequence length stored and used (`S`).
    pub max_len: usize,
    /// Width of the learned item embedding of the sequence.
    pub item_dim: usize,
    /// Fraction of the rows (the latest) in the test set, in `(0, 1)`.
    pub test_fraction: f64,
}

impl Default for MovieLensOptions {
    /// `S = 50`, item width 16, 10% test.
    fn default() -> Self {
        Self { max_len: 50, item_dim: 16, test_fraction: 0.1 }
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MovieLensCounts {
    /// Users (including any seen only in the ratings file).
    pub users: usize,
    /// Items (including any seen only in the ratings file).
    pub items: usize,
    /// Rows in the training file.
    pub train_rows: usize,
    /// Rows in the test file.
    pub test_rows: usize,
    /// Timestamp (s) of the first test row; every training row is at or before it.
    pub split_timestamp: i64,
    /// Mean `like` and `love` labels of the training rows.
    pub train_label_rates: [f64; 2],
    /// Mean `like` and `love` labels of the test rows.
    pub test_label_rates: [f64; 2],
}

/// One tab-separated atomic file: header names (type suffix removed) and rows.
struct Table {
    path: String,
    names: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines = text.lines();
        let header = lines.next().ok_or_else(|| Error::input(LAYER, path.display().to_string(), "empty file"))?;
        let names = header.split('\t').map(|h| h.split(':').next().unwrap_or("").trim().to_string()).collect();
        let rows = lines
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(|f| f.trim().to_string()).collect())
            .collect();
        Ok(Self { path: path.display().to_string(), names, rows })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::input(
                LAYER,
                format!("{}: column `{name}`", self.path),
                format!("missing (header has {:?})", self.names),
            )
        })
    }

    /// Field `c` of row `r` ("" if the line is short).
    fn get(&self, r: usize, c: usize) -> &str {
        self.rows[r].get(c).map_or("", String::as_str)
    }

    fn number(&self, r: usize, c: usize) -> Result<f64> {
        let v = self.get(r, c);
        v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| {
            Error::input(
                LAYER,
                format!("{}: column `{}`, line {}", self.path, self.names[c], r + 2),
                format!("`{v}` is not a number"),
            )
        })
    }
}

/// 1-based ids of tokens in first-seen order.
#[derive(Default)]
struct Vocab(HashMap<String, i64>);

impl Vocab {
    fn id(&mut self, token: &str) -> i64 {
        let next = self.0.len() as i64 + 1;
        *self.0.entry(token.to_string()).or_insert(next)
    }

    fn cardinality(&self) -> usize {
        self.0.len() + 1
    }
}

fn sorted_vocab(tokens: BTreeSet<String>) -> Vocab {
    let mut v = Vocab::default();
    for t in tokens {
        v.id(&t);
    }
    v
}

fn age_bucket(age: &str) -> i64 {
    match age.parse::<f64>() {
        Ok(a) if a < 18.0 => 1,
        Ok(a) if a < 25.0 => 2,
        Ok(a) if a < 35.0 => 3,
        Ok(a) if a < 45.0 => 4,
        Ok(a) if a < 50.0 => 5,
        Ok(a) if a < 56.0 => 6,
        Ok(_) => 7,
        Err(_) => 0,
    }
}

fn zip_prefix(zip: &str) -> i64 {
    let b = zip.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_digit() && b[1].is_ascii_digit() {
        1 + i64::from(b[0] - b'0') * 10 + i64::from(b[1] - b'0')
    } else {
        0
    }
}

fn release_decade(year: Option<i64>) -> i64 {
    year.map_or(0, |y| 1 + ((y - 1920) / 10).clamp(0, 8))
}

#[derive(Clone, Copy, Default)]
struct UserInfo {
    age: i64,
    gender: i64,
    occupation: i64,
    zip: i64,
}

#[derive(Clone, Default)]
struct ItemInfo {
    genres: Vec<i64>,
    year: Option<i64>,
}

struct Rating {
    user: i64,
    item: i64,
    rating: i64,
    ts: i64,
}

/// Converts with [`MovieLensOptions::default`]; see [`convert_with`].
pub fn convert(
    ml_dir: impl AsRef<Path>,
    train_out: impl AsRef<Path>,
    test_out: impl AsRef<Path>,
) -> Result<(DataSchema, MovieLensCounts)> {
    convert_with(ml_dir, train_out, test_out, &MovieLensOptions::default())
}

/// Reads `ml-100k.{inter,user,item}` from `ml_dir` and writes the training and test Parquet
/// files (see the module doc).
pub fn convert_with(
    ml_dir: impl AsRef<Path>,
    train_out: impl AsRef<Path>,
    test_out: impl AsRef<Path>,
    options: &MovieLensOptions,
) -> Result<(DataSchema, MovieLensCounts)> {
    if options.max_len == 0 || options.item_dim == 0 {
        return Err(Error::config(LAYER, "max_len / item_dim", "must be > 0"));
    }
    if !(options.test_fraction > 0.0 && options.test_fraction < 1.0) {
        return Err(Error::config(LAYER, "test_fraction", format!("must be in (0, 1), got {}", options.test_fraction)));
    }
    let dir = ml_dir.as_ref();
    let mut catalog = Catalog::default();
    catalog.read_users(&Table::read(&dir.join("ml-100k.user"))?)?;
    catalog.read_items(&Table::read(&dir.join("ml-100k.item"))?)?;
    let inter = Table::read(&dir.join("ml-100k.inter"))?;
    let ratings = catalog.read_ratings(&inter)?;
    let schema = catalog.schema(options);

    let n = ratings.len();
    if n < 2 {
        return Err(Error::input(LAYER, inter.path.clone(), "needs at least 2 ratings to split"));
    }
    let n_test = ((n as f64 * options.test_fraction).ceil() as usize).clamp(1, n - 1);
    let n_train = n - n_test;
    let writer_options = || WriterOptions { sparse_lists: vec!["genres".into()], ..WriterOptions::default() };
    let mut split = Split {
        train: ParquetWriter::create(train_out, &schema, writer_options())?,
        test: ParquetWriter::create(test_out, &schema, writer_options())?,
        n_train,
        buffer: Vec::with_capacity(Split::BUFFER_ROWS),
        label_sums: [[0.0; 2]; 2],
    };

    // Walk the ratings one timestamp at a time: compute the rows of a group from the past, then
    // add the group to the past, so that features see strictly earlier ratings only.
    let mut past = Past::new(&catalog);
    let mut start = 0;
    while start < n {
        let ts = ratings[start].ts;
        let end = start + ratings[start..].iter().take_while(|r| r.ts == ts).count();
        for (k, r) in ratings[start..end].iter().enumerate() {
            split.push(start + k, past.example(&catalog, r, options.max_len))?;
        }
        ratings[start..end].iter().for_each(|r| past.add(r));
        start = end;
    }
    let (train_rows, test_rows, label_sums) = split.finish()?;
    let counts = MovieLensCounts {
        users: catalog.user_vocab.cardinality() - 1,
        items: catalog.item_vocab.cardinality() - 1,
        train_rows,
        test_rows,
        split_timestamp: ratings[n_train].ts,
        train_label_rates: label_sums[0].map(|s| s / train_rows.max(1) as f64),
        test_label_rates: label_sums[1].map(|s| s / test_rows.max(1) as f64),
    };
    Ok((schema, counts))
}

/// The users and items: their ids (vocabularies) and features.
#[derive(Default)]
struct Catalog {
    user_vocab: Vocab,
    item_vocab: Vocab,
    occupations: Vocab,
    genres: Vocab,
    /// Indexed by user id (0: unknown).
    users: Vec<UserInfo>,
    /// Indexed by item id (0: unknown).
    items: Vec<ItemInfo>,
}

impl Catalog {
    /// The `.user` file: ids in file order, age bucket, gender, occupation, zip prefix.
    fn read_users(&mut self, t: &Table) -> Result<()> {
        let (c_id, c_age, c_gender, c_occ, c_zip) = (
            t.column("user_id")?,
            t.column("age")?,
            t.column("gender")?,
            t.column("occupation")?,
            t.column("zip_code")?,
        );
        self.occupations =
            sorted_vocab((0..t.rows.len()).map(|r| t.get(r, c_occ).to_string()).filter(|o| !o.is_empty()).collect());
        self.users = vec![UserInfo::default()];
        for r in 0..t.rows.len() {
            let id = self.user_vocab.id(t.get(r, c_id));
            if id as usize == self.users.len() {
                self.users.push(UserInfo {
                    age: age_bucket(t.get(r, c_age)),
                    gender: match t.get(r, c_gender) {
                        "M" => 1,
                        "F" => 2,
                        _ => 0,
                    },
                    occupation: self.occupations.0.get(t.get(r, c_occ)).copied().unwrap_or(0),
                    zip: zip_prefix(t.get(r, c_zip)),
                });
            }
        }
        Ok(())
    }

    /// The `.item` file: ids in file order, genre bag, release year.
    fn read_items(&mut self, t: &Table) -> Result<()> {
        let (c_id, c_year, c_class) = (t.column("item_id")?, t.column("release_year")?, t.column("class")?);
        self.genres = sorted_vocab(
            (0..t.rows.len())
                .flat_map(|r| t.get(r, c_class).split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect(),
        );
        self.items = vec![ItemInfo::default()];
        for r in 0..t.rows.len() {
            let id = self.item_vocab.id(t.get(r, c_id));
            if id as usize == self.items.len() {
                let mut g: Vec<i64> =
                    t.get(r, c_class).split_whitespace().filter_map(|t| self.genres.0.get(t).copied()).collect();
                g.sort_unstable();
                g.dedup();
                let year = t.get(r, c_year).parse::<i64>().ok().filter(|y| (1800..=2100).contains(y));
                self.items.push(ItemInfo { genres: g, year });
            }
        }
        Ok(())
    }

    /// The `.inter` file, in time order (timestamp, then user, then item); users and items seen
    /// only here get the next ids.
    fn read_ratings(&mut self, t: &Table) -> Result<Vec<Rating>> {
        let (c_user, c_item, c_rating, c_ts) =
            (t.column("user_id")?, t.column("item_id")?, t.column("rating")?, t.column("timestamp")?);
        let mut ratings = Vec::with_capacity(t.rows.len());
        for r in 0..t.rows.len() {
            let rating = t.number(r, c_rating)?;
            if !(1.0..=5.0).contains(&rating) || rating.fract() != 0.0 {
                return Err(Error::input(
                    LAYER,
                    format!("{}: column `rating`, line {}", t.path, r + 2),
                    format!("rating {rating} is not an integer in 1..=5"),
                ));
            }
            let ts = t.number(r, c_ts)? as i64;
            let user = self.user_vocab.id(t.get(r, c_user));
            let item = self.item_vocab.id(t.get(r, c_item));
            ratings.push(Rating { user, item, rating: rating as i64, ts });
        }
        self.users.resize(self.user_vocab.cardinality(), UserInfo::default());
        self.items.resize(self.item_vocab.cardinality(), ItemInfo::default());
        ratings.sort_by_key(|r| (r.ts, r.user, r.item));
        Ok(ratings)
    }

    /// The data schema of the converted files (see the module doc).
    fn schema(&self, options: &MovieLensOptions) -> DataSchema {
        DataSchema {
            features: FeatureSchema {
                dense: [
                    ("user_prev_count", false),
                    ("user_prev_mean_rating", true),
                    ("item_prev_count", false),
                    ("item_prev_mean_rating", true),
                    ("item_age_years", true),
                ]
                .iter()
                .map(|&(name, missing_indicator)| DenseFeature { name: name.into(), missing_indicator })
                .collect(),
                sparse: vec![
                    SparseFeature::new("user_id", self.user_vocab.cardinality()),
                    SparseFeature::new("item_id", self.item_vocab.cardinality()),
                    SparseFeature::new("age_bucket", 8),
                    SparseFeature::new("gender", 3),
                    SparseFeature::new("occupation", self.occupations.cardinality()),
                    SparseFeature::new("zip_prefix", 101),
                    SparseFeature { pooling: Pooling::Mean, ..SparseFeature::new("genres", self.genres.cardinality()) },
                    SparseFeature::new("release_decade", 10),
                    SparseFeature::new("hour", 24),
                    SparseFeature::new("weekday", 7),
                ],
                ..FeatureSchema::default()
            },
            sequence: Some(SequenceSpec {
                max_len: options.max_len,
                num_action_types: 6,
                items: SequenceItemSpec::Ids { cardinality: self.item_vocab.cardinality(), dim: options.item_dim },
            }),
            tasks: vec!["like".into(), "love".into()],
        }
    }
}

/// The ratings before the current timestamp: each user's history and the rating counts and sums
/// per user and per item.
struct Past {
    /// Per user: `(timestamp, item, rating)` in time order.
    history: Vec<Vec<(i64, i64, i64)>>,
    user_sum: Vec<(u32, i64)>,
    item_sum: Vec<(u32, i64)>,
}

impl Past {
    fn new(catalog: &Catalog) -> Self {
        Self {
            history: vec![Vec::new(); catalog.users.len()],
            user_sum: vec![(0, 0); catalog.users.len()],
            item_sum: vec![(0, 0); catalog.items.len()],
        }
    }

    /// The row of rating `r`, from the ratings strictly before it (module doc, "Rows").
    fn example(&self, catalog: &Catalog, r: &Rating, max_len: usize) -> Example {
        let user = catalog.users[r.user as usize];
        let item = &catalog.items[r.item as usize];
        let (uc, us) = self.user_sum[r.user as usize];
        let (ic, is) = self.item_sum[r.item as usize];
        let mean = |c: u32, s: i64| if c == 0 { f32::NAN } else { s as f32 / c as f32 };
        let days = r.ts.div_euclid(86_400);
        let year = 1970.0 + days as f64 / 365.2425;
        let seq: Vec<&(i64, i64, i64)> = self.history[r.user as usize].iter().rev().take(max_len).collect();
        Example {
            dense: vec![
                uc as f32,
                mean(uc, us),
                ic as f32,
                mean(ic, is),
                item.year.map_or(f32::NAN, |y| (year - y as f64) as f32),
            ],
            sparse: vec![
                vec![r.user],
                vec![r.item],
                vec![user.age],
                vec![user.gender],
                vec![user.occupation],
                vec![user.zip],
                item.genres.clone(),
                vec![release_decade(item.year)],
                vec![r.ts.div_euclid(3600).rem_euclid(24)],
                vec![(days + 3).rem_euclid(7)],
            ],
            embedding: Vec::new(),
            sequence: Some(ExampleSequence {
                action_types: seq.iter().map(|h| h.2).collect(),
                timestamps: seq.iter().map(|h| h.0 * 1000).collect(),
                items: ExampleItems::Ids { sequence: seq.iter().map(|h| h.1).collect(), candidate: r.item },
                request_time: r.ts * 1000,
            }),
            labels: vec![f32::from(u8::from(r.rating >= 4)), f32::from(u8::from(r.rating == 5))],
            example_weight: None,
        }
    }

    fn add(&mut self, r: &Rating) {
        self.history[r.user as usize].push((r.ts, r.item, r.rating));
        let u = &mut self.user_sum[r.user as usize];
        *u = (u.0 + 1, u.1 + r.rating);
        let i = &mut self.item_sum[r.item as usize];
        *i = (i.0 + 1, i.1 + r.rating);
    }
}

/// The two output files: rows before `n_train` (in time order) go to training, the rest to test,
/// written in blocks; and the label sums of each side.
struct Split {
    train: ParquetWriter,
    test: ParquetWriter,
    n_train: usize,
    buffer: Vec<Example>,
    /// `[train, test]` × `[like, love]`.
    label_sums: [[f64; 2]; 2],
}

impl Split {
    const BUFFER_ROWS: usize = 4096;

    /// Row `index` (in time order).
    fn push(&mut self, index: usize, example: Example) -> Result<()> {
        let is_test = index >= self.n_train;
        for (sum, label) in self.label_sums[usize::from(is_test)].iter_mut().zip(&example.labels) {
            *sum += f64::from(*label);
        }
        if index == self.n_train {
            self.train.write(&self.buffer)?;
            self.buffer.clear();
        }
        self.buffer.push(example);
        if self.buffer.len() == Self::BUFFER_ROWS {
            let writer = if is_test { &mut self.test } else { &mut self.train };
            writer.write(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Flushes and closes both files: `(train rows, test rows, label sums)`.
    fn finish(mut self) -> Result<(usize, usize, [[f64; 2]; 2])> {
        self.test.write(&self.buffer)?;
        Ok((self.train.finish()? as usize, self.test.finish()? as usize, self.label_sums))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ParquetDataset;

    fn tmp(name: &str) -> rankstack_nn::testing::ScratchDir {
        rankstack_nn::testing::ScratchDir::new(&format!("movielens-{name}"))
    }

    /// 3 users, 4 items, 20 ratings with ties in time (two ratings at t = 1000 by user 1, one of them
    /// at the train/test boundary).
    fn write_sample(dir: &Path) -> Vec<(i64, i64, i64, i64)> {
        std::fs::write(
            dir.join("ml-100k.user"),
            "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n\
             10\t24\tM\ttechnician\t85711\n20\t53\tF\tother\t94043\n30\t17\tM\twriter\tT8H1N\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("ml-100k.item"),
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
             1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction Thriller\n\
             3\tOld One\t1931\tDrama\n4\tunkonwn\tunkonwn\tunknown\n",
        )
        .unwrap();
        let mut ratings = Vec::new();
        let mut text = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
        for k in 0..20i64 {
            let user = [10, 20, 30][(k % 3) as usize];
            let item = 1 + (k * 7) % 4;
            let rating = 1 + (k * 3) % 5;
            let ts = if k == 17 || k == 18 { 1000 * 18 } else { 1000 * (k + 1) };
            text.push_str(&format!("{user}\t{item}\t{rating}\t{ts}\n"));
            ratings.push((user, item, rating, ts));
        }
        std::fs::write(dir.join("ml-100k.inter"), text).unwrap();
        ratings
    }

    #[test]
    fn converts_with_a_time_split_and_no_leakage() {
        let dir = tmp("sample");
        let raw = write_sample(&dir);
        let options = MovieLensOptions { max_len: 4, item_dim: 8, test_fraction: 0.1 };
        let (train_p, test_p) = (dir.join("train.parquet"), dir.join("test.parquet"));
        let (schema, counts) = convert_with(&dir, &train_p, &test_p, &options).unwrap();
        assert_eq!((counts.users, counts.items, counts.train_rows, counts.test_rows), (3, 4, 18, 2));
        let train = ParquetDataset::open(&train_p).unwrap().read_all().unwrap();
        let test = ParquetDataset::open(&test_p).unwrap().read_all().unwrap();
        assert_eq!(ParquetDataset::open(&test_p).unwrap().schema(), &schema);
        let time = |e: &Example| e.sequence.as_ref().unwrap().request_time;
        let last_train = train.iter().map(time).max().unwrap();
        assert!(test.iter().all(|e| time(e) >= last_train), "test rows are the latest");
        assert_eq!(counts.split_timestamp * 1000, test.iter().map(time).min().unwrap());

        // Rebuild every row's sequence by brute force from the raw ratings: the user's ratings
        // strictly earlier, newest first (ties in time: higher item id first), at most max_len.
        let all: Vec<&Example> = train.iter().chain(&test).collect();
        for e in &all {
            let s = e.sequence.as_ref().unwrap();
            let (user_token, t) = ([10, 20, 30][(e.sparse[0][0] - 1) as usize], s.request_time / 1000);
            let mut earlier: Vec<_> = raw.iter().filter(|r| r.0 == user_token && r.3 < t).collect();
            earlier.sort_by(|a, b| b.3.cmp(&a.3).then(b.1.cmp(&a.1)));
            earlier.truncate(4);
            assert_eq!(s.timestamps, earlier.iter().map(|r| r.3 * 1000).collect::<Vec<_>>());
            assert_eq!(s.action_types, earlier.iter().map(|r| r.2).collect::<Vec<_>>());
            assert_eq!(
                s.items,
                ExampleItems::Ids { sequence: earlier.iter().map(|r| r.1).collect(), candidate: e.sparse[1][0] }
            );
            let rating = raw.iter().find(|r| r.0 == user_token && r.1 == e.sparse[1][0] && r.3 == t).unwrap().2;
            assert_eq!(e.labels, [f32::from(u8::from(rating >= 4)), f32::from(u8::from(rating == 5))]);
        }
        // Ratings in the same second do not see each other: k = 17 and 18 (user 30 and 10) are at 18 s.
        let row = all.iter().find(|e| time(e) == 18_000_000 && e.sparse[0][0] == 1).unwrap();
        let stamps = &row.sequence.as_ref().unwrap().timestamps;
        assert!(!stamps.is_empty() && stamps.iter().all(|&t| t < 18_000_000));
        // User features: user "10" = id 1: age 24 → bucket 2, M → 1, zip 85711 → 1 + 85.
        assert_eq!((row.sparse[2][0], row.sparse[3][0], row.sparse[5][0]), (2, 1, 86));
        // Item 4 has an unknown year: decade 0, age NaN; item 3 (1931) → decade 2.
        for e in &all {
            match e.sparse[1][0] {
                4 => assert!(e.sparse[7][0] == 0 && e.dense[4].is_nan()),
                3 => assert_eq!(e.sparse[7][0], 2),
                _ => {}
            }
        }
    }

    #[test]
    fn counts_are_strictly_earlier() {
        let dir = tmp("counts");
        let ratings = write_sample(&dir);
        let (train_p, test_p) = (dir.join("train.parquet"), dir.join("test.parquet"));
        convert(&dir, &train_p, &test_p).unwrap();
        let mut rows = ParquetDataset::open(&train_p).unwrap().read_all().unwrap();
        rows.extend(ParquetDataset::open(&test_p).unwrap().read_all().unwrap());
        for e in &rows {
            let t = e.sequence.as_ref().unwrap().request_time / 1000;
            let user_token = [10, 20, 30][(e.sparse[0][0] - 1) as usize];
            let item_token = e.sparse[1][0]; // items are listed 1..=4 in order
            let before: Vec<_> = ratings.iter().filter(|r| r.3 < t).collect();
            let by_user: Vec<_> = before.iter().filter(|r| r.0 == user_token).collect();
            let of_item: Vec<_> = before.iter().filter(|r| r.1 == item_token).collect();
            assert_eq!(e.dense[0], by_user.len() as f32);
            assert_eq!(e.dense[2], of_item.len() as f32);
            if of_item.is_empty() {
                assert!(e.dense[3].is_nan());
            } else {
                let mean = of_item.iter().map(|r| r.2 as f32).sum::<f32>() / of_item.len() as f32;
                assert!((e.dense[3] - mean).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn missing_columns_and_bad_ratings_are_named() {
        let dir = tmp("bad");
        write_sample(&dir);
        let inter = std::fs::read_to_string(dir.join("ml-100k.inter")).unwrap();
        std::fs::write(dir.join("ml-100k.inter"), inter.replace("rating:float", "score:float")).unwrap();
        let err = convert(&dir, dir.join("a.parquet"), dir.join("b.parquet")).unwrap_err().to_string();
        assert!(err.contains("`rating`") && err.contains("missing"), "{err}");
        let bad = inter.replacen("10\t1\t1\t1000\n", "10\t1\t9\t1000\n", 1);
        assert_ne!(bad, inter);
        std::fs::write(dir.join("ml-100k.inter"), bad).unwrap();
        let err = convert(&dir, dir.join("a.parquet"), dir.join("b.parquet")).unwrap_err().to_string();
        assert!(err.contains("`rating`, line") && err.contains("1..=5"), "{err}");
    }

    /// The real data, when `scripts/fetch-movielens.sh` has fetched it: `cargo test -p rankstack
    /// --lib movielens -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn converts_the_real_data() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ml-100k");
        if !dir.join("ml-100k.inter").exists() {
            eprintln!("data/ml-100k is absent: run scripts/fetch-movielens.sh");
            return;
        }
        let out = tmp("real");
        let t0 = std::time::Instant::now();
        let (_, counts) = convert(&dir, out.join("train.parquet"), out.join("test.parquet")).unwrap();
        eprintln!("{counts:?} in {:.1?}", t0.elapsed());
        assert_eq!((counts.users, counts.items, counts.train_rows + counts.test_rows), (943, 1682, 100_000));
        assert_eq!(counts.test_rows, 10_000);
        let train = ParquetDataset::open(out.join("train.parquet")).unwrap();
        assert_eq!(train.batches(4096, None).unwrap().map(|b| b.unwrap().rows).sum::<usize>(), 90_000);
    }
}
