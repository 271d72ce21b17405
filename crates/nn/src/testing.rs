//! Test support for the PyTorch reference fixtures (used by every layer crate's tests), and
//! [`ScratchDir`], the temporary directory every test that writes files uses.
//!
//! A fixture is a safetensors file written by `reference/` (see `docs/ARCHITECTURE.md`) holding:
//!
//! - metadata `fixture`: a JSON object with `config` (the layer's config in the Rust config's serde
//!   form), `layer`, `case` and layer-specific string fields such as `input_dim`;
//! - `input.<name>`: the inputs; `param.<name>`: every parameter under its Rust name;
//! - `output`: the forward output; `loss_weight`: `R` in the scalar loss `L = Σ output ⊙ R`;
//! - `grad.input.<name>` and `grad.param.<name>`: `∂L/∂input` and `∂L/∂param`.
//!
//! - `f32.output`, `f32.grad.…`: PyTorch's own float32 result for the same computation.
//!
//! Reference values are computed in float64 by PyTorch. In float32 the bound is
//! `max(rtol · max|expected|, 4 · PyTorch's own float32 error)`: where cancellation makes a quantity
//! inherently ill-conditioned in float32 (e.g. an input gradient through LayerNorm, whose terms
//! cancel to a small sum), Rust must still be as accurate as PyTorch itself, to a factor of 4. [`check_reference`] builds the Rust layer,
//! loads the parameters by name (which also checks the naming convention), runs forward and
//! backward, and compares everything.
//!
//! The checks run on [`test_device`]: the CPU, or a CUDA GPU with `RANKSTACK_TEST_DEVICE=cuda`
//! (built with the `cuda` feature), so the same fixtures check candle's GPU kernels and every
//! layer's non-CPU fallback path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::checkpoint::{load_into, read_safetensors, TensorFile};
use crate::SeededVarMap;

mod scratch_dir;
pub use scratch_dir::ScratchDir;

/// The workspace's `fixtures/` directory.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// All fixture files of a group (a subdirectory of `fixtures/`), sorted by name.
///
/// # Panics
/// If the group has no fixtures: a reference test that checks nothing must fail.
pub fn fixture_paths(group: &str) -> Vec<PathBuf> {
    let dir = fixtures_root().join(group);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read fixture dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    paths
}

/// One reference fixture.
#[derive(Debug)]
pub struct Fixture {
    path: PathBuf,
    file: TensorFile,
}

impl Fixture {
    /// Loads a fixture file.
    pub fn load(path: impl AsRef<Path>) -> crate::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = read_safetensors(&path)?;
        Ok(Self { path, file })
    }

    /// The case name (file stem).
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    fn fields(&self) -> serde_json::Value {
        let raw = self.file.metadata.get("fixture").unwrap_or_else(|| panic!("{}: no `fixture` metadata", self.name()));
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("{}: `fixture` metadata is not JSON: {e}", self.name()))
    }

    /// A string field of the fixture's metadata (`layer`, `case`, `input_dim`, ...).
    pub fn meta(&self, key: &str) -> Option<String> {
        self.fields().get(key).and_then(|v| v.as_str().map(str::to_string))
    }

    /// A size field of the fixture's metadata (`input_dim`, ...).
    ///
    /// # Panics
    /// If it is absent or not a non-negative integer.
    pub fn dim(&self, key: &str) -> usize {
        let value = self.meta(key).unwrap_or_else(|| panic!("{}: no `{key}` metadata", self.name()));
        value.parse().unwrap_or_else(|e| panic!("{}: `{key}` = {value:?} is not a size: {e}", self.name()))
    }

    /// The layer config stored in the `config` metadata.
    ///
    /// # Panics
    /// If it is absent or does not parse into `T`.
    pub fn config<T: DeserializeOwned>(&self) -> T {
        let raw =
            self.fields().get("config").cloned().unwrap_or_else(|| panic!("{}: no `config` metadata", self.name()));
        serde_json::from_value(raw.clone())
            .unwrap_or_else(|e| panic!("{}: config does not parse: {e}\n{raw}", self.name()))
    }

    /// A tensor by its full name.
    ///
    /// # Panics
    /// If there is no such tensor.
    pub fn tensor(&self, name: &str) -> &Tensor {
        self.file.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.name()))
    }

    /// Whether the fixture has a tensor of that name.
    pub fn has(&self, name: &str) -> bool {
        self.file.tensors.contains_key(name)
    }

    /// All tensors whose name starts with `prefix`, keyed by the rest of the name.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.file
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v.clone())))
            .collect()
    }
}

/// Runs `check(fixture, dtype, rtol)` on every fixture of `group` (a directory of `fixtures/`): the
/// loop of every layer crate's `tests/reference.rs`.
///
/// # Panics
/// If a fixture does not load (or, through `check`, does not match).
pub fn check_fixtures(group: &str, dtype: DType, rtol: f64, check: impl Fn(&Fixture, DType, f64)) {
    for path in fixture_paths(group) {
        let fixture = Fixture::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check(&fixture, dtype, rtol);
    }
}

impl Fixture {
    /// The same fixture with its parameters and their gradients (`param.*`, `grad.param.*`,
    /// `f32.grad.param.*`) renamed by `import`: for a fixture written from a peer module (torchrec,
    /// a TransAct module), whose tensors carry the peer's names, `import` is the layer crate's
    /// state-dict importer, and [`check_reference`] then tests importer and layer together.
    pub fn with_imported_params(
        &self,
        import: impl Fn(HashMap<String, Tensor>) -> crate::Result<HashMap<String, Tensor>>,
    ) -> crate::Result<Fixture> {
        const FAMILIES: [&str; 3] = ["param.", "grad.param.", "f32.grad.param."];
        let mut tensors: HashMap<String, Tensor> = self
            .file
            .tensors
            .iter()
            .filter(|(name, _)| !FAMILIES.iter().any(|family| name.starts_with(family)))
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect();
        for family in FAMILIES {
            let renamed = import(self.with_prefix(family))?;
            tensors.extend(renamed.into_iter().map(|(name, t)| (format!("{family}{name}"), t)));
        }
        Ok(Fixture { path: self.path.clone(), file: TensorFile { tensors, metadata: self.file.metadata.clone() } })
    }
}

/// Maximum absolute difference between two tensors, and the largest magnitude in `expected`.
pub fn max_error(actual: &Tensor, expected: &Tensor) -> (f64, f64) {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a: Vec<f64> =
        actual.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("readable tensor");
    let e: Vec<f64> =
        expected.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("readable tensor");
    let err = a
        .iter()
        .zip(&e)
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() })
        .fold(0.0, f64::max);
    let scale = e.iter().map(|y| y.abs()).fold(0.0, f64::max);
    (err, scale)
}

/// Asserts `max|actual − expected| ≤ rtol · max(max|expected|, tiny)` (a max-norm relative error),
/// the usual measure for float results with cancellation: element-wise relative error is
/// meaningless for entries that are tiny compared with the rest of the tensor. `tiny` is the
/// smallest normal number of `actual`'s dtype: a reference tensor below it (e.g. the gradient
/// through a saturated softmax gate, ~1e-199 in float64) has no relative accuracy to check.
///
/// # Panics
/// With `what`, the error and the bound, if the check fails.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape mismatch");
    let (err, scale) = max_error(actual, expected);
    let tiny = match actual.dtype() {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F32 => f64::from(f32::MIN_POSITIVE),
        DType::F16 => 6.1e-5,
        _ => f64::from(f32::MIN_POSITIVE),
    };
    let bound = rtol * scale.max(tiny);
    assert!(err <= bound, "{what}: max abs error {err:.3e} exceeds {rtol:.1e} x max|expected| ({scale:.3e})");
}

/// The device the reference checks run on, from the environment variable `RANKSTACK_TEST_DEVICE`:
/// unset, empty or `cpu` gives the CPU; `cuda` the first CUDA GPU (needs the `cuda` feature).
///
/// # Panics
/// On any other value, or when `cuda` is asked for and no GPU can be opened (a test meant for the
/// GPU must not silently pass on the CPU).
pub fn test_device() -> Device {
    // One device for the whole process: candle treats two handles on the same GPU as different
    // devices, and refuses to mix their tensors.
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("RANKSTACK_TEST_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
            Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| panic!("RANKSTACK_TEST_DEVICE=cuda: {e}")),
            Ok(other) => panic!("RANKSTACK_TEST_DEVICE: expected `cpu` or `cuda`, got `{other}`"),
        })
        .clone()
}

/// Checks a layer against a reference fixture: forward output, input gradients and every parameter
/// gradient, in `dtype` with max-norm relative tolerance `rtol`.
///
/// `build` constructs the layer from a [`VarBuilder`]; the fixture's `param.*` tensors are then
/// loaded by name, so a naming or shape mismatch fails here with the full list. `forward` receives
/// the fixture's `input.*` tensors (floating ones converted to `dtype` and tracked for gradients),
/// all on [`test_device`].
///
/// # Panics
/// On any mismatch, naming the fixture and the tensor.
pub fn check_reference<M>(
    fixture: &Fixture,
    dtype: DType,
    rtol: f64,
    build: impl FnOnce(VarBuilder) -> crate::Result<M>,
    forward: impl FnOnce(&M, &HashMap<String, Tensor>) -> candle_core::Result<Tensor>,
) {
    let case = fixture.name();
    let store = SeededVarMap::new(0);
    let device = test_device();
    let model = build(store.var_builder(dtype, &device)).unwrap_or_else(|e| panic!("{case}: build failed: {e}"));
    let params: HashMap<String, Tensor> =
        fixture.with_prefix("param.").into_iter().map(|(k, v)| (k, v.to_dtype(dtype).expect("convert"))).collect();
    let vars = store.named_vars();
    load_into(&vars, &params).unwrap_or_else(|e| panic!("{case}: {e}"));

    let mut input_vars: HashMap<String, Var> = HashMap::new();
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in fixture.with_prefix("input.") {
        let t = t.to_device(&device).expect("input to the test device");
        if t.dtype().is_float() {
            let v = Var::from_tensor(&t.to_dtype(dtype).expect("convert")).expect("var");
            inputs.insert(name.clone(), v.as_tensor().clone());
            input_vars.insert(name, v);
        } else {
            inputs.insert(name, t);
        }
    }

    // In reduced precision, PyTorch's own float32 error (times 4) is an acceptable bound too.
    let check = |what: String, actual: &Tensor, name: &str| {
        let expected = fixture.tensor(name);
        let torch_name = format!("f32.{name}");
        let rtol = if dtype != DType::F64 && fixture.has(&torch_name) {
            let (torch_err, scale) = max_error(fixture.tensor(&torch_name), expected);
            rtol.max(4.0 * torch_err / scale.max(f64::MIN_POSITIVE))
        } else {
            rtol
        };
        assert_close(&what, actual, expected, rtol);
    };
    let out = forward(&model, &inputs).unwrap_or_else(|e| panic!("{case}: forward failed: {e}"));
    check(format!("{case}: output"), &out, "output");

    let loss_weight =
        fixture.tensor("loss_weight").to_dtype(dtype).and_then(|t| t.to_device(&device)).expect("convert");
    let loss = out.mul(&loss_weight).and_then(|t| t.sum_all()).expect("loss");
    let grads = loss.backward().expect("backward");
    let zero_like = |t: &Tensor| t.zeros_like().expect("zeros");
    for name in fixture.with_prefix("grad.input.").keys() {
        let var = input_vars.get(name).unwrap_or_else(|| panic!("{case}: no float input `{name}`"));
        let g = grads.get(var.as_tensor()).cloned().unwrap_or_else(|| zero_like(var.as_tensor()));
        check(format!("{case}: grad of input `{name}`"), &g, &format!("grad.input.{name}"));
    }
    for (name, var) in &vars {
        let key = format!("grad.param.{name}");
        assert!(fixture.has(&key), "{case}: fixture has no gradient for `{name}`");
        let g = grads.get(var.as_tensor()).cloned().unwrap_or_else(|| zero_like(var.as_tensor()));
        check(format!("{case}: grad of `{name}`"), &g, &key);
    }
}

/// Asserts that every variable in `store` received a finite gradient that is not all zero.
///
/// # Panics
/// Naming each parameter without a usable gradient.
pub fn assert_all_params_get_gradients(store: &SeededVarMap, grads: &candle_core::backprop::GradStore) {
    assert_all_params_get_gradients_or_rows(store, grads, &[]);
}

/// [`assert_all_params_get_gradients`] for a model whose tables are in row-sparse mode: a table's
/// usable gradient may come as a [`crate::RowGradient`] instead of a dense one.
pub fn assert_all_params_get_gradients_or_rows(
    store: &SeededVarMap,
    grads: &candle_core::backprop::GradStore,
    rows: &[crate::RowGradient],
) {
    let mut bad = Vec::new();
    for (name, var) in store.named_vars() {
        let row_grad = rows.iter().find(|r| r.table.id() == var.as_tensor().id()).map(|r| &r.grad);
        match grads.get(var.as_tensor()).or(row_grad) {
            None => bad.push(format!("{name}: no gradient")),
            Some(g) => {
                let v: Vec<f64> =
                    g.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("readable");
                if v.iter().any(|x| !x.is_finite()) {
                    bad.push(format!("{name}: non-finite gradient"));
                } else if v.iter().all(|x| *x == 0.0) {
                    bad.push(format!("{name}: all-zero gradient"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "parameters without a usable gradient:\n{}", bad.join("\n"));
}

/// A `[dims]` tensor of standard-normal values drawn from a seeded [`crate::rng::Rng`], so tests
/// never depend on candle's unseeded CPU RNG.
pub fn seeded_randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = dims.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(values, dims, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("tensor")
}

/// Every parameter's values as raw bits, sorted by name: for bit-identity (reproducibility) checks.
pub fn parameter_bits(store: &SeededVarMap) -> Vec<(String, Vec<u64>)> {
    store.named_vars().into_iter().map(|(name, var)| (name, value_bits(var.as_tensor()))).collect()
}

/// A float tensor's values as raw bits (f64's own; any other float dtype widened to f32 first,
/// which is exact), in row-major order: for bit-identity checks of values and gradients.
pub fn value_bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().expect("flatten");
    match t.dtype() {
        DType::F64 => t.to_vec1::<f64>().expect("read").into_iter().map(f64::to_bits).collect(),
        _ => t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec1::<f32>())
            .expect("read")
            .into_iter()
            .map(|v| u64::from(v.to_bits()))
            .collect(),
    }
}

/// Sets the parameter `name` to `values` (row-major, converted to the parameter's dtype).
///
/// # Panics
/// If there is no such parameter or the number of values does not match its shape.
pub fn set_parameter(store: &SeededVarMap, name: &str, values: &[f64]) {
    let vars = store.named_vars();
    let (_, var) = vars.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}"));
    let t = Tensor::from_vec(values.to_vec(), var.shape(), &Device::Cpu)
        .and_then(|t| t.to_dtype(var.dtype()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    var.set(&t).expect("set");
}
