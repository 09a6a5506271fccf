//! One copy of a graph's weights for several sessions of it. Each ONNX Runtime session otherwise
//! copies every initializer out of the model file and prepacks the matrices it multiplies into
//! buffers of its own, so a second session of all-MiniLM-L6-v2 cost 88 MiB more. Here the
//! initializers are read once and handed to every session (`AddInitializer`), and the sessions
//! share one prepacked-weights container, which ONNX Runtime fills with the packed form of shared
//! initializers only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ort::session::builder::{PrepackedWeights, SessionBuilder};
use ort::value::{DynValue, Tensor};
use prost::Message;

/// The initializers of one graph, and the packed forms the sessions built with them share.
pub struct SharedWeights {
    initializers: Vec<(String, Arc<DynValue>)>,
    prepacked: PrepackedWeights,
    bytes: usize,
}

impl SharedWeights {
    /// Reads the initializers of `model_file`'s main graph, from the file itself or from the
    /// external data files beside it. One whose element type is not read here stays in the
    /// graph, where each session copies it as before.
    pub fn read(model_file: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(model_file)
            .with_context(|| format!("reading {}", model_file.display()))?;
        let model = onnx::ModelProto::decode(bytes.as_slice())
            .with_context(|| format!("{} is not an ONNX model", model_file.display()))?;
        drop(bytes);
        let folder = model_file.parent().unwrap_or(Path::new("."));
        let mut shared = Self {
            initializers: Vec::new(),
            prepacked: PrepackedWeights::new(),
            bytes: 0,
        };
        for tensor in model
            .graph
            .map(|graph| graph.initializer)
            .unwrap_or_default()
        {
            let external;
            let raw: &[u8] = match tensor.location() {
                onnx::Location::External(location) => {
                    external = location.read(folder)?;
                    &external
                }
                onnx::Location::Inline => &tensor.raw_data,
            };
            let Some((value, bytes)) = tensor.value(raw)? else {
                continue;
            };
            shared.bytes += bytes;
            shared.initializers.push((tensor.name, Arc::new(value)));
        }
        Ok(shared)
    }

    /// How many initializers are shared, and their bytes.
    pub fn size(&self) -> (usize, usize) {
        (self.initializers.len(), self.bytes)
    }

    /// A builder whose session takes these initializers instead of the file's, and whose packed
    /// weights go to (or come from) the shared container.
    pub fn apply(&self, mut builder: SessionBuilder) -> ort::Result<SessionBuilder> {
        for (name, value) in &self.initializers {
            builder = builder.with_initializer(name, Arc::clone(value))?;
        }
        Ok(builder.with_prepacked_weights(&self.prepacked)?)
    }
}

/// The few parts of `onnx.proto` that hold a graph's initializers; prost skips the rest.
mod onnx {
    use super::*;

    #[derive(Clone, PartialEq, Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int32, repeated, tag = "5")]
        pub int32_data: Vec<i32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<StringStringEntryProto>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `TensorProto.DataType` values read here.
    const FLOAT: i32 = 1;
    const INT32: i32 = 6;
    const INT64: i32 = 7;
    /// `TensorProto.DataLocation.EXTERNAL`.
    const EXTERNAL: i32 = 1;

    pub enum Location {
        Inline,
        External(ExternalData),
    }

    /// Where in a file beside the model an initializer's bytes lie.
    pub struct ExternalData {
        file: PathBuf,
        offset: u64,
        length: Option<usize>,
    }

    impl ExternalData {
        pub fn read(&self, folder: &Path) -> anyhow::Result<Vec<u8>> {
            use std::io::{Read, Seek, SeekFrom};
            // The loader has already refused a version folder whose files lead outside the
            // repository; a location that climbs out of the folder is refused here too.
            if !crate::paths::stays_inside(&self.file) {
                bail!(
                    "external data location {} leaves the model's folder",
                    self.file.display()
                );
            }
            let path = folder.join(&self.file);
            let mut file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            file.seek(SeekFrom::Start(self.offset))?;
            let mut data = Vec::new();
            match self.length {
                Some(length) => {
                    data.resize(length, 0);
                    file.read_exact(&mut data)
                        .with_context(|| format!("reading {}", path.display()))?;
                }
                None => {
                    file.read_to_end(&mut data)?;
                }
            }
            Ok(data)
        }
    }

    impl TensorProto {
        pub fn location(&self) -> Location {
            if self.data_location != EXTERNAL {
                return Location::Inline;
            }
            let entry = |key: &str| {
                self.external_data
                    .iter()
                    .find(|entry| entry.key == key)
                    .map(|entry| entry.value.as_str())
            };
            Location::External(ExternalData {
                file: PathBuf::from(entry("location").unwrap_or_default()),
                offset: entry("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
                length: entry("length").and_then(|v| v.parse().ok()),
            })
        }

        /// The tensor as an ONNX Runtime value and its size in bytes, from its little-endian
        /// `raw` bytes or its typed fields; `None` for a type not read here or no elements.
        pub fn value(&self, raw: &[u8]) -> anyhow::Result<Option<(DynValue, usize)>> {
            let elements: i64 = self.dims.iter().product();
            if elements <= 0 || self.dims.iter().any(|&dim| dim < 0) {
                return Ok(None);
            }
            let shape = self.dims.clone();
            let value = match self.data_type {
                FLOAT => typed(shape, raw, &self.float_data, f32::from_le_bytes)?,
                INT32 => typed(shape, raw, &self.int32_data, i32::from_le_bytes)?,
                INT64 => typed(shape, raw, &self.int64_data, i64::from_le_bytes)?,
                _ => return Ok(None),
            };
            Ok(Some(value))
        }
    }

    /// A tensor of `T` from `raw` (when it holds anything) or else from its typed field.
    fn typed<T, const N: usize>(
        shape: Vec<i64>,
        raw: &[u8],
        field: &[T],
        from_le: fn([u8; N]) -> T,
    ) -> anyhow::Result<(DynValue, usize)>
    where
        T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
    {
        let data: Vec<T> = if raw.is_empty() {
            field.to_vec()
        } else {
            raw.chunks_exact(N)
                .map(|chunk| from_le(chunk.try_into().expect("chunks of N bytes")))
                .collect()
        };
        let expected: i64 = shape.iter().product();
        if data.len() as i64 != expected {
            bail!(
                "an initializer of shape {shape:?} holds {} elements",
                data.len()
            );
        }
        let bytes = data.len() * N;
        Ok((Tensor::from_array((shape, data))?.into_dyn(), bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::onnx::{ModelProto, StringStringEntryProto, TensorProto};
    use super::*;

    fn tensor(name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type,
            name: name.into(),
            raw_data: raw,
            ..Default::default()
        }
    }

    fn model(initializers: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            graph: Some(super::onnx::GraphProto {
                initializer: initializers,
            }),
        }
    }

    #[test]
    fn reads_inline_external_and_typed_initializers() {
        // Tensors are ONNX Runtime values: the library must be loaded.
        crate::runtime::library::init(
            &crate::config::Config::default().ort_library_candidates(),
            1,
        )
        .expect("ONNX Runtime (make onnxruntime)");
        let folder = tempfile::tempdir().unwrap();
        let weights: Vec<u8> = [1.5_f32, -2.0, 3.25, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut external_file = vec![0_u8; 8];
        external_file.extend_from_slice(&weights);
        std::fs::write(folder.path().join("model.onnx_data"), &external_file).unwrap();
        let mut external = tensor("external", &[2, 2], 1, Vec::new());
        external.data_location = 1;
        external.external_data = [
            ("location", "model.onnx_data"),
            ("offset", "8"),
            ("length", "16"),
        ]
        .into_iter()
        .map(|(key, value)| StringStringEntryProto {
            key: key.into(),
            value: value.into(),
        })
        .collect();
        let mut typed = tensor("typed", &[3], 7, Vec::new());
        typed.int64_data = vec![7, 8, 9];
        let initializers = vec![
            tensor("inline", &[4], 1, weights.clone()),
            external,
            typed,
            // A type read by no one here (float16) stays with the graph.
            tensor("half", &[2], 10, vec![0; 4]),
        ];
        let path = folder.path().join("model.onnx");
        std::fs::write(&path, model(initializers).encode_to_vec()).unwrap();

        let shared = SharedWeights::read(&path).unwrap();
        let names: Vec<&str> = shared
            .initializers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(names, ["inline", "external", "typed"]);
        assert_eq!(shared.size(), (3, 16 + 16 + 24));
        let read = |index: usize| {
            let (_, data) = shared.initializers[index]
                .1
                .try_extract_tensor::<f32>()
                .unwrap();
            data.to_vec()
        };
        assert_eq!(read(0), [1.5, -2.0, 3.25, 4.0]);
        assert_eq!(read(1), [1.5, -2.0, 3.25, 4.0]);
        let (shape, data) = shared.initializers[2]
            .1
            .try_extract_tensor::<i64>()
            .unwrap();
        assert_eq!((shape.to_vec(), data.to_vec()), (vec![3], vec![7, 8, 9]));
    }

    #[test]
    fn refuses_external_data_outside_the_folder() {
        let folder = tempfile::tempdir().unwrap();
        let mut escaping = tensor("w", &[1], 1, Vec::new());
        escaping.data_location = 1;
        escaping.external_data = vec![StringStringEntryProto {
            key: "location".into(),
            value: "../secret".into(),
        }];
        let path = folder.path().join("model.onnx");
        std::fs::write(&path, model(vec![escaping]).encode_to_vec()).unwrap();
        let error = SharedWeights::read(&path).err().unwrap().to_string();
        assert!(error.contains("leaves the model's folder"), "{error}");
    }
}
