//! Datasets the storage manager created after provisioning (a sync
//! client's own dataset under `documents`), recorded in
//! [`DATASETS_RECORD`] under the state directory.
//!
//! The record serves two readers: an operator (what the appliance made, when,
//! with which quota), and the appliance's root mount unit, which watches the
//! file (`PathChanged=`) and mounts what is new. The daemon runs unprivileged
//! and creates datasets unmounted (`zfs create -u`), so a new dataset is
//! usable once that unit has run; the sync endpoint waits for the mount
//! before it writes anything under the dataset's directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::statefile::{read_json, write_json, StateFileError};

/// File name of the record, in the manager's state directory.
pub const DATASETS_RECORD: &str = "datasets.json";

/// One created dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedDataset {
    /// Full name (`tank/documents/laptop`).
    pub name: String,
    /// Quota it was created with.
    pub quota: Option<u64>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Last time it was recorded (created, or asked for again because it
    /// was not mounted yet), Unix seconds.
    pub touched_at: u64,
}

/// The record file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetsRecord {
    /// Every dataset created, oldest first.
    pub datasets: Vec<CreatedDataset>,
}

/// Adds `name` to the record at `path` (crash-safe). An existing entry
/// keeps its quota and creation time and gets a new `touched_at`: the file
/// still changes, so the mount unit runs again.
pub fn record_dataset(path: &Path, name: &str, quota: Option<u64>) -> Result<(), StateFileError> {
    let mut record = read_json::<DatasetsRecord>(path)?.unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match record.datasets.iter_mut().find(|d| d.name == name) {
        Some(d) => d.touched_at = now,
        None => record.datasets.push(CreatedDataset {
            name: name.to_owned(),
            quota,
            created_at: now,
            touched_at: now,
        }),
    }
    write_json(path, &record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_are_recorded_once_each_and_survive_a_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATASETS_RECORD);
        record_dataset(&path, "tank/documents/laptop", Some(50 << 20)).unwrap();
        record_dataset(&path, "tank/documents/phone", None).unwrap();
        record_dataset(&path, "tank/documents/laptop", Some(60 << 20)).unwrap();
        let record: DatasetsRecord = read_json(&path).unwrap().unwrap();
        let names: Vec<_> = record.datasets.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["tank/documents/laptop", "tank/documents/phone"]);
        assert_eq!(record.datasets[0].quota, Some(50 << 20));
        assert!(record.datasets[0].touched_at >= record.datasets[0].created_at);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATASETS_RECORD);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(record_dataset(&path, "tank/documents/laptop", None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }
}
