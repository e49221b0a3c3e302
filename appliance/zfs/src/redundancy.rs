//! Redundancy: how many more device failures a pool survives right now.
//!
//! Pure functions over [`PoolStatus`]. The rules:
//!
//! * Each top-level vdev holding pool data (class normal, special or dedup)
//!   is counted; logs, cache and spares are not, because losing them loses
//!   no pool data.
//! * Failures tolerated by design: RAID-Z*N* and dRAID*N* → *N*, a mirror of
//!   *k* → *k* − 1, a single device → 0.
//! * A *slot* (direct child of the top-level vdev) has failed when it is a
//!   leaf in a failed state (FAULTED, REMOVED, UNAVAIL, OFFLINE, unknown), or
//!   an interior vdev (replacing, spare, nested mirror) all of whose children
//!   failed. While a resilver runs, a `replacing`/`spare` slot with a failed
//!   child also counts as failed: its new device does not yet hold the data.
//! * margin(vdev) = tolerated − failed; the pool's margin is the minimum over
//!   its data vdevs. A negative margin means a vdev has lost data and the
//!   pool cannot be fully available.
//!
//! The level combines structure only; callers also look at the pool state
//! (a SUSPENDED pool is unavailable whatever its margin).

use serde::{Deserialize, Serialize};

use crate::model::{PoolStatus, Vdev, VdevClass, VdevKind};

/// The redundancy scheme of one top-level vdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// RAID-Z with this parity.
    Raidz(u8),
    /// dRAID with this parity.
    Draid(u8),
    /// N-way mirror.
    Mirror,
    /// A single device (or a replacement of one).
    Single,
    /// Something this crate does not know, by name.
    Other(String),
}

impl Layout {
    /// Short human name (`RAID-Z2`, `dRAID1`, `mirror`, `single disk`).
    pub fn label(&self) -> String {
        match self {
            Self::Raidz(p) => format!("RAID-Z{p}"),
            Self::Draid(p) => format!("dRAID{p}"),
            Self::Mirror => "mirror".to_owned(),
            Self::Single => "single disk".to_owned(),
            Self::Other(n) => n.clone(),
        }
    }
}

/// Redundancy of one top-level vdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdevRedundancy {
    /// Vdev name (`raidz2-0`).
    pub name: String,
    /// Allocation class.
    pub class: VdevClass,
    /// Scheme.
    pub layout: Layout,
    /// Number of device slots.
    pub width: u32,
    /// Failures tolerated by design.
    pub tolerated: u32,
    /// Slots currently failed.
    pub failed: u32,
    /// Names of the failed slots.
    pub failed_devices: Vec<String>,
    /// `tolerated - failed`.
    pub margin: i64,
}

/// Overall classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedundancyLevel {
    /// No device failed.
    Full,
    /// Devices failed, but at least one more failure is survivable.
    Reduced,
    /// Devices failed and the next failure loses data.
    Exhausted,
    /// A data vdev has failed beyond its redundancy.
    Lost,
}

/// Redundancy of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redundancy {
    /// Per data vdev.
    pub vdevs: Vec<VdevRedundancy>,
    /// Device slots in data vdevs.
    pub disks: u32,
    /// Failed slots in data vdevs.
    pub failed: u32,
    /// Additional failures survivable now (minimum over data vdevs);
    /// negative when a vdev is already lost.
    pub margin: i64,
    /// Classification.
    pub level: RedundancyLevel,
    /// Human summary: "RAID-Z2, 6 disks, 1 failed, survives 1 more".
    pub summary: String,
}

/// Computes the redundancy of `status`.
pub fn redundancy(status: &PoolStatus) -> Redundancy {
    let resilvering = status.resilvering();
    let vdevs: Vec<VdevRedundancy> = status
        .top_level()
        .iter()
        .filter(|v| v.class.holds_pool_data())
        .map(|v| vdev_redundancy(v, resilvering))
        .collect();
    let disks = vdevs.iter().map(|v| v.width).sum();
    let failed = vdevs.iter().map(|v| v.failed).sum();
    let margin = vdevs.iter().map(|v| v.margin).min().unwrap_or(-1);
    let level = if vdevs.is_empty() || margin < 0 {
        RedundancyLevel::Lost
    } else if failed == 0 {
        RedundancyLevel::Full
    } else if margin == 0 {
        RedundancyLevel::Exhausted
    } else {
        RedundancyLevel::Reduced
    };
    let summary = summarise(&vdevs, disks, failed, margin);
    Redundancy {
        vdevs,
        disks,
        failed,
        margin,
        level,
        summary,
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Redundancy of one top-level vdev.
pub fn vdev_redundancy(v: &Vdev, resilvering: bool) -> VdevRedundancy {
    let (layout, slots): (Layout, Vec<&Vdev>) = match &v.kind {
        VdevKind::Raidz { parity } => (Layout::Raidz(*parity), v.children.iter().collect()),
        VdevKind::Draid { parity, .. } => (Layout::Draid(*parity), v.children.iter().collect()),
        VdevKind::Mirror => (Layout::Mirror, v.children.iter().collect()),
        VdevKind::Disk
        | VdevKind::File
        | VdevKind::DraidSpare
        | VdevKind::Replacing
        | VdevKind::Spare => (Layout::Single, vec![v]),
        VdevKind::Root => (Layout::Other("root".to_owned()), vec![v]),
        VdevKind::Other { name } => (Layout::Other(name.clone()), vec![v]),
    };
    let width = count_u32(slots.len());
    let tolerated = match layout {
        Layout::Raidz(p) | Layout::Draid(p) => u32::from(p),
        Layout::Mirror => width.saturating_sub(1),
        Layout::Single | Layout::Other(_) => 0,
    };
    let failed_devices: Vec<String> = slots
        .iter()
        .filter(|s| slot_failed(s, resilvering))
        .map(|s| s.name.clone())
        .collect();
    let failed = count_u32(failed_devices.len());
    VdevRedundancy {
        name: v.name.clone(),
        class: v.class.clone(),
        layout,
        width,
        tolerated,
        failed,
        failed_devices,
        margin: i64::from(tolerated) - i64::from(failed),
    }
}

/// Whether one slot of a top-level vdev provides no data.
pub fn slot_failed(slot: &Vdev, resilvering: bool) -> bool {
    if slot.children.is_empty() {
        return slot.state.is_failed();
    }
    let failed_children = slot
        .children
        .iter()
        .filter(|c| slot_failed(c, resilvering))
        .count();
    if failed_children == slot.children.len() {
        return true;
    }
    let rebuilding = matches!(slot.kind, VdevKind::Replacing | VdevKind::Spare);
    rebuilding && resilvering && failed_children > 0
}

fn summarise(vdevs: &[VdevRedundancy], disks: u32, failed: u32, margin: i64) -> String {
    if vdevs.is_empty() {
        return "no data vdevs".to_owned();
    }
    // Group equal layouts/widths: "2 × RAID-Z2", else join with " + ".
    let mut groups: Vec<(String, usize)> = Vec::new();
    for v in vdevs {
        let label = if v.layout == Layout::Mirror {
            format!("{}-way mirror", v.width)
        } else {
            v.layout.label()
        };
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => groups.push((label, 1)),
        }
    }
    let layout = groups
        .iter()
        .map(|(l, n)| {
            if *n == 1 {
                l.clone()
            } else {
                format!("{n} × {l}")
            }
        })
        .collect::<Vec<_>>()
        .join(" + ");
    let disk_word = if disks == 1 { "disk" } else { "disks" };
    let outlook = match margin {
        m if m < 0 => "redundancy exceeded, data unavailable".to_owned(),
        0 => "survives no more".to_owned(),
        m => format!("survives {m} more"),
    };
    format!("{layout}, {disks} {disk_word}, {failed} failed, {outlook}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceState, ErrorCounts, ScanFunction, ScanState, ScanStatus};

    fn leaf(name: &str, state: DeviceState) -> Vdev {
        Vdev {
            name: name.to_owned(),
            kind: VdevKind::Disk,
            class: VdevClass::Normal,
            state,
            guid: None,
            path: None,
            errors: ErrorCounts::default(),
            note: None,
            children: Vec::new(),
        }
    }

    fn group(name: &str, kind: VdevKind, children: Vec<Vdev>) -> Vdev {
        let state = if children.iter().all(|c| !c.state.is_failed()) {
            DeviceState::Online
        } else {
            DeviceState::Degraded
        };
        Vdev {
            children,
            kind,
            state,
            ..leaf(name, DeviceState::Online)
        }
    }

    fn disks(prefix: &str, n: usize, failed: usize) -> Vec<Vdev> {
        (0..n)
            .map(|i| {
                let st = if i < failed {
                    DeviceState::Removed
                } else {
                    DeviceState::Online
                };
                leaf(&format!("{prefix}{i}"), st)
            })
            .collect()
    }

    fn pool(top: Vec<Vdev>) -> PoolStatus {
        PoolStatus {
            name: "tank".into(),
            state: DeviceState::Online,
            guid: None,
            status: None,
            action: None,
            scan: None,
            root: group("tank", VdevKind::Root, top),
            cache: Vec::new(),
            spares: Vec::new(),
            data_errors: None,
        }
    }

    #[test]
    fn raidz_levels_with_zero_to_three_failures() {
        for parity in 1u8..=3 {
            for failed in 0usize..=3 {
                let p = pool(vec![group(
                    &format!("raidz{parity}-0"),
                    VdevKind::Raidz { parity },
                    disks("d", 6, failed),
                )]);
                let r = redundancy(&p);
                let expect = i64::from(parity) - i64::try_from(failed).unwrap();
                assert_eq!(r.margin, expect, "raidz{parity} with {failed} failed");
                assert_eq!(r.failed, u32::try_from(failed).unwrap());
                assert_eq!(r.disks, 6);
                let level = match (failed, expect) {
                    (0, _) => RedundancyLevel::Full,
                    (_, m) if m < 0 => RedundancyLevel::Lost,
                    (_, 0) => RedundancyLevel::Exhausted,
                    _ => RedundancyLevel::Reduced,
                };
                assert_eq!(r.level, level, "raidz{parity} with {failed} failed");
            }
        }
    }

    #[test]
    fn summary_strings() {
        let p = pool(vec![group(
            "raidz2-0",
            VdevKind::Raidz { parity: 2 },
            disks("d", 6, 1),
        )]);
        assert_eq!(
            redundancy(&p).summary,
            "RAID-Z2, 6 disks, 1 failed, survives 1 more"
        );
        let p = pool(vec![group(
            "raidz2-0",
            VdevKind::Raidz { parity: 2 },
            disks("d", 6, 2),
        )]);
        assert_eq!(
            redundancy(&p).summary,
            "RAID-Z2, 6 disks, 2 failed, survives no more"
        );
        let p = pool(vec![group(
            "raidz2-0",
            VdevKind::Raidz { parity: 2 },
            disks("d", 6, 3),
        )]);
        assert_eq!(
            redundancy(&p).summary,
            "RAID-Z2, 6 disks, 3 failed, redundancy exceeded, data unavailable"
        );
    }

    #[test]
    fn mirrors_of_two_and_three() {
        for width in 2usize..=3 {
            for failed in 0..=width {
                let p = pool(vec![group(
                    "mirror-0",
                    VdevKind::Mirror,
                    disks("m", width, failed),
                )]);
                let r = redundancy(&p);
                let w = i64::try_from(width).unwrap();
                let f = i64::try_from(failed).unwrap();
                assert_eq!(r.margin, w - 1 - f, "{width}-way mirror, {failed} failed");
                assert_eq!(r.vdevs[0].tolerated, u32::try_from(width - 1).unwrap());
            }
        }
    }

    #[test]
    fn multi_vdev_pool_takes_minimum() {
        // Two RAID-Z2 vdevs: one failure in the first, two in the second.
        let p = pool(vec![
            group("raidz2-0", VdevKind::Raidz { parity: 2 }, disks("a", 6, 1)),
            group("raidz2-1", VdevKind::Raidz { parity: 2 }, disks("b", 6, 2)),
        ]);
        let r = redundancy(&p);
        assert_eq!(r.margin, 0);
        assert_eq!(r.failed, 3);
        assert_eq!(r.disks, 12);
        assert_eq!(r.level, RedundancyLevel::Exhausted);
        assert_eq!(
            r.summary,
            "2 × RAID-Z2, 12 disks, 3 failed, survives no more"
        );
        // Striped mirrors: three pairs, one disk gone in each: survives 0.
        let p = pool(vec![
            group("mirror-0", VdevKind::Mirror, disks("a", 2, 1)),
            group("mirror-1", VdevKind::Mirror, disks("b", 2, 1)),
            group("mirror-2", VdevKind::Mirror, disks("c", 2, 0)),
        ]);
        let r = redundancy(&p);
        assert_eq!(r.margin, 0);
        assert_eq!(
            r.summary,
            "3 × 2-way mirror, 6 disks, 2 failed, survives no more"
        );
        // A plain stripe of two disks tolerates nothing.
        let p = pool(disks("s", 2, 0));
        let r = redundancy(&p);
        assert_eq!(r.margin, 0);
        assert_eq!(r.level, RedundancyLevel::Full);
        assert_eq!(
            r.summary,
            "2 × single disk, 2 disks, 0 failed, survives no more"
        );
    }

    #[test]
    fn logs_cache_do_not_count_but_special_does() {
        let mut log = group("mirror-1", VdevKind::Mirror, disks("l", 2, 2));
        log.class = VdevClass::Log;
        let mut special = group("mirror-2", VdevKind::Mirror, disks("s", 2, 1));
        special.class = VdevClass::Special;
        let p = pool(vec![
            group("raidz2-0", VdevKind::Raidz { parity: 2 }, disks("d", 6, 0)),
            log,
            special,
        ]);
        let r = redundancy(&p);
        assert_eq!(r.vdevs.len(), 2);
        assert_eq!(
            r.margin, 0,
            "special mirror with one failure limits the pool"
        );
    }

    #[test]
    fn replacing_slot_counts_failed_only_while_resilvering() {
        let replacing = group(
            "replacing-1",
            VdevKind::Replacing,
            vec![
                leaf("old", DeviceState::Removed),
                leaf("new", DeviceState::Online),
            ],
        );
        let mut children = disks("d", 5, 0);
        children.insert(1, replacing);
        let mut p = pool(vec![group(
            "raidz2-0",
            VdevKind::Raidz { parity: 2 },
            children,
        )]);
        assert_eq!(redundancy(&p).margin, 2);
        p.scan = Some(ScanStatus {
            function: ScanFunction::Resilver,
            state: ScanState::Running,
            start_time: None,
            end_time: None,
            pass_start: None,
            paused_since: None,
            spent_paused_secs: 0,
            to_examine: 0,
            examined: 0,
            skipped: 0,
            issued: 0,
            pass_issued: 0,
            processed: 0,
            errors: 0,
            elapsed_secs: None,
            percent_done_text: None,
        });
        let r = redundancy(&p);
        assert_eq!(r.margin, 1);
        assert_eq!(r.vdevs[0].failed_devices, vec!["replacing-1".to_owned()]);
        // A nested mirror slot fails only when all its children fail.
        let nested = group("mirror-9", VdevKind::Mirror, disks("n", 2, 2));
        assert!(slot_failed(&nested, false));
        let nested = group("mirror-9", VdevKind::Mirror, disks("n", 2, 1));
        assert!(!slot_failed(&nested, true));
    }

    #[test]
    fn empty_pool_is_lost() {
        let r = redundancy(&pool(Vec::new()));
        assert_eq!(r.level, RedundancyLevel::Lost);
        assert_eq!(r.summary, "no data vdevs");
    }
}
