//! OpenZFS 2.1 text output: `zpool status -p`, `zpool list -Hp[v]`,
//! `zpool get -Hp`, `zfs list -Hp -o ...`, `zfs get -Hp`.
//!
//! `zpool status` has no scripted mode; its layout (as captured in
//! `tests/fixtures/openzfs-2.1.11/`) is a set of `key: value` paragraphs
//! (`pool`, `state`, `status`, `action`, `see`, `scan`, `config`, `errors`)
//! whose continuation lines start with a tab, and a `config` table whose
//! vdev rows are a tab, two spaces per nesting level, then `NAME STATE READ
//! WRITE CKSUM [note]`. Even with `-p` the `scan:` line prints sizes for
//! humans (`repaired 35.0M`), so those bytes are approximate (±0.05 of the
//! unit), and its times are local calendar times, which are not converted.

use super::{
    check_size, dataset_from_properties, line_error, parse_human_bytes, ParseError, MAX_VDEV_DEPTH,
};
use crate::model::{
    Capacity, Dataset, DeviceState, ErrorCounts, Pool, PoolStatus, Properties, Property,
    PropertySource, ScanFunction, ScanState, ScanStatus, Vdev, VdevClass, VdevKind, VdevListEntry,
};

const STATUS: &str = "zpool status -p";

/// Section headers inside the `config:` table.
fn section_class(name: &str) -> Option<VdevClass> {
    match name {
        "logs" | "cache" | "spares" | "special" | "dedup" => Some(VdevClass::from_zfs(name)),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct PoolText {
    name: String,
    state: Option<String>,
    status: Vec<String>,
    action: Vec<String>,
    scan: Vec<String>,
    errors: Vec<String>,
    /// (1-based line number, row text)
    config: Vec<(usize, String)>,
}

/// Parses `zpool status -p` (one or more pools).
pub fn parse_zpool_status(input: &str) -> Result<Vec<PoolStatus>, ParseError> {
    check_size(STATUS, input)?;
    let mut pools: Vec<PoolText> = Vec::new();
    // Which paragraph continuation lines belong to.
    #[derive(Clone, Copy, PartialEq)]
    enum Para {
        None,
        Status,
        Action,
        Scan,
        Config,
        Errors,
        Other,
    }
    let mut para = Para::None;
    for (idx, line) in input.lines().enumerate() {
        let lineno = idx + 1;
        if line.trim().is_empty() {
            if para != Para::Config {
                para = Para::None;
            }
            continue;
        }
        let key_value = if line.starts_with('\t') {
            None
        } else {
            line.trim_start()
                .split_once(':')
                .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase()))
        };
        if let Some((key, value)) = key_value {
            let value = value.trim().to_owned();
            if key == "pool" {
                pools.push(PoolText {
                    name: value,
                    ..PoolText::default()
                });
                para = Para::None;
                continue;
            }
            let Some(pool) = pools.last_mut() else {
                return Err(line_error(
                    STATUS,
                    lineno,
                    "text before the first `pool:`",
                    line,
                ));
            };
            para = match key {
                "state" => {
                    pool.state = Some(value);
                    Para::None
                }
                "status" => {
                    pool.status.push(value);
                    Para::Status
                }
                "action" => {
                    pool.action.push(value);
                    Para::Action
                }
                "scan" => {
                    pool.scan.push(value);
                    Para::Scan
                }
                "config" => Para::Config,
                "errors" => {
                    pool.errors.push(value);
                    Para::Errors
                }
                _ => Para::Other,
            };
            continue;
        }
        let Some(pool) = pools.last_mut() else {
            return Err(line_error(
                STATUS,
                lineno,
                "text before the first `pool:`",
                line,
            ));
        };
        let text = line.trim().to_owned();
        match para {
            Para::Status => pool.status.push(text),
            Para::Action => pool.action.push(text),
            Para::Scan => pool.scan.push(text),
            Para::Errors => pool.errors.push(text),
            Para::Config => pool.config.push((lineno, line.to_owned())),
            Para::None | Para::Other => {}
        }
    }
    pools.into_iter().map(build_pool).collect()
}

fn build_pool(p: PoolText) -> Result<PoolStatus, ParseError> {
    // Rows: (depth, vdev). Section headers become depth-0 pseudo rows.
    let mut rows: Vec<(usize, Vdev, Option<VdevClass>)> = Vec::new();
    for (lineno, line) in &p.config {
        let Some(rest) = line.strip_prefix('\t') else {
            return Err(line_error(
                STATUS,
                *lineno,
                "config row without a leading tab",
                line,
            ));
        };
        let spaces = rest.len() - rest.trim_start_matches(' ').len();
        let depth = spaces / 2;
        if depth > MAX_VDEV_DEPTH {
            return Err(line_error(STATUS, *lineno, "vdev nested too deep", line));
        }
        let cols: Vec<&str> = rest.split_whitespace().collect();
        let Some(&name) = cols.first() else { continue };
        if depth == 0 && name == "NAME" {
            continue;
        }
        if depth == 0 && cols.len() == 1 {
            if let Some(class) = section_class(name) {
                rows.push((
                    0,
                    leaf_vdev(name, "-", ErrorCounts::default(), None),
                    Some(class),
                ));
                continue;
            }
        }
        let state = cols.get(1).copied().unwrap_or("-");
        let mut errors = ErrorCounts::default();
        let mut note_start = 2;
        if cols.len() >= 5 {
            let counts: Option<Vec<u64>> =
                cols[2..5].iter().map(|c| parse_human_bytes(c)).collect();
            if let Some(c) = counts {
                errors = ErrorCounts {
                    read: c[0],
                    write: c[1],
                    checksum: c[2],
                };
                note_start = 5;
            }
        }
        let note = (cols.len() > note_start).then(|| cols[note_start..].join(" "));
        rows.push((depth, leaf_vdev(name, state, errors, note), None));
    }
    // Fold rows into trees with a stack.
    let mut finished: Vec<(Vdev, Option<VdevClass>)> = Vec::new();
    let mut stack: Vec<(usize, Vdev, Option<VdevClass>)> = Vec::new();
    let pop_into = |stack: &mut Vec<(usize, Vdev, Option<VdevClass>)>,
                    finished: &mut Vec<(Vdev, Option<VdevClass>)>| {
        if let Some((_, v, c)) = stack.pop() {
            match stack.last_mut() {
                Some((_, parent, _)) => parent.children.push(v),
                None => finished.push((v, c)),
            }
        }
    };
    for (depth, v, class) in rows {
        while stack.last().is_some_and(|(d, _, _)| *d >= depth) {
            pop_into(&mut stack, &mut finished);
        }
        stack.push((depth, v, class));
    }
    while !stack.is_empty() {
        pop_into(&mut stack, &mut finished);
    }
    let mut root: Option<Vdev> = None;
    let mut cache = Vec::new();
    let mut spares = Vec::new();
    let mut extra_top = Vec::new();
    for (v, class) in finished {
        match class {
            None if root.is_none() => root = Some(v),
            None => extra_top.push(v),
            Some(VdevClass::Cache) => cache.extend(
                v.children
                    .into_iter()
                    .map(|c| classify(c, &VdevClass::Cache)),
            ),
            Some(VdevClass::Spare) => spares.extend(
                v.children
                    .into_iter()
                    .map(|c| classify(c, &VdevClass::Spare)),
            ),
            Some(class) => extra_top.extend(v.children.into_iter().map(|c| classify(c, &class))),
        }
    }
    let Some(mut root) = root else {
        return Err(ParseError::Field {
            what: STATUS,
            object: p.name,
            field: "config".to_owned(),
            reason: "no vdev table".to_owned(),
        });
    };
    root.kind = VdevKind::Root;
    root.children.extend(extra_top);
    let state = p
        .state
        .as_deref()
        .map_or_else(|| root.state.clone(), DeviceState::from_zfs);
    let data_errors = p.errors.iter().find_map(|e| {
        if e.starts_with("No known data errors") {
            Some(0)
        } else {
            e.split_once(" data errors")
                .and_then(|(n, _)| n.trim().parse().ok())
        }
    });
    let join = |v: &[String]| (!v.is_empty()).then(|| v.join("\n"));
    Ok(PoolStatus {
        name: p.name,
        state,
        guid: None,
        status: join(&p.status),
        action: join(&p.action),
        scan: parse_scan(&p.scan),
        root,
        cache,
        spares,
        data_errors,
    })
}

fn classify(mut v: Vdev, class: &VdevClass) -> Vdev {
    v.class = class.clone();
    v.children = v.children.into_iter().map(|c| classify(c, class)).collect();
    v
}

fn leaf_vdev(name: &str, state: &str, errors: ErrorCounts, note: Option<String>) -> Vdev {
    Vdev {
        name: name.to_owned(),
        kind: VdevKind::from_name(name, None),
        class: VdevClass::Normal,
        state: DeviceState::from_zfs(state),
        guid: None,
        path: None,
        errors,
        note,
        children: Vec::new(),
    }
}

/// Parses `HH:MM:SS` or `N days HH:MM:SS`.
fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (days, hms) = match s.split_once(" days ") {
        Some((d, rest)) => (d.trim().parse::<u64>().ok()?, rest),
        None => (0, s),
    };
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    days.checked_mul(86_400)?
        .checked_add(h.checked_mul(3600)?)?
        .checked_add(m * 60 + sec)
}

/// Parses the `scan:` paragraph (first line plus continuation lines).
///
/// Unknown wordings give `ScanFunction::Other(first line)` rather than an
/// error: a changed sentence must not make the whole status unreadable.
pub fn parse_scan(lines: &[String]) -> Option<ScanStatus> {
    let first = lines.first()?.trim();
    if first.is_empty() || first.starts_with("none requested") {
        return None;
    }
    let mut s = ScanStatus {
        function: ScanFunction::Other(first.to_owned()),
        state: ScanState::Other(first.to_owned()),
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
    };
    let words: Vec<&str> = first.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    match words.as_slice() {
        // "scrub repaired 35.0M in 00:00:16 with 0 errors on <date>"
        ["scrub", "repaired", size, ..] => {
            s.function = ScanFunction::Scrub;
            s.state = ScanState::Finished;
            s.processed = parse_human_bytes(size).unwrap_or(0);
        }
        // "resilvered 38.3M in 00:00:03 with 0 errors on <date>"
        ["resilvered", size, ..] => {
            s.function = ScanFunction::Resilver;
            s.state = ScanState::Finished;
            s.processed = parse_human_bytes(size).unwrap_or(0);
        }
        [func @ ("scrub" | "resilver" | "error"), rest @ ..] => {
            s.function = match *func {
                "scrub" => ScanFunction::Scrub,
                "resilver" => ScanFunction::Resilver,
                _ => ScanFunction::ErrorScrub,
            };
            s.state = match rest {
                ["canceled", ..] => ScanState::Canceled,
                ["paused", ..] => ScanState::Paused,
                [_, "in", "progress", ..] | ["in", "progress", ..] => ScanState::Running,
                _ => ScanState::Other(first.to_owned()),
            };
        }
        _ => return Some(s),
    }
    if s.state == ScanState::Finished {
        if let Some(errs) = after("with").and_then(|e| e.parse().ok()) {
            s.errors = errs;
        }
        // Duration runs from "in" to "with".
        if let (Some(i), Some(j)) = (
            words.iter().position(|w| *w == "in"),
            words.iter().position(|w| *w == "with"),
        ) {
            if i < j {
                s.elapsed_secs = parse_duration(&words[i + 1..j].join(" "));
            }
        }
    }
    // Progress lines:
    //   "1.23G scanned at 100M/s, 500M issued at 50M/s, 2.00G total"
    //   "0B repaired, 25.00% done, 00:00:30 to go"  (or "... resilvered, ...")
    for line in &lines[1..] {
        for part in line.split(',') {
            let w: Vec<&str> = part.split_whitespace().collect();
            match w.as_slice() {
                [n, "scanned", ..] => s.examined = parse_human_bytes(n).unwrap_or(0),
                [n, "issued", ..] => {
                    s.issued = parse_human_bytes(n).unwrap_or(0);
                    s.pass_issued = s.issued;
                }
                [n, "total"] => s.to_examine = parse_human_bytes(n).unwrap_or(0),
                [n, "repaired" | "resilvered"] => s.processed = parse_human_bytes(n).unwrap_or(0),
                [pct, "done"] => s.percent_done_text = Some((*pct).to_owned()),
                _ => {}
            }
        }
    }
    Some(s)
}

fn split_tabs(line: &str) -> Vec<&str> {
    line.split('\t').collect()
}

fn opt_u64(s: &str) -> Option<u64> {
    s.parse().ok()
}

/// Parses `zpool list -Hp` or `zpool list -Hpv` with the default columns
/// (NAME SIZE ALLOC FREE CKPOINT EXPANDSZ FRAG CAP DEDUP HEALTH ALTROOT).
/// With `-v`, vdev rows (leading tab) are attached to the pool above.
pub fn parse_zpool_list(input: &str) -> Result<Vec<Pool>, ParseError> {
    const WHAT: &str = "zpool list -Hp";
    check_size(WHAT, input)?;
    let mut out: Vec<Pool> = Vec::new();
    for (idx, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let lineno = idx + 1;
        if let Some(rest) = line.strip_prefix('\t') {
            let c = split_tabs(rest);
            let Some(pool) = out.last_mut() else {
                return Err(line_error(
                    WHAT,
                    lineno,
                    "vdev row before any pool row",
                    line,
                ));
            };
            let Some(name) = c.first() else { continue };
            pool.vdevs.push(VdevListEntry {
                name: (*name).to_owned(),
                size: c.get(1).and_then(|v| opt_u64(v)),
                allocated: c.get(2).and_then(|v| opt_u64(v)),
                free: c.get(3).and_then(|v| opt_u64(v)),
                health: c
                    .get(9)
                    .filter(|h| **h != "-")
                    .map(|h| DeviceState::from_zfs(h)),
            });
            continue;
        }
        let c = split_tabs(line);
        // Group headers of -v ("logs", "cache", ...) have no size.
        if c.len() >= 2 && section_class(c[0]).is_some() && c[1] == "-" && !out.is_empty() {
            continue;
        }
        if c.len() < 10 {
            return Err(line_error(
                WHAT,
                lineno,
                "expected at least 10 tab-separated columns",
                line,
            ));
        }
        let num = |i: usize, field: &str| -> Result<u64, ParseError> {
            opt_u64(c[i])
                .ok_or_else(|| line_error(WHAT, lineno, format!("{field} is not an integer"), line))
        };
        out.push(Pool {
            name: c[0].to_owned(),
            health: DeviceState::from_zfs(c[9]),
            guid: None,
            capacity: Capacity {
                size: num(1, "size")?,
                allocated: num(2, "allocated")?,
                free: num(3, "free")?,
                fragmentation_percent: opt_u64(c[6]),
                capacity_percent: opt_u64(c[7]),
            },
            properties: Properties::default(),
            vdevs: Vec::new(),
        });
    }
    Ok(out)
}

/// Parses `zpool get -Hp ...` or `zfs get -Hp ...` (NAME PROPERTY VALUE
/// SOURCE) into (object, properties), objects in order of appearance.
pub fn parse_get(what: &'static str, input: &str) -> Result<Vec<(String, Properties)>, ParseError> {
    check_size(what, input)?;
    let mut out: Vec<(String, Properties)> = Vec::new();
    for (idx, line) in input.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut it = line.splitn(3, '\t');
        let (Some(obj), Some(prop), Some(rest)) = (it.next(), it.next(), it.next()) else {
            return Err(line_error(
                what,
                idx + 1,
                "expected NAME, PROPERTY, VALUE, SOURCE",
                line,
            ));
        };
        // The value may itself contain tabs (a pool comment); the source
        // is the last column.
        let (value, source) = rest.rsplit_once('\t').unwrap_or((rest, "-"));
        let entry = match out.iter_mut().position(|(o, _)| o == obj) {
            Some(i) => &mut out[i].1,
            None => {
                out.push((obj.to_owned(), Properties::default()));
                let last = out.len() - 1;
                &mut out[last].1
            }
        };
        entry.0.insert(
            prop.to_owned(),
            Property {
                value: value.to_owned(),
                source: PropertySource::from_text(source),
            },
        );
    }
    Ok(out)
}

/// Parses `zfs list -Hp -o COLUMNS` where `columns` names the `-o` list in
/// order (the runner uses [`crate::model::DATASET_COLUMNS`]).
pub fn parse_zfs_list(input: &str, columns: &[&str]) -> Result<Vec<Dataset>, ParseError> {
    const WHAT: &str = "zfs list -Hp";
    check_size(WHAT, input)?;
    let Some(name_col) = columns.iter().position(|c| *c == "name") else {
        return Err(ParseError::Field {
            what: WHAT,
            object: "-o".to_owned(),
            field: "name".to_owned(),
            reason: "the column list must include name".to_owned(),
        });
    };
    let mut out = Vec::new();
    for (idx, line) in input.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let c = split_tabs(line);
        if c.len() != columns.len() {
            return Err(line_error(
                WHAT,
                idx + 1,
                format!("expected {} columns, found {}", columns.len(), c.len()),
                line,
            ));
        }
        let props = Properties(
            columns
                .iter()
                .zip(&c)
                .map(|(k, v)| {
                    let key = match *k {
                        "avail" => "available",
                        "refer" => "referenced",
                        other => other,
                    };
                    (
                        key.to_owned(),
                        Property {
                            value: (*v).to_owned(),
                            source: PropertySource::None,
                        },
                    )
                })
                .collect(),
        );
        out.push(dataset_from_properties(WHAT, c[name_col], &props)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("00:00:16"), Some(16));
        assert_eq!(parse_duration("01:02:03"), Some(3723));
        assert_eq!(parse_duration("2 days 00:00:01"), Some(172_801));
        assert_eq!(parse_duration("0:0"), None);
        assert_eq!(parse_duration("a:b:c"), None);
    }

    #[test]
    fn scan_in_progress_paused_and_canceled_wordings() {
        let lines: Vec<String> = [
            "scrub in progress since Sun Nov 22 19:33:44 2026",
            "1.23G scanned at 100M/s, 512M issued at 50M/s, 2.00G total",
            "0B repaired, 25.00% done, 00:00:30 to go",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let s = parse_scan(&lines).unwrap();
        assert_eq!(s.function, ScanFunction::Scrub);
        assert_eq!(s.state, ScanState::Running);
        assert_eq!(s.issued, 512 << 20);
        assert_eq!(s.to_examine, 2 << 30);
        assert_eq!(s.percent_done_text.as_deref(), Some("25.00%"));
        assert!((s.progress_percent() - 25.0).abs() < 0.01);
        let r = parse_scan(&[
            "resilver in progress since Sun Nov 22 19:35:47 2026".to_owned(),
            "100M scanned at 10M/s, 50M issued at 5M/s, 400M total".to_owned(),
            "12.5M resilvered, 12.50% done, 00:01:10 to go".to_owned(),
        ])
        .unwrap();
        assert_eq!(r.function, ScanFunction::Resilver);
        assert_eq!(r.processed, 13_107_200);
        let p = parse_scan(&["scrub paused since Sun Nov 22 19:33:44 2026".to_owned()]).unwrap();
        assert_eq!(p.state, ScanState::Paused);
        let c = parse_scan(&["scrub canceled on Sun Nov 22 19:33:44 2026".to_owned()]).unwrap();
        assert_eq!(c.state, ScanState::Canceled);
        assert_eq!(parse_scan(&["none requested".to_owned()]), None);
        let odd = parse_scan(&["defragmenting the moon".to_owned()]).unwrap();
        assert_eq!(
            odd.function,
            ScanFunction::Other("defragmenting the moon".into())
        );
    }

    #[test]
    fn status_with_aux_sections() {
        let text =
            "  pool: t\n state: ONLINE\nconfig:\n\n\tNAME        STATE     READ WRITE CKSUM\n\
            \tt           ONLINE       0     0     0\n\
            \t  mirror-0  ONLINE       0     0     0\n\
            \t    sda     ONLINE       0     0     0\n\
            \t    sdb     ONLINE       0     0     0\n\
            \tspecial\t\n\
            \t  mirror-1  ONLINE       0     0     0\n\
            \t    sdc     ONLINE       0     0     0\n\
            \t    sdd     ONLINE       0     0     0\n\
            \tlogs\n\
            \t  sde       ONLINE       0     0     0\n\
            \tcache\n\
            \t  sdf       ONLINE       0     0     0\n\
            \tspares\n\
            \t  sdg       AVAIL\n\
            \n\
            errors: No known data errors\n";
        let p = parse_zpool_status(text).unwrap().remove(0);
        let classes: Vec<(&str, &VdevClass)> = p
            .root
            .children
            .iter()
            .map(|v| (v.name.as_str(), &v.class))
            .collect();
        assert_eq!(
            classes,
            [
                ("mirror-0", &VdevClass::Normal),
                ("mirror-1", &VdevClass::Special),
                ("sde", &VdevClass::Log)
            ]
        );
        assert_eq!(p.root.children[1].children[1].class, VdevClass::Special);
        assert_eq!(p.cache.len(), 1);
        assert_eq!(p.spares[0].state, DeviceState::Avail);
        assert_eq!(p.data_errors, Some(0));
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(matches!(
            parse_zpool_status("garbage: yes\n"),
            Err(ParseError::Line { line: 1, .. })
        ));
        assert!(matches!(
            parse_zpool_status("  pool: x\n state: ONLINE\n"),
            Err(ParseError::Field { .. })
        ));
        assert!(matches!(
            parse_zpool_list("tank\t1\t2\n"),
            Err(ParseError::Line { .. })
        ));
        assert!(matches!(
            parse_zpool_list("tank\tx\t2\t3\t-\t-\t0\t1\t1.00\tONLINE\t-\n"),
            Err(ParseError::Line { .. })
        ));
        assert!(matches!(
            parse_zfs_list("a\tb\n", &["name", "used", "available"]),
            Err(ParseError::Line { .. })
        ));
        assert!(matches!(
            parse_zfs_list("a\tb\tc\n", &["name", "used", "available"]),
            Err(ParseError::Field { .. })
        ));
        assert!(matches!(
            parse_get("zfs get -Hp", "only\tone\n"),
            Err(ParseError::Line { .. })
        ));
    }
}
