//! The connection to the control plane: one channel, a deadline on every call.

use std::future::Future;
use std::time::Duration;

use corsair_proto::v1::audit_service_client::AuditServiceClient;
use corsair_proto::v1::fleet_service_client::FleetServiceClient;
use corsair_proto::v1::origin_set_service_client::OriginSetServiceClient;
use corsair_proto::v1::policy_service_client::PolicyServiceClient;
use corsair_proto::v1::token_service_client::TokenServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::{CliError, chain};

/// The largest response read: above the control plane's largest page (`--max-page-bytes`
/// at most 32 MiB), so every page it sends can be read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A connected control-plane client.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    deadline: Duration,
    /// `Bearer <token>`, marked sensitive so that `Debug` never shows it.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to `addr` (`host:port` or `http://host:port`) within `deadline`; every call
    /// presents `token` when given.
    pub async fn connect(
        addr: &str,
        deadline: Duration,
        token: Option<&str>,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self, CliError> {
        let authorization = match token {
            None => None,
            Some(token) => {
                let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {token}").parse().map_err(|_| {
                        CliError::Input("the token has characters a header cannot carry".into())
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let fail = |why: String| CliError::Connect {
            addr: uri.clone(),
            why,
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| fail(chain(&e)))?
            .connect_timeout(deadline)
            .tcp_nodelay(true);
        let endpoint = match tls {
            None => endpoint,
            // Without https the channel would not use TLS, and the token would travel in
            // clear text.
            Some(_) if !uri.starts_with("https://") => {
                return Err(CliError::Input(format!(
                    "--ca-cert needs an https:// address, not {uri}"
                )));
            }
            Some(tls) => endpoint.tls_config(tls).map_err(|e| fail(chain(&e)))?,
        };
        let channel = match tokio::time::timeout(deadline, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(fail(chain(&e))),
            Err(_) => {
                return Err(fail(format!(
                    "no connection within {}",
                    humantime::format_duration(deadline)
                )));
            }
        };
        Ok(Client {
            channel,
            deadline,
            authorization,
        })
    }

    /// The policy service.
    pub fn policies(&self) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The origin set service.
    pub fn origin_sets(&self) -> OriginSetServiceClient<Channel> {
        OriginSetServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The audit service.
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The fleet service.
    pub fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The token service.
    pub fn tokens(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// A request carrying the credential and the deadline (so the server gives up when the
    /// caller does).
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = self.streaming(message);
        request.set_timeout(self.deadline);
        request
    }

    /// A request carrying the credential, without a deadline (for streams that stay open).
    pub fn streaming<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// Awaits one call within the deadline; `context` names what it was for in errors.
    pub async fn call<T>(
        &self,
        context: &str,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.deadline, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(CliError::Deadline {
                    context: context.to_owned(),
                    deadline: self.deadline,
                })
            }
            Ok(Err(status)) => Err(CliError::status(context, status)),
            Err(_) => Err(CliError::Deadline {
                context: context.to_owned(),
                deadline: self.deadline,
            }),
        }
    }
}
