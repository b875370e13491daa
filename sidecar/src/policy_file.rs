//! A local policy file as the policy source, for running without a control plane: the file
//! holds one policy in the policy-file format (JSON), is checked every `interval`, and every
//! valid change is applied at once. An invalid edit is logged and ignored; the last good
//! policy keeps serving.

use std::path::PathBuf;
use std::time::Duration;

use corsair_policy::{PolicySpec, lint};
use corsair_proto::v1;

use crate::policies::PolicySet;

/// How often the file is checked.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);

/// Why a policy file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// It is not a policy in the file format.
    #[error("{0} is not a policy: {1}")]
    Parse(String, serde_json::Error),
    /// It is a policy with errors.
    #[error("{0}: {1}")]
    Invalid(String, String),
    /// The policy is for another service.
    #[error("{0} is for service {1:?}, not {2:?}")]
    Service(String, String, String),
}

/// Reads and validates the policy in `path` for `service`.
pub fn read(path: &std::path::Path, service: &str) -> Result<PolicySpec, FileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError::Read(name.clone(), e))?;
    let spec: PolicySpec =
        serde_json::from_str(&text).map_err(|e| FileError::Parse(name.clone(), e))?;
    if spec.service != service {
        return Err(FileError::Service(name, spec.service, service.to_owned()));
    }
    let (policy, findings) = lint(&spec);
    match policy {
        Some(policy) => Ok(policy.into_spec()),
        None => {
            let errors: Vec<String> = findings
                .iter()
                .filter(|f| f.severity == corsair_policy::Severity::Error)
                .map(ToString::to_string)
                .collect();
            Err(FileError::Invalid(name, errors.join("; ")))
        }
    }
}

/// One check of the file: `None` when its contents did not change since `last`; otherwise
/// the revision applied, or why the new contents were ignored.
pub fn step(
    path: &std::path::Path,
    service: &str,
    set: &PolicySet,
    last: &mut Option<Vec<u8>>,
) -> Option<Result<i64, String>> {
    let contents = std::fs::read(path).ok();
    if contents == *last {
        return None;
    }
    *last = contents;
    let spec = match read(path, service) {
        Ok(spec) => spec,
        Err(error) => return Some(Err(error.to_string())),
    };
    let revision = set.load().revision + 1;
    let update = v1::DiscoveryResponse {
        revision,
        upserts: vec![v1::Policy {
            revision,
            ..v1::Policy::from(&spec)
        }],
        snapshot: true,
        ..Default::default()
    };
    Some(
        set.apply(&update)
            .map(|_| revision)
            .map_err(|e| e.to_string()),
    )
}

/// Applies the file's policy whenever its contents change, until `shutdown` resolves. Each
/// applied version gets the next local revision.
pub async fn watch(
    path: PathBuf,
    service: String,
    set: std::sync::Arc<PolicySet>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last = None;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => return,
        }
        match step(&path, &service, &set, &mut last) {
            None => {}
            Some(Ok(revision)) => {
                tracing::info!(path = %path.display(), revision, "policy file applied")
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "policy file ignored; keeping the last good policy")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn origins(set: &PolicySet) -> Vec<String> {
        set.load().services["shop"]
            .compiled
            .policy()
            .spec()
            .allowed_origins
            .clone()
    }

    #[tokio::test]
    async fn the_watcher_applies_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.json");
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://a.example.com"]}"#,
        )
        .unwrap();
        let set = Arc::new(PolicySet::default());
        let mut applied = set.subscribe();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch(
            path.clone(),
            "shop".into(),
            set.clone(),
            Duration::from_millis(10),
            async {
                let _ = stopped.await;
            },
        ));
        applied.wait_for(|r| *r >= 1).await.unwrap();
        assert_eq!(origins(&set), ["https://a.example.com"]);
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://b.example.com"]}"#,
        )
        .unwrap();
        applied.wait_for(|r| *r >= 2).await.unwrap();
        assert_eq!(origins(&set), ["https://b.example.com"]);
        let _ = stop.send(());
        task.await.unwrap();
    }

    #[test]
    fn an_invalid_edit_is_ignored_and_the_last_good_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.json");
        let set = PolicySet::default();
        let mut last = None;
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://a.example.com"]}"#,
        )
        .unwrap();
        assert_eq!(step(&path, "shop", &set, &mut last), Some(Ok(1)));
        assert_eq!(
            step(&path, "shop", &set, &mut last),
            None,
            "unchanged contents are not re-applied"
        );
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://bad.example.com/path"]}"#,
        )
        .unwrap();
        let ignored = step(&path, "shop", &set, &mut last).unwrap().unwrap_err();
        assert!(ignored.contains("allowed_origins[0]"), "{ignored}");
        assert_eq!(origins(&set), ["https://a.example.com"]);
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://c.example.com"]}"#,
        )
        .unwrap();
        assert_eq!(step(&path, "shop", &set, &mut last), Some(Ok(2)));
        assert_eq!(origins(&set), ["https://c.example.com"]);
    }

    #[test]
    fn read_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"service":"shop","allowed_origins":["https://bad.example.com/path"]}"#,
        )
        .unwrap();
        let err = read(&path, "shop").unwrap_err().to_string();
        assert!(err.contains("allowed_origins[0]"), "{err}");
        std::fs::write(&path, r#"{"service":"blog","allowed_origins":[]}"#).unwrap();
        assert!(matches!(read(&path, "shop"), Err(FileError::Service(..))));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(read(&path, "shop"), Err(FileError::Parse(..))));
    }
}
