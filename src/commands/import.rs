//! `rankstack import`: a peer framework's PyTorch state dict (saved as safetensors) → a rankstack
//! single-layer checkpoint (`rankstack_nn::layer_checkpoint`; `docs/compatibility.md`).

use std::path::Path;

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
    /// The layer's input width: the torchrec cross networks and Twitter's MaskNet take one
    /// (TransAct's and `nn.TransformerEncoder`'s widths are in their configs).
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

fn input_dim(source: ImportSource, args: &ImportArgs) -> Result<usize> {
    args.input_dim.ok_or_else(|| {
        Error::input("import", "--input-dim", format!("{} needs the layer's input width", source.name()))
    })
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
    let state = read_safetensors(args.state_dict)?.tensors;
    let peer_count = state.len();
    let (peer, written) = match source {
        ImportSource::TorchrecCrossNet | ImportSource::TorchrecLowRank | ImportSource::TorchrecMixture => {
            let config: dcnv2::CrossNetConfig = read_config(args.config)?;
            check_torchrec_kind(source, &config, args.config)?;
            let d = input_dim(source, args)?;
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
            let d = input_dim(source, args)?;
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
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
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
