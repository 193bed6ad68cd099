//! Connections and deadlines, from outside the process (issue 12, item 7): raw TCP for HTTP/1.1
//! and raw HTTP/2 frames. Every wait below is bounded by a socket read time-out that only a failing test reaches; the
//! gateway's own time limits are set sub-second so the tests take about as long as them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use keygate_gateway::config::GatewayConfig;
use keygate_testkit::{MockUpstream, Options, TestKeygate, route};

/// Upper bound of every read: only reached when the behaviour under test is missing.
pub(crate) const READ_LIMIT: Duration = Duration::from_secs(5);

pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_LIMIT)).unwrap();
    s
}

/// Reads until the peer closes (or the read limit); returns what came and whether it closed.
pub(crate) fn read_to_close(s: &mut TcpStream) -> (String, bool) {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&all).into_owned(), true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&all).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&all).into_owned(), false),
        }
    }
}

/// Reads one HTTP/1.1 answer with a `content-length` body.
pub(crate) fn read_answer(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if all.len() >= end + 4 + len {
                return String::from_utf8_lossy(&all[..end + 4 + len]).into_owned();
            }
        }
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return String::from_utf8_lossy(&all).into_owned();
        }
        all.extend_from_slice(&buf[..n]);
    }
}

/// A keygate with public routes to the mock upstream (`/status`, `/hold`), `/ws` (default
/// upgrades), `/upgrade` (also "echo", the mock's upgrade) and `/headers` (echoes them).
pub(crate) async fn start(up: &MockUpstream, gateway: GatewayConfig) -> TestKeygate {
    let mut status = route("status", "/status", &up.url());
    status.public = true;
    let mut hold = route("hold", "/hold", &up.url());
    hold.public = true;
    // `/ws` allows the default list (websocket); `/upgrade` (the upstream's echo protocol)
    // allows "echo" too.
    let ws = route("ws", "/ws", &up.url());
    let mut echo = route("echo", "/upgrade", &up.url());
    echo.upgrades = vec!["websocket".into(), "echo".into()];
    let headers = route("headers", "/headers", &up.url());
    TestKeygate::start_with(Options {
        routes: vec![status, hold, ws, echo, headers],
        gateway: Some(gateway),
        ..Options::default()
    })
    .await
    .unwrap()
}

async fn metrics(kg: &TestKeygate) -> String {
    reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap()
}

// ---- HTTP/2 frames, written and read by hand (RFC 9113 §4) ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of literals without indexing, never Huffman-coded (RFC 7541 §6.2.2).
fn header_block(method_index: u8, path: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x80 | method_index, 0x86]; // :method (static 2 GET, 3 POST), :scheme http
    let mut literal = |name_index: u8, name: &str, value: &str| {
        b.push(name_index);
        if name_index == 0 {
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
        }
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    literal(4, "", path); // :path
    literal(1, "", "a"); // :authority
    for (n, v) in fields {
        literal(0, n, v);
    }
    b
}

/// Opens an h2c connection with prior knowledge: preface and empty SETTINGS.
fn h2_connect(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    s
}

/// Reads one frame: (type, flags, stream, payload); `None` when the connection ends.
fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// What an HTTP/2 connection showed until it ended (or the read limit).
#[derive(Default, Debug)]
struct H2Seen {
    goaway: bool,
    pings: usize,
    data: String,
    reset: bool,
}

/// Reads frames until the connection ends, acknowledging SETTINGS, and PINGs when `answer_pings`;
/// returns what was seen and whether the connection ended (false: the read limit came first).
fn h2_until_closed(s: &mut TcpStream, answer_pings: bool) -> (H2Seen, bool) {
    let mut seen = H2Seen::default();
    loop {
        let Some((ty, flags, _stream, payload)) = read_frame(s) else {
            let mut probe = [0u8; 1];
            // Tell the end of the connection from the read limit.
            let closed = matches!(s.read(&mut probe), Ok(0) | Err(_)) && !timed_out(s);
            return (seen, closed);
        };
        match ty {
            SETTINGS if flags & ACK == 0 => {
                let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
            }
            PING if flags & ACK == 0 => {
                seen.pings += 1;
                if answer_pings {
                    let _ = s.write_all(&frame(PING, ACK, 0, &payload));
                }
            }
            GOAWAY => seen.goaway = true,
            DATA => seen.data.push_str(&String::from_utf8_lossy(&payload)),
            RST_STREAM => seen.reset = true,
            _ => {}
        }
    }
}

/// Whether the last read on `s` stopped at its time-out rather than at the connection's end.
fn timed_out(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 1];
    let r = s.read(&mut probe);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

// ---- Item 7: deadlines, HTTP/2 idle and keep-alive, connection caps ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_oauth_body_is_cut_at_its_deadline() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig { body_timeout_ms: 300, ..Default::default() }).await;
    let addr = kg.gateway_addr;
    tokio::task::spawn_blocking(move || {
        // HTTP/1.1: 100 bytes announced, 11 sent, then nothing.
        let mut s = connect(addr);
        s.write_all(
            b"POST /oauth2/token HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 100\r\n\r\ngrant_type=",
        )
        .unwrap();
        let (answer, closed) = read_to_close(&mut s);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(closed, "the connection ends with the refusal");

        // HTTP/2: a POST whose DATA never ends.
        let mut s = h2_connect(addr);
        let block = header_block(3, "/oauth2/token", &[("content-type", "application/x-www-form-urlencoded")]);
        s.write_all(&frame(HEADERS, END_HEADERS, 1, &block)).unwrap();
        s.write_all(&frame(DATA, 0, 1, b"grant_type=")).unwrap();
        let mut body = String::new();
        while let Some((ty, flags, stream, payload)) = read_frame(&mut s) {
            if ty == SETTINGS && flags & ACK == 0 {
                let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
            }
            if ty == DATA && stream == 1 {
                body.push_str(&String::from_utf8_lossy(&payload));
                if body.contains("request_timeout") {
                    break;
                }
            }
        }
        assert!(body.contains("\"request_timeout\""), "HTTP/2: {body:?}");
    })
    .await
    .unwrap();
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_at_the_send_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that streams a large answer for as long as it can, and says when keygate
    // closed its connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).await;
        let mut ok = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n").await.is_ok();
        let chunk = vec![b'x'; 64 * 1024];
        while ok {
            ok = s.write_all(&chunk).await.is_ok();
        }
        let _ = closed_tx.send(());
    });
    let mut big = route("big", "/big", &format!("http://{up_addr}"));
    big.public = true;
    let kg = TestKeygate::start_with(Options {
        routes: vec![big],
        gateway: Some(GatewayConfig { send_timeout_ms: 300, ..Default::default() }),
        ..Options::default()
    })
    .await
    .unwrap();
    let mut client = connect(kg.gateway_addr);
    client.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    // The client reads nothing: once the buffers on the way are full, keygate's writes stall.
    let cut = tokio::time::timeout(READ_LIMIT, closed_rx).await;
    assert!(matches!(cut, Ok(Ok(()))), "keygate gave up the answer (and its upstream connection)");
    drop(client);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_takes_no_data_is_disconnected_at_the_send_deadline() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig { send_timeout_ms: 300, ..Default::default() }).await;
    let addr = kg.gateway_addr;
    let (seen, closed) = tokio::task::spawn_blocking(move || {
        let mut s = connect(addr);
        s.write_all(PREFACE).unwrap();
        // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0: no answer data may be sent until the client
        // opens a stream's window, which it never does (it answers PINGs: it is there).
        s.write_all(&frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0])).unwrap();
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &header_block(2, "/status/200", &[]))).unwrap();
        h2_until_closed(&mut s, true)
    })
    .await
    .unwrap();
    assert!(seen.data.is_empty(), "no data could be sent: {seen:?}");
    assert!(closed, "the connection whose client took nothing was closed: {seen:?}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_http2_preface_is_cut_at_the_header_deadline() {
    let up = MockUpstream::start().await.unwrap();
    // The shortest header time (1 s) against the default keep-alive time (60 s).
    let kg = start(&up, GatewayConfig { header_timeout_seconds: 1, ..Default::default() }).await;
    let addr = kg.gateway_addr;
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = connect(addr);
        s.write_all(&PREFACE[..16]).unwrap();
        read_to_close(&mut s).1
    })
    .await
    .unwrap();
    assert!(closed, "a preface that stops half-way is a head that does not arrive");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_its_idle_timeout() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig { http2_idle_timeout_ms: 300, ..Default::default() }).await;
    let addr = kg.gateway_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = h2_connect(addr);
        // One request, answered; then nothing: the connection is idle from its answer on.
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &header_block(2, "/status/200", &[]))).unwrap();
        let (seen, closed) = h2_until_closed(&mut s, true);
        assert!(seen.data.contains("status"), "the request was answered first: {seen:?}");
        assert!(seen.goaway, "a GOAWAY says why: {seen:?}");
        assert!(closed, "the idle connection was closed: {seen:?}");
    })
    .await
    .unwrap();
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_http2_ping_closes_the_connection() {
    let up = MockUpstream::start().await.unwrap();
    let gw =
        GatewayConfig { http2_keep_alive_interval_ms: 200, http2_keep_alive_timeout_ms: 200, ..Default::default() };
    let kg = start(&up, gw).await;
    let addr = kg.gateway_addr;
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = h2_connect(addr);
        // A stream stays open (the upstream holds it), so only the PING can end the connection.
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &header_block(2, "/hold", &[]))).unwrap();
        h2_until_closed(&mut s, false)
    })
    .await
    .unwrap();
    up.release();
    assert!(closed.0.pings >= 1, "keygate pinged: {:?}", closed.0);
    assert!(closed.1, "the connection whose client did not answer was closed: {:?}", closed.0);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_are_announced_and_a_flood_of_bad_streams_ends_the_connection() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig { http2_max_concurrent_streams: 7, ..Default::default() }).await;
    let addr = kg.gateway_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = h2_connect(addr);
        let (ty, _, _, payload) = read_frame(&mut s).unwrap();
        assert_eq!(ty, SETTINGS);
        let settings: Vec<(u16, u32)> = payload
            .chunks(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
            .collect();
        // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) and SETTINGS_MAX_HEADER_LIST_SIZE (0x6).
        assert!(settings.contains(&(0x3, 7)), "{settings:?}");
        assert!(settings.contains(&(0x6, 64 * 1024)), "{settings:?}");
        // Streams keygate must reset for the client's errors (a connection-specific field is
        // malformed in HTTP/2, RFC 9113 §8.2.2): past 1024 of them the connection ends with
        // GOAWAY ENHANCE_YOUR_CALM instead of costing a reset each, forever.
        let bad = header_block(2, "/status/200", &[("connection", "close")]);
        let mut flood = Vec::new();
        for i in 0..1100u32 {
            flood.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &bad));
        }
        let _ = s.write_all(&flood);
        let mut goaway = None;
        while let Some((ty, flags, _, payload)) = read_frame(&mut s) {
            if ty == SETTINGS && flags & ACK == 0 {
                let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
            }
            if ty == GOAWAY {
                goaway = Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
                break;
            }
        }
        assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
    })
    .await
    .unwrap();
    kg.stop().await;
}

/// `n` connections, each of which has been served a request (so the gateway holds them open).
fn served_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
            assert!(read_answer(&mut s).starts_with("HTTP/1.1 200"));
            s
        })
        .collect()
}

/// A new connection gets 503 `too_many_connections` without sending anything, then is closed.
fn refused_at_accept(addr: SocketAddr) {
    let mut s = connect(addr);
    let (answer, closed) = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_a_workers_cap_are_refused_and_counted() {
    let up = MockUpstream::start().await.unwrap();
    let gw = GatewayConfig { threads: 1, max_connections_per_worker: 2, ..Default::default() };
    let kg = start(&up, gw).await;
    let addr = kg.gateway_addr;
    let (first, _second) = tokio::task::spawn_blocking(move || {
        // Two connections, each served (so the worker holds both).
        let open = served_connections(addr, 2);
        // The third is refused at once, before it sends anything.
        refused_at_accept(addr);
        let mut it = open.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    })
    .await
    .unwrap();
    let m = metrics(&kg).await;
    assert!(m.contains("keygate_gateway_connections_refused_total{cap=\"worker\"} 1"), "{m}");
    assert!(m.contains("keygate_gateway_connections_open 2"), "{m}");
    // Once one closes, a new connection is served again (as soon as the worker has seen the
    // close: each attempt is a round trip, no sleeping).
    drop(first);
    let served = tokio::task::spawn_blocking(move || {
        (0..200).any(|_| {
            let mut s = connect(addr);
            let _ = s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            read_answer(&mut s).starts_with("HTTP/1.1 200")
        })
    })
    .await
    .unwrap();
    assert!(served, "a place freed by a close is given to a new connection");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_an_addresss_cap_are_refused_and_other_addresses_are_not() {
    let up = MockUpstream::start().await.unwrap();
    let gw = GatewayConfig { max_connections_per_address: 2, ..Default::default() };
    let kg = start(&up, gw).await;
    let addr = kg.gateway_addr;
    // Another loopback address: a different client.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = other.connect(addr).await.unwrap().into_std().unwrap();
    other.set_nonblocking(false).unwrap();
    other.set_read_timeout(Some(READ_LIMIT)).unwrap();
    tokio::task::spawn_blocking(move || {
        let _open = served_connections(addr, 2);
        refused_at_accept(addr);
        let mut other = other;
        other.write_all(b"GET /status/200 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(read_answer(&mut other).starts_with("HTTP/1.1 200"), "another address is not capped");
    })
    .await
    .unwrap();
    let m = metrics(&kg).await;
    assert!(m.contains("keygate_gateway_connections_refused_total{cap=\"address\"} 1"), "{m}");
    kg.stop().await;
}
