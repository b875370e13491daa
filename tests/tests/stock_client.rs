//! The API as a stock gRPC client sees it: `tests/stock_client/stock_client.py` drives the
//! real control plane from Python grpcio, finding every message type through server
//! reflection and reading the rich error details with grpcio-status.
//!
//! The Python is `CORSAIR_PYTHON` (`.ci/run` makes a virtual environment with grpcio,
//! grpcio-reflection and grpcio-status), else `python3`. Without those packages the test
//! skips, or fails under `CI=true`.

mod support;

use std::path::Path;
use std::process::Command;

use support::{ADMIN, ControlPlane, free_port, skip};

#[test]
fn a_python_grpcio_client_finds_names_etags_page_tokens_and_rich_errors() {
    let python = std::env::var("CORSAIR_PYTHON").unwrap_or_else(|_| "python3".into());
    let ready = Command::new(&python)
        .args(["-c", "import grpc, grpc_reflection, grpc_status"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !ready {
        skip(&format!(
            "{python} lacks grpcio, grpcio-reflection or grpcio-status (pip install them, or set CORSAIR_PYTHON)"
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _cp = ControlPlane::start(
        &format!("sqlite://{}", dir.path().join("cp.db").display()),
        port,
        &[],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("stock_client/stock_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("127.0.0.1:{port}"))
        .arg(ADMIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
