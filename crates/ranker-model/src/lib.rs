//! The assembled Homefeed ranker: feature encoders, the TransAct sequence encoder, an interaction
//! backbone of MaskNet and DCNv2 stages, a shared MLP and multi-task heads, with presets, PyTorch
//! parity and a cost planner.
//!
//! Not built yet: this crate is the subject of the `ranker-model` issue. The layers it will combine
//! are usable today from the `feature-encoders`, `sequence-transformer`, `masknet` and `dcnv2`
//! crates.
