//! `corsairctl`: the command line over the `corsair_cli` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use corsair_cli::client::Client;
use corsair_cli::error::CliError;
use corsair_cli::output::{self, Format};
use corsair_cli::policy::{self, DiffOutcome, WriteOptions};
use corsair_cli::{audit, fleet, origin_set, quickstart, token};

/// corsairctl: manage Corsair's CORS policies, origin sets, audit log and sidecar fleet.
#[derive(Debug, Parser)]
#[command(name = "corsairctl", version, propagate_version = true)]
struct Cli {
    /// The control plane's gRPC address.
    #[arg(
        long,
        global = true,
        env = "CORSAIR_ADDR",
        default_value = "http://127.0.0.1:7400"
    )]
    addr: String,
    /// Deadline for connecting and for every call (e.g. 10s, 1m).
    #[arg(long, global = true, env = "CORSAIR_TIMEOUT", default_value = "10s", value_parser = parse_deadline)]
    timeout: Duration,
    /// Token to present (from `corsairctl token create`, or the control plane's first start);
    /// prefer the environment variable, which `ps` does not show.
    #[arg(long, global = true, env = "CORSAIR_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    token: Option<Secret>,
    /// PEM CA bundle to verify the control plane against (TLS; use an https:// --addr).
    #[arg(long, global = true, env = "CORSAIR_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate (mTLS; with --client-key and --ca-cert).
    #[arg(long, global = true, env = "CORSAIR_CLIENT_CERT", requires_all = ["client_key", "ca_cert"])]
    client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(
        long,
        global = true,
        env = "CORSAIR_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// A credential: never printed, not even by `Debug`.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    if text.is_empty() {
        return Err("empty".into());
    }
    Ok(Secret(text.to_owned()))
}

fn parse_deadline(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".into()),
        Err(e) => Err(format!("{e} (examples: 10s, 1m, 500ms)")),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read, write, compare and explain policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read, roll back and delete origin sets, the origin lists policies share (`policy
    /// apply` writes them).
    #[command(subcommand)]
    OriginSet(OriginSetCommand),
    /// Query, follow and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The sidecars and how far each is in sync.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Create, list and revoke access tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the whole system locally: control plane (SQLite), a demo service, a sidecar in
    /// front of it and an example policy. Ctrl-C stops everything.
    Quickstart(quickstart::QuickstartArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: Shell,
    },
}

#[derive(Debug, Args)]
struct Write {
    /// Why: recorded in the history and the audit log.
    #[arg(long, default_value = "")]
    reason: String,
    /// Accept a risk finding by its code (repeatable), e.g. --acknowledge WILDCARD_ORIGIN.
    #[arg(long = "acknowledge", value_name = "CODE")]
    acknowledge: Vec<String>,
    /// Have the server check the change and report findings, without storing anything.
    #[arg(long)]
    dry_run: bool,
}

impl Write {
    fn options(&self) -> WriteOptions {
        WriteOptions {
            reason: self.reason.clone(),
            acknowledge: self.acknowledge.clone(),
            dry_run: self.dry_run,
        }
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Show one service's policy (`-o yaml` prints a file `apply` accepts back).
    Get {
        /// The service.
        service: String,
        /// Also every origin in force, its origin sets resolved, and where each came from.
        #[arg(long)]
        effective: bool,
    },
    /// List policies.
    List {
        /// Only services whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Create or update the policies and origin sets (`kind: OriginSet`) in files (YAML or
    /// JSON, several per file), changing only what differs, compare-and-set on each etag;
    /// sets first, so that policies can use them.
    Apply {
        /// A file, a directory of .yaml/.yml/.json files, or - for standard input
        /// (repeatable).
        #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        write: Write,
    },
    /// Show what `apply` would change, as a unified diff (whatever -o says), and for an origin
    /// set the policies whose effective policy it changes. Exit status: 0 no change, 1
    /// changes, 2 errors.
    Diff {
        /// As for apply.
        #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
        files: Vec<PathBuf>,
        /// Risk codes apply would acknowledge (repeatable).
        #[arg(long = "acknowledge", value_name = "CODE")]
        acknowledge: Vec<String>,
    },
    /// Delete a service's policy; its sidecars stop applying CORS for it.
    Delete {
        /// The service.
        service: String,
        /// Delete only if the policy still has this etag.
        #[arg(long)]
        etag: Option<String>,
        /// Why: recorded in the policy's history and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Have the server check the deletion, without deleting anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// A policy's revisions, newest first, each with what it changed.
    History {
        /// The service.
        service: String,
        /// At most this many revisions.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Restore an earlier revision's policy as a new revision.
    Rollback {
        /// The service.
        service: String,
        /// The revision to restore (see `policy history`).
        #[arg(long = "to", value_name = "REVISION")]
        revision: i64,
        /// Roll back only if the policy still has this etag.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        write: Write,
    },
    /// Explain how a sidecar answers one request: the decision, the reason, the headers.
    Explain {
        /// A service whose stored policy is used.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        service: Option<String>,
        /// A policy file to evaluate instead, without storing it.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        file: Option<PathBuf>,
        /// The Origin header.
        #[arg(long)]
        origin: String,
        /// The request method (for a preflight, the one it asks for).
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header name the page sets (repeatable).
        #[arg(long = "header", value_name = "NAME")]
        headers: Vec<String>,
        /// The request carries credentials (cookies, HTTP authentication).
        #[arg(long)]
        credentials: bool,
        /// Explain the preflight even when a browser would not send one.
        #[arg(long)]
        preflight: bool,
        /// The preflight asks for private network access.
        #[arg(long)]
        private_network: bool,
        /// The request's path, which picks the policy's route (a query is ignored).
        #[arg(long, default_value = "")]
        path: String,
    },
}

#[derive(Debug, Subcommand)]
enum OriginSetCommand {
    /// Show one origin set and the policies that use it (`-o yaml` prints a file
    /// `policy apply` accepts back).
    Get {
        /// The set.
        name: String,
    },
    /// List origin sets.
    List,
    /// A set's revisions, newest first, each with what it changed and the services whose
    /// effective policy changed with it.
    History {
        /// The set.
        name: String,
        /// At most this many revisions.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Restore an earlier revision's entries as a new revision (a deleted set is recreated).
    Rollback {
        /// The set.
        name: String,
        /// The revision to restore (see `origin-set history`).
        #[arg(long = "to", value_name = "REVISION")]
        revision: i64,
        /// Roll back only if the set still has this etag.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        write: Write,
    },
    /// Delete an origin set; refused while a policy references it.
    Delete {
        /// The set.
        name: String,
        /// Delete only if the set still has this etag.
        #[arg(long)]
        etag: Option<String>,
        /// Why: recorded in the set's history and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Have the server check the deletion, without deleting anything.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Audit events, newest first; with --follow, oldest first and then new ones live.
    List {
        /// Only events about this service.
        #[arg(long, default_value = "")]
        service: String,
        /// Only events by this actor.
        #[arg(long, default_value = "")]
        actor: String,
        /// Only this method, e.g. UpdatePolicy.
        #[arg(long, default_value = "")]
        method: String,
        /// Only events with this outcome.
        #[arg(long, value_enum)]
        outcome: Option<audit::OutcomeArg>,
        /// Only events since: a duration ago (24h, 15m) or a time (2026-11-24T09:00:00Z).
        #[arg(long, value_parser = audit::parse_time)]
        since: Option<SystemTime>,
        /// Only events before: a duration ago or a time.
        #[arg(long, value_parser = audit::parse_time, conflicts_with = "follow")]
        until: Option<SystemTime>,
        /// At most this many events (before following).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// After the listing, print new events as they are recorded, until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
    /// Recompute the audit log's hash chain; exit status 1 if it does not verify.
    Verify {
        /// First event to verify (default: the first).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last event to verify (default: the last).
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once, alone on standard output.
    Create {
        /// A name for people; recorded as the actor of its calls.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_parser = ["viewer", "editor", "auditor", "admin", "sidecar"])]
        role: String,
        /// For a sidecar token: a service whose policy it may stream (repeatable).
        #[arg(long = "service", value_name = "SERVICE")]
        services: Vec<String>,
        /// Lifetime, e.g. 90d, 12h (default: no expiry).
        #[arg(long, value_parser = parse_deadline)]
        expires_in: Option<Duration>,
        /// Why; recorded in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List tokens, revoked and expired ones included (never their secrets).
    List,
    /// Revoke a token at once, including streams it holds open.
    Revoke {
        /// The token's id (see `token list`).
        id: String,
        /// Why; recorded in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// One row per sidecar: its state and the revisions sent to and acknowledged by it.
    Status {
        /// Only sidecars that receive this service's policy.
        #[arg(long, default_value = "")]
        service: String,
        /// Only sidecars in this state.
        #[arg(long, value_enum)]
        state: Option<fleet::StateArg>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    // `policy diff` uses 1 for "changes", so its errors are 2.
    let error_code = match cli.command {
        Command::Policy(PolicyCommand::Diff { .. }) => 2,
        _ => 1,
    };
    match dispatch(cli).await {
        Ok(code) => code,
        Err(CliError::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(error_code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let format = cli.output;
    let token = cli.token.as_ref().map(|Secret(t)| t.as_str());
    let tls = match &cli.ca_cert {
        None => None,
        Some(ca) => {
            let identity = cli.client_cert.as_deref().zip(cli.client_key.as_deref());
            Some(corsair_proto::client_tls(ca, identity).map_err(CliError::Input)?)
        }
    };
    let connect = || Client::connect(&cli.addr, cli.timeout, token, tls.clone());
    let ok = |success: bool| {
        if success {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    match cli.command {
        Command::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "corsairctl", &mut out);
            output::print(&String::from_utf8_lossy(&out))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quickstart(ref args) => quickstart::run(args, cli.timeout).await.map(ok),
        Command::Policy(ref command) => {
            let client = connect().await?;
            match command {
                PolicyCommand::Get { service, effective } => {
                    policy::get(&client, service, *effective, format).await
                }
                PolicyCommand::List { prefix } => policy::list(&client, prefix, format).await,
                PolicyCommand::Apply { files, write } => {
                    return policy::apply(&client, files, &write.options(), format)
                        .await
                        .map(ok);
                }
                PolicyCommand::Diff { files, acknowledge } => {
                    return Ok(match policy::diff(&client, files, acknowledge).await? {
                        DiffOutcome::Same => ExitCode::SUCCESS,
                        DiffOutcome::Changes => ExitCode::from(1),
                        DiffOutcome::Failed => ExitCode::from(2),
                    });
                }
                PolicyCommand::Delete {
                    service,
                    etag,
                    reason,
                    dry_run,
                } => {
                    // A deletion has no risks to acknowledge.
                    let options = WriteOptions {
                        reason: reason.clone(),
                        acknowledge: Vec::new(),
                        dry_run: *dry_run,
                    };
                    policy::delete(&client, service, etag.clone(), &options, format).await
                }
                PolicyCommand::History { service, limit } => {
                    policy::history(&client, service, *limit, format).await
                }
                PolicyCommand::Rollback {
                    service,
                    revision,
                    etag,
                    write,
                } => {
                    policy::rollback(
                        &client,
                        service,
                        *revision,
                        etag.clone(),
                        &write.options(),
                        format,
                    )
                    .await
                }
                PolicyCommand::Explain {
                    service,
                    file,
                    origin,
                    method,
                    headers,
                    credentials,
                    preflight,
                    private_network,
                    path,
                } => {
                    let args = policy::ExplainArgs {
                        service: service.clone(),
                        file: file.clone(),
                        origin: origin.clone(),
                        method: method.clone(),
                        headers: headers.clone(),
                        credentials: *credentials,
                        preflight: *preflight,
                        private_network: *private_network,
                        path: path.clone(),
                    };
                    policy::explain(&client, &args, format).await
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }
        Command::OriginSet(ref command) => {
            let client = connect().await?;
            match command {
                OriginSetCommand::Get { name } => origin_set::get(&client, name, format).await,
                OriginSetCommand::List => origin_set::list(&client, format).await,
                OriginSetCommand::History { name, limit } => {
                    origin_set::history(&client, name, *limit, format).await
                }
                OriginSetCommand::Rollback {
                    name,
                    revision,
                    etag,
                    write,
                } => {
                    origin_set::rollback(
                        &client,
                        name,
                        *revision,
                        etag.clone(),
                        &write.options(),
                        format,
                    )
                    .await
                }
                OriginSetCommand::Delete {
                    name,
                    etag,
                    reason,
                    dry_run,
                } => {
                    // A deletion has no risks to acknowledge.
                    let options = WriteOptions {
                        reason: reason.clone(),
                        acknowledge: Vec::new(),
                        dry_run: *dry_run,
                    };
                    origin_set::delete(&client, name, etag.clone(), &options, format).await
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Audit(ref command) => {
            let client = connect().await?;
            match command {
                AuditCommand::List {
                    service,
                    actor,
                    method,
                    outcome,
                    since,
                    until,
                    limit,
                    follow,
                } => {
                    let filters = audit::Filters {
                        service: service.clone(),
                        actor: actor.clone(),
                        method: method.clone(),
                        outcome: *outcome,
                        since: *since,
                        until: *until,
                    };
                    audit::list(&client, &filters, *limit, *follow, format)
                        .await
                        .map(|()| ExitCode::SUCCESS)
                }
                AuditCommand::Verify { from, to } => {
                    audit::verify(&client, *from, *to, format).await.map(ok)
                }
            }
        }
        Command::Token(ref command) => {
            let client = connect().await?;
            match command {
                TokenCommand::Create {
                    name,
                    role,
                    services,
                    expires_in,
                    reason,
                } => {
                    let args = token::CreateArgs {
                        name: name.clone(),
                        role: role.clone(),
                        services: services.clone(),
                        expires_in: *expires_in,
                        reason: reason.clone(),
                    };
                    token::create(&client, &args, format).await
                }
                TokenCommand::List => token::list(&client, format).await,
                TokenCommand::Revoke { id, reason } => {
                    token::revoke(&client, id, reason, format).await
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Fleet(FleetCommand::Status { ref service, state }) => {
            let client = connect().await?;
            fleet::status(&client, service, state, format)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
