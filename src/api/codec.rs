//! The protobuf codec of lmserve's services: prost's, except that a message which does not
//! decode (invalid UTF-8 in a string, a truncated field, a wrong wire type) is the client's
//! doing and answered INVALID_ARGUMENT, where tonic's default says INTERNAL. The reason is
//! bounded, as every echoed value is. Before decoding, the request's lists are counted on the
//! wire (`api::wire`), so that no message decodes into more memory than its checks allow.

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Longest part of a decode error passed back to the client.
const MAX_REASON_BYTES: usize = 200;

#[derive(Debug, Clone, Copy)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = StrictEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        StrictEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct StrictEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for StrictEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows as needed, so encoding cannot run out of room.
        item.encode(buf)
            .map_err(|error| Status::internal(format!("encoding a response: {error}")))
    }
}

#[derive(Debug)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Name + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf;
        // tonic hands over the whole message in one buffer.
        let bytes = buf.chunk();
        if bytes.len() == buf.remaining() {
            super::wire::check_list_elements(&U::full_name(), bytes)
                .map_err(|refusal| Status::invalid_argument(refusal.to_string()))?;
        }
        U::decode(buf).map(Some).map_err(|error| {
            let reason = error.to_string();
            let reason = crate::error::bounded(&reason, MAX_REASON_BYTES);
            Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {reason}"
            ))
        })
    }
}
