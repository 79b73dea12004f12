//! The `/metrics` HTTP endpoint: hyper's HTTP/1.1 server, one request per connection.
//!
//! What it does: answers `GET` (and `HEAD`) `/metrics` with a fresh [`Scrape`], as OpenMetrics
//! when the `Accept` header asks for `application/openmetrics-text` (as Prometheus does) and as
//! the Prometheus text format 0.0.4 otherwise (curl, older scrapers). Any other path gets 404,
//! any other method 405; hyper answers malformed requests with 400 and oversized heads with 431.
//!
//! What it does not: TLS, authentication, HTTP/2, keep-alive, or anything but metrics.
//!
//! Bounds: a request head is at most [`REQUEST_HEAD_MAX_BYTES`] and must arrive within
//! [`REQUEST_HEAD_TIMEOUT`]; a connection lives at most [`CONNECTION_TIMEOUT`]; at most
//! [`CONNECTIONS_MAX_COUNT`] connections are served at once, others wait in the kernel's
//! backlog. Bad requests never disturb the daemon.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::Scrape;

/// The largest request head (request line and headers) read; hyper's smallest buffer limit.
pub const REQUEST_HEAD_MAX_BYTES: usize = 8 << 10;
/// How long a client may take to send its request head.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may live, whatever it does (a reader too slow to take its answer).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections served at once.
pub const CONNECTIONS_MAX_COUNT: usize = 16;
/// Headers accepted in one request.
const REQUEST_HEADERS_MAX_COUNT: usize = 32;

/// The OpenMetrics text format's content type.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What makes a [`Scrape`] of the daemon at each request.
type Scraper = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// Serves `GET /metrics` on `listener` until the runtime stops; `scrape` takes the metrics.
pub async fn serve(listener: TcpListener, scrape: Scraper) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .max_buf_size(REQUEST_HEAD_MAX_BYTES)
        .max_headers(REQUEST_HEADERS_MAX_COUNT);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX_COUNT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (http, scrape) = (http.clone(), scrape.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let answer = answer(&request, scrape.as_ref());
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            // An error here is the client's (a malformed request, a hang-up): nothing to do.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// Binds `addr` and serves metrics on it; returns the bound address.
pub async fn start(addr: SocketAddr, scrape: Scraper) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, scrape));
    Ok(bound)
}

/// The response to one request.
fn answer(request: &Request<Incoming>, scrape: &(dyn Fn() -> Scrape + Send + Sync)) -> Response<String> {
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "ferry serves only /metrics here\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "expected GET /metrics\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let scrape = scrape();
    let (content_type, text) = if accepts_openmetrics(request.headers()) {
        (OPENMETRICS_CONTENT_TYPE, scrape.openmetrics())
    } else {
        (prometheus_client::encoding::prometheus_text::CONTENT_TYPE, scrape.prometheus_text())
    };
    match text {
        Ok(text) => with_content_type(StatusCode::OK, content_type, text),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "could not encode the metrics\n"),
    }
}

/// Whether the `Accept` header lists OpenMetrics text with a quality above 0.
fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    let ranges = headers.get_all(header::ACCEPT).iter().filter_map(|value| value.to_str().ok());
    ranges.flat_map(|value| value.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let is_openmetrics =
            parts.next().is_some_and(|media| media.eq_ignore_ascii_case("application/openmetrics-text"));
        let refused =
            parts.any(|param| param.strip_prefix("q=").is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0)));
        is_openmetrics && !refused
    })
}

fn plain(status: StatusCode, body: &str) -> Response<String> {
    with_content_type(status, "text/plain; charset=utf-8", body.to_owned())
}

fn with_content_type(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn ask(addr: SocketAddr, request: Vec<u8>) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes_and_refuses_anything_else() {
        let addr = start("127.0.0.1:0".parse().unwrap(), Arc::new(|| super::super::render(&[], 5))).await.unwrap();
        let ok = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("content-type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("\nferry_bytes_received_total 5\n") && !ok.contains("# EOF"), "{ok}");
        assert!(ask(addr, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 404"));
        assert!(ask(addr, b"POST /metrics HTTP/1.1\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 405"));
        assert!(ask(addr, b"\xff\x00garbage\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 400"));
        assert!(ask(addr, vec![b'G'; 20_000]).await.starts_with("HTTP/1.1 431"));
        // Still serving after all that.
        assert!(ask(addr, b"GET /metrics HTTP/1.0\r\n\r\n".to_vec()).await.starts_with("HTTP/1.0 200 OK"));
    }

    #[tokio::test]
    async fn prometheus_gets_openmetrics() {
        let addr = start("127.0.0.1:0".parse().unwrap(), Arc::new(|| super::super::render(&[], 5))).await.unwrap();
        // The Accept header Prometheus sends by default.
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.6,\
            application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1\r\n\r\n";
        let ok = ask(addr, request.to_vec()).await;
        assert!(ok.contains("content-type: application/openmetrics-text; version=1.0.0"), "{ok}");
        assert!(ok.contains("\nferry_bytes_received_total 5\n") && ok.ends_with("# EOF\n"), "{ok}");
    }

    #[test]
    fn openmetrics_is_chosen_only_when_asked_for() {
        let accept = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, HeaderValue::from_static(value));
            accepts_openmetrics(&headers)
        };
        assert!(accept("application/openmetrics-text; version=1.0.0"));
        assert!(accept("text/plain;q=0.5, Application/OpenMetrics-Text;q=0.9"));
        assert!(!accept("text/plain; version=0.0.4"));
        assert!(!accept("application/openmetrics-text;q=0"));
        assert!(!accept("*/*"));
        assert!(!accepts_openmetrics(&HeaderMap::new()));
    }
}
