//! Tensor bytes both ways: reading an input's elements from typed `contents` or from
//! `raw_input_contents` (BYTES elements as 4-byte little-endian lengths and their bytes), and
//! writing outputs in the layout the request used. Everything here reads client data, so each
//! length, count and shape is checked before it is trusted, and each refusal names the field.

use super::proto::InferTensorContents;
use crate::error::{Error, Result};

pub const BYTES: &str = "BYTES";
pub const FP32: &str = "FP32";
pub const BOOL: &str = "BOOL";

/// Dimensions a shape shows in an error message before it is cut short.
const SHOWN_DIMS: usize = 8;

/// Where an input's elements are: its typed `contents`, or its entry in `raw_input_contents`.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Typed(Option<&'a InferTensorContents>),
    Raw(&'a [u8]),
}

/// How the response carries its outputs: the same way the request carried its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Typed,
    Raw,
}

/// A shape as an error message shows it, bounded: `[2, 1]`, or `[1, 1, 1, …] (40 dimensions)`.
pub fn show_shape(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().take(SHOWN_DIMS).map(i64::to_string).collect();
    if shape.len() > SHOWN_DIMS {
        format!("[{}, …] ({} dimensions)", dims.join(", "), shape.len())
    } else {
        format!("[{}]", dims.join(", "))
    }
}

/// The number of elements `shape` holds, refused when a dimension is negative or the count is
/// over `max` (overflow included) — before anything is allocated for them.
pub fn element_count(field: &str, shape: &[i64], max: usize) -> Result<usize> {
    if let Some((index, dim)) = shape.iter().enumerate().find(|(_, dim)| **dim < 0) {
        return Err(Error::invalid(
            field,
            format!(
                "dimension {index} of {} is {dim}; a request's dimensions are 0 or more",
                show_shape(shape)
            ),
        ));
    }
    let count = shape.iter().try_fold(1usize, |count, &dim| {
        usize::try_from(dim)
            .ok()
            .and_then(|dim| count.checked_mul(dim))
    });
    match count {
        Some(count) if count <= max => Ok(count),
        _ => Err(Error::invalid(
            field,
            format!(
                "{} holds more than the limit of {max} elements",
                show_shape(shape)
            ),
        )),
    }
}

/// The `count` BYTES elements of one input.
pub fn bytes_elements(field: &str, source: Source<'_>, count: usize) -> Result<Vec<Vec<u8>>> {
    match source {
        Source::Typed(contents) => {
            let elements = contents.map_or(&[][..], |c| c.bytes_contents.as_slice());
            if elements.len() != count {
                return Err(Error::invalid(
                    format!("{field}.contents.bytes_contents"),
                    format!(
                        "holds {} elements where the shape says {count}",
                        elements.len()
                    ),
                ));
            }
            Ok(elements.to_vec())
        }
        Source::Raw(raw) => split_raw_bytes(field, raw, count),
    }
}

/// Splits a raw BYTES tensor into its elements: each a 4-byte little-endian length, then as
/// many bytes. The lengths must add up to the buffer exactly.
fn split_raw_bytes(field: &str, mut raw: &[u8], count: usize) -> Result<Vec<Vec<u8>>> {
    let total = raw.len();
    let mut elements = Vec::with_capacity(count);
    for index in 0..count {
        let Some((prefix, rest)) = raw.split_first_chunk::<4>() else {
            return Err(Error::invalid(
                format!("{field}.raw_input_contents"),
                format!(
                    "{total} bytes end inside the length prefix of element {index} of {count}; each BYTES element is a 4-byte little-endian length and then its bytes"
                ),
            ));
        };
        let length = u32::from_le_bytes(*prefix) as usize;
        if length > rest.len() {
            return Err(Error::invalid(
                format!("{field}.raw_input_contents"),
                format!(
                    "element {index} declares {length} bytes but only {} remain",
                    rest.len()
                ),
            ));
        }
        let (element, rest) = rest.split_at(length);
        elements.push(element.to_vec());
        raw = rest;
    }
    if !raw.is_empty() {
        return Err(Error::invalid(
            format!("{field}.raw_input_contents"),
            format!(
                "holds {} bytes after its {count} elements; the shape and the data disagree",
                raw.len()
            ),
        ));
    }
    Ok(elements)
}

/// The `count` BOOL elements of one input (raw: one byte each, 0 or 1).
pub fn bool_elements(field: &str, source: Source<'_>, count: usize) -> Result<Vec<bool>> {
    match source {
        Source::Typed(contents) => {
            let elements = contents.map_or(&[][..], |c| c.bool_contents.as_slice());
            if elements.len() != count {
                return Err(Error::invalid(
                    format!("{field}.contents.bool_contents"),
                    format!(
                        "holds {} elements where the shape says {count}",
                        elements.len()
                    ),
                ));
            }
            Ok(elements.to_vec())
        }
        Source::Raw(raw) if raw.len() != count => Err(Error::invalid(
            format!("{field}.raw_input_contents"),
            format!(
                "holds {} bytes for {count} BOOL elements of one byte each",
                raw.len()
            ),
        )),
        Source::Raw(raw) => raw
            .iter()
            .enumerate()
            .map(|(index, byte)| match byte {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(Error::invalid(
                    format!("{field}[{index}]"),
                    format!("BOOL elements are bytes 0 or 1; got {other}"),
                )),
            })
            .collect(),
    }
}

/// BYTES elements as text; `field[index]` names the first that is not UTF-8.
pub fn utf8(field: &str, elements: Vec<Vec<u8>>) -> Result<Vec<String>> {
    elements
        .into_iter()
        .enumerate()
        .map(|(index, bytes)| {
            String::from_utf8(bytes).map_err(|error| {
                Error::invalid(
                    format!("{field}[{index}]"),
                    format!(
                        "is not valid UTF-8 (at byte {}); text inputs are UTF-8",
                        error.utf8_error().valid_up_to()
                    ),
                )
            })
        })
        .collect()
}

/// One output's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Fp32(Vec<f32>),
    Bytes(Vec<Vec<u8>>),
}

impl Data {
    pub fn datatype(&self) -> &'static str {
        match self {
            Data::Fp32(_) => FP32,
            Data::Bytes(_) => BYTES,
        }
    }

    /// The elements as `raw_output_contents` lays them out.
    pub fn into_raw(self) -> Vec<u8> {
        match self {
            Data::Fp32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Data::Bytes(elements) => {
                let mut raw = Vec::with_capacity(elements.iter().map(|e| e.len() + 4).sum());
                for element in elements {
                    // Outputs are the server's own, far below 4 GiB an element.
                    raw.extend_from_slice(&(element.len() as u32).to_le_bytes());
                    raw.extend_from_slice(&element);
                }
                raw
            }
        }
    }

    /// The elements as typed `contents`.
    pub fn into_contents(self) -> InferTensorContents {
        match self {
            Data::Fp32(values) => InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            },
            Data::Bytes(elements) => InferTensorContents {
                bytes_contents: elements,
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidArgument { field, message }) => format!("{field}: {message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn raw(elements: &[&[u8]]) -> Vec<u8> {
        Data::Bytes(elements.iter().map(|e| e.to_vec()).collect()).into_raw()
    }

    #[test]
    fn counts_elements_within_the_limit() {
        assert_eq!(element_count("s", &[2, 1], 8).unwrap(), 2);
        assert_eq!(element_count("s", &[], 8).unwrap(), 1);
        assert_eq!(element_count("s", &[3, 0], 8).unwrap(), 0);
        assert!(field(element_count("s", &[-1], 8)).contains("dimension 0 of [-1] is -1"));
        assert!(field(element_count("s", &[9], 8)).contains("limit of 8"));
        let huge = [i64::MAX, i64::MAX, 2];
        assert!(field(element_count("s", &huge, 8)).contains("limit of 8"));
        let long = vec![1; 40];
        assert!(field(element_count("s", &long[..], 0)).contains("(40 dimensions)"));
    }

    #[test]
    fn raw_bytes_round_trip_and_bad_prefixes_are_refused() {
        let data = raw(&[b"ab", b"", "é".as_bytes()]);
        let elements = bytes_elements("text_input", Source::Raw(&data), 3).unwrap();
        assert_eq!(utf8("text_input", elements).unwrap(), ["ab", "", "é"]);

        let short = field(bytes_elements("t", Source::Raw(&data[..2]), 1));
        assert!(
            short.contains("inside the length prefix of element 0"),
            "{short}"
        );
        let mut lying = data.clone();
        lying[0] = 200;
        let over = field(bytes_elements("t", Source::Raw(&lying), 3));
        assert!(over.contains("element 0 declares 200 bytes"), "{over}");
        let extra = field(bytes_elements("t", Source::Raw(&data), 2));
        assert!(extra.contains("after its 2 elements"), "{extra}");
        let fewer = field(bytes_elements("t", Source::Raw(&data), 4));
        assert!(fewer.contains("element 3"), "{fewer}");
        let huge = u32::MAX.to_le_bytes();
        assert!(field(bytes_elements("t", Source::Raw(&huge), 1)).contains("declares"));
    }

    #[test]
    fn typed_contents_must_match_the_shape() {
        let contents = InferTensorContents {
            bytes_contents: vec![b"x".to_vec()],
            ..Default::default()
        };
        assert_eq!(
            bytes_elements("t", Source::Typed(Some(&contents)), 1).unwrap(),
            [b"x".to_vec()]
        );
        assert!(
            field(bytes_elements("t", Source::Typed(Some(&contents)), 2))
                .starts_with("t.contents.bytes_contents: holds 1 elements")
        );
        assert!(field(bytes_elements("t", Source::Typed(None), 1)).contains("holds 0"));
    }

    #[test]
    fn invalid_utf8_names_the_element() {
        let message = field(utf8("text_input", vec![b"ok".to_vec(), vec![b'a', 0xff]]));
        assert!(message.starts_with("text_input[1]: is not valid UTF-8 (at byte 1)"));
    }

    #[test]
    fn bools_are_single_bytes() {
        assert_eq!(bool_elements("s", Source::Raw(&[1]), 1).unwrap(), [true]);
        assert!(field(bool_elements("s", Source::Raw(&[2]), 1)).contains("got 2"));
        assert!(field(bool_elements("s", Source::Raw(&[1, 0]), 1)).contains("2 bytes"));
    }

    #[test]
    fn fp32_is_little_endian() {
        assert_eq!(
            Data::Fp32(vec![1.0, -2.5]).into_raw(),
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }
}
