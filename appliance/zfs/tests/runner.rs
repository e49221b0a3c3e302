//! The real runner against shell scripts that mimic `zpool`/`zfs`: they
//! print captured samples, hang like a suspended pool, or fail with libzfs
//! messages. This exercises spawning, argv, timeouts, kills, output limits
//! and error mapping without ZFS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance_zfs::{
    DatasetSpec, DeviceState, EncryptionSpec, EventItem, FailureKind, KeyFormat, OutputFormat,
    PoolLayout, PoolSpec, RunnerConfig, ScanState, ScrubAction, Zfs, ZfsError, ZfsRunner,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    /// A `zpool` and a `zfs` script; `body` is a `case "$*" in ... esac`
    /// arm list shared by both (prefixed with the binary name).
    fn new(arms: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["zpool", "zfs"] {
            let script = format!(
                "#!/bin/sh\nLOG='{log}'\nF='{fx}'\nprintf '%s\\n' \"{name} $*\" >> \"$LOG\"\ncase \"{name} $*\" in\n{arms}\n*) echo \"unexpected: {name} $*\" >&2; exit 2;;\nesac\n",
                log = dir.path().join("argv.log").display(),
                fx = fixtures().display(),
            );
            let path = dir.path().join(name);
            // Written by a child process, never through a descriptor of this
            // one: tests run in parallel threads, and a fork by another test
            // while this process held the script open for writing would
            // make its exec fail with ETXTBSY ("Text file busy"; seen once
            // in CI). The `cp` child has exited before anyone runs it.
            let source = dir.path().join(format!("{name}.source"));
            std::fs::write(&source, script).unwrap();
            let copied = std::process::Command::new("cp")
                .arg(&source)
                .arg(&path)
                .status()
                .unwrap();
            assert!(copied.success(), "cp {name}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir }
    }

    fn config(&self) -> RunnerConfig {
        RunnerConfig {
            zpool: self.dir.path().join("zpool"),
            zfs: self.dir.path().join("zfs"),
            query_timeout: Duration::from_secs(10),
            change_timeout: Duration::from_secs(10),
            ..RunnerConfig::default()
        }
    }

    fn runner(&self) -> ZfsRunner {
        ZfsRunner::new(self.config()).unwrap()
    }

    fn argv_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("argv.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Field 3 is the state; a zombie has exited.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn wait_gone(pidfile: &Path) -> bool {
    let mut pid = None;
    for _ in 0..100 {
        if let Some(p) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = pid.expect("script wrote no pid");
    for _ in 0..100 {
        if pid_gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[test]
fn constructor_names_the_missing_binary() {
    let f = Fake::new("");
    let mut cfg = f.config();
    cfg.zfs = f.path("nonexistent-zfs");
    match ZfsRunner::new(cfg) {
        Err(ZfsError::MissingBinary { name, .. }) => assert_eq!(name, "zfs"),
        other => panic!("{other:?}"),
    }
    let mut cfg = f.config();
    cfg.zpool = PathBuf::from("zpool");
    match ZfsRunner::new(cfg) {
        Err(ZfsError::MissingBinary { name, reason, .. }) => {
            assert_eq!(name, "zpool");
            assert_eq!(reason, "not an absolute path");
        }
        other => panic!("{other:?}"),
    }
    std::fs::set_permissions(f.path("zpool"), std::fs::Permissions::from_mode(0o644)).unwrap();
    match ZfsRunner::new(f.config()) {
        Err(ZfsError::MissingBinary { name, reason, .. }) => {
            assert_eq!((name, reason.as_str()), ("zpool", "not executable"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn queries_parse_captured_json() {
    let f = Fake::new(
        r#""zpool status -j --json-int tank") cat "$F/openzfs-2.3.2-json/zpool_status_-j_--json-int.removed1.json";;
"zpool list -j --json-int") cat "$F/openzfs-2.3.2-json/zpool_list_-j_--json-int.removed1.json";;
"zpool get -j --json-int all tank") cat "$F/openzfs-2.3.2-json/zpool_get_-j_--json-int_all_tank.healthy.json";;
"zfs list -j --json-int -r -t filesystem,volume -o name,used,available,quota,refquota,encryption,keystatus,compression,mountpoint tank") cat "$F/openzfs-2.3.2-json/zfs_list_-j_--json-int_-o_name,used,available,quota,refquota,encryption,keystatus,compression,mountpoint.healthy.json";;
"zfs get -j --json-int all tank/documents") cat "$F/openzfs-2.3.2-json/zfs_get_-j_--json-int_all_tank_documents.healthy.json";;
"zfs get -j --json-int quota tank/q") printf '{"datasets":{"tank/q":{"name":"tank/q","properties":{"quota":{"value":52428800,"source":{"type":"LOCAL","data":"-"}}}}}}';;
"zfs get -j --json-int quota tank/data") printf '{"datasets":{"tank/data":{"name":"tank/data","properties":{"quota":{"value":0,"source":{"type":"DEFAULT","data":"-"}}}}}}';;"#,
    );
    let z = f.runner();
    let st = z.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Degraded);
    assert_eq!(appliance_zfs::redundancy(&st).margin, 1);
    let pools = z.pool_list().await.unwrap();
    assert_eq!(pools[0].capacity.allocated, 652_124_160);
    let props = z.pool_properties("tank").await.unwrap();
    assert_eq!(props.get("failmode"), Some("wait"));
    let ds = z.dataset_list("tank").await.unwrap();
    assert_eq!(ds.len(), 4);
    let dp = z.dataset_properties("tank/documents").await.unwrap();
    assert_eq!(dp.get("encryption"), Some("aes-256-gcm"));
    assert_eq!(z.get_quota("tank/q").await.unwrap(), Some(52_428_800));
    assert_eq!(z.get_quota("tank/data").await.unwrap(), None);
    // Asking for a pool the output does not contain is an error, not a
    // wrong answer.
    let f2 = Fake::new(
        r#""zpool status -j --json-int other") cat "$F/openzfs-2.3.2-json/zpool_status_-j_--json-int.healthy.json";;"#,
    );
    assert!(matches!(
        f2.runner().pool_status("other").await,
        Err(ZfsError::MissingFromOutput { .. })
    ));
}

#[tokio::test]
async fn text_format_for_openzfs_2_1() {
    let f = Fake::new(
        r#""zpool status -p tank") cat "$F/openzfs-2.1.11/zpool-status-p.removed2.txt";;
"zpool list -Hp") cat "$F/openzfs-2.1.11/zpool-list-Hp.txt";;
"zpool get -Hp all tank") cat "$F/openzfs-2.1.11/zpool-get-Hp-all.txt";;
"zfs list -Hp -r -t filesystem,volume -o name,used,available,quota,refquota,encryption,keystatus,compression,mountpoint tank") printf 'tank\t100\t200\t0\t0\toff\t-\ton\t/tank\ntank/documents\t10\t200\t0\t0\taes-256-gcm\tavailable\tzstd\t/tank/documents\n';;"#,
    );
    let mut cfg = f.config();
    cfg.format = OutputFormat::Text;
    let z = ZfsRunner::new(cfg).unwrap();
    let st = z.pool_status("tank").await.unwrap();
    assert_eq!(appliance_zfs::redundancy(&st).margin, 0);
    assert_eq!(z.pool_list().await.unwrap()[0].capacity.size, 1_476_395_008);
    assert_eq!(
        z.pool_properties("tank").await.unwrap().u64("ashift"),
        Some(12)
    );
    let ds = z.dataset_list("tank").await.unwrap();
    assert_eq!(ds[1].keystatus, Some(appliance_zfs::KeyStatus::Available));
}

#[tokio::test]
async fn changes_build_exact_argv() {
    let f = Fake::new(r#"*"create"*|*"set"*|*"scrub"*|*"replace"*|*"clear"*) exit 0;;"#);
    let z = f.runner();
    z.create_pool(&PoolSpec {
        name: "tank".into(),
        layout: PoolLayout::Raidz2,
        disks: (1..=6)
            .map(|i| format!("/dev/disk/by-id/virtio-ZD{i}"))
            .collect(),
        pool_properties: vec![("ashift".into(), "12".into())],
        fs_properties: vec![("compression".into(), "zstd".into())],
        mountpoint: Some("/tank".into()),
        force: false,
    })
    .await
    .unwrap();
    let mut spec = DatasetSpec::new("tank/documents");
    spec.compression = Some("zstd".into());
    spec.encryption = Some(EncryptionSpec {
        cipher: "aes-256-gcm".into(),
        keyformat: KeyFormat::Raw,
        keylocation: "file:///var/lib/appliance/keys/documents.key".into(),
    });
    z.create_dataset(&spec).await.unwrap();
    z.set_quota("tank/q", Some(52_428_800)).await.unwrap();
    z.set_quota("tank/q", None).await.unwrap();
    z.scrub("tank", ScrubAction::Start).await.unwrap();
    z.scrub("tank", ScrubAction::Pause).await.unwrap();
    z.scrub("tank", ScrubAction::Stop).await.unwrap();
    z.replace("tank", "virtio-ZD2", "/dev/disk/by-id/virtio-ZN2")
        .await
        .unwrap();
    z.clear("tank", None).await.unwrap();
    z.clear("tank", Some("virtio-ZD1")).await.unwrap();
    let disks: String = (1..=6)
        .map(|i| format!(" /dev/disk/by-id/virtio-ZD{i}"))
        .collect();
    assert_eq!(
        f.argv_log(),
        [
            format!("zpool create -o ashift=12 -O compression=zstd -m /tank tank raidz2{disks}"),
            "zfs create -u -o compression=zstd -o encryption=aes-256-gcm -o keyformat=raw -o keylocation=file:///var/lib/appliance/keys/documents.key tank/documents".to_owned(),
            "zfs set quota=52428800 tank/q".to_owned(),
            "zfs set quota=none tank/q".to_owned(),
            "zpool scrub tank".to_owned(),
            "zpool scrub -p tank".to_owned(),
            "zpool scrub -s tank".to_owned(),
            "zpool replace tank virtio-ZD2 /dev/disk/by-id/virtio-ZN2".to_owned(),
            "zpool clear tank".to_owned(),
            "zpool clear tank virtio-ZD1".to_owned(),
        ]
    );
    // Invalid arguments never reach the binary.
    assert!(matches!(
        z.scrub("-x", ScrubAction::Start).await,
        Err(ZfsError::InvalidArgument { .. })
    ));
    assert!(matches!(
        z.set_quota("tank/../x", None).await,
        Err(ZfsError::InvalidArgument { .. })
    ));
    assert!(matches!(
        z.replace("tank", "-f", "/dev/x").await,
        Err(ZfsError::InvalidArgument { .. })
    ));
    assert_eq!(f.argv_log().len(), 10);
}

#[tokio::test]
async fn stderr_is_mapped_to_typed_errors() {
    let f = Fake::new(
        r#""zpool status -j --json-int nope") echo "cannot open 'nope': no such pool" >&2; exit 1;;
"zpool scrub tank") echo "cannot scrub tank: currently resilvering" >&2; exit 1;;
"zpool scrub -p tank") echo "cannot pause scrubbing tank: there is no active scrub" >&2; exit 1;;
"zfs set quota=1 tank/q") echo "cannot set property for 'tank/q': size is less than current used or reserved space" >&2; exit 1;;
"zfs get -j --json-int all tank/gone") echo "cannot open 'tank/gone': dataset does not exist" >&2; exit 1;;
"zpool clear tank") echo "cannot clear errors for tank: permission denied" >&2; exit 1;;
"zpool replace tank a /dev/b") echo "weird new failure" >&2; exit 3;;
"zpool list -j --json-int") echo "this is not json";;"#,
    );
    let z = f.runner();
    let e = z.pool_status("nope").await.unwrap_err();
    match &e {
        ZfsError::Failed {
            kind,
            exit_code,
            stderr,
            command,
        } => {
            assert_eq!(*kind, FailureKind::NoSuchPool);
            assert_eq!(*exit_code, Some(1));
            assert_eq!(stderr, "cannot open 'nope': no such pool");
            assert!(
                command.ends_with("zpool status -j --json-int nope"),
                "{command}"
            );
        }
        other => panic!("{other:?}"),
    }
    let kind = |r: Result<(), ZfsError>| r.unwrap_err().kind();
    assert_eq!(
        kind(z.scrub("tank", ScrubAction::Start).await),
        Some(FailureKind::ResilverInProgress)
    );
    assert_eq!(
        kind(z.scrub("tank", ScrubAction::Pause).await),
        Some(FailureKind::NoActiveScrub)
    );
    assert_eq!(
        kind(z.set_quota("tank/q", Some(1)).await),
        Some(FailureKind::QuotaBelowUsage)
    );
    assert_eq!(
        kind(z.clear("tank", None).await),
        Some(FailureKind::PermissionDenied)
    );
    let e = z.replace("tank", "a", "/dev/b").await.unwrap_err();
    assert!(matches!(
        e,
        ZfsError::Failed {
            kind: FailureKind::Other,
            exit_code: Some(3),
            ..
        }
    ));
    assert!(e.to_string().contains("weird new failure"));
    assert_eq!(
        z.dataset_properties("tank/gone").await.unwrap_err().kind(),
        Some(FailureKind::NoSuchDataset)
    );
    assert!(matches!(z.pool_list().await, Err(ZfsError::Parse { .. })));
}

#[tokio::test]
async fn hung_command_times_out_and_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let gcfile = dir.path().join("grandchild");
    let f = Fake::new(&format!(
        r#""zpool status -j --json-int tank") (sleep 1000; :) & echo $! > '{gc}'; echo $$ > '{pid}'; wait;;"#,
        gc = gcfile.display(),
        pid = pidfile.display(),
    ));
    let mut cfg = f.config();
    cfg.query_timeout = Duration::from_millis(300);
    let z = ZfsRunner::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = z.pool_status("tank").await.unwrap_err();
    let took = t0.elapsed();
    assert!(e.is_timeout(), "{e:?}");
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    assert!(wait_gone(&pidfile).await, "the hung zpool was not killed");
    assert!(
        wait_gone(&gcfile).await,
        "its child (same process group) was not killed"
    );
}

#[tokio::test]
async fn oversized_output_is_refused() {
    let f = Fake::new(
        r#""zpool list -j --json-int") cat "$F/openzfs-2.3.2/zpool-events-v.cksum.txt";;"#,
    );
    let mut cfg = f.config();
    cfg.max_output = 4096;
    let z = ZfsRunner::new(cfg).unwrap();
    assert!(matches!(
        z.pool_list().await,
        Err(ZfsError::OutputTooLarge { limit: 4096, .. })
    ));
}

#[tokio::test]
async fn event_follower_streams_and_is_killed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let f = Fake::new(&format!(
        r#""zpool events -f -H -v") echo $$ > '{pid}'; sed 's/^\(Nov 22 2026 [0-9:.]*\) /\1\t/' "$F/openzfs-2.1.11/zpool-events-v.removed.txt" | grep -v '^TIME'; echo; exec sleep 1000;;"#,
        pid = pidfile.display(),
    ));
    // (The capture lacks the blank line that ends every event when
    // following; `echo` supplies it.)
    let z = f.runner();
    let mut follower = z.follow_events().await.unwrap();
    let mut classes = Vec::new();
    while classes.len() < 6 {
        let item = tokio::time::timeout(Duration::from_secs(5), follower.next())
            .await
            .expect("event arrives while the process still runs")
            .unwrap()
            .unwrap();
        let EventItem::Event(e) = item else {
            panic!("{item:?}")
        };
        classes.push(e.short_class().to_owned());
        if classes.len() == 2 {
            assert_eq!(e.vdev_state, Some(DeviceState::Removed));
            assert_eq!(
                e.vdev_path.as_deref(),
                Some("/dev/disk/by-id/virtio-ZD2-part1")
            );
        }
    }
    assert_eq!(
        classes,
        [
            "statechange",
            "removed",
            "config_sync",
            "statechange",
            "removed",
            "config_sync"
        ]
    );
    drop(follower);
    assert!(
        wait_gone(&pidfile).await,
        "zpool events -f survived its follower"
    );
}

#[tokio::test]
async fn event_follower_reports_the_end_of_the_process() {
    let f = Fake::new(r#""zpool events -f -H -v") echo "failed to open /dev/zfs" >&2; exit 1;;"#);
    let mut follower = f.runner().follow_events().await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(5), follower.next())
        .await
        .unwrap()
        .unwrap();
    match item {
        Err(ZfsError::EventStreamEnded { reason }) => {
            assert!(reason.contains("failed to open /dev/zfs"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(follower.next().await.is_none());
}

#[tokio::test]
async fn usable_as_dyn_zfs() {
    let f = Fake::new(
        r#""zpool status -j --json-int tank") cat "$F/openzfs-2.3.2-json/zpool_status_-j_--json-int.scrub-paused.json";;"#,
    );
    let z: std::sync::Arc<dyn Zfs> = std::sync::Arc::new(f.runner());
    let st = z.pool_status("tank").await.unwrap();
    assert_eq!(st.scan.unwrap().state, ScanState::Paused);
}
