//! `corsairctl fleet status`: every sidecar and how far it is in sync.

use clap::ValueEnum;
use corsair_proto::v1;
use serde::Serialize;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format, Table};
use crate::policy::enum_name;

/// A sync state to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Acknowledged the latest revision sent.
    Synced,
    /// A push is not acknowledged yet.
    Pending,
    /// Rejected the latest push.
    Nacked,
    /// Its stream is closed.
    Disconnected,
}

impl StateArg {
    fn proto(self) -> v1::SidecarState {
        match self {
            StateArg::Synced => v1::SidecarState::Synced,
            StateArg::Pending => v1::SidecarState::Pending,
            StateArg::Nacked => v1::SidecarState::Nacked,
            StateArg::Disconnected => v1::SidecarState::Disconnected,
        }
    }
}

/// A sidecar as printed, with the API's field names (`Sidecar`; its times as `connect_time`,
/// `last_seen_time` and `disconnect_time`).
#[derive(Debug, Serialize)]
struct SidecarView {
    sidecar_id: String,
    services: Vec<String>,
    state: String,
    last_sent_revision: i64,
    last_acked_revision: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    nack_error: String,
    version: String,
    host: String,
    control_plane: String,
    connect_time: String,
    last_seen_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    disconnect_time: Option<String>,
    #[serde(skip)]
    last_seen_age: String,
}

/// `fleet status [--service S] [--state STATE]`.
pub async fn status(
    client: &Client,
    service: &str,
    state: Option<StateArg>,
    format: Format,
) -> Result<(), CliError> {
    let mut sidecars = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .call(
                "listing sidecars",
                client
                    .fleet()
                    .list_sidecars(client.request(v1::ListSidecarsRequest {
                        page_size: 500,
                        page_token,
                        service: service.to_owned(),
                        state: state.map_or(0, |s| s.proto() as i32),
                    })),
            )
            .await?;
        sidecars.extend(page.sidecars);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let views: Vec<SidecarView> = sidecars
        .iter()
        .map(|s| SidecarView {
            sidecar_id: s.sidecar_id.clone(),
            services: s.services.clone(),
            state: enum_name(
                v1::SidecarState::try_from(s.state).map(|s| s.as_str_name()),
                "SIDECAR_STATE_",
            ),
            last_sent_revision: s.last_sent_revision,
            last_acked_revision: s.last_acked_revision,
            nack_error: s.nack_error.clone(),
            version: s.version.clone(),
            host: s.host.clone(),
            control_plane: s.control_plane.clone(),
            connect_time: output::timestamp_or_dash(s.connect_time.as_ref()),
            last_seen_time: output::timestamp_or_dash(s.last_seen_time.as_ref()),
            disconnect_time: s.disconnect_time.as_ref().map(output::timestamp),
            last_seen_age: output::age(s.last_seen_time.as_ref()),
        })
        .collect();
    output::emit(format, &views, || {
        let errors = views.iter().any(|v| !v.nack_error.is_empty());
        let mut header = vec![
            "SIDECAR",
            "SERVICES",
            "STATE",
            "SENT",
            "ACKED",
            "LAST SEEN",
            "CONTROL PLANE",
            "VERSION",
        ];
        if errors {
            header.push("ERROR");
        }
        let mut t = Table::new(&header);
        for v in &views {
            let mut cells = vec![
                v.sidecar_id.clone(),
                if v.services.is_empty() {
                    "*".to_owned()
                } else {
                    output::list(&v.services, 40)
                },
                v.state.clone(),
                v.last_sent_revision.to_string(),
                v.last_acked_revision.to_string(),
                v.last_seen_age.clone(),
                v.control_plane.clone(),
                v.version.clone(),
            ];
            if errors {
                cells.push(v.nack_error.clone());
            }
            t.row(cells);
        }
        t
    })
}
