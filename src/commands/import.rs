//! `rankstack import`: a peer framework's PyTorch state dict (saved as safetensors) → a rankstack
//! single-layer checkpoint (`rankstack_nn::layer_checkpoint`; `docs/compatibility.md`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use rankstack_nn::checkpoint::read_safetensors;
use rankstack_nn::{Error, Result};

/// Which peer module a state dict comes from (`--from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportSource {
    /// torchrec `CrossNet`, or `VectorCrossNet` (same tensor names) with a `vector` config.
    TorchrecCrossNet,
    /// torchrec `LowRankCrossNet`.
    TorchrecLowRank,
    /// torchrec `LowRankMixtureCrossNet`.
    TorchrecMixture,
    /// Pinterest's TransAct module.
    TransAct,
    /// Twitter's recap MaskNet (parallel or serial, without its top MLP).
    TwitterMaskNet,
    /// `torch.nn.TransformerEncoder`.
    TorchTransformer,
}

impl ImportSource {
    /// The name `--from` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::TorchrecCrossNet => "torchrec-crossnet",
            Self::TorchrecLowRank => "torchrec-lowrank",
            Self::TorchrecMixture => "torchrec-mixture",
            Self::TransAct => "transact",
            Self::TwitterMaskNet => "twitter-masknet",
            Self::TorchTransformer => "torch-transformer",
        }
    }
}

/// What `import` needs besides the source kind.
#[derive(Debug, Clone)]
pub struct ImportArgs<'a> {
    /// The peer's state dict as a safetensors file.
    pub state_dict: &'a Path,
    /// The rankstack layer config (JSON) that reproduces the peer module.
    pub config: &'a Path,
    /// The layer's input width, for the torchrec cross networks and Twitter's MaskNet (read off the
    /// state dict when absent); TransAct's and `nn.TransformerEncoder`'s widths are in their configs.
    pub input_dim: Option<usize>,
    /// The checkpoint directory to write.
    pub out: &'a Path,
    /// Replace an existing `out`.
    pub force: bool,
}

/// Reads `args.config` as the layer config type `T`; errors name the file.
fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(Error::io_at(path))?;
    serde_json::from_str(&text).map_err(|e| Error::input("import", path.display().to_string(), e.to_string()))
}

impl ImportSource {
    /// The state-dict tensor whose dimension `axis` is the layer's input width, for the peers
    /// whose rankstack layer takes one (`None`: the width is in the config).
    fn input_width_tensor(self) -> Option<(&'static str, usize)> {
        match self {
            Self::TorchrecCrossNet | Self::TorchrecLowRank | Self::TorchrecMixture => Some(("bias.0", 0)),
            Self::TwitterMaskNet => Some(("_mask_blocks.0._mask_layer.0.weight", 1)),
            Self::TransAct | Self::TorchTransformer => None,
        }
    }
}

/// The layer's input width: `--input-dim` when given, else read off the state dict (the first
/// layer's bias for torchrec, the first mask layer's input for Twitter). `--input-dim` for a peer
/// whose width is in its config is refused rather than ignored.
fn input_dim(source: ImportSource, args: &ImportArgs, state: &HashMap<String, Tensor>) -> Result<Option<usize>> {
    let Some((name, axis)) = source.input_width_tensor() else {
        return match args.input_dim {
            Some(_) => Err(Error::input(
                "import",
                "--input-dim",
                format!("is not used by --from {}: the width is in the config", source.name()),
            )),
            None => Ok(None),
        };
    };
    if args.input_dim.is_some() {
        return Ok(args.input_dim);
    }
    match state.get(name).and_then(|t| t.dims().get(axis).copied()) {
        Some(d) => Ok(Some(d)),
        None => Err(Error::input(
            "import",
            "--input-dim",
            format!("is needed: the state dict has no `{name}` to read the input width from"),
        )),
    }
}

/// Refuses a PyTorch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`) up front with the way to convert it.
fn check_state_dict_format(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ["pt", "pth", "bin", "ckpt"].contains(&ext.as_str()) {
        return Err(Error::input(
            "import",
            path.display().to_string(),
            "looks like a PyTorch pickle, which is not read; save the state dict as safetensors: \
             safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, PATH) \
             (docs/compatibility.md)",
        ));
    }
    Ok(())
}

/// Imports `args.state_dict` as a `source` module configured by `args.config` and writes the
/// checkpoint `args.out` (an existing one only with `force`); returns a summary line.
pub fn import(source: ImportSource, args: &ImportArgs) -> Result<String> {
    if args.out.exists() && !args.force {
        return Err(Error::input(
            "import",
            "--out",
            format!("{} already exists; pass --force to replace it", args.out.display()),
        ));
    }
    check_state_dict_format(args.state_dict)?;
    let state = read_safetensors(args.state_dict)?.tensors;
    let peer_count = state.len();
    let input_dim = input_dim(source, args, &state)?;
    let (peer, written) = match source {
        ImportSource::TorchrecCrossNet | ImportSource::TorchrecLowRank | ImportSource::TorchrecMixture => {
            let config: dcnv2::CrossNetConfig = read_config(args.config)?;
            check_torchrec_kind(source, &config, args.config)?;
            let d = input_dim.expect("torchrec layers take an input width");
            let tensors = dcnv2::from_torchrec_state_dict(d, &config, state)?;
            let peer = format!("torchrec {}", dcnv2::torchrec_class(&config));
            written(peer, &tensors, |src| dcnv2::save_cross_net(args.out, d, &config, &tensors, src, args.force))?
        }
        ImportSource::TransAct => {
            let config: sequence_transformer::SequenceTransformerConfig = read_config(args.config)?;
            let tensors = sequence_transformer::from_transact_state_dict(&config, state)?;
            written("TransAct".into(), &tensors, |src| {
                sequence_transformer::save_sequence_transformer(args.out, &config, &tensors, src, args.force)
            })?
        }
        ImportSource::TwitterMaskNet => {
            let config: masknet::MaskNetConfig = read_config(args.config)?;
            let d = input_dim.expect("MaskNet takes an input width");
            let tensors = masknet::from_twitter_state_dict(d, &config, state)?;
            written("Twitter MaskNet".into(), &tensors, |src| {
                masknet::save_masknet(args.out, d, &config, &tensors, src, args.force)
            })?
        }
        ImportSource::TorchTransformer => {
            let config: sequence_transformer::TorchTransformerConfig = read_config(args.config)?;
            let tensors = sequence_transformer::from_torch_transformer_state_dict(&config, state)?;
            written("nn.TransformerEncoder".into(), &tensors, |src| {
                sequence_transformer::save_transformer_encoder(args.out, &config, &tensors, src, args.force)
            })?
        }
    };
    Ok(format!(
        "imported {peer} ({peer_count} tensors) from {} into {} ({written} tensors)\n",
        args.state_dict.display(),
        args.out.display()
    ))
}

/// Runs `save` with `peer` as the checkpoint's source; the peer and the number of tensors written.
fn written(
    peer: String,
    tensors: &HashMap<String, Tensor>,
    save: impl FnOnce(Option<String>) -> Result<()>,
) -> Result<(String, usize)> {
    save(Some(peer.clone()))?;
    Ok((peer, tensors.len()))
}

/// `--from torchrec-…` names the module; the config's layer kind must be the one it reproduces.
fn check_torchrec_kind(source: ImportSource, config: &dcnv2::CrossNetConfig, path: &Path) -> Result<()> {
    use dcnv2::CrossLayerKind as K;
    let fits = matches!(
        (source, config.layer),
        (ImportSource::TorchrecCrossNet, K::FullRank | K::Vector)
            | (ImportSource::TorchrecLowRank, K::LowRank { .. })
            | (ImportSource::TorchrecMixture, K::Mixture { .. })
    );
    if fits {
        return Ok(());
    }
    let wanted = match source {
        ImportSource::TorchrecCrossNet => "`full_rank` (CrossNet) or `vector` (VectorCrossNet)",
        ImportSource::TorchrecLowRank => "`low_rank`",
        _ => "`mixture`",
    };
    Err(Error::input(
        "import",
        path.display().to_string(),
        format!("--from {} needs a layer of type {wanted}, the config has another", source.name()),
    ))
}
