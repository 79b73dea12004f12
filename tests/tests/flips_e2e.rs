//! The end-to-end bit-flip campaign (issue 18, "corruption above TLS"): about 100 damages to
//! real copies between an in-process source and target over QUIC, each of which must be
//! caught with a clear error and no panic, after which a resumed copy must stage the exact
//! source bytes. No damaged byte may reach a `released` staging.
//!
//! Sites, in turn (each damage a [`Flip`]: one bit, several bits of a byte, or a burst of 33 to
//! 96 bits, drawn uniformly over the structure's bytes):
//! - a chunk at the source after its CRC32C was computed (engine failpoint
//!   [`Site::SourceChunkAfterCrc`]), at a chunk drawn uniformly over the copy;
//! - a chunk in the target's receive buffer before its check
//!   ([`Site::TargetReceiveBuffer`]);
//! - a chunk as it lands in its staged part file (this test's [`FlippingStorage`]): the bytes at
//!   rest differ from the ones the target checked, which the re-read before the file is named
//!   must catch;
//! - `MANIFEST.json` of a released staging, at rest, then a target restart: the staging must
//!   be refused, never believed;
//! - the chunk log of a half-staged migration, at rest, then a target restart: the resumed copy
//!   either ends byte-identical (a torn tail is truncated and its chunks fetched again) or
//!   fails naming the damage;
//! - a separate test: a WAL batch frame in the target's receive buffer during a copy with a WAL
//!   stream ([`Site::TargetWalBatch`]: record headers, LSNs, lengths and payloads): the copy
//!   fails naming the damaged frame, and the resumed copy stages exactly the vShard's records.
//!
//! `FERRY_FLIPS_E2E=N` sets the number of damages (100 by default, 5 sites in turn);
//! `FERRY_FLIPS_E2E_SEED` replays a run (every run prints its seed). Runs in about a minute.
//!
//! What it does not: damage frame headers in flight (the in-process campaign,
//! `ferry_wire::fuzzing::flips`, covers every decoder's structures), or run two copies at once:
//! the failpoints are process-wide, so the two tests take [`ONE_AT_A_TIME`] first.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::io::{self, IoSlice};
use std::path::Path;
use std::sync::{Arc, Mutex};

use ferry_engine::failpoint::{self, Damage, Site};
use ferry_engine::storage::{DiskStorage, Storage, StorageFile};
use ferry_engine::transfer::walsend::{WalSourceConfig, POLL_INTERVAL};
use ferry_refnode::walwrite::{FlushStyle, RecordSpec, WalWriter, WriterOptions};
use ferry_tests::sim::Rng;
use ferry_tests::{copy, request, staged_wal_records, tree_sha256, write_file, Certs, Target};
use ferry_wire::damage::Flip;
use ferry_wire::wal::{Layout, LayoutChoice};
use ferry_wire::{Lsn, VShardId};

const CHUNK_LEN_BYTES: u32 = 64 << 10;

/// Held by each test for its whole run: the failpoints are process-wide.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A damage waiting for a part-file write: how many writes to let pass, then the flip.
type PendingFlip = Arc<Mutex<Option<(u64, Flip)>>>;

/// [`DiskStorage`], except that the chunk write due in `pending` lands damaged in its part
/// file (offsets of the flip count from the write's first byte).
#[derive(Debug, Default)]
struct FlippingStorage {
    pending: PendingFlip,
}

#[derive(Debug)]
struct FlippingFile {
    inner: Arc<dyn StorageFile>,
    pending: PendingFlip,
}

impl FlippingFile {
    /// The flip due for this write, counting the write as passed otherwise.
    fn due(&self) -> Option<Flip> {
        let mut pending = self.pending.lock().unwrap();
        match pending.as_mut() {
            Some((0, _)) => pending.take().map(|(_, flip)| flip),
            Some((skip, _)) => {
                *skip -= 1;
                None
            }
            None => None,
        }
    }
}

impl StorageFile for FlippingFile {
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        match self.due() {
            Some(flip) => {
                let mut damaged = buf.to_vec();
                flip.apply(&mut damaged, 0);
                self.inner.write_at(&damaged, offset_bytes)
            }
            None => self.inner.write_at(buf, offset_bytes),
        }
    }
    fn write_all_vectored_at(&self, bufs: &[IoSlice<'_>], offset_bytes: u64) -> io::Result<()> {
        match self.due() {
            Some(flip) => {
                let mut damaged: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                flip.apply(&mut damaged, 0);
                self.inner.write_at(&damaged, offset_bytes)
            }
            None => self.inner.write_all_vectored_at(bufs, offset_bytes),
        }
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset_bytes)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.inner.set_len(len_bytes)
    }
    fn len_bytes(&self) -> io::Result<u64> {
        self.inner.len_bytes()
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
}

impl Storage for FlippingStorage {
    fn open_rw(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let inner = DiskStorage.open_rw(path)?;
        if path.extension().is_some_and(|e| e == "part") {
            return Ok(Arc::new(FlippingFile { inner, pending: self.pending.clone() }));
        }
        Ok(inner)
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        DiskStorage.open_read(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        DiskStorage.create_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        DiskStorage.rename(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        DiskStorage.hard_link(original, link)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        DiskStorage.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        DiskStorage.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        DiskStorage.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        DiskStorage.exists(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        DiskStorage.list_dir(path)
    }
}

/// The campaign's state: the source files, the target (restarted by some sites) and counts.
struct Campaign {
    certs: Arc<Certs>,
    source: tempfile::TempDir,
    target_dir: tempfile::TempDir,
    storage: Arc<FlippingStorage>,
    target: Option<Target>,
    chunks_count: u64,
    rng: Rng,
    /// What each site caught, by site name: (damages, caught by an error, of them bursts).
    tally: std::collections::BTreeMap<&'static str, (u32, u32, u32)>,
}

impl Campaign {
    fn target(&self) -> &Target {
        self.target.as_ref().unwrap()
    }

    fn restart_target(&mut self) {
        if let Some(target) = self.target.take() {
            target.stop();
        }
        let storage: Arc<dyn Storage> = self.storage.clone();
        self.target = Some(Target::start(&self.certs, self.target_dir.path(), storage).unwrap());
    }

    fn draw(&mut self, len: usize) -> Flip {
        let rng = &mut self.rng;
        Flip::draw(&mut || rng.next_u64(), len)
    }

    async fn copy(&self, id: &str) -> Result<(), String> {
        let req = request(id, self.source.path(), self.target().addr, CHUNK_LEN_BYTES);
        copy(&self.certs, req).await.map(|_| ()).map_err(|e| format!("{:#}", anyhow::Error::from(e)))
    }

    fn migration(&self, id: &str) -> std::path::PathBuf {
        self.target_dir.path().join("migrations").join(id)
    }

    /// The staging of `id` is byte-identical to the source.
    fn assert_staged(&self, id: &str) {
        let staged = tree_sha256(&self.migration(id).join("segments")).unwrap();
        assert_eq!(staged, tree_sha256(self.source.path()).unwrap(), "{id}: the staging differs from the source");
    }

    /// Counts a damage of `site`; `caught` is the error that reported it, if any.
    fn record(&mut self, site: &'static str, flip: &Flip, caught: Option<&str>) {
        let entry = self.tally.entry(site).or_default();
        if entry.0 == 0 {
            println!("{site}: first damage {flip:?}: {}", caught.unwrap_or("no error: the resumed copy was exact"));
        }
        entry.0 += 1;
        entry.1 += u32::from(caught.is_some());
        entry.2 += u32::from(flip.span_bits() > 32);
    }

    /// A chunk damaged in flight at `site`: the copy fails with a checksum error, and a
    /// resumed copy stages the exact bytes.
    async fn in_flight(&mut self, id: &str, site: Site) {
        let flip = self.draw(CHUNK_LEN_BYTES as usize);
        let skip = self.rng.below(self.chunks_count);
        failpoint::arm(site, skip, Damage::Flip(flip.clone()));
        let failed = self.copy(id).await;
        assert_eq!(failpoint::disarm_all(), 0, "{id}: the damage at {site:?} after {skip} chunks never applied");
        let error =
            failed.err().unwrap_or_else(|| panic!("{id}: a chunk damaged at {site:?} was not caught ({flip:?})"));
        assert_clear(id, &error, &["checksum", "CRC32C"]);
        self.record(
            if site == Site::SourceChunkAfterCrc { "source chunk" } else { "target buffer" },
            &flip,
            Some(&error),
        );
        self.copy(id).await.unwrap_or_else(|e| panic!("{id}: the resumed copy failed: {e}"));
        self.assert_staged(id);
    }

    /// A chunk damaged as it lands in its part file: caught before the file is named, and a
    /// resumed copy finds the damaged chunk by its logged CRC32C and fetches it again.
    async fn at_rest(&mut self, id: &str) {
        let flip = self.draw(CHUNK_LEN_BYTES as usize);
        let skip = self.rng.below(self.chunks_count);
        *self.storage.pending.lock().unwrap() = Some((skip, flip.clone()));
        let failed = self.copy(id).await;
        assert!(self.storage.pending.lock().unwrap().take().is_none(), "{id}: the part-file damage never applied");
        let error = failed.err().unwrap_or_else(|| panic!("{id}: a chunk damaged at rest was not caught ({flip:?})"));
        assert_clear(id, &error, &["checksum", "CRC32C"]);
        self.record("staged chunk", &flip, Some(&error));
        self.copy(id).await.unwrap_or_else(|e| panic!("{id}: the resumed copy failed: {e}"));
        self.assert_staged(id);
    }

    /// A released staging's `MANIFEST.json` damaged at rest, then a restart: the next copy of
    /// the migration is refused naming the manifest, never answered from the damaged one.
    async fn manifest(&mut self, id: &str) {
        self.copy(id).await.unwrap();
        self.assert_staged(id);
        let path = self.migration(id).join("MANIFEST.json");
        let flip = damage_file(&path, |len| self.draw(len));
        self.restart_target();
        let error = self
            .copy(id)
            .await
            .err()
            .unwrap_or_else(|| panic!("{id}: a damaged MANIFEST.json was believed ({flip:?})"));
        assert_clear(id, &error, &["MANIFEST.json"]);
        self.record("MANIFEST.json", &flip, Some(&error));
    }

    /// The chunk log of a half-staged migration damaged at rest, then a restart: the resumed
    /// copy ends byte-identical, or fails naming the damage.
    async fn chunk_log(&mut self, id: &str) {
        // Half-stage it: a damaged chunk fails the copy after some chunks were logged.
        let skip = self.chunks_count / 2 + self.rng.below(self.chunks_count / 2);
        let flip = self.draw(CHUNK_LEN_BYTES as usize);
        failpoint::arm(Site::TargetReceiveBuffer, skip, Damage::Flip(flip));
        assert!(self.copy(id).await.is_err(), "{id}: the half copy did not fail");
        failpoint::disarm_all();
        let path = self.migration(id).join(".ferry").join("chunks.log");
        let flip = damage_file(&path, |len| self.draw(len));
        self.restart_target();
        match self.copy(id).await {
            Ok(()) => {
                self.assert_staged(id);
                self.record("chunk log", &flip, None);
            }
            Err(error) => {
                assert_clear(id, &error, &["chunk log", "chunks.log"]);
                self.record("chunk log", &flip, Some(&error));
            }
        }
    }
}

/// Damages the file at `path` with a flip drawn over its length; returns the flip.
fn damage_file(path: &Path, draw: impl FnOnce(usize) -> Flip) -> Flip {
    let mut bytes = std::fs::read(path).unwrap();
    let flip = draw(bytes.len());
    flip.apply(&mut bytes, 0);
    std::fs::write(path, &bytes).unwrap();
    flip
}

/// The error names what was damaged (one of `needles`) and is a sentence, not a panic's text.
fn assert_clear(id: &str, error: &str, needles: &[&str]) {
    assert!(needles.iter().any(|n| error.contains(n)), "{id}: the error names none of {needles:?}: {error}");
    assert!(!error.contains("panicked"), "{id}: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_damage_to_a_real_copy_is_caught_and_a_resumed_copy_is_exact() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let flips_count: u32 = std::env::var("FERRY_FLIPS_E2E").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let seed = std::env::var("FERRY_FLIPS_E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("FERRY_FLIPS_E2E_SEED={seed} FERRY_FLIPS_E2E={flips_count}");
    let source = tempfile::tempdir().unwrap();
    // 24 chunks in two files, the last one short.
    write_file(source.path(), "L0/a.seg", 1 << 20, seed);
    write_file(source.path(), "L1/b.seg", (512 << 10) - 3, seed ^ 1);
    let mut campaign = Campaign {
        certs: Arc::new(Certs::new().unwrap()),
        source,
        target_dir: tempfile::tempdir().unwrap(),
        storage: Arc::new(FlippingStorage::default()),
        target: None,
        chunks_count: 24,
        rng: Rng::new(seed),
        tally: Default::default(),
    };
    campaign.restart_target();
    let started = std::time::Instant::now();
    for i in 0..flips_count {
        let id = format!("flip-{i}");
        match i % 5 {
            0 => campaign.in_flight(&id, Site::SourceChunkAfterCrc).await,
            1 => campaign.in_flight(&id, Site::TargetReceiveBuffer).await,
            2 => campaign.at_rest(&id).await,
            3 => campaign.manifest(&id).await,
            _ => campaign.chunk_log(&id).await,
        }
    }
    println!("{flips_count} damages in {:?}", started.elapsed());
    for (site, (damages, caught, bursts)) in &campaign.tally {
        println!("{site}: {damages} damages ({bursts} bursts over 32 bits), {caught} failed with a clear error");
    }
    campaign.target.take().unwrap().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_wal_batch_in_flight_is_caught_and_a_resumed_copy_stages_every_record() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const VSHARD: u32 = 7;
    let rounds: u32 = std::env::var("FERRY_FLIPS_E2E_WAL").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed = std::env::var("FERRY_FLIPS_E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("FERRY_FLIPS_E2E_SEED={seed} FERRY_FLIPS_E2E_WAL={rounds}");
    let mut rng = Rng::new(seed);
    let certs = Arc::new(Certs::new().unwrap());
    let (root, wal_dir, target_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_file(root.path(), "base.seg", 256 << 10, seed);
    let options = WriterOptions {
        layout: Layout::A,
        roll_size_bytes: 64 << 10,
        flush: FlushStyle::Buffered,
        ..WriterOptions::default()
    };
    let mut writer = WalWriter::create(wal_dir.path(), options, Lsn(1)).unwrap();
    let mut expected = Vec::new();
    for i in 0..3000u64 {
        let vshard = if i % 2 == 0 { VSHARD } else { 3 };
        let payload: Vec<u8> = (0..(i % 200)).map(|b| (b ^ i) as u8).collect();
        let lsn = writer.append(&RecordSpec::new(0x8001, VShardId(vshard)), &payload).unwrap();
        if vshard == VSHARD && lsn > Lsn(10) {
            expected.push((lsn, vshard, payload));
        }
    }
    writer.flush().unwrap();
    let tip = expected.last().unwrap().0;
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let request_for = |id: &str| {
        let mut req = request(id, root.path(), target.addr, CHUNK_LEN_BYTES);
        (req.base_lsn, req.vshard_id) = (Lsn(10), VShardId(VSHARD));
        req.wal = Some(WalSourceConfig {
            dir: wal_dir.path().to_path_buf(),
            layout: LayoutChoice::Auto,
            alignment_bytes: 4096,
            until_lsn: Some(tip),
            max_held_wal_bytes: 1 << 30,
            poll_interval: POLL_INTERVAL,
        });
        req
    };
    let (mut bursts, mut damaged, mut failed, mut sent_again) = (0, 0, 0, 0);
    for i in 0..rounds {
        let id = format!("wal-flip-{i}");
        failpoint::applied();
        // The first frame: a copy this small may stream its records in one.
        failpoint::arm(Site::TargetWalBatch, 0, Damage::DrawnOverLength { seed: rng.next_u64() });
        let outcome = copy(&certs, request_for(&id)).await;
        let left = failpoint::disarm_all();
        let applied = failpoint::applied();
        assert_eq!((left, applied.len()), (0, 1), "{id}: no WAL batch was damaged ({outcome:?})");
        damaged += 1;
        bursts += applied.iter().filter(|(_, flip)| flip.span_bits() > 32).count();
        match outcome {
            Err(e) => {
                let error = format!("{:#}", anyhow::Error::from(e));
                assert_clear(&id, &error, &["CRC32C", "checksum", "crc"]);
                if failed == 0 {
                    println!("{id}: {error}");
                }
                failed += 1;
                copy(&certs, request_for(&id)).await.unwrap_or_else(|e| panic!("{id}: the resumed copy failed: {e}"));
            }
            // The damaged frame was refused (a CRC32C mismatch) on a WAL stream the copy
            // reopened from the target's durable LSN: the records came again, intact.
            Ok(_) => sent_again += 1,
        }
        let staged: Vec<_> = staged_wal_records(&target_dir.path().join("migrations").join(&id).join("wal"))
            .into_iter()
            .map(|(lsn, vshard, _, payload)| (lsn, vshard, payload))
            .collect();
        assert_eq!(staged.len(), expected.len(), "{id}: staged records ({applied:?})");
        assert!(staged == expected, "{id}: the staged WAL differs from the vShard's records ({applied:?})");
    }
    println!(
        "{damaged} WAL batches damaged ({bursts} bursts over 32 bits): {failed} failed the copy \
         with a clear error (the resumed copy exact), {sent_again} were refused and streamed again within the copy; \
         every staged WAL exact"
    );
    target.stop();
}
