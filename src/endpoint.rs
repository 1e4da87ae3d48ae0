//! [`Endpoint`], "a TCP address or a Unix socket path", and everything done with one that is not the data path:
//! parsing its text form, printing it, writing it out (serde), listening on it and dialling it.
//!
//! The admin API listens on an endpoint, a worker listens on one, and the readiness probe and the CLI dial
//! one; they all use this type, so that "TCP or Unix" is spelled out once. The text form is `host:port`
//! (`127.0.0.1:9900`, `[::1]:9900`) or `unix:/absolute/path`. This module never touches a proxied
//! connection: `proxy` dials workers itself, with the socket options and costs of the data path.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The prefix that marks a Unix socket path in the text form.
const UNIX_PREFIX: &str = "unix:";

/// A TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path; absolute when it was parsed.
    Unix(PathBuf),
}

/// Why a text is not an [`Endpoint`]. The messages name the text but not the setting: the caller prefixes
/// it (``admin: listen `x` is not an address ...``).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `unix:` followed by a path that is not absolute.
    #[error("`unix:` needs an absolute path, like \"unix:/run/baton/admin.sock\"")]
    RelativeUnixPath,
    /// Neither `unix:/path` nor `host:port` with a numeric host.
    #[error("`{0}` is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\"")]
    NotAnAddress(String),
}

/// Parses a TCP address, `127.0.0.1:8080` or `[::1]:8080`, with the error an [`Endpoint`] gives.
pub fn socket_addr(text: &str) -> Result<SocketAddr, EndpointError> {
    text.parse().map_err(|_| EndpointError::NotAnAddress(text.to_owned()))
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Endpoint, EndpointError> {
        match text.strip_prefix(UNIX_PREFIX) {
            Some(path) if path.starts_with('/') => Ok(Endpoint::Unix(PathBuf::from(path))),
            Some(_) => Err(EndpointError::RelativeUnixPath),
            None => socket_addr(text).map(Endpoint::Tcp),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Written as its text form. A Unix path that the text form cannot carry back (not UTF-8, or not absolute)
/// is refused rather than written in a form that would read back as another path.
impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Endpoint::Tcp(addr) => serializer.collect_str(addr),
            Endpoint::Unix(path) => match path.to_str() {
                Some(text) if path.is_absolute() => serializer.collect_str(&format_args!("{UNIX_PREFIX}{text}")),
                _ => Err(serde::ser::Error::custom(format!(
                    "unix socket path {} is not an absolute UTF-8 path",
                    path.display()
                ))),
            },
        }
    }
}

/// Read from its text form, with the errors of [`Endpoint::from_str`].
impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Endpoint, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Endpoint {
    /// Listens on the endpoint. A Unix socket is created with mode 0600 before it appears at its path (it is
    /// bound under a temporary name and renamed into place), and replaces a stale socket left there, never a
    /// file of another kind; it is removed when the listener drops.
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            Endpoint::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                let local = Endpoint::Tcp(listener.local_addr()?);
                Ok(Listener {
                    socket: Socket::Tcp(TcpListener::from_std(listener)?),
                    local,
                })
            }
            Endpoint::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is in the way",
                        ));
                    }
                }
                let staging = path.with_extension(format!("{}.tmp", std::process::id()));
                let _ = std::fs::remove_file(&staging);
                let listener = std::os::unix::net::UnixListener::bind(&staging).and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    UnixListener::from_std(listener)
                });
                // From here on the socket is removed if the rest fails, under whichever name it has.
                let mut socket = match listener {
                    Ok(listener) => UnixSocket {
                        listener,
                        path: staging,
                    },
                    Err(e) => {
                        let _ = std::fs::remove_file(&staging);
                        return Err(e);
                    }
                };
                std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&socket.path, path)?;
                socket.path = path.clone();
                Ok(Listener {
                    socket: Socket::Unix(socket),
                    local: self.clone(),
                })
            }
        }
    }

    /// Listens on `fd`, a socket a previous image of baton listened on at this endpoint. Must run inside the
    /// runtime. Fails if `fd` is not a listening socket of the endpoint's kind.
    pub fn adopt(&self, fd: std::os::fd::OwnedFd) -> io::Result<Listener> {
        let socket = socket2::Socket::from(fd);
        if !socket.is_listener()? {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening socket"));
        }
        socket.set_nonblocking(true)?;
        match self {
            Endpoint::Tcp(_) => {
                let listener = std::net::TcpListener::from(socket);
                let local = Endpoint::Tcp(listener.local_addr()?);
                Ok(Listener {
                    socket: Socket::Tcp(TcpListener::from_std(listener)?),
                    local,
                })
            }
            Endpoint::Unix(path) => Ok(Listener {
                socket: Socket::Unix(UnixSocket {
                    listener: UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))?,
                    path: path.clone(),
                }),
                local: self.clone(),
            }),
        }
    }

    /// Dials the endpoint.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => Ok(Stream::Tcp(TcpStream::connect(addr).await?)),
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }

    /// The Unix socket path, if it is one.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Tcp(_) => None,
            Endpoint::Unix(path) => Some(path),
        }
    }
}

/// A listening socket bound with [`Endpoint::bind`].
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    socket: Socket,
    /// The address actually bound: a TCP port 0 replaced by the port the kernel chose.
    local: Endpoint,
}

/// The socket of a [`Listener`].
#[derive(Debug)]
enum Socket {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket, removed from its path when dropped.
    Unix(UnixSocket),
}

/// A Unix listening socket and the path it is bound to.
#[derive(Debug)]
struct UnixSocket {
    /// The socket.
    listener: UnixListener,
    /// Where it is bound, removed on drop.
    path: PathBuf,
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener {
    /// The address actually bound.
    pub fn local(&self) -> &Endpoint {
        &self.local
    }

    /// The listening socket's file descriptor, for a handover.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.socket {
            Socket::Tcp(listener) => listener.as_raw_fd(),
            Socket::Unix(socket) => socket.listener.as_raw_fd(),
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<Stream> {
        match &self.socket {
            Socket::Tcp(listener) => listener.accept().await.map(|(stream, _)| Stream::Tcp(stream)),
            Socket::Unix(socket) => socket.listener.accept().await.map(|(stream, _)| Stream::Unix(stream)),
        }
    }
}

/// A connection to or from an [`Endpoint`]: a TCP or a Unix stream, read and written alike.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(stream) => stream.is_write_vectored(),
            Stream::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn parse(text: &str) -> Result<Endpoint, EndpointError> {
        text.parse()
    }

    #[test]
    fn the_text_form_parses_and_prints_back() {
        for text in ["127.0.0.1:9900", "[::1]:8080", "unix:/run/baton/admin.sock"] {
            let endpoint = parse(text).expect("valid");
            assert_eq!(endpoint.to_string(), text);
        }
        assert_eq!(
            parse("127.0.0.1:9900"),
            Ok(Endpoint::Tcp("127.0.0.1:9900".parse().expect("address")))
        );
        assert_eq!(parse("unix:/x.sock"), Ok(Endpoint::Unix(PathBuf::from("/x.sock"))));
        assert_eq!(
            parse("unix:/x.sock").expect("valid").unix_path(),
            Some(Path::new("/x.sock"))
        );
    }

    #[test]
    fn a_bad_text_is_refused_with_the_config_wording() {
        for text in ["unix:", "unix:admin.sock", "unix:./admin.sock"] {
            assert_eq!(parse(text), Err(EndpointError::RelativeUnixPath), "{text}");
        }
        assert_eq!(
            parse("unix:x").expect_err("relative").to_string(),
            "`unix:` needs an absolute path, like \"unix:/run/baton/admin.sock\""
        );
        for text in ["", "localhost:80", "127.0.0.1", "127.0.0.1:80800", "/run/x.sock"] {
            assert_eq!(
                parse(text).expect_err("not an address").to_string(),
                format!("`{text}` is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\"")
            );
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let endpoints = vec![
            Endpoint::Tcp("127.0.0.1:9900".parse().expect("address")),
            Endpoint::Unix(PathBuf::from("/run/baton/admin.sock")),
        ];
        let text = serde_json::to_string(&endpoints).expect("serialisable");
        assert_eq!(text, r#"["127.0.0.1:9900","unix:/run/baton/admin.sock"]"#);
        let back: Vec<Endpoint> = serde_json::from_str(&text).expect("readable");
        assert_eq!(back, endpoints);
        let error = serde_json::from_str::<Endpoint>(r#""unix:relative""#).expect_err("relative");
        assert!(error.to_string().contains("needs an absolute path"), "{error}");
        assert!(serde_json::to_string(&Endpoint::Unix(PathBuf::from("relative"))).is_err());
    }

    /// Writes a line through `client` and reads it back through the accepted end.
    async fn exchange(listener: &Listener) {
        let (client, server) = tokio::join!(listener.local().connect(), listener.accept());
        let (mut client, mut server) = (client.expect("connect"), server.expect("accept"));
        client.write_all(b"ping\n").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        assert_eq!(received, b"ping\n");
    }

    #[tokio::test]
    async fn a_tcp_endpoint_reports_the_port_it_bound() {
        let listener = parse("127.0.0.1:0").expect("valid").bind().expect("bind");
        let Endpoint::Tcp(addr) = listener.local() else {
            panic!("a TCP endpoint binds a TCP socket: {:?}", listener.local());
        };
        assert_ne!(addr.port(), 0);
        exchange(&listener).await;
    }

    #[tokio::test]
    async fn a_unix_endpoint_is_private_replaces_a_stale_socket_and_is_removed_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("admin.sock");
        let endpoint = Endpoint::Unix(path.clone());
        // A socket left behind by a process that is gone.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        let listener = endpoint.bind().expect("bind over a stale socket");
        assert_eq!(listener.local(), &endpoint);
        let mode = std::fs::metadata(&path).expect("socket exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        exchange(&listener).await;
        drop(listener);
        assert!(!path.exists(), "the socket is removed on drop");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert!(leftovers.is_empty(), "no staging file is left: {leftovers:?}");
    }

    #[tokio::test]
    async fn a_unix_endpoint_never_replaces_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, "data").expect("write");
        let error = Endpoint::Unix(path.clone()).bind().expect_err("a file is in the way");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).expect("still there"), "data");
    }

    #[tokio::test]
    async fn dialling_nobody_fails() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = Endpoint::Unix(dir.path().join("none.sock"))
            .connect()
            .await
            .expect_err("nobody listens");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
