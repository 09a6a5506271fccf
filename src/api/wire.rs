//! One pass over a request's wire bytes before prost decodes it, counting the elements of its
//! lists (repeated strings, bytes and messages, and map entries, at every depth), with the
//! services' own descriptors telling which field is which. Only what a method takes is
//! counted: a response, which the command-line client decodes with the same codec, may hold
//! more (the tokens of a long text, each with its log-probabilities).
//!
//! Decoding turns an empty element of two bytes into a value of up to a few hundred (a KServe
//! input tensor takes 312), so a message within the size limit could decode into gigabytes
//! before any check of the request's own counts ran. Scalars are not counted: packed or not,
//! each decodes to at most eight bytes for every byte sent. A message this pass cannot follow
//! (malformed, or of a type the descriptors lack) is left to prost, which refuses it. Groups are
//! refused here: no message of the services has one, and prost would skip one in an unknown
//! field and decode what follows it, which this pass would then not have counted.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

/// Most list elements in one request. A request within the server's own limits holds at most
/// a few per text or message (`limits.max_texts_per_request` and `max_messages_per_request`
/// are held to a quarter of it), and this many of the largest element take about 20 MB decoded.
pub const MAX_LIST_ELEMENTS: usize = 4 * crate::config::limits::MOST_TEXTS_OR_MESSAGES;

/// Deeper than any message of the services nests; prost refuses past 100.
const MAX_DEPTH: usize = 32;

enum Kind {
    /// Numbers and booleans: not counted.
    Scalar,
    /// Strings and bytes.
    Text,
    /// A message, by its package-qualified name.
    Message(String),
}

struct Field {
    name: String,
    list: bool,
    kind: Kind,
}

/// Every message of the services, by package-qualified name, with its fields by number, and
/// the names of those the services' methods take.
struct Schema {
    messages: HashMap<String, HashMap<u32, Field>>,
    requests: HashSet<String>,
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut messages = HashMap::new();
        let mut requests = HashSet::new();
        for encoded in [
            super::proto::FILE_DESCRIPTOR_SET,
            super::kserve::proto::FILE_DESCRIPTOR_SET,
        ] {
            // Written by build.rs from the same protos the code was generated from.
            let set = FileDescriptorSet::decode(encoded).expect("the build's own descriptors");
            for file in &set.file {
                for message in &file.message_type {
                    add(&mut messages, file.package(), message);
                }
                for method in file.service.iter().flat_map(|service| &service.method) {
                    requests.insert(method.input_type().trim_start_matches('.').to_owned());
                }
            }
        }
        Schema { messages, requests }
    })
}

fn add(
    messages: &mut HashMap<String, HashMap<u32, Field>>,
    scope: &str,
    message: &DescriptorProto,
) {
    let name = match scope {
        "" => message.name().to_owned(),
        scope => format!("{scope}.{}", message.name()),
    };
    // Map entries are nested messages of their own (`ParametersEntry`).
    for nested in &message.nested_type {
        add(messages, &name, nested);
    }
    let fields = message
        .field
        .iter()
        .filter_map(|field| {
            let number = u32::try_from(field.number()).ok()?;
            let kind = match field.r#type() {
                Type::String | Type::Bytes => Kind::Text,
                Type::Message => Kind::Message(field.type_name().trim_start_matches('.').into()),
                _ => Kind::Scalar,
            };
            let list = field.label() == Label::Repeated;
            let name = field.name().to_owned();
            Some((number, Field { name, list, kind }))
        })
        .collect();
    messages.insert(name, fields);
}

/// Why a request is refused before it is decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Past `MAX_LIST_ELEMENTS`, at this field's element: its dotted path, e.g.
    /// `inputs.contents.bytes_contents`.
    TooManyElements(String),
    /// A group (the proto2 wire types 3 and 4), under this field number.
    Group(u64),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = MAX_LIST_ELEMENTS;
        match self {
            Refusal::TooManyElements(field) => write!(
                f,
                "{field}: the request holds more than {limit} list elements (repeated fields and \
                 map entries, counted together); the limit is {limit}"
            ),
            Refusal::Group(number) => write!(
                f,
                "field {number} is a protobuf group, which no message of this API has"
            ),
        }
    }
}

/// Counts the list elements of `bytes` as the message `name` (package-qualified, as
/// `prost::Name::full_name` gives it), where a method takes that message.
pub fn check_list_elements(name: &str, bytes: &[u8]) -> Result<(), Refusal> {
    let schema = schema();
    if !schema.requests.contains(name) {
        return Ok(());
    }
    let mut left = MAX_LIST_ELEMENTS;
    count(schema, name, bytes, 0, &mut left)
}

fn count(
    schema: &Schema,
    name: &str,
    mut bytes: &[u8],
    depth: usize,
    left: &mut usize,
) -> Result<(), Refusal> {
    let Some(fields) = schema.messages.get(name) else {
        return Ok(());
    };
    if depth > MAX_DEPTH {
        return Ok(());
    }
    while !bytes.is_empty() {
        let Some(tag) = varint(&mut bytes) else {
            return Ok(());
        };
        let payload = match tag & 7 {
            0 => varint(&mut bytes).map(|_| None),
            1 => skip(&mut bytes, 8).map(|()| None),
            2 => delimited(&mut bytes).map(Some),
            5 => skip(&mut bytes, 4).map(|()| None),
            3 | 4 => return Err(Refusal::Group(tag >> 3)),
            _ => None,
        };
        let Some(payload) = payload else {
            return Ok(());
        };
        let Some(field) = u32::try_from(tag >> 3).ok().and_then(|n| fields.get(&n)) else {
            continue;
        };
        if field.list && !matches!(field.kind, Kind::Scalar) {
            if *left == 0 {
                return Err(Refusal::TooManyElements(field.name.clone()));
            }
            *left -= 1;
        }
        if let (Kind::Message(inner), Some(payload)) = (&field.kind, payload) {
            count(schema, inner, payload, depth + 1, left).map_err(|refusal| match refusal {
                Refusal::TooManyElements(path) => {
                    Refusal::TooManyElements(format!("{}.{path}", field.name))
                }
                group => group,
            })?;
        }
    }
    Ok(())
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

fn skip(bytes: &mut &[u8], n: usize) -> Option<()> {
    *bytes = bytes.get(n..)?;
    Some(())
}

fn delimited<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(bytes)?).ok()?;
    let payload = bytes.get(..len)?;
    *bytes = &bytes[len..];
    Some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::kserve::proto::model_infer_request::InferInputTensor;
    use crate::api::kserve::proto::{InferTensorContents, ModelInferRequest};
    use crate::api::proto::{EmbedRequest, TokenizeResponse};
    use prost::Name;

    fn check<M: Message + Name>(message: &M) -> Result<(), Refusal> {
        check_list_elements(&M::full_name(), &message.encode_to_vec())
    }

    #[test]
    fn lists_are_counted_at_every_depth_up_to_the_limit() {
        let texts = |n: usize| EmbedRequest {
            model: "m".into(),
            texts: vec![String::new(); n],
            ..Default::default()
        };
        assert_eq!(check(&texts(MAX_LIST_ELEMENTS)), Ok(()));
        assert_eq!(
            check(&texts(MAX_LIST_ELEMENTS + 1)),
            Err(Refusal::TooManyElements("texts".into()))
        );

        let input = |contents: usize| InferInputTensor {
            name: "text_input".into(),
            datatype: "BYTES".into(),
            shape: vec![1; 1000],
            contents: Some(InferTensorContents {
                bytes_contents: vec![Vec::new(); contents],
                int64_contents: vec![7; 100_000],
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = |inputs: Vec<InferInputTensor>| ModelInferRequest {
            model_name: "m".into(),
            inputs,
            ..Default::default()
        };
        // Numbers, packed (shape) or not, are not counted; each input and each text is.
        assert_eq!(check(&request(vec![input(MAX_LIST_ELEMENTS - 1)])), Ok(()));
        assert_eq!(
            check(&request(vec![input(MAX_LIST_ELEMENTS)])),
            Err(Refusal::TooManyElements(
                "inputs.contents.bytes_contents".into()
            ))
        );
        let many = vec![InferInputTensor::default(); MAX_LIST_ELEMENTS + 1];
        assert_eq!(
            check(&request(many)),
            Err(Refusal::TooManyElements("inputs".into()))
        );
        // Map entries count as elements too.
        let mut parameters = HashMap::new();
        for i in 0..=MAX_LIST_ELEMENTS {
            parameters.insert(i.to_string(), Default::default());
        }
        let mapped = ModelInferRequest {
            parameters,
            ..Default::default()
        };
        assert_eq!(
            check(&mapped),
            Err(Refusal::TooManyElements("parameters".into()))
        );
    }

    #[test]
    fn what_cannot_be_followed_is_left_to_prost() {
        let name = EmbedRequest::full_name();
        for bytes in [
            &[0x12][..],         // a tag, then nothing
            &[0x12, 0x05, 0x01], // a length past the end
            &[0xff; 11],         // a varint of 11 bytes
        ] {
            assert_eq!(check_list_elements(&name, bytes), Ok(()));
        }
        assert_eq!(
            check_list_elements("no.such.Message", &[0x12, 0x00]),
            Ok(())
        );
    }

    /// prost skips a group in an unknown field and decodes what follows it, so a group ahead
    /// of a flood of elements would hide them from the count: groups are refused, at any depth.
    #[test]
    fn a_group_is_refused_wherever_it_is() {
        let many_inputs = [0x2a, 0x00].repeat(MAX_LIST_ELEMENTS + 1);
        // Field 100, a group start (wire type 3) and its end (4), then the inputs.
        let mut hiding = vec![0xa3, 0x06, 0xa4, 0x06];
        hiding.extend_from_slice(&many_inputs);
        let name = ModelInferRequest::full_name();
        assert_eq!(
            check_list_elements(&name, &hiding),
            Err(Refusal::Group(100))
        );
        // Inside an input (field 5, 4 bytes long): field 9 as a group.
        let nested = [0x2a, 0x04, 0x4b, 0x00, 0x4c, 0x00];
        assert_eq!(check_list_elements(&name, &nested), Err(Refusal::Group(9)));
        assert_eq!(
            Refusal::Group(9).to_string(),
            "field 9 is a protobuf group, which no message of this API has"
        );
    }

    #[test]
    fn the_services_requests_are_counted_and_their_responses_are_not() {
        for name in [
            "lmserve.v1.EmbedRequest",
            "lmserve.v1.GenerateRequest",
            "lmserve.v1.SetRouteRequest",
            "inference.ModelInferRequest",
        ] {
            assert!(schema().requests.contains(name), "{name}");
        }
        for name in [
            "inference.ModelInferRequest.InferInputTensor",
            "inference.ModelInferRequest.ParametersEntry",
        ] {
            assert!(schema().messages.contains_key(name), "{name}");
        }
        let tokens = TokenizeResponse {
            tokens: vec![Default::default(); MAX_LIST_ELEMENTS + 1],
            ..Default::default()
        };
        assert_eq!(check(&tokens), Ok(()));
    }
}
