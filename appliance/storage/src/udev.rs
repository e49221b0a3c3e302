//! Disk hot-plug: udev's netlink messages, parsed without libudev.
//!
//! # Why the netlink socket and not the `udev`/`tokio-udev` crates
//! * The crates wrap libudev through `libudev-sys`, which needs
//!   `libudev-dev` and pkg-config at build time and links libudev (part of
//!   systemd) into the daemon; the socket needs neither: `nix`, already in
//!   the workspace, opens it.
//! * `udev::MonitorSocket` is not `Send`, so with tokio it must live on a
//!   dedicated thread or a `LocalSet`; a netlink fd goes straight into
//!   `tokio::io::unix::AsyncFd`.
//! * The parsing is then ours, pure and tested on bytes, like every other
//!   protocol in the appliance.
//!
//! The cost is depending on udev's message format, which systemd calls
//! internal. It has not changed since 2009 (libudev's
//! `monitor_netlink_header`: `"libudev\0"`, magic `0xfeedcafe` big-endian,
//! then native-endian `header_size`, `properties_off`, `properties_len`,
//! two filter hashes and a tag bloom filter, then NUL-separated
//! `KEY=VALUE` properties); [`parse_uevent`] also takes the kernel's own
//! format (`ACTION@DEVPATH\0KEY=VALUE\0...`). If the header ever changed,
//! parsing fails loudly ([`UeventError::BadMagic`]) and the ZFS follower and
//! polling still see every pool disk.
//!
//! # Listening
//! The monitor joins netlink group 2 ("udev"): messages udevd sends *after*
//! our rules ran, so they carry `TAGS=:appliance-disk:`, `APPLIANCE_BAY`,
//! `ID_SERIAL` and the `/dev/disk/by-id` links (`DEVLINKS`). Only processes
//! with `CAP_NET_ADMIN` may send to that group, so its messages come from
//! udevd (or root).
//!
//! # From messages to events
//! [`disk_change`] keeps `add`/`remove` of whole block disks carrying our
//! tag (`appliance-disk`, set by `udev/62-appliance-disks.rules`). The
//! manager publishes `storage.disk.<id>.added|removed` for them, except a
//! removal of a pool member: ZFS reports that one (REMOVED, with the pool's
//! new margin), and publishing it from udev too would say it twice.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use appliance_types::storage::{DeviceErrors, DiskAction, DiskEvent, EventSource, StorageEvent};

/// The tag our udev rules put on data disks.
pub const DISK_TAG: &str = "appliance-disk";

/// Largest message accepted. udev messages are a few KiB (properties of a
/// disk with all its links); 64 KiB bounds a hostile or corrupt one.
pub const MAX_MESSAGE: usize = 64 * 1024;

const UDEV_PREFIX: &[u8; 8] = b"libudev\0";
const UDEV_MAGIC: u32 = 0xfeed_cafe;
const UDEV_HEADER_MIN: usize = 40;

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UeventSource {
    /// The kernel (group 1), before udev rules.
    Kernel,
    /// udevd (group 2), after the rules.
    Udev,
}

/// One parsed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// Kernel or udev.
    pub source: UeventSource,
    /// `add`, `remove`, `change`, ...
    pub action: String,
    /// `/devices/...`.
    pub devpath: String,
    /// All properties.
    pub properties: BTreeMap<String, String>,
}

impl Uevent {
    /// A property.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// Tags (`TAGS=:a:b:`; `CURRENT_TAGS` counts too).
    pub fn tags(&self) -> Vec<&str> {
        let mut t: Vec<&str> = ["TAGS", "CURRENT_TAGS"]
            .iter()
            .filter_map(|k| self.get(k))
            .flat_map(|v| v.split(':'))
            .filter(|s| !s.is_empty())
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

/// Why a message was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("uevent of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A udev header with another magic (the format changed).
    #[error("udev message with unknown magic {0:#x}")]
    BadMagic(u32),
    /// Header fields point outside the message.
    #[error("udev message header out of bounds: {0}")]
    BadHeader(String),
    /// Neither a udev nor a kernel message.
    #[error("not a uevent: {0}")]
    Malformed(String),
}

fn properties(bytes: &[u8]) -> BTreeMap<String, String> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = std::str::from_utf8(kv).ok()?;
            let (k, v) = s.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn u32_at(buf: &[u8], off: usize, big_endian: bool) -> Option<u32> {
    let b: [u8; 4] = buf.get(off..off + 4)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_ne_bytes(b)
    })
}

/// Parses one netlink message (udev or kernel format).
pub fn parse_uevent(buf: &[u8]) -> Result<Uevent, UeventError> {
    if buf.len() > MAX_MESSAGE {
        return Err(UeventError::TooLarge(buf.len()));
    }
    if buf.starts_with(UDEV_PREFIX) {
        let magic = u32_at(buf, 8, true).ok_or_else(|| UeventError::BadHeader("short".into()))?;
        if magic != UDEV_MAGIC {
            return Err(UeventError::BadMagic(magic));
        }
        let field = |off| {
            u32_at(buf, off, false)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| UeventError::BadHeader("short".into()))
        };
        let header_size = field(12)?;
        let off = field(16)?;
        let len = field(20)?;
        if header_size < UDEV_HEADER_MIN
            || off < header_size
            || off.checked_add(len).is_none_or(|e| e > buf.len())
        {
            return Err(UeventError::BadHeader(format!(
                "header {header_size}, properties {off}+{len} in {} bytes",
                buf.len()
            )));
        }
        let props = properties(&buf[off..off + len]);
        let action = props
            .get("ACTION")
            .cloned()
            .ok_or_else(|| UeventError::Malformed("udev message without ACTION".into()))?;
        let devpath = props.get("DEVPATH").cloned().unwrap_or_default();
        return Ok(Uevent {
            source: UeventSource::Udev,
            action,
            devpath,
            properties: props,
        });
    }
    let first_end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let head = std::str::from_utf8(&buf[..first_end])
        .map_err(|_| UeventError::Malformed("header is not UTF-8".into()))?;
    let (action, devpath) = head
        .split_once('@')
        .ok_or_else(|| UeventError::Malformed(format!("no ACTION@DEVPATH in {head:?}")))?;
    let props = properties(buf.get(first_end + 1..).unwrap_or_default());
    Ok(Uevent {
        source: UeventSource::Kernel,
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        properties: props,
    })
}

/// Builds a udev-format message (for tests, and to document the format).
pub fn encode_udev_message(props: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in props {
        body.extend_from_slice(k.as_bytes());
        body.push(b'=');
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    let mut m = Vec::with_capacity(UDEV_HEADER_MIN + body.len());
    m.extend_from_slice(UDEV_PREFIX);
    m.extend_from_slice(&UDEV_MAGIC.to_be_bytes());
    let header = u32::try_from(UDEV_HEADER_MIN).unwrap_or(40);
    m.extend_from_slice(&header.to_ne_bytes());
    m.extend_from_slice(&header.to_ne_bytes());
    m.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&[0u8; 16]);
    m.extend_from_slice(&body);
    m
}

/// A disk that appeared or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChange {
    /// Added or removed.
    pub action: DiskAction,
    /// Disk id (by-id name).
    pub id: String,
    /// Kernel name (`sdb`).
    pub devname: Option<String>,
    /// Bay.
    pub bay: Option<String>,
    /// Serial.
    pub serial: Option<String>,
}

/// The disk change a message means, if it is an add/remove of a whole disk
/// tagged `tag` (or `APPLIANCE_DISK=1`).
pub fn disk_change(ev: &Uevent, tag: &str) -> Option<DiskChange> {
    let action = match ev.action.as_str() {
        "add" => DiskAction::Added,
        "remove" => DiskAction::Removed,
        _ => return None,
    };
    if ev.get("SUBSYSTEM") != Some("block") || ev.get("DEVTYPE") != Some("disk") {
        return None;
    }
    if !ev.tags().contains(&tag) && ev.get("APPLIANCE_DISK") != Some("1") {
        return None;
    }
    // by-id links: prefer transport names (ata-, nvme-, scsi-, virtio-)
    // over wwn-, never a partition.
    let mut links: Vec<&str> = ev
        .get("DEVLINKS")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|l| l.strip_prefix("/dev/disk/by-id/"))
        .filter(|l| !l.contains("-part"))
        .collect();
    links.sort_by_key(|l| (l.starts_with("wwn-"), *l));
    let id = links
        .first()
        .map(|s| (*s).to_owned())
        .or_else(|| ev.get("ID_SERIAL").map(str::to_owned))
        .or_else(|| {
            ev.get("DEVNAME")
                .map(|d| d.rsplit('/').next().unwrap_or(d).to_owned())
        })?;
    Some(DiskChange {
        action,
        id,
        devname: ev
            .get("DEVNAME")
            .map(|d| d.rsplit('/').next().unwrap_or(d).to_owned()),
        bay: ev
            .get("APPLIANCE_BAY")
            .filter(|b| !b.is_empty())
            .map(str::to_owned),
        serial: ev
            .get("ID_SERIAL_SHORT")
            .or_else(|| ev.get("ID_SERIAL"))
            .map(str::to_owned),
    })
}

/// The bus event for a disk change.
pub fn disk_event(change: &DiskChange, pool: Option<&str>, at: u64) -> StorageEvent {
    StorageEvent::Disk(DiskEvent {
        disk: change.id.clone(),
        action: change.action,
        pool: pool.map(str::to_owned),
        state: if change.action == DiskAction::Removed {
            "ABSENT".to_owned()
        } else {
            "PRESENT".to_owned()
        },
        previous_state: None,
        errors: DeviceErrors {
            disk: change.id.clone(),
            ..DeviceErrors::default()
        },
        bay: change.bay.clone(),
        serial: change.serial.clone(),
        source: EventSource::Udev,
        at,
    })
}

/// Why the monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The socket.
    #[error("udev netlink socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// The netlink group udevd sends to after processing rules.
const UDEV_GROUP: u32 = 2;

/// Receive buffer: 1 MiB holds a burst of a whole shelf of disks appearing
/// at once (a few KiB each) while the daemon is busy.
const RCVBUF: usize = 1 << 20;

/// A udev monitor on the netlink socket.
#[derive(Debug)]
pub struct UdevMonitor {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

impl UdevMonitor {
    /// Opens the socket and joins the udev group.
    pub fn open() -> Result<Self, MonitorError> {
        use nix::sys::socket::{
            bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol,
            SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(nix_io)?;
        // Best effort: the default buffer works, just with less slack.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, UDEV_GROUP)).map_err(nix_io)?;
        // `AsyncFd::new` is deprecated in favour of the unsafe `register`
        // (the workspace forbids unsafe code). Its soundness condition is
        // that nobody else closes or reuses the fd while it is registered:
        // the `OwnedFd` is moved into the `AsyncFd` and never lent out.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(Self {
            fd,
            buf: vec![0; MAX_MESSAGE + 1],
        })
    }

    /// The next message (malformed ones are returned as errors; the caller
    /// logs them and goes on).
    pub async fn next(&mut self) -> Result<Result<Uevent, UeventError>, MonitorError> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            match guard.try_io(|fd| {
                nix::sys::socket::recv(
                    fd.get_ref().as_raw_fd(),
                    buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(nix_io)
            }) {
                Ok(Ok(n)) => return Ok(parse_uevent(&self.buf[..n])),
                // ENOBUFS: the kernel dropped messages; keep going (the ZFS
                // follower and polling cover pool disks).
                Ok(Err(e)) if e.raw_os_error() == Some(libc_enobufs()) => {
                    tracing::warn!("udev monitor overflowed; some hot-plug events were lost");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => {}
            }
        }
    }
}

/// Feeds tagged disk add/remove messages from udev to the manager until the
/// manager stops. Returns an error only if the socket cannot be opened or
/// read (the daemon logs it and runs without hot-plug events: pool disks are
/// still covered by the ZFS follower and polling).
pub async fn watch_udev(mgr: crate::StorageManager) -> Result<(), MonitorError> {
    let mut mon = UdevMonitor::open()?;
    loop {
        match mon.next().await? {
            Ok(ev) => {
                if let Some(change) = disk_change(&ev, DISK_TAG) {
                    if !mgr.hotplug(change).await {
                        return Ok(());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a udev message"),
        }
    }
}

fn libc_enobufs() -> i32 {
    nix::errno::Errno::ENOBUFS as i32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What udevd sends for a virtio disk hot-added by QEMU into bay 2,
    /// after 60-persistent-storage and our 61/62 rules.
    fn add_zn2() -> Vec<u8> {
        encode_udev_message(&[
            ("ACTION", "add"),
            (
                "DEVPATH",
                "/devices/pci0000:00/0000:00:12.0/virtio7/block/vdh",
            ),
            ("SUBSYSTEM", "block"),
            ("DEVNAME", "/dev/vdh"),
            ("DEVTYPE", "disk"),
            ("SEQNUM", "4242"),
            ("ID_SERIAL", "ZN2"),
            ("ID_PATH", "pci-0000:00:12.0"),
            ("APPLIANCE_BAY", "bay2"),
            ("APPLIANCE_DISK", "1"),
            (
                "DEVLINKS",
                "/dev/disk/by-path/pci-0000:00:12.0 /dev/disk/by-id/virtio-ZN2 /dev/appliance/bay2",
            ),
            ("TAGS", ":appliance-disk:systemd:"),
            ("CURRENT_TAGS", ":appliance-disk:systemd:"),
        ])
    }

    #[test]
    fn udev_message_round_trip_and_disk_change() {
        let ev = parse_uevent(&add_zn2()).unwrap();
        assert_eq!(ev.source, UeventSource::Udev);
        assert_eq!(ev.action, "add");
        assert_eq!(ev.tags(), ["appliance-disk", "systemd"]);
        let c = disk_change(&ev, DISK_TAG).unwrap();
        assert_eq!(
            c,
            DiskChange {
                action: DiskAction::Added,
                id: "virtio-ZN2".into(),
                devname: Some("vdh".into()),
                bay: Some("bay2".into()),
                serial: Some("ZN2".into()),
            }
        );
        let e = disk_event(&c, None, 7);
        assert_eq!(e.subject(), "storage.disk.virtio-ZN2.added");
    }

    #[test]
    fn kernel_messages_parse_but_carry_no_tag() {
        let raw = b"remove@/devices/pci0000:00/0000:00:05.0/virtio2/block/vdc\0ACTION=remove\0DEVPATH=/devices/pci0000:00/0000:00:05.0/virtio2/block/vdc\0SUBSYSTEM=block\0MAJOR=254\0MINOR=32\0DEVNAME=vdc\0DEVTYPE=disk\0SEQNUM=1234\0";
        let ev = parse_uevent(raw).unwrap();
        assert_eq!(ev.source, UeventSource::Kernel);
        assert_eq!(ev.action, "remove");
        assert_eq!(ev.get("DEVNAME"), Some("vdc"));
        assert!(disk_change(&ev, DISK_TAG).is_none(), "untagged");
    }

    #[test]
    fn filters() {
        let mut ev = parse_uevent(&add_zn2()).unwrap();
        ev.properties.insert("DEVTYPE".into(), "partition".into());
        assert!(disk_change(&ev, DISK_TAG).is_none());
        let mut ev = parse_uevent(&add_zn2()).unwrap();
        ev.action = "change".into();
        assert!(disk_change(&ev, DISK_TAG).is_none());
        // Tag only through APPLIANCE_DISK (an enumeration without TAGS).
        let mut ev = parse_uevent(&add_zn2()).unwrap();
        ev.properties.remove("TAGS");
        ev.properties.remove("CURRENT_TAGS");
        assert!(disk_change(&ev, DISK_TAG).is_some());
        ev.properties.remove("APPLIANCE_DISK");
        assert!(disk_change(&ev, DISK_TAG).is_none());
        // Removal of the boot disk: never tagged by the rules.
        let boot = encode_udev_message(&[
            ("ACTION", "remove"),
            ("SUBSYSTEM", "block"),
            ("DEVTYPE", "disk"),
            ("APPLIANCE_BOOT_DISK", "1"),
        ]);
        assert!(disk_change(&parse_uevent(&boot).unwrap(), DISK_TAG).is_none());
        // wwn- links lose to transport names; no links: the serial.
        let m = encode_udev_message(&[
            ("ACTION", "remove"),
            ("SUBSYSTEM", "block"),
            ("DEVTYPE", "disk"),
            ("TAGS", ":appliance-disk:"),
            ("DEVLINKS", "/dev/disk/by-id/wwn-0x5000c500 /dev/disk/by-id/ata-ST4000_ZC1 /dev/disk/by-id/ata-ST4000_ZC1-part1"),
        ]);
        let c = disk_change(&parse_uevent(&m).unwrap(), DISK_TAG).unwrap();
        assert_eq!(c.id, "ata-ST4000_ZC1");
        assert_eq!(c.action, DiskAction::Removed);
        assert_eq!(
            disk_event(&c, Some("tank"), 1).subject(),
            "storage.disk.ata-ST4000_ZC1.removed"
        );
    }

    /// The socket opens and joins the udev group (no event is needed).
    #[tokio::test]
    async fn monitor_socket_opens() {
        let m = UdevMonitor::open();
        assert!(m.is_ok(), "{m:?}");
    }

    #[test]
    fn hostile_messages_are_refused_not_panicked_on() {
        let good = add_zn2();
        // Every truncation.
        for n in 0..good.len() {
            let _ = parse_uevent(&good[..n]);
        }
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(parse_uevent(&bad), Err(UeventError::BadMagic(0xdead_beef)));
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse_uevent(&bad), Err(UeventError::BadHeader(_))));
        let mut bad = good;
        bad[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(parse_uevent(&bad), Err(UeventError::BadHeader(_))));
        assert!(matches!(
            parse_uevent(b"garbage"),
            Err(UeventError::Malformed(_))
        ));
        assert!(matches!(
            parse_uevent(&vec![b'a'; MAX_MESSAGE + 1]),
            Err(UeventError::TooLarge(_))
        ));
        assert!(matches!(
            parse_uevent(&encode_udev_message(&[("DEVPATH", "/x")])),
            Err(UeventError::Malformed(_))
        ));
        // Junk properties are skipped.
        let ev = parse_uevent(b"add@/x\0=novalue\0\xff\xfe=1\0OK=1\0noequals\0").unwrap();
        assert_eq!(ev.properties.len(), 1);
    }
}
