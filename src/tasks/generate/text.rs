//! Incremental detokenization: turns generated ids into text deltas that are always whole UTF-8
//! characters and never show a stop sequence, or any part of one, to the client. Special tokens
//! (a forced BOS, a language code, an end-of-turn marker) are left out of the text unless the
//! caller keeps them, as transformers' pipelines (`skip_special_tokens=True`) and vLLM do.

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
    keep_special_tokens: bool,
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
    pub fn new(prompt: &[u32], stops: Vec<String>, keep_special_tokens: bool) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            held: String::new(),
            stops,
            keep_special_tokens,
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
        let mut text = std::mem::take(&mut self.held);
        if self.read_offset < self.ids.len() {
            let window = self.decode_window(tokenizer);
            if let Some(tail) = window.unread() {
                text.push_str(tail);
            }
        }
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        text
    }

    /// The already-shown context tokens decoded, and the same with the unread tokens after it:
    /// what the unread tokens add is the difference.
    fn decode_window(&self, tokenizer: &Tokenizer) -> Window {
        let skip_special = !self.keep_special_tokens;
        let decode = |ids: &[u32]| tokenizer.decode(ids, skip_special).unwrap_or_default();
        let read = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        // A prompt can end inside a character (ids cut from an earlier generation): its bytes
        // decode to U+FFFD there and to the whole character once the output completes it, so
        // the difference starts before them, and the character counts as new text. A U+FFFD
        // the unread tokens leave as it was is the prompt's own (the character itself, or
        // bytes nothing completes), which the difference starts after.
        // With byte fallback (SentencePiece), a byte token can also turn characters read whole
        // into one U+FFFD per byte, as decoding all the ids at once gives: the new text then
        // starts before them too, rather than inside one of them.
        let complete = if full.starts_with(&read) {
            read.len()
        } else {
            common_prefix_len(&read, &full)
        };
        let read_is_whole = complete == read.len();
        Window {
            read_is_whole,
            complete,
            full,
        }
    }

    /// What the unread tokens add, once the characters they end are complete; until then
    /// nothing, and (second) the complete text before the incomplete character, not yet read.
    fn decode_new(&mut self, tokenizer: &Tokenizer) -> (String, String) {
        let window = self.decode_window(tokenizer);
        let Some(new) = window.unread().filter(|new| !new.is_empty()) else {
            return (String::new(), String::new());
        };
        if new.ends_with(REPLACEMENT) {
            return (String::new(), new.trim_end_matches(REPLACEMENT).to_owned());
        }
        let new = new.to_owned();
        // The next window starts where this one's read text ended, unless that was inside a
        // character: decoded from there, the character's last bytes would read as U+FFFD.
        if window.read_is_whole {
            self.prefix_offset = self.read_offset;
        }
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

/// A window of ids decoded: the text up to the read offset, and with the unread tokens.
struct Window {
    /// Bytes of `full` the read tokens account for: their text less any incomplete character.
    complete: usize,
    /// Whether the read tokens ended on a character boundary.
    read_is_whole: bool,
    full: String,
}

impl Window {
    /// The text the unread tokens add.
    fn unread(&self) -> Option<&str> {
        self.full.get(self.complete..)
    }
}

/// Bytes of the whole characters `a` and `b` begin with alike.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((at, _), _)| at)
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
        let mut stream = TextStream::new(&[], vec![], false);
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
        let mut stream = TextStream::new(&[], vec!["END".into()], false);
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
        let mut stream = TextStream::new(&[], vec!["END".into()], false);
        assert_eq!(stream.push(&tokenizer, 0).text, "x");
        let delta = stream.push(&tokenizer, 3);
        assert_eq!(delta.stopped_by.as_deref(), Some("END"));
        assert_eq!(delta.text, "");
        // Without a stop, the incomplete character is still held back until the end.
        let mut stream = TextStream::new(&[], vec!["NOPE".into()], false);
        let shown = stream.push(&tokenizer, 0).text + &stream.push(&tokenizer, 3).text;
        assert_eq!(shown, "x");
        assert_eq!(shown + &stream.finish(&tokenizer), "xEND\u{FFFD}");
    }

    #[test]
    fn finish_releases_held_text() {
        let tokenizer = byte_tokenizer();
        let mut stream = TextStream::new(&[], vec!["STOP".into()], false);
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
        let mut stream = TextStream::new(&[], vec![], false);
        let mut shown: String = cut
            .iter()
            .map(|&id| stream.push(&tokenizer, id).text)
            .collect();
        assert!(!shown.contains(REPLACEMENT), "{shown:?}");
        shown.push_str(&stream.finish(&tokenizer));
        assert_eq!(shown, tokenizer.decode(cut, false).unwrap());
        assert!(shown.ends_with(REPLACEMENT), "{shown:?}");
    }

    #[test]
    fn a_prompt_that_ends_inside_a_character_gets_the_character_whole() {
        let tokenizer = byte_tokenizer();
        // The ids of an earlier output that the length limit cut inside the emoji.
        let all = ids(&tokenizer, "I love 😀 Hi");
        let emoji_end = (1..all.len())
            .find(|&end| {
                tokenizer
                    .decode(&all[..end], false)
                    .unwrap()
                    .ends_with('😀')
            })
            .unwrap();
        let cut = emoji_end - 1;
        assert!(
            tokenizer
                .decode(&all[..cut], false)
                .unwrap()
                .ends_with(REPLACEMENT),
            "the prompt must end inside the emoji"
        );
        let mut stream = TextStream::new(&all[..cut], vec![], false);
        let shown: String = all[cut..]
            .iter()
            .map(|&id| stream.push(&tokenizer, id).text)
            .collect();
        assert_eq!(shown + &stream.finish(&tokenizer), "😀 Hi");
    }

    #[test]
    fn a_replacement_character_ending_the_prompt_is_not_shown_again() {
        let tokenizer = byte_tokenizer();
        let mut cases: Vec<(Vec<u32>, Vec<u32>, &str)> = [
            ("bad \u{FFFD}", "ok then"),
            ("\u{FFFD}\u{FFFD}", "\u{FFFD}x"),
        ]
        .iter()
        .map(|&(prompt, output)| (ids(&tokenizer, prompt), ids(&tokenizer, output), output))
        .collect();
        // The character itself, then a character cut inside its bytes: the prompt's text ends
        // in two U+FFFD, and the output completes only the second.
        let all = ids(&tokenizer, "a \u{FFFD}\u{20AC} ok");
        let cut = (1..all.len())
            .find(|&end| tokenizer.decode(&all[..end], false).unwrap() == "a \u{FFFD}\u{FFFD}")
            .expect("a cut inside the euro sign");
        cases.push((all[..cut].to_vec(), all[cut..].to_vec(), "\u{20AC} ok"));
        for (prompt, output, added) in cases {
            let mut stream = TextStream::new(&prompt, vec![], false);
            let shown: String = output
                .iter()
                .map(|&id| stream.push(&tokenizer, id).text)
                .collect();
            assert_eq!(shown + &stream.finish(&tokenizer), added);
        }
    }

    /// A SentencePiece-style vocabulary with byte fallback, as Llama's: "<0xF0>" ... are bytes.
    fn byte_fallback_tokenizer() -> Tokenizer {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": true,
                      "vocab": {"\u2581Hi": 0, "<0xF0>": 1, "<0x9F>": 2, "<0x98>": 3,
                                "<0x80>": 4, "\u2581there": 5},
                      "merges": []}}"#;
        json.parse().unwrap()
    }

    #[test]
    fn a_byte_that_undoes_a_shown_character_loses_no_later_text() {
        // Byte fallback decodes a run of byte tokens with any invalid byte as one U+FFFD per
        // byte: the fifth byte turns the emoji already shown into five of them.
        let tokenizer = byte_fallback_tokenizer();
        let generated = [0, 1, 2, 3, 4, 4, 5];
        assert_eq!(
            tokenizer.decode(&generated, false).unwrap(),
            format!(" Hi{} there", "\u{FFFD}".repeat(5))
        );
        let mut stream = TextStream::new(&[], vec![], false);
        let shown: String = generated
            .iter()
            .map(|&id| stream.push(&tokenizer, id).text)
            .collect();
        // What was shown stays shown; what decoding gives from there on follows it.
        assert_eq!(
            shown + &stream.finish(&tokenizer),
            format!(" Hi\u{1F600}{} there", "\u{FFFD}".repeat(5))
        );
    }

    #[test]
    fn nothing_generated_after_such_a_prompt_shows_nothing() {
        let tokenizer = byte_tokenizer();
        let all = ids(&tokenizer, "ok 😀");
        let mut stream = TextStream::new(&all[..all.len() - 1], vec![], false);
        assert_eq!(stream.finish(&tokenizer), "");
    }

    #[test]
    fn special_tokens_are_left_out_of_the_text_unless_kept() {
        // The translator's start token is `<s>` (1); a forced BOS would be `<s>` again.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/repository/tiny-translator/1/tokenizer.json"
        );
        let tokenizer = Tokenizer::from_file(path).unwrap();
        let words = ids(&tokenizer, "la casa");
        let generated = [&[1], words.as_slice(), &[2]].concat();
        for (keep, expected) in [(false, "la casa"), (true, "<s>la casa</s>")] {
            let mut stream = TextStream::new(&[1], vec![], keep);
            let shown: String = generated
                .iter()
                .map(|&id| stream.push(&tokenizer, id).text)
                .collect();
            assert_eq!(shown + &stream.finish(&tokenizer), expected);
        }
    }

    /// A SentencePiece-style vocabulary (T5, Marian): a word's space is its `▁` marker, which
    /// the decoder drops at the start of the text.
    fn metaspace_tokenizer() -> Tokenizer {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<pad>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                        "split": true},
            "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "▁Das": 1, "▁Haus": 2},
                      "unk_token": "<pad>"}}"#;
        json.parse().unwrap()
    }

    #[test]
    fn a_start_token_does_not_give_the_first_word_a_space() {
        let tokenizer = metaspace_tokenizer();
        // The decoder starts from `<pad>`, as T5's and Marian's do.
        let mut stream = TextStream::new(&[0], vec![], false);
        let first = stream.push(&tokenizer, 1).text;
        let second = stream.push(&tokenizer, 2).text;
        assert_eq!((first.as_str(), second.as_str()), ("Das", " Haus"));
    }
}
