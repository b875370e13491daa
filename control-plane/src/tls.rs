//! TLS for the gRPC listener, with rustls: the certificate and key come from PEM files and are
//! reloaded when the files change (no restart, no dropped connection: the next handshake uses
//! the new pair; a bad pair is logged and the old one kept). With a client CA bundle, client
//! certificates are verified against it; a client may still connect without one and present a
//! token instead. Handshakes run off the accept loop, each with a deadline.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::listener::Conn;

/// Where the listener's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle client certificates are verified against; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
    /// How often the certificate and key files are checked for changes.
    pub reload_interval: Duration,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{0}: {1}")]
    File(String, String),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and key and checks that they belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let file_error = |path: &Path, e: &dyn fmt::Display| {
        TlsError::File(path.display().to_string(), e.to_string())
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, &e))?;
    if chain.is_empty() {
        return Err(file_error(cert, &"no certificate in the file"));
    }
    // The key's own parse error never includes the key.
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, &e))?;
    Ok(CertifiedKey::from_der(chain, key_der, &provider())?)
}

/// The current certificate, swapped when the files change.
struct Reloading {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS listener: accepted, handshaken connections, for `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    files: &TlsFiles,
    limits: crate::listener::ConnectionLimits,
    stop: watch::Receiver<bool>,
) -> Result<ReceiverStream<std::io::Result<Conn<TlsStream<TcpStream>>>>, TlsError> {
    let pair = load_pair(&files.cert, &files.key)?;
    let reloading = Arc::new(Reloading {
        current: ArcSwap::from_pointee(pair),
    });
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| TlsError::File(ca.display().to_string(), e.to_string()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| TlsError::File(ca.display().to_string(), e.to_string()))?;
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::File(ca.display().to_string(), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(reloading.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    // Reload: compare the files' contents on every tick.
    let (cert, key, interval) = (files.cert.clone(), files.key.clone(), files.reload_interval);
    let mut stop_reload = stop.clone();
    tokio::spawn(async move {
        let read = || (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
        let mut last = read();
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_reload.wait_for(|s| *s) => return,
            }
            let now = read();
            if now == last {
                continue;
            }
            last = now;
            match load_pair(&cert, &key) {
                Ok(pair) => {
                    reloading.current.store(Arc::new(pair));
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    tracing::warn!(%error, "new TLS certificate not loaded; keeping the current one");
                }
            }
        }
    });

    Ok(crate::listener::accept(
        listener,
        limits,
        stop,
        move |stream: TcpStream| {
            let acceptor = acceptor.clone();
            async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(limits.first_byte, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => Some(tls),
                    Ok(Err(error)) => {
                        tracing::debug!(?peer, %error, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(?peer, "TLS handshake timed out");
                        None
                    }
                }
            }
        },
    ))
}

/// The sidecar a client certificate names: its leaf must carry exactly one URI SAN,
/// `spiffe://<trust_domain>/corsair/sidecar/<service>`.
pub fn sidecar_service(leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| "the client certificate cannot be parsed".to_owned())?;
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "the client certificate must carry exactly one URI SAN, not {}",
            uris.len()
        ));
    };
    let prefix = format!("spiffe://{trust_domain}/corsair/sidecar/");
    match uri.strip_prefix(&prefix) {
        Some(service) if !service.is_empty() && !service.contains('/') => Ok(service.to_owned()),
        _ => Err(format!(
            "the client certificate's URI SAN {uri:?} is not {prefix}<service>"
        )),
    }
}
