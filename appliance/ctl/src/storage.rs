//! `appliancectl storage ...`

use std::process::ExitCode;

use anyhow::bail;
use appliance_types::control::{Request, Response};
use appliance_types::storage::{
    PoolReport, ScrubCommand, ScrubStatus, StorageLayout, StorageReport, StorageRequest,
    StorageResponse,
};
use clap::Subcommand;

use crate::sync::parse_size;
use crate::{print_json, Client};

#[derive(Debug, Subcommand)]
pub(crate) enum StorageCmd {
    /// Status, free/used/total space, redundancy and datasets.
    Report,
    /// Disks: bays, serials, sizes, pool membership and state.
    Disks,
    /// Dataset quotas.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// Scrubs: start, pause, resume, stop, status.
    Scrub {
        /// What to do.
        #[arg(value_parser = ["start", "pause", "resume", "stop", "status"])]
        action: String,
        /// Pool.
        pool: String,
    },
    /// Replace a disk of a pool and start the resilver (needs admin rights).
    Replace {
        /// Pool.
        pool: String,
        /// The disk to replace.
        old: String,
        /// The new disk, as /dev/disk/by-id/...
        new: String,
        /// Accept a disk with partitions or filesystem signatures (they are lost).
        #[arg(long)]
        force: bool,
    },
    /// Create a pool and the standard datasets (needs admin rights).
    CreatePool {
        /// Pool name.
        name: String,
        /// raidz1, raidz2, raidz3 or mirror.
        #[arg(long, default_value = "raidz2", value_parser = parse_layout)]
        layout: StorageLayout,
        /// Disks as /dev/disk/by-id/... paths.
        #[arg(required = true)]
        disks: Vec<String>,
        /// Accept disks with partitions or filesystem signatures (they are lost).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum QuotaCmd {
    /// Show quotas and usage (one dataset, or all).
    Get {
        /// Dataset, e.g. tank/documents.
        dataset: Option<String>,
    },
    /// Set a quota: a size (500G, 2T) or `none` (needs admin rights).
    Set {
        /// Dataset.
        dataset: String,
        /// Size, or `none`.
        size: String,
    },
}

fn parse_layout(s: &str) -> Result<StorageLayout, String> {
    StorageLayout::parse(s)
        .ok_or_else(|| format!("{s:?} is not a layout (raidz1, raidz2, raidz3, mirror)"))
}

fn tb(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let t = bytes as f64 / 1e12;
    format!("{t:.3} TB")
}

fn print_pool(p: &PoolReport) {
    println!("pool {}: {} ({})", p.name, p.status, p.state);
    println!("  redundancy  {}", p.redundancy);
    println!(
        "  space       {} free, {} used, {} total ({} / {} / {} bytes)",
        tb(p.free_bytes),
        tb(p.used_bytes),
        tb(p.total_bytes),
        p.free_bytes,
        p.used_bytes,
        p.total_bytes
    );
    for r in &p.reasons {
        println!("  ! {r}");
    }
    if let Some(s) = &p.scan {
        println!(
            "  {:?} {:?}: {:.1}%, {} repaired, {} errors",
            s.kind, s.phase, s.percent, s.repaired_bytes, s.errors
        );
    }
    for d in &p.datasets {
        let quota = d
            .quota_bytes
            .map_or_else(|| "no quota".to_owned(), |q| format!("quota {q}"));
        println!(
            "  {:<24} used {:>14}  avail {:>14}  {}{}",
            d.name,
            d.used_bytes,
            d.available_bytes,
            quota,
            if d.encrypted { "  encrypted" } else { "" }
        );
    }
}

fn print_report(r: &StorageReport) {
    println!("storage: {}  {}", r.status, r.redundancy);
    println!("  {} free of {}", tb(r.free_bytes), tb(r.total_bytes));
    for reason in &r.reasons {
        println!("  ! {reason}");
    }
    for p in &r.pools {
        print_pool(p);
    }
}

fn print_scrub(s: &ScrubStatus) {
    match &s.scan {
        Some(scan) => println!(
            "{}: {:?} {:?} {:.1}% ({} of {} bytes), {} repaired, {} errors{}",
            s.pool,
            scan.kind,
            scan.phase,
            scan.percent,
            scan.issued_bytes,
            scan.total_bytes,
            scan.repaired_bytes,
            scan.errors,
            scan.eta_secs
                .map_or_else(String::new, |e| format!(", ETA {e}s"))
        ),
        None => println!("{}: no scrub has run", s.pool),
    }
    println!("schedule: {}", s.schedule);
}

fn expect(r: Response) -> anyhow::Result<StorageResponse> {
    match r {
        Response::Storage(s) => Ok(s),
        other => bail!("unexpected answer from applianced: {other:?}"),
    }
}

pub(crate) fn run(client: &mut Client, cmd: &StorageCmd, json: bool) -> anyhow::Result<ExitCode> {
    let req = match cmd {
        StorageCmd::Report => StorageRequest::Report,
        StorageCmd::Disks => StorageRequest::Disks,
        StorageCmd::Quota(QuotaCmd::Get { dataset }) => StorageRequest::QuotaGet {
            dataset: dataset.clone(),
        },
        StorageCmd::Quota(QuotaCmd::Set { dataset, size }) => StorageRequest::QuotaSet {
            dataset: dataset.clone(),
            bytes: if size == "none" {
                None
            } else {
                Some(parse_size(size).map_err(anyhow::Error::msg)?)
            },
        },
        StorageCmd::Scrub { action, pool } => {
            let command = match action.as_str() {
                "start" => ScrubCommand::Start,
                "pause" => ScrubCommand::Pause,
                "resume" => ScrubCommand::Resume,
                "stop" => ScrubCommand::Stop,
                _ => {
                    let r = expect(client.request(&Request::Storage(
                        StorageRequest::ScrubStatus { pool: pool.clone() },
                    ))?)?;
                    return finish(&r, json);
                }
            };
            StorageRequest::Scrub {
                pool: pool.clone(),
                command,
            }
        }
        StorageCmd::Replace {
            pool,
            old,
            new,
            force,
        } => StorageRequest::Replace {
            pool: pool.clone(),
            old: old.clone(),
            new: new.clone(),
            force: *force,
        },
        StorageCmd::CreatePool {
            name,
            layout,
            disks,
            force,
        } => StorageRequest::CreatePool {
            name: name.clone(),
            layout: *layout,
            disks: disks.clone(),
            force: *force,
        },
    };
    client.answer_within(req.answer_within())?;
    let r = expect(client.request(&Request::Storage(req))?)?;
    finish(&r, json)
}

fn finish(r: &StorageResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let doc = match r {
            StorageResponse::Report(x) => serde_json::to_value(x)?,
            StorageResponse::Disks(x) => serde_json::to_value(x)?,
            StorageResponse::Quotas(x) => serde_json::to_value(x)?,
            StorageResponse::Scrub(x) => serde_json::to_value(x)?,
            StorageResponse::Done(x) => serde_json::json!({ "done": x }),
            StorageResponse::PoolCreated(x) => serde_json::to_value(x)?,
        };
        print_json(&doc)?;
        return Ok(ExitCode::SUCCESS);
    }
    match r {
        StorageResponse::Report(x) => print_report(x),
        StorageResponse::Disks(list) => {
            for d in list {
                println!(
                    "{:<28} {:<6} {:<12} {:>14} bytes  pool {:<8} {}{}",
                    d.id,
                    d.bay.as_deref().unwrap_or("-"),
                    d.serial.as_deref().unwrap_or("-"),
                    d.size_bytes,
                    d.pool.as_deref().unwrap_or("-"),
                    d.state.as_deref().unwrap_or("-"),
                    if d.boot { "  (boot disk)" } else { "" }
                );
                for p in &d.problems {
                    println!("    {p}");
                }
            }
        }
        StorageResponse::Quotas(list) => {
            for q in list {
                let quota = q
                    .quota_bytes
                    .map_or_else(|| "none".to_owned(), |b| b.to_string());
                println!(
                    "{:<28} quota {:>14}  used {:>14} ({:.1}%)  available {}",
                    q.dataset, quota, q.used_bytes, q.used_percent, q.available_bytes
                );
            }
        }
        StorageResponse::Scrub(s) => print_scrub(s),
        StorageResponse::Done(msg) => println!("{msg}"),
        StorageResponse::PoolCreated(o) => {
            println!(
                "pool {} {:?}{}: datasets {}",
                o.pool,
                o.state,
                if o.already_done {
                    " (already done)"
                } else if o.resumed {
                    " (resumed)"
                } else {
                    ""
                },
                o.datasets.join(", ")
            );
            println!(
                "encryption key: {} (keep a copy off the appliance)",
                o.key_file
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
