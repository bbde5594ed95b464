//! An HTTP/2 client for the balancer's tests (the `h2` crate on tokio): over
//! any stream (h2c on a plain socket, or TLS), one request at a time.
//!
//! Kept apart from `support/mod.rs`, which the backend's tests share and
//! which has no HTTP/2 library there; a test file includes it with
//! `#[path = "support/http2.rs"] mod http2;`.

#![allow(dead_code)] // each test file uses its own part of this module

use std::future::Future;

use bytes::Bytes;

use crate::support::Reply;

/// Runs `future` to its end on a runtime of its own.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// GET `uri` with `headers` on an open HTTP/2 connection.
pub async fn get(
    send: &h2::client::SendRequest<Bytes>,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut send = send
        .clone()
        .ready()
        .await
        .map_err(|e| format!("the connection is not ready: {e}"))?;
    let mut request = http::Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).map_err(|e| e.to_string())?;
    let (response, _) = send
        .send_request(request, true)
        .map_err(|e| format!("send: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&got).into_owned(),
    })
}

/// GET `path` with `headers` over a new h2c (prior knowledge) connection to
/// the plain listener on `port`; any status is a reply.
pub fn h2c_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (send, connection) = h2::client::handshake(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let reply = get(&send, &format!("http://127.0.0.1:{port}{path}"), headers).await;
        driver.abort();
        reply
    })
}
