//! Resending: bytes a worker closed on without reading them go to the current worker on a new connection, so
//! the client never sees that close; bytes a worker did read are never sent twice.

use std::io::{Read, Write};

use crate::support::{Baton, KeepAlive, service, wait_for, worker};

const RESENT: &str = "baton_connections_resent_total{service=\"web\"}";

fn closing_worker(after: &str, extra: &str) -> Baton {
    Baton::start(&service(
        "web",
        &["--port", "{port}", "--close-unread-after", after],
        extra,
    ))
}

/// The client's next request fails (`why`): the worker's close reached it, and nothing was resent.
fn expect_the_close_and_no_resend(baton: Baton, mut client: KeepAlive, why: &str) {
    client.whoami().expect_err(why);
    drop(client);
    assert_eq!(baton.metric(RESENT), 0.0);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_request_the_worker_closed_on_unread_is_answered_on_a_new_connection() {
    // Each worker connection answers one request, then closes on the next one without reading it.
    let baton = closing_worker("1", "");
    let mut client = KeepAlive::connect(baton.addr("web"));
    for request in 0..4 {
        assert_eq!(client.whoami().unwrap_or_else(|e| panic!("request {request}: {e}")), 1);
    }
    assert_eq!(baton.metric(RESENT), 3.0);
    let closes = baton.log_text().matches("closing on an unread request").count();
    assert_eq!(closes, 3, "each resend followed a close on an unread request");
    drop(client);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn with_resend_unanswered_off_the_client_sees_the_close() {
    let baton = closing_worker("1", "resend_unanswered = false");
    let mut client = KeepAlive::connect(baton.addr("web"));
    assert_eq!(client.whoami().expect("the first request is answered"), 1);
    expect_the_close_and_no_resend(baton, client, "the worker closed on the second request");
}

#[test]
fn a_connection_the_worker_never_answered_is_not_resent() {
    // Without an answer first, the stream may not be request and response (a client that only sends, say):
    // its bytes are not resent.
    // Readiness by connecting only: the worker closes on the first bytes of every connection.
    let baton = Baton::start(&format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\"]\ncommand = [{:?}, \"--port\", \"{{port}}\", \
         \"--close-unread-after\", \"0\"]\n",
        worker()
    ));
    let client = KeepAlive::connect(baton.addr("web"));
    expect_the_close_and_no_resend(baton, client, "the worker closed on the first request");
}

#[test]
fn a_request_the_worker_read_is_never_sent_twice() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    let mut client = KeepAlive::connect(baton.addr("web"));
    assert_eq!(client.whoami().expect("answered"), 1);
    // The worker reads this one, then closes without answering: it may have acted on it, so it stays lost.
    let stream = client.stream();
    stream
        .write_all(b"POST /drop HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        .expect("write");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no answer: {}", String::from_utf8_lossy(&rest));
    // baton decides whether to resend before it passes the close on, so the count is final.
    wait_for("the worker's note", || {
        let text = baton.log_text();
        text.contains("dropped a request").then_some(()).ok_or(text)
    });
    drop(client);
    assert_eq!(baton.log_text().matches("dropped a request").count(), 1);
    assert_eq!(baton.metric(RESENT), 0.0);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_resent_connection_sends_its_proxy_protocol_header_to_the_new_worker_connection_too() {
    // Each worker connection answers one request, then closes on the next one unread: every request after
    // the first goes on a new worker connection, which must begin with the client's header too.
    let baton = Baton::start(&service(
        "web",
        &["--port", "{port}", "--close-unread-after", "1", "--proxy-protocol"],
        "proxy_protocol = \"v1\"\noutput = \"log\"",
    ));
    let addr = baton.addr("web");
    let mut client = KeepAlive::connect(addr);
    let port = client.stream().local_addr().expect("local").port();
    for request in 0..3 {
        assert_eq!(client.whoami().unwrap_or_else(|e| panic!("request {request}: {e}")), 1);
    }
    assert_eq!(baton.metric(RESENT), 2.0);
    let header = format!("PROXY header PROXY TCP4 127.0.0.1 127.0.0.1 {port} {}", addr.port());
    wait_for("a header on each of the three worker connections", || {
        let seen = baton.log_text().matches(&header).count();
        (seen == 3).then_some(()).ok_or(format!("{seen} of `{header}`"))
    });
    assert!(
        baton.log_text().contains("PROXY header PROXY UNKNOWN"),
        "the probe's header"
    );
    drop(client);
    assert_eq!(baton.stop().code(), Some(0));
}
