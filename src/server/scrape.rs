//! The optional scrape listener (`metrics.listen`): `GET /metrics` without a token, for a
//! Prometheus on a trusted network, apart from the API. It serves one connection at a time
//! with short timeouts: scrapers are few and patient, and nothing else is served here.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{api::App, metrics::text::CONTENT_TYPE};

/// How long a scraper may take to send its request and take the answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;

/// Serves scrapes until `stop` is set (and the listener woken by a connection).
pub fn serve(listener: TcpListener, app: Arc<App>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => {
                if let Err(err) = answer(&app, stream) {
                    log::debug!("metrics scrape failed: {err}");
                }
            }
            Err(err) => {
                log::warn!("cannot accept a metrics connection: {err}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer(app: &App, mut stream: TcpStream) -> io::Result<()> {
    let arrived = Instant::now();
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next(), parts.next().map(|p| p.split('?').next()));
    let (status, reason, kind, body) = match (method, path) {
        (Some("GET"), Some(Some("/metrics" | "/api/v1/metrics"))) => {
            (200, "OK", CONTENT_TYPE, app.metrics_text())
        }
        _ => (404, "Not Found", "text/plain", "not found\n".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    app.metrics.request("scrape", status, arrived.elapsed());
    Ok(())
}

/// Reads up to the end of the request head.
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buffer = [0; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("request head too large"));
        }
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
