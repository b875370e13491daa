//! `corsair.v1.TokenService`: creating, listing and revoking access tokens. Every create and
//! revoke is one store write with its audit event; the token itself is returned once and
//! never stored, logged or audited.

use corsair_proto::v1;
use corsair_proto::v1::token_service_server::TokenService;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use corsair_proto::names::{parse_token_name, token_name};
use tonic::Code;

use crate::auth::{Role, generate_token, split_services, token_hash, token_id};
use crate::convert::{name_arg, timestamp};
use crate::service::Shared;
use crate::status::{bad_request, page_size, status, store_status, write_error_status};
use crate::store::{Plan, ResourceKind, TokenRecord, WriteError, now_micros};

const SERVICE: &str = "corsair.v1.TokenService";

/// Actors the control plane records itself; no token may be named like them.
const RESERVED_NAMES: [&str; 4] = [
    "anonymous",
    "bootstrap-admin",
    "corsair-control-plane",
    "local",
];

/// The longest lifetime a token may be given: ten years.
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// The token service.
#[derive(Debug, Clone)]
pub struct Tokens {
    shared: Shared,
    revoked: watch::Sender<u64>,
}

impl Tokens {
    /// A token service over `shared`; `revoked` is raised after every revocation, so open
    /// streams re-check their token at once.
    pub fn new(shared: Shared, revoked: watch::Sender<u64>) -> Self {
        Tokens { shared, revoked }
    }
}

/// The wire form of a stored token.
pub fn token_to_proto(t: &TokenRecord) -> v1::Token {
    v1::Token {
        name: token_name(&t.id),
        display_name: t.name.clone(),
        role: t.role.clone(),
        services: split_services(&t.services),
        create_time: Some(timestamp(t.created_at)),
        created_by: t.created_by.clone(),
        expire_time: t.expires_at.map(timestamp),
        revoke_time: t.revoked_at.map(timestamp),
    }
}

/// A new token record for `secret` (its time is set by the store write).
pub fn new_record(
    secret: &str,
    name: &str,
    role: Role,
    services: &[String],
    created_by: &str,
    expires_at: Option<i64>,
) -> TokenRecord {
    let hash = token_hash(secret);
    TokenRecord {
        id: token_id(&hash),
        name: name.to_owned(),
        role: role.as_str().to_owned(),
        services: services.join(","),
        secret_hash: hash,
        created_at: 0,
        created_by: created_by.to_owned(),
        expires_at,
        revoked_at: None,
    }
}

#[tonic::async_trait]
impl TokenService for Tokens {
    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let req = request.get_ref();
        super::check_reason(&req.reason).map_err(|e| write_error_status(&e))?;
        // The name is the actor of the token's calls: a plain label, and never one that
        // passes for another actor.
        let display_name = &req.display_name;
        let plain = display_name.len() <= 64
            && display_name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && display_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if !plain {
            return Err(bad_request(
                "display_name",
                "required: 1 to 64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit",
            ));
        }
        if RESERVED_NAMES.contains(&display_name.as_str()) {
            return Err(bad_request(
                "display_name",
                format!("{display_name:?} is reserved"),
            ));
        }
        let existing = self
            .shared
            .store
            .list_tokens()
            .await
            .map_err(store_status)?;
        // The display name is the actor the audit log records, and the log keeps every
        // event: a name, once given, stays with its token, revoked or not.
        if let Some(taken) = existing.iter().find(|t| t.name == *display_name) {
            let state = if taken.revoked_at.is_some() {
                "a revoked token"
            } else {
                "a token"
            };
            return Err(write_error_status(&WriteError::AlreadyExists {
                kind: ResourceKind::Token,
                name: token_name(&taken.id),
                message: format!(
                    "{state} ({}) is named {display_name:?}, and the audit log names its calls so; choose another name",
                    token_name(&taken.id)
                ),
            }));
        }
        let role = Role::parse(&req.role).ok_or_else(|| {
            bad_request(
                "role",
                format!(
                    "{:?} is not a role: viewer, editor, auditor, admin or sidecar",
                    req.role
                ),
            )
        })?;
        if role == Role::Sidecar && req.services.is_empty() {
            return Err(bad_request(
                "services",
                "a sidecar token names the services it may stream",
            ));
        }
        if role != Role::Sidecar && !req.services.is_empty() {
            return Err(bad_request(
                "services",
                "only sidecar tokens are scoped to services",
            ));
        }
        if let Some(bad) = req
            .services
            .iter()
            .find(|s| s.is_empty() || s.contains(',') || s.len() > 63)
        {
            return Err(bad_request(
                "services",
                format!("{bad:?} is not a service name"),
            ));
        }
        if req.ttl_seconds > MAX_TTL_SECONDS {
            return Err(bad_request(
                "ttl_seconds",
                format!(
                    "{} seconds; a token lives at most {MAX_TTL_SECONDS} seconds (10 years), or 0 for no expiry",
                    req.ttl_seconds
                ),
            ));
        }
        let expires_at = match req.ttl_seconds {
            0 => None,
            secs => Some(now_micros() + secs as i64 * 1_000_000),
        };
        let secret = generate_token().map_err(|_| {
            status(
                Code::Unavailable,
                "RANDOMNESS_UNAVAILABLE",
                "the system has no randomness to make a token from",
                [],
            )
        })?;
        let ctx = self
            .shared
            .context(&request, &format!("{SERVICE}/CreateToken"), "", &req.reason);
        let record = new_record(
            &secret,
            display_name,
            role,
            &req.services,
            &ctx.actor,
            expires_at,
        );
        let id = record.id.clone();
        let written = self
            .shared
            .store
            .write(
                ctx,
                Box::new(move |_, _| Plan::PutToken {
                    token: record,
                    only_if_first: false,
                }),
            )
            .await
            .map_err(store_status)?;
        self.shared.published(&written);
        if let Err(e) = &written.result {
            return Err(write_error_status(e));
        }
        let stored = self
            .shared
            .store
            .get_token(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| status(Code::Internal, "TOKEN_NOT_STORED", "token not stored", []))?;
        tracing::info!(id, name = %stored.name, role = %stored.role, "token created");
        Ok(Response::new(v1::CreateTokenResponse {
            secret,
            token: Some(token_to_proto(&stored)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let page_tokens = &self.shared.page_tokens;
        let after = page_tokens
            .decode(&req.page_token, "tokens", "")?
            .map(|position| {
                position
                    .split_once(':')
                    .and_then(|(time, id)| Some((time.parse::<i64>().ok()?, id.to_owned())))
                    .ok_or_else(|| bad_request("page_token", "not a page token of this listing"))
            })
            .transpose()?;
        let store = &self.shared.store;
        let page = super::paging::read(
            limit,
            self.shared.pages.bytes,
            after,
            |after: Option<(i64, String)>, n| async move {
                store
                    .list_tokens_page(after.as_ref().map(|(time, id)| (*time, id.as_str())), n)
                    .await
            },
            token_to_proto,
            |t| (t.created_at, t.id.clone()),
        )
        .await
        .map_err(store_status)?;
        let next = page.next.map(|(time, id)| format!("{time}:{id}"));
        Ok(Response::new(v1::ListTokensResponse {
            tokens: page.items,
            next_page_token: page_tokens.next("tokens", "", next.as_deref()),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::Token>, Status> {
        let req = request.get_ref();
        let id = name_arg("name", &req.name, parse_token_name)?.to_owned();
        super::check_reason(&req.reason).map_err(|e| write_error_status(&e))?;
        let ctx = self
            .shared
            .context(&request, &format!("{SERVICE}/RevokeToken"), "", &req.reason);
        let planned = id.clone();
        let written = self
            .shared
            .store
            .write(ctx, Box::new(move |_, _| Plan::RevokeToken(planned)))
            .await
            .map_err(store_status)?;
        self.shared.published(&written);
        if let Err(e) = &written.result {
            return Err(write_error_status(e));
        }
        self.revoked.send_modify(|n| *n += 1);
        let stored = self
            .shared
            .store
            .get_token(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| status(Code::Internal, "TOKEN_VANISHED", "token vanished", []))?;
        tracing::info!(id = %stored.id, "token revoked");
        Ok(Response::new(token_to_proto(&stored)))
    }
}

/// On first start (no token stored yet), creates the admin token: `given` (for example from
/// `CORSAIR_BOOTSTRAP_TOKEN`) or a new random one. Returns the new random token, which the
/// caller shows once; `None` when tokens existed already or `given` was used.
pub async fn bootstrap(
    store: &std::sync::Arc<dyn crate::store::Store>,
    given: Option<&str>,
) -> Result<Option<String>, crate::store::StoreError> {
    if !store.list_tokens().await?.is_empty() {
        return Ok(None);
    }
    let generated = match given {
        Some(_) => None,
        None => Some(generate_token().map_err(|_| crate::store::StoreError::Unavailable)?),
    };
    let secret = given.or(generated.as_deref()).unwrap_or_default();
    let record = new_record(
        secret,
        "bootstrap-admin",
        Role::Admin,
        &[],
        "corsair-control-plane",
        None,
    );
    let ctx = crate::store::WriteContext {
        actor: "corsair-control-plane".into(),
        method: format!("{SERVICE}/CreateToken"),
        service: String::new(),
        reason: "first start: the initial admin token".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        peer: String::new(),
    };
    let written = store
        .write(
            ctx,
            Box::new(move |_, _| Plan::PutToken {
                token: record,
                only_if_first: true,
            }),
        )
        .await?;
    // Another replica may have created the first token meanwhile.
    Ok(written.result.is_ok().then_some(generated).flatten())
}
