//! Wire types and gRPC stubs of the `corsair.v1` API.
//!
//! The Rust code is generated at build time from the `.proto` files in
//! `corsair/v1/`, without a system `protoc`: `protox` compiles them to a
//! descriptor set and `tonic-prost-build` generates `prost` messages and
//! `tonic` clients and servers from it. Comments in the `.proto` files
//! become the documentation of the generated items.
//!
//! # Layout
//!
//! Everything generated lives in [`v1`], one module for the whole
//! `corsair.v1` package:
//!
//! - `corsair/v1/policy.proto`: the [`v1::Policy`] resource, validation
//!   [`v1::Finding`]s and [`v1::policy_service_server::PolicyService`]
//!   (get, list, create, update, delete, revisions, rollback and explain).
//! - `corsair/v1/origin_set.proto`: [`v1::OriginSet`]s, the origin lists
//!   policies share, and [`v1::origin_set_service_server::OriginSetService`].
//! - `corsair/v1/audit.proto`: the hash-chained [`v1::AuditEvent`] log and
//!   [`v1::audit_service_server::AuditService`].
//! - `corsair/v1/discovery.proto`: the bidirectional stream that keeps
//!   sidecars in sync,
//!   [`v1::discovery_service_server::DiscoveryService`].
//! - `corsair/v1/token.proto`: access tokens,
//!   [`v1::token_service_server::TokenService`].
//! - `corsair/v1/fleet.proto`: the connected [`v1::Sidecar`]s and
//!   [`v1::fleet_service_server::FleetService`].
//!
//! Each service `FooService` has a client in `v1::foo_service_client` and a
//! server trait plus its `tower` service wrapper in `v1::foo_service_server`.
//! Well-known types (`google.protobuf.Timestamp`, `FieldMask`) map to
//! [`prost_types`].
//!
//! [`FILE_DESCRIPTOR_SET`] holds the encoded descriptor set of the package
//! and its imports, for gRPC server reflection.

pub mod codec;
pub mod convert;
pub mod names;

/// Messages, enums, clients and servers of the `corsair.v1` package.

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/corsair.v1.rs"));
}

/// Encoded `google.protobuf.FileDescriptorSet` of the `corsair.v1` files and
/// everything they import, with source info (comments) included.
///
/// Register it with a reflection service, for example
/// `tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/corsair_descriptor.bin"));

/// TLS for clients of the control plane: the CA bundle to verify it against and, for mTLS,
/// the client's own certificate and key (all PEM files).
pub fn client_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::FILE_DESCRIPTOR_SET;
    use prost::Message;
    use prost_types::FileDescriptorSet;

    fn descriptor_set() -> FileDescriptorSet {
        FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
    }

    #[test]
    fn descriptor_set_contains_every_service() {
        let set = descriptor_set();
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                file.service
                    .iter()
                    .map(move |service| format!("{}.{}", file.package(), service.name()))
            })
            .collect();
        for expected in [
            "corsair.v1.PolicyService",
            "corsair.v1.AuditService",
            "corsair.v1.DiscoveryService",
            "corsair.v1.FleetService",
            "corsair.v1.TokenService",
        ] {
            assert!(
                services.iter().any(|name| name == expected),
                "{expected} missing from {services:?}"
            );
        }
    }

    #[test]
    fn descriptor_set_is_self_contained() {
        let set = descriptor_set();
        let names: Vec<&str> = set.file.iter().map(|file| file.name()).collect();
        for file in &set.file {
            for dependency in &file.dependency {
                assert!(
                    names.contains(&dependency.as_str()),
                    "{} imports {dependency}, which is missing",
                    file.name()
                );
            }
        }
    }

    #[test]
    fn descriptor_set_keeps_comments() {
        let set = descriptor_set();
        let policy = set
            .file
            .iter()
            .find(|file| file.name() == "corsair/v1/policy.proto")
            .expect("policy.proto present");
        let documented = policy
            .source_code_info
            .as_ref()
            .is_some_and(|info| info.location.iter().any(|l| l.leading_comments.is_some()));
        assert!(
            documented,
            "policy.proto has no comments in the descriptor set"
        );
    }

    #[test]
    fn generated_types_round_trip() {
        use super::v1::{Policy, PolicyMode};

        let policy = Policy {
            name: "services/shop/policy".to_owned(),
            service: "shop".to_owned(),
            allowed_origins: vec!["https://shop.example".to_owned()],
            max_age_seconds: Some(600),
            mode: PolicyMode::Enforce.into(),
            ..Policy::default()
        };
        let decoded = Policy::decode(policy.encode_to_vec().as_slice()).expect("policy decodes");
        assert_eq!(decoded, policy);
        assert_eq!(decoded.mode(), PolicyMode::Enforce);
    }
}
