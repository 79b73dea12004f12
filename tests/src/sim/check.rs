//! The simulator's invariants, checked after every step (and after each target restart).
//!
//! What it does: reads the target's machine and its files on the fake storage, and the
//! source's writer and records, and names the first invariant broken:
//! - a `released` staging is byte for byte the source's files, and only a release the source
//!   recorded (an offline commit, or a live copy's release at the same `final_lsn`) made it;
//! - a `fenced` or `released` staging's WAL holds exactly the migrating vShard's records in
//!   `(base_lsn, final_lsn]`, byte for byte as the writer wrote them (a fenced one from the
//!   fence's answer on, before its `fenced` MANIFEST commit);
//! - a release the source recorded is never refused by the target (a crash between the
//!   fence's answer and the release included: the target derives the fence);
//! - no write of the migrating vShard was acknowledged while its writes were paused;
//! - every claim belongs to a live connection, and no migration shows `receiving` without
//!   one (a phantom holding a slot);
//! - `bytes_resent` stays within its bound;
//! - after a restart, the staged WAL still holds every record the target acknowledged with
//!   `WalDurable` (a group is durable before its acknowledgement).
//!
//! What it does not: change anything; the restart's recorded-phase check is in `run`.

use std::path::Path;

use ferry_engine::staging::{self, StagingLayout};
use ferry_engine::storage::Storage;
use ferry_wire::manifest::StagingState;
use ferry_wire::proto::inbound::{ConnId, InboundState};
use ferry_wire::wal::{check_record, Layout};
use ferry_wire::{Lsn, MigrationId};

use super::run::{SourceRelease, World, CHUNK_LEN_BYTES, WINDOW_CHUNKS};

impl World {
    /// The invariants; the first one broken, if any.
    pub(super) fn check(&self) -> Option<String> {
        if let Some(broken) = &self.broken {
            return Some(broken.clone());
        }
        if let Some(lsn) = self.writer.acked_while_paused() {
            return Some(format!("the writer acknowledged record {lsn} of the vShard while its writes were paused"));
        }
        let live: Vec<ConnId> = self.conns.iter().map(|c| c.id).collect();
        let machine = self.target.ctx.machine();
        for (id, m) in machine.iter() {
            let claimant = machine.claimant(id);
            if let Some(c) = claimant {
                if !live.contains(&c) {
                    return Some(format!("{id} is claimed by conn {}, which is gone", c.0));
                }
            }
            if m.state == InboundState::Receiving && claimant.is_none() {
                return Some(format!("{id} shows receiving with no connection: a phantom holding a slot"));
            }
            if let InboundState::Released { final_lsn } = m.state {
                let Some(release) = self.released_by_source.get(id) else {
                    return Some(format!("{id} is released on the target, but the source never released it"));
                };
                if release.final_lsn.is_some() && release.final_lsn != final_lsn {
                    return Some(format!(
                        "{id} is released at {final_lsn:?} on the target, the source released it at {:?}",
                        release.final_lsn
                    ));
                }
                if let Some(v) = self.released_differs(id, release) {
                    return Some(v);
                }
            }
            let fenced = match m.state {
                // Fenced in memory from the answer on; its MANIFEST commit may not be there yet.
                InboundState::Fenced { final_lsn } => Some((final_lsn, Listed::Folder)),
                InboundState::Released { final_lsn: Some(final_lsn) } => Some((final_lsn, Listed::Manifest)),
                _ => None,
            };
            if let Some((final_lsn, listed)) = fenced {
                if let Some(v) = self.staged_wal_differs(id, final_lsn, listed) {
                    return Some(v);
                }
            }
            let bound = (self.failures_count + 1) * (WINDOW_CHUNKS as u64 + 4) * u64::from(CHUNK_LEN_BYTES);
            if m.bytes_resent > bound {
                return Some(format!("{id} resent {} bytes, over the bound of {bound}", m.bytes_resent));
            }
        }
        None
    }

    /// After a restart: whether a staged WAL lost a record the target acknowledged.
    pub(super) fn acked_lost(&self) -> Option<String> {
        let machine = self.target.ctx.machine();
        for (id, acked) in &self.acked {
            // An abort (its tombstone durable) removes the staged WAL with the staging.
            if machine.get(id).is_none_or(|m| matches!(m.state, InboundState::Aborted { .. })) {
                continue;
            }
            let dir = self.target.layout(id).root.join("wal");
            let records = staged_records(&*self.target.ctx.storage, &dir, self.writer.layout, None);
            let last = records.last().map(|(lsn, _)| *lsn);
            if last.is_none_or(|last| last < *acked) {
                return Some(format!(
                    "{id}: the target acknowledged its staged WAL durable up to {acked}, but after a restart it ends at {last:?}"
                ));
            }
        }
        None
    }

    /// Whether a released staging's files differ from the source's.
    fn released_differs(&self, id: &MigrationId, release: &SourceRelease) -> Option<String> {
        let storage = &*self.target.ctx.storage;
        let layout = self.target.layout(id);
        let manifest = match staging::read_manifest(storage, &layout) {
            Ok(Some(m)) => m,
            other => return Some(format!("released {id} has no readable manifest: {other:?}")),
        };
        if manifest.state != StagingState::Released {
            return Some(format!("released {id}'s manifest says {:?}", manifest.state));
        }
        for (segment, source) in manifest.segments.iter().zip(&release.files) {
            match storage.read_all(&layout.segment_path(&segment.path)) {
                Ok(bytes) if bytes == *source => {}
                Ok(_) => return Some(format!("released {id}: {} differs from the source", segment.path)),
                Err(e) => return Some(format!("released {id}: {} unreadable: {e}", segment.path)),
            }
        }
        None
    }

    /// Whether a fenced or released staging's WAL differs from the vShard's records in
    /// `(base_lsn, final_lsn]` on the source: the staged WAL folder of a fenced one (its
    /// `fenced` commit follows the answer), the segments the manifest lists for a released one
    /// (which must be released at `final_lsn`).
    fn staged_wal_differs(&self, id: &MigrationId, final_lsn: Lsn, listed: Listed) -> Option<String> {
        let storage = &*self.target.ctx.storage;
        let layout: StagingLayout = self.target.layout(id);
        let manifest = match staging::read_manifest(storage, &layout) {
            Ok(Some(m)) => m,
            other => return Some(format!("fenced {id} has no readable manifest: {other:?}")),
        };
        let dir = layout.root.join("wal");
        let mut staged = Vec::new();
        match listed {
            Listed::Folder => staged = staged_records(storage, &dir, self.writer.layout, None),
            Listed::Manifest => {
                if manifest.final_lsn != Some(final_lsn) {
                    return Some(format!(
                        "{id} is released at {final_lsn}, its manifest says {:?}",
                        manifest.final_lsn
                    ));
                }
                for segment in &manifest.wal_segments {
                    let path = dir.join(&segment.name);
                    let one = staged_records(storage, &path, self.writer.layout, Some(segment.size_bytes));
                    staged.extend(one);
                }
            }
        }
        let expected: Vec<(Lsn, Vec<u8>)> = self
            .writer
            .records
            .iter()
            .filter(|r| r.vshard == super::writer::VSHARD && r.lsn > manifest.base_lsn && r.lsn <= final_lsn)
            .map(|r| (r.lsn, r.bytes.clone()))
            .collect();
        if staged != expected {
            let staged_lsns: Vec<u64> = staged.iter().map(|(l, _)| l.0).collect();
            let expected_lsns: Vec<u64> = expected.iter().map(|(l, _)| l.0).collect();
            return Some(format!(
                "{id} ({listed:?}, MANIFEST {:?}, at {final_lsn}): the staged WAL holds {staged_lsns:?}, the source's records in ({}, {final_lsn}] are {expected_lsns:?}",
                manifest.state, manifest.base_lsn
            ));
        }
        None
    }
}

/// Where the check reads a staged WAL from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// Every segment file of the staged WAL folder (a staging fenced in memory).
    Folder,
    /// The segments `MANIFEST.json` lists, each up to its listed size (a released staging).
    Manifest,
}

/// The records of a staged WAL file (`size_bytes`: its size in the manifest), or of every file
/// of a staged WAL folder in name order, as far as they decode.
fn staged_records(storage: &dyn Storage, path: &Path, layout: Layout, size_bytes: Option<u64>) -> Vec<(Lsn, Vec<u8>)> {
    let files: Vec<std::path::PathBuf> = match size_bytes {
        Some(_) => vec![path.to_path_buf()],
        None => {
            let mut names = storage.list_dir(path).unwrap_or_default();
            names.sort();
            names.into_iter().map(|n| path.join(n)).collect()
        }
    };
    let mut out = Vec::new();
    for file in files {
        let Ok(mut bytes) = storage.read_all(&file) else { continue };
        if let Some(size) = size_bytes.and_then(|s| usize::try_from(s).ok()) {
            bytes.truncate(size);
        }
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
            let Ok((header, len)) = check_record(layout, rest) else { break };
            out.push((header.lsn, rest.get(..len).unwrap_or_default().to_vec()));
            at += len;
        }
    }
    out
}
