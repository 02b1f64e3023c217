//! Hostile and odd checkpoints: the fuzzer's findings against the reader this crate replaced
//! (candle's, which panicked, aborted on allocation or overflowed the stack on each of them),
//! committed under fuzz/regressions/pth_pickle/, each now a clear error; and views read right.

use std::io::Write;
use std::path::Path;

use pth_reader::{Archive, Dtype, Error};

fn regression(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions/pth_pickle")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A zip archive with `pickle` as `archive/data.pkl` and storage `0` of `storage` bytes.
fn archive(pickle: &[u8], storage: usize) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", o).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/data/0", o).unwrap();
    z.write_all(&(0..storage).map(|i| i as u8).collect::<Vec<_>>())
        .unwrap();
    z.finish().unwrap();
    buf.into_inner()
}

fn open_err(pickle: &[u8], storage: usize) -> String {
    match Archive::new(std::io::Cursor::new(archive(pickle, storage))) {
        Ok(a) => panic!("opened, with tensors {:?}", a.tensors()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_pickles_fail_fast_with_the_reason() {
    let t = std::time::Instant::now();
    for (name, expected) in [
        (
            "rebuild-tensor-with-two-arguments",
            "arguments other than (storage, offset, size, stride",
        ),
        (
            "shape-beyond-storage",
            "has more elements than its storage of 1",
        ),
        ("nested-tuples", "nested deeper than 64"),
        ("memo-doubling", "holds a tuple or list, not a state dict"),
        ("string-claims-4gb", "needs 4294967280 bytes"),
    ] {
        let e = open_err(&regression(name), 4);
        assert!(e.contains(expected), "{name}: {e}");
        assert!(
            e.starts_with("data.pkl: pickle byte ") || e.starts_with("tensor `"),
            "{name}: {e}"
        );
    }
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
}

#[test]
fn storage_must_back_what_the_pickle_claims() {
    // The f32 seed: four tensors over storages 0..3 (4, 16, 64, 256 bytes); storage 0 is
    // given 2 bytes here, so tensor `a` (one f32) is not backed.
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/pth_pickle/f32-state-dict");
    let e = open_err(&std::fs::read(corpus).unwrap(), 2);
    assert!(
        e.contains("tensor `a`") && e.contains("holds 2 bytes, the pickle says 4"),
        "{e}"
    );
    assert!(matches!(
        Archive::new(std::io::Cursor::new(b"PK not really".to_vec())),
        Err(Error::Archive(_))
    ));
}

#[test]
fn views_are_read_in_row_major_order() {
    // torch.save({"w": arange(6).reshape(2, 3), "w_t": its transpose}): one storage, two views.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/pth/small-state-dict");
    let mut a = Archive::open(&p).unwrap();
    let f32s = |b: Vec<u8>| {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(a.tensors()["w_t"].shape, [3, 2]);
    assert_eq!(a.tensors()["w_t"].dtype, Dtype::F32);
    assert!(!a.tensors()["w_t"].is_contiguous());
    assert_eq!(
        f32s(a.read("w").unwrap().unwrap()),
        [0., 1., 2., 3., 4., 5.]
    );
    assert_eq!(
        f32s(a.read("w_t").unwrap().unwrap()),
        [0., 3., 1., 4., 2., 5.]
    );
    assert!(a.read("missing").unwrap().is_none());
}
