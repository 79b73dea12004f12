//! Prometheus metrics of a node daemon, served on `metrics_addr` (`GET /metrics`).
//!
//! What it does: keeps this process's counters (chunk bytes sent, migrations failed by error
//! kind), renders them with gauges read from the daemon at scrape time (migrations by role and
//! phase, bytes received, WAL lag and held WAL bytes per migration) in the Prometheus text
//! format, and serves them over a minimal HTTP/1.1 endpoint.
//!
//! It also keeps a histogram of the write pauses of this node's released cut-overs
//! (`ferry_fence_pause_us`, fixed buckets from 100 us to 10 s).
//!
//! What it does not: push to anyone, or keep history.
//!
//! Bounds: a request head is read up to [`REQUEST_HEAD_MAX_BYTES`] within
//! [`REQUEST_TIMEOUT`]; at most [`CONNECTIONS_MAX_COUNT`] scrapes are served at once, others
//! wait in the kernel's backlog. Bad requests get 400/404 and never disturb the daemon.
//!
//! Invariants: a scrape reads the daemon's state and changes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_wire::api::{MigrationStatus, Phase, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const REQUEST_HEAD_MAX_BYTES: usize = 8 << 10;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTIONS_MAX_COUNT: usize = 16;

/// Chunk bytes this process wrote to QUIC streams as a source (resent bytes included).
pub static BYTES_SENT_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Upper bounds (us) of the pause histogram's buckets; a last `+Inf` bucket follows.
pub const PAUSE_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000, 10_000_000];

/// Counts per bucket (the last is `+Inf`), then the sum and count.
static PAUSES: Mutex<([u64; 13], u64, u64)> = Mutex::new(([0; 13], 0, 0));

/// Records one released cut-over's write pause.
pub fn observe_pause_us(pause_us: u64) {
    let mut pauses = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
    let bucket = PAUSE_BUCKETS_US.iter().position(|bound| pause_us <= *bound).unwrap_or(PAUSE_BUCKETS_US.len());
    if let Some(count) = pauses.0.get_mut(bucket) {
        *count += 1;
    }
    pauses.1 = pauses.1.saturating_add(pause_us);
    pauses.2 += 1;
}

static ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts one failed migration (either role) under `kind`.
pub fn count_error(kind: &'static str) {
    *ERRORS.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default() += 1;
}

/// A failure reason's kind, for the errors metric: a small fixed set, never the free text.
pub fn error_kind_of(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("aborted") {
        "aborted"
    } else if r.contains("refused") || r.contains("at capacity") || r.contains("disk space") {
        "refused"
    } else if r.contains("checksum") || r.contains("crc32c") {
        "checksum"
    } else if r.contains("changed") {
        "source_changed"
    } else if r.contains("connection") || r.contains("timed out") {
        "connection"
    } else if r.contains("cannot read") || r.contains("cannot write") || r.contains("storage") {
        "storage"
    } else {
        "other"
    }
}

const PHASES: [Phase; 5] = [Phase::BaseCopy, Phase::WalCatchUp, Phase::AtomicCutOver, Phase::Completed, Phase::Failed];

/// The metrics text for the daemon's migrations now.
pub fn render(statuses: &[MigrationStatus], bytes_received_total: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP ferry_bytes_sent_total Chunk bytes sent by this process as a source.");
    let _ = writeln!(out, "# TYPE ferry_bytes_sent_total counter");
    let _ = writeln!(out, "ferry_bytes_sent_total {}", BYTES_SENT_TOTAL.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "# HELP ferry_rdma_fallbacks_total Times transport = \"rdma\" was configured and QUIC used instead."
    );
    let _ = writeln!(out, "# TYPE ferry_rdma_fallbacks_total counter");
    let fallbacks = crate::transfer::rdma::select::FALLBACKS_TOTAL.load(Ordering::Relaxed);
    let _ = writeln!(out, "ferry_rdma_fallbacks_total {fallbacks}");
    let _ = writeln!(out, "# HELP ferry_bytes_received_total Chunk bytes received by this process as a target (migrations it still lists).");
    let _ = writeln!(out, "# TYPE ferry_bytes_received_total counter");
    let _ = writeln!(out, "ferry_bytes_received_total {bytes_received_total}");
    let _ = writeln!(out, "# HELP ferry_migrations Migrations on this node by role and phase.");
    let _ = writeln!(out, "# TYPE ferry_migrations gauge");
    for role in [Role::Source, Role::Target] {
        for phase in PHASES {
            let count = statuses.iter().filter(|s| s.role == role && s.phase == phase).count();
            let _ = writeln!(out, "ferry_migrations{{role=\"{}\",phase=\"{phase:?}\"}} {count}", role_name(role));
        }
    }
    let _ = writeln!(
        out,
        "# HELP ferry_wal_lag_lsn Source tip LSN minus the target's durable LSN, per running source migration."
    );
    let _ = writeln!(out, "# TYPE ferry_wal_lag_lsn gauge");
    let _ = writeln!(
        out,
        "# HELP ferry_held_wal_bytes Bytes of WAL segments held (hard-linked) per running source migration."
    );
    let _ = writeln!(out, "# TYPE ferry_held_wal_bytes gauge");
    for s in statuses.iter().filter(|s| s.role == Role::Source && !s.phase.is_final()) {
        let id = escape(&s.migration_id);
        if let Some(lag) = s.wal.lag_lsn() {
            let _ = writeln!(out, "ferry_wal_lag_lsn{{migration_id=\"{id}\"}} {lag}");
        }
        let _ = writeln!(out, "ferry_held_wal_bytes{{migration_id=\"{id}\"}} {}", s.wal.held_bytes);
    }
    let _ = writeln!(out, "# HELP ferry_fence_pause_us Write pauses of released cut-overs, in microseconds.");
    let _ = writeln!(out, "# TYPE ferry_fence_pause_us histogram");
    {
        let pauses = *PAUSES.lock().unwrap_or_else(|e| e.into_inner());
        let mut cumulative = 0u64;
        for (index, count) in pauses.0.iter().enumerate() {
            cumulative += count;
            let bound = PAUSE_BUCKETS_US.get(index).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "ferry_fence_pause_us_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "ferry_fence_pause_us_sum {}", pauses.1);
        let _ = writeln!(out, "ferry_fence_pause_us_count {}", pauses.2);
    }
    let _ = writeln!(out, "# HELP ferry_errors_total Failed migrations by error kind.");
    let _ = writeln!(out, "# TYPE ferry_errors_total counter");
    for (kind, count) in ERRORS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "ferry_errors_total{{kind=\"{kind}\"}} {count}");
    }
    out
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// A label value with `\`, `"` and newlines escaped (migration ids cannot hold them today).
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until the runtime stops; `scrape` renders the body.
pub async fn serve(listener: TcpListener, scrape: Arc<dyn Fn() -> String + Send + Sync>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX_COUNT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
                Ok(Some(head)) if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") => {
                    response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &scrape())
                }
                Ok(Some(head)) if head.starts_with(b"GET ") => {
                    response("404 Not Found", "text/plain", "ferry serves only /metrics here\n")
                }
                Ok(_) => response("400 Bad Request", "text/plain", "expected GET /metrics\n"),
                Err(_) => return,
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(answer.as_bytes())).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds `addr` and serves metrics on it; returns the bound address.
pub async fn start(addr: SocketAddr, scrape: Arc<dyn Fn() -> String + Send + Sync>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, scrape));
    Ok(bound)
}

/// Reads up to the end of the request head; `None` when it is over the limit or cut short.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return (!head.is_empty()).then_some(head);
        }
        head.extend_from_slice(buf.get(..n)?);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > REQUEST_HEAD_MAX_BYTES {
            return None;
        }
    }
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_wire::api::WalProgress;

    fn status(id: &str, role: Role, phase: Phase) -> MigrationStatus {
        MigrationStatus {
            migration_id: id.into(),
            role,
            phase,
            vshard_id: Some(1),
            peer_node: None,
            bytes_transferred: 0,
            bytes_total: 0,
            bytes_resent: 0,
            files_staged: 0,
            files_total: 0,
            wal: WalProgress { start_lsn: Some(11), current_lsn: Some(40), source_lsn: Some(50), held_bytes: 4096 },
            rate_limit_bytes_per_sec: 0,
            throughput_bytes_per_sec: 0,
            pause_duration_us: None,
            pause: None,
            fence_started_at_ns: None,
            final_lsn: None,
            reason: None,
            staging_state: None,
            started_at_unix_ms: 0,
            updated_at_unix_ms: 0,
            no_progress_for_s: None,
        }
    }

    #[test]
    fn the_text_counts_phases_and_reports_lag_and_held_bytes() {
        count_error("aborted");
        let text = render(
            &[
                status("m1", Role::Source, Phase::WalCatchUp),
                status("m2", Role::Source, Phase::Completed),
                status("m3", Role::Target, Phase::BaseCopy),
            ],
            77,
        );
        assert!(text.contains("ferry_migrations{role=\"source\",phase=\"WalCatchUp\"} 1"), "{text}");
        assert!(text.contains("ferry_migrations{role=\"source\",phase=\"Completed\"} 1"));
        assert!(text.contains("ferry_migrations{role=\"target\",phase=\"BaseCopy\"} 1"));
        assert!(text.contains("ferry_migrations{role=\"target\",phase=\"Failed\"} 0"));
        assert!(text.contains("ferry_wal_lag_lsn{migration_id=\"m1\"} 10"));
        assert!(text.contains("ferry_held_wal_bytes{migration_id=\"m1\"} 4096"));
        assert!(!text.contains("migration_id=\"m2\""), "final migrations have no lag gauge");
        assert!(text.contains("ferry_bytes_received_total 77"));
        assert!(text.contains("ferry_errors_total{kind=\"aborted\"}"));
        observe_pause_us(300);
        let text = render(&[], 0);
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"250\"}"), "{text}");
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"+Inf\"}"), "{text}");
        assert!(!text.contains("ferry_fence_pause_us_count 0"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "not a sample line: {line}");
        }
    }

    /// Every metric the Grafana dashboard (`engine/dist/grafana/ferry.json`) queries is one
    /// this module exports (a `# TYPE` line of what the daemon serves; a histogram's
    /// `_bucket`, `_sum` and `_count` series with it), and every exported metric is shown.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let text = render(&[], 0);
        let mut exported = std::collections::BTreeSet::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
                (words.next(), words.next(), words.next(), words.next())
            {
                exported.insert(name.to_owned());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        exported.insert(format!("{name}{suffix}"));
                    }
                }
            }
        }
        let dashboard: serde_json::Value = serde_json::from_str(include_str!("../dist/grafana/ferry.json")).unwrap();
        let mut queries = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if variable["type"] == "query" {
                queries.push(variable["query"].as_str().unwrap().to_owned());
            }
        }
        let mut queried = std::collections::BTreeSet::new();
        for query in &queries {
            for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ferry_") {
                    assert!(
                        exported.contains(word),
                        "the dashboard queries {word}, which ferry does not export: {query}"
                    );
                    queried
                        .insert(word.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count"));
                }
            }
        }
        assert!(queries.len() >= 6, "{queries:?}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(queried.contains(name), "ferry exports {name}, which no dashboard panel shows");
        }
    }

    #[test]
    fn reasons_map_to_a_few_kinds() {
        assert_eq!(error_kind_of("aborted: operator"), "aborted");
        assert_eq!(error_kind_of("the peer failed the transfer (Refused): target x is at capacity"), "refused");
        assert_eq!(error_kind_of("chunk 0 arrived with CRC32C 0x1"), "checksum");
        assert_eq!(error_kind_of("something new"), "other");
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes_and_refuses_anything_else() {
        let addr = start("127.0.0.1:0".parse().unwrap(), Arc::new(|| "ferry_up 1\n".to_owned())).await.unwrap();
        let ask = |request: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&request).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).into_owned()
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ferry_up 1\n"), "{ok}");
        assert!(ask(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 404"));
        assert!(ask(b"\xff\x00garbage\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 400"));
        assert!(ask(vec![b'G'; 20_000]).await.starts_with("HTTP/1.1 400"));
        // Still serving after all that.
        assert!(ask(b"GET /metrics HTTP/1.0\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 200 OK"));
    }
}
