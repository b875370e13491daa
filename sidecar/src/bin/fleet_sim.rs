//! `corsair-fleet-sim`: connects N simulated sidecars to a control plane and reports, for each
//! policy change, how long until all of them applied it. Stops on Ctrl-C.

use std::time::Duration;

use clap::Parser;
use corsair_sidecar::sim;
use corsair_sidecar::sync::{Backoff, SyncState};

/// Simulated sidecars for load tests.
#[derive(Debug, Parser)]
struct Args {
    /// The control plane's gRPC address.
    #[arg(
        long,
        env = "CORSAIR_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7400"
    )]
    control_plane: String,
    /// How many sidecars.
    #[arg(long, default_value_t = 1000)]
    sidecars: usize,
    /// The service every sidecar serves.
    #[arg(long, default_value = "shared")]
    service: String,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        ..Backoff::default()
    };
    let service = args.service.clone();
    let fleet = match sim::start(
        &args.control_plane,
        args.sidecars,
        move |_| vec![service.clone()],
        backoff,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("corsair-fleet-sim: {e}");
            std::process::exit(2);
        }
    };
    fleet.all_connected().await;
    println!(
        "{} sidecars connected to {}",
        args.sidecars, args.control_plane
    );
    let mut first = fleet.states[0].clone();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = first.changed() => {
                if changed.is_err() { break; }
                let SyncState::Connected { revision } = first.borrow_and_update().clone() else { continue };
                let started = tokio::time::Instant::now();
                let at = fleet.all_at(revision).await;
                let last = at.iter().max().copied().unwrap_or(started);
                println!("revision {revision}: all {} sidecars applied it within {:?} of the first", args.sidecars, last - started);
            }
        }
    }
    fleet.stop().await;
}
