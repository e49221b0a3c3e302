//! Provisioning against the shared fake ZFS: idempotence, persisted intent,
//! and crashes between steps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use appliance_storage::provision::{ProvisionConfig, ProvisionError, Provisioner, KEY_BYTES};
use appliance_types::storage::{ProvisionState, StorageLayout};
use appliance_zfs::fake::{FakeOp, FakeZfs};
use appliance_zfs::{Encryption, FailureKind, PoolLayout, PoolSpec, Zfs};

fn disks(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("/dev/disk/by-id/virtio-ZD{i}"))
        .collect()
}

fn setup() -> (tempfile::TempDir, Arc<FakeZfs>, ProvisionConfig) {
    let dir = tempfile::tempdir().unwrap();
    let zfs = Arc::new(FakeZfs::with_disks(&disks(6), 256 << 20));
    let mut cfg = ProvisionConfig::new(dir.path().join("state"));
    cfg.key_dir = dir.path().join("keys");
    (dir, zfs, cfg)
}

#[tokio::test]
async fn creates_pool_datasets_and_key_once() {
    let (_dir, zfs, cfg) = setup();
    let p = Provisioner::new(zfs.clone(), cfg.clone());
    let out = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap();
    assert_eq!(out.state, ProvisionState::Done);
    assert_eq!(out.datasets, ["tank/documents"]);
    assert!(!out.resumed && !out.already_done);
    let key = cfg.key_file("tank");
    assert_eq!(out.key_file, key.to_string_lossy());
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.len(), KEY_BYTES as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let dir_mode = std::fs::metadata(&cfg.key_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let key_bytes = std::fs::read(&key).unwrap();

    let status = zfs.pool_status("tank").await.unwrap();
    assert_eq!(status.root.leaves().len(), 6);
    let ds = zfs.dataset_list("tank").await.unwrap();
    let docs = ds.iter().find(|d| d.name == "tank/documents").unwrap();
    assert_eq!(docs.encryption, Encryption::Cipher("aes-256-gcm".into()));
    assert_eq!(docs.compression, "zstd");
    let root = ds.iter().find(|d| d.name == "tank").unwrap();
    assert_eq!(root.compression, "zstd");
    let (cipher, format, location) = zfs.dataset_encryption("tank/documents").unwrap();
    assert_eq!((cipher.as_str(), format.as_str()), ("aes-256-gcm", "raw"));
    assert_eq!(location, format!("file://{}", key.display()));

    // The same request again: nothing to do, the key is untouched.
    let again = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap();
    assert!(again.already_done);
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);
    // Disk order and path spelling do not matter for "the same request".
    let mut rev = disks(6);
    rev.reverse();
    assert!(
        p.create_pool("tank", StorageLayout::Raidz2, &rev, false)
            .await
            .unwrap()
            .already_done
    );
}

#[tokio::test]
async fn crash_after_pool_creation_is_completed_on_restart() {
    let (_dir, zfs, cfg) = setup();
    zfs.fail_next(FakeOp::CreateDataset, FailureKind::Io);
    let p = Provisioner::new(zfs.clone(), cfg.clone());
    let e = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProvisionError::Zfs { ref pool, step: ProvisionState::PoolCreated, .. } if pool == "tank"),
        "{e}"
    );
    let recorded = p.intents().unwrap();
    assert_eq!(recorded[0].state, ProvisionState::PoolCreated);
    assert!(recorded[0].last_error.as_deref().unwrap().contains("Io"));

    // "Restart": a new provisioner over the same state directory.
    let p2 = Provisioner::new(zfs.clone(), cfg.clone());
    let results = p2.resume_all().await;
    assert_eq!(results.len(), 1);
    let out = results.into_iter().next().unwrap().unwrap();
    assert!(out.resumed);
    assert_eq!(out.state, ProvisionState::Done);
    assert!(zfs.dataset_names().contains(&"tank/documents".to_owned()));
    assert!(p2.resume_all().await.is_empty(), "nothing left to resume");
}

#[tokio::test]
async fn crash_between_zpool_create_and_recording_it() {
    let (_dir, zfs, cfg) = setup();
    // The intent says Planned, but the pool was created before the crash.
    let p = Provisioner::new(zfs.clone(), cfg.clone());
    zfs.fail_next(FakeOp::CreatePool, FailureKind::Other);
    assert!(p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .is_err());
    assert_eq!(p.intents().unwrap()[0].state, ProvisionState::Planned);
    zfs.create_pool(&PoolSpec {
        name: "tank".into(),
        layout: PoolLayout::Raidz2,
        disks: disks(6),
        pool_properties: vec![],
        fs_properties: vec![],
        mountpoint: None,
        force: false,
    })
    .await
    .unwrap();
    let out = Provisioner::new(zfs.clone(), cfg.clone())
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap();
    assert!(out.resumed);
    assert_eq!(out.state, ProvisionState::Done);
}

#[tokio::test]
async fn an_existing_pool_with_other_disks_is_not_adopted() {
    let (_dir, zfs, cfg) = setup();
    zfs.create_pool(&PoolSpec {
        name: "tank".into(),
        layout: PoolLayout::Raidz1,
        disks: disks(6)[3..].to_vec(),
        pool_properties: vec![],
        fs_properties: vec![],
        mountpoint: None,
        force: false,
    })
    .await
    .unwrap();
    let p = Provisioner::new(zfs.clone(), cfg);
    let e = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(4), false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProvisionError::PoolExistsWithOtherDisks { .. }),
        "{e}"
    );
    assert_eq!(p.intents().unwrap()[0].state, ProvisionState::Planned);
}

#[tokio::test]
async fn conflicting_unfinished_intent_is_refused() {
    let (_dir, zfs, cfg) = setup();
    zfs.fail_next(FakeOp::CreatePool, FailureKind::Busy);
    let p = Provisioner::new(zfs.clone(), cfg);
    assert!(p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .is_err());
    let e = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(5), false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProvisionError::Conflict {
                state: ProvisionState::Planned,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("virtio-ZD6"));
}

#[tokio::test]
async fn key_file_rules() {
    let (dir, zfs, mut cfg) = setup();
    // Inside the pool's mount point: refused before anything happens.
    cfg.mountpoint = Some(dir.path().join("keys").to_string_lossy().into_owned());
    let p = Provisioner::new(zfs.clone(), cfg.clone());
    let e = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionError::KeyInsidePool { .. }), "{e}");
    assert!(p.intents().unwrap().is_empty());
    // A wrong-sized existing key is never overwritten.
    cfg.mountpoint = None;
    std::fs::create_dir_all(&cfg.key_dir).unwrap();
    std::fs::write(cfg.key_file("tank"), b"short").unwrap();
    let p = Provisioner::new(zfs.clone(), cfg.clone());
    let e = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionError::KeyFile { .. }), "{e}");
    assert_eq!(std::fs::read(cfg.key_file("tank")).unwrap(), b"short");
    assert!(
        zfs.pool_list().await.unwrap().is_empty(),
        "no pool without a key"
    );
    // A good existing key (a restore) is used as is.
    std::fs::write(cfg.key_file("tank"), [7u8; KEY_BYTES]).unwrap();
    let out = p
        .create_pool("tank", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap();
    assert!(out.resumed);
    assert_eq!(
        std::fs::read(cfg.key_file("tank")).unwrap(),
        [7u8; KEY_BYTES]
    );
}

#[tokio::test]
async fn invalid_pool_name_is_refused_without_an_intent() {
    let (_dir, zfs, cfg) = setup();
    let p = Provisioner::new(zfs, cfg);
    let e = p
        .create_pool("-f", StorageLayout::Raidz2, &disks(6), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionError::Zfs { .. }));
    assert!(p.intents().unwrap().is_empty());
}
