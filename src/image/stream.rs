//! Layer byte streams: decompression chosen by sniffing the magic bytes (gzip, possibly
//! multi-member; zstd, possibly multi-frame with skippable frames; or plain tar), and a guard
//! that bounds tar extension headers before the tar parser reads them into memory.

use std::io::{self, BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use ruzstd::decoding::{
    BlockDecodingStrategy, FrameDecoder,
    errors::{FrameDecoderError, ReadFrameHeaderError},
};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps `inner` in the decompressor its first bytes call for.
pub fn decompressed<'a, R: Read + 'a>(inner: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(64 * 1024, inner);
    let head = buffered.fill_buf()?;
    if head.starts_with(GZIP_MAGIC) {
        Ok(Box::new(MultiGzDecoder::new(buffered)))
    } else if head.starts_with(ZSTD_MAGIC) {
        Ok(Box::new(Zstd {
            source: buffered,
            decoder: FrameDecoder::new(),
            in_frame: false,
        }))
    } else {
        Ok(Box::new(buffered))
    }
}

/// Whether `head` starts like a compressed stream.
pub fn is_compressed(head: &[u8]) -> bool {
    head.starts_with(GZIP_MAGIC) || head.starts_with(ZSTD_MAGIC)
}

/// A zstd stream of any number of frames (ruzstd decodes one frame per `init`).
struct Zstd<R> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.in_frame {
                if self.source.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.init(&mut self.source) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        io::copy(
                            &mut (&mut self.source).take(u64::from(length)),
                            &mut io::sink(),
                        )?;
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(format!("zstd: {e}"))),
                }
            }
            while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(|e| io::Error::other(format!("zstd: {e}")))?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.in_frame = false;
        }
    }
}

const BLOCK: u64 = 512;

/// Follows the tar stream's block structure exactly as the `tar` crate does (header, size
/// overridden by a preceding PAX `size`, data rounded up to 512) and fails when a GNU long
/// name/link or PAX extension header is larger than `max_header`: the `tar` crate reads those
/// wholly into memory, so an endless one would otherwise exhaust it.
#[derive(Debug)]
pub struct HeaderGuard<R> {
    inner: R,
    max_header: u64,
    /// Bytes of the current header block collected so far.
    header: Vec<u8>,
    /// Bytes of data still to pass before the next header.
    skip: u64,
    /// The PAX extension being collected (to learn a `size` override), if any.
    pax: Option<Vec<u8>>,
    /// Data bytes of the current PAX extension still to collect.
    pax_left: u64,
    /// The size override for the next entry.
    pax_size: Option<u64>,
    done: bool,
}

impl<R: Read> HeaderGuard<R> {
    /// Guards `inner`.
    pub fn new(inner: R, max_header: u64) -> Self {
        HeaderGuard {
            inner,
            max_header,
            header: Vec::with_capacity(BLOCK as usize),
            skip: 0,
            pax: None,
            pax_left: 0,
            pax_size: None,
            done: false,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.done {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                if let Some(pax) = &mut self.pax {
                    let take = (self.pax_left.min(n as u64)) as usize;
                    pax.extend_from_slice(&bytes[..take]);
                    self.pax_left -= take as u64;
                }
                self.skip -= n as u64;
                bytes = &bytes[n..];
                if self.skip == 0 {
                    self.end_data();
                }
                continue;
            }
            let n = (BLOCK as usize - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == BLOCK as usize {
                self.on_header()?;
            }
        }
        Ok(())
    }

    fn end_data(&mut self) {
        if let Some(pax) = self.pax.take() {
            self.pax_size = tar::PaxExtensions::new(&pax)
                .filter_map(Result::ok)
                .filter(|e| e.key_bytes() == b"size")
                .filter_map(|e| e.value().ok().and_then(|v| v.parse().ok()))
                .last();
        }
    }

    fn on_header(&mut self) -> io::Result<()> {
        let block = std::mem::take(&mut self.header);
        if block.iter().all(|b| *b == 0) {
            // The end-of-archive marker: the tar crate stops reading headers here.
            self.done = true;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&block);
        let kind = header.entry_type();
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        let mut size = header.entry_size()?;
        if !extension && let Some(pax) = self.pax_size.take() {
            size = pax;
        }
        let buffered = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        if buffered && size > self.max_header {
            return Err(io::Error::other(format!(
                "tar extension header of {size} bytes exceeds the limit of {} bytes",
                self.max_header
            )));
        }
        if recognized && kind.is_pax_local_extensions() {
            self.pax = Some(Vec::with_capacity(size as usize));
            self.pax_left = size;
        }
        self.skip = size
            .checked_add(BLOCK - 1)
            .ok_or_else(|| io::Error::other("size overflow"))?
            & !(BLOCK - 1);
        if self.skip == 0 {
            self.end_data();
        }
        self.header = Vec::with_capacity(BLOCK as usize);
        Ok(())
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with_long_name(len: usize) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, "a".repeat(len), &b"abc"[..])
            .unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn long_headers_pass_under_the_limit_and_fail_over_it() {
        let bytes = tar_with_long_name(300);
        let mut ok = HeaderGuard::new(&bytes[..], 4096);
        io::copy(&mut ok, &mut io::sink()).unwrap();
        let bytes = tar_with_long_name(5000);
        let err = io::copy(&mut HeaderGuard::new(&bytes[..], 4096), &mut io::sink()).unwrap_err();
        assert!(
            err.to_string().contains("exceeds the limit of 4096 bytes"),
            "{err}"
        );
    }

    #[test]
    fn compressed_streams_are_sniffed() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello ").unwrap();
        let mut two = gz.finish().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"world").unwrap();
        two.extend(gz.finish().unwrap());
        let mut out = String::new();
        decompressed(&two[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
        let mut plain = String::new();
        decompressed(&b"plain"[..])
            .unwrap()
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, "plain");
    }
}
