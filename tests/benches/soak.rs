//! Soak: the real control plane (SQLite) and two sidecars under steady client traffic, with a
//! policy change every second, for `CORSAIR_SOAK_SECONDS` (default 600). Every
//! `CORSAIR_SOAK_REPORT_SECONDS` (default 60) it prints requests, errors, p99 latency and each
//! process's RSS and open file descriptors; at the end, totals and RSS growth.
//!
//! The measured window starts after `CORSAIR_SOAK_WARMUP_SECONDS` (default 60) of the same
//! traffic and policy changes, so that growth means memory still rising once every code path
//! has run and every pool, cache and buffer has been filled once; growth from launch is
//! printed too, with the anonymous (heap and stacks) and file-backed (the mapped binary) parts
//! of RSS shown apart.
//!
//! Run: `cargo bench -p corsair-e2e --bench soak` (builds the release binaries if missing).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{Backend, Load, Plane, Served, Sidecar, rss_and_fds, rss_parts, write_policy};

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn p99(mut latencies: Vec<u32>) -> u32 {
    if latencies.is_empty() {
        return 0;
    }
    latencies.sort_unstable();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let seconds = env_secs("CORSAIR_SOAK_SECONDS", 600);
    let every = env_secs("CORSAIR_SOAK_REPORT_SECONDS", 60).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let plane = Plane::start(Backend::Sqlite, dir.path(), &[]).await.unwrap();
        let Served {
            grpc,
            upstream: _upstream,
            sidecars,
            ..
        } = plane.serve(0, 2, dir.path(), &[]).await;
        let mut pids = vec![(
            "control plane".to_owned(),
            plane.replica(0).process.child.id(),
        )];
        pids.extend(
            sidecars
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("sidecar {i}"), s.process.child.id())),
        );
        let launch: Vec<(u64, u64)> = pids.iter().map(|(_, pid)| rss_parts(*pid)).collect();
        let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
        load.wait_for(1000, "before the warm-up");
        let warmup = env_secs("CORSAIR_SOAK_WARMUP_SECONDS", 60);
        let mut n = 1;
        let warming = Instant::now();
        while warming.elapsed() < Duration::from_secs(warmup) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n += 1;
            load.written.store(n as i64, Ordering::SeqCst);
            write_policy(&grpc, n).await;
        }
        load.take_latencies();
        let start_parts: Vec<(u64, u64)> = pids.iter().map(|(_, pid)| rss_parts(*pid)).collect();
        let start_rss: Vec<(u64, usize)> = pids.iter().map(|(_, pid)| rss_and_fds(*pid)).collect();
        println!(
            "soak: {seconds} s after {warmup} s of warm-up, a policy change every second; at start: {}",
            pids.iter()
                .zip(&start_rss)
                .map(|((name, _), (rss, fds))| format!("{name} {rss} KiB RSS, {fds} fds"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        println!(
            "{:>6}  {:>10}  {:>6}  {:>8}  RSS KiB / fds",
            "t (s)", "requests", "errors", "p99 (µs)"
        );
        let started = Instant::now();
        let changes_before = n;
        let mut next_report = every;
        let mut served_before = load.served.load(Ordering::Relaxed);
        let mut all_p99 = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n += 1;
            load.written.store(n as i64, Ordering::SeqCst);
            write_policy(&grpc, n).await;
            let elapsed = started.elapsed().as_secs();
            if elapsed >= next_report {
                next_report += every;
                let served = load.served.load(Ordering::Relaxed);
                let errors = load.failures.lock().unwrap().len();
                let p = p99(load.take_latencies());
                all_p99.push(p);
                let procs = pids
                    .iter()
                    .map(|(_, pid)| {
                        let (rss, fds) = rss_and_fds(*pid);
                        format!("{rss}/{fds}")
                    })
                    .collect::<Vec<_>>()
                    .join("  ");
                println!(
                    "{elapsed:>6}  {:>10}  {errors:>6}  {p:>8}  {procs}",
                    served - served_before
                );
                served_before = served;
            }
        }
        let end_rss: Vec<(u64, usize)> = pids.iter().map(|(_, pid)| rss_and_fds(*pid)).collect();
        let end_parts: Vec<(u64, u64)> = pids.iter().map(|(_, pid)| rss_parts(*pid)).collect();
        let (served, failures) = load.stop();
        println!(
            "soak done: {served} requests (warm-up included), {} errors, {} policy changes in the window; p99 per interval {:?} µs",
            failures.len(),
            n - changes_before,
            all_p99
        );
        let percent = |from: u64, to: u64| (to as f64 - from as f64) / from.max(1) as f64 * 100.0;
        for (i, (name, _)) in pids.iter().enumerate() {
            let ((rss0, fds0), (rss1, fds1)) = (start_rss[i], end_rss[i]);
            let (launch_anon, launch_file) = launch[i];
            let ((anon0, file0), (anon1, file1)) = (start_parts[i], end_parts[i]);
            println!(
                "{name}: RSS {rss0} → {rss1} KiB ({:+.1}%) over the window, fds {fds0} → {fds1}; \
                 anonymous {launch_anon} → {anon0} → {anon1} KiB and file-backed {launch_file} → {file0} → {file1} KiB (launch → start → end); RSS {:+.1}% from launch",
                percent(rss0, rss1),
                percent(launch_anon + launch_file, rss1),
            );
        }
        if let Some(first) = failures.first() {
            println!("first error: {first}");
        }
        drop(sidecars);
        drop(plane);
    });
}
