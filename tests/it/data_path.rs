//! Bytes through baton: both directions, half-closes, large transfers, both backends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::{Baton, DEADLINE, next, resident_kib, service};

fn echo_service(backend: &str) -> String {
    let address = if backend == "unix" { "{socket}" } else { "{port}" };
    let flag = if backend == "unix" { "--socket" } else { "--port" };
    service("echo", &[flag, address], &format!("backend = \"{backend}\""))
}

fn half_close_passes_through(backend: &str) {
    let baton = Baton::start(&echo_service(backend));
    let mut stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let message: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&message).expect("write");
    // The client is done sending; the worker must still be able to send everything back.
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = Vec::new();
    stream
        .read_to_end(&mut echoed)
        .expect("read until the worker's half-close");
    assert_eq!(echoed.len(), message.len());
    assert!(echoed == message, "the echo differs from what was sent");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_client_half_close_reaches_the_worker_and_the_reply_still_flows_over_tcp() {
    half_close_passes_through("tcp");
}

#[test]
fn a_client_half_close_reaches_the_worker_and_the_reply_still_flows_over_unix() {
    half_close_passes_through("unix");
}

fn large_transfer_is_byte_exact(backend: &str) {
    const SIZE: usize = 64 << 20;
    let baton = Baton::start(&echo_service(backend));
    let stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let mut rng = 42u64;
        let mut sum = Checksum::default();
        let mut chunk = vec![0u8; 1 << 16];
        let mut sent = 0;
        while sent < SIZE {
            chunk.iter_mut().for_each(|b| *b = next(&mut rng) as u8);
            writer.write_all(&chunk).expect("write");
            sum.add(&chunk);
            sent += chunk.len();
        }
        writer.shutdown(Shutdown::Write).expect("half-close");
        sum
    });
    let mut reader = stream;
    let mut sum = Checksum::default();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        sum.add(&chunk[..n]);
    }
    let sent = sender.join().expect("sender");
    assert_eq!(sum.len, SIZE as u64, "bytes received");
    assert_eq!(sum, sent, "checksum of what came back");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn sixty_four_mebibytes_come_back_byte_exact_over_tcp() {
    large_transfer_is_byte_exact("tcp");
}

#[test]
fn sixty_four_mebibytes_come_back_byte_exact_over_unix() {
    large_transfer_is_byte_exact("unix");
}

/// Fletcher-style checksum over a stream: position-sensitive and cheap.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checksum {
    a: u64,
    b: u64,
    len: u64,
}

impl Checksum {
    fn add(&mut self, data: &[u8]) {
        for &byte in data {
            self.a = (self.a + u64::from(byte)) % 0xFFFF_FFFB;
            self.b = (self.b + self.a) % 0xFFFF_FFFB;
        }
        self.len += data.len() as u64;
    }
}

#[test]
fn a_worker_reset_resets_the_client() {
    let baton = Baton::start(&echo_service("tcp"));
    let mut stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(b"RSET").expect("write");
    let mut buf = [0u8; 16];
    let error = stream
        .read(&mut buf)
        .expect_err("the worker's reset reaches the client as a reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    crate::support::wait_for("the reset to be counted", || {
        let resets = baton.metric(r#"baton_connection_errors_total{kind="reset",service="echo",side="worker"}"#);
        if resets >= 1.0 {
            Ok(())
        } else {
            Err(format!("{resets}"))
        }
    });
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_client_reset_mid_transfer_resets_the_worker_side() {
    let baton = Baton::start(&echo_service("tcp"));
    let mut stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(&[7u8; 100_000]).expect("write");
    let mut buf = [0u8; 1000];
    stream.read_exact(&mut buf).expect("the echo starts");
    // Close with unread data and no linger: a reset.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(stream);
    let line = baton.wait_log_text("test worker: echo failed");
    assert!(line.contains("reset") || line.contains("Broken pipe"), "{line}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_half_close_lets_the_client_keep_sending_byte_exact() {
    let baton = Baton::start(&echo_service("tcp"));
    let mut stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(b"HALF").expect("write");
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).expect("the worker's side ends");
    assert_eq!(greeting, b"half-closed\n");
    // The other direction still flows.
    let mut rng = 7u64;
    let data: Vec<u8> = (0..1_000_000).map(|_| next(&mut rng) as u8).collect();
    stream.write_all(&data).expect("write after the worker's half-close");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in &data {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    baton.wait_log_text(&format!("got {} bytes, fnv {hash:016x}", data.len()));
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_slow_reader_keeps_batons_memory_flat_through_a_gibibyte() {
    const SIZE: u64 = 1 << 30;
    let baton = Baton::start(&echo_service("tcp"));
    let rss_before = resident_kib(baton.pid());
    let mut stream = TcpStream::connect(baton.addr("echo")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(format!("SEND {SIZE}\n").as_bytes()).expect("write");
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    let mut peak = rss_before;
    while received < SIZE {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "ended early at {received}");
        received += n as u64;
        // A slow reader: it stops for a moment every 64 MiB while the worker keeps pushing.
        if received % (64 << 20) < n as u64 {
            std::thread::sleep(Duration::from_millis(100));
            peak = peak.max(resident_kib(baton.pid()));
        }
    }
    assert_eq!(received, SIZE);
    assert!(
        peak < rss_before + 8 * 1024,
        "baton grew from {rss_before} KiB to {peak} KiB: no backpressure"
    );
    eprintln!("1 GiB to a slow reader: baton's resident memory {rss_before} KiB before, {peak} KiB at most");
    drop(stream);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn one_service_listens_on_ipv4_and_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let config = echo_service("tcp").replace(r#"listen = ["127.0.0.1:0"]"#, r#"listen = ["127.0.0.1:0", "[::1]:0"]"#);
    let baton = Baton::start(&config);
    let listen = baton.service("echo")["listen"].clone();
    let addrs: Vec<std::net::SocketAddr> = listen
        .as_array()
        .expect("listen")
        .iter()
        .map(|a| a.as_str().and_then(|a| a.parse().ok()).expect("address"))
        .collect();
    assert_eq!(addrs.len(), 2, "{listen}");
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{listen}");
    for addr in addrs {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        stream.write_all(b"hello").expect("write");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).expect("read");
        assert_eq!(echoed, b"hello", "through {addr}");
    }
    assert_eq!(baton.stop().code(), Some(0));
}
