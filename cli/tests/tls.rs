//! The real binaries over TLS: the control plane with a certificate and a client CA, a
//! sidecar authenticated by its certificate alone (mTLS), and corsairctl verifying the
//! control plane with a token.

mod support;

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use support::{ADMIN_TOKEN, ctl_with, sibling, spawn_env, wait_until};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_sidecar_syncs_over_mtls_with_its_certificate_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let ca = Issuer::new(ca_params, ca_key);
    let leaf = |dns: &[&str], uri: Option<&str>| {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        (
            params.signed_by(&key, &ca).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(&["localhost"], None);
    let (client_cert, client_key) = leaf(&[], Some("spiffe://corsair.test/corsair/sidecar/shop"));
    let ca_file = write(dir.path(), "ca.pem", &ca_pem);
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let mut cp = spawn_env(
        &sibling("corsair-control-plane"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--log-format",
            "json",
            "--tls-cert",
            &write(dir.path(), "server.pem", &server_cert),
            "--tls-key",
            &write(dir.path(), "server.key", &server_key),
            "--tls-client-ca",
            &ca_file,
            "--trust-domain",
            "corsair.test",
        ],
        &[("CORSAIR_BOOTSTRAP_TOKEN", ADMIN_TOKEN)],
    );
    let fields = cp.wait_for_log("control plane listening");
    assert_eq!(fields["tls"], true);
    let port = fields["address"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let addr = format!("https://localhost:{port}");
    let ctl = |args: &[&str]| {
        ctl_with(
            &[&["--addr", &addr, "--ca-cert", &ca_file], args].concat(),
            None,
            Some(ADMIN_TOKEN),
        )
    };
    let policy = write(
        dir.path(),
        "shop.yaml",
        "service: shop\nallowed_origins: [https://a.example.com]\n",
    );
    let out = ctl(&["policy", "apply", "-f", &policy]);
    assert_eq!(out.code, 0, "{out:?}");

    let client_cert = write(dir.path(), "client.pem", &client_cert);
    let client_key = write(dir.path(), "client.key", &client_key);
    let mut sidecar = support::shop_sidecar(
        &addr,
        &[
            "--sidecar-id",
            "shop-tls",
            "--control-plane-ca",
            &ca_file,
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
        ],
        &[],
    );
    sidecar.wait_for_log("sidecar listening");
    wait_until("the mTLS sidecar is SYNCED", || {
        let out = ctl(&["fleet", "status", "-o", "json"]);
        out.stdout.contains(r#""state": "SYNCED""#)
    });
    let out = ctl(&["fleet", "status"]);
    assert!(out.stdout.contains("shop-tls"), "{out:?}");

    // A CA with a plain-text address is refused before any token is sent.
    let plain = format!("http://localhost:{port}");
    let out = ctl_with(
        &["--addr", &plain, "--ca-cert", &ca_file, "policy", "list"],
        None,
        Some(ADMIN_TOKEN),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("needs an https:// address"), "{out:?}");

    // Without the CA, corsairctl refuses the control plane's certificate.
    let out = ctl_with(
        &["--addr", &addr, "policy", "list"],
        None,
        Some(ADMIN_TOKEN),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(sidecar.terminate().success());
    assert!(cp.terminate().success());
}
