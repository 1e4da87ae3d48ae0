//! The PROXY protocol, versions 1 (text) and 2 (binary): the header baton sends a worker ahead of a
//! connection's bytes so that the worker learns the client's address, and the header a load balancer in
//! front of baton sends it, read from the sources trusted to send one.
//!
//! Parsing and building the headers are the `ppp` crate's. This module decides what is accepted, and
//! strictly: a known signature, a v1 line of at most [`V1_MAX`] bytes ending in CRLF, a v2 header of at
//! most [`V2_MAX`] bytes whose length covers its address block and TLVs exactly, stream or unspecified
//! transport. It reads a header off a socket without taking a byte past it ([`read`]), and builds the one
//! sent on ([`encode`]). Nothing here panics on any input.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

use ppp::v2;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// The longest v1 header, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;

/// The longest v2 header accepted, its 16-byte fixed part included: room for an IPv6 address block and
/// well over a kilobyte of TLVs. The format allows 65,551 bytes; a longer one than this is refused.
pub const V2_MAX: usize = 4096;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The start of every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// The v2 fixed part: signature, version and command, family and transport, length.
const V2_FIXED: usize = 16;

/// The version of the header baton sends its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text header.
    V1,
    /// The binary header, which carries TLVs.
    V2,
}

impl Version {
    /// Its name in the configuration and in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

impl FromStr for Version {
    type Err = ();

    fn from_str(s: &str) -> Result<Version, ()> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            _ => Err(()),
        }
    }
}

/// A header read from a trusted source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Which version it was.
    pub version: Version,
    /// The addresses it carries, source (the client) first; `None` for a v2 `LOCAL` command, a v1
    /// `UNKNOWN` or a family other than IPv4 and IPv6, for which the connection's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Its v2 TLVs, as they came (empty for v1).
    pub tlvs: Vec<u8>,
}

/// Why a header from a trusted source was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The first bytes are neither a v1 nor a v2 signature.
    #[error("no PROXY protocol signature")]
    Signature,
    /// Longer than [`V1_MAX`] or [`V2_MAX`].
    #[error("the header is longer than {0} bytes")]
    TooLong(usize),
    /// The signature is right but the header is not.
    #[error("malformed header: {0}")]
    Malformed(String),
    /// The whole header did not come within the deadline.
    #[error("no complete header within the deadline")]
    Timeout,
    /// The source closed the connection before the header was complete.
    #[error("the connection closed before the header was complete")]
    Closed,
    /// Reading the socket failed.
    #[error("reading the header: {0}")]
    Io(String),
}

impl Rejected {
    /// Its label in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejected::Signature => "signature",
            Rejected::TooLong(_) => "too_long",
            Rejected::Malformed(_) => "malformed",
            Rejected::Timeout => "timeout",
            Rejected::Closed => "closed",
            Rejected::Io(_) => "io",
        }
    }

    /// Every label, for metrics that start at zero.
    pub const LABELS: [&'static str; 6] = ["signature", "too_long", "malformed", "timeout", "closed", "io"];
}

/// What the bytes read so far make of a header.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header so far: at least this many bytes in all are needed before it can be told more.
    Incomplete(usize),
    /// A whole header, this many bytes long.
    Header(Received, usize),
}

/// Parses the start of `bytes` as a v1 or v2 header. Bytes past the header are not looked at.
pub fn parse(bytes: &[u8]) -> Result<Parsed, Rejected> {
    let prefix_of = |signature: &[u8]| signature.starts_with(&bytes[..bytes.len().min(signature.len())]);
    let (v1, v2) = (prefix_of(V1_PREFIX), prefix_of(V2_SIGNATURE));
    if bytes.is_empty() {
        return Ok(Parsed::Incomplete(V1_PREFIX.len()));
    }
    if v2 {
        return parse_v2(bytes);
    }
    if v1 {
        return parse_v1(bytes);
    }
    Err(Rejected::Signature)
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, Rejected> {
    if bytes.len() < V2_FIXED {
        return Ok(Parsed::Incomplete(V2_FIXED));
    }
    let total = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if total > V2_MAX {
        return Err(Rejected::TooLong(V2_MAX));
    }
    if bytes.len() < total {
        return Ok(Parsed::Incomplete(total));
    }
    let header = v2::Header::try_from(&bytes[..total]).map_err(|e| Rejected::Malformed(e.to_string()))?;
    // Every TLV must lie within the header: iterating checks each one's length.
    for tlv in header.tlvs() {
        tlv.map_err(|e| Rejected::Malformed(e.to_string()))?;
    }
    let addresses = match (header.command, header.protocol, header.addresses) {
        (_, v2::Protocol::Datagram, _) => {
            return Err(Rejected::Malformed("a datagram header on a stream connection".into()));
        }
        (v2::Command::Local, _, _) => None,
        (v2::Command::Proxy, _, v2::Addresses::IPv4(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (v2::Command::Proxy, _, v2::Addresses::IPv6(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        // Unix and unspecified families: the receiver uses the connection's own addresses.
        (v2::Command::Proxy, _, _) => None,
    };
    let received = Received {
        version: Version::V2,
        addresses,
        tlvs: header.tlv_bytes().to_vec(),
    };
    Ok(Parsed::Header(received, total))
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, Rejected> {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|pair| pair == b"\r\n").map(|at| at + 2) else {
        if bytes.len() >= V1_MAX {
            return Err(Rejected::TooLong(V1_MAX));
        }
        // At least the CRLF is still to come.
        return Ok(Parsed::Incomplete(
            bytes.len() + if bytes.ends_with(b"\r") { 1 } else { 2 },
        ));
    };
    let line =
        std::str::from_utf8(&bytes[..end]).map_err(|_| Rejected::Malformed("a v1 header that is not ASCII".into()))?;
    if !line.is_ascii() {
        return Err(Rejected::Malformed("a v1 header that is not ASCII".into()));
    }
    let header = ppp::v1::Header::try_from(line).map_err(|e| Rejected::Malformed(e.to_string()))?;
    let addresses = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Unknown => None,
    };
    let received = Received {
        version: Version::V1,
        addresses,
        tlvs: Vec::new(),
    };
    Ok(Parsed::Header(received, end))
}

/// The header to send ahead of a connection: `addresses` (client, then baton's public address) with the
/// v2 `PROXY` command or in a v1 `TCP4`/`TCP6` line, or none (a probe: v2 `LOCAL`, v1 `UNKNOWN`). IPv4
/// addresses mapped into IPv6 are sent as IPv4; if the two are still of different families, both go as
/// IPv6. `tlvs` (raw, as [`Received::tlvs`]) go in a v2 header as they are, and are dropped from v1,
/// which has none; so are TLVs that would make the header longer than the format allows.
pub fn encode(version: Version, addresses: Option<(SocketAddr, SocketAddr)>, tlvs: &[u8]) -> Vec<u8> {
    let addresses = addresses.map(|(source, destination)| same_family(canonical(source), canonical(destination)));
    match version {
        Version::V1 => match addresses {
            Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
                format!("PROXY TCP4 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
            }
            Some((s, d)) => format!("PROXY TCP6 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes(),
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        Version::V2 => {
            let (command, addresses) = match addresses {
                Some((SocketAddr::V4(s), SocketAddr::V4(d))) => (
                    v2::Command::Proxy,
                    v2::Addresses::IPv4(v2::IPv4::new(*s.ip(), *d.ip(), s.port(), d.port())),
                ),
                Some((s, d)) => (
                    v2::Command::Proxy,
                    v2::Addresses::IPv6(v2::IPv6::new(to_v6(s.ip()), to_v6(d.ip()), s.port(), d.port())),
                ),
                None => (v2::Command::Local, v2::Addresses::Unspecified),
            };
            let protocol = match command {
                v2::Command::Proxy => v2::Protocol::Stream,
                v2::Command::Local => v2::Protocol::Unspecified,
            };
            let builder = v2::Builder::with_addresses(v2::Version::Two | command, protocol, addresses);
            let room = V2_MAX - V2_FIXED - 36;
            let tlvs = if tlvs.len() <= room { tlvs } else { &[][..] };
            builder
                .write_payload(tlvs)
                .and_then(v2::Builder::build)
                .expect("a v2 header of at most V2_MAX bytes builds")
        }
    }
}

/// An IPv4 address mapped into IPv6 as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Both as IPv6 unless both are IPv4.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (source, destination),
        _ => {
            let v6 = |a: SocketAddr| SocketAddr::V6(SocketAddrV6::new(to_v6(a.ip()), a.port(), 0, 0));
            (v6(source), v6(destination))
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The address a source is matched against the trusted networks by: an IPv4 address mapped into IPv6
/// (a dual-stack listener's view of an IPv4 client) as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Reads a header off `stream`, taking no byte past it: what follows stays in the socket for the relay.
/// Looks at the bytes that have come (`MSG_PEEK`) and takes only those that are part of the header; the
/// caller bounds the wait with a deadline. Refuses, at the first byte that shows it, anything that is not
/// a header.
pub async fn read(stream: &TcpStream) -> Result<Received, Rejected> {
    let mut header = Vec::with_capacity(V2_FIXED);
    let mut look = vec![0u8; V2_MAX];
    loop {
        let seen = stream
            .peek(&mut look[..V2_MAX - header.len()])
            .await
            .map_err(|e| Rejected::Io(e.to_string()))?;
        if seen == 0 {
            return Err(Rejected::Closed);
        }
        // The header's part of what was seen: up to its end if that has come; otherwise all of it (it is
        // all header so far), after which the next look waits for more.
        let mut candidate = header.clone();
        candidate.extend_from_slice(&look[..seen]);
        match parse(&candidate)? {
            Parsed::Header(received, length) => {
                let rest = length - header.len();
                take_exactly(stream, &mut header, rest).await?;
                return Ok(received);
            }
            Parsed::Incomplete(_) => take_exactly(stream, &mut header, seen).await?,
        }
    }
}

/// Reads `count` bytes that [`TcpStream::peek`] has shown are there onto `into`.
async fn take_exactly(stream: &TcpStream, into: &mut Vec<u8>, count: usize) -> Result<(), Rejected> {
    let start = into.len();
    into.resize(start + count, 0);
    let mut filled = start;
    while filled < into.len() {
        match stream.try_read(&mut into[filled..]) {
            Ok(0) => return Err(Rejected::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stream.readable().await.map_err(|e| Rejected::Io(e.to_string()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Rejected::Io(e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn v4(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_v1_header_is_read_whole_and_what_follows_is_left() {
        let bytes = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let Ok(Parsed::Header(received, length)) = parse(bytes) else {
            panic!("a header");
        };
        assert_eq!(length, 45);
        assert_eq!(received.version, Version::V1);
        assert_eq!(
            received.addresses,
            Some((v4("192.0.2.7:51234"), v4("198.51.100.1:443")))
        );
    }

    #[test]
    fn a_v1_header_of_ipv6_addresses_and_an_unknown_one() {
        let bytes = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 80\r\n";
        let Ok(Parsed::Header(received, _)) = parse(bytes) else {
            panic!("a header");
        };
        assert_eq!(
            received.addresses,
            Some((v4("[2001:db8::7]:40000"), v4("[2001:db8::1]:80")))
        );
        let Ok(Parsed::Header(unknown, 15)) = parse(b"PROXY UNKNOWN\r\n") else {
            panic!("an UNKNOWN header");
        };
        assert_eq!(unknown.addresses, None);
    }

    #[test]
    fn incomplete_headers_ask_for_more_and_wrong_ones_are_refused_at_once() {
        assert_eq!(parse(b""), Ok(Parsed::Incomplete(6)));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete(5)));
        assert_eq!(parse(b"\r\n\r\n\0"), Ok(Parsed::Incomplete(16)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Rejected::Signature));
        assert_eq!(parse(b"\r\n\r\nX"), Err(Rejected::Signature));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(Rejected::TooLong(V1_MAX)));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.0.1 1.2.3.4 1 2\r\n"),
            Err(Rejected::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 ::1 1 2\r\n"),
            Err(Rejected::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n"),
            Err(Rejected::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n"),
            Err(Rejected::Malformed(_))
        ));
    }

    #[test]
    fn a_v2_header_carries_its_addresses_and_tlvs() {
        let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00];
        let bytes = encode(
            Version::V2,
            Some((v4("192.0.2.7:51234"), v4("198.51.100.1:443"))),
            &tlvs,
        );
        assert_eq!(&bytes[..12], V2_SIGNATURE);
        assert_eq!(bytes[12], 0x21, "version 2, PROXY");
        assert_eq!(bytes[13], 0x11, "IPv4, stream");
        let Ok(Parsed::Header(received, length)) = parse(&[&bytes[..], b"after"].concat()) else {
            panic!("a header");
        };
        assert_eq!(length, bytes.len());
        assert_eq!(
            received.addresses,
            Some((v4("192.0.2.7:51234"), v4("198.51.100.1:443")))
        );
        assert_eq!(received.tlvs, tlvs);
    }

    #[test]
    fn hostile_v2_headers_are_refused() {
        let good = encode(Version::V2, Some((v4("[2001:db8::7]:1"), v4("[2001:db8::1]:2"))), &[]);
        // A length past what is accepted.
        let mut long = good.clone();
        long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&long), Err(Rejected::TooLong(V2_MAX)));
        // A length too short for the address block.
        let mut short = good.clone();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(parse(&short), Err(Rejected::Malformed(_))));
        // A TLV that runs past the header.
        let mut tlv = encode(
            Version::V2,
            Some((v4("192.0.2.7:1"), v4("192.0.2.8:2"))),
            &[0x04, 0x00, 0x00],
        );
        let last = tlv.len() - 1;
        tlv[last] = 9;
        assert!(matches!(parse(&tlv), Err(Rejected::Malformed(_))));
        // A wrong version, an unknown command, a datagram transport.
        for (at, byte) in [(12, 0x11), (12, 0x2f), (13, 0x22)] {
            let mut bad = good.clone();
            bad[at] = byte;
            assert!(
                matches!(parse(&bad), Err(Rejected::Malformed(_))),
                "byte {at} = {byte:#x}"
            );
        }
    }

    #[test]
    fn probes_send_local_and_unknown() {
        assert_eq!(encode(Version::V1, None, &[]), b"PROXY UNKNOWN\r\n");
        let local = encode(Version::V2, None, &[]);
        assert_eq!(local.len(), 16);
        assert_eq!(local[12], 0x20, "version 2, LOCAL");
        let Ok(Parsed::Header(received, 16)) = parse(&local) else {
            panic!("a LOCAL header");
        };
        assert_eq!(received.addresses, None);
    }

    #[test]
    fn mapped_and_mixed_addresses_go_as_one_family() {
        let mapped = v4("[::ffff:192.0.2.7]:1000");
        let header = encode(Version::V1, Some((mapped, v4("192.0.2.1:80"))), &[]);
        assert_eq!(header, b"PROXY TCP4 192.0.2.7 192.0.2.1 1000 80\r\n");
        let header = encode(Version::V1, Some((v4("192.0.2.7:1000"), v4("[2001:db8::1]:80"))), &[]);
        assert_eq!(header, b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1000 80\r\n");
        assert_eq!(
            canonical_ip("::ffff:10.1.2.3".parse().expect("ip")),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
    }

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port)))
                .prop_filter("not mapped", |a| canonical(*a) == *a),
        ]
    }

    fn tlvs() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..5).prop_map(|tlvs| {
            tlvs.into_iter()
                .flat_map(|(kind, value)| {
                    let length = u16::try_from(value.len()).unwrap_or(0).to_be_bytes();
                    [vec![kind], length.to_vec(), value].concat()
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
            let _ = parse(&[b"PROXY ".as_slice(), &bytes].concat());
            let _ = parse(&[V2_SIGNATURE.as_slice(), &bytes].concat());
        }

        #[test]
        fn a_header_round_trips(
            source in address(),
            destination in address(),
            tlvs in tlvs(),
            v2 in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let header = encode(version, Some((source, destination)), &tlvs);
            let parsed = parse(&[&header[..], &rest].concat());
            let Ok(Parsed::Header(received, length)) = parsed else {
                return Err(TestCaseError::fail(format!("{parsed:?}")));
            };
            prop_assert_eq!(length, header.len());
            prop_assert_eq!(received.addresses, Some(same_family(source, destination)));
            prop_assert_eq!(received.tlvs, if v2 { tlvs } else { Vec::new() });
            // Every prefix of it is incomplete, never refused.
            for cut in 0..header.len() {
                prop_assert!(matches!(parse(&header[..cut]), Ok(Parsed::Incomplete(_))), "cut at {}", cut);
            }
        }
    }
}
