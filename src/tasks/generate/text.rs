//! Incremental detokenization: turns generated ids into text deltas that are always whole UTF-8
//! characters and never show a stop sequence, or any part of one, to the client.

use tokenizers::Tokenizer;

/// Prompt tokens decoded along with the output, so tokenizers that treat a leading word
/// differently (SentencePiece's space marker) decode the first output token as in context.
const PROMPT_CONTEXT_TOKENS: usize = 5;
/// What a byte-level decoder emits for an incomplete UTF-8 sequence.
const REPLACEMENT: char = '\u{FFFD}';

pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded text held back because it might begin a stop sequence.
    held: String,
    stops: Vec<String>,
}

/// What one new token adds to the text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextDelta {
    /// Text safe to show now; may be empty.
    pub text: String,
    /// The stop sequence that ended generation; its text and what follows are not shown.
    pub stopped_by: Option<String>,
}

impl TextStream {
    pub fn new(prompt: &[u32], stops: Vec<String>) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            held: String::new(),
            stops,
        }
    }

    /// Adds one generated token.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> TextDelta {
        self.ids.push(id);
        let (decoded, pending) = self.decode_new(tokenizer);
        self.held.push_str(&decoded);
        // A token can end a stop sequence and begin a character the next token completes: the
        // text before that character is searched too, or the stop would be found late, or
        // (should the sequence end first) shown.
        let searched = format!("{}{pending}", self.held);
        if let Some((at, stop)) = first_stop(&searched, &self.stops) {
            let text = searched[..at].to_owned();
            self.held.clear();
            return TextDelta {
                text,
                stopped_by: Some(stop),
            };
        }
        let keep = self.stop_prefix_len();
        let text = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        TextDelta {
            text,
            stopped_by: None,
        }
    }

    /// Ends the stream without a stop sequence: whatever was held back is shown, and so are the
    /// bytes of a character the last tokens left incomplete, as U+FFFD (what decoding all the
    /// ids at once gives), rather than dropped.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let (prefix, full) = self.decode_window(tokenizer);
        let mut text = std::mem::take(&mut self.held);
        if let Some(tail) = full.get(prefix.len()..) {
            text.push_str(tail);
        }
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        text
    }

    /// The already-shown context tokens decoded, and the same with the unread tokens after it:
    /// what the unread tokens add is the difference.
    fn decode_window(&self, tokenizer: &Tokenizer) -> (String, String) {
        let decode = |ids: &[u32]| tokenizer.decode(ids, false).unwrap_or_default();
        (
            decode(&self.ids[self.prefix_offset..self.read_offset]),
            decode(&self.ids[self.prefix_offset..]),
        )
    }

    /// What the unread tokens add, once the characters they end are complete; until then
    /// nothing, and (second) the complete text before the incomplete character, not yet read.
    fn decode_new(&mut self, tokenizer: &Tokenizer) -> (String, String) {
        let (prefix, full) = self.decode_window(tokenizer);
        let Some(new) = full.get(prefix.len()..).filter(|new| !new.is_empty()) else {
            return (String::new(), String::new());
        };
        if new.ends_with(REPLACEMENT) {
            return (String::new(), new.trim_end_matches(REPLACEMENT).to_owned());
        }
        let new = new.to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        (new, String::new())
    }

    /// Length of the longest tail of the held text that could still grow into a stop sequence.
    fn stop_prefix_len(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1) {
                if end > keep && self.held.ends_with(&stop[..end]) {
                    keep = end;
                }
            }
        }
        keep
    }
}

/// The earliest of `stops` in `text`, with its byte position.
fn first_stop(text: &str, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter_map(|stop| text.find(stop.as_str()).map(|at| (at, stop.clone())))
        .min_by_key(|(at, _)| *at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed GPT-2-style byte-level BPE: characters outside its corpus split into bytes.
    fn byte_tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/repository/tiny-gpt2/1/tokenizer.json"
        );
        Tokenizer::from_file(path).unwrap()
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn holds_split_characters_until_complete() {
        let tokenizer = byte_tokenizer();
        let text = "so 😀 and 雪";
        let ids = ids(&tokenizer, text);
        let mut stream = TextStream::new(&[], vec![]);
        let deltas: Vec<String> = ids
            .iter()
            .map(|&id| stream.push(&tokenizer, id).text)
            .collect();
        assert!(
            deltas.iter().all(|d| !d.contains(REPLACEMENT)),
            "{deltas:?}"
        );
        assert!(
            deltas.iter().any(String::is_empty),
            "a split character is held: {deltas:?}"
        );
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn stop_sequences_never_leak() {
        let tokenizer = byte_tokenizer();
        let mut stream = TextStream::new(&[], vec!["END".into()]);
        let mut shown = String::new();
        let mut stopped = None;
        for id in ids(&tokenizer, "abc ENxEND tail") {
            let delta = stream.push(&tokenizer, id);
            shown.push_str(&delta.text);
            assert!(
                !shown.contains("EN") || shown.ends_with("ENx") || shown.contains("ENx"),
                "{shown:?}"
            );
            if delta.stopped_by.is_some() {
                stopped = delta.stopped_by;
                break;
            }
        }
        assert_eq!(shown, "abc ENx");
        assert_eq!(stopped.as_deref(), Some("END"));
    }

    /// A byte-level vocabulary whose token 3 is "END" and the first byte of a three-byte
    /// character ('â' is byte 0xE2 in byte-level BPE), as merged tokens can be.
    fn split_tokenizer() -> Tokenizer {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false,
                      "vocab": {"x": 0, "E": 1, "N": 2, "ENDâ": 3, "Ģ": 4},
                      "merges": []}}"#;
        json.parse().unwrap()
    }

    #[test]
    fn a_stop_ending_in_a_token_that_begins_a_character_is_found_at_that_token() {
        let tokenizer = split_tokenizer();
        assert_eq!(tokenizer.decode(&[0, 3], false).unwrap(), "xEND\u{FFFD}");
        let mut stream = TextStream::new(&[], vec!["END".into()]);
        assert_eq!(stream.push(&tokenizer, 0).text, "x");
        let delta = stream.push(&tokenizer, 3);
        assert_eq!(delta.stopped_by.as_deref(), Some("END"));
        assert_eq!(delta.text, "");
        // Without a stop, the incomplete character is still held back until the end.
        let mut stream = TextStream::new(&[], vec!["NOPE".into()]);
        let shown = stream.push(&tokenizer, 0).text + &stream.push(&tokenizer, 3).text;
        assert_eq!(shown, "x");
        assert_eq!(shown + &stream.finish(&tokenizer), "xEND\u{FFFD}");
    }

    #[test]
    fn finish_releases_held_text() {
        let tokenizer = byte_tokenizer();
        let mut stream = TextStream::new(&[], vec!["STOP".into()]);
        let mut shown = String::new();
        for id in ids(&tokenizer, "go ST") {
            shown.push_str(&stream.push(&tokenizer, id).text);
        }
        assert_eq!(shown, "go ");
        shown.push_str(&stream.finish(&tokenizer));
        assert_eq!(shown, "go ST");
    }

    #[test]
    fn finish_shows_an_incomplete_character_as_decoding_does() {
        let tokenizer = byte_tokenizer();
        let all = ids(&tokenizer, "ok 😀");
        // Cut inside the emoji's bytes, as max_new_tokens can.
        let cut = &all[..all.len() - 1];
        let mut stream = TextStream::new(&[], vec![]);
        let mut shown: String = cut
            .iter()
            .map(|&id| stream.push(&tokenizer, id).text)
            .collect();
        assert!(!shown.contains(REPLACEMENT), "{shown:?}");
        shown.push_str(&stream.finish(&tokenizer));
        assert_eq!(shown, tokenizer.decode(cut, false).unwrap());
        assert!(shown.ends_with(REPLACEMENT), "{shown:?}");
    }
}
