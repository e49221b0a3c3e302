//! `appliancectl sync client ...`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use appliance_types::control::{Request, Response};
use appliance_types::sync::{SyncClient, SyncRequest, SyncResponse};
use clap::Subcommand;

use crate::{print_json, Client};

#[derive(Debug, Subcommand)]
pub(crate) enum SyncCmd {
    /// Enrolled sync clients (laptops).
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ClientCmd {
    /// Enroll a client and write its identity bundle (needs admin rights).
    Add {
        /// Client name: lower-case letters, digits, `-` and `_`.
        name: String,
        /// Quota for its documents: bytes, or with K, M, G or T (powers of 1024).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        quota: Option<u64>,
        /// Where to write the bundle (mode 0600). Default: ./NAME.bundle
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List clients, revoked ones included.
    List,
    /// Revoke a client: refused from now on, live connections closed
    /// (needs admin rights).
    Revoke {
        /// Client name.
        name: String,
    },
}

/// Parses `10G`, `512M`, `1.5T`, `4096` into bytes (powers of 1024).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("{text:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 500M, 10G)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a size"));
    }
    #[allow(clippy::cast_precision_loss)]
    let bytes = value * mult as f64;
    #[allow(clippy::cast_precision_loss)]
    if bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes.round() as u64)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn line(c: &SyncClient) -> String {
    let quota = c
        .quota
        .map_or_else(|| "no quota".to_owned(), |q| format!("quota {}", human(q)));
    let state = match c.revoked_at {
        Some(_) => "REVOKED".to_owned(),
        None => format!("{} connections", c.connections),
    };
    format!(
        "{:<20} used {} / {}  {}  {}",
        c.name,
        human(c.used),
        quota,
        state,
        c.storage
    )
}

/// Creates the bundle file with mode 0600, refusing to overwrite an existing
/// file. It is created before the daemon is asked to enroll, so a path that
/// cannot be written costs nothing.
fn create_bundle(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Writes the bundle into the file [`create_bundle`] made.
fn write_bundle(mut f: std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    f.write_all(bytes)?;
    f.sync_all()
}

pub(crate) fn run(client: &mut Client, cmd: &SyncCmd, json: bool) -> anyhow::Result<ExitCode> {
    let SyncCmd::Client(cmd) = cmd;
    match cmd {
        ClientCmd::Add { name, quota, out } => {
            let path = out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{name}.bundle")));
            if path.symlink_metadata().is_ok() {
                bail!("{} already exists; choose another --out", path.display());
            }
            let file = create_bundle(&path)?;
            let req = Request::Sync(SyncRequest::ClientAdd {
                name: name.clone(),
                quota: *quota,
            });
            let answer = client.request(&req);
            if !matches!(answer, Ok(Response::Sync(SyncResponse::Enrolled { .. }))) {
                let _ = std::fs::remove_file(&path);
            }
            let answer = answer.map_err(|e| {
                if e.downcast_ref::<appliance_types::control::ControlError>()
                    .is_some()
                {
                    e
                } else {
                    // No answer: the daemon may have enrolled it all the same.
                    e.context(format!(
                        "no answer from applianced to enrolling {name}; if `appliancectl sync \
                         client list` shows it, revoke it and add it again"
                    ))
                }
            })?;
            match answer {
                Response::Sync(SyncResponse::Enrolled { client, bundle }) => {
                    if let Err(e) = write_bundle(file, &bundle) {
                        // A part of a bundle is no use; the next try needs the name free.
                        let _ = std::fs::remove_file(&path);
                        return Err(anyhow::Error::new(e).context(format!(
                            "{name} was enrolled, but its bundle could not be written to {}; \
                             revoke it (`appliancectl sync client revoke {name}`) and add it again",
                            path.display()
                        )));
                    }
                    if json {
                        print_json(&serde_json::json!({ "client": client, "bundle": path }))?;
                    } else {
                        println!(
                            "enrolled {} (fingerprint {})",
                            client.name, client.fingerprint
                        );
                        println!(
                            "identity bundle: {} (keep it private; it holds the client's key)",
                            path.display()
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        ClientCmd::List => match client.request(&Request::Sync(SyncRequest::ClientList))? {
            Response::Sync(SyncResponse::Clients(list)) => {
                if json {
                    print_json(&list)?;
                } else if list.is_empty() {
                    println!("no clients enrolled");
                } else {
                    for c in &list {
                        println!("{}", line(c));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            other => bail!("unexpected answer from applianced: {other:?}"),
        },
        ClientCmd::Revoke { name } => {
            match client.request(&Request::Sync(SyncRequest::ClientRevoke {
                name: name.clone(),
            }))? {
                Response::Sync(SyncResponse::Revoked(c)) => {
                    if json {
                        print_json(&c)?;
                    } else {
                        println!("revoked {}", c.name);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
