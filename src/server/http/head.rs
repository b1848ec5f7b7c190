//! Request heads: bounded like nginx's (a line at most [`MAX_LINE`] bytes, the head at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields), parsed with httparse and checked for what
//! RFC 9112 calls unrecoverable framing errors (invalid or repeated `Content-Length`, both
//! `Content-Length` and `Transfer-Encoding`, an unknown transfer coding). Such a request gets
//! an answer and the connection is closed: nothing after it is read as another request.

/// Longest line of a head (the request line or one header field).
pub const MAX_LINE: usize = 8 << 10;
/// Longest head.
pub const MAX_HEAD: usize = 32 << 10;
/// Most header fields.
pub const MAX_HEADERS: usize = 100;

/// A request method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
    /// Any other method (a valid token).
    Other(String),
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Other(other) => other,
        })
    }
}

impl Method {
    fn parse(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        }
    }
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes (0 without either header).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target (ASCII).
    pub target: String,
    /// Header fields with lower-case names, in order.
    pub headers: Vec<(String, String)>,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Upgrade: websocket`.
    pub websocket: bool,
    /// Bytes the head took, up to and including the empty line.
    pub length: usize,
}

impl Head {
    /// The first value of a header field (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }

    /// The target's path (without the query).
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(&self.target, |(path, _)| path)
    }
}

/// A request that is answered with `status` and then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status of the answer.
    pub status: u16,
    /// Why, for the answer's body.
    pub reason: &'static str,
}

fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete (and within the
/// bounds), the head once complete, or why the request is refused.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    check_lines(buf)?;
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let length = match request.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(refuse(431, "the request head is too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "too many header fields"));
        }
        Err(_) => return Err(refuse(400, "malformed request head")),
    };
    if length > MAX_HEAD {
        return Err(refuse(431, "the request head is too large"));
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(refuse(400, "malformed request line"));
    };
    if !target.is_ascii() || target.is_empty() {
        return Err(refuse(400, "the request target is not ASCII"));
    }
    let mut headers = Vec::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let Ok(value) = std::str::from_utf8(field.value) else {
            return Err(refuse(400, "a header value is not UTF-8"));
        };
        headers.push((field.name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let framing = framing(&headers, version)?;
    let tokens = |name: &'static str| {
        headers
            .iter()
            .filter(move |(field, _)| field == name)
            .flat_map(|(_, value)| value.split(','))
            .map(|token| token.trim().to_ascii_lowercase())
    };
    let close = tokens("connection").any(|token| token == "close");
    let keep = tokens("connection").any(|token| token == "keep-alive");
    let keep_alive = !close && (version == 1 || keep);
    let expect_continue = tokens("expect").any(|token| token == "100-continue");
    let websocket = tokens("upgrade").any(|token| token == "websocket");
    Ok(Some(Head {
        method: Method::parse(method),
        target: target.to_owned(),
        headers,
        framing,
        keep_alive,
        expect_continue,
        websocket,
        length,
    }))
}

/// Refuses a line longer than [`MAX_LINE`], complete or not: 414 for the request line, 431
/// for a header field.
fn check_lines(buf: &[u8]) -> Result<(), Refusal> {
    let head = match buf.windows(4).position(|window| window == b"\r\n\r\n") {
        Some(end) => &buf[..end],
        None => buf,
    };
    for (index, line) in head.split(|&byte| byte == b'\n').enumerate() {
        if line.len() > MAX_LINE {
            return Err(if index == 0 {
                refuse(414, "the request line is too long")
            } else {
                refuse(431, "a header field is too long")
            });
        }
    }
    Ok(())
}

/// The body's framing (RFC 9112 section 6.3).
fn framing(headers: &[(String, String)], version: u8) -> Result<Framing, Refusal> {
    let mut lengths = headers.iter().filter(|(name, _)| name == "content-length");
    let encodings: Vec<&str> = headers
        .iter()
        .filter(|(name, _)| name == "transfer-encoding")
        .map(|(_, value)| value.as_str())
        .collect();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => return Err(refuse(400, "more than one Content-Length")),
        (Some((_, value)), None) => {
            let digits = !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit());
            match value.parse::<u64>() {
                Ok(length) if digits => Some(length),
                _ => return Err(refuse(400, "invalid Content-Length")),
            }
        }
    };
    if encodings.is_empty() {
        return Ok(Framing::Length(length.unwrap_or(0)));
    }
    if length.is_some() {
        return Err(refuse(400, "both Content-Length and Transfer-Encoding"));
    }
    if version == 0 {
        return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
    }
    let codings: Vec<String> = encodings
        .iter()
        .flat_map(|value| value.split(','))
        .map(|coding| coding.trim().to_ascii_lowercase())
        .collect();
    match codings.as_slice() {
        [only] if only == "chunked" => Ok(Framing::Chunked),
        [.., last] if last != "chunked" => Err(refuse(400, "chunked is not the final coding")),
        _ => Err(refuse(501, "unsupported transfer coding")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str) -> u16 {
        match parse(head.as_bytes()) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(refusal) => refusal.status,
        }
    }

    #[test]
    fn complete_heads_parse_and_partial_ones_wait() {
        let head = parse(b"PUT /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(head.method, Method::Put);
        assert_eq!(head.path(), "/a");
        assert_eq!(head.framing, Framing::Length(5));
        assert_eq!(head.length, 51);
        assert!(head.keep_alive);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n"), 0);
        let old = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!old.keep_alive);
    }

    #[test]
    fn framing_errors_are_refused() {
        for length in ["-1", "99999999999999999999", "1, 2", "+5", "", "0x10"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {length}\r\n\r\n");
            assert_eq!(status(&head), 400, "{length:?}");
        }
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            200
        );
    }

    #[test]
    fn oversized_heads_and_non_ascii_targets_are_refused() {
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_LINE));
        assert_eq!(status(&long_line), 414);
        let long_field = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_LINE));
        assert_eq!(status(&long_field), 431);
        let many: String = (0..200).map(|i| format!("X-{i}: a\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let big: String = (0..80)
            .map(|i| format!("X-{i}: {}\r\n", "a".repeat(500)))
            .collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{big}")), 431);
        assert_eq!(
            parse("GET /é HTTP/1.1\r\n\r\n".as_bytes())
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(status("\x16\x03\x01 garbage\r\n\r\n"), 400);
    }
}
