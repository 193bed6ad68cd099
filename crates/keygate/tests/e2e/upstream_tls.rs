//! `https://` upstreams against real TLS servers started here (rustls, a test CA made by rcgen):
//! a CA bundle per route, host name verification and its override, an untrusted CA, client
//! certificates (mTLS), `tls_insecure_skip_verify` (and its warning), and the config errors'
//! stable codes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test CA: its certificate (PEM) and what signs with it.
pub(crate) struct Ca {
    pub(crate) pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub(crate) fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A certificate for `names` signed by `ca`: (certificate PEM, key PEM).
pub(crate) fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A TLS upstream on an ephemeral port: answers every request with JSON saying the `Host` it
/// got and whether the client presented a certificate. With `client_ca`, a client certificate
/// signed by it is required.
async fn tls_upstream(cert_pem: &str, key_pem: &str, client_ca: Option<&str>) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let client_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let alpn = tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = tls.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let host = head
                            .lines()
                            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("host")))
                            .map(|(_, v)| v.trim().to_owned());
                        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                        let body =
                            json!({"host": host, "path": path, "client_cert": client_cert, "alpn": alpn}).to_string();
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if tls.write_all(answer.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn public(mut r: keygate::config::RouteConfig) -> keygate::config::RouteConfig {
    r.public = true;
    r
}

async fn get(kg: &TestKeygate, path: &str) -> (StatusCode, Value) {
    let resp = reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn https_upstreams_are_verified_with_a_ca_bundle_a_name_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = ca("keygate test CA");
    let other = ca("someone else's CA");
    let ca_file = write(dir.path(), "ca.pem", &trusted.pem);

    // (1) A certificate for localhost and 127.0.0.1 from the trusted CA.
    let (cert, key) = leaf(&trusted, &["localhost", "127.0.0.1"]);
    let good = tls_upstream(&cert, &key, None).await;
    // (2) A certificate for another name only.
    let (cert, key) = leaf(&trusted, &["api.internal.example"]);
    let named = tls_upstream(&cert, &key, None).await;
    // (3) A certificate from a CA the route does not trust.
    let (cert, key) = leaf(&other, &["localhost", "127.0.0.1"]);
    let untrusted = tls_upstream(&cert, &key, None).await;
    // (4) An upstream that requires a client certificate from the trusted CA.
    let (cert, key) = leaf(&trusted, &["localhost", "127.0.0.1"]);
    let mtls = tls_upstream(&cert, &key, Some(&trusted.pem)).await;
    let (client_cert, client_key) = leaf(&trusted, &["keygate-client"]);
    let client_cert = write(dir.path(), "client.pem", &client_cert);
    let client_key = write(dir.path(), "client.key", &client_key);

    let with_ca = |id: &str, upstream: String| {
        let mut r = public(route(id, &format!("/{id}"), &upstream));
        r.tls_ca_file = Some(ca_file.clone());
        r
    };
    let mut routes = vec![
        with_ca("good", format!("https://127.0.0.1:{}", good.port())),
        with_ca("by-localhost", format!("https://localhost:{}/base", good.port())),
        with_ca("wrong-name", format!("https://127.0.0.1:{}", named.port())),
        with_ca("named", format!("https://127.0.0.1:{}", named.port())),
        with_ca("untrusted", format!("https://127.0.0.1:{}", untrusted.port())),
        public(route("system-roots", "/system-roots", &format!("https://127.0.0.1:{}", good.port()))),
        with_ca("mtls", format!("https://127.0.0.1:{}", mtls.port())),
        with_ca("mtls-without", format!("https://127.0.0.1:{}", mtls.port())),
        public(route("insecure", "/insecure", &format!("https://127.0.0.1:{}", untrusted.port()))),
    ];
    routes[3].tls_server_name = Some("api.internal.example".into());
    routes[6].tls_client_cert = Some(client_cert.clone());
    routes[6].tls_client_key = Some(client_key.clone());
    routes[8].tls_insecure_skip_verify = true;
    let kg = TestKeygate::start_with(Options { routes, ..Options::default() }).await.unwrap();

    // (1) Works end to end, over pooled connections, HTTP/1.1 by ALPN; Host is the upstream's
    // host with its (non-default) port.
    for _ in 0..3 {
        let (status, body) = get(&kg, "/good/a?x=1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["path"], "/good/a?x=1");
        assert_eq!(body["host"], format!("127.0.0.1:{}", good.port()));
        assert_eq!(body["alpn"], "http/1.1");
        assert_eq!(body["client_cert"], false);
    }
    let (status, body) = get(&kg, "/by-localhost/b").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/base/by-localhost/b");
    assert_eq!(body["host"], format!("localhost:{}", good.port()));

    // (2) A certificate for another name is refused, with a stable code; tls_server_name
    // verifies that name instead.
    let (status, body) = get(&kg, "/wrong-name").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("upstream_tls_failed")),
        "{body}"
    );
    let (status, body) = get(&kg, "/named").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // (3) A CA the route does not trust, with its bundle or with the system's store.
    for path in ["/untrusted", "/system-roots"] {
        let (status, body) = get(&kg, path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("upstream_tls_failed")),
            "{path}: {body}"
        );
    }

    // (4) mTLS: with the client certificate it works, without it the upstream refuses.
    let (status, body) = get(&kg, "/mtls").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_cert"], true);
    let (status, body) = get(&kg, "/mtls-without").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        matches!(body["error"]["code"].as_str(), Some("upstream_tls_failed" | "upstream_unavailable")),
        "TLS 1.3 may report the refusal at the handshake or at the first read: {body}"
    );

    // (5) tls_insecure_skip_verify accepts the untrusted certificate.
    let (status, body) = get(&kg, "/insecure").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // (6) Routes made through the admin API are checked by the same code, with the same codes.
    let c = kg.client();
    let up = format!("https://127.0.0.1:{}", good.port());
    let missing = dir.path().join("missing.pem");
    let not_pem = write(dir.path(), "not.pem", "hello");
    for (extra, code) in [
        (json!({"tls_ca_file": missing}), "upstream_tls_file_unreadable"),
        (json!({"tls_ca_file": not_pem}), "upstream_tls_bad_pem"),
        (json!({"tls_client_key": client_key}), "upstream_tls_key_without_cert"),
        (json!({"tls_client_cert": client_cert, "tls_client_key": not_pem}), "upstream_tls_bad_pem"),
        (json!({"tls_server_name": "not a name!"}), "upstream_tls_bad_server_name"),
        (json!({"tls_ca_file": ca_file, "upstream": "http://127.0.0.1:9"}), "upstream_tls_on_http"),
    ] {
        let mut body = json!({"id": "bad", "path": "/bad", "upstream": up});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let a = c.post("/admin/v1/routes", &body).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{body}: {:?}", a.body);
        assert!(a.str("/error/message").contains(code), "{code}: {:?}", a.body);
    }
    // A good one is created live, and answers with every TLS field.
    let created = c
        .post(
            "/admin/v1/routes",
            &json!({"id": "live", "path": "/live", "upstream": up, "public": true, "tls_ca_file": ca_file}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["tls_insecure_skip_verify"], false);
    assert_eq!(get(&kg, "/live/x").await.0, StatusCode::OK);
    kg.stop().await;
}

/// `keygate config check` names a TLS config error by its code, and warns about a route that
/// skips verification.
#[test]
fn config_check_gives_tls_codes_and_warns_about_skipped_verification() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml");
    let check = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        super::keygate(&["config", "check", cfg.to_str().unwrap()]).output().unwrap()
    };
    let out = check(
        "[[routes]]\nid = \"r\"\npath = \"/r\"\nupstream = \"https://127.0.0.1:8443\"\ntls_client_cert = \"/nowhere/c.pem\"\n",
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream_tls_key_without_cert"), "{out:?}");
    let out = check(
        "[[routes]]\nid = \"r\"\npath = \"/r\"\nupstream = \"https://127.0.0.1:8443\"\ntls_ca_file = \"/nowhere/ca.pem\"\n",
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream_tls_file_unreadable"), "{out:?}");
    let out = check(
        "[[routes]]\nid = \"r\"\npath = \"/r\"\nupstream = \"https://127.0.0.1:8443\"\ntls_insecure_skip_verify = true\n",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("tls_insecure_skip_verify") && all.contains("DANGER"), "{all}");
}
