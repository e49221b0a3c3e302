//! `appliancectl cache ...`

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use appliance_types::cache::{CacheRequest, CacheResponse};
use appliance_types::control::{Request, Response};
use base64::Engine as _;
use clap::Subcommand;

use crate::{print_json, Client};

/// Largest piece an import is sent in.
const IMPORT_PIECE: usize = 256 * 1024;

/// Room for the envelope around an import piece in a control frame (the
/// request's variant tags and the piece's length take at most 7 bytes).
const PIECE_ENVELOPE: usize = 64;

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCmd {
    /// Look up a response; exits 1 on a miss. Writes the response's bytes as
    /// they are; with --json, "response" holds it if it is UTF-8, else
    /// "response_base64" does.
    Get {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// Model name and parameters.
        #[arg(long, default_value = "")]
        variant: String,
    },
    /// Store a response (needs admin rights).
    Put {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// The response text.
        #[arg(
            long,
            conflicts_with = "response_file",
            required_unless_present = "response_file"
        )]
        response: Option<String>,
        /// Read the response from this file.
        #[arg(long, value_name = "FILE")]
        response_file: Option<PathBuf>,
        /// Time to live in seconds, at least 1 (default: the configured TTL).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        ttl: Option<u64>,
        /// Model name and parameters.
        #[arg(long, default_value = "")]
        variant: String,
    },
    /// Hits, misses, hit rate, collisions, evictions, expirations, size.
    Stats,
    /// Drop one response, or every response of an agent (needs admin rights).
    Invalidate {
        /// Agent id.
        agent: String,
        /// Prompt; without it every response of the agent goes.
        prompt: Option<String>,
        /// Model name and parameters.
        #[arg(long, default_value = "")]
        variant: String,
    },
    /// Load entries from a JSON file (md5-hex keys to responses, or to
    /// objects with agent, prompt and response, or response_base64 for a
    /// response that is not UTF-8). Needs admin rights.
    Import {
        /// The JSON file.
        file: PathBuf,
    },
    /// Write every entry to a JSON file (replaced atomically).
    Export {
        /// The JSON file.
        file: PathBuf,
    },
}

fn expect_cache(r: Response) -> anyhow::Result<CacheResponse> {
    match r {
        Response::Cache(c) => Ok(c),
        other => bail!("unexpected answer from applianced: {other:?}"),
    }
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename,
/// fsync of the directory. The file gets the mode of the one it replaces, or
/// 0600 (an export holds cached responses). The temporary file is created
/// new, so a link planted under its name is not followed.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let result = (|| {
        // A leftover of an interrupted export by a process of the same id.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", tmp.display()));
            }
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // The mode given at creation is narrowed by the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename into {}", path.display()))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot fsync {}", dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Sends a [`CacheRequest::GetPieces`] and gathers the hit's pieces; `None`
/// on a miss.
fn get_in_pieces(client: &mut Client, req: &Request) -> anyhow::Result<Option<Vec<u8>>> {
    let len = match expect_cache(client.request(req)?)? {
        CacheResponse::Miss => return Ok(None),
        CacheResponse::HitLen(len) => len,
        other => bail!("unexpected answer from applianced: {other:?}"),
    };
    let len = usize::try_from(len).context("applianced announced a response too large to hold")?;
    // Grown as pieces arrive rather than trusting the announced length.
    let mut v = Vec::new();
    while v.len() < len {
        match expect_cache(client.next_response()?)? {
            CacheResponse::HitPiece(p) if p.len() <= len - v.len() => v.extend_from_slice(&p),
            CacheResponse::HitPiece(_) => {
                bail!("applianced sent more than the {len} bytes it announced")
            }
            other => bail!("unexpected answer from applianced: {other:?}"),
        }
    }
    Ok(Some(v))
}

/// The JSON document of a hit: `response` when the bytes are UTF-8, else
/// `response_base64` (standard alphabet, padded), never a lossy string.
fn hit_json(v: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(v) {
        Ok(text) => serde_json::json!({ "hit": true, "response": text }),
        Err(_) => serde_json::json!({
            "hit": true,
            "response_base64": base64::engine::general_purpose::STANDARD.encode(v),
        }),
    }
}

/// Where the response of a `cache put` comes from.
enum PutSource {
    /// Given on the command line, or read whole from something that is not a
    /// regular file (a pipe has no length to announce).
    Bytes(Vec<u8>),
    /// A regular file, read once the daemon took its length.
    File {
        path: PathBuf,
        file: std::fs::File,
        len: u64,
    },
}

impl PutSource {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.is_file() {
            return Ok(PutSource::File {
                path: path.to_owned(),
                file,
                len: meta.len(),
            });
        }
        let mut v = Vec::new();
        file.read_to_end(&mut v)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(PutSource::Bytes(v))
    }

    fn len(&self) -> u64 {
        match self {
            PutSource::Bytes(v) => v.len() as u64,
            PutSource::File { len, .. } => *len,
        }
    }

    /// The response; a file whose length changed since it was announced is
    /// an error (and nothing is stored: its pieces are never all sent).
    fn read(self) -> anyhow::Result<Vec<u8>> {
        match self {
            PutSource::Bytes(v) => Ok(v),
            PutSource::File { path, file, len } => {
                let mut v = Vec::new();
                file.take(len.saturating_add(1))
                    .read_to_end(&mut v)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if v.len() as u64 != len {
                    bail!(
                        "{} changed size while being stored ({len} bytes, then {}); nothing \
                         was stored",
                        path.display(),
                        v.len()
                    );
                }
                Ok(v)
            }
        }
    }
}

pub(crate) fn run(client: &mut Client, cmd: &CacheCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        CacheCmd::Get {
            agent,
            prompt,
            variant,
        } => {
            let req = Request::Cache(CacheRequest::GetPieces {
                agent: agent.clone(),
                prompt: prompt.clone(),
                variant: variant.clone(),
            });
            let Some(v) = get_in_pieces(client, &req)? else {
                if json {
                    print_json(&serde_json::json!({ "hit": false }))?;
                } else {
                    eprintln!("miss");
                }
                return Ok(ExitCode::FAILURE);
            };
            if json {
                print_json(&hit_json(&v))?;
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                // Exactly the response's bytes, unless a person reads them.
                if out.is_terminal() && !v.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCmd::Put {
            agent,
            prompt,
            response,
            response_file,
            ttl,
            variant,
        } => {
            let source = match (response, response_file) {
                (Some(r), _) => PutSource::Bytes(r.clone().into_bytes()),
                (None, Some(f)) => PutSource::open(f)?,
                (None, None) => bail!("give --response TEXT or --response-file FILE"),
            };
            let start = CacheRequest::PutPieces {
                agent: agent.clone(),
                prompt: prompt.clone(),
                variant: variant.clone(),
                len: source.len(),
                ttl_secs: *ttl,
            };
            match expect_cache(client.request(&Request::Cache(start))?)? {
                CacheResponse::PutReady => {}
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
            // The daemon took the announced length; only now is the file
            // read (a regular file, at most one value).
            let response = source.read()?;
            let piece = (client.max_frame as usize)
                .saturating_sub(PIECE_ENVELOPE)
                .clamp(1, IMPORT_PIECE);
            for p in response.chunks(piece) {
                client.send(&Request::Cache(CacheRequest::PutPiece(p.to_vec())))?;
            }
            match expect_cache(client.next_response()?)? {
                CacheResponse::Stored => {
                    if json {
                        print_json(&serde_json::json!({ "stored": true }))?;
                    } else {
                        println!("stored");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        CacheCmd::Stats => {
            match expect_cache(client.request(&Request::Cache(CacheRequest::Stats))?)? {
                CacheResponse::Stats(s) => {
                    if json {
                        print_json(&s)?;
                    } else {
                        println!("entries      {}", s.entries);
                        println!("bytes        {} of {}", s.bytes, s.capacity_bytes);
                        println!("hits         {}", s.hits);
                        println!("misses       {}", s.misses);
                        println!("hit rate     {:.1}%", s.hit_rate * 100.0);
                        println!("collisions   {}", s.collisions);
                        println!("evictions    {}", s.evictions);
                        println!("expirations  {}", s.expirations);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        CacheCmd::Invalidate {
            agent,
            prompt,
            variant,
        } => {
            let req = Request::Cache(CacheRequest::Invalidate {
                agent: agent.clone(),
                prompt: prompt.clone(),
                variant: variant.clone(),
            });
            match expect_cache(client.request(&req)?)? {
                CacheResponse::Invalidated(n) => {
                    if json {
                        print_json(&serde_json::json!({ "invalidated": n }))?;
                    } else {
                        println!("{n} entries invalidated");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        CacheCmd::Import { file } => {
            let mut f = std::fs::File::open(file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            client.send(&Request::Cache(CacheRequest::Import))?;
            // Pieces that fit the daemon's frame limit (1 KiB and up).
            let piece = (client.max_frame as usize)
                .saturating_sub(PIECE_ENVELOPE)
                .clamp(1, IMPORT_PIECE);
            let mut buf = vec![0u8; piece];
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                client.send(&Request::Cache(CacheRequest::ImportChunk(
                    buf[..n].to_vec(),
                )))?;
                if n == 0 {
                    break;
                }
            }
            match expect_cache(client.next_response()?)? {
                CacheResponse::Imported(r) => {
                    if json {
                        print_json(&r)?;
                    } else {
                        println!(
                            "imported {} agent entries and {} plain keys ({} re-keyed, {} already expired, {} refused)",
                            r.agent_entries, r.plain_entries, r.rekeyed, r.expired, r.refused
                        );
                        for k in &r.refused_keys {
                            println!("  refused: {k}");
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        CacheCmd::Export { file } => {
            client.send(&Request::Cache(CacheRequest::Export))?;
            let mut summary = None;
            write_atomically(file, |f| loop {
                match expect_cache(client.next_response()?)? {
                    CacheResponse::ExportChunk(piece) => f.write_all(&piece)?,
                    CacheResponse::Exported {
                        written,
                        skipped_binary,
                    } => {
                        summary = Some((written, skipped_binary));
                        return Ok(());
                    }
                    other => bail!("unexpected answer from applianced: {other:?}"),
                }
            })?;
            let (written, skipped) = summary.context("the export ended without a summary")?;
            if json {
                print_json(
                    &serde_json::json!({ "file": file, "written": written, "skipped_binary": skipped }),
                )?;
            } else {
                println!("exported {written} entries to {}", file.display());
                if skipped > 0 {
                    println!(
                        "skipped {skipped} entries whose key, agent, prompt or variant is not \
                         UTF-8 (JSON cannot hold it)"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_is_never_a_lossy_string() {
        assert_eq!(
            hit_json("héllo".as_bytes()),
            serde_json::json!({ "hit": true, "response": "héllo" })
        );
        assert_eq!(
            hit_json(b"\xff\xfebin"),
            serde_json::json!({ "hit": true, "response_base64": "//5iaW4=" })
        );
        assert_eq!(
            hit_json(b""),
            serde_json::json!({ "hit": true, "response": "" })
        );
    }
}
