//! The last-known-good cache file: every applied policy set is written atomically (temporary
//! file, fsync, rename, fsync of the directory), so a crash leaves either the old file or the
//! new one, never a torn one. At start the sidecar serves from it at once, before the control
//! plane answers, and resumes its stream from the revisions it holds.
//!
//! The file is the protobuf encoding of a snapshot `DiscoveryResponse` behind a magic and a
//! length, so a truncated or corrupt file is detected and refused rather than half-loaded.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use corsair_proto::v1;
use prost::Message;

/// Marks a Corsair cache file, version 1.
const MAGIC: &[u8; 8] = b"CORSAIR1";

/// Why the cache file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// It could not be read or written.
    #[error("cache file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// It is not a complete cache file.
    #[error("cache file {0} is corrupt or truncated")]
    Corrupt(String),
}

/// Writes `snapshot` to `path` atomically.
pub fn save(path: &Path, snapshot: &v1::DiscoveryResponse) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: path.display().to_string(),
        source,
    };
    let body = snapshot.encode_to_vec();
    let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(body.len() as u64).to_be_bytes());
    bytes.extend_from_slice(&body);

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Reads the snapshot at `path`; `Ok(None)` when there is no file.
pub fn load(path: &Path) -> Result<Option<v1::DiscoveryResponse>, CacheError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let corrupt = || CacheError::Corrupt(path.display().to_string());
    let rest = bytes.strip_prefix(MAGIC).ok_or_else(corrupt)?;
    let (len, body) = rest.split_at_checked(8).ok_or_else(corrupt)?;
    let len = u64::from_be_bytes(len.try_into().expect("eight bytes"));
    if body.len() as u64 != len {
        return Err(corrupt());
    }
    let snapshot = v1::DiscoveryResponse::decode(body).map_err(|_| corrupt())?;
    if !snapshot.snapshot {
        return Err(corrupt());
    }
    Ok(Some(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::PolicySet;

    fn filled() -> PolicySet {
        let set = PolicySet::default();
        set.apply(&v1::DiscoveryResponse {
            revision: 7,
            snapshot: true,
            upserts: vec![
                v1::Policy {
                    service: "shop".into(),
                    allowed_origins: vec!["https://a.example.com".into()],
                    revision: 7,
                    ..Default::default()
                },
                v1::Policy {
                    service: "blog".into(),
                    allowed_origins: vec!["https://b.example.com".into()],
                    revision: 3,
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .unwrap();
        set
    }

    #[test]
    fn round_trip_restores_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.cache");
        let set = filled();
        save(&path, &set.to_snapshot()).unwrap();
        assert!(
            !dir.path().join("policies.cache.tmp").exists(),
            "the temporary file is renamed"
        );

        let restored = PolicySet::default();
        restored.apply(&load(&path).unwrap().unwrap()).unwrap();
        assert_eq!(restored.known_revisions(), set.known_revisions());
        assert_eq!(restored.load().revision, 7);
        assert_eq!(restored.to_snapshot(), set.to_snapshot());
    }

    #[test]
    fn a_missing_file_is_no_cache() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn truncated_or_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.cache");
        save(&path, &filled().to_snapshot()).unwrap();
        let good = fs::read(&path).unwrap();
        for (name, bytes) in [
            ("truncated", good[..good.len() - 3].to_vec()),
            ("header only", good[..10].to_vec()),
            ("empty", Vec::new()),
            ("other file", b"{\"service\":\"shop\"}".to_vec()),
            ("flipped length", {
                let mut b = good.clone();
                b[15] ^= 1;
                b
            }),
        ] {
            fs::write(&path, &bytes).unwrap();
            assert!(matches!(load(&path), Err(CacheError::Corrupt(_))), "{name}");
        }
    }
}
