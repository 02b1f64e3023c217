//! Competition data: the CSV reader and its Python-literal `answer_choices` parser.

use crate::fixtures::with_file;

/// A competition CSV (`id,input,target,answer_choices,eval_type`).
pub fn dataset_csv(data: &[u8]) {
    with_file("data.csv", data, |path| {
        let _ = eval_harness::dataset::load(path);
    });
}

/// One `answer_choices` field: a Python list literal of strings. An error's offset points
/// into the field.
pub fn answer_choices(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = eval_harness::dataset::parse_python_list(text) {
        assert!(
            e.offset <= text.chars().count(),
            "error offset {} past the end",
            e.offset
        );
    }
}
