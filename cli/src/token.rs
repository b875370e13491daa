//! `corsairctl token …`: create, list and revoke access tokens (the `admin` role).

use std::time::Duration;

use corsair_proto::v1;
use serde::Serialize;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format, Table};

/// A token as printed, with the API's field names (`Token`); never its secret, except once
/// at creation.
#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    name: String,
    role: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<String>,
    create_time: String,
    created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoke_time: Option<String>,
}

fn view(t: &v1::Token) -> TokenView {
    TokenView {
        id: t.name.strip_prefix("tokens/").unwrap_or(&t.name).to_owned(),
        name: t.display_name.clone(),
        role: t.role.clone(),
        services: t.services.clone(),
        create_time: output::timestamp_or_dash(t.create_time.as_ref()),
        created_by: t.created_by.clone(),
        expire_time: t.expire_time.as_ref().map(output::timestamp),
        revoke_time: t.revoke_time.as_ref().map(output::timestamp),
    }
}

/// What `token create` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// A name for people; the actor of its calls.
    pub name: String,
    /// The role.
    pub role: String,
    /// For a sidecar token, its services.
    pub services: Vec<String>,
    /// Lifetime; `None` for no expiry.
    pub expires_in: Option<Duration>,
    /// Why.
    pub reason: String,
}

/// What `token create -o json|yaml` prints: the API's `CreateTokenResponse`.
#[derive(Debug, Serialize)]
struct Created {
    secret: String,
    token: TokenView,
}

/// `token create`: prints the new token (table format: the token alone on stdout, its
/// description on stderr, so `$(corsairctl token create …)` captures just the token).
pub async fn create(client: &Client, args: &CreateArgs, format: Format) -> Result<(), CliError> {
    let resp = client
        .call(
            "creating a token",
            client
                .tokens()
                .create_token(client.request(v1::CreateTokenRequest {
                    display_name: args.name.clone(),
                    role: args.role.clone(),
                    services: args.services.clone(),
                    ttl_seconds: args.expires_in.map_or(0, |d| d.as_secs().max(1)),
                    reason: args.reason.clone(),
                })),
        )
        .await?;
    let token = resp
        .token
        .as_ref()
        .map(view)
        .ok_or_else(|| CliError::Protocol("no token description".into()))?;
    if format == Format::Table {
        eprintln!(
            "created token {} ({}, role {}{}); it is shown only now:",
            token.id,
            token.name,
            token.role,
            token
                .expire_time
                .as_ref()
                .map_or_else(String::new, |e| format!(", expires {e}"))
        );
        return output::print(&format!("{}\n", resp.secret));
    }
    let created = Created {
        secret: resp.secret,
        token,
    };
    output::emit(format, &created, Table::default)
}

/// `token list`.
pub async fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .call(
                "listing tokens",
                client
                    .tokens()
                    .list_tokens(client.request(v1::ListTokensRequest {
                        page_size: 0,
                        page_token,
                    })),
            )
            .await?;
        tokens.extend(page.tokens);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let views: Vec<TokenView> = tokens.iter().map(view).collect();
    output::emit(format, &views, || {
        let mut t = Table::new(&[
            "ID", "NAME", "ROLE", "SERVICES", "CREATED", "BY", "EXPIRES", "REVOKED",
        ]);
        for v in &views {
            t.row(vec![
                v.id.clone(),
                v.name.clone(),
                v.role.clone(),
                output::list(&v.services, 40),
                v.create_time.clone(),
                v.created_by.clone(),
                v.expire_time.clone().unwrap_or_else(|| "never".into()),
                v.revoke_time.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        t
    })
}

/// `token revoke ID`.
pub async fn revoke(
    client: &Client,
    id: &str,
    reason: &str,
    format: Format,
) -> Result<(), CliError> {
    let token = client
        .call(
            &format!("token {id}"),
            client
                .tokens()
                .revoke_token(client.request(v1::RevokeTokenRequest {
                    name: corsair_proto::names::token_name(id),
                    reason: reason.to_owned(),
                })),
        )
        .await?;
    if format != Format::Table {
        return output::emit(format, &view(&token), Table::default);
    }
    output::print(&format!(
        "token {} ({}) revoked; calls and streams using it are refused from now on\n",
        token.name, token.display_name
    ))
}
