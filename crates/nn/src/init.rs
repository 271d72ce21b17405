//! Parameter initialisation: Xavier/Glorot helpers and a seeded parameter store.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::host_transfer::{move_to_device, Origin};
use crate::init_scheme::InitScheme;
use crate::rng::Rng;

/// Xavier/Glorot normal standard deviation, `gain · sqrt(2 / (fan_in + fan_out))`.
pub fn xavier_normal_std(fan_in: usize, fan_out: usize, gain: f64) -> f64 {
    gain * (2.0 / (fan_in + fan_out) as f64).sqrt()
}

/// Xavier/Glorot normal init for a PyTorch-layout `[out, in]` kernel (gain 1).
pub fn xavier_normal(fan_in: usize, fan_out: usize) -> Init {
    Init::Randn { mean: 0.0, stdev: xavier_normal_std(fan_in, fan_out, 1.0) }
}

/// Xavier/Glorot uniform init for a PyTorch-layout `[out, in]` kernel (gain 1):
/// `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))`.
pub fn xavier_uniform(fan_in: usize, fan_out: usize) -> Init {
    let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -a, up: a }
}

/// A parameter store whose initial values depend only on a seed and each parameter's name.
///
/// It wraps a [`VarMap`] (so optimisers see ordinary [`Var`]s) and serves as a
/// [`VarBuilder`] backend: the first request for a name creates the variable with the requested
/// [`Init`], drawing from a stream seeded by `(seed, name)`. Building the same model twice with the
/// same seed therefore gives bit-identical weights on CPU, whatever order layers are created in.
///
/// [`SeededVarMap::with_initial_values`] starts named variables from given tensors instead (a
/// checkpoint being loaded), so that no random values are drawn only to be overwritten.
#[derive(Clone)]
pub struct SeededVarMap {
    vars: VarMap,
    seed: u64,
    /// How variables drawn from the seed are initialised.
    scheme: InitScheme,
    /// Starting values by name, taken (and dropped from here) when the variable is created.
    initial: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Tensor>>>,
}

impl std::fmt::Debug for SeededVarMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vars = self.vars.data().lock().map(|d| d.len()).unwrap_or(0);
        f.debug_struct("SeededVarMap").field("seed", &self.seed).field("variables", &vars).finish()
    }
}

impl SeededVarMap {
    /// An empty store for `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_initial_values(seed, std::collections::HashMap::new())
    }

    /// A store that creates each variable named in `values` from that tensor (converted to the
    /// builder's dtype and device) when its shape matches the request; every other variable is
    /// drawn from `seed` as in [`SeededVarMap::new`]. A tensor of another shape is ignored here:
    /// checking a checkpoint against the model is the loader's job.
    pub fn with_initial_values(seed: u64, values: std::collections::HashMap<String, Tensor>) -> Self {
        Self {
            vars: VarMap::new(),
            seed,
            scheme: InitScheme::Layers,
            initial: std::sync::Arc::new(std::sync::Mutex::new(values)),
        }
    }

    /// This store drawing new variables with `scheme` (see [`InitScheme`]; without it, each
    /// layer's own initialisation, [`InitScheme::Layers`]). Starting values given with
    /// [`SeededVarMap::with_initial_values`] are used as they are.
    pub fn with_scheme(mut self, scheme: InitScheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// The initialisation scheme of variables drawn from the seed.
    pub fn scheme(&self) -> InitScheme {
        self.scheme
    }

    /// Drops the starting values that no variable has taken (see
    /// [`SeededVarMap::with_initial_values`]); variables created afterwards are drawn from the seed.
    pub fn forget_initial_values(&self) {
        self.initial.lock().expect("initial values lock poisoned").clear();
    }

    /// The seed this store draws from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A [`VarBuilder`] that creates (or returns) variables in this store.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The underlying [`VarMap`] (for optimisers and saving).
    pub fn var_map(&self) -> &VarMap {
        &self.vars
    }

    /// All variables sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().expect("var map lock poisoned");
        let mut out: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn initial_values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f64> {
        let n = shape.elem_count();
        let mut rng = Rng::for_name(self.seed, name);
        match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.uniform()).collect(),
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Normal => (0..n).map(|_| std * rng.normal()).collect(),
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect()
                    }
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.vars.data().lock().expect("var map lock poisoned");
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!("parameter `{name}` exists with shape {:?}, requested {:?}", t.dims(), s.dims());
            }
            return Ok(t.clone());
        }
        let given = self.initial.lock().expect("initial values lock poisoned").remove(name);
        let t = match given {
            Some(t) if t.shape() == &s && t.dtype().is_float() => {
                move_to_device(&t.to_dtype(dtype)?, dev, "given initial value", Origin::State)?
            }
            _ => {
                let values = self.initial_values(&s, name, self.scheme.init(name, &s, h));
                let host = Tensor::from_vec(values, s, &Device::Cpu)?.to_dtype(dtype)?;
                move_to_device(&host, dev, "initial value", Origin::State)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self.vars.data().lock().expect("var map lock poisoned");
        match data.get(name) {
            Some(v) => move_to_device(&v.as_tensor().to_dtype(dtype)?, dev, "parameter", Origin::State),
            None => candle_core::bail!("no parameter named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().expect("var map lock poisoned").contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bits_independent_of_order() {
        let build = |order: &[&str], seed| {
            let m = SeededVarMap::new(seed);
            let vb = m.var_builder(DType::F32, &Device::Cpu);
            for name in order {
                vb.get_with_hints((3, 5), name, xavier_normal(5, 3)).unwrap();
            }
            m.named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect::<Vec<_>>()
        };
        let a = build(&["a", "b"], 3);
        assert_eq!(a, build(&["b", "a"], 3));
        assert_ne!(a, build(&["a", "b"], 4));
        assert_ne!(a[0].1, a[1].1);
    }

    #[test]
    fn initial_values_replace_the_draw_where_the_shape_matches() {
        let given = Tensor::new(&[[1f64, 2., 3.]], &Device::Cpu).unwrap();
        let values = std::collections::HashMap::from([
            ("w".to_string(), given.clone()),
            ("odd".to_string(), Tensor::ones(2, DType::F64, &Device::Cpu).unwrap()),
        ]);
        let m = SeededVarMap::with_initial_values(7, values);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let w = vb.get_with_hints((1, 3), "w", xavier_normal(3, 1)).unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), vec![vec![1., 2., 3.]]);
        assert!(w.is_variable());
        // A shape mismatch, or no value, draws from the seed as a plain store does.
        let drawn = |name: &str, shape: usize| {
            let plain = SeededVarMap::new(7);
            let want = plain.var_builder(DType::F32, &Device::Cpu).get_with_hints(
                shape,
                name,
                Init::Randn { mean: 0.0, stdev: 1.0 },
            );
            let got = vb.get_with_hints(shape, name, Init::Randn { mean: 0.0, stdev: 1.0 });
            (got.unwrap().to_vec1::<f32>().unwrap(), want.unwrap().to_vec1::<f32>().unwrap())
        };
        let (got, want) = drawn("odd", 3);
        assert_eq!(got, want);
        let (got, want) = drawn("other", 4);
        assert_eq!(got, want);
    }

    #[test]
    fn xavier_std_and_const_init() {
        assert!((xavier_normal_std(3, 5, 1.0) - 0.5).abs() < 1e-15);
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let b = vb.get_with_hints(4, "bias", Init::Const(0.0)).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        // Asking again returns the same variable; asking with another shape is an error.
        assert!(vb.get_with_hints(4, "bias", Init::Const(1.0)).unwrap().to_vec1::<f32>().unwrap()[0] == 0.0);
        assert!(vb.get_with_hints(5, "bias", Init::Const(0.0)).is_err());
    }
}
