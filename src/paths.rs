//! Paths that a model's files name for other files of the same folder: a manifest's tokenizer
//! and graphs, a Hugging Face config's files, a graph's external data. A leaf every layer may
//! use, so the rule is written once.

use std::path::{Component, Path};

/// Whether `relative`, joined to a folder, names something inside it: only plain names, no
/// root, no `..` and no `.`, so neither a climb out nor an absolute path passes.
pub fn stays_inside(relative: &Path) -> bool {
    relative
        .components()
        .all(|part| matches!(part, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_stay_inside() {
        assert!(stays_inside(Path::new("tokenizer.json")));
        assert!(stays_inside(Path::new("onnx/model.onnx_data")));
        assert!(!stays_inside(Path::new("../model.onnx")));
        assert!(!stays_inside(Path::new("onnx/../../x")));
        assert!(!stays_inside(Path::new("/etc/passwd")));
        assert!(!stays_inside(Path::new("./model.onnx")));
    }
}
