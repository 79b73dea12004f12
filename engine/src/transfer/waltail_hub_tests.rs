//! The hub on real WAL folders, without a network: subscriptions drained by hand.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::time::Duration;

use ferry_wire::wal::{check_record, Layout, LayoutChoice};
use ferry_wire::walstream;

use super::*;
use crate::transfer::walsend::POLL_INTERVAL;
use ferry_refnode::walwrite::{FlushStyle, RecordSpec, WalWriter, WriterOptions};

/// Polls of 1 ms before a wait gives up: a guard against a hang, not a timing assertion.
const WAIT_POLLS_MAX: u32 = 60_000;

fn options() -> WriterOptions {
    WriterOptions { layout: Layout::B, roll_size_bytes: 64 << 10, ..WriterOptions::default() }
}

/// Record `lsn` belongs to vShard `lsn % 3`; its payload repeats the LSN.
fn vshard_of(lsn: u64) -> u32 {
    (lsn % 3) as u32
}

fn append(writer: &mut WalWriter, count: u64, payload_len: usize) {
    for _ in 0..count {
        let lsn = writer.next_lsn();
        let payload: Vec<u8> = lsn.0.to_le_bytes().iter().copied().cycle().take(payload_len).collect();
        assert_eq!(writer.append(&RecordSpec::new(0x8001, VShardId(vshard_of(lsn.0))), &payload).unwrap(), lsn);
        if lsn.0.is_multiple_of(10) {
            writer.flush().unwrap();
        }
    }
    writer.flush().unwrap();
}

/// Record bytes (headers and payloads) of the folder's records in `from..=to`, read with a
/// cursor of its own.
fn record_bytes(dir: &Path, from: u64, to: u64) -> u64 {
    let mut tail = FolderTail::new(dir, CursorConfig::default(), Some(Lsn(from))).unwrap();
    let mut total = 0;
    while let Some(record) = tail.poll_ref().unwrap() {
        if record.header.lsn.0 <= to {
            total += record.bytes.len() as u64;
        }
    }
    total
}

fn wal_config(dir: &Path, until: Option<u64>) -> WalSourceConfig {
    WalSourceConfig {
        dir: dir.to_path_buf(),
        layout: LayoutChoice::Auto,
        alignment_bytes: 4096,
        until_lsn: until.map(Lsn),
        max_held_wal_bytes: 1 << 30,
        poll_interval: POLL_INTERVAL,
    }
}

/// One subscription, drained by hand the way `walsend::stream` drains it.
struct Sink {
    rx: mpsc::Receiver<TailEvent>,
    shared: Arc<TailShared>,
    vshard: u32,
    lsns: Vec<u64>,
    reached: bool,
    failed: Option<String>,
}

impl Sink {
    fn subscribe(config: WalSourceConfig, id: &str, vshard: u32, from: u64, queue_max_bytes: u64) -> Sink {
        let shared = Arc::new(TailShared::default());
        let request = SubscribeRequest {
            config,
            migration_id: MigrationId::new(id).unwrap(),
            vshard_id: VShardId(vshard),
            from_lsn: Lsn(from),
            queue_max_bytes,
        };
        let rx = subscribe(request, shared.clone()).unwrap();
        Sink { rx, shared, vshard, lsns: Vec::new(), reached: false, failed: None }
    }

    /// Takes what arrived; each record is checked (its vShard, its payload) and counted.
    fn drain(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            match event {
                TailEvent::Batch(batch) => {
                    self.shared.queued_bytes.fetch_sub(batch.body.len() as u64, Ordering::Relaxed);
                    let records = walstream::decode(&batch.body).unwrap();
                    assert_eq!(records.len() as u64, batch.records_count);
                    assert_eq!(records.last().unwrap().lsn, batch.last_lsn);
                    for record in records {
                        let (header, len) = check_record(Layout::B, record.bytes).unwrap();
                        assert_eq!(len, record.bytes.len());
                        assert_eq!(header.lsn, record.lsn);
                        assert_eq!(header.vshard_id.0, self.vshard, "lsn {}", record.lsn);
                        let payload = &record.bytes[header.layout().header_len_bytes()..];
                        assert!(payload.chunks(8).all(|c| c == &record.lsn.0.to_le_bytes()[..c.len()]));
                        self.lsns.push(record.lsn.0);
                    }
                    // As if the target made them durable at once: the holder may release.
                    self.shared.durable_lsn.store(batch.last_lsn.0, Ordering::Relaxed);
                }
                TailEvent::Reached => self.reached = true,
                TailEvent::Failed(e) => self.failed = Some(e.to_string()),
            }
        }
    }

    fn wait(&mut self, what: &str, done: impl Fn(&Sink) -> bool) {
        for _ in 0..WAIT_POLLS_MAX {
            self.drain();
            assert!(self.failed.is_none() || what == "failed", "{what}: {:?}", self.failed);
            if done(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{what}: not after {WAIT_POLLS_MAX} polls");
    }

    /// Its vShard's LSNs in `from..=to`.
    fn expected(&self, from: u64, to: u64) -> Vec<u64> {
        (from..=to).filter(|lsn| vshard_of(*lsn) == self.vshard).collect()
    }
}

fn wait_stats(dir: &Path, what: &str, done: impl Fn(&FolderStats) -> bool) -> FolderStats {
    for _ in 0..WAIT_POLLS_MAX {
        if let Some(stats) = folder_stats(dir).filter(|s| done(s)) {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("{what}: not after {WAIT_POLLS_MAX} polls: {:?}", folder_stats(dir));
}

/// Two migrations of two vShards follow one folder while a writer appends: each gets
/// exactly its records, once, in order, and one thread read each record once.
#[test]
fn two_subscriptions_share_one_thread_and_each_record_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 200, 100);
    let (from, until) = (201, 3000);
    let mut a = Sink::subscribe(wal_config(dir.path(), Some(until)), "a", 1, from, walsend_queue());
    let mut b = Sink::subscribe(wal_config(dir.path(), Some(until)), "b", 2, from, walsend_queue());
    wait_stats(dir.path(), "two subscribers", |s| s.subscribers_count == 2);
    let writer_thread = std::thread::spawn(move || {
        for _ in 0..28 {
            append(&mut writer, 100, 100);
        }
    });
    a.wait("a reached", |s| s.reached);
    b.wait("b reached", |s| s.reached);
    writer_thread.join().unwrap();
    assert_eq!(a.lsns, a.expected(from, until));
    assert_eq!(b.lsns, b.expected(from, until));
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.tail_threads_started_count, 1);
    assert_eq!(stats.catch_up_read_bytes, 0, "{stats:?}");
    assert_eq!(stats.detached_count, 0);
    assert_eq!(stats.shared_read_bytes, record_bytes(dir.path(), from, until));
    // Every link of the shared tail is gone with it.
    let held = std::fs::read_dir(dir.path().join(HELD_DIR_NAME)).unwrap();
    let names: Vec<String> = held.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with(TAIL_DIR_PREFIX)), "{names:?}");
}

fn walsend_queue() -> u64 {
    super::super::walsend::QUEUE_MAX_BYTES
}

/// A subscription that starts below the shared tail (a reconnect, an older base) reads its
/// records with its own cursor, then rejoins the shared tail.
#[test]
fn a_late_subscription_from_a_lower_lsn_gets_every_record_then_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 500, 100);
    let mut a = Sink::subscribe(wal_config(dir.path(), Some(1000)), "early", 1, 1, walsend_queue());
    a.wait("a read the first 500", |s| s.lsns.last() == s.expected(1, 500).last());
    let mut b = Sink::subscribe(wal_config(dir.path(), Some(1000)), "late", 1, 1, walsend_queue());
    b.wait("b caught up to 500", |s| s.lsns.last() == s.expected(1, 500).last());
    append(&mut writer, 500, 100);
    a.wait("a reached", |s| s.reached);
    b.wait("b reached", |s| s.reached);
    assert_eq!(a.lsns, a.expected(1, 1000));
    assert_eq!(b.lsns, b.expected(1, 1000));
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.tail_threads_started_count, 1);
    // The late one read 1..=500 on its own, then the shared tail served both.
    assert_eq!(stats.catch_up_read_bytes, record_bytes(dir.path(), 1, 500), "{stats:?}");
    assert_eq!(stats.shared_read_bytes, record_bytes(dir.path(), 1, 1000), "{stats:?}");
}

/// A subscription whose queue is full does not hold the others back, and once drained it
/// still gets every record once, in order.
#[test]
fn a_slow_subscription_does_not_stall_the_others_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 1, 100);
    let until = 3001;
    let mut fast = Sink::subscribe(wal_config(dir.path(), Some(until)), "fast", 1, 1, walsend_queue());
    // One batch at a time in its queue, and it is not drained until the fast one is done.
    let mut slow = Sink::subscribe(wal_config(dir.path(), Some(until)), "slow", 2, 1, 1);
    wait_stats(dir.path(), "two subscribers", |s| s.subscribers_count == 2);
    append(&mut writer, 3000, 4096);
    fast.wait("fast reached", |s| s.reached);
    assert_eq!(fast.lsns, fast.expected(1, until));
    let stats = folder_stats(dir.path()).unwrap();
    assert!(stats.detached_count >= 1, "{stats:?}");
    slow.wait("slow reached", |s| s.reached);
    assert_eq!(slow.lsns, slow.expected(1, until));
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.tail_threads_started_count, 1);
    assert!(stats.catch_up_read_bytes > 0, "{stats:?}");
}

/// A flipped bit in a sealed segment fails every subscription of the folder, naming the
/// segment file and the byte offset; the thread stops.
#[test]
fn corruption_fails_every_subscription_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions { flush: FlushStyle::Buffered, ..options() };
    let mut writer = WalWriter::create(dir.path(), opts, Lsn(1)).unwrap();
    append(&mut writer, 2000, 100);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wal-"))
        .collect();
    names.sort();
    assert!(names.len() > 3, "{names:?}");
    let victim = dir.path().join(&names[2]);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    let mut sinks: Vec<Sink> = (0..2u32)
        .map(|v| Sink::subscribe(wal_config(dir.path(), None), &format!("c{v}"), v, 1, walsend_queue()))
        .collect();
    for sink in &mut sinks {
        sink.wait("failed", |s| s.failed.is_some());
        let text = sink.failed.clone().unwrap();
        assert!(text.contains(&names[2]) && text.contains("corrupt at byte"), "{text}");
        // Nothing at or past the damage was handed over.
        assert!(sink.lsns.iter().all(|lsn| *lsn < parse(&names[2]).0 + 20), "{:?}", sink.lsns.last());
    }
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.subscribers_count, 0);
}

fn parse(name: &str) -> Lsn {
    ferry_wire::wal::parse_segment_name(name).unwrap()
}

/// When the last subscription leaves, the thread stops; the next one starts a new thread.
/// A subscription with the id of a running one replaces it.
#[test]
fn the_thread_stops_with_its_last_subscription_and_a_new_one_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 300, 100);
    let mut first = Sink::subscribe(wal_config(dir.path(), None), "m", 1, 1, walsend_queue());
    first.wait("first read 300", |s| s.lsns.last() == s.expected(1, 300).last());
    // The same migration again (a reconnect) from a lower LSN: it replaces the first.
    let mut again = Sink::subscribe(wal_config(dir.path(), None), "m", 1, 100, walsend_queue());
    again.wait("again read 300", |s| s.lsns.last() == s.expected(1, 300).last());
    assert_eq!(again.lsns, again.expected(100, 300));
    let stats = wait_stats(dir.path(), "one subscriber", |s| s.subscribers_count == 1);
    assert_eq!(stats.tail_threads_started_count, 1);
    // The replaced one hears nothing more: its sender is gone.
    append(&mut writer, 30, 100);
    again.wait("again read 330", |s| s.lsns.last() == s.expected(1, 330).last());
    first.drain();
    assert_eq!(first.lsns, first.expected(1, 300));
    assert!(first.rx.is_closed());
    again.shared.stop.store(true, Ordering::Relaxed);
    wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running && s.subscribers_count == 0);
    let mut last = Sink::subscribe(wal_config(dir.path(), Some(330)), "n", 2, 1, walsend_queue());
    last.wait("last reached", |s| s.reached);
    assert_eq!(last.lsns, last.expected(1, 330));
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.tail_threads_started_count, 2);
}

/// A subscription asking for other cursor settings reads on its own, on the same thread.
#[test]
fn other_cursor_settings_read_privately_on_the_same_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 10, 100);
    let mut auto = Sink::subscribe(wal_config(dir.path(), Some(600)), "auto", 0, 1, walsend_queue());
    let fixed_config = WalSourceConfig { layout: LayoutChoice::Fixed(Layout::B), ..wal_config(dir.path(), Some(600)) };
    let mut fixed = Sink::subscribe(fixed_config, "fixed", 1, 1, walsend_queue());
    append(&mut writer, 590, 100);
    auto.wait("auto reached", |s| s.reached);
    fixed.wait("fixed reached", |s| s.reached);
    assert_eq!(auto.lsns, auto.expected(1, 600));
    assert_eq!(fixed.lsns, fixed.expected(1, 600));
    let stats = wait_stats(dir.path(), "the thread stopped", |s| !s.tail_running);
    assert_eq!(stats.tail_threads_started_count, 1);
    assert_eq!(stats.catch_up_read_bytes, record_bytes(dir.path(), 1, 600));
}

/// With the periodic listing an hour away, records in a segment the writer rolls to still
/// arrive: the notice of the new file links it at once. (Before, they waited for the next
/// listing: a fence whose last records followed a roll waited a whole poll interval.)
#[test]
fn a_segment_rolled_to_is_followed_at_its_notice_not_at_the_next_listing() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = WalWriter::create(dir.path(), options(), Lsn(1)).unwrap();
    append(&mut writer, 10, 40);
    let config = WalSourceConfig { poll_interval: Duration::from_secs(3600), ..wal_config(dir.path(), None) };
    let mut sink = Sink::subscribe(config, "rolled", 1, 1, walsend_queue());
    sink.wait("the records before the roll", |s| s.lsns == s.expected(1, 10));
    for round in 0..3 {
        writer.roll().unwrap();
        append(&mut writer, 10, 40);
        let to = 20 + round * 10;
        sink.wait("the records past a roll", |s| s.lsns == s.expected(1, to));
    }
    assert!(list_segments(dir.path()).unwrap().len() >= 4);
}
