//! Replays every fuzz corpus file and every past crasher through the fuzz
//! targets' own entry functions, on stable, so CI checks them without
//! nightly or cargo-fuzz (see fuzz/README.md).

#[path = "../fuzz/src/entries.rs"]
mod entries;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Runs `entry` on each file of `fuzz/corpus/<target>/` and
/// `fuzz/regressions/<target>/`; returns how many there were.
fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = fuzz.join(dir).join(target);
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = e.unwrap().path();
            // Skips .gitkeep.
            if !path.file_name().unwrap().to_string_lossy().starts_with('.') {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        // Name the file that fails; the panic message is printed above.
        if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
            panic!("{} fails", path.display());
        }
    }
    files.len()
}

#[test]
fn frame_decoder_corpus() {
    assert!(replay("frame_decoder", entries::frame_decoder) >= 10);
}

#[test]
fn connection_corpus() {
    assert!(replay("connection", entries::connection) >= 10);
}

#[test]
fn chat_decoder_corpus() {
    assert!(replay("chat_decoder", entries::chat_decoder) >= 10);
}
