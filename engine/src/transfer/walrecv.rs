//! The target side of the WAL stream: stages the vShard's records durably, with group commit,
//! and tells the source the durable LSN after every batch.
//!
//! What it does: on the WAL stream of a transfer's connection, answers `WalStart` with the
//! staged WAL's durable LSN (the source resumes from the next record), then for each WAL
//! batch frame checks it, appends its records through [`StagedWal`] (one fdatasync per batch
//! via the storage seam) and answers `WalDurable`. One [`StagedWal`] per migration lives in
//! the [`WalStages`] table, so a reconnecting source continues the same staged WAL.
//!
//! What it does not: check that the records belong to the vShard (the source selects) or
//! renumber them (the database's importer applies them under its own LSNs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_wire::frame::FrameKind;
use ferry_wire::manifest::StagedWalSegment;
use ferry_wire::message::Message;
use ferry_wire::walstream;
use ferry_wire::{Lsn, MigrationId};
use quinn::{RecvStream, SendStream};

use super::framing::{read_body, read_control, read_header, unexpected, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::TransferError;
use crate::staging::StagingLayout;
use crate::storage::Storage;
use crate::wal::stage::{StageOptions, StagedRecord, StagedWal};

/// The staged WALs open on this node, by migration.
#[derive(Debug, Default)]
pub struct WalStages {
    open: Mutex<HashMap<MigrationId, Arc<Mutex<StagedWal>>>>,
}

impl WalStages {
    /// The staged WAL of a migration, opened (and recovered) on first use.
    pub fn get_or_open(
        &self,
        storage: &Arc<dyn Storage>,
        layout: &StagingLayout,
        id: &MigrationId,
        base_lsn: Lsn,
    ) -> Result<Arc<Mutex<StagedWal>>, TransferError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wal) = open.get(id) {
            return Ok(wal.clone());
        }
        let dir = wal_dir(layout);
        let (wal, report) = StagedWal::open(storage.clone(), &dir, StageOptions::new(base_lsn))
            .map_err(|e| TransferError::Local(format!("cannot open the staged WAL: {e}")))?;
        if report.truncated_bytes > 0 {
            tracing::info!(migration = %id, truncated_bytes = report.truncated_bytes, "cut a torn tail off the staged WAL");
        }
        let wal = Arc::new(Mutex::new(wal));
        open.insert(id.clone(), wal.clone());
        Ok(wal)
    }

    /// The manifest entries and durable LSN of a migration's staged WAL, if it has one.
    pub fn segments(&self, id: &MigrationId) -> Option<(Vec<StagedWalSegment>, Lsn)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let wal = open.get(id)?.lock().unwrap_or_else(|e| e.into_inner());
        Some((wal.segments(), wal.durable_lsn()))
    }

    pub fn forget(&self, id: &MigrationId) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// The staged WAL folder of a staging.
pub fn wal_dir(layout: &StagingLayout) -> std::path::PathBuf {
    layout.root.join("wal")
}

/// Serves one WAL stream until the source finishes it or the connection ends.
pub async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    wal: Arc<Mutex<StagedWal>>,
    on_durable: impl Fn(Lsn) + Send,
) -> Result<(), TransferError> {
    match read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES).await? {
        Some(Message::WalStart) => {}
        other => return Err(unexpected("wal_start", other.as_ref())),
    }
    let durable = wal.lock().unwrap_or_else(|e| e.into_inner()).durable_lsn();
    write_control(&mut send, &Message::WalDurable { durable_lsn: durable }).await?;
    while let Some(header) = read_header(&mut recv).await? {
        if header.kind != FrameKind::WalBatch {
            return Err(TransferError::Protocol(format!("a {:?} frame on the WAL stream", header.kind)));
        }
        let body = read_body(&mut recv, &header).await?;
        header.check_body(&body)?;
        let wal = wal.clone();
        let durable = tokio::task::spawn_blocking(move || -> Result<Lsn, TransferError> {
            let records = walstream::decode(&body).map_err(|e| TransferError::Malformed(e.to_string()))?;
            let staged: Vec<StagedRecord<'_>> = records
                .iter()
                .map(|r| StagedRecord { lsn: r.lsn, bytes: r.bytes, source_preamble: r.source_preamble })
                .collect();
            let mut wal = wal.lock().unwrap_or_else(|e| e.into_inner());
            wal.append_batch(&staged).map_err(|e| TransferError::Local(format!("staging WAL records: {e}")))
        })
        .await
        .map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))??;
        on_durable(durable);
        write_control(&mut send, &Message::WalDurable { durable_lsn: durable }).await?;
    }
    let _ = send.finish();
    Ok(())
}
