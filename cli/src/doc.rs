//! The declarative documents: policies (the same fields as the sidecar's `--policy-file`)
//! and origin sets (`kind: OriginSet`), each with the output-only fields `get -o yaml`
//! prints, so that what `get` prints can be edited and applied again. Reading them from
//! files, directories or standard input, as YAML (several documents per file) or JSON (an
//! object or an array of objects); a document without `kind` is a policy.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use corsair_policy::{Mode, OriginSetSpec, PolicySpec, RouteSpec};
use corsair_proto::names::parse_origin_set_name;
use corsair_proto::v1;
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::output::timestamp;

/// One policy as written in a file or printed by `policy get` (files are read through
/// [`parse`], which knows both kinds of document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDoc {
    /// The service the policy belongs to.
    pub service: String,
    /// Origins allowed to read responses.
    pub allowed_origins: Vec<String>,
    /// Methods allowed beyond the safelisted ones.
    pub allowed_methods: Vec<String>,
    /// Request headers allowed beyond the safelisted ones.
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read.
    pub exposed_headers: Vec<String>,
    /// Whether credentialed requests are allowed.
    pub allow_credentials: bool,
    /// Preflight cache lifetime, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    /// Whether Private Network Access preflights are granted.
    pub allow_private_network: bool,
    /// How sidecars apply the policy.
    pub mode: Mode,
    /// Rules for some paths, each overriding the fields it sets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Output only: the revision that last changed the policy. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The stored version this document was read from. When present, `apply` updates only
    /// if the policy still has this etag (compare-and-set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Output only: when the policy was created. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    /// Output only: when the policy last changed. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
    /// Output only: who last changed the policy. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_actor: Option<String>,
    /// Output only (`policy get --effective`): the newest revision of the policy and the
    /// origin sets it references. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_revision: Option<i64>,
    /// Output only (`policy get --effective`): every allowed origin with the sets resolved,
    /// each with the set it came from. Ignored by `apply`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effective_origins: Vec<EffectiveOrigin>,
}

/// One allowed origin of an effective policy: the API's `EffectiveOrigin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectiveOrigin {
    /// The entry, canonical.
    pub origin: String,
    /// The set it came from, `originSets/{set}`; empty for the policy's own entries.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin_set: String,
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
            effective_revision: None,
            effective_origins: Vec::new(),
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
            effective_revision: (p.effective_revision != 0).then_some(p.effective_revision),
            effective_origins: p
                .effective_origins
                .iter()
                .map(|o| EffectiveOrigin {
                    origin: o.origin.clone(),
                    origin_set: o.origin_set.clone(),
                })
                .collect(),
            ..PolicyDoc::from_spec(spec)
        })
    }
}

/// One origin set as written in a file (`kind: OriginSet`) or printed by `origin-set get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "OriginSet")]
pub struct OriginSetDoc {
    /// The set's name; policies reference it as `set:NAME`.
    pub name: String,
    /// What the set is for.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Allowed-origin entries, in the policy syntax.
    pub origins: Vec<String>,
    /// Output only: the revision that last changed the set. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The stored version this document was read from: `apply` updates only if the set
    /// still has this etag (compare-and-set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Output only: when the set was created. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    /// Output only: when the set last changed. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
    /// Output only: who last changed the set. Ignored by `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_actor: Option<String>,
    /// Output only: the policies that reference the set (`services/{service}/policy`), whose
    /// effective policies every change of it changes. Ignored by `apply`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<String>,
}

impl OriginSetDoc {
    /// The set's fields, without bookkeeping.
    pub fn spec(&self) -> OriginSetSpec {
        OriginSetSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            origins: self.origins.clone(),
        }
    }

    /// A document of a spec, without bookkeeping.
    pub fn from_spec(spec: OriginSetSpec) -> Self {
        let OriginSetSpec {
            name,
            description,
            origins,
        } = spec;
        OriginSetDoc {
            name,
            description,
            origins,
            revision: None,
            etag: None,
            create_time: None,
            update_time: None,
            update_actor: None,
            referrers: Vec::new(),
        }
    }

    /// The document of a stored set, bookkeeping included.
    pub fn from_proto(s: &v1::OriginSet) -> Result<Self, CliError> {
        let name = parse_origin_set_name(&s.name)
            .map_err(|e| CliError::Protocol(format!("the server sent an origin set: {e}")))?;
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(OriginSetDoc {
            revision: (s.revision != 0).then_some(s.revision),
            etag: nonempty(&s.etag),
            create_time: s.create_time.as_ref().map(timestamp),
            update_time: s.update_time.as_ref().map(timestamp),
            update_actor: nonempty(&s.update_actor),
            referrers: s.referrers.clone(),
            ..OriginSetDoc::from_spec(OriginSetSpec {
                name: name.to_owned(),
                description: s.description.clone(),
                origins: s.origins.clone(),
            })
        })
    }
}

/// The `kind` of a policy, which is also what a document without `kind` is.
const POLICY: &str = "Policy";
/// The `kind` of an origin set (see [`OriginSetDoc`], which prints it).
const ORIGIN_SET: &str = "OriginSet";

/// Every field a document of either kind may have. A file may hold both kinds, so each
/// document is read as this first: the YAML parser then still points at a misspelt field or
/// a value of the wrong type, and `kind` decides afterwards which fields belong.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnyDoc {
    kind: Option<String>,
    service: Option<String>,
    allowed_origins: Option<Vec<String>>,
    allowed_methods: Option<Vec<String>>,
    allowed_headers: Option<Vec<String>>,
    exposed_headers: Option<Vec<String>>,
    allow_credentials: Option<bool>,
    max_age: Option<u32>,
    allow_private_network: Option<bool>,
    mode: Option<Mode>,
    routes: Option<Vec<RouteSpec>>,
    effective_revision: Option<i64>,
    effective_origins: Option<Vec<EffectiveOrigin>>,
    name: Option<String>,
    description: Option<String>,
    origins: Option<Vec<String>>,
    referrers: Option<Vec<String>>,
    revision: Option<i64>,
    etag: Option<String>,
    create_time: Option<String>,
    update_time: Option<String>,
    update_actor: Option<String>,
}

/// One document of either kind.
#[derive(Debug)]
enum Doc {
    /// A policy (`kind: Policy`, or no `kind`).
    Policy(PolicyDoc),
    /// An origin set (`kind: OriginSet`).
    OriginSet(OriginSetDoc),
}

impl AnyDoc {
    /// The document `kind` says this is; fields of the other kind are refused by name.
    fn into_doc(self) -> Result<Doc, String> {
        let policy_only = [
            ("service", self.service.is_some()),
            ("allowed_origins", self.allowed_origins.is_some()),
            ("allowed_methods", self.allowed_methods.is_some()),
            ("allowed_headers", self.allowed_headers.is_some()),
            ("exposed_headers", self.exposed_headers.is_some()),
            ("allow_credentials", self.allow_credentials.is_some()),
            ("max_age", self.max_age.is_some()),
            (
                "allow_private_network",
                self.allow_private_network.is_some(),
            ),
            ("mode", self.mode.is_some()),
            ("routes", self.routes.is_some()),
            ("effective_revision", self.effective_revision.is_some()),
            ("effective_origins", self.effective_origins.is_some()),
        ];
        let set_only = [
            ("name", self.name.is_some()),
            ("description", self.description.is_some()),
            ("origins", self.origins.is_some()),
            ("referrers", self.referrers.is_some()),
        ];
        let present = |fields: &[(&'static str, bool)]| -> Vec<&'static str> {
            fields.iter().filter(|(_, p)| *p).map(|(f, _)| *f).collect()
        };
        match self.kind.as_deref() {
            None | Some(POLICY) => {
                let misplaced = present(&set_only);
                if !misplaced.is_empty() {
                    let hint = if self.kind.is_none() && self.service.is_none() {
                        " (for an origin set, add `kind: OriginSet`)"
                    } else {
                        ""
                    };
                    return Err(format!("{}{hint}", not_fields(&misplaced, "a", "policy")));
                }
                let Some(service) = self.service else {
                    return Err("a policy needs `service`".into());
                };
                Ok(Doc::Policy(PolicyDoc {
                    service,
                    allowed_origins: self.allowed_origins.unwrap_or_default(),
                    allowed_methods: self.allowed_methods.unwrap_or_default(),
                    allowed_headers: self.allowed_headers.unwrap_or_default(),
                    exposed_headers: self.exposed_headers.unwrap_or_default(),
                    allow_credentials: self.allow_credentials.unwrap_or_default(),
                    max_age: self.max_age,
                    allow_private_network: self.allow_private_network.unwrap_or_default(),
                    mode: self.mode.unwrap_or_default(),
                    routes: self.routes.unwrap_or_default(),
                    revision: self.revision,
                    etag: self.etag,
                    create_time: self.create_time,
                    update_time: self.update_time,
                    update_actor: self.update_actor,
                    effective_revision: self.effective_revision,
                    effective_origins: self.effective_origins.unwrap_or_default(),
                }))
            }
            Some(ORIGIN_SET) => {
                let misplaced = present(&policy_only);
                if !misplaced.is_empty() {
                    let hint = if misplaced.contains(&"allowed_origins") {
                        " (a set lists its entries in `origins`)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "{}{hint}",
                        not_fields(&misplaced, "an", "origin set")
                    ));
                }
                let Some(name) = self.name else {
                    return Err("an origin set needs `name`".into());
                };
                Ok(Doc::OriginSet(OriginSetDoc {
                    name,
                    description: self.description.unwrap_or_default(),
                    origins: self.origins.unwrap_or_default(),
                    revision: self.revision,
                    etag: self.etag,
                    create_time: self.create_time,
                    update_time: self.update_time,
                    update_actor: self.update_actor,
                    referrers: self.referrers.unwrap_or_default(),
                }))
            }
            Some(other) => Err(format!(
                "unknown kind {other:?}: a document is a {POLICY} (the default without `kind`) \
                 or an {ORIGIN_SET}"
            )),
        }
    }
}

/// `` `a` is not a policy field `` or `` `a`, `b` are not policy fields ``.
fn not_fields(fields: &[&str], article: &str, kind: &str) -> String {
    let quoted: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    if let [one] = quoted.as_slice() {
        format!("{one} is not {article} {kind} field")
    } else {
        format!("{} are not {kind} fields", quoted.join(", "))
    }
}

/// A document together with where it was read from, for messages.
#[derive(Debug, Clone)]
pub struct Sourced<T = PolicyDoc> {
    /// `FILE` or `FILE#N` (the N-th document of a multi-document file, from 1).
    pub source: String,
    /// The document.
    pub doc: T,
}

/// The documents of some inputs, by kind, each kind in the order read.
#[derive(Debug, Clone, Default)]
pub struct Documents {
    /// The origin sets.
    pub origin_sets: Vec<Sourced<OriginSetDoc>>,
    /// The policies.
    pub policies: Vec<Sourced<PolicyDoc>>,
}

impl Documents {
    /// How many documents there are.
    pub fn len(&self) -> usize {
        self.origin_sets.len() + self.policies.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, source: String, doc: Doc) {
        match doc {
            Doc::Policy(doc) => self.policies.push(Sourced { source, doc }),
            Doc::OriginSet(doc) => self.origin_sets.push(Sourced { source, doc }),
        }
    }

    fn extend(&mut self, other: Documents) {
        self.origin_sets.extend(other.origin_sets);
        self.policies.extend(other.policies);
    }
}

/// Reads every document named by `inputs`: files, directories (their `.yaml`, `.yml` and
/// `.json` files, sorted, not recursive) and `-` for standard input. A service or a set
/// defined twice is refused, naming both places.
pub fn load(inputs: &[PathBuf]) -> Result<Documents, CliError> {
    let mut docs = Documents::default();
    for input in inputs {
        if input.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Input(format!("cannot read standard input: {e}")))?;
            docs.extend(parse("<stdin>", &text, None)?);
        } else if input.is_dir() {
            for file in document_files(input)? {
                docs.extend(read_file(&file)?);
            }
        } else {
            docs.extend(read_file(input)?);
        }
    }
    if docs.is_empty() {
        return Err(CliError::Input(
            "no policies or origin sets in the given files".into(),
        ));
    }
    once_each(
        "service",
        docs.policies
            .iter()
            .map(|d| (d.doc.service.as_str(), d.source.as_str())),
    )?;
    once_each(
        "origin set",
        docs.origin_sets
            .iter()
            .map(|d| (d.doc.name.as_str(), d.source.as_str())),
    )?;
    Ok(docs)
}

/// Refuses a name given twice, naming both places.
fn once_each<'a>(
    what: &str,
    named: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), CliError> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, source) in named {
        if let Some(first) = seen.insert(name, source) {
            return Err(CliError::Input(format!(
                "{what} {name:?} is defined twice: in {first} and in {source}"
            )));
        }
    }
    Ok(())
}

fn document_files(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| CliError::Input(format!("cannot read {}: {e}", dir.display())))?
            .path();
        let document_ext = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if document_ext && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Documents, CliError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {name}: {e}")))?;
    let json = path.extension().and_then(|e| e.to_str()) == Some("json");
    parse(&name, &text, Some(json))
}

/// Parses one input. `json`: whether it is JSON (`None`: JSON if it starts with `{` or `[`).
pub fn parse(name: &str, text: &str, json: Option<bool>) -> Result<Documents, CliError> {
    const NOT_ONE: &str = "not a policy or origin set";
    let json = json.unwrap_or_else(|| matches!(text.trim_start().chars().next(), Some('{' | '[')));
    let raw: Vec<AnyDoc> = if json {
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
                    CliError::Input(format!("{at}: {NOT_ONE}: {e}"))
                })
            })
            .collect::<Result<_, _>>()?
    } else if top_level_list(text) {
        // What `list -o yaml` prints: one document holding a list of them.
        serde_saphyr::from_str::<Vec<AnyDoc>>(text)
            .map_err(|e| CliError::Input(format!("{name}: not a list of documents: {e}")))?
    } else {
        serde_saphyr::from_multiple(text)
            .map_err(|e| CliError::Input(format!("{name}: {NOT_ONE}: {e}")))?
    };
    let many = raw.len() > 1;
    let mut docs = Documents::default();
    for (i, raw) in raw.into_iter().enumerate() {
        let source = if many {
            format!("{name}#{}", i + 1)
        } else {
            name.to_owned()
        };
        let doc = raw
            .into_doc()
            .map_err(|why| CliError::Input(format!("{source}: {why}")))?;
        docs.push(source, doc);
    }
    Ok(docs)
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

    fn policies(name: &str, text: &str) -> Vec<Sourced<PolicyDoc>> {
        let docs = parse(name, text, None).unwrap();
        assert!(docs.origin_sets.is_empty(), "{docs:?}");
        docs.policies
    }

    fn error(name: &str, text: &str) -> String {
        parse(name, text, None).unwrap_err().to_string()
    }

    #[test]
    fn yaml_with_several_documents() {
        let text = "service: shop\nallowed_origins: [https://a.example]\n---\nservice: web\nmode: enforce\nmax_age: 60\n";
        let docs = policies("p.yaml", text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].source, "p.yaml#1");
        assert_eq!(docs[0].doc.allowed_origins, ["https://a.example"]);
        assert_eq!(docs[1].doc.mode, Mode::Enforce);
        assert_eq!(docs[1].doc.max_age, Some(60));
    }

    #[test]
    fn a_yaml_list_of_policies() {
        let text = "# from policy list -o yaml\n- service: a\n  allowed_origins: [https://a.example]\n- service: b\n";
        let docs = policies("l.yaml", text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].doc.service, "b");
        assert_eq!(docs[1].source, "l.yaml#2");
    }

    #[test]
    fn json_object_or_array() {
        let one = policies("p.json", r#"{"service": "shop"}"#);
        assert_eq!(one[0].doc.service, "shop");
        let two = policies("p.json", r#"[{"service": "a"}, {"service": "b"}]"#);
        assert_eq!(two[1].doc.service, "b");
        assert_eq!(two[1].source, "p.json#2");
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let err = error("p.yaml", "service: shop\nallowed_origin: [x]\n");
        assert!(
            err.contains("p.yaml") && err.contains("allowed_origin"),
            "{err}"
        );
        // The YAML parser still points at it.
        assert!(err.contains("line 2 column 1"), "{err}");
        let err = error("p.json", r#"[{"service": "a"}, {"servce": "b"}]"#);
        assert!(err.contains("p.json#2") && err.contains("servce"), "{err}");
    }

    #[test]
    fn sets_and_policies_in_one_file_keep_their_order_and_sources() {
        let text = "\
kind: OriginSet
name: corp
description: the corporate front-ends
origins: [https://a.example.com]
---
kind: Policy
service: shop
allowed_origins: [set:corp]
---
service: blog
";
        let docs = parse("all.yaml", text, None).unwrap();
        let sets: Vec<(&str, &str)> = docs
            .origin_sets
            .iter()
            .map(|d| (d.source.as_str(), d.doc.name.as_str()))
            .collect();
        assert_eq!(sets, [("all.yaml#1", "corp")]);
        assert_eq!(docs.origin_sets[0].doc.origins, ["https://a.example.com"]);
        let services: Vec<(&str, &str)> = docs
            .policies
            .iter()
            .map(|d| (d.source.as_str(), d.doc.service.as_str()))
            .collect();
        assert_eq!(services, [("all.yaml#2", "shop"), ("all.yaml#3", "blog")]);
    }

    #[test]
    fn documents_of_the_wrong_kind_or_an_unknown_one_are_refused() {
        let cases = [
            (
                "an unknown kind",
                "service: a\n---\nkind: Route\nname: x\n",
                "d.yaml#2: unknown kind \"Route\"",
            ),
            (
                "a set without its kind",
                "name: corp\norigins: [https://a.example.com]\n",
                "d.yaml: `name`, `origins` are not policy fields (for an origin set, add `kind: OriginSet`)",
            ),
            (
                "a set written with a policy's field",
                "kind: OriginSet\nname: corp\nallowed_origins: [https://a.example.com]\n",
                "d.yaml: `allowed_origins` is not an origin set field (a set lists its entries in `origins`)",
            ),
            (
                "a set without a name",
                "kind: OriginSet\norigins: []\n",
                "d.yaml: an origin set needs `name`",
            ),
            (
                "a policy without a service",
                "kind: Policy\nallowed_origins: []\n",
                "d.yaml: a policy needs `service`",
            ),
        ];
        for (case, text, expected) in cases {
            let err = error("d.yaml", text);
            assert!(err.starts_with(expected), "{case}: {err}");
        }
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("twice.yaml");
        std::fs::write(
            &path,
            "kind: OriginSet\nname: corp\n---\nkind: OriginSet\nname: corp\n",
        )
        .unwrap();
        let err = load(&[path]).unwrap_err().to_string();
        assert!(
            err.contains("origin set \"corp\" is defined twice"),
            "{err}"
        );
    }

    #[test]
    fn what_get_prints_parses_back() {
        let doc = PolicyDoc {
            etag: Some("abc".into()),
            revision: Some(7),
            update_time: Some("2026-01-01T00:00:00Z".into()),
            effective_revision: Some(9),
            effective_origins: vec![EffectiveOrigin {
                origin: "https://b.example".into(),
                origin_set: "originSets/corp".into(),
            }],
            ..PolicyDoc::from_spec(PolicySpec {
                service: "shop".into(),
                allowed_origins: vec!["https://a.example".into(), "set:corp".into()],
                max_age: Some(5),
                ..PolicySpec::default()
            })
        };
        let yaml = serde_saphyr::to_string(&doc).unwrap();
        let back = policies("-", &yaml);
        assert_eq!(back[0].doc, doc);

        let set = OriginSetDoc {
            etag: Some("\"s-corp-3\"".into()),
            revision: Some(3),
            referrers: vec!["services/shop/policy".into()],
            ..OriginSetDoc::from_spec(OriginSetSpec {
                name: "corp".into(),
                description: "the corporate front-ends".into(),
                origins: vec!["https://b.example".into()],
            })
        };
        let yaml = serde_saphyr::to_string(&set).unwrap();
        assert!(yaml.starts_with("kind: OriginSet\nname: corp\n"), "{yaml}");
        let back = parse("-", &yaml, None).unwrap();
        assert_eq!(back.origin_sets[0].doc, set);
        let json = serde_json::to_string(&[&set]).unwrap();
        let back = parse("-", &json, None).unwrap();
        assert_eq!(back.origin_sets[0].doc, set);
    }

    #[test]
    fn routes_in_yaml() {
        let text = "service: shop\nallowed_origins: [https://app.example]\nroutes:\n  - path: /public/\n    allowed_origins: [\"*\"]\n  - path: /api/\n    allow_credentials: true\n    mode: enforce\n";
        let docs = parse("p.yaml", text, None).unwrap();
        let routes = &docs.policies[0].doc.routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[0].allowed_origins.as_deref(),
            Some(&["*".to_owned()][..])
        );
        assert_eq!(routes[0].allow_credentials, None);
        assert_eq!(routes[1].allow_credentials, Some(true));
        assert_eq!(routes[1].mode, Some(Mode::Enforce));
        assert_eq!(docs.policies[0].doc.spec().routes, *routes);
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
    fn a_policy_with_routes_prints_and_parses_back() {
        let doc = PolicyDoc {
            etag: Some("abc".into()),
            revision: Some(7),
            ..PolicyDoc::from_spec(PolicySpec {
                service: "shop".into(),
                allowed_origins: vec!["https://a.example".into()],
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
        assert_eq!(back.policies[0].doc, doc);
    }
}
