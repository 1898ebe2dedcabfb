//! Reading and writing NumPy `.npy` files (format version 1.0, C order), for
//! saved logits, golden outputs and tensor dumps.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable .npy file: {message}")]
    Format { path: PathBuf, message: String },
}

/// An array read from a `.npy` file, widened to f32 or i64.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyArray {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut text = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + text + newline, padded to 64 bytes.
    let unpadded = 10 + text.len() + 1;
    text.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    text.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((text.len() as u16).to_le_bytes());
    out.extend(text.as_bytes());
    out
}

/// Writes an f32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    file.write_all(&header("<f4", shape)).map_err(io)?;
    file.write_all(bytemuck::cast_slice(data)).map_err(io)?;
    file.flush().map_err(io)
}

/// Reads an array of f32, f64 (narrowed), i32 or i64 (widened).
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let bad = |message: &str| NpyError::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| NpyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown format version")),
    };
    let text = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = text.find(&format!("'{key}':"))? + key.len() + 3;
        Some(text[at..].trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(bad("Fortran-order arrays are not supported"));
    }
    let shape_text = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let numel: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    let width = match descr {
        "<f4" | "<i4" => 4,
        "<f8" | "<i8" => 8,
        _ => return Err(bad(&format!("unsupported dtype {descr}"))),
    };
    if data.len() != numel * width {
        return Err(bad(&format!(
            "holds {} data bytes, shape {shape:?} of {descr} needs {}",
            data.len(),
            numel * width
        )));
    }
    let words = |n: usize| data.chunks_exact(n);
    Ok(match descr {
        "<f4" => NpyArray::F32 {
            shape,
            data: words(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        },
        "<f8" => NpyArray::F32 {
            shape,
            data: words(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
        },
        "<i4" => NpyArray::I64 {
            shape,
            data: words(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
        },
        _ => NpyArray::I64 {
            shape,
            data: words(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write_f32(&path, &[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            (bytes.len() - 24) % 64,
            0,
            "data starts on a 64-byte boundary"
        );
        assert_eq!(
            read(&path).unwrap(),
            NpyArray::F32 {
                shape: vec![2, 3],
                data: vec![1., 2., 3., 4., 5., 6.]
            }
        );
        write_f32(&path, &[4], &[1., 2., 3., 4.]).unwrap();
        assert!(matches!(read(&path).unwrap(), NpyArray::F32 { shape, .. } if shape == [4]));
    }

    #[test]
    fn rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.npy");
        std::fs::write(&path, b"hello world").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("magic"));
    }
}
