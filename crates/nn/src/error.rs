//! The error type shared by all rankstack layers.

use std::fmt;

/// Errors raised by rankstack layers.
///
/// Constructors return this type directly. `forward` methods implement candle's `Module`, whose
/// signature fixes `candle_core::Result`; there the same errors travel as
/// `candle_core::Error::Wrapped`, whose message is this error's message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value that cannot work, caught at construction.
    #[error("{layer}: invalid config `{field}`: {reason}")]
    Config { layer: String, field: String, reason: String },
    /// An input whose shape does not match what the layer was built for.
    #[error("{layer}: expected {what} of shape {expected}, got {actual:?}")]
    Shape { layer: String, what: String, expected: String, actual: Vec<usize> },
    /// Tensors that do not fit the model they are loaded into; every mismatch is listed.
    #[error("checkpoint does not match the model:\n{}", .0.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    Checkpoint(Vec<TensorMismatch>),
    /// A peer framework's state dict that does not fit the rankstack config it is imported into;
    /// every problem is listed, under the peer's tensor names.
    #[error("{peer} state dict does not fit the config:\n{}", .problems.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    Import { peer: String, problems: Vec<TensorMismatch> },
    /// An input value outside what the layer accepts (e.g. a negative id).
    #[error("{layer}: invalid input `{what}`: {reason}")]
    Input { layer: String, what: String, reason: String },
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file that is not a valid tensor file (truncated, corrupt, wrong format).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt { path: String, reason: String },
    /// An I/O error, with the path involved.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// One tensor that does not fit the model, as reported by [`Error::Checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorMismatch {
    /// The model needs this tensor and the checkpoint lacks it.
    Missing { name: String },
    /// The checkpoint has a tensor the model does not use.
    Unexpected { name: String },
    /// Present on both sides with different shapes.
    Shape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    /// Present on both sides with different element types.
    DType { name: String, expected: String, actual: String },
    /// Holds an infinity or a NaN (a diverged or damaged model).
    NonFinite { name: String },
}

impl fmt::Display for TensorMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { name } => write!(f, "missing tensor `{name}`"),
            Self::Unexpected { name } => write!(f, "unexpected tensor `{name}`"),
            Self::Shape { name, expected, actual } => {
                write!(f, "tensor `{name}` has shape {actual:?}, the model expects {expected:?}")
            }
            Self::DType { name, expected, actual } => {
                write!(f, "tensor `{name}` has dtype {actual}, the model expects {expected}")
            }
            Self::NonFinite { name } => write!(f, "tensor `{name}` holds non-finite values"),
        }
    }
}

/// Result alias for rankstack layers.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A closure turning an I/O error on `path` into [`Error::Io`], for `map_err`.
    pub fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io { path: path.display().to_string(), source }
    }

    /// A configuration error for `layer`'s `field`.
    pub fn config(layer: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config { layer: layer.into(), field: field.into(), reason: reason.into() }
    }

    /// Re-addresses a configuration error of a part built inside `layer` to `layer`'s own config:
    /// the field becomes `prefix.field`, and the part's layer name, when it differs, is kept in
    /// the reason. Other errors pass through. For `map_err` where a constructor builds its parts:
    ///
    /// ```
    /// # use rankstack_nn::Error;
    /// let inner = Error::config("Mlp", "hidden_dims", "must not be empty");
    /// let outer = inner.nested_in("Ranker", "tasks[0].tower");
    /// assert_eq!(outer.to_string(), "Ranker: invalid config `tasks[0].tower.hidden_dims`: must not be empty (Mlp)");
    /// ```
    pub fn nested_in(self, layer: &str, prefix: &str) -> Self {
        match self {
            Self::Config { layer: inner, field, reason } => {
                let reason = if inner == layer { reason } else { format!("{reason} ({inner})") };
                Self::config(layer, format!("{prefix}.{field}"), reason)
            }
            other => other,
        }
    }

    /// A configuration error read from the file `path`, with the path in front of the layer name.
    /// Other errors pass through.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Self::Config { layer, field, reason } => {
                Self::config(format!("{}: {layer}", path.display()), field, reason)
            }
            other => other,
        }
    }

    /// An invalid-input error for `layer`.
    pub fn input(layer: impl Into<String>, what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Input { layer: layer.into(), what: what.into(), reason: reason.into() }
    }
}

impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}
