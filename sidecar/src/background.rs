//! The sidecar's background work (following the control plane, writing the cache file,
//! watching a policy file) runs on a thread of its own, at a lower scheduling priority than
//! the proxy.
//!
//! A policy push costs the sidecar about 0.7 ms of CPU on the benchmark machine
//! (`BENCHMARKS.md`): receiving and decoding it, validating and compiling, the ACK, and most
//! of all the cache file's two `fsync`s, in the kernel. Run on the proxy's worker, the part
//! before the cache file (about a third) stalls every request in flight, and the rest
//! competes with the proxy for the cores. Here, at a lower priority, it takes what the proxy
//! leaves, and under full load a push applies a little later instead.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};

/// The thread's name; its blocking-pool threads (the cache file's writes) are named
/// `corsair-sync-io`.
pub const THREAD_NAME: &str = "corsair-sync";

/// The highest nice value Linux allows.
const LOWEST_PRIORITY: i32 = 19;

/// The background thread: where its work is spawned, and how it is stopped.
#[derive(Debug)]
pub struct Background {
    handle: Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Background {
    /// The handle to spawn the thread's work on (or to enter while creating what spawns tasks
    /// of its own, such as a lazy gRPC channel).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the thread and waits for it: its tasks are dropped, and its runtime waits for
    /// the blocking calls in progress, such as a cache-file write, to finish.
    pub fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Starts the background thread, `increment` nice steps below the calling thread's priority
/// (0: the same; clamped at 19). Linux keeps a nice value per thread; elsewhere, where it
/// would lower the whole process, the increment is not applied.
pub fn start(increment: u8) -> io::Result<Background> {
    let nice =
        (rustix::process::getpriority_process(None)? + i32::from(increment)).min(LOWEST_PRIORITY);
    let lower = move || {
        if !cfg!(target_os = "linux") {
            return;
        }
        // On Linux this lowers the calling thread only.
        if let Err(error) = rustix::process::setpriority_process(None, nice) {
            tracing::warn!(%error, nice, "background work keeps the proxy's priority");
        }
    };
    // The runtime is built and dropped on its own thread, never in the caller's.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            lower();
            let runtime = Builder::new_current_thread()
                .enable_all()
                .thread_name("corsair-sync-io")
                .on_thread_start(lower)
                .build();
            match runtime {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    // Until told to stop, or until nothing can tell it any more.
                    let _ = runtime.block_on(stopped);
                }
                Err(error) => {
                    let _ = tx.send(Err(error));
                }
            }
        })?;
    let handle = rx
        .recv()
        .map_err(|_| io::Error::other("the background thread ended before starting"))??;
    Ok(Background {
        handle,
        stop,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> i32 {
        rustix::process::getpriority_process(None).unwrap()
    }

    #[test]
    fn work_and_its_blocking_calls_run_below_the_callers_priority() {
        let ours = nice();
        let background = start(5).unwrap();
        let handle = background.handle();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let blocking = tokio::task::spawn_blocking(nice).await.unwrap();
            tx.send((
                std::thread::current().name().map(str::to_owned),
                nice(),
                blocking,
            ))
            .unwrap();
        });
        let (name, task, blocking) = rx.recv().unwrap();
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
        let expected = (ours + 5).min(LOWEST_PRIORITY);
        assert_eq!((task, blocking), (expected, expected));
        // The caller's own priority is unchanged.
        assert_eq!(nice(), ours);
    }

    #[test]
    fn the_increment_stops_at_the_lowest_priority() {
        let background = start(u8::MAX).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        background
            .handle()
            .spawn(async move { tx.send(nice()).unwrap() });
        assert_eq!(rx.recv().unwrap(), LOWEST_PRIORITY);
    }

    #[test]
    fn shutdown_waits_for_the_blocking_call_in_progress() {
        let background = start(0).unwrap();
        let (started, running) = std::sync::mpsc::channel();
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = finished.clone();
        background.handle().spawn(async move {
            let _ = tokio::task::spawn_blocking(move || {
                started.send(()).unwrap();
                // Long enough that shutdown surely starts while this runs.
                std::thread::sleep(std::time::Duration::from_millis(100));
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .await;
        });
        running.recv().unwrap();
        background.shutdown();
        assert!(finished.load(std::sync::atomic::Ordering::SeqCst));
    }
}
