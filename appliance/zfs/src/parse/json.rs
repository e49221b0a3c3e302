//! OpenZFS 2.3 JSON output (`-j --json-int`).
//!
//! Shapes, from the captures in `tests/fixtures/openzfs-2.3.2-json/` and
//! `cmd/zpool/zpool_main.c` (`status_callback_json`, `vdev_stats_nvlist`,
//! `class_vdevs_nvlist`, `l2cache_nvlist`, `spares_nvlist`):
//!
//! * `zpool status -j`: `pools.<name>` with `state`, `pool_guid`, `status`,
//!   `action`, `scan_stats`, `vdevs` (the root vdev, children nested under
//!   `vdevs`), and `logs`/`special`/`dedup`/`l2cache`/`spares` groups when
//!   present. With `--json-flat-vdevs` every vdev sits directly under
//!   `vdevs` with a `parent` name; both forms are accepted.
//! * `zpool list -j` / `zpool get -j`: `pools.<name>.properties.<prop>` =
//!   `{value, source: {type, data}}`.
//! * `zfs list -j` / `zfs get -j`: `datasets.<name>.properties...` likewise.
//!
//! JSON objects are read in document order (ZFS prints vdevs in slot order,
//! which the tree keeps). Numbers are accepted as JSON integers or decimal
//! strings. Known quirk: in 2.3.2 `zpool get -j --json-int` prints the
//! `guid` property as 9223372036854775807 (clamped to i64), so the pool GUID
//! is taken from `pool_guid`, which is exact.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{check_size, dataset_from_properties, ParseError, MAX_VDEV_DEPTH};
use crate::model::{
    Capacity, Dataset, DeviceState, ErrorCounts, Pool, PoolStatus, Properties, Property,
    PropertySource, ScanFunction, ScanState, ScanStatus, Vdev, VdevClass, VdevKind,
};

/// A JSON object kept in document order.
#[derive(Debug)]
struct Ordered<T>(Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// An unsigned integer given as a JSON number or a decimal string; `None`
/// for `"-"`, negative or fractional values.
#[derive(Debug, Clone, Copy, Default)]
struct Num(Option<u64>);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned integer or a decimal string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                Ok(Num(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Num, E> {
                Ok(Num(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                Ok(Num(v.trim().parse().ok()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Num, E> {
                Ok(Num(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Any JSON scalar as text (`--json-int` prints numbers, others strings).
#[derive(Debug, Clone, Default)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON scalar")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(if v { "on" } else { "off" }.to_owned()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar("-".to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
struct RawSource {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    data: Scalar,
}

#[derive(Debug, Deserialize)]
struct RawProperty {
    #[serde(default)]
    value: Scalar,
    source: Option<RawSource>,
}

fn properties(raw: Ordered<RawProperty>) -> Properties {
    Properties(
        raw.0
            .into_iter()
            .map(|(name, p)| {
                let source = p.source.map_or(PropertySource::None, |s| {
                    PropertySource::from_json(&s.kind, &s.data.0)
                });
                (
                    name,
                    Property {
                        value: p.value.0,
                        source,
                    },
                )
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize)]
struct RawScan {
    #[serde(default)]
    function: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    start_time: Num,
    #[serde(default)]
    end_time: Num,
    #[serde(default)]
    to_examine: Num,
    #[serde(default)]
    examined: Num,
    #[serde(default)]
    skipped: Num,
    #[serde(default)]
    processed: Num,
    #[serde(default)]
    errors: Num,
    #[serde(default)]
    pass_start: Num,
    #[serde(default)]
    scrub_pause: Num,
    #[serde(default)]
    scrub_spent_paused: Num,
    #[serde(default)]
    issued_bytes_per_scan: Num,
    #[serde(default)]
    issued: Num,
}

fn nonzero(n: Num) -> Option<u64> {
    n.0.filter(|v| *v != 0)
}

fn scan_status(raw: &RawScan) -> Option<ScanStatus> {
    let function = match raw.function.as_str() {
        "NONE" | "" => return None,
        "SCRUB" => ScanFunction::Scrub,
        "RESILVER" => ScanFunction::Resilver,
        "ERRORSCRUB" => ScanFunction::ErrorScrub,
        other => ScanFunction::Other(other.to_owned()),
    };
    let paused_since = nonzero(raw.scrub_pause);
    let state = match raw.state.as_str() {
        "NONE" | "" => return None,
        "SCANNING" if paused_since.is_some() => ScanState::Paused,
        "SCANNING" => ScanState::Running,
        "FINISHED" => ScanState::Finished,
        "CANCELED" => ScanState::Canceled,
        other => ScanState::Other(other.to_owned()),
    };
    let start_time = nonzero(raw.start_time);
    let end_time = nonzero(raw.end_time);
    let spent_paused_secs = raw.scrub_spent_paused.0.unwrap_or(0);
    let elapsed_secs = match (&state, start_time, end_time) {
        (ScanState::Finished | ScanState::Canceled, Some(s), Some(e)) => {
            Some(e.saturating_sub(s).saturating_sub(spent_paused_secs))
        }
        _ => None,
    };
    Some(ScanStatus {
        function,
        state,
        start_time,
        end_time,
        pass_start: nonzero(raw.pass_start),
        paused_since,
        spent_paused_secs,
        to_examine: raw.to_examine.0.unwrap_or(0),
        examined: raw.examined.0.unwrap_or(0),
        skipped: raw.skipped.0.unwrap_or(0),
        issued: raw.issued.0.unwrap_or(0),
        pass_issued: raw.issued_bytes_per_scan.0.unwrap_or(0),
        processed: raw.processed.0.unwrap_or(0),
        errors: raw.errors.0.unwrap_or(0),
        elapsed_secs,
        percent_done_text: None,
    })
}

#[derive(Debug, Deserialize)]
struct RawVdev {
    name: Option<String>,
    vdev_type: Option<String>,
    #[serde(default)]
    guid: Num,
    path: Option<String>,
    class: Option<String>,
    state: Option<String>,
    #[serde(default)]
    read_errors: Num,
    #[serde(default)]
    write_errors: Num,
    #[serde(default)]
    checksum_errors: Num,
    aux: Option<String>,
    was: Option<String>,
    parent: Option<String>,
    #[serde(default)]
    vdevs: Ordered<RawVdev>,
}

#[derive(Debug, Deserialize)]
struct RawPoolStatus {
    name: Option<String>,
    state: Option<String>,
    #[serde(default)]
    pool_guid: Num,
    status: Option<String>,
    action: Option<String>,
    scan_stats: Option<RawScan>,
    #[serde(default)]
    vdevs: Ordered<RawVdev>,
    #[serde(default)]
    logs: Ordered<RawVdev>,
    #[serde(default)]
    special: Ordered<RawVdev>,
    #[serde(default)]
    dedup: Ordered<RawVdev>,
    #[serde(default)]
    l2cache: Ordered<RawVdev>,
    #[serde(default)]
    spares: Ordered<RawVdev>,
    #[serde(default)]
    error_count: Num,
}

#[derive(Debug, Deserialize)]
struct StatusDoc {
    #[serde(default)]
    pools: Ordered<RawPoolStatus>,
}

const STATUS: &str = "zpool status -j";

/// Converts one raw vdev (and its nested children) into the model.
fn vdev(
    key: &str,
    raw: RawVdev,
    class: Option<&VdevClass>,
    depth: usize,
) -> Result<Vdev, ParseError> {
    if depth > MAX_VDEV_DEPTH {
        return Err(ParseError::Field {
            what: STATUS,
            object: key.to_owned(),
            field: "vdevs".to_owned(),
            reason: format!("nested deeper than {MAX_VDEV_DEPTH}"),
        });
    }
    let name = raw.name.unwrap_or_else(|| key.to_owned());
    let class = match (&raw.class, class) {
        (_, Some(forced)) => forced.clone(),
        (Some(c), None) => VdevClass::from_zfs(c),
        (None, None) => VdevClass::Normal,
    };
    let kind = VdevKind::from_name(&name, raw.vdev_type.as_deref());
    let state = raw.state.as_deref().map_or_else(
        || DeviceState::Other("missing".to_owned()),
        DeviceState::from_zfs,
    );
    let note = match (raw.aux, raw.was) {
        (_, Some(was)) => Some(format!("was {was}")),
        (Some(aux), None) => Some(aux),
        (None, None) => None,
    };
    let mut children = Vec::with_capacity(raw.vdevs.0.len());
    for (k, c) in raw.vdevs.0 {
        // Children inherit the class of an aux group (logs, special, ...).
        let inherit = class_for_children(&class);
        children.push(vdev(&k, c, inherit.as_ref(), depth + 1)?);
    }
    Ok(Vdev {
        name,
        kind,
        class,
        state,
        guid: raw.guid.0,
        path: raw.path,
        errors: ErrorCounts {
            read: raw.read_errors.0.unwrap_or(0),
            write: raw.write_errors.0.unwrap_or(0),
            checksum: raw.checksum_errors.0.unwrap_or(0),
        },
        note,
        children,
    })
}

fn class_for_children(class: &VdevClass) -> Option<VdevClass> {
    match class {
        VdevClass::Normal => None,
        other => Some(other.clone()),
    }
}

/// Rebuilds the nested tree from `--json-flat-vdevs` output.
///
/// Each node names its parent. Nodes whose parent is missing, or whose
/// parent chain loops or is deeper than [`MAX_VDEV_DEPTH`], are kept at the
/// top level rather than dropped. Siblings keep their document order.
/// Bounded: O(n²) in the node count, which the input size bounds.
fn unflatten(mut flat: Vec<(String, RawVdev)>) -> Ordered<RawVdev> {
    // 2.3.2 also leaves partial `vdevs` objects on flat nodes (the root
    // lists every node); the `parent` links are the authority.
    for (_, v) in &mut flat {
        v.vdevs.0.clear();
    }
    let parent_idx: Vec<Option<usize>> = flat
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            let p = v.parent.as_deref()?;
            flat.iter().position(|(k, _)| k == p).filter(|&j| j != i)
        })
        .collect();
    let depth: Vec<Option<usize>> = (0..flat.len())
        .map(|i| {
            let mut d = 0;
            let mut cur = i;
            while let Some(p) = parent_idx[cur] {
                d += 1;
                if d > MAX_VDEV_DEPTH {
                    return None;
                }
                cur = p;
            }
            Some(d)
        })
        .collect();
    let mut order: Vec<usize> = (0..flat.len()).collect();
    // Deepest first; stable, so siblings stay in document order.
    order.sort_by_key(|&i| std::cmp::Reverse(depth[i].unwrap_or(0)));
    let mut slots: Vec<Option<(String, RawVdev)>> = flat.into_iter().map(Some).collect();
    let mut top = Vec::new();
    for i in order {
        let Some(node) = slots[i].take() else {
            continue;
        };
        let parent = match (depth[i], parent_idx[i]) {
            (Some(d), Some(p)) if d > 0 => Some(p),
            _ => None,
        };
        match parent.and_then(|p| slots[p].as_mut()) {
            Some((_, pv)) => pv.vdevs.0.push(node),
            None => top.push((i, node)),
        }
    }
    top.sort_by_key(|(i, _)| *i);
    Ordered(top.into_iter().map(|(_, n)| n).collect())
}

fn pool_status(key: &str, mut raw: RawPoolStatus) -> Result<PoolStatus, ParseError> {
    let name = raw.name.clone().unwrap_or_else(|| key.to_owned());
    let flat = raw.vdevs.0.iter().any(|(_, v)| v.parent.is_some());
    let mut groups: Vec<(VdevClass, Vec<(String, RawVdev)>)> = Vec::new();
    let mut root_raw: Option<(String, RawVdev)> = None;
    if flat {
        for (k, v) in unflatten(std::mem::take(&mut raw.vdevs.0)).0 {
            let is_root = v.vdev_type.as_deref() == Some("root") || k == name;
            if is_root && root_raw.is_none() {
                root_raw = Some((k, v));
            } else {
                let class = v
                    .class
                    .as_deref()
                    .map_or(VdevClass::Normal, VdevClass::from_zfs);
                match groups.iter_mut().find(|(c, _)| *c == class) {
                    Some((_, g)) => g.push((k, v)),
                    None => groups.push((class, vec![(k, v)])),
                }
            }
        }
    } else {
        root_raw = raw.vdevs.0.pop();
        for (class, g) in [
            (VdevClass::Special, std::mem::take(&mut raw.special.0)),
            (VdevClass::Dedup, std::mem::take(&mut raw.dedup.0)),
            (VdevClass::Log, std::mem::take(&mut raw.logs.0)),
            (VdevClass::Cache, std::mem::take(&mut raw.l2cache.0)),
            (VdevClass::Spare, std::mem::take(&mut raw.spares.0)),
        ] {
            groups.push((class, g));
        }
    }
    let Some((root_key, root_raw)) = root_raw else {
        return Err(ParseError::Field {
            what: STATUS,
            object: name,
            field: "vdevs".to_owned(),
            reason: "no root vdev".to_owned(),
        });
    };
    let mut root = vdev(&root_key, root_raw, None, 0)?;
    root.kind = VdevKind::Root;
    let mut cache = Vec::new();
    let mut spares = Vec::new();
    for (class, g) in groups {
        for (k, v) in g {
            let node = vdev(&k, v, Some(&class), 1)?;
            match class {
                VdevClass::Cache => cache.push(node),
                VdevClass::Spare => spares.push(node),
                _ => root.children.push(node),
            }
        }
    }
    let state = raw
        .state
        .as_deref()
        .map_or_else(|| root.state.clone(), DeviceState::from_zfs);
    Ok(PoolStatus {
        name,
        state,
        guid: raw.pool_guid.0,
        status: raw.status.map(|s| s.trim_end().to_owned()),
        action: raw.action.map(|s| s.trim_end().to_owned()),
        scan: raw.scan_stats.as_ref().and_then(scan_status),
        root,
        cache,
        spares,
        data_errors: raw.error_count.0,
    })
}

fn from_json<'a, T: Deserialize<'a>>(what: &'static str, input: &'a str) -> Result<T, ParseError> {
    check_size(what, input)?;
    serde_json::from_str(input).map_err(|e| ParseError::Json {
        what,
        message: e.to_string(),
    })
}

/// Parses `zpool status -j --json-int [--json-flat-vdevs]`.
pub fn parse_zpool_status(input: &str) -> Result<Vec<PoolStatus>, ParseError> {
    let doc: StatusDoc = from_json(STATUS, input)?;
    doc.pools
        .0
        .into_iter()
        .map(|(k, p)| pool_status(&k, p))
        .collect()
}

#[derive(Debug, Deserialize)]
struct RawPoolProps {
    name: Option<String>,
    state: Option<String>,
    #[serde(default)]
    pool_guid: Num,
    #[serde(default)]
    properties: Ordered<RawProperty>,
}

#[derive(Debug, Deserialize)]
struct PoolPropsDoc {
    #[serde(default)]
    pools: Ordered<RawPoolProps>,
}

/// Parses `zpool list -j --json-int`.
pub fn parse_zpool_list(input: &str) -> Result<Vec<Pool>, ParseError> {
    const WHAT: &str = "zpool list -j";
    // OpenZFS 2.3 prints nothing at all (and exits 0) when no pool is
    // imported, rather than a document with an empty `pools` object.
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    let doc: PoolPropsDoc = from_json(WHAT, input)?;
    let mut out = Vec::with_capacity(doc.pools.0.len());
    for (key, raw) in doc.pools.0 {
        let name = raw.name.unwrap_or(key);
        let props = properties(raw.properties);
        let field = |f: &str| -> Result<u64, ParseError> {
            props.u64(f).ok_or_else(|| ParseError::Field {
                what: WHAT,
                object: name.clone(),
                field: f.to_owned(),
                reason: "missing or not an integer".to_owned(),
            })
        };
        let capacity = Capacity {
            size: field("size")?,
            allocated: field("allocated")?,
            free: field("free")?,
            fragmentation_percent: props.u64("fragmentation"),
            capacity_percent: props.u64("capacity"),
        };
        let health = props.get("health").or(raw.state.as_deref()).map_or_else(
            || DeviceState::Other("missing".to_owned()),
            DeviceState::from_zfs,
        );
        out.push(Pool {
            guid: raw.pool_guid.0,
            name,
            health,
            capacity,
            properties: props,
            vdevs: Vec::new(),
        });
    }
    Ok(out)
}

/// Parses `zpool get -j --json-int all [POOL]` into (pool, properties).
pub fn parse_zpool_get(input: &str) -> Result<Vec<(String, Properties)>, ParseError> {
    let doc: PoolPropsDoc = from_json("zpool get -j", input)?;
    Ok(doc
        .pools
        .0
        .into_iter()
        .map(|(k, p)| (p.name.unwrap_or(k), properties(p.properties)))
        .collect())
}

#[derive(Debug, Deserialize)]
struct RawDataset {
    name: Option<String>,
    #[serde(default)]
    properties: Ordered<RawProperty>,
}

#[derive(Debug, Deserialize)]
struct DatasetsDoc {
    #[serde(default)]
    datasets: Ordered<RawDataset>,
}

/// Parses `zfs get -j --json-int PROPS|all [DATASET]` into (dataset,
/// properties).
pub fn parse_zfs_get(input: &str) -> Result<Vec<(String, Properties)>, ParseError> {
    let doc: DatasetsDoc = from_json("zfs get -j", input)?;
    Ok(doc
        .datasets
        .0
        .into_iter()
        .map(|(k, d)| (d.name.unwrap_or(k), properties(d.properties)))
        .collect())
}

/// Parses `zfs list -j --json-int -o name,used,available,quota,refquota,
/// encryption,keystatus,compression,mountpoint`.
pub fn parse_zfs_list(input: &str) -> Result<Vec<Dataset>, ParseError> {
    const WHAT: &str = "zfs list -j";
    // Likewise for no datasets.
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    let doc: DatasetsDoc = from_json(WHAT, input)?;
    doc.datasets
        .0
        .into_iter()
        .map(|(k, d)| {
            let name = d.name.unwrap_or(k);
            dataset_from_properties(WHAT, &name, &properties(d.properties))
        })
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn no_pools_prints_nothing() {
        // `zpool list -j --json-int` on a machine without pools (seen in the
        // appliance image on first boot): empty output, exit 0.
        assert!(super::parse_zpool_list("").unwrap().is_empty());
        assert!(super::parse_zpool_list("\n").unwrap().is_empty());
        assert!(super::parse_zfs_list("").unwrap().is_empty());
        assert!(super::parse_zpool_list("{").is_err());
    }

    use super::*;

    #[test]
    fn garbage_and_wrong_shapes_are_errors_not_panics() {
        assert!(matches!(
            parse_zpool_status("not json"),
            Err(ParseError::Json { .. })
        ));
        assert!(matches!(
            parse_zpool_status("42"),
            Err(ParseError::Json { .. })
        ));
        assert_eq!(parse_zpool_status("{}").unwrap(), Vec::new());
        let no_root = r#"{"pools":{"p":{"name":"p","state":"ONLINE","vdevs":{}}}}"#;
        assert!(matches!(
            parse_zpool_status(no_root),
            Err(ParseError::Field { ref field, .. }) if field == "vdevs"
        ));
        let missing_size = r#"{"pools":{"p":{"name":"p","properties":{}}}}"#;
        assert!(matches!(
            parse_zpool_list(missing_size),
            Err(ParseError::Field { ref field, .. }) if field == "size"
        ));
    }

    #[test]
    fn unknown_states_and_types_are_kept() {
        let doc = r#"{"pools":{"p":{"name":"p","state":"WEIRD","vdevs":{"p":{"name":"p",
            "vdev_type":"root","state":"WEIRD","vdevs":{"thing-0":{"name":"thing-0",
            "vdev_type":"quantum","state":"SPLIT","read_errors":"7"}}}}}}}"#;
        let p = parse_zpool_status(doc).unwrap().remove(0);
        assert_eq!(p.state, DeviceState::Other("WEIRD".into()));
        let c = &p.root.children[0];
        assert_eq!(
            c.kind,
            VdevKind::Other {
                name: "quantum".into()
            }
        );
        assert_eq!(c.state, DeviceState::Other("SPLIT".into()));
        assert_eq!(c.errors.read, 7);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut doc = String::from(r#"{"name":"leaf","state":"ONLINE"}"#);
        for i in 0..20 {
            doc = format!(r#"{{"name":"m{i}","state":"ONLINE","vdevs":{{"c":{doc}}}}}"#);
        }
        let doc = format!(r#"{{"pools":{{"p":{{"name":"p","vdevs":{{"p":{doc}}}}}}}}}"#);
        assert!(matches!(
            parse_zpool_status(&doc),
            Err(ParseError::Field { .. })
        ));
    }

    #[test]
    fn flat_vdevs_with_cycle_or_orphan_do_not_hang() {
        let doc = r#"{"pools":{"p":{"name":"p","vdevs":{
            "a":{"name":"a","state":"ONLINE","parent":"b"},
            "b":{"name":"b","state":"ONLINE","parent":"a"},
            "o":{"name":"o","state":"ONLINE","parent":"nowhere"},
            "p":{"name":"p","vdev_type":"root","state":"ONLINE"}}}}}"#;
        let p = parse_zpool_status(doc).unwrap().remove(0);
        assert_eq!(p.root.name, "p");
        let names: Vec<&str> = p.root.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "o"]);
    }
}
