//! Who may call what. Every RPC passes [`AuthLayer`]: it finds the method's [`Access`] rule
//! (a method without one is refused: fail closed), authenticates the bearer token, checks the
//! role, and hands the handler a [`Principal`] in the request's extensions. A refusal is
//! `UNAUTHENTICATED` (no, bad, expired or revoked credential) or `PERMISSION_DENIED` (a known
//! identity without the role), and is recorded in the audit log with the principal, never the
//! credential.
//!
//! Tokens are `corsair_` followed by 64 hex digits of randomness. The store keeps their
//! SHA-256 only; a token's id is the first 16 hex digits of that hash, and the full hash is
//! compared in constant time.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::service::Shared;
use crate::status::write_error_status;
use crate::store::{Plan, StoreError, TokenRecord, WriteContext, WriteError, now_micros};

/// A role a token carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads policies and fleet status.
    Viewer,
    /// Reads and writes policies.
    Editor,
    /// Reads and verifies the audit log.
    Auditor,
    /// Everything the others may, plus managing tokens.
    Admin,
    /// Streams the policies of its services, nothing else.
    Sidecar,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Editor,
        Role::Auditor,
        Role::Admin,
        Role::Sidecar,
    ];

    /// The name, as stored and as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Sidecar => "sidecar",
        }
    }

    /// The role of a name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether this role passes `access`.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Public | Access::Authenticated => true,
            Access::Read => matches!(self, Role::Viewer | Role::Editor | Role::Admin),
            Access::Write => matches!(self, Role::Editor | Role::Admin),
            Access::Audit => matches!(self, Role::Auditor | Role::Admin),
            Access::Admin => self == Role::Admin,
            Access::Stream => self == Role::Sidecar,
        }
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a credential (health checks).
    Public,
    /// Any valid credential (server reflection).
    Authenticated,
    /// Reading policies and fleet status.
    Read,
    /// Changing policies.
    Write,
    /// Reading the audit log.
    Audit,
    /// Managing tokens.
    Admin,
    /// Streaming policies, for the sidecar's own services.
    Stream,
}

impl Access {
    /// The roles that pass this access, by name.
    pub fn roles(self) -> Vec<&'static str> {
        Role::ALL
            .into_iter()
            .filter(|role| role.allows(self))
            .map(Role::as_str)
            .collect()
    }
}

/// Every method served, by gRPC service, with what it requires.
const RULES: [(&str, &[&str], Access); 11] = [
    ("grpc.health.v1.Health", &["Check", "Watch"], Access::Public),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
        Access::Authenticated,
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
        Access::Authenticated,
    ),
    (
        "corsair.v1.PolicyService",
        &[
            "GetPolicy",
            "ListPolicies",
            "ListPolicyRevisions",
            "ExplainRequest",
        ],
        Access::Read,
    ),
    (
        "corsair.v1.PolicyService",
        &[
            "CreatePolicy",
            "UpdatePolicy",
            "DeletePolicy",
            "RollbackPolicy",
        ],
        Access::Write,
    ),
    (
        "corsair.v1.OriginSetService",
        &["GetOriginSet", "ListOriginSets", "ListOriginSetRevisions"],
        Access::Read,
    ),
    (
        "corsair.v1.OriginSetService",
        &[
            "CreateOriginSet",
            "UpdateOriginSet",
            "DeleteOriginSet",
            "RollbackOriginSet",
        ],
        Access::Write,
    ),
    (
        "corsair.v1.AuditService",
        &[
            "ListAuditEvents",
            "GetAuditEvent",
            "WatchAuditEvents",
            "VerifyAuditChain",
        ],
        Access::Audit,
    ),
    (
        "corsair.v1.FleetService",
        &["ListSidecars", "GetSidecar"],
        Access::Read,
    ),
    (
        "corsair.v1.DiscoveryService",
        &["StreamPolicies"],
        Access::Stream,
    ),
    (
        "corsair.v1.TokenService",
        &["CreateToken", "ListTokens", "RevokeToken"],
        Access::Admin,
    ),
];

/// The rule for a full gRPC path (`/corsair.v1.PolicyService/GetPolicy`); `None` for a
/// method without one, which is refused.
pub fn rule(path: &str) -> Option<Access> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    RULES
        .iter()
        .find(|(s, methods, _)| *s == service && methods.contains(&method))
        .map(|(_, _, access)| *access)
}

/// The full names (`corsair.v1.PolicyService/UpdatePolicy`) of every method the audit log
/// can record: every method that takes a credential.
pub fn audited_methods() -> impl Iterator<Item = String> {
    RULES
        .iter()
        .filter(|(_, _, access)| *access != Access::Public)
        .flat_map(|(service, methods, _)| methods.iter().map(move |m| format!("{service}/{m}")))
}

/// The authenticated caller of one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Recorded as the actor: the token's name, or the configured identity without auth.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The token's id (`None` without authentication).
    pub token_id: Option<String>,
    /// For a sidecar, the services it may stream.
    pub services: Vec<String>,
}

/// How callers are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Bearer tokens managed by the control plane.
    Tokens,
    /// Nobody is authenticated: every caller is this identity, with every role (for
    /// loopback-only development and in-process tests).
    Disabled {
        /// The actor recorded for every call.
        identity: String,
    },
}

/// A new random token.
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("corsair_{}", hex::encode(bytes)))
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A token's public id: the first 16 hex digits of its hash.
pub fn token_id(hash: &[u8]) -> String {
    hex::encode(&hash[..8])
}

/// Why a credential was not accepted (`reason`, such as `TOKEN_REVOKED`), without
/// repeating it.
fn unauthenticated(reason: &'static str, why: &str) -> WriteError {
    WriteError::Unauthenticated {
        reason,
        message: format!("{why}; present a token as `authorization: Bearer <token>`"),
    }
}

/// Checks a presented token against the store; the principal it names.
pub async fn authenticate(shared: &Shared, token: &str) -> Result<Principal, WriteError> {
    let hash = token_hash(token);
    let id = token_id(&hash);
    let record = match shared.store.get_token(&id).await {
        Ok(record) => record,
        Err(StoreError::Unavailable) => {
            return Err(unauthenticated(
                "CREDENTIALS_UNAVAILABLE",
                "credentials cannot be checked right now",
            ));
        }
        Err(StoreError::Corrupt(_)) => {
            return Err(unauthenticated("TOKEN_INVALID", "invalid token"));
        }
    };
    let Some(record) = record else {
        return Err(unauthenticated("TOKEN_INVALID", "invalid token"));
    };
    if !bool::from(record.secret_hash.as_slice().ct_eq(&hash)) {
        return Err(unauthenticated("TOKEN_INVALID", "invalid token"));
    }
    valid(&record)?;
    Ok(Principal {
        name: record.name.clone(),
        role: Role::parse(&record.role)
            .ok_or_else(|| unauthenticated("TOKEN_INVALID", "invalid token"))?,
        token_id: Some(record.id.clone()),
        services: split_services(&record.services),
    })
}

/// Whether a stored token is still usable.
pub fn valid(record: &TokenRecord) -> Result<(), WriteError> {
    if record.revoked_at.is_some() {
        return Err(unauthenticated(
            "TOKEN_REVOKED",
            &format!("token {} is revoked", record.id),
        ));
    }
    if record.expires_at.is_some_and(|at| at <= now_micros()) {
        return Err(unauthenticated(
            "TOKEN_EXPIRED",
            &format!("token {} has expired", record.id),
        ));
    }
    Ok(())
}

/// Why a stream opened with token `id` may no longer continue (revoked, expired or gone);
/// `None` while it may, or when the store cannot tell right now (checked again later).
pub async fn stream_refusal(store: &dyn crate::store::Store, id: &str) -> Option<Status> {
    match store.get_token(id).await {
        Ok(Some(record)) => valid(&record).err().map(|e| write_error_status(&e)),
        Ok(None) => Some(write_error_status(&unauthenticated(
            "TOKEN_INVALID",
            "the stream's token no longer exists",
        ))),
        Err(_) => None,
    }
}

/// A stored comma-separated service list.
pub fn split_services(services: &str) -> Vec<String> {
    services
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, WriteError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| Some(t.trim()))
        .ok_or_else(|| {
            unauthenticated(
                "CREDENTIAL_MALFORMED",
                "the authorization header is not a bearer token",
            )
        })
}

type TlsInfo = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

/// The caller's address, over plain TCP or TLS.
fn peer(extensions: &http::Extensions) -> String {
    extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .or_else(|| extensions.get::<TlsInfo>().map(|i| i.get_ref()))
        .and_then(|i| i.remote_addr())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The sidecar a verified client certificate names (mTLS), if the caller presented one.
fn certificate_principal(
    extensions: &http::Extensions,
    trust_domain: Option<&str>,
) -> Option<Result<Principal, WriteError>> {
    let certs = extensions.get::<TlsInfo>()?.peer_certs()?;
    let leaf = certs.first()?;
    let Some(trust_domain) = trust_domain else {
        return Some(Err(unauthenticated(
            "CERTIFICATE_NOT_MAPPED",
            "client certificates are not mapped to identities here (no trust domain is set)",
        )));
    };
    Some(
        crate::tls::sidecar_service(leaf, trust_domain)
            .map(|service| Principal {
                name: format!("spiffe://{trust_domain}/corsair/sidecar/{service}"),
                role: Role::Sidecar,
                token_id: None,
                services: vec![service],
            })
            .map_err(|why| unauthenticated("CERTIFICATE_NOT_MAPPED", &why)),
    )
}

/// Decides one call: the principal, or the refusal and who was refused. A bearer token
/// wins over a client certificate.
async fn check(
    shared: &Shared,
    layer: &AuthLayer,
    path: &str,
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
) -> Result<Option<Principal>, (WriteError, String)> {
    let mode: &AuthMode = &layer.mode;
    let anonymous = || "anonymous".to_owned();
    let Some(access) = rule(path) else {
        return Err((
            WriteError::PermissionDenied {
                reason: "METHOD_NOT_SERVED",
                required_roles: Vec::new(),
                message: format!("{path} has no access rule"),
            },
            anonymous(),
        ));
    };
    if access == Access::Public {
        return Ok(None);
    }
    let principal = match mode {
        AuthMode::Disabled { identity } => {
            return Ok(Some(Principal {
                name: identity.clone(),
                role: Role::Admin,
                token_id: None,
                services: Vec::new(),
            }));
        }
        AuthMode::Tokens => match bearer(headers).map_err(|e| (e, anonymous()))? {
            Some(token) => authenticate(shared, token)
                .await
                .map_err(|e| (e, anonymous()))?,
            None => match certificate_principal(extensions, layer.trust_domain.as_deref()) {
                Some(principal) => principal.map_err(|e| (e, anonymous()))?,
                None => {
                    return Err((
                        unauthenticated("CREDENTIAL_MISSING", "no credential"),
                        anonymous(),
                    ));
                }
            },
        },
    };
    if !principal.role.allows(access) {
        let required_roles = access.roles();
        let error = WriteError::PermissionDenied {
            reason: "ROLE_REQUIRED",
            message: format!(
                "{} (role {}) may not call {path}: it needs the role {}",
                principal.name,
                principal.role.as_str(),
                required_roles.join(" or ")
            ),
            required_roles,
        };
        return Err((error, principal.name));
    }
    Ok(Some(principal))
}

/// How many refused calls a second are written to the audit log: refusals take the same
/// write lock as changes, so an anonymous flood must not be able to stall policy writes or
/// grow the log without bound. Beyond the budget they are counted and logged.
#[derive(Debug)]
pub struct RefusalBudget {
    tokens: f64,
    last: std::time::Instant,
    unaudited: u64,
    reported: std::time::Instant,
}

impl RefusalBudget {
    /// Refusals audited per second, sustained.
    pub const PER_SEC: f64 = 50.0;
    /// Refusals audited at once after a quiet period.
    pub const BURST: f64 = 200.0;

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * Self::PER_SEC)
            .min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.unaudited += 1;
        if now.duration_since(self.reported) >= std::time::Duration::from_secs(1) {
            tracing::warn!(
                unaudited = self.unaudited,
                "refused calls beyond the audit budget are not written to the audit log"
            );
            self.reported = now;
        }
        false
    }
}

impl Default for RefusalBudget {
    fn default() -> Self {
        let now = std::time::Instant::now();
        RefusalBudget {
            tokens: Self::BURST,
            last: now,
            unaudited: 0,
            reported: now - std::time::Duration::from_secs(1),
        }
    }
}

/// Records a refused call in the audit log, within the refusal budget (the store cuts its
/// text to bounded lengths).
pub(crate) async fn audit_refusal(
    shared: &Shared,
    ctx: WriteContext,
    error: WriteError,
) -> Result<(), StoreError> {
    if !shared.refusals.lock().expect("refusal budget").take() {
        return Ok(());
    }
    let written = shared
        .store
        .write(ctx, Box::new(move |_, _| Plan::Refuse(error)))
        .await?;
    shared.published(&written);
    Ok(())
}

/// How fast one identity may write (policy and token changes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteRate {
    /// Sustained writes per second.
    pub per_sec: f64,
    /// Writes allowed at once after a quiet period.
    pub burst: u32,
}

/// One token bucket per identity.
#[derive(Debug, Default)]
struct Buckets {
    by_identity: std::collections::HashMap<String, (f64, std::time::Instant)>,
}

impl Buckets {
    /// Takes one write from `identity`'s bucket; whether there was one.
    fn take(&mut self, identity: &str, rate: WriteRate) -> bool {
        let now = std::time::Instant::now();
        let burst = f64::from(rate.burst.max(1));
        if self.by_identity.len() > 10_000 {
            // Full buckets are indistinguishable from absent ones.
            self.by_identity.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate.per_sec < burst
            });
        }
        let (tokens, last) = self
            .by_identity
            .entry(identity.to_owned())
            .or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate.per_sec).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The tower layer that authenticates and authorizes every RPC.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Shared,
    mode: Arc<AuthMode>,
    trust_domain: Option<String>,
    write_rate: Option<WriteRate>,
    buckets: Arc<std::sync::Mutex<Buckets>>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// A layer checking calls against `shared`'s store, limiting each identity's writes to
    /// `write_rate` when set.
    pub fn new(shared: Shared, mode: AuthMode, write_rate: Option<WriteRate>) -> Self {
        AuthLayer {
            shared,
            mode: Arc::new(mode),
            trust_domain: None,
            write_rate,
            buckets: Arc::default(),
        }
    }

    /// Maps verified client certificates with a URI SAN
    /// `spiffe://<trust_domain>/corsair/sidecar/<service>` to sidecars of that service.
    pub fn with_trust_domain(mut self, trust_domain: Option<String>) -> Self {
        self.trust_domain = trust_domain;
        self
    }

    /// Whether `principal` may make one more write now.
    fn admit_write(&self, path: &str, principal: &Principal) -> bool {
        let Some(rate) = self.write_rate else {
            return true;
        };
        if !matches!(rule(path), Some(Access::Write | Access::Admin)) {
            return true;
        }
        let key = principal.token_id.as_deref().unwrap_or(&principal.name);
        self.buckets.lock().expect("buckets lock").take(key, rate)
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> fmt::Debug for Authorized<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized").finish_non_exhaustive()
    }
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            match check(
                &layer.shared,
                &layer,
                &path,
                request.headers(),
                request.extensions(),
            )
            .await
            {
                Ok(principal) => {
                    if let Some(principal) = principal {
                        if !layer.admit_write(&path, &principal) {
                            let rate = layer.write_rate.map_or(0.0, |r| r.per_sec);
                            return Ok(crate::status::status(
                                tonic::Code::ResourceExhausted,
                                "WRITE_RATE_EXCEEDED",
                                format!(
                                    "{} is writing faster than {rate} changes a second; retry later",
                                    principal.name
                                ),
                                [],
                            )
                            .into_http());
                        }
                        request.extensions_mut().insert(principal);
                    }
                    inner.call(request).await
                }
                Err((error, actor)) => {
                    let status: Status = write_error_status(&error);
                    tracing::info!(method = %path, actor, error = %error, "call refused");
                    let ctx = WriteContext {
                        actor,
                        method: path.trim_start_matches('/').to_owned(),
                        service: String::new(),
                        reason: String::new(),
                        request_id: crate::service::request_id(request.headers()),
                        peer: peer(request.extensions()),
                    };
                    if let Err(e) = audit_refusal(&layer.shared, ctx, error).await {
                        // Not audited, not served.
                        tracing::warn!(error = %e, "refusal not audited");
                        return Ok(crate::status::store_status(StoreError::Unavailable).into_http());
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_pass_only_their_access() {
        use Access::*;
        let table = [
            (Role::Viewer, [true, true, true, false, false, false, false]),
            (Role::Editor, [true, true, true, true, false, false, false]),
            (
                Role::Auditor,
                [true, true, false, false, true, false, false],
            ),
            (Role::Admin, [true, true, true, true, true, true, false]),
            (
                Role::Sidecar,
                [true, true, false, false, false, false, true],
            ),
        ];
        for (role, expected) in table {
            let got =
                [Public, Authenticated, Read, Write, Audit, Admin, Stream].map(|a| role.allows(a));
            assert_eq!(got, expected, "{role:?}");
        }
    }

    #[test]
    fn refusals_beyond_the_budget_are_not_audited() {
        let mut budget = RefusalBudget::default();
        let audited = (0..1000).filter(|_| budget.take()).count();
        // The burst, plus what refilled while counting.
        assert!((200..260).contains(&audited), "{audited}");
        assert!(budget.unaudited >= 740);
    }

    #[test]
    fn tokens_are_random_and_identified_by_their_hash() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("corsair_") && a.len() == 8 + 64);
        let hash = token_hash(&a);
        assert_eq!(token_id(&hash).len(), 16);
    }
}
