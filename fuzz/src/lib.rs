//! The fuzz targets' logic, as plain functions so that the main crate's
//! `tests/fuzz_corpus.rs` replays the corpus through the same code on stable.
mod entries;
pub use entries::*;
