//! Prometheus metrics of a node daemon, served on `metrics_addr` (`GET /metrics`).
//!
//! What it does: keeps this process's counters (chunk bytes sent, migrations failed by error
//! kind) and a histogram of the write pauses of this node's released cut-overs
//! (`ferry_fence_pause_us`, fixed buckets from 100 us to 10 s) as `prometheus-client` metrics,
//! and at each scrape builds a [`Scrape`]: those metrics plus gauges read from the daemon then
//! (migrations by role and phase, bytes received, WAL lag and held WAL bytes per migration).
//! A scrape is encoded as OpenMetrics or as the Prometheus text format (0.0.4), whichever the
//! scraper asks for; [`endpoint`] serves it over hyper.
//!
//! What it does not: push to anyone, or keep history.
//!
//! Exported series names (what Prometheus stores and the Grafana dashboard queries) are the
//! same in both formats: a counter registered as `ferry_x` is the series `ferry_x_total`, a
//! histogram `ferry_x` is `ferry_x_bucket`, `ferry_x_sum` and `ferry_x_count`.
//!
//! Bounds: every label set is bounded. Error kinds are the fixed [`ERROR_KINDS`] (anything else
//! counts as `other`); role and phase are enums; `migration_id` series are rebuilt at each
//! scrape from the daemon's running source migrations, so finished migrations leave nothing.
//!
//! Invariants: a scrape reads the daemon's state and changes nothing. The process-wide metrics
//! live in one lazily built [`ProcessMetrics`] because the transfer code counts into them
//! through free functions; two counters stay plain atomics owned by the modules that count
//! ([`BYTES_SENT_TOTAL`] here, `transfer::rdma::select::FALLBACKS_TOTAL`) and are read at each
//! scrape.

mod endpoint;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use ferry_wire::api::{MigrationStatus, Phase, Role};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use endpoint::{serve, start};

/// Chunk bytes this process wrote to QUIC streams as a source (resent bytes included).
pub static BYTES_SENT_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Upper bounds (us) of the pause histogram's buckets; a last `+Inf` bucket follows.
pub const PAUSE_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000, 10_000_000];

/// The `kind` label values of `ferry_errors_total`: every kind [`error_kind_of`] and the
/// transfer errors' `metric_kind` name. Each is exported from the start, at 0.
pub const ERROR_KINDS: [&str; 8] =
    ["aborted", "checksum", "connection", "other", "protocol", "refused", "source_changed", "storage"];

type KindLabel = [(&'static str, &'static str); 1];

/// This process's own metrics. Clones of a `prometheus-client` metric share its value, so
/// each scrape registers clones of these.
#[derive(Debug)]
struct ProcessMetrics {
    fence_pauses_us: Histogram,
    errors: Family<KindLabel, Counter>,
}

static PROCESS: LazyLock<ProcessMetrics> = LazyLock::new(|| {
    #[allow(clippy::cast_precision_loss)] // bucket bounds are at most 1e7: exact in an f64
    let fence_pauses_us = Histogram::new(PAUSE_BUCKETS_US.iter().map(|bound| *bound as f64));
    let errors = Family::default();
    for kind in ERROR_KINDS {
        let _ = errors.get_or_create(&[("kind", kind)]);
    }
    ProcessMetrics { fence_pauses_us, errors }
});

/// Records one released cut-over's write pause.
pub fn observe_pause_us(pause_us: u64) {
    #[allow(clippy::cast_precision_loss)] // pauses are far below 2^53 us
    PROCESS.fence_pauses_us.observe(pause_us as f64);
}

/// Counts one failed migration (either role) under `kind`; a kind outside [`ERROR_KINDS`]
/// counts as `other`, so the label set stays bounded.
pub fn count_error(kind: &'static str) {
    let kind = ERROR_KINDS.iter().copied().find(|known| *known == kind).unwrap_or("other");
    PROCESS.errors.get_or_create(&[("kind", kind)]).inc();
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

/// One scrape's metrics: this process's metrics and the daemon's state when it was taken.
#[derive(Debug)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// The OpenMetrics 1.0 text (ends with `# EOF`).
    pub fn openmetrics(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// The Prometheus text format, version 0.0.4 (for scrapers that do not ask for OpenMetrics).
    pub fn prometheus_text(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The daemon's metrics now: `statuses` are its migrations, `bytes_received_total` the chunk
/// bytes it received as a target.
pub fn render(statuses: &[MigrationStatus], bytes_received_total: u64) -> Scrape {
    let mut registry = Registry::default();
    registry.register(
        "ferry_bytes_sent",
        "Chunk bytes this process handed to its transport as a source, resent chunks included: bytes sent into a connection that then died count too (ferry_bytes_received on the target counts what arrived).",
        ConstCounter::new(BYTES_SENT_TOTAL.load(Ordering::Relaxed)),
    );
    registry.register(
        "ferry_rdma_fallbacks",
        "Times transport = \"rdma\" was configured and QUIC used instead.",
        ConstCounter::new(crate::transfer::rdma::select::FALLBACKS_TOTAL.load(Ordering::Relaxed)),
    );
    registry.register(
        "ferry_bytes_received",
        "Chunk bytes received by this process as a target (migrations it still lists).",
        ConstCounter::new(bytes_received_total),
    );
    registry.register_collector(Box::new(DaemonState::of(statuses)));
    registry.register(
        "ferry_fence_pause_us",
        "Write pauses of released cut-overs, in microseconds.",
        PROCESS.fence_pauses_us.clone(),
    );
    registry.register("ferry_errors", "Failed migrations by error kind.", PROCESS.errors.clone());
    Scrape { registry }
}

/// The daemon's gauges at one scrape, copied out of its statuses.
#[derive(Debug)]
struct DaemonState {
    /// (role, phase, count) for every role and phase, zeros included.
    migrations: Vec<(&'static str, &'static str, u64)>,
    /// (role, count) of migrations flagged stalled (`no_progress_for_s` set), zeros included.
    stalled: Vec<(&'static str, u64)>,
    /// (migration id, WAL lag in LSN units if known, held WAL bytes) per running source migration.
    sources: Vec<(String, Option<u64>, u64)>,
}

const PHASES: [Phase; 5] = [Phase::BaseCopy, Phase::WalCatchUp, Phase::AtomicCutOver, Phase::Completed, Phase::Failed];

impl DaemonState {
    fn of(statuses: &[MigrationStatus]) -> Self {
        let mut migrations = Vec::with_capacity(2 * PHASES.len());
        let mut stalled = Vec::with_capacity(2);
        for role in [Role::Source, Role::Target] {
            let count = statuses.iter().filter(|s| s.role == role && s.no_progress_for_s.is_some()).count();
            stalled.push((role_name(role), u64::try_from(count).unwrap_or(u64::MAX)));
            for phase in PHASES {
                let count = statuses.iter().filter(|s| s.role == role && s.phase == phase).count();
                migrations.push((role_name(role), phase_name(phase), u64::try_from(count).unwrap_or(u64::MAX)));
            }
        }
        let sources = statuses
            .iter()
            .filter(|s| s.role == Role::Source && !s.phase.is_final())
            .map(|s| (s.migration_id.clone(), s.wal.lag_lsn(), s.wal.held_bytes))
            .collect();
        Self { migrations, stalled, sources }
    }
}

impl Collector for DaemonState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let help = "Migrations on this node by role and phase.";
            let mut family = encoder.encode_descriptor("ferry_migrations", help, None, MetricType::Gauge)?;
            for (role, phase, count) in &self.migrations {
                ConstGauge::new(*count).encode(family.encode_family(&[("role", *role), ("phase", *phase)])?)?;
            }
        }
        {
            let help =
                "Migrations on this node flagged stalled (no progress for ferry serve's --stall-after-secs), by role.";
            let mut family = encoder.encode_descriptor("ferry_migrations_stalled", help, None, MetricType::Gauge)?;
            for (role, count) in &self.stalled {
                ConstGauge::new(*count).encode(family.encode_family(&[("role", *role)])?)?;
            }
        }
        {
            let help = "Source tip LSN minus the target's durable LSN, per running source migration.";
            let mut family = encoder.encode_descriptor("ferry_wal_lag_lsn", help, None, MetricType::Gauge)?;
            for (id, lag, _) in &self.sources {
                if let Some(lag) = lag {
                    ConstGauge::new(*lag).encode(family.encode_family(&[("migration_id", id.as_str())])?)?;
                }
            }
        }
        let help = "Bytes of WAL segments held (hard-linked) per running source migration.";
        let mut family = encoder.encode_descriptor("ferry_held_wal_bytes", help, None, MetricType::Gauge)?;
        for (id, _, held_bytes) in &self.sources {
            ConstGauge::new(*held_bytes).encode(family.encode_family(&[("migration_id", id.as_str())])?)?;
        }
        Ok(())
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// The `phase` label: the phase as the control socket names it.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::BaseCopy => "BaseCopy",
        Phase::WalCatchUp => "WalCatchUp",
        Phase::AtomicCutOver => "AtomicCutOver",
        Phase::Completed => "Completed",
        Phase::Failed => "Failed",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
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

    /// The sample lines of an exposition: (series name, labels, value).
    fn samples(text: &str) -> Vec<(String, String, f64)> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let value = value.parse::<f64>().unwrap_or_else(|_| panic!("not a sample line: {line}"));
            samples.push((name.to_owned(), labels.trim_end_matches('}').to_owned(), value));
        }
        samples
    }

    #[test]
    fn the_text_counts_phases_and_reports_lag_and_held_bytes() {
        count_error("aborted");
        let scrape = render(
            &[
                status("m1", Role::Source, Phase::WalCatchUp),
                status("m2", Role::Source, Phase::Completed),
                status("m3", Role::Target, Phase::BaseCopy),
                MigrationStatus { no_progress_for_s: Some(12), ..status("m4", Role::Target, Phase::BaseCopy) },
            ],
            77,
        );
        for text in [scrape.prometheus_text().unwrap(), scrape.openmetrics().unwrap()] {
            assert!(text.contains("ferry_migrations{role=\"source\",phase=\"WalCatchUp\"} 1"), "{text}");
            assert!(text.contains("ferry_migrations{role=\"source\",phase=\"Completed\"} 1"));
            assert!(text.contains("ferry_migrations{role=\"target\",phase=\"BaseCopy\"} 2"));
            assert!(text.contains("ferry_migrations_stalled{role=\"target\"} 1"), "{text}");
            assert!(text.contains("ferry_migrations_stalled{role=\"source\"} 0"));
            assert!(text.contains("ferry_migrations{role=\"target\",phase=\"Failed\"} 0"));
            assert!(text.contains("ferry_wal_lag_lsn{migration_id=\"m1\"} 10"));
            assert!(text.contains("ferry_held_wal_bytes{migration_id=\"m1\"} 4096"));
            assert!(!text.contains("migration_id=\"m2\""), "final migrations have no lag gauge");
            assert!(text.contains("ferry_bytes_received_total 77"));
            let aborted = samples(&text)
                .into_iter()
                .find(|(name, labels, _)| name == "ferry_errors_total" && labels == "kind=\"aborted\"")
                .unwrap();
            assert!(aborted.2 >= 1.0, "{text}");
        }
        observe_pause_us(300);
        let scrape = render(&[], 0);
        let text = scrape.prometheus_text().unwrap();
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"250\"}"), "{text}");
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"500\"}"), "{text}");
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"+Inf\"}"), "{text}");
        assert!(!text.contains("ferry_fence_pause_us_count 0"), "{text}");
        let text = scrape.openmetrics().unwrap();
        assert!(text.contains("ferry_fence_pause_us_bucket{le=\"250.0\"}"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("ferry_fence_pause_us_count 0"), "{text}");
    }

    /// Both formats export the same series (names and labels, `le` aside: OpenMetrics writes
    /// its bounds as floats), so the format a scraper picks changes nothing it stores.
    #[test]
    fn both_formats_export_the_same_series() {
        let scrape = render(&[status("m1", Role::Source, Phase::BaseCopy)], 5);
        let series = |text: &str| {
            let mut series: Vec<_> = samples(text)
                .into_iter()
                .filter(|(name, _, _)| !name.ends_with("_bucket"))
                .map(|(name, labels, _)| format!("{name}{{{labels}}}"))
                .collect();
            series.sort();
            series
        };
        let text = series(&scrape.prometheus_text().unwrap());
        assert_eq!(text, series(&scrape.openmetrics().unwrap()));
        for name in ["ferry_bytes_sent_total{}", "ferry_rdma_fallbacks_total{}", "ferry_fence_pause_us_sum{}"] {
            assert!(text.iter().any(|s| s == name), "{name} not in {text:?}");
        }
    }

    #[test]
    fn error_kinds_are_a_fixed_set() {
        count_error("a kind nobody listed");
        let text = render(&[], 0).prometheus_text().unwrap();
        let kinds: Vec<_> =
            samples(&text).into_iter().filter(|(name, _, _)| name == "ferry_errors_total").map(|(_, l, _)| l).collect();
        assert_eq!(kinds.len(), ERROR_KINDS.len(), "{text}");
        for kind in ERROR_KINDS {
            assert!(kinds.contains(&format!("kind=\"{kind}\"")), "{kind} missing: {text}");
        }
    }

    #[test]
    fn phase_labels_are_the_phase_names() {
        for phase in PHASES {
            assert_eq!(phase_name(phase), format!("{phase:?}"));
        }
    }

    /// Every metric the Grafana dashboard (`engine/dist/grafana/ferry.json`) queries is one
    /// this module exports (a `# TYPE` line of the Prometheus text the daemon serves, which
    /// names counters with their `_total`; a histogram's `_bucket`, `_sum` and `_count` series
    /// with it), and every exported metric is shown.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let text = render(&[], 0).prometheus_text().unwrap();
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
}
