//! The built-in synthetic Homefeed-like data set: users, items, request context, an engagement
//! sequence per row and four tasks (save, click, closeup, hide) whose labels come from a seeded
//! hidden teacher with planted 2nd- and 3rd-order interactions and sequence-dependent signal.
//!
//! # The world (drawn from `seed`)
//!
//! With latent width `k` (`latent_dim`) and `N(0, 1)` draws unless stated:
//! - `num_segments` segment vectors `P_s ∈ ℝᵏ`; user `u` has a segment `s_u`, latent
//!   `p_u = P_{s_u} + 0.3·ε`, activity `a_u = exp(N(1, 0.8))` (dense `user_activity`), a 7-day
//!   CTR `σ(N(−2, 0.5))` missing for 10% of users (dense `user_ctr_7d`, null → NaN), 3 distinct
//!   interest categories (sparse bag `user_interests`) and a pretrained-like profile vector
//!   `w_u = M_u p_u / √k + 0.1·ε ∈ ℝ^embedding_dim` (embedding `user_profile`);
//! - `num_categories` category vectors `C_c`; item `i` has a category `c_i`, latent
//!   `q_i = C_{c_i} + 0.3·ε`, quality `x_i` (dense `item_quality`) and a pretrained-like vector
//!   `v_i = M q_i / √k + 0.1·ε ∈ ℝ^embedding_dim` (embedding `item_visual`, `M` a fixed Gaussian
//!   matrix);
//! - context: hour `h ∈ 0..24` and surface `σ ∈ 0..4` with vectors `0.8·H_h` and `0.6·R_σ`; the
//!   context latent is `r = 0.8·H_h + 0.6·R_σ`.
//!
//! # A row (drawn from `seed` and `stream`)
//!
//! A uniform user; a uniform hour and surface; the candidate item is, with probability ½, a uniform
//! item of a uniform interest category of the user, else a uniform item; `item_age_hours ~ Exp(24)`.
//! The sequence has `L ~ U{0..=max_len + 5}` actions (so some are cut to `max_len` by the reader),
//! newest first, one every `Exp(30 min)` before the request; action types 1 click (p 0.40),
//! 2 save (0.20), 3 closeup (0.25), 4 hide (0.10), 5 long dwell (0.05); each action's category is an
//! interest of the user with probability 0.6, else uniform, and its item uniform in that category.
//!
//! # The teacher
//!
//! ```text
//! z2 = ⟨p_u, q_i⟩ / √k                           user × item            (2nd order)
//! z3 = Σ_j p_uj · q_ij · r_j / √k                user × item × context  (3rd order)
//! m⁺ = min(3, #{the 10 newest actions of type save or closeup in the candidate's category})
//! m⁻ = min(2, #{the 10 newest actions of type hide in the candidate's category})
//! x  = item_quality,   α = ln(user_activity) − 1
//!
//! save    = −1.2 + 2.0·z3 + 1.2·z2·x + 0.8·m⁺ − 0.8·m⁻ + 0.2·x
//! click   = −0.4 + 0.8·z2 + 0.5·α + 0.4·x + 0.5·m⁺
//! closeup = −1.0 + 0.8·z2 + 1.0·z3 + 0.5·m⁺ + 0.3·x
//! hide    = −2.2 − 0.8·z2 + 1.2·m⁻
//! label_t ~ Bernoulli(σ(logit_t))
//! ```
//!
//! `save` is interaction-driven: its main terms are products of three factors (user × item ×
//! context latents, and user × item × a dense feature), each of zero mean given any single feature,
//! so a first-order model sees almost nothing of them; the `m±` terms need the sequence and the
//! candidate together. The latents are learnable from the sparse ids (`user_segment`, `user_id`,
//! `item_category`, `item_id`, `context_hour`, `context_surface`) and, linearly, from the
//! `user_profile` and `item_visual` vectors, so `z2` is one bilinear cross of two input blocks and
//! `z3` one more cross with the context embeddings.
//!
//! Everything is drawn from [`rankstack_nn::rng::Rng`] streams, so the same [`SyntheticSpec`] gives
//! byte-identical files. Different `stream`s share the world and the teacher but draw different
//! rows: use stream 0 for training and stream 1 for evaluation.

use std::path::Path;

use feature_encoders::{DenseFeature, EmbeddingFeature, FeatureSchema, Pooling, SparseFeature};
use rankstack_nn::rng::Rng;
use rankstack_nn::{Error, Result};

use super::{
    DataSchema, Example, ExampleItems, ExampleSequence, ParquetWriter, SequenceItemSpec, SequenceSpec, WriterOptions,
};

/// The tasks of the synthetic data, in label order.
pub const TASKS: [&str; 4] = ["save", "click", "closeup", "hide"];

/// Action types of the synthetic sequences (index = type id; 0 is padding).
pub const ACTION_TYPES: [&str; 6] = ["padding", "click", "save", "closeup", "hide", "long_dwell"];

const ACTION_PROBS: [f64; 5] = [0.40, 0.20, 0.25, 0.10, 0.05];

/// Sizes and seeds of a synthetic data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// Rows to generate.
    pub rows: usize,
    /// Seed of the world and the teacher.
    pub seed: u64,
    /// Row stream: streams share the world and the teacher but draw different rows.
    pub stream: u64,
    /// Number of users.
    pub num_users: usize,
    /// Number of user segments.
    pub num_segments: usize,
    /// Number of items.
    pub num_items: usize,
    /// Number of item categories.
    pub num_categories: usize,
    /// Latent width `k` of the teacher.
    pub latent_dim: usize,
    /// Width of the `user_profile` and `item_visual` embedding features.
    pub embedding_dim: usize,
    /// Sequence length `S` of the schema.
    pub max_len: usize,
    /// Width of the learned item-id embedding of the sequence.
    pub item_dim: usize,
}

/// The default world is small on purpose: its planted interactions are learnable from the default
/// 20 000 rows in a few epochs (a world of 2 000 users / 1 000 items needs far more data before any
/// model gets past AUC 0.55), so `rankstack train` without data shows the interaction layers at work.
impl Default for SyntheticSpec {
    /// 20 000 rows, seed 0, stream 0, 200 users in 10 segments, 200 items in 10 categories,
    /// `k = 4`, `user_profile` and `item_visual` width 16, `S = 20`, item width 16.
    fn default() -> Self {
        Self {
            rows: 20_000,
            seed: 0,
            stream: 0,
            num_users: 200,
            num_segments: 10,
            num_items: 200,
            num_categories: 10,
            latent_dim: 4,
            embedding_dim: 16,
            max_len: 20,
            item_dim: 16,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSummary {
    /// Rows written.
    pub rows: u64,
    /// Mean label per task, in [`TASKS`] order.
    pub label_rates: Vec<f64>,
    /// AUC of the teacher's own probabilities per task: the best any model can reach on this data.
    pub teacher_auc: Vec<f64>,
}

impl SyntheticSpec {
    /// Checks the sizes (every count, `rows` included, must be positive: an empty data set has no
    /// label rates or AUC to report).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("rows", self.rows),
            ("num_users", self.num_users),
            ("num_segments", self.num_segments),
            ("num_items", self.num_items),
            ("latent_dim", self.latent_dim),
            ("embedding_dim", self.embedding_dim),
            ("max_len", self.max_len),
            ("item_dim", self.item_dim),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::config("SyntheticSpec", *field, "must be > 0"));
        }
        if self.num_categories < 3 {
            return Err(Error::config("SyntheticSpec", "num_categories", "must be ≥ 3 (users have 3 interests)"));
        }
        Ok(())
    }

    /// The schema of the generated data.
    pub fn schema(&self) -> DataSchema {
        let dense = ["user_activity", "user_ctr_7d", "item_quality", "item_age_hours"]
            .iter()
            .map(|n| DenseFeature { name: n.to_string(), missing_indicator: *n == "user_ctr_7d" })
            .collect();
        let mut sparse = vec![
            SparseFeature::new("user_id", self.num_users),
            SparseFeature::new("user_segment", self.num_segments),
            SparseFeature::new("item_id", self.num_items),
            SparseFeature::new("item_category", self.num_categories),
            SparseFeature::new("context_hour", 24),
            SparseFeature::new("context_surface", 4),
        ];
        sparse.push(SparseFeature {
            pooling: Pooling::Mean,
            ..SparseFeature::new("user_interests", self.num_categories)
        });
        let embedding = ["user_profile", "item_visual"]
            .iter()
            .map(|n| EmbeddingFeature {
                name: n.to_string(),
                dim: self.embedding_dim,
                projection: None,
                projection_bias: true,
                normalize: true,
            })
            .collect();
        DataSchema {
            features: FeatureSchema { dense, sparse, embedding, ..FeatureSchema::default() },
            sequence: Some(SequenceSpec {
                max_len: self.max_len,
                num_action_types: ACTION_TYPES.len(),
                items: SequenceItemSpec::Ids { cardinality: self.num_items, dim: self.item_dim },
            }),
            tasks: TASKS.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// The writer options of the generated files (`user_interests` is a bag; 8 192 rows per group).
    pub fn writer_options() -> WriterOptions {
        WriterOptions { sparse_lists: vec!["user_interests".into()], example_weights: false, rows_per_group: 8_192 }
    }
}

struct User {
    segment: usize,
    profile: Vec<f32>,
    latent: Vec<f64>,
    activity: f64,
    ctr: f32,
    interests: [usize; 3],
}

struct Item {
    category: usize,
    latent: Vec<f64>,
    quality: f64,
    visual: Vec<f32>,
}

/// The hidden world and teacher, and the row stream.
struct World {
    users: Vec<User>,
    items: Vec<Item>,
    by_category: Vec<Vec<usize>>,
    hours: Vec<Vec<f64>>,
    surfaces: Vec<Vec<f64>>,
    k: usize,
    max_len: usize,
}

fn gaussian(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.normal()).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl World {
    fn new(spec: &SyntheticSpec) -> Self {
        let k = spec.latent_dim;
        let mut rng = Rng::for_name(spec.seed, "synthetic.world");
        let segments: Vec<Vec<f64>> = (0..spec.num_segments).map(|_| gaussian(&mut rng, k, 1.0)).collect();
        let categories: Vec<Vec<f64>> = (0..spec.num_categories).map(|_| gaussian(&mut rng, k, 1.0)).collect();
        let hours = (0..24).map(|_| gaussian(&mut rng, k, 0.8)).collect();
        let surfaces = (0..4).map(|_| gaussian(&mut rng, k, 0.6)).collect();
        let m: Vec<f64> = gaussian(&mut rng, spec.embedding_dim * k, 1.0);
        let m_user: Vec<f64> = gaussian(&mut rng, spec.embedding_dim * k, 1.0);
        let project = |rng: &mut Rng, m: &[f64], latent: &[f64]| -> Vec<f32> {
            (0..spec.embedding_dim)
                .map(|d| {
                    let dot: f64 = (0..k).map(|j| m[d * k + j] * latent[j]).sum();
                    (dot / (k as f64).sqrt() + 0.1 * rng.normal()) as f32
                })
                .collect()
        };
        let users = (0..spec.num_users)
            .map(|_| {
                let segment = rng.below(spec.num_segments as u64) as usize;
                let latent: Vec<f64> = segments[segment].iter().map(|&c| c + 0.3 * rng.normal()).collect();
                let profile = project(&mut rng, &m_user, &latent);
                let activity = (1.0 + 0.8 * rng.normal()).exp();
                let ctr = sigmoid(-2.0 + 0.5 * rng.normal()) as f32;
                let ctr = if rng.uniform() < 0.1 { f32::NAN } else { ctr };
                let mut interests = [0usize; 3];
                let mut n = 0;
                while n < 3 {
                    let c = rng.below(spec.num_categories as u64) as usize;
                    if !interests[..n].contains(&c) {
                        interests[n] = c;
                        n += 1;
                    }
                }
                User { segment, profile, latent, activity, ctr, interests }
            })
            .collect();
        let mut by_category = vec![Vec::new(); spec.num_categories];
        let items = (0..spec.num_items)
            .map(|i| {
                let category = rng.below(spec.num_categories as u64) as usize;
                by_category[category].push(i);
                let latent: Vec<f64> = categories[category].iter().map(|&c| c + 0.3 * rng.normal()).collect();
                let quality = rng.normal();
                let visual = project(&mut rng, &m, &latent);
                Item { category, latent, quality, visual }
            })
            .collect();
        Self { users, items, by_category, hours, surfaces, k, max_len: spec.max_len }
    }

    fn item_in(&self, rng: &mut Rng, category: usize) -> usize {
        let pool = &self.by_category[category];
        if pool.is_empty() {
            rng.below(self.items.len() as u64) as usize
        } else {
            pool[rng.below(pool.len() as u64) as usize]
        }
    }

    fn action_type(rng: &mut Rng) -> i64 {
        let mut u = rng.uniform();
        for (t, p) in ACTION_PROBS.iter().enumerate() {
            if u < *p {
                return t as i64 + 1;
            }
            u -= p;
        }
        ACTION_PROBS.len() as i64
    }

    /// One row and the teacher's probabilities.
    fn row(&self, rng: &mut Rng, request_time: i64) -> (Example, [f64; 4]) {
        let num_categories = self.by_category.len();
        let u = rng.below(self.users.len() as u64) as usize;
        let user = &self.users[u];
        let hour = rng.below(24) as usize;
        let surface = rng.below(4) as usize;
        let cand = if rng.uniform() < 0.5 {
            let c = user.interests[rng.below(3) as usize];
            self.item_in(rng, c)
        } else {
            rng.below(self.items.len() as u64) as usize
        };
        let item = &self.items[cand];
        let age_hours = -24.0 * (1.0 - rng.uniform()).ln();
        let len = rng.below(self.max_len as u64 + 6) as usize;
        let mut action_types = Vec::with_capacity(len);
        let mut timestamps = Vec::with_capacity(len);
        let mut seq_items = Vec::with_capacity(len);
        let mut t = request_time;
        for _ in 0..len {
            t -= (-1_800_000.0 * (1.0 - rng.uniform()).ln()) as i64 + 1;
            let kind = Self::action_type(rng);
            let category = if rng.uniform() < 0.6 {
                user.interests[rng.below(3) as usize]
            } else {
                rng.below(num_categories as u64) as usize
            };
            action_types.push(kind);
            timestamps.push(t);
            seq_items.push(self.item_in(rng, category) as i64);
        }

        // The teacher.
        let k = self.k;
        let r: Vec<f64> = (0..k).map(|j| self.hours[hour][j] + self.surfaces[surface][j]).collect();
        let z2: f64 = (0..k).map(|j| user.latent[j] * item.latent[j]).sum::<f64>() / (k as f64).sqrt();
        let z3: f64 = (0..k).map(|j| user.latent[j] * item.latent[j] * r[j]).sum::<f64>() / (k as f64).sqrt();
        let recent = action_types.iter().zip(&seq_items).take(10);
        let same = |id: &i64| self.items[*id as usize].category == item.category;
        let m_pos = recent.clone().filter(|(&ty, id)| (ty == 2 || ty == 3) && same(id)).count().min(3) as f64;
        let m_neg = recent.filter(|(&ty, id)| ty == 4 && same(id)).count().min(2) as f64;
        let x = item.quality;
        let alpha = user.activity.ln() - 1.0;
        let logits = [
            -1.2 + 2.0 * z3 + 1.2 * z2 * x + 0.8 * m_pos - 0.8 * m_neg + 0.2 * x,
            -0.4 + 0.8 * z2 + 0.5 * alpha + 0.4 * x + 0.5 * m_pos,
            -1.0 + 0.8 * z2 + 1.0 * z3 + 0.5 * m_pos + 0.3 * x,
            -2.2 - 0.8 * z2 + 1.2 * m_neg,
        ];
        let probs = logits.map(sigmoid);
        let labels = probs.iter().map(|&p| if rng.uniform() < p { 1.0 } else { 0.0 }).collect();

        let mut interests = user.interests.map(|c| c as i64).to_vec();
        interests.sort_unstable();
        let example = Example {
            dense: vec![user.activity as f32, user.ctr, x as f32, age_hours as f32],
            sparse: vec![
                vec![u as i64],
                vec![user.segment as i64],
                vec![cand as i64],
                vec![item.category as i64],
                vec![hour as i64],
                vec![surface as i64],
                interests,
            ],
            embedding: vec![user.profile.clone(), item.visual.clone()],
            sequence: Some(ExampleSequence {
                action_types,
                timestamps,
                items: ExampleItems::Ids { sequence: seq_items, candidate: cand as i64 },
                request_time,
            }),
            labels,
            example_weight: None,
        };
        (example, probs)
    }
}

/// Generates the rows of `spec` in memory, with the teacher's probabilities `[rows][task]`.
pub fn examples(spec: &SyntheticSpec) -> Result<(Vec<Example>, Vec<[f64; 4]>)> {
    spec.validate()?;
    let world = World::new(spec);
    let mut rng = Rng::for_name(spec.seed, &format!("synthetic.rows.{}", spec.stream));
    let base: i64 = 1_700_000_000_000 + spec.stream as i64 * 100_000_000_000;
    Ok((0..spec.rows).map(|i| world.row(&mut rng, base + 60_000 * i as i64)).unzip())
}

/// Writes the data set of `spec` to `path` (Parquet, with its [`DataSchema`] in the metadata).
pub fn generate(spec: &SyntheticSpec, path: impl AsRef<Path>) -> Result<SyntheticSummary> {
    let (rows, probs) = examples(spec)?;
    let mut writer = ParquetWriter::create(path, &spec.schema(), SyntheticSpec::writer_options())?;
    for chunk in rows.chunks(8_192) {
        writer.write(chunk)?;
    }
    let written = writer.finish()?;
    let n = rows.len().max(1) as f64;
    let label_rates = (0..TASKS.len()).map(|t| rows.iter().map(|r| f64::from(r.labels[t])).sum::<f64>() / n).collect();
    let teacher_auc = (0..TASKS.len())
        .map(|t| {
            let scores: Vec<f64> = probs.iter().map(|p| p[t]).collect();
            let labels: Vec<f64> = rows.iter().map(|r| f64::from(r.labels[t])).collect();
            crate::metrics::auc(&scores, &labels)
        })
        .collect();
    Ok(SyntheticSummary { rows: written, label_rates, teacher_auc })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_spec_generates_valid_rows() {
        let spec = SyntheticSpec { rows: 300, ..SyntheticSpec::default() };
        let (rows, probs) = examples(&spec).unwrap();
        let schema = spec.schema();
        for (i, r) in rows.iter().enumerate() {
            r.check(&schema, i as u64).unwrap();
        }
        assert_eq!(probs.len(), 300);
        assert!(rows.iter().any(|r| r.sequence.as_ref().unwrap().action_types.len() > spec.max_len));
        assert!(rows.iter().any(|r| r.dense[1].is_nan()));
    }
}
