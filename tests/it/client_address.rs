//! The client's address reaches the worker: the PROXY protocol sent to an unmodified nginx that reads it,
//! the PROXY protocol read from trusted sources (and refused when malformed), and the per-client limit.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

/// An nginx configuration whose server reads the PROXY protocol and answers `/` with the address and port
/// it carried; `PORT` and `DIR` are filled in by the worker's command line.
const NGINX: &str = r#"daemon off;
master_process off;
error_log stderr notice;
pid DIR/nginx-PORT.pid;
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path DIR/body-PORT;
    proxy_temp_path DIR/proxy-PORT;
    fastcgi_temp_path DIR/fastcgi-PORT;
    uwsgi_temp_path DIR/uwsgi-PORT;
    scgi_temp_path DIR/scgi-PORT;
    server {
        listen 127.0.0.1:PORT proxy_protocol;
        location = /readyz { return 200 "ready\n"; }
        location / { return 200 "$proxy_protocol_addr $proxy_protocol_port\n"; }
    }
}
"#;

/// A worker that reads the PROXY protocol header a connection begins with and answers the request after
/// it with that header's bytes in hex: what baton sent, byte for byte. A connection that ends after the
/// header (a probe) is closed.
const HEADER_ECHO: &str = r#"
import socket, sys, threading
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
def read_exactly(conn, n, data):
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
def handle(conn):
    try:
        data = read_exactly(conn, 16, b"")
        if data[:12] == SIG:
            header = read_exactly(conn, 16 + int.from_bytes(data[14:16], "big"), data)
        else:
            header = data
            while not header.endswith(b"\r\n"):
                header = read_exactly(conn, len(header) + 1, header)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError
            request += chunk
        body = header.hex().encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()
"#;

/// The rest of every Python worker here: listen on the port it is given and serve each connection with
/// its `handle` on a thread.
const LISTENER: &str = r#"
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"#;

/// Writes the Python worker whose connection handler is `handler` to `path`.
fn python_worker(path: &Path, handler: &str) {
    std::fs::write(path, format!("{handler}{LISTENER}")).expect("write the worker");
}

/// Service `web`: nginx reading the PROXY protocol, behind baton sending `version`, on IPv4 and IPv6
/// loopback.
fn nginx_web(dir: &Path, version: &str) -> String {
    need("nginx", "nginx");
    let template = dir.join("nginx.conf.in");
    std::fs::write(&template, NGINX).expect("write the nginx template");
    let script = format!(
        "sed -e \"s|PORT|$1|g\" -e \"s|DIR|{dir}|g\" {template} > {dir}/nginx-$1.conf && exec nginx -e stderr -c {dir}/nginx-$1.conf",
        dir = dir.display(),
        template = template.display()
    );
    format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n\
         command = [\"sh\", \"-c\", {script:?}, \"sh\", \"{{port}}\"]\n\
         proxy_protocol = \"{version}\"\nstop_signal = \"SIGQUIT\"\n\
         [service.web.readiness]\npath = \"/readyz\"\ninterval = \"20ms\"\n"
    )
}

/// Service `web`: the header-echoing worker, with `extra` keys.
fn echo_web(dir: &Path, extra: &str) -> String {
    let script = dir.join("header_echo.py");
    python_worker(&script, HEADER_ECHO);
    format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n\
         command = [\"python3\", {script:?}, \"{{port}}\"]\n{extra}\n"
    )
}

/// A temporary directory for a worker's files.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// `GET /` on `stream` after `prefix`: the status and body.
fn get_after(stream: &mut TcpStream, prefix: &[u8]) -> std::io::Result<(u16, String)> {
    stream.write_all(prefix)?;
    exchange_raw(stream, "GET", "/", &[])
}

/// The addresses `public` has for each family: the IPv4 one and the IPv6 one.
fn addresses(baton: &Baton) -> (SocketAddr, SocketAddr) {
    let listen = baton.service("web")["listen"].clone();
    let all: Vec<SocketAddr> = listen
        .as_array()
        .expect("listen")
        .iter()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    let v4 = *all.iter().find(|a| a.is_ipv4()).expect("an IPv4 address");
    let v6 = *all.iter().find(|a| a.is_ipv6()).expect("an IPv6 address");
    (v4, v6)
}

#[test]
fn nginx_sees_the_clients_address_and_port_through_v1_and_v2_and_an_upgrade_loses_nothing() {
    for version in ["v1", "v2"] {
        let dir = scratch();
        let baton = Baton::start(&nginx_web(dir.path(), version));
        let (v4, v6) = addresses(&baton);
        for addr in [v4, v6] {
            let mut client = connect_from(addr.ip(), addr).expect("connect");
            let port = client.local_addr().expect("local").port();
            let (code, body) = get_after(&mut client, b"").expect("GET through baton");
            assert_eq!(code, 200, "{version} from {addr}: {body}");
            assert_eq!(body.trim(), format!("{} {port}", addr.ip()), "{version} from {addr}");
        }
        assert_eq!(
            baton.metric("baton_proxy_headers_total{service=\"web\",version=\"v1\"}"),
            0.0
        );

        // An upgrade under load, every answer checked: nothing is refused, lost or misaddressed.
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut client = connect_from(v4.ip(), v4).expect("connect");
                        let port = client.local_addr().expect("local").port();
                        match get_after(&mut client, b"") {
                            Ok((200, body)) if body.trim() == format!("127.0.0.1 {port}") => {
                                ok.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        wait_for("answers before the upgrade", || {
            (ok.load(Ordering::Relaxed) > 20)
                .then_some(())
                .ok_or_else(|| "few".into())
        });
        let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
        assert_eq!(code, 200, "{body}");
        let before = ok.load(Ordering::Relaxed);
        wait_for("answers after the upgrade", || {
            (ok.load(Ordering::Relaxed) > before + 20)
                .then_some(())
                .ok_or_else(|| "few".into())
        });
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().expect("client");
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0, "{version}: failed exchanges");
        assert_eq!(baton.service("web")["generation"], 2, "{version}");
    }
}

#[test]
fn a_trusted_sources_header_names_the_client_and_its_tlvs_are_passed_on() {
    let dir = scratch();
    let baton = Baton::start(&echo_web(
        dir.path(),
        "proxy_protocol = \"v2\"\naccept_proxy_protocol = [\"127.0.0.1/32\", \"::1\"]",
    ));
    let (v4, v6) = addresses(&baton);
    let header = |bytes: &[u8]| -> Vec<u8> {
        let mut client = connect_from(v4.ip(), v4).expect("connect");
        let (code, body) = get_after(&mut client, bytes).expect("GET");
        assert_eq!(code, 200, "{body}");
        (0..body.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&body[i..i + 2], 16).expect("hex"))
            .collect()
    };
    // v1, IPv4: the worker gets a v2 header naming the carried addresses.
    let sent = header(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n");
    let expected_v4 = [
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".as_slice(),
        &[192, 0, 2, 7, 198, 51, 100, 1],
        &40000u16.to_be_bytes(),
        &443u16.to_be_bytes(),
    ]
    .concat();
    assert_eq!(sent, expected_v4);
    // v2, IPv6, with TLVs (ALPN "h2", a NOOP): passed on as they came.
    let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x01, 0x00];
    let source: std::net::Ipv6Addr = "2001:db8::7".parse().expect("ip");
    let destination: std::net::Ipv6Addr = "2001:db8::1".parse().expect("ip");
    let block = [
        source.octets().as_slice(),
        &destination.octets(),
        &51000u16.to_be_bytes(),
        &8443u16.to_be_bytes(),
        &tlvs,
    ]
    .concat();
    let length = u16::try_from(block.len()).expect("length").to_be_bytes();
    let incoming = [b"\r\n\r\n\0\r\nQUIT\n\x21\x21".as_slice(), &length, &block].concat();
    assert_eq!(header(&incoming), incoming, "the same header, TLVs and all");
    // From ::1, trusted too: a v1 IPv6 header.
    let mut client = connect_from(v6.ip(), v6).expect("connect");
    let (code, body) = get_after(&mut client, b"PROXY TCP6 2001:db8::9 2001:db8::1 1234 80\r\n").expect("GET");
    assert_eq!(code, 200);
    assert!(body.starts_with(&hex(b"\r\n\r\n\0\r\nQUIT\n\x21\x21")), "{body}");
    assert!(
        body.contains(&hex(&"2001:db8::9".parse::<std::net::Ipv6Addr>().expect("ip").octets())),
        "{body}"
    );
    assert_eq!(
        baton.metric("baton_proxy_headers_total{service=\"web\",version=\"v1\"}"),
        2.0
    );
    assert_eq!(
        baton.metric("baton_proxy_headers_total{service=\"web\",version=\"v2\"}"),
        1.0
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_untrusted_sources_bytes_pass_as_they_are() {
    let dir = scratch();
    // Trusted: a network the test is not in. Baton sends no header of its own.
    let baton = Baton::start(&echo_web(dir.path(), "accept_proxy_protocol = [\"192.0.2.0/24\"]"));
    let (v4, _) = addresses(&baton);
    let line = b"PROXY TCP4 10.9.9.9 10.0.0.1 1 2\r\n";
    let mut client = connect_from(v4.ip(), v4).expect("connect");
    let (code, body) = get_after(&mut client, line).expect("GET");
    assert_eq!(code, 200);
    assert_eq!(body, hex(line), "the client's own bytes reached the worker");
    assert_eq!(
        baton.metric("baton_proxy_headers_total{service=\"web\",version=\"v1\"}"),
        0.0
    );
}

/// Whether baton closed `stream` without an answer: end of stream or a reset, no byte.
fn closed_without_answer(stream: &mut TcpStream) -> Result<(), String> {
    let mut buffer = [0u8; 64];
    match stream.read(&mut buffer) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("answered: {:?}", String::from_utf8_lossy(&buffer[..n]))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

#[test]
fn hostile_headers_from_a_trusted_source_are_refused_and_everyone_else_is_served() {
    let dir = scratch();
    let baton = Baton::start(&echo_web(
        dir.path(),
        "proxy_protocol = \"v1\"\naccept_proxy_protocol = [\"127.0.0.0/8\"]\nproxy_protocol_timeout = \"1s\"",
    ));
    let (v4, _) = addresses(&baton);
    let to_worker = "baton_bytes_total{direction=\"to_worker\",service=\"web\"}";
    let sent_before = baton.metric(to_worker);
    let long_v2_length = [b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".as_slice(), &[0u8; 64]].concat();
    let long_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    let cases: [(&str, &[u8], &str); 5] = [
        ("a wrong signature", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "signature"),
        ("a v1 line past 107 bytes", &long_v1, "too_long"),
        ("a v2 length past the buffer", &long_v2_length, "too_long"),
        (
            "a malformed address",
            b"PROXY TCP4 300.1.1.1 10.0.0.1 1 2\r\n",
            "malformed",
        ),
        ("a truncated header", b"PROXY TCP4 192.0.2.7", "closed"),
    ];
    for (what, bytes, reason) in cases {
        let mut client = connect_from(v4.ip(), v4).expect("connect");
        client.write_all(bytes).expect("write");
        if reason == "closed" {
            client.shutdown(Shutdown::Write).expect("shutdown");
        }
        closed_without_answer(&mut client).unwrap_or_else(|e| panic!("{what}: {e}"));
        let series = format!("baton_proxy_headers_rejected_total{{reason=\"{reason}\",service=\"web\"}}");
        wait_for(&format!("{what} counted as {reason}"), || {
            let count = baton.metric(&series);
            (count >= 1.0).then_some(()).ok_or(format!("{series} = {count}"))
        });
    }
    // Slow: a byte a second, past the one-second deadline.
    let mut client = connect_from(v4.ip(), v4).expect("connect");
    let started = Instant::now();
    let slow = std::thread::spawn({
        let mut writer = client.try_clone().expect("clone");
        move || {
            for byte in b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n" {
                if writer.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    closed_without_answer(&mut client).expect("the slow header");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    slow.join().expect("slow writer");
    assert_eq!(
        baton.metric("baton_proxy_headers_rejected_total{reason=\"timeout\",service=\"web\"}"),
        1.0
    );
    assert_eq!(
        baton.metric("baton_connections_rejected_total{reason=\"proxy_header\",service=\"web\"}"),
        6.0
    );
    assert_eq!(baton.metric(to_worker), sent_before, "nothing reached the worker");
    // Everyone else is served: a good header from the same source.
    let mut client = connect_from(v4.ip(), v4).expect("connect");
    let (code, body) = get_after(&mut client, b"PROXY TCP4 192.0.2.7 10.0.0.1 5 6\r\n").expect("GET");
    assert_eq!(code, 200);
    assert_eq!(body, hex(b"PROXY TCP4 192.0.2.7 10.0.0.1 5 6\r\n"));
}

#[test]
fn connections_past_the_per_client_limit_are_closed_and_other_clients_are_not() {
    const LIMIT: usize = 3;
    let baton = Baton::start(&web(&[], &format!("max_connections_per_client = {LIMIT}")));
    let addr = baton.addr("web");
    let one: IpAddr = "127.0.0.1".parse().expect("ip");
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    // LIMIT open connections from one address, each answered (so each holds a worker connection).
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let mut client = connect_from(one, addr).expect("connect");
        client
            .write_all(b"GET /whoami HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        let mut buffer = [0u8; 256];
        assert!(client.read(&mut buffer).expect("read") > 0, "answered");
        held.push(client);
    }
    for _ in 0..5 {
        let mut client = connect_from(one, addr).expect("connect");
        let _ = client.write_all(b"GET /whoami HTTP/1.1\r\nHost: t\r\n\r\n");
        closed_without_answer(&mut client).expect("over the limit");
    }
    assert_eq!(
        baton.metric("baton_connections_rejected_total{reason=\"per_client_limit\",service=\"web\"}"),
        5.0
    );
    // Another address is not affected.
    for _ in 0..LIMIT {
        let mut client = connect_from(other, addr).expect("connect");
        let (code, _) = exchange_raw(&mut client, "GET", "/whoami", &[]).expect("another client");
        assert_eq!(code, 200);
    }
    // Once one closes, the first address may open one again.
    drop(held.pop());
    wait_for("a slot freed", || {
        let mut client = connect_from(one, addr).expect("connect");
        match exchange_raw(&mut client, "GET", "/whoami", &[]) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// A worker whose server speaks first, as SMTP's does: it reads the v1 header, then greets.
const GREETER: &str = r#"
import socket, sys, threading
def handle(conn):
    try:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = conn.recv(1)
            if not chunk:
                return
            line += chunk
        conn.sendall(b"220 hello " + line.split()[2] + b"\r\n")
        conn.recv(1)
    except OSError:
        pass
    finally:
        conn.close()
"#;

#[test]
fn a_server_that_speaks_first_gets_its_header_at_once() {
    let dir = scratch();
    let script = dir.path().join("greeter.py");
    python_worker(&script, GREETER);
    let baton = Baton::start(&format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"python3\", {:?}, \"{{port}}\"]\nproxy_protocol = \"v1\"\n",
        script.display().to_string()
    ));
    let v4 = baton.addr("web");
    // The client sends nothing and waits for the greeting: the header must not wait for the client's bytes.
    let mut client = connect_from(v4.ip(), v4).expect("connect");
    let mut greeting = [0u8; 64];
    let n = client.read(&mut greeting).expect("the greeting");
    assert_eq!(&greeting[..n], b"220 hello 127.0.0.1\r\n");
    drop(client);
    assert_eq!(baton.stop().code(), Some(0));
}
