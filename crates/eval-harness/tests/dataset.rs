//! Dataset CSVs in both schemas (with and without targets), the Python-literal answer choices
//! they hold, and errors that name the file, line and column.

use std::io::Write;
use std::path::PathBuf;

use eval_harness::dataset::{load, parse_python_list, EvalType};

fn write(content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.csv");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    (dir, path)
}

#[test]
fn parses_python_lists() {
    assert_eq!(
        parse_python_list("['A', 'B', 'C', 'D']").unwrap(),
        ["A", "B", "C", "D"]
    );
    assert_eq!(
        parse_python_list(r#"["it's", 'say "hi"', 'a, b', 'café ☕']"#).unwrap(),
        ["it's", "say \"hi\"", "a, b", "café ☕"]
    );
    assert_eq!(
        parse_python_list(r"['don\'t', 'back\\slash', 'tab\tx', '\xe9\u00e9', '\101']").unwrap(),
        ["don't", "back\\slash", "tab\tx", "éé", "A"]
    );
    assert_eq!(parse_python_list("  [ 'a' ,'b', ]  ").unwrap(), ["a", "b"]);
    assert_eq!(parse_python_list("['a' \"b\"]").unwrap(), ["ab"]);
    assert_eq!(parse_python_list("[r'\\d', u'x']").unwrap(), ["\\d", "x"]);
    assert_eq!(parse_python_list("['''tri'ple''']").unwrap(), ["tri'ple"]);
    assert!(parse_python_list("").unwrap().is_empty());
    assert!(parse_python_list("None").unwrap().is_empty());
    assert!(parse_python_list("[]").unwrap().is_empty());
}

#[test]
fn rejects_bad_lists_with_offsets() {
    let e = parse_python_list("['a', 'b'").unwrap_err();
    assert!(e.message.contains("unterminated list"), "{e:?}");
    let e = parse_python_list("['a', b]").unwrap_err();
    assert_eq!(e.offset, 6);
    let e = parse_python_list("['a]").unwrap_err();
    assert!(e.message.contains("unterminated string"));
    let e = parse_python_list("'a'").unwrap_err();
    assert_eq!(e.offset, 0);
    assert!(parse_python_list("['a'] x").is_err());
    assert!(parse_python_list("['a' 'b' c]").is_err());
}

#[test]
fn loads_both_schemas() {
    let (_d, p) = write(
        "id,input,target,answer_choices,eval_type\n\
         0,\"Q?\nOptions: A, B\",1,\"['A', 'B']\",multiple_choice\n\
         7,Summarise this,A summary.,None,generation\n",
    );
    let ds = load(&p).unwrap();
    assert_eq!(ds.name, "sample");
    assert!(ds.has_targets());
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[0].input, "Q?\nOptions: A, B");
    assert_eq!(ds.examples[0].answer_choices, ["A", "B"]);
    assert_eq!(ds.examples[1].line, 4);
    assert_eq!(ds.examples[1].eval_type, EvalType::Generation);
    assert!(ds.examples[1].answer_choices.is_empty());

    let (_d, p) = write(
        "id,input,eval_type,answer_choices\n1,x,multiple_choice,\"['a','b']\"\n2,y,generation,\n",
    );
    let ds = load(&p).unwrap();
    assert!(!ds.has_targets());
    assert_eq!(ds.examples[1].target, None);
}

fn load_err(content: &str) -> String {
    let (_d, p) = write(content);
    let e = load(&p).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with(&p.display().to_string()), "{s}");
    s.strip_prefix(&p.display().to_string())
        .unwrap()
        .to_string()
}

#[test]
fn errors_name_line_and_column() {
    let s = load_err("id,input,target,eval_type\n0,x,1,generation\n");
    assert!(s.starts_with(":1: missing column `answer_choices`"), "{s}");
    let s = load_err(
        "id,input,target,answer_choices,eval_type\n0,x,1,\"['a','b']\",multiple_choice\n1,y,z,None,summarise\n",
    );
    assert!(s.starts_with(":3:5: unknown eval_type `summarise`"), "{s}");
    let s = load_err(
        "id,input,target,answer_choices,eval_type\n0,\"multi\nline\",1,\"['a', 'b'\",multiple_choice\n",
    );
    assert!(
        s.starts_with(":2:4: unparsable answer_choices at character 10"),
        "{s}"
    );
    let s = load_err(
        "id,input,target,answer_choices,eval_type\n5,x,0,\"['a']\",multiple_choice\n5,y,0,\"['a']\",multiple_choice\n",
    );
    assert!(
        s.starts_with(":3:1: duplicate id `5` (first seen on line 2)"),
        "{s}"
    );
    let s = load_err("id,input,target,answer_choices,eval_type\n5,x,3,\"['a']\",multiple_choice\n");
    assert!(s.starts_with(":2:3: target `3`"), "{s}");
}
