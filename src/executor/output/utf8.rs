//! Turns a byte stream into text chunk by chunk without mangling characters split across
//! chunks; invalid bytes become U+FFFD.

/// Incremental UTF-8 decoder for one output stream.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    /// The start of a character whose remaining bytes have not arrived yet (at most 3 bytes).
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Decodes the next chunk; an incomplete character at its end is kept for the next one.
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(chunk);
        let mut text = String::with_capacity(bytes.len());
        let mut rest = bytes.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    return text;
                }
                Err(err) => {
                    let (valid, invalid) = rest.split_at(err.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match err.error_len() {
                        Some(length) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &invalid[length..];
                        }
                        None => {
                            self.pending = invalid.to_vec();
                            return text;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of the stream (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_chunks_survive() {
        let text = "grüße 🦀";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut stream = Utf8Stream::default();
            let mut out = stream.decode(&bytes[..split]);
            out.push_str(&stream.decode(&bytes[split..]));
            out.push_str(&stream.finish());
            assert_eq!(out, text, "split at {split}");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut stream = Utf8Stream::default();
        assert_eq!(stream.decode(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(stream.decode(b"\xf0\x9f"), "");
        assert_eq!(stream.finish(), "\u{fffd}");
        assert_eq!(stream.decode(b"\xe2\x82\xac"), "€");
    }
}
