//! The declarative policy document: the policy-file format (the same fields as the sidecar's
//! `--policy-file`) plus the output-only fields `policy get -o yaml` prints, so that what
//! `get` prints can be edited and applied again. Reading one or many of them from files,
//! directories or standard input, as YAML (several documents per file) or JSON (an object or
//! an array of objects).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use corsair_policy::{Mode, PolicySpec, RouteSpec};
use corsair_proto::v1;
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::output::timestamp;

/// One policy as written in a file or printed by `policy get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// The service the policy belongs to.
    pub service: String,
    /// Origins allowed to read responses.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Methods allowed beyond the safelisted ones.
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    /// Request headers allowed beyond the safelisted ones.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    /// Whether credentialed requests are allowed.
    #[serde(default)]
    pub allow_credentials: bool,
    /// Preflight cache lifetime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    /// Whether Private Network Access preflights are granted.
    #[serde(default)]
    pub allow_private_network: bool,
    /// How sidecars apply the policy.
    #[serde(default)]
    pub mode: Mode,
    /// Rules for some paths, each overriding the fields it sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Output only: the revision that last changed the policy. Ignored by `apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The stored version this document was read from. When present, `apply` updates only
    /// if the policy still has this etag (compare-and-set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Output only: when the policy was created. Ignored by `apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    /// Output only: when the policy last changed. Ignored by `apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
    /// Output only: who last changed the policy. Ignored by `apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_actor: Option<String>,
}

impl PolicyDoc {
    /// The policy fields, without bookkeeping.
    pub fn spec(&self) -> PolicySpec {
        PolicySpec {
            service: self.service.clone(),
            allowed_origins: self.allowed_origins.clone(),
            allowed_methods: self.allowed_methods.clone(),
            allowed_headers: self.allowed_headers.clone(),
            exposed_headers: self.exposed_headers.clone(),
            allow_credentials: self.allow_credentials,
            max_age: self.max_age,
            allow_private_network: self.allow_private_network,
            mode: self.mode,
            routes: self.routes.clone(),
        }
    }

    /// A document of a spec, without bookkeeping. (Destructured, so that a field added to the
    /// spec fails to compile here until the document has it too.)
    pub fn from_spec(spec: PolicySpec) -> Self {
        let PolicySpec {
            service,
            allowed_origins,
            allowed_methods,
            allowed_headers,
            exposed_headers,
            allow_credentials,
            max_age,
            allow_private_network,
            mode,
            routes,
        } = spec;
        PolicyDoc {
            service,
            allowed_origins,
            allowed_methods,
            allowed_headers,
            exposed_headers,
            allow_credentials,
            max_age,
            allow_private_network,
            mode,
            routes,
            revision: None,
            etag: None,
            create_time: None,
            update_time: None,
            update_actor: None,
        }
    }

    /// The document of a stored policy, bookkeeping included.
    pub fn from_proto(p: &v1::Policy) -> Result<Self, CliError> {
        let spec = PolicySpec::try_from(p)
            .map_err(|e| CliError::Protocol(format!("the server sent a policy: {e}")))?;
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(PolicyDoc {
            revision: (p.revision != 0).then_some(p.revision),
            etag: nonempty(&p.etag),
            create_time: p.create_time.as_ref().map(timestamp),
            update_time: p.update_time.as_ref().map(timestamp),
            update_actor: nonempty(&p.update_actor),
            ..PolicyDoc::from_spec(spec)
        })
    }
}

/// A document together with where it was read from, for messages.
#[derive(Debug, Clone)]
pub struct Sourced {
    /// `FILE` or `FILE#N` (the N-th document of a multi-document file, from 1).
    pub source: String,
    /// The document.
    pub doc: PolicyDoc,
}

/// Reads every policy document named by `inputs`: files, directories (their `.yaml`, `.yml`
/// and `.json` files, sorted, not recursive) and `-` for standard input. A service named twice
/// is refused, naming both places.
pub fn load(inputs: &[PathBuf]) -> Result<Vec<Sourced>, CliError> {
    let mut docs = Vec::new();
    for input in inputs {
        if input.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Input(format!("cannot read standard input: {e}")))?;
            docs.extend(parse("<stdin>", &text, None)?);
        } else if input.is_dir() {
            for file in policy_files(input)? {
                docs.extend(read_file(&file)?);
            }
        } else {
            docs.extend(read_file(input)?);
        }
    }
    if docs.is_empty() {
        return Err(CliError::Input("no policies in the given files".into()));
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for d in &docs {
        if let Some(first) = seen.insert(&d.doc.service, &d.source) {
            return Err(CliError::Input(format!(
                "service {:?} is defined twice: in {first} and in {}",
                d.doc.service, d.source
            )));
        }
    }
    Ok(docs)
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| CliError::Input(format!("cannot read {}: {e}", dir.display())))?
            .path();
        let policy_ext = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if policy_ext && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<Sourced>, CliError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {name}: {e}")))?;
    let json = path.extension().and_then(|e| e.to_str()) == Some("json");
    parse(&name, &text, Some(json))
}

/// Parses one input. `json`: whether it is JSON (`None`: JSON if it starts with `{` or `[`).
pub fn parse(name: &str, text: &str, json: Option<bool>) -> Result<Vec<Sourced>, CliError> {
    let json = json.unwrap_or_else(|| matches!(text.trim_start().chars().next(), Some('{' | '[')));
    let docs: Vec<PolicyDoc> = if json {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| CliError::Input(format!("{name}: not JSON: {e}")))?;
        let items = match value {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        let many = items.len() > 1;
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item).map_err(|e| {
                    let at = if many {
                        format!("{name}#{}", i + 1)
                    } else {
                        name.to_owned()
                    };
                    CliError::Input(format!("{at}: not a policy: {e}"))
                })
            })
            .collect::<Result<_, _>>()?
    } else if top_level_list(text) {
        // What `policy list -o yaml` prints: one document holding a list of policies.
        serde_saphyr::from_str::<Vec<PolicyDoc>>(text)
            .map_err(|e| CliError::Input(format!("{name}: not a list of policies: {e}")))?
    } else {
        serde_saphyr::from_multiple(text)
            .map_err(|e| CliError::Input(format!("{name}: not a policy: {e}")))?
    };
    let many = docs.len() > 1;
    Ok(docs
        .into_iter()
        .enumerate()
        .map(|(i, doc)| Sourced {
            source: if many {
                format!("{name}#{}", i + 1)
            } else {
                name.to_owned()
            },
            doc,
        })
        .collect())
}

/// Whether a YAML text is a single document whose root is a sequence (`- service: …`).
fn top_level_list(text: &str) -> bool {
    text.lines()
        .map(str::trim_end)
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && *l != "---")
        .is_some_and(|l| l.starts_with("- ") || l == "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_several_documents() {
        let text = "service: shop\nallowed_origins: [https://a.example]\n---\nservice: web\nmode: enforce\nmax_age: 60\n";
        let docs = parse("p.yaml", text, None).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].source, "p.yaml#1");
        assert_eq!(docs[0].doc.allowed_origins, ["https://a.example"]);
        assert_eq!(docs[1].doc.mode, Mode::Enforce);
        assert_eq!(docs[1].doc.max_age, Some(60));
    }

    #[test]
    fn a_yaml_list_of_policies() {
        let text = "# from policy list -o yaml\n- service: a\n  allowed_origins: [https://a.example]\n- service: b\n";
        let docs = parse("l.yaml", text, None).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].doc.service, "b");
        assert_eq!(docs[1].source, "l.yaml#2");
    }

    #[test]
    fn json_object_or_array() {
        let one = parse("p.json", r#"{"service": "shop"}"#, None).unwrap();
        assert_eq!(one[0].doc.service, "shop");
        let two = parse("p.json", r#"[{"service": "a"}, {"service": "b"}]"#, None).unwrap();
        assert_eq!(two[1].doc.service, "b");
        assert_eq!(two[1].source, "p.json#2");
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let err = parse("p.yaml", "service: shop\nallowed_origin: [x]\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yaml") && err.contains("allowed_origin"),
            "{err}"
        );
        let err = parse("p.json", r#"[{"service": "a"}, {"servce": "b"}]"#, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("p.json#2") && err.contains("servce"), "{err}");
    }

    #[test]
    fn routes_in_yaml() {
        let text = "service: shop\nallowed_origins: [https://app.example]\nroutes:\n  - path: /public/\n    allowed_origins: [\"*\"]\n  - path: /api/\n    allow_credentials: true\n    mode: enforce\n";
        let docs = parse("p.yaml", text, None).unwrap();
        let routes = &docs[0].doc.routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[0].allowed_origins.as_deref(),
            Some(&["*".to_owned()][..])
        );
        assert_eq!(routes[0].allow_credentials, None);
        assert_eq!(routes[1].allow_credentials, Some(true));
        assert_eq!(routes[1].mode, Some(Mode::Enforce));
        assert_eq!(docs[0].doc.spec().routes, *routes);
        let err = parse(
            "p.yaml",
            "service: shop\nroutes:\n  - path: /a/\n    max_ages: 1\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_ages"), "{err}");
    }

    #[test]
    fn what_get_prints_parses_back() {
        let doc = PolicyDoc {
            etag: Some("abc".into()),
            revision: Some(7),
            update_time: Some("2026-01-01T00:00:00Z".into()),
            ..PolicyDoc::from_spec(PolicySpec {
                service: "shop".into(),
                allowed_origins: vec!["https://a.example".into()],
                max_age: Some(5),
                routes: vec![RouteSpec {
                    path: "/api/".into(),
                    allowed_methods: Some(Vec::new()),
                    allow_credentials: Some(false),
                    ..RouteSpec::default()
                }],
                ..PolicySpec::default()
            })
        };
        let yaml = serde_saphyr::to_string(&doc).unwrap();
        let back = parse("-", &yaml, None).unwrap();
        assert_eq!(back[0].doc, doc);
    }
}
