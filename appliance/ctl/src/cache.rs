//! `appliancectl cache ...`

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard, PoisonError};

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

/// The temporary file of the export being written. The signal thread of
/// [`clean_up_on_signals`] removes it; the rename takes it under the same
/// lock, so a finished export is never removed and a removed one never
/// renamed into place.
static PENDING_TMP: Mutex<Option<PathBuf>> = Mutex::new(None);

fn pending_tmp() -> MutexGuard<'static, Option<PathBuf>> {
    PENDING_TMP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The signals ignored by this process, from the `SigIgn:` line of
/// `/proc/self/status` (a hex mask, bit N-1 for signal N); none if it cannot
/// be read.
fn ignored_signals(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .unwrap_or(0)
}

/// The signals among `wanted` that this process does not ignore.
fn not_ignored(wanted: &[i32], ignored: u64) -> Vec<i32> {
    wanted
        .iter()
        .copied()
        .filter(|s| !(1..=64).contains(s) || ignored & (1 << (s - 1)) == 0)
        .collect()
}

/// From now on, SIGINT, SIGTERM or SIGHUP removes the pending temporary
/// file, then ends the process by that signal as it would have ended
/// without the watch. A signal the process was started ignoring (`nohup`
/// ignores SIGHUP; a shell's background job, SIGINT) is not watched: it
/// stays ignored and the export goes on. (The watch stays for the rest of
/// the process: a signal-hook handler, once removed, would leave the signal
/// ignored.)
fn clean_up_on_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let ignored = std::fs::read_to_string("/proc/self/status").map_or(0, |s| ignored_signals(&s));
    let watched = not_ignored(&[SIGINT, SIGTERM, SIGHUP], ignored);
    if watched.is_empty() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new(&watched)
        .context("cannot watch for SIGINT, SIGTERM and SIGHUP")?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            // Held until the process is gone.
            let mut pending = pending_tmp();
            if let Some(tmp) = pending.take() {
                let _ = std::fs::remove_file(tmp);
            }
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// Whether process `pid` exists. One of another user's (EPERM) counts.
fn process_exists(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// An exclusive lock on the file at `path` (not followed if a link), if
/// nobody else holds one.
fn lock_if_unheld(path: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

/// The `.NAME.tmp-PID` file an export by process `pid` writes for `name`.
fn tmp_name(name: &OsStr, pid: u32) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{pid}"));
    tmp
}

/// The PID in `file`, if it is a temporary file of an export to `name`.
fn tmp_pid(file: &OsStr, name: &OsStr) -> Option<i32> {
    let digits = file
        .as_bytes()
        .strip_prefix(b".")?
        .strip_prefix(name.as_bytes())?
        .strip_prefix(b".tmp-")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Only the name [`tmp_name`] gives: no leading zero ("007" is a file
    // appliancectl never wrote, whatever process 7 is).
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .filter(|p: &i32| *p > 0 && p.to_string().as_bytes() == digits)
}

/// Removes the temporary files of exports to `name` in `dir` whose process
/// is gone (a SIGKILL or a power cut gives no chance to clean up). A file of
/// a process that exists is left alone: it may be writing it.
fn remove_stale_temporaries(dir: &Path, name: &OsStr) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    for e in entries.flatten() {
        let Some(pid) = tmp_pid(&e.file_name(), name) else {
            continue;
        };
        // Our own is removed (as a leftover) before it is created.
        if pid == own || process_exists(pid) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        // Its writer may live where `kill` cannot see it (another PID
        // namespace, another host on a shared file system): a writer holds
        // an exclusive lock on its temporary file until it is renamed, so
        // only a file nobody holds is stale. Removed under our own lock.
        let Some(_stale) = lock_if_unheld(&e.path()) else {
            continue;
        };
        if std::fs::remove_file(e.path()).is_ok() {
            eprintln!(
                "appliancectl: removed {}, left by an export (process {pid}) that did not finish",
                e.path().display()
            );
        }
    }
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename,
/// fsync of the directory. The file gets the mode of the one it replaces, or
/// 0600 (an export holds cached responses). The temporary file is created
/// new, so a link planted under its name is not followed. SIGINT, SIGTERM
/// and SIGHUP remove it, and so does the next export once its process is
/// gone.
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
    let tmp = dir.join(tmp_name(name, std::process::id()));
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    clean_up_on_signals()?;
    remove_stale_temporaries(&dir, name);
    *pending_tmp() = Some(tmp.clone());
    let result = (|| {
        // A leftover of an interrupted export by a process of the same id.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", tmp.display()));
            }
            _ => {}
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // Held until the rename: it tells an export that cannot see this
        // process that the file is not stale (see remove_stale_temporaries).
        let mut f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .with_context(|| format!("cannot lock {}", tmp.display()))?;
        // The mode given at creation is narrowed by the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        {
            let mut pending = pending_tmp();
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename into {}", path.display()))?;
            *pending = None;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot fsync {}", dir.display()))
    })();
    if result.is_err() {
        let mut pending = pending_tmp();
        if pending.take().is_some() {
            let _ = std::fs::remove_file(&tmp);
        }
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
    fn temporary_files_are_told_by_target_and_pid() {
        let name = OsStr::new("cache.json");
        assert_eq!(tmp_name(name, 42), ".cache.json.tmp-42");
        assert_eq!(tmp_pid(OsStr::new(".cache.json.tmp-42"), name), Some(42));
        for other in [
            ".cache.json.tmp-",
            ".cache.json.tmp-0",
            ".cache.json.tmp-4x2",
            ".cache.json.tmp--1",
            ".cache.json.tmp-99999999999",
            ".cache.jsonx.tmp-42",
            ".other.json.tmp-42",
            "cache.json.tmp-42",
            ".cache.json.tmp-42.bak",
        ] {
            assert_eq!(tmp_pid(OsStr::new(other), name), None, "{other}");
        }
    }

    #[test]
    fn a_name_an_export_never_writes_is_not_its_temporary() {
        let name = OsStr::new("cache.json");
        for other in [
            ".cache.json.tmp-042",
            ".cache.json.tmp-00",
            ".cache.json.tmp-0001",
        ] {
            assert_eq!(tmp_pid(OsStr::new(other), name), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let padded = format!(".cache.json.tmp-0{gone}");
        std::fs::write(dir.path().join(&padded), "someone's").unwrap();
        remove_stale_temporaries(dir.path(), name);
        assert!(dir.path().join(&padded).exists(), "{padded} was removed");
    }

    #[test]
    fn only_the_temporaries_of_gone_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let name = OsStr::new("cache.json");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        for f in [
            tmp_name(name, gone),
            tmp_name(name, live),
            tmp_name(OsStr::new("other.json"), gone),
        ] {
            std::fs::write(dir.path().join(f), "partial").unwrap();
        }
        remove_stale_temporaries(dir.path(), name);
        assert!(!dir.path().join(tmp_name(name, gone)).exists());
        assert!(dir.path().join(tmp_name(name, live)).exists());
        assert!(dir
            .path()
            .join(tmp_name(OsStr::new("other.json"), gone))
            .exists());
    }

    #[test]
    fn ignored_signals_are_not_watched() {
        // SIGHUP (1) ignored, as under nohup; SIGPIPE (13) too.
        let status = "Name:\tappliancectl\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\nSigCgt:\t0000000000000000\n";
        assert_eq!(ignored_signals(status), 0x1001);
        assert_eq!(not_ignored(&[2, 15, 1], 0x1001), vec![2, 15]);
        assert_eq!(not_ignored(&[2, 15, 1], 0), vec![2, 15, 1]);
        assert_eq!(ignored_signals("nothing here"), 0);
    }

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
