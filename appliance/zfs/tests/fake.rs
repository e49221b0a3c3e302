//! The shared fake, driven through the same scenarios the QEMU tests run
//! on real ZFS: create, report, pull 1/2/3 disks, scrub, replace/resilver,
//! quotas, hung pools.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use appliance_zfs::fake::{FakeOp, FakeZfs};
use appliance_zfs::{
    redundancy, DatasetSpec, DeviceState, EncryptionSpec, ErrorCounts, EventFollower, EventItem,
    FailureKind, KeyFormat, KeyStatus, PoolLayout, PoolSpec, RedundancyLevel, ScanFunction,
    ScanState, ScrubAction, VdevKind, Zfs, ZfsError,
};

const GIB: u64 = 1 << 30;

fn disk(i: usize) -> String {
    format!("/dev/disk/by-id/virtio-ZD{i}")
}

async fn six_disk_raidz2() -> (Arc<FakeZfs>, Arc<dyn Zfs>) {
    let mut disks: Vec<String> = (1..=6).map(disk).collect();
    disks.extend((1..=3).map(|i| format!("/dev/disk/by-id/virtio-ZN{i}")));
    let fake = Arc::new(FakeZfs::with_disks(&disks, GIB));
    fake.set_time(1_800_000_000);
    let zfs: Arc<dyn Zfs> = fake.clone();
    zfs.create_pool(&PoolSpec {
        name: "tank".into(),
        layout: PoolLayout::Raidz2,
        disks: (1..=6).map(disk).collect(),
        pool_properties: vec![("ashift".into(), "12".into())],
        fs_properties: vec![("compression".into(), "zstd".into())],
        mountpoint: None,
        force: false,
    })
    .await
    .unwrap();
    (fake, zfs)
}

async fn next_classes(f: &mut EventFollower, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(1), f.next())
            .await
            .expect("event expected")
            .unwrap()
            .unwrap();
        match item {
            EventItem::Event(e) => out.push(e.short_class().to_owned()),
            EventItem::Dropped(d) => out.push(format!("dropped {d}")),
        }
    }
    out
}

#[tokio::test]
async fn create_and_report() {
    let (fake, zfs) = six_disk_raidz2().await;
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Online);
    assert_eq!(st.root.children[0].kind, VdevKind::Raidz { parity: 2 });
    assert_eq!(st.root.leaves().len(), 6);
    assert_eq!(st.root.children[0].children[0].name, "virtio-ZD1");
    let r = redundancy(&st);
    assert_eq!(r.summary, "RAID-Z2, 6 disks, 0 failed, survives 2 more");
    let pools = zfs.pool_list().await.unwrap();
    assert_eq!(pools[0].capacity.size, 6 * GIB);
    assert_eq!(
        zfs.pool_properties("tank").await.unwrap().get("ashift"),
        Some("12")
    );

    let mut docs = DatasetSpec::new("tank/documents");
    docs.compression = Some("zstd".into());
    docs.encryption = Some(EncryptionSpec {
        cipher: "aes-256-gcm".into(),
        keyformat: KeyFormat::Raw,
        keylocation: "file:///var/lib/appliance/documents.key".into(),
    });
    zfs.create_dataset(&docs).await.unwrap();
    zfs.create_dataset(&DatasetSpec::new("tank/data"))
        .await
        .unwrap();
    let err = zfs
        .create_dataset(&DatasetSpec::new("tank/data"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(FailureKind::AlreadyExists));
    let err = zfs
        .create_dataset(&DatasetSpec::new("tank/a/b"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(FailureKind::NoSuchDataset));
    fake.set_dataset_used("tank/documents", 100 << 20).unwrap();

    let ds = zfs.dataset_list("tank").await.unwrap();
    let names: Vec<_> = ds.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["tank", "tank/data", "tank/documents"]);
    let d = &ds[2];
    assert_eq!(d.keystatus, Some(KeyStatus::Available));
    assert_eq!(d.compression, "zstd");
    assert_eq!(d.used, 100 << 20);
    assert_eq!(ds[0].used, 100 << 20, "parent includes children");
    assert_eq!(d.available, 4 * GIB - (100 << 20), "4 data disks of 1 GiB");
    let props = zfs.dataset_properties("tank/documents").await.unwrap();
    assert_eq!(
        props.get("keylocation"),
        Some("file:///var/lib/appliance/documents.key")
    );
    // Allocation includes parity: 100 MiB of data on 4+2 disks.
    assert_eq!(
        zfs.pool_list().await.unwrap()[0].capacity.allocated,
        150 << 20
    );
    // A disk of this pool cannot be used again.
    let err = zfs
        .create_pool(&PoolSpec {
            name: "other".into(),
            layout: PoolLayout::Mirror,
            disks: vec![disk(1), "/dev/disk/by-id/virtio-ZN1".into()],
            pool_properties: vec![],
            fs_properties: vec![],
            mountpoint: None,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(FailureKind::DeviceInUse));
    assert_eq!(
        zfs.pool_status("nope").await.unwrap_err().kind(),
        Some(FailureKind::NoSuchPool)
    );
}

#[tokio::test]
async fn pulling_one_two_three_disks() {
    let (fake, zfs) = six_disk_raidz2().await;
    zfs.create_dataset(&DatasetSpec::new("tank/data"))
        .await
        .unwrap();
    let mut events = zfs.follow_events().await.unwrap();

    fake.set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Degraded);
    assert_eq!(
        redundancy(&st).summary,
        "RAID-Z2, 6 disks, 1 failed, survives 1 more"
    );
    assert_eq!(
        next_classes(&mut events, 2).await,
        ["statechange", "removed"]
    );

    fake.set_disk_state("tank", &disk(3), DeviceState::Removed)
        .unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(redundancy(&st).margin, 0);
    assert_eq!(redundancy(&st).level, RedundancyLevel::Exhausted);
    next_classes(&mut events, 2).await;

    fake.set_disk_state("tank", "virtio-ZD5", DeviceState::Faulted)
        .unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Suspended);
    assert_eq!(st.root.children[0].state, DeviceState::Unavail);
    assert_eq!(redundancy(&st).margin, -1);
    assert_eq!(
        next_classes(&mut events, 2).await,
        ["statechange", "io_failure"]
    );
    // Changes on a suspended pool hang; the caller sees a timeout.
    let err = zfs.set_quota("tank/data", Some(GIB)).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // Disks return, `zpool clear` resumes the pool.
    for d in ["virtio-ZD2", "virtio-ZD3"] {
        fake.set_disk_state("tank", d, DeviceState::Online).unwrap();
    }
    zfs.clear("tank", None).await.unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Online);
    assert_eq!(redundancy(&st).margin, 2);
    zfs.set_quota("tank/data", Some(GIB)).await.unwrap();
}

#[tokio::test]
async fn scrub_progress_pause_resume_finish() {
    let (fake, zfs) = six_disk_raidz2().await;
    zfs.create_dataset(&DatasetSpec::new("tank/data"))
        .await
        .unwrap();
    fake.set_dataset_used("tank/data", 400 << 20).unwrap();
    let mut events = zfs.follow_events().await.unwrap();
    assert_eq!(
        zfs.scrub("tank", ScrubAction::Pause)
            .await
            .unwrap_err()
            .kind(),
        Some(FailureKind::NoActiveScrub)
    );
    zfs.scrub("tank", ScrubAction::Start).await.unwrap();
    assert_eq!(
        zfs.scrub("tank", ScrubAction::Start)
            .await
            .unwrap_err()
            .kind(),
        Some(FailureKind::ScrubInProgress)
    );
    fake.advance_time(10);
    let s = fake.advance_scan("tank", 300 << 20).unwrap().unwrap();
    assert!(
        (s.progress_percent() - 50.0).abs() < 1e-9,
        "600 MiB allocated incl. parity"
    );
    assert_eq!(s.rate_bytes_per_sec(1_800_000_010), Some(30 << 20));
    zfs.scrub("tank", ScrubAction::Pause).await.unwrap();
    fake.advance_time(100);
    let st = zfs.pool_status("tank").await.unwrap().scan.unwrap();
    assert_eq!(st.state, ScanState::Paused);
    zfs.scrub("tank", ScrubAction::Start).await.unwrap();
    let st = zfs.pool_status("tank").await.unwrap().scan.unwrap();
    assert_eq!((st.state, st.spent_paused_secs), (ScanState::Running, 100));
    let done = fake.advance_scan("tank", 1 << 40).unwrap().unwrap();
    assert_eq!(done.state, ScanState::Finished);
    assert_eq!(done.issued, 600 << 20);
    assert_eq!(
        next_classes(&mut events, 4).await,
        [
            "scrub_start",
            "scrub_paused",
            "scrub_resume",
            "scrub_finish"
        ]
    );
    zfs.scrub("tank", ScrubAction::Start).await.unwrap();
    zfs.scrub("tank", ScrubAction::Stop).await.unwrap();
    let st = zfs.pool_status("tank").await.unwrap().scan.unwrap();
    assert_eq!(st.state, ScanState::Canceled);
}

#[tokio::test]
async fn replace_and_resilver() {
    let (fake, zfs) = six_disk_raidz2().await;
    zfs.create_dataset(&DatasetSpec::new("tank/data"))
        .await
        .unwrap();
    fake.set_dataset_used("tank/data", 200 << 20).unwrap();
    fake.set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    fake.set_disk_state("tank", "virtio-ZD3", DeviceState::Removed)
        .unwrap();
    let mut events = zfs.follow_events().await.unwrap();
    zfs.replace("tank", "virtio-ZD2", "/dev/disk/by-id/virtio-ZN2")
        .await
        .unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    let rep = &st.root.children[0].children[1];
    assert_eq!(rep.name, "replacing-1");
    assert_eq!(rep.children[1].name, "virtio-ZN2");
    assert!(st.resilvering());
    assert_eq!(
        redundancy(&st).margin,
        0,
        "the new disk does not hold data yet"
    );
    assert_eq!(
        zfs.scrub("tank", ScrubAction::Start)
            .await
            .unwrap_err()
            .kind(),
        Some(FailureKind::ResilverInProgress)
    );
    let err = zfs
        .replace("tank", "nothere", "/dev/disk/by-id/virtio-ZN3")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(FailureKind::NoSuchDevice));
    fake.advance_scan("tank", 100 << 20).unwrap();
    let done = fake.advance_scan("tank", 1 << 40).unwrap().unwrap();
    assert_eq!(
        (done.function, done.state),
        (ScanFunction::Resilver, ScanState::Finished)
    );
    let st = zfs.pool_status("tank").await.unwrap();
    let names: Vec<_> = st.root.leaves().iter().map(|v| v.name.clone()).collect();
    assert_eq!(names[1], "virtio-ZN2");
    assert_eq!(redundancy(&st).margin, 1, "ZD3 is still missing");
    assert_eq!(
        next_classes(&mut events, 3).await,
        ["vdev_attach", "resilver_start", "resilver_finish"]
    );
}

#[tokio::test]
async fn quotas_and_errors() {
    let (fake, zfs) = six_disk_raidz2().await;
    zfs.create_dataset(&DatasetSpec::new("tank/q"))
        .await
        .unwrap();
    fake.set_dataset_used("tank/q", 10 << 20).unwrap();
    assert_eq!(zfs.get_quota("tank/q").await.unwrap(), None);
    assert_eq!(
        zfs.set_quota("tank/q", Some(1 << 20))
            .await
            .unwrap_err()
            .kind(),
        Some(FailureKind::QuotaBelowUsage)
    );
    zfs.set_quota("tank/q", Some(50 << 20)).await.unwrap();
    assert_eq!(zfs.get_quota("tank/q").await.unwrap(), Some(50 << 20));
    let q = zfs.dataset_list("tank/q").await.unwrap().remove(0);
    assert_eq!((q.quota, q.available), (Some(50 << 20), 40 << 20));
    zfs.set_quota("tank/q", None).await.unwrap();
    assert_eq!(zfs.get_quota("tank/q").await.unwrap(), None);

    fake.add_disk_errors(
        "tank",
        "virtio-ZD1",
        ErrorCounts {
            read: 0,
            write: 0,
            checksum: 1197,
        },
    )
    .unwrap();
    let st = zfs.pool_status("tank").await.unwrap();
    assert_eq!(st.state, DeviceState::Online);
    assert_eq!(st.devices_with_errors()[0].errors.checksum, 1197);
    zfs.clear("tank", Some("virtio-ZD1")).await.unwrap();
    assert!(zfs
        .pool_status("tank")
        .await
        .unwrap()
        .devices_with_errors()
        .is_empty());

    fake.fail_next(FakeOp::PoolList, FailureKind::PermissionDenied);
    assert_eq!(
        zfs.pool_list().await.unwrap_err().kind(),
        Some(FailureKind::PermissionDenied)
    );
    assert!(
        zfs.pool_list().await.is_ok(),
        "injected failures are one-shot"
    );

    fake.set_hung("tank", true);
    assert!(matches!(
        zfs.pool_status("tank").await,
        Err(ZfsError::Timeout { .. })
    ));
    assert!(zfs.pool_list().await.unwrap_err().is_timeout());
    fake.set_hung("tank", false);
    assert!(zfs.pool_status("tank").await.is_ok());
}

#[tokio::test]
async fn slow_follower_gets_dropped_count() {
    let (fake, zfs) = six_disk_raidz2().await;
    let mut events = zfs.follow_events().await.unwrap();
    // 256 fit in the channel; the rest are lost and then counted.
    for _ in 0..150 {
        fake.set_disk_state("tank", "virtio-ZD6", DeviceState::Offline)
            .unwrap();
        fake.set_disk_state("tank", "virtio-ZD6", DeviceState::Online)
            .unwrap();
    }
    let mut n = 0;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(50), events.next()).await
    {
        assert!(matches!(item.unwrap(), EventItem::Event(_)));
        n += 1;
    }
    assert_eq!(n, 256);
    fake.set_disk_state("tank", "virtio-ZD6", DeviceState::Offline)
        .unwrap();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first, EventItem::Dropped(44));
}
