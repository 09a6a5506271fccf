//! Which graph tensor plays which role in a model: what to feed and what to read back.

/// A tensor that is produced by one step and fed back at the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePair {
    pub output: String,
    pub input: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bindings {
    pub input_ids: String,
    pub attention_mask: Option<String>,
    pub position_ids: Option<String>,
    /// The position an encoder row's first token takes in `position_ids`: 0, or for RoBERTa
    /// and the models built like it the padding id plus one, where their position table starts.
    pub first_position: i64,
    /// Segment ids: the tokenizer's token types (a text pair's second text is type 1), or zeros.
    pub token_type_ids: Option<String>,
    /// Next-token logits `[B,T,V]` for decoders and RNNs; class logits `[B,C]` for encoders.
    pub logits: Option<String>,
    /// Per-token states `[B,T,H]` for embeddings.
    pub hidden_states: Option<String>,
    /// An embedding the graph already pooled, `[B,D]`.
    pub pooled_output: Option<String>,
    pub state: Vec<StatePair>,
    /// Each row's length minus one, `[batch]` int32, and the longest row's length, a scalar:
    /// what a graph that writes its KV cache in place (onnxruntime's GroupQueryAttention over a
    /// buffer bound as both past and present) takes instead of a mask and positions.
    pub seqlens_k: Option<String>,
    pub total_sequence_length: Option<String>,
}

impl Bindings {
    /// Whether the server knows what to feed the graph input `name`.
    pub fn feeds(&self, name: &str) -> bool {
        self.input_ids == name
            || self.attention_mask.as_deref() == Some(name)
            || self.position_ids.as_deref() == Some(name)
            || self.token_type_ids.as_deref() == Some(name)
            || self.seqlens_k.as_deref() == Some(name)
            || self.total_sequence_length.as_deref() == Some(name)
            || self.state.iter().any(|pair| pair.input == name)
    }

    /// Whether the graph takes row lengths and writes its cache into the buffers it is fed.
    pub fn writes_cache_in_place(&self) -> bool {
        self.seqlens_k.is_some() && self.total_sequence_length.is_some() && self.has_state()
    }

    /// Whether the model carries state (a KV cache or a recurrent state) between steps.
    pub fn has_state(&self) -> bool {
        !self.state.is_empty()
    }
}
