//! The sync benchmark of issue 7, in one run, over 127.0.0.1 only:
//!
//! - workloads: (a) one 1 GiB file, (b) 2,000 files of 32 KiB, (c) a
//!   re-push of (a) unchanged;
//! - peers: `rsync -a -e ssh` and `scp` to a throwaway `sshd` this bench
//!   starts itself (own host key, own authorized key, own config, a free
//!   high port, `/usr/sbin/sshd -D`), and a bare quinn stream sink (one
//!   connection, one stream, data discarded by the server; same TLS configs,
//!   transport settings and 4 MiB UDP buffers as ours): the QUIC ceiling;
//! - ours: the real server ([`serve`]) and the real client library
//!   ([`SyncClient::push`]) on real files in a temp dir, fsync included.
//!
//! ```text
//! cargo bench -p appliance-sync --bench sync_bench
//! ```
//! Environment: `SYNC_BENCH_REPS` (default 3; the median is reported),
//! `SYNC_BENCH_MIB` (size of (a), default 1024), `SYNC_BENCH_FILES` (count
//! of (b), default 2000), `SYNC_BENCH_DIR` (parent of the temp dir,
//! default the system temp dir), `SYNC_BENCH_SKIP_SSH=1` (no rsync/scp).
//!
//! Fairness notes printed with the table: rsync and scp do not fsync what
//! they write; ours fsyncs every document and its directory. Ours and the
//! sink run in this process on one 2-worker tokio runtime; client and server
//! share the machine's cores, as rsync/ssh/sshd do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use anyhow::{bail, Context as _};
use appliance_sync::admission::{LocalAdmission, UsageLedger};
use appliance_sync::client::{ClientOptions, NoProgress, SyncClient};
use appliance_sync::events::NullSink;
use appliance_sync::identity::{Authority, Bundle, ClientName};
use appliance_sync::server::{
    serve, set_udp_buffers, transport_config, ServerConfig, Services, SyncServer,
};
use appliance_sync::store::Documents;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Incompressible pseudo-random bytes (xorshift64*), written in 8 MiB blocks.
fn write_random_file(path: &Path, len: usize, seed: u64) -> anyhow::Result<()> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let mut block = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.flush()?;
    file.get_ref().sync_all()?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One measured cell of the table.
#[derive(Debug, Clone, Copy)]
struct Cell {
    time: Duration,
    bytes: u64,
    /// Bytes on the wire, when known.
    wire: Option<u64>,
}

impl Cell {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.time.as_secs_f64() / 1e9
    }
}

// ---------------------------------------------------------------- sshd

/// A throwaway sshd on 127.0.0.1 with its own keys and config. Killed (by
/// its pid, which we started) on drop.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn free_tcp_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Sshd {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            bail!("/usr/sbin/sshd is missing: apt-get install openssh-server rsync");
        }
        std::fs::create_dir_all(dir)?;
        let host_key = dir.join("host_ed25519");
        let key = dir.join("client_ed25519");
        for k in [&host_key, &key] {
            let _ = std::fs::remove_file(k);
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k))?;
        }
        let authorized = dir.join("authorized_keys");
        std::fs::copy(key.with_extension("pub"), &authorized)?;
        // sshd's privilege separation directory; Debian creates it from its
        // service unit, which this bench does not use.
        if !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd")?;
        }
        let port = free_tcp_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\n\
                 AuthorizedKeysFile {auth}\nPidFile {pid}\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
                 Subsystem sftp internal-sftp\nLogLevel ERROR\n",
                host = host_key.display(),
                auth = authorized.display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )?;
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Our readiness probe makes sshd log a closed connection.
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd")?;
        let mut sshd = Self { child, port, key };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sshd.child.try_wait()? {
                bail!("sshd exited: {status}");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("sshd did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // One round trip proves the keys work.
        run(Command::new("ssh")
            .args(sshd.ssh_args())
            .args(["root@127.0.0.1", "true"]))?;
        Ok(sshd)
    }

    fn ssh_args(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.key.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// `rsync -a --stats -e ssh SRC root@127.0.0.1:DST`; returns the time and
    /// rsync's "Total bytes sent".
    fn rsync(&self, src: &Path, dst: &Path) -> anyhow::Result<(Duration, Option<u64>)> {
        let ssh = format!("ssh {}", self.ssh_args().join(" "));
        let start = Instant::now();
        let out = run(Command::new("rsync")
            .args(["-a", "--stats", "-e", &ssh])
            .arg(src)
            .arg(format!("root@127.0.0.1:{}", dst.display())))?;
        let time = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let sent = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Total bytes sent: "))
            .and_then(|n| n.replace(',', "").trim().parse().ok());
        Ok((time, sent))
    }

    /// `scp -r` with the same ssh options.
    fn scp(&self, src: &Path, dst: &Path) -> anyhow::Result<Duration> {
        let mut args = self.ssh_args();
        // scp spells the port -P.
        if let Some(i) = args.iter().position(|a| a == "-p") {
            args[i] = "-P".into();
        }
        let start = Instant::now();
        run(Command::new("scp")
            .arg("-q")
            .arg("-r")
            .args(args)
            .arg(src)
            .arg(format!("root@127.0.0.1:{}", dst.display())))?;
        Ok(start.elapsed())
    }
}

// ---------------------------------------------------------------- ours

/// A fresh server (identity, documents) and one enrolled client.
struct Ours {
    _dir: tempfile::TempDir,
    server: Option<SyncServer>,
    shutdown: CancellationToken,
    bundle: Bundle,
    addr: SocketAddr,
    root: PathBuf,
}

impl Ours {
    async fn start(parent: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(parent)?;
        let authority = Authority::open(&dir.path().join("identity"))?;
        let ledger = UsageLedger::new();
        let docs = dir.path().join("documents");
        let documents = Arc::new(Documents::new(&docs, false, ledger.clone())?);
        let admission = Arc::new(LocalAdmission::new(authority.clone(), ledger, &docs));
        let services = Services {
            authority: authority.clone(),
            documents,
            admission,
            events: Arc::new(NullSink),
        };
        let shutdown = CancellationToken::new();
        let server = serve(
            ServerConfig::new("127.0.0.1:0".parse()?),
            services,
            shutdown.clone(),
        )
        .await?;
        let addr = server.local_addr();
        let bundle_path = dir.path().join("bench.bundle");
        authority.enroll(&ClientName::parse("bench")?, None, &bundle_path)?;
        let bundle = Bundle::load(&bundle_path)?;
        Ok(Self {
            root: docs.join("bench"),
            _dir: dir,
            server: Some(server),
            shutdown,
            bundle,
            addr,
        })
    }

    async fn client(&self) -> anyhow::Result<SyncClient> {
        // As the binary does: digests persisted between runs.
        let options = ClientOptions {
            digest_cache: Some(self._dir.path().join("digests")),
            ..ClientOptions::default()
        };
        Ok(SyncClient::connect(&self.bundle, Some(&self.addr.to_string()), options).await?)
    }

    /// Pushes `paths` on a connected client; time, bytes and wire bytes.
    async fn push(&self, client: &SyncClient, paths: &[PathBuf]) -> anyhow::Result<Cell> {
        let before = client.wire_bytes_sent();
        let start = Instant::now();
        let reports = client.push(paths, None, Arc::new(NoProgress)).await?;
        let time = start.elapsed();
        let bytes = reports.iter().map(|r| r.size).sum();
        Ok(Cell {
            time,
            bytes,
            wire: Some(client.wire_bytes_sent() - before),
        })
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(s) = self.server.take() {
            s.wait().await;
        }
    }
}

// ---------------------------------------------------------------- sink

/// Bare quinn: one connection, one unidirectional stream, `len` bytes from
/// memory written in 1 MiB slices and discarded by the server. Same TLS
/// configs (our CA, an enrolled client), transport settings and UDP buffers
/// as ours.
async fn quinn_sink(parent: &Path, len: usize) -> anyhow::Result<Cell> {
    let dir = tempfile::tempdir_in(parent)?;
    let authority = Authority::open(&dir.path().join("identity"))?;
    let bundle_path = dir.path().join("sink.bundle");
    authority.enroll(&ClientName::parse("sink")?, None, &bundle_path)?;
    let bundle = Bundle::load(&bundle_path)?;
    let transport =
        Arc::new(transport_config(32, Duration::from_secs(60)).map_err(anyhow::Error::msg)?);

    let mut server_config =
        quinn::ServerConfig::with_crypto(appliance_sync::tls::server_crypto(&authority)?);
    server_config.transport_config(transport.clone());
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    set_udp_buffers(&socket);
    let runtime = quinn::default_runtime().context("runtime")?;
    let server = quinn::Endpoint::new(
        appliance_sync::server::endpoint_config(),
        Some(server_config),
        socket,
        runtime.clone(),
    )?;
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while let Some(n) = recv.read(&mut buf).await? {
            total += n as u64;
        }
        // Tell the client everything arrived.
        let mut send = conn.open_uni().await?;
        send.write_all(&total.to_le_bytes()).await?;
        send.finish()?;
        let _ = conn.closed().await;
        Ok::<u64, anyhow::Error>(total)
    });

    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    set_udp_buffers(&socket);
    let mut client = quinn::Endpoint::new(
        appliance_sync::server::endpoint_config(),
        None,
        socket,
        runtime,
    )?;
    let mut config = quinn::ClientConfig::new(appliance_sync::tls::client_crypto(&bundle)?);
    config.transport_config(transport);
    client.set_default_client_config(config);
    let conn = client
        .connect(addr, appliance_sync::tls::server_name(&bundle))?
        .await?;
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x1234_5678_9abc_def1u64;
    for word in block.chunks_exact_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        word.copy_from_slice(&state.to_le_bytes());
    }
    let before = conn.stats().udp_tx.bytes;
    let start = Instant::now();
    let mut send = conn.open_uni().await?;
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        send.write_all(&block[..n]).await?;
        left -= n;
    }
    send.finish()?;
    let mut ack = conn.accept_uni().await?;
    let mut total = [0u8; 8];
    ack.read_exact(&mut total).await?;
    let time = start.elapsed();
    let wire = conn.stats().udp_tx.bytes - before;
    let path = conn.stats().path;
    println!(
        "  quinn sink path: MTU {} bytes, {} packets lost",
        path.current_mtu, path.lost_packets
    );
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    let received = sink.await??;
    if received != len as u64 || u64::from_le_bytes(total) != len as u64 {
        bail!("sink received {received} of {len} bytes");
    }
    Ok(Cell {
        time,
        bytes: len as u64,
        wire: Some(wire),
    })
}

// ---------------------------------------------------------------- main

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let reps = env_usize("SYNC_BENCH_REPS", 3).max(1);
    let big_len = env_usize("SYNC_BENCH_MIB", 1024) << 20;
    let small_count = env_usize("SYNC_BENCH_FILES", 2000);
    let small_len = 32 << 10;
    let skip_ssh = std::env::var("SYNC_BENCH_SKIP_SSH").is_ok_and(|v| v == "1");
    let parent =
        std::env::var("SYNC_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let work = tempfile::tempdir_in(&parent)?;
    let load_start = loadavg();
    println!(
        "sync bench: {reps} rep(s), (a) {} MiB, (b) {small_count} x 32 KiB, in {}; load {load_start}",
        big_len >> 20,
        work.path().display()
    );

    // Inputs on real files.
    let src = work.path().join("src");
    let big_dir = src.join("big");
    let small_dir = src.join("small");
    std::fs::create_dir_all(&big_dir)?;
    std::fs::create_dir_all(&small_dir)?;
    let big = big_dir.join("big.bin");
    write_random_file(&big, big_len, 1)?;
    for i in 0..small_count {
        write_random_file(
            &small_dir.join(format!("f{i:05}.bin")),
            small_len,
            100 + i as u64,
        )?;
    }
    let small_bytes = (small_count * small_len) as u64;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Bare quinn sink.
    let mut sink = Vec::new();
    for _ in 0..reps {
        sink.push(rt.block_on(quinn_sink(work.path(), big_len))?);
    }
    let sink_a = median_cell(&sink);
    println!("  quinn sink (a): {:.3} GB/s", sink_a.gbps());

    // Ours.
    let mut ours_a = Vec::new();
    let mut ours_c = None;
    for rep in 0..reps {
        let cell = rt.block_on(async {
            let ours = Ours::start(work.path()).await?;
            let client = ours.client().await?;
            let a = ours.push(&client, std::slice::from_ref(&big)).await?;
            let path = client.path_stats();
            println!(
                "  ours path: MTU {} bytes, {} packets lost",
                path.current_mtu, path.lost_packets
            );
            let stored = std::fs::metadata(ours.root.join("big.bin"))?.len();
            if stored != big_len as u64 {
                bail!("stored {stored} bytes of {big_len}");
            }
            let mut c = None;
            client.close().await;
            if rep + 1 == reps {
                // (c): the same file again, unchanged, from a new client
                // process's point of view (new connection, digest cache
                // loaded from its file).
                let client = ours.client().await?;
                c = Some(ours.push(&client, std::slice::from_ref(&big)).await?);
                client.close().await;
            }
            ours.stop().await;
            Ok::<_, anyhow::Error>((a, c))
        })?;
        println!("  ours (a) rep {}: {:.3} GB/s", rep + 1, cell.0.gbps());
        ours_a.push(cell.0);
        if let Some(c) = cell.1 {
            ours_c = Some(c);
        }
    }
    let ours_a = median_cell(&ours_a);
    let ours_c = ours_c.context("no (c) measurement")?;
    let mut ours_b = Vec::new();
    for _ in 0..reps {
        ours_b.push(rt.block_on(async {
            let ours = Ours::start(work.path()).await?;
            let client = ours.client().await?;
            let b = ours.push(&client, std::slice::from_ref(&small_dir)).await?;
            if b.bytes != small_bytes {
                bail!("pushed {} of {small_bytes} bytes", b.bytes);
            }
            client.close().await;
            ours.stop().await;
            Ok::<_, anyhow::Error>(b)
        })?);
    }
    let ours_b = median_cell(&ours_b);
    println!("  ours (b): {:.3} GB/s", ours_b.gbps());

    // rsync and scp over a throwaway sshd.
    let mut ssh_cells = None;
    if !skip_ssh {
        let sshd = Sshd::start(&work.path().join("sshd"))?;
        let dst = work.path().join("ssh-dst");
        let fresh = |d: &Path| -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)?;
            Ok(())
        };
        let mut rsync_a = Vec::new();
        let mut rsync_b = Vec::new();
        let mut scp_a = Vec::new();
        let mut scp_b = Vec::new();
        let mut rsync_c = None;
        for rep in 0..reps {
            fresh(&dst)?;
            let (t, sent) = sshd.rsync(&big, &dst)?;
            rsync_a.push(Cell {
                time: t,
                bytes: big_len as u64,
                wire: sent,
            });
            if rep + 1 == reps {
                let (t, sent) = sshd.rsync(&big, &dst)?;
                rsync_c = Some(Cell {
                    time: t,
                    bytes: big_len as u64,
                    wire: sent,
                });
            }
            fresh(&dst)?;
            let (t, sent) = sshd.rsync(&small_dir, &dst)?;
            rsync_b.push(Cell {
                time: t,
                bytes: small_bytes,
                wire: sent,
            });
            fresh(&dst)?;
            scp_a.push(Cell {
                time: sshd.scp(&big, &dst)?,
                bytes: big_len as u64,
                wire: None,
            });
            fresh(&dst)?;
            scp_b.push(Cell {
                time: sshd.scp(&small_dir, &dst)?,
                bytes: small_bytes,
                wire: None,
            });
        }
        let _ = std::fs::remove_dir_all(&dst);
        ssh_cells = Some((
            median_cell(&rsync_a),
            median_cell(&rsync_b),
            rsync_c.context("no rsync (c)")?,
            median_cell(&scp_a),
            median_cell(&scp_b),
        ));
    }
    let load_end = loadavg();

    // The table.
    println!();
    println!("load average: start {load_start}, end {load_end}; medians of {reps} rep(s)");
    println!(
        "{:<28} {:>14} {:>16} {:>16}",
        "peer", "(a) 1 file", "(b) small files", "(c) re-push (a)"
    );
    let fmt = |c: Option<&Cell>| -> String {
        c.map_or_else(|| "-".into(), |c| format!("{:.3} GB/s", c.gbps()))
    };
    let wire_pct = |c: &Cell| {
        c.wire.map_or_else(
            || "?".into(),
            |w| format!("{:.3}% wire", w as f64 * 100.0 / c.bytes as f64),
        )
    };
    println!(
        "{:<28} {:>14} {:>16} {:>16}",
        "quinn sink (ceiling)",
        fmt(Some(&sink_a)),
        "-",
        "-"
    );
    if let Some((ra, rb, rc, sa, sb)) = &ssh_cells {
        println!(
            "{:<28} {:>14} {:>16} {:>16}",
            "rsync -a -e ssh",
            fmt(Some(ra)),
            fmt(Some(rb)),
            format!("{} {:.2}s", wire_pct(rc), rc.time.as_secs_f64())
        );
        println!(
            "{:<28} {:>14} {:>16} {:>16}",
            "scp -r",
            fmt(Some(sa)),
            fmt(Some(sb)),
            "-"
        );
    }
    println!(
        "{:<28} {:>14} {:>16} {:>16}",
        "ours (appliance-sync)",
        fmt(Some(&ours_a)),
        fmt(Some(&ours_b)),
        format!("{} {:.2}s", wire_pct(&ours_c), ours_c.time.as_secs_f64())
    );
    println!(
        "  (a) {:.2} s for {} MiB: {} wire bytes ({:.2}% overhead)",
        ours_a.time.as_secs_f64(),
        big_len >> 20,
        ours_a.wire.unwrap_or(0),
        (ours_a.wire.unwrap_or(0) as f64 / ours_a.bytes as f64 - 1.0) * 100.0
    );
    println!(
        "  (b) {:.2} s for {small_count} files ({:.0} files/s)",
        ours_b.time.as_secs_f64(),
        small_count as f64 / ours_b.time.as_secs_f64()
    );
    println!();
    println!("targets:");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    if let Some((ra, ..)) = &ssh_cells {
        let r = ours_a.gbps() / ra.gbps();
        println!(
            "  (a) ours / rsync-over-ssh   = {r:>6.2}x  (target >= 2.0x)  {}",
            verdict(r >= 2.0)
        );
    } else {
        println!("  (a) ours / rsync-over-ssh   = skipped");
    }
    let r = ours_a.gbps() / sink_a.gbps();
    println!(
        "  (a) ours / bare quinn sink  = {r:>6.2}x  (target >= 0.9x)  {}",
        verdict(r >= 0.9)
    );
    if let Some((_, rb, ..)) = &ssh_cells {
        let r = ours_b.gbps() / rb.gbps();
        println!(
            "  (b) ours / rsync-over-ssh   = {r:>6.2}x  (target >= 5.0x)  {}",
            verdict(r >= 5.0)
        );
    } else {
        println!("  (b) ours / rsync-over-ssh   = skipped");
    }
    let pct = ours_c.wire.unwrap_or(u64::MAX) as f64 * 100.0 / ours_c.bytes as f64;
    println!(
        "  (c) bytes on the wire       = {pct:>6.3}%  (target < 1%)     {}",
        verdict(pct < 1.0)
    );
    println!();
    println!(
        "notes: rsync/scp do not fsync; ours fsyncs each document and its directory. \
         Everything shares this machine's {} cores.",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    Ok(())
}

fn median_cell(cells: &[Cell]) -> Cell {
    let t = median(cells.iter().map(|c| c.time).collect());
    cells
        .iter()
        .copied()
        .find(|c| c.time == t)
        .unwrap_or(cells[0])
}
