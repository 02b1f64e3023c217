//! Checkpoint files: safetensors headers, PyTorch zip pickles, PEFT adapters.

use std::io::Write;

use candle_core::{DType, Device, Tensor};
use merge_core::adapter::Adapter;
use merge_core::checkpoint::Checkpoint;
use merge_core::source::{ModelFiles, ModelRef};

use crate::fixtures::with_file;

/// Every tensor of `ckpt` loaded as stored and as f32 (the mapped, chunked path for
/// safetensors), as a merge or an evaluation reads them.
fn load_all(ckpt: &Checkpoint) {
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for name in names {
        let _ = ckpt.info(&name);
        let _ = ckpt.load(&name);
        let _ = ckpt.load_f32(&name, &Device::Cpu);
    }
    let _ = ckpt.storage_dtype();
}

fn open_file(path: &std::path::Path) -> merge_core::Result<Checkpoint> {
    let dir = path.parent().expect("in scratch").to_path_buf();
    let files = ModelFiles::local(ModelRef::new(dir.display().to_string()), dir);
    Checkpoint::open_file(path, &files)
}

/// A `.safetensors` file: header (JSON after an 8-byte length), offsets, tensor data.
pub fn safetensors(data: &[u8]) {
    with_file("model.safetensors", data, |path| {
        if let Ok(ckpt) = open_file(path) {
            load_all(&ckpt);
        }
    });
}

/// A `pytorch_model.bin`: a zip archive with a pickled state dict and storages.
pub fn pth(data: &[u8]) {
    if let Ok(mut archive) = pth_reader::Archive::new(std::io::Cursor::new(data)) {
        let names: Vec<String> = archive.tensors().keys().cloned().collect();
        for n in names {
            let _ = archive.read(&n);
        }
    }
    with_file("pytorch_model.bin", data, |path| {
        if let Ok(ckpt) = open_file(path) {
            load_all(&ckpt);
        }
    });
}

/// The pickle of a `pytorch_model.bin` (its `data.pkl`), in an archive with storages `0` to
/// `3` of 4, 16, 64 and 256 bytes: the fuzzer mutates the state dict, not the zip around it.
pub fn pth_pickle(data: &[u8]) {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).expect("in memory");
        zip.write_all(data).expect("in memory");
        for (key, len) in [(0, 4), (1, 16), (2, 64), (3, 256)] {
            zip.start_file(format!("archive/data/{key}"), opts)
                .expect("in memory");
            zip.write_all(&vec![0x3c; len]).expect("in memory");
        }
        zip.finish().expect("in memory");
    }
    pth(buf.get_ref());
}

/// A PEFT adapter: `adapter_config.json` (the input up to the first NUL byte) over factor
/// tensors named and shaped by the rest (lines `name dim dim ...`), mapped onto a tiny Llama
/// base and folded in, as merging or evaluating an adapter does.
pub fn adapter(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(&data[..split]) else {
        return;
    };
    let names = String::from_utf8_lossy(data.get(split + 1..).unwrap_or_default());
    let mut tensors = Vec::new();
    for line in names.lines().take(64) {
        let mut parts = line.split_whitespace();
        let Some(name) = parts.next() else { continue };
        let dims: Vec<usize> = parts.filter_map(|d| d.parse().ok()).take(3).collect();
        // Factors are real tensors: their size is what the file would hold, kept small.
        if dims.iter().product::<usize>() > 4096 {
            continue;
        }
        if let Ok(t) = Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu) {
            tensors.push((name.to_string(), t));
        }
    }
    let Ok(adapter) = Adapter::in_memory("fuzzed", config, tensors) else {
        return;
    };
    let base = crate::fixtures::tiny_llama();
    if adapter.check_against(base).is_ok() {
        let names: Vec<String> = adapter.changed().map(str::to_string).collect();
        for name in names {
            let _ = adapter.apply(base, &name, &Device::Cpu);
        }
    }
}
