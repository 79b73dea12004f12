//! `ferry certs`: development certificates.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_wire::NodeId;

use super::out::outln;
use crate::certs::{self, IssueOptions};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a development cluster CA in DIR (ca.pem, ca-key.pem).
    Init {
        /// The certificate folder (made if missing), e.g. /etc/ferry/certs; `ferry serve --certs`
        /// and `certs_dir` in its config name it.
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every node certificate signed by it stops working).
        #[arg(long)]
        force: bool,
    },
    /// Make a node certificate and key signed by the CA in DIR (<name>.pem, <name>-key.pem).
    Issue {
        /// The certificate folder holding the CA made by `ferry certs init`; the node's
        /// certificate and key are written there.
        #[arg(long)]
        dir: PathBuf,
        /// The node id: the certificate's name, which peers expect.
        #[arg(long)]
        name: String,
        /// More subject alternative names (DNS names or IP addresses); repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, force } => {
            let paths = certs::init_ca(&dir, force)?;
            outln!("cluster CA: {} (key {})", paths.cert.display(), paths.key.display())?;
        }
        CertsCommand::Issue { dir, name, sans, days } => {
            let name = NodeId::new(name).context("invalid --name")?;
            let options = IssueOptions { extra_sans: sans, validity_days: days, ..IssueOptions::default() };
            let paths = certs::issue(&dir, &name, &options)?;
            outln!("node {name}: {} (key {})", paths.cert.display(), paths.key.display())?;
        }
    }
    Ok(())
}
