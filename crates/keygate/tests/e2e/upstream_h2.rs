//! HTTP/2 to upstreams (`upstream_protocol`), against HTTP/2 servers started here (hyper's, over
//! h2c and over TLS with ALPN): a request and its answer stream both ways at once, the answer's
//! trailers reach an HTTP/2 client, `TE: trailers` is passed, the credential is not; an
//! HTTP/1.1 client is served by an HTTP/2 upstream; `auto` follows ALPN; the config error's
//! stable code. gRPC itself, with grpcio's client and server, is in tests/interop/grpc_proxy.py.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::sync::mpsc;

use crate::upstream_tls::{ca, leaf, write};

/// A body fed through a channel, frame by frame.
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// Answers every request with 200, what it saw in `x-seen-*` fields (version, TE, token id,
/// whether a credential came), then echoes each piece of the request body as it arrives, then
/// trailers `grpc-status: 0` and `x-echoed: N` (bytes).
async fn echo(req: Request<Incoming>) -> Result<Response<ChanBody>, Infallible> {
    let (tx, rx) = mpsc::channel(8);
    let h = req.headers();
    let seen = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let resp = Response::builder()
        .header("content-type", "application/octet-stream")
        .header("x-seen-version", format!("{:?}", req.version()))
        .header("x-seen-te", seen("te"))
        .header("x-seen-token-id", seen("x-keygate-token-id"))
        .header("x-seen-authorization", if h.contains_key("authorization") { "yes" } else { "no" })
        .header("x-seen-path", req.uri().path_and_query().map_or("", |p| p.as_str()).to_owned())
        .header("cache-control", if req.uri().path().contains("/cached") { "public, max-age=60" } else { "no-store" })
        .body(ChanBody(rx))
        .unwrap();
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                n += d.len();
                if tx.send(Frame::data(d)).await.is_err() {
                    return;
                }
            }
        }
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("x-echoed", HeaderValue::from(n));
        // A field that may not trail (RFC 9110 §6.5.1): keygate drops it.
        t.insert("set-cookie", HeaderValue::from_static("trailing=1"));
        let _ = tx.send(Frame::trailers(t)).await;
    });
    Ok(resp)
}

/// An HTTP/2-only server: h2c with prior knowledge, or TLS with ALPN `alpn` (HTTP/1.1 is
/// spoken when ALPN agrees on it).
async fn h2_upstream(tls: Option<(&str, &str, Vec<&'static [u8]>)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(|(cert, key, alpn)| {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(echo);
                match acceptor {
                    None => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    }
                    Some(a) => {
                        let Ok(tls) = a.accept(tcp).await else { return };
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        let io = TokioIo::new(tls);
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// An HTTP/2 client (prior knowledge) to keygate's gateway listener.
async fn h2_client(kg: &TestKeygate) -> hyper::client::conn::http2::SendRequest<ChanBody> {
    let addr = kg.gateway_url().trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    sender
}

async fn next_data(body: &mut Incoming) -> Bytes {
    loop {
        let f = body.frame().await.expect("a frame").expect("no error");
        if let Ok(d) = f.into_data() {
            return d;
        }
    }
}

#[tokio::test]
async fn http2_upstreams_stream_both_ways_and_pass_trailers() {
    let up = h2_upstream(None).await;
    let mut r = route("h2", "/h2", &format!("http://127.0.0.1:{}", up.port()));
    r.upstream_protocol = keygate_gateway::config::UpstreamProtocol::Http2;
    r.scopes.insert("*".into(), "stream:call".into());
    let kg = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.unwrap();
    let (_, token) = kg.client().create_token(&json!({"name": "h2", "scopes": ["stream:call"]})).await;
    kg.sync_index().await.unwrap();

    // An HTTP/2 client: the upstream's echo of the first piece arrives before the second piece
    // is sent (both directions flow at once, as gRPC's bidirectional streams need), and the
    // trailers come through.
    let mut client = h2_client(&kg).await;
    for round in 0..2 {
        let (tx, rx) = mpsc::channel(4);
        let mut req = Request::new(ChanBody(rx));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("http://keygate.test/h2/chat?round={round}").parse().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.headers_mut().insert("te", HeaderValue::from_static("trailers"));
        req.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
        tx.send(Frame::data(Bytes::from_static(b"ping-1"))).await.unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers().clone();
        assert_eq!(h["x-seen-version"], "HTTP/2.0");
        assert_eq!(h["x-seen-te"], "trailers", "TE: trailers reaches the upstream");
        assert_eq!(h["x-seen-authorization"], "no", "the credential is not forwarded");
        assert!(h["x-seen-token-id"].to_str().unwrap().starts_with("tok_"));
        assert_eq!(h["x-seen-path"], format!("/h2/chat?round={round}").as_str());
        let mut body = resp.into_body();
        assert_eq!(next_data(&mut body).await, "ping-1");
        tx.send(Frame::data(Bytes::from_static(b"ping-22"))).await.unwrap();
        assert_eq!(next_data(&mut body).await, "ping-22");
        drop(tx);
        let trailers = loop {
            let f = body.frame().await.expect("trailers").unwrap();
            if let Ok(t) = f.into_trailers() {
                break t;
            }
        };
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-echoed"], "13");
        assert!(trailers.get("set-cookie").is_none(), "a field that may not trail is dropped: {trailers:?}");
    }

    // Without a token, keygate refuses a gRPC call itself, in gRPC's terms.
    let req = Request::post("http://keygate.test/h2/chat")
        .header("content-type", "application/grpc")
        .body(ChanBody(mpsc::channel(1).1))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "16");

    // An HTTP/1.1 client is served by the same HTTP/2 upstream (TE is not passed: it did not
    // ask for trailers).
    let resp = reqwest::Client::new()
        .post(format!("{}/h2/one", kg.gateway_url()))
        .bearer_auth(&token)
        .body("hello over h1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
    assert_eq!(resp.headers()["x-seen-te"], "-");
    assert_eq!(resp.text().await.unwrap(), "hello over h1");
    kg.stop().await;
}

#[tokio::test]
async fn auto_follows_alpn_and_http2_needs_a_server_that_speaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = ca("keygate h2 test CA");
    let ca_file = write(dir.path(), "ca.pem", &trusted.pem);
    let (cert, key) = leaf(&trusted, &["localhost", "127.0.0.1"]);
    let both = h2_upstream(Some((&cert, &key, vec![b"h2", b"http/1.1"]))).await;
    let h1_only = h2_upstream(Some((&cert, &key, vec![b"http/1.1"]))).await;
    let tls_route = |id: &str, port: u16, p: keygate_gateway::config::UpstreamProtocol| {
        let mut r = route(id, &format!("/{id}"), &format!("https://127.0.0.1:{port}"));
        r.public = true;
        r.tls_ca_file = Some(ca_file.clone());
        r.upstream_protocol = p;
        r
    };
    use keygate_gateway::config::UpstreamProtocol::{Auto, Http1, Http2};
    let routes = vec![
        tls_route("auto-h2", both.port(), Auto),
        tls_route("auto-h1", h1_only.port(), Auto),
        tls_route("h1", both.port(), Http1),
        tls_route("h2", both.port(), Http2),
        tls_route("h2-refused", h1_only.port(), Http2),
    ];
    let kg = TestKeygate::start_with(Options { routes, ..Options::default() }).await.unwrap();
    let get = |path: &'static str| {
        let url = format!("{}{path}", kg.gateway_url());
        async move { reqwest::Client::new().get(url).send().await.unwrap() }
    };
    for (path, version) in
        [("/auto-h2", "HTTP/2.0"), ("/auto-h1", "HTTP/1.1"), ("/h1", "HTTP/1.1"), ("/h2", "HTTP/2.0")]
    {
        for _ in 0..2 {
            let resp = get(path).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(resp.headers()["x-seen-version"], version, "{path}");
        }
    }
    // ALPN offers only h2, the server only http/1.1: the handshake fails, a stable code.
    let resp = get("/h2-refused").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_tls_failed", "{body}");
    kg.stop().await;

    // auto over http:// cannot negotiate anything: a config error with a stable code.
    let mut r = route("bad", "/bad", "http://127.0.0.1:1");
    r.upstream_protocol = Auto;
    let err = keygate_gateway::routes::RouteTable::build(&[r], &keygate_gateway::config::GatewayConfig::default())
        .unwrap_err();
    assert!(err.contains("upstream_protocol_auto_needs_https"), "{err}");
}

/// An HTTP/2 upstream that closes each connection (GOAWAY) as soon as it has taken one request.
async fn closing_h2_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (tx, mut rx) = mpsc::channel::<()>(1);
                let svc = hyper::service::service_fn(move |req| {
                    let _ = tx.try_send(());
                    echo(req)
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = rx.recv() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_closed_http2_connection_is_replaced_without_failing_requests() {
    let up = closing_h2_upstream().await;
    let mut r = route("closing", "/closing", &format!("http://127.0.0.1:{}", up.port()));
    r.public = true;
    r.upstream_protocol = keygate_gateway::config::UpstreamProtocol::Http2;
    let kg = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.unwrap();
    let client = reqwest::Client::new();
    for i in 0..20 {
        let resp = client.get(format!("{}/closing/{i}", kg.gateway_url())).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {i}: {:?}", resp.text().await);
        assert_eq!(resp.text().await.unwrap(), "");
    }
    kg.stop().await;
}

#[tokio::test]
async fn answers_of_an_http2_upstream_are_cached_like_any_other() {
    let up = h2_upstream(None).await;
    let mut r = route("h2c", "/h2c", &format!("http://127.0.0.1:{}", up.port()));
    r.public = true;
    r.upstream_protocol = keygate_gateway::config::UpstreamProtocol::Http2;
    r.cache = Some(keygate_gateway::config::CacheConfig::default());
    let kg = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.unwrap();
    let client = reqwest::Client::new();
    let post = |path: &str| client.post(format!("{}{path}", kg.gateway_url())).body("x");
    // A GET's answer (the echo of an empty body, ended by trailers) is stored whole ...
    let cache_status = |r: &reqwest::Response| r.headers()["cache-status"].to_str().unwrap().to_owned();
    let first = client.get(format!("{}/h2c/cached/a", kg.gateway_url())).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(cache_status(&first).contains("stored"), "{}", cache_status(&first));
    assert_eq!(first.bytes().await.unwrap().len(), 0);
    let second = client.get(format!("{}/h2c/cached/a", kg.gateway_url())).send().await.unwrap();
    assert!(cache_status(&second).starts_with("keygate; hit"), "{}", cache_status(&second));
    assert_eq!(second.headers()["x-seen-version"], "HTTP/2.0", "the stored fields");
    // ... and what the upstream forbids is not.
    let other = client.get(format!("{}/h2c/plain", kg.gateway_url())).send().await.unwrap();
    assert!(cache_status(&other).contains("detail=no-store"), "{}", cache_status(&other));
    // A POST passes through (and drops the URI's entry).
    let posted = post("/h2c/cached/a").send().await.unwrap();
    assert_eq!(posted.text().await.unwrap(), "x");
    let third = client.get(format!("{}/h2c/cached/a", kg.gateway_url())).send().await.unwrap();
    assert!(cache_status(&third).contains("fwd=uri-miss"), "{}", cache_status(&third));
    kg.stop().await;
}

/// Sends `request` to keygate's gateway over HTTP/1.1 (it asks for `connection: close`) and
/// returns the whole answer as it came.
async fn raw_http1(kg: &TestKeygate, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = kg.gateway_url().trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    String::from_utf8(answer).unwrap()
}

/// An HTTP/1.1 upstream that answers every request with a chunked body and a trailer section
/// (`x-checksum`, and a `content-length` that has no place there).
async fn chunked_trailers_upstream() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                while crate::read_request_head(&mut s).await {
                    let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\
                                  X-Checksum: abc\r\ncontent-length: 99\r\n\r\n";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn trailers_reach_http1_clients_and_come_from_http1_upstreams_too() {
    let h2 = h2_upstream(None).await;
    let mut over_h2 = route("over-h2", "/over-h2", &format!("http://127.0.0.1:{}", h2.port()));
    over_h2.upstream_protocol = keygate_gateway::config::UpstreamProtocol::Http2;
    over_h2.public = true;
    let h1 = chunked_trailers_upstream().await;
    let mut over_h1 = route("over-h1", "/over-h1", &format!("http://127.0.0.1:{}", h1.port()));
    over_h1.public = true;
    let kg = TestKeygate::start_with(Options { routes: vec![over_h2, over_h1], ..Options::default() }).await.unwrap();

    // An HTTP/2 upstream's trailers reach an HTTP/1.1 client in the chunked answer's trailer
    // section.
    let answer = raw_http1(
        &kg,
        "POST /over-h2/x HTTP/1.1\r\nhost: keygate.test\r\nte: trailers\r\ncontent-length: 5\r\n\
         connection: close\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\r\ntransfer-encoding: chunked\r\n"), "{answer}");
    assert!(answer.contains("\r\nx-seen-te: trailers\r\n"), "TE: trailers reaches the HTTP/2 upstream: {answer}");
    assert!(answer.ends_with("\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-echoed: 5\r\n\r\n"), "{answer:?}");

    // An HTTP/1.1 upstream's trailers: to an HTTP/1.1 client, in the trailer section, without
    // the field that has no place there …
    let answer =
        raw_http1(&kg, "GET /over-h1/x HTTP/1.1\r\nhost: keygate.test\r\nte: trailers\r\nconnection: close\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with("\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"), "{answer:?}");
    // … and to an HTTP/2 client as a trailers frame.
    let mut client = h2_client(&kg).await;
    let req = Request::get("http://keygate.test/over-h1/y").body(ChanBody(mpsc::channel(1).1)).unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert_eq!(next_data(&mut body).await, "hello");
    let trailers = body.frame().await.expect("trailers").unwrap().into_trailers().expect("a trailers frame");
    assert_eq!(trailers.len(), 1, "{trailers:?}");
    assert_eq!(trailers["x-checksum"], "abc");
    // An HTTP/1.0 client cannot take trailers: it gets the body, read until the close.
    let answer = raw_http1(&kg, "GET /over-h1/z HTTP/1.0\r\nhost: keygate.test\r\n\r\n").await;
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer:?}");
    kg.stop().await;
}
